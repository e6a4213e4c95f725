//! A client in another language: docs/examples/publish.py (nats-py + msgpack) starts an
//! instance, sees it running through the events, stops it and sees it stopped.
//!
//! Skipped (with a note on stderr) where python3 or its NATS/MessagePack packages are
//! missing; ops/setup.sh installs them under .berth/py. Under CI (`CI` set) that fails.

use berth_proto::InstanceState;
use berth_tests::{
    Fleet,
    serving::{python_missing, run_python},
    worker,
};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_example_starts_and_stops_an_instance() {
    if let Some(why) = python_missing("nats, msgpack").await {
        eprintln!("skipping python_client: {why}");
        return;
    }

    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    let stdout = run_python(
        "docs/examples/publish.py",
        &["py-demo", "--vram-gib", "10"],
        &[("BERTH_NATS_URL", fleet.servers.nats.url())],
        LIMIT,
    )
    .await;
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
