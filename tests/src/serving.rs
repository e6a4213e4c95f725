//! Agents that run real servers, for the tests of what serves requests (gateway, runtime):
//! the process runtime with test-sized timers, and start commands for the fake model server
//! (`ops/fake-model-server.py`) and the real llama-server.

use crate::GIB;
use berth_agent::{
    ProcessConfig, Runtime,
    supervisor::{PortPool, RestartLimits},
};
use berth_models::{CustomClaim, EstimateOptions, LlamaCppOptions, ModelRef};
use berth_proto::{Command, StartSpec};
use std::{
    path::{Path, PathBuf},
    time::Duration,
};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The process runtime with timers short enough for tests (one restart allowed).
pub fn process_runtime(state_dir: &Path, ports: std::ops::RangeInclusive<u16>) -> Runtime {
    Runtime::Process(Box::new(process_config(state_dir, ports)))
}

/// Its configuration, to change before use; llama-server from `BERTH_LLAMA_SERVER` when set.
pub fn process_config(state_dir: &Path, ports: std::ops::RangeInclusive<u16>) -> ProcessConfig {
    let mut c = ProcessConfig::new(state_dir.to_path_buf());
    c.ports = PortPool::new(ports);
    c.startup_timeout = Duration::from_secs(20);
    c.startup_probe_every = Duration::from_millis(50);
    c.probe_every = Duration::from_millis(200);
    c.grace = Duration::from_secs(3);
    c.restarts = RestartLimits {
        max_restarts: 1,
        ..RestartLimits::default()
    };
    c.restarts.backoff.first_delay = Duration::from_millis(50);
    c.model_roots = crate::test_model_roots();
    if let Some(bin) = std::env::var_os("BERTH_LLAMA_SERVER") {
        c.binaries.llama_server = Some(bin.into());
    }
    c
}

/// A start of the fake OpenAI-compatible server under `model`, with its `flags`.
pub fn fake_start(model: &str, flags: &[&str]) -> Command {
    let server = repo().join("ops/fake-model-server.py");
    let mut argv: Vec<String> = ["python3", &server.display().to_string()]
        .into_iter()
        .chain(["--host", "{host}", "--port", "{port}", "--model", "{model}"])
        .map(str::to_owned)
        .collect();
    argv.extend(flags.iter().map(|f| (*f).to_owned()));
    Command::Start(StartSpec {
        model: model.into(),
        backend: Some(Box::new(EstimateOptions::Custom(CustomClaim {
            bytes_per_gpu: GIB.unsigned_abs(),
            argv,
            ..CustomClaim::default()
        }))),
        ..StartSpec::claim(GIB, 1)
    })
}

/// The SmolLM2 GGUF that `ops/fetch-models.sh` gets.
pub fn smollm2() -> PathBuf {
    repo().join(".berth/models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A start of SmolLM2 on llama-server under `model`, or why it cannot run here (no
/// `BERTH_LLAMA_SERVER`, no model file). Under CI its absence is a failure.
pub fn llama_start(model: &str) -> Result<Command, String> {
    let why = if std::env::var_os("BERTH_LLAMA_SERVER").is_none() {
        Some("BERTH_LLAMA_SERVER is not set (run ops/build-llama.sh)".to_owned())
    } else if !smollm2().exists() {
        Some(format!(
            "{} is missing (run ops/fetch-models.sh)",
            smollm2().display()
        ))
    } else {
        None
    };
    if let Some(why) = why {
        assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
        return Err(why);
    }
    Ok(Command::Start(StartSpec {
        model: model.into(),
        model_ref: Some(Box::new(ModelRef::Path(smollm2()))),
        backend: Some(Box::new(EstimateOptions::LlamaCpp(LlamaCppOptions {
            context: Some(2048),
            ..LlamaCppOptions::default()
        }))),
        ..StartSpec::claim(GIB, 1)
    }))
}

/// The PYTHONPATH for the Python clients: .berth/py (where ops/setup.sh installs their
/// packages) first, then whatever the caller had.
pub fn python_path() -> std::ffi::OsString {
    let own = repo().join(".berth").join("py");
    let mut paths = vec![own.clone()];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| own.into())
}

/// Why python3 with `modules` cannot run here, if it cannot. Under CI (`CI` set), where the
/// test command installs them, their absence is a failure.
pub async fn python_missing(modules: &str) -> Option<String> {
    let probe = tokio::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .env("PYTHONPATH", python_path())
        .stdin(std::process::Stdio::null())
        .output()
        .await;
    let why = match probe {
        Err(e) => format!("python3 cannot be run: {e}"),
        Ok(out) if !out.status.success() => format!(
            "python3 lacks {modules} (run ops/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Ok(_) => return None,
    };
    assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
    Some(why)
}

/// Runs `script` (under the repository) with `args` and `env`, within `limit`; its stdout.
/// Panics with its output when it fails.
pub async fn run_python(
    script: &str,
    args: &[&str],
    env: &[(&str, String)],
    limit: Duration,
) -> String {
    let mut cmd = tokio::process::Command::new("python3");
    cmd.arg(repo().join(script))
        .args(args)
        .env("PYTHONPATH", python_path())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} {args:?} did not finish within {limit:?}"))
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{script} {args:?}:\n{stdout}{stderr}");
    assert!(
        out.status.success(),
        "{script} {args:?} failed ({}):\n{stdout}{stderr}",
        out.status
    );
    stdout.into_owned()
}
