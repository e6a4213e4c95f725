//! A client in another language: docs/examples/publish.py (nats-py + msgpack) starts an
//! instance, sees it running through the events, stops it and sees it stopped.
//!
//! Skipped (with a note on stderr) where python3 or its NATS/MessagePack packages are
//! missing; ops/setup.sh installs them under .berth/py. Under CI (`CI` set) that fails.

use berth_proto::InstanceState;
use berth_tests::{Fleet, worker};
use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};
use tokio::process::Command;

const LIMIT: Duration = Duration::from_secs(90);

/// The PYTHONPATH for the example: .berth/py first, then whatever the caller had.
fn python_path(root: &Path) -> OsString {
    let mut paths = vec![root.join(".berth").join("py")];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(paths).unwrap_or_else(|_| root.join(".berth").join("py").into())
}

/// Why the example cannot run here, if it cannot.
async fn python_missing(pythonpath: &OsString) -> Option<String> {
    let probe = Command::new("python3")
        .args(["-c", "import nats, msgpack"])
        .env("PYTHONPATH", pythonpath)
        .stdin(Stdio::null())
        .output()
        .await;
    match probe {
        Err(e) => Some(format!("python3 cannot be run: {e}")),
        Ok(out) if !out.status.success() => Some(format!(
            "python3 lacks nats-py or msgpack (run ops/setup.sh): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_starts_and_stops_an_instance() {
    let root: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let pythonpath = python_path(&root);
    if let Some(why) = python_missing(&pythonpath).await {
        // The test command installs the packages: under CI their absence is a failure.
        assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
        eprintln!("skipping python_client: {why}");
        return;
    }

    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    let run = Command::new("python3")
        .arg(root.join("docs/examples/publish.py"))
        .args(["py-demo", "--vram-gib", "10"])
        .env("BERTH_NATS_URL", fleet.servers.nats.url())
        .env("PYTHONPATH", &pythonpath)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(LIMIT, run)
        .await
        .expect("publish.py did not finish in time")
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("publish.py stdout:\n{stdout}\npublish.py stderr:\n{stderr}");
    assert!(
        out.status.success(),
        "publish.py failed ({}): {stderr}",
        out.status
    );
    assert!(stdout.contains("running"), "{stdout}");
    assert!(stdout.contains("stopped"), "{stdout}");

    let row = fleet
        .store
        .instance("py-demo")
        .await
        .unwrap()
        .expect("py-demo exists");
    assert_eq!(row.state, InstanceState::Stopped.as_str(), "{row:?}");
    let allocs = fleet.store.allocations().await.unwrap();
    assert!(
        allocs.iter().all(|a| a.instance_id != "py-demo"),
        "{allocs:?}"
    );
    assert!(allocs.is_empty(), "{allocs:?}");
    fleet.assert_books_balanced().await;
}
