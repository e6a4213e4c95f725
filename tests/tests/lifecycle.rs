//! The whole path on real servers: start → analyzing → scheduled → running → stop → stopped.

use berth_proto::{InstanceEvent, InstanceState};
use berth_tests::{Fleet, GIB, worker};
use futures::StreamExt;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_runs_and_stop_frees_the_gpu() {
    let mut fleet = Fleet::start().await;
    let mut events = fleet
        .bus
        .client()
        .subscribe("berth.events.instance.llama")
        .await
        .unwrap();
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 2, 80, &[("zone", "a")])).await;

    fleet.start_instance("llama", 20 * GIB, 2).await;
    let row = fleet
        .wait_state("llama", InstanceState::Running, LIMIT)
        .await;
    assert_eq!(row.worker_id.as_deref(), Some("w1"));
    let allocs = fleet.store.allocations().await.unwrap();
    assert_eq!(allocs.len(), 2, "{allocs:?}");
    assert!(
        allocs
            .iter()
            .all(|a| a.bytes == 20 * GIB && a.version == row.version)
    );
    fleet.assert_books_balanced().await;

    fleet.stop_instance("llama").await;
    fleet
        .wait_state("llama", InstanceState::Stopped, LIMIT)
        .await;
    assert!(fleet.store.allocations().await.unwrap().is_empty());
    assert!(
        fleet
            .store
            .gpus()
            .await
            .unwrap()
            .iter()
            .all(|g| g.reserved_bytes == 0)
    );
    fleet.assert_books_balanced().await;

    // Every transition was published, in order.
    let mut seen = Vec::new();
    while seen.last() != Some(&InstanceState::Stopped) {
        let msg = tokio::time::timeout(LIMIT, events.next())
            .await
            .unwrap()
            .unwrap();
        let ev: InstanceEvent = berth_proto::decode(&msg.payload).unwrap();
        seen.push(ev.state);
    }
    use InstanceState::*;
    // Reports are applied concurrently; a `starting` that arrives after `running` is
    // (rightly) ignored, so it may be missing. Nothing else may be.
    seen.retain(|s| *s != Starting);
    assert_eq!(seen, [Analyzing, Scheduled, Running, Stopping, Stopped]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_instance_is_pending_with_a_reason() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("small", 1, 24, &[])).await;

    fleet.start_instance("big", 40 * GIB, 1).await;
    let row = fleet.wait_state("big", InstanceState::Pending, LIMIT).await;
    let reason = row.reason.unwrap();
    assert!(reason.contains("small: 1 × "), "{reason}");
    assert!(
        reason.contains("needs 40.0 GiB per GPU (0 of 1 GPUs have it)"),
        "{reason}"
    );
    assert!(fleet.store.allocations().await.unwrap().is_empty());

    // A stop of a pending instance needs no agent.
    fleet.stop_instance("big").await;
    fleet.wait_state("big", InstanceState::Stopped, LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_moves_the_instance_and_releases_the_old_placement() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    fleet.start_instance("m", 30 * GIB, 1).await;
    let first = fleet.wait_state("m", InstanceState::Running, LIMIT).await;
    // A new start with a new size replaces the running placement.
    fleet.start_instance("m", 40 * GIB, 1).await;
    let store = fleet.store.clone();
    let old_version = first.version;
    let second = berth_tests::wait_until("restart to settle", LIMIT, || {
        let store = store.clone();
        async move {
            let row = store.instance("m").await.ok()??;
            let allocs = store.allocations().await.ok()?;
            let settled = row.version > old_version && row.state == "running";
            (settled && allocs.len() == 1 && allocs[0].version == row.version)
                .then_some((row, allocs))
        }
    })
    .await;
    assert!(second.0.version > first.version);
    assert_eq!(second.1[0].bytes, 40 * GIB);
    fleet.assert_books_balanced().await;
}

/// `gpu_name` picks the kind of GPU; a kind nobody has leaves the instance pending with a
/// reason that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gpu_name_selects_the_kind_of_gpu() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("h100s", 1, 80, &[])).await;
    let mut l4s = worker("l4s", 2, 24, &[]);
    for g in &mut l4s.gpus {
        g.name = "NVIDIA L4".into();
    }
    fleet.add_agent(l4s).await;

    let on = |vram: i64, name: &str| {
        berth_proto::Command::Start(berth_proto::StartSpec {
            gpu_name: Some(name.into()),
            ..berth_proto::StartSpec::claim(vram, 1)
        })
    };
    fleet
        .bus
        .publish_command("small", &on(10 * GIB, "l4"))
        .await
        .expect("publish");
    let row = fleet
        .wait_state("small", InstanceState::Running, LIMIT)
        .await;
    assert_eq!(row.worker_id.as_deref(), Some("l4s"));

    fleet
        .bus
        .publish_command("nope", &on(10 * GIB, "A100"))
        .await
        .expect("publish");
    let row = fleet
        .wait_state("nope", InstanceState::Pending, LIMIT)
        .await;
    let reason = row.reason.unwrap_or_default();
    assert!(reason.contains("GPUs named like \"A100\""), "{reason}");
}
