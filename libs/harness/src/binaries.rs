//! Where the server binaries are: the environment, `.berth/` (installed by `ops/setup.sh`),
//! the PATH, and Debian's PostgreSQL directories.

use crate::HarnessError;
use std::path::{Path, PathBuf};

const SETUP_HINT: &str = "run ops/setup.sh (it installs what is missing under .berth/)";

/// The workspace root: the nearest ancestor of the current directory (or of this crate's
/// source) that holds `ops/setup.sh`.
pub fn workspace_root() -> Option<PathBuf> {
    let from_cwd = std::env::current_dir().ok();
    let from_build = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    from_cwd
        .into_iter()
        .chain(std::iter::once(from_build))
        .flat_map(|start| start.ancestors().map(Path::to_path_buf).collect::<Vec<_>>())
        .find(|dir| dir.join("ops/setup.sh").is_file())
}

/// A binary of this workspace next to the running one (`cargo build` puts them all in
/// `target/<profile>/`): how `berth` finds `berth-analyzer`, `berth-agent` and `berth-bench`,
/// and `berth-bench` finds `berth-analyzer`. Each is built by the package of the same name.
pub fn sibling_binary(name: &'static str) -> Result<PathBuf, HarnessError> {
    let exe = std::env::current_exe().map_err(|e| HarnessError::io("/proc/self/exe", e))?;
    let bin = exe.with_file_name(name);
    if bin.is_file() {
        return Ok(bin);
    }
    let release = if exe.parent().and_then(Path::file_name) == Some("release".as_ref()) {
        " --release"
    } else {
        ""
    };
    Err(HarnessError::Missing {
        what: name,
        hint: format!(
            "expected at {} (next to {}); build it with `cargo build{release} -p {name}`, or \
             every berth binary with `cargo build{release} --bins`",
            bin.display(),
            exe.display()
        ),
    })
}

/// Values written by `ops/setup.sh` into `.berth/env` (`KEY=VALUE` lines).
fn setup_env(key: &str) -> Option<String> {
    let text = std::fs::read_to_string(workspace_root()?.join(".berth/env")).ok()?;
    text.lines()
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// The `nats-server` binary: `$BERTH_NATS_SERVER`, `.berth/env`, `.berth/bin`, then PATH.
pub fn find_nats_server() -> Result<PathBuf, HarnessError> {
    let candidates = [
        std::env::var("BERTH_NATS_SERVER").ok().map(PathBuf::from),
        setup_env("BERTH_NATS_SERVER").map(PathBuf::from),
        workspace_root().map(|r| r.join(".berth/bin/nats-server")),
        on_path("nats-server"),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.is_file())
        .ok_or(HarnessError::Missing {
            what: "nats-server",
            hint: SETUP_HINT.into(),
        })
}

/// The directory with `initdb` and `postgres`: `$BERTH_PG_BIN`, `.berth/env`, PATH, then the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_pg_bin() -> Result<PathBuf, HarnessError> {
    let mut candidates = vec![
        std::env::var("BERTH_PG_BIN").ok().map(PathBuf::from),
        setup_env("BERTH_PG_BIN").map(PathBuf::from),
        on_path("initdb").and_then(|p| {
            std::fs::canonicalize(p)
                .ok()?
                .parent()
                .map(Path::to_path_buf)
        }),
    ];
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .collect();
    debian.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates.extend(debian.into_iter().rev().map(Some));
    candidates
        .into_iter()
        .flatten()
        .find(|dir| dir.join("initdb").is_file() && dir.join("postgres").is_file())
        .ok_or(HarnessError::Missing {
            what: "PostgreSQL (initdb, postgres)",
            hint: SETUP_HINT.into(),
        })
}

/// The llama-server the tests with a real model run: `BERTH_LLAMA_SERVER` (which
/// `ops/build-llama.sh` records in `.berth/env`). `None` when it is not set: such a test is
/// skipped (and says so), except under CI, where that is an error.
pub fn test_llama_server() -> Result<Option<PathBuf>, HarnessError> {
    match std::env::var_os("BERTH_LLAMA_SERVER") {
        Some(path) => Ok(Some(PathBuf::from(path))),
        None if std::env::var_os("CI").is_some() => Err(HarnessError::Missing {
            what: "BERTH_LLAMA_SERVER",
            hint: "CI runs the tests with a real model: run ops/build-llama.sh".into(),
        }),
        None => {
            eprintln!("skipped: BERTH_LLAMA_SERVER is not set (run ops/build-llama.sh)");
            Ok(None)
        }
    }
}
