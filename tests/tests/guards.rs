//! One test per invariant guard: each passes with the guard in place and fails when that
//! guard alone is taken out. The interleavings are made exact with the analyzer's test hooks
//! and with direct store calls, never with sleeps.

use berth_analyzer::Stats;
use berth_proto::{CmdSeq, GpuUsage, InstanceState, StartSpec, Version, status::StatusMsg};
use berth_store::{
    commands::StartApplied,
    placement::{CommitOutcome, GpuClaim, PlacementCommit},
};
use berth_tests::hold::hold_before_commit;
use berth_tests::{Fleet, GIB, wait_until, worker};
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

const LIMIT: Duration = Duration::from_secs(30);

/// The spec `Fleet::start_instance` publishes, as the store records it.
fn spec_json(vram: i64, gpus: i64) -> serde_json::Value {
    let spec = StartSpec {
        model: "test-model".into(),
        ..StartSpec::claim(vram, gpus)
    };
    serde_json::to_value(&spec).expect("spec as JSON")
}

/// Waits until the analyzer has settled a commit one way or the other.
async fn wait_commit_settled(stats: &Arc<Stats>) {
    wait_until("the held commit to settle", LIMIT, || {
        let stats = stats.clone();
        async move {
            let settled = stats.placements_committed.get()
                + stats.cas_conflicts.get()
                + stats.capacity_conflicts.get();
            (settled > 0).then_some(())
        }
    })
    .await;
}

/// No GPU gives berth more than is left once the system's share and what processes outside
/// berth use are taken off.
async fn assert_room_for_outside_use(fleet: &Fleet) {
    for g in fleet.store.gpus().await.expect("gpus") {
        assert!(
            g.reserved_bytes + g.used_outside_bytes <= g.total_bytes - g.system_reserved_bytes,
            "{}:{} reserves {} with {} used outside berth, of {} (system {})",
            g.worker_id,
            g.idx,
            g.reserved_bytes,
            g.used_outside_bytes,
            g.total_bytes,
            g.system_reserved_bytes
        );
    }
}

/// Guard: the commit's CAS on the version (`version = $2` in the single commit,
/// `i.version = r.version` in the grouped one). A redelivery of the same command while the
/// instance is still `analyzing` is redone under a new version without leaving that state,
/// so the state check alone cannot tell the two fits apart: only the version can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_version_refuses_a_placement_for_a_version_redone_by_a_redelivery() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let stats = fleet.add_analyzer(hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    let seq = fleet.start_instance("x", 20 * GIB, 1).await;
    let (id, v, go) = held.recv().await.expect("fit reached the commit");
    assert_eq!(id, "x");

    // What another analyzer does with a redelivery of this very command (same sequence):
    // the intent is redone under a new version, the instance stays `analyzing`.
    let redone = fleet
        .store
        .apply_start("x", seq, spec_json(20 * GIB, 1))
        .await
        .unwrap();
    let StartApplied::Analyzing { transition, .. } = redone else {
        panic!("the redelivery was not redone: {redone:?}");
    };
    assert_eq!(transition.version, v.next());
    go.send(()).expect("the held fit is still waiting");

    wait_commit_settled(&stats).await;
    assert_eq!(
        stats.placements_committed.get(),
        0,
        "the fit for version {v} committed after the instance moved to version {}",
        v.next()
    );
    assert_eq!(stats.cas_conflicts.get(), 1);
    let row = fleet.store.instance("x").await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.version, row.cmd_seq),
        ("analyzing", v.next(), seq),
        "the instance is as the redelivery left it"
    );
    let allocations = fleet.store.allocations().await.unwrap();
    assert!(
        allocations.is_empty(),
        "nothing may be held for a superseded version: {allocations:?}"
    );
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

    // The grouped statement (several placements decided at the same moment) keeps the same
    // check: the stale fit is refused, the other placement of the group lands.
    let StartApplied::Analyzing { transition: w, .. } = fleet
        .store
        .apply_start("w", CmdSeq::new(seq.get() + 1_000), spec_json(20 * GIB, 1))
        .await
        .unwrap()
    else {
        panic!("w not recorded");
    };
    let claim = |id: &str, version: i64| PlacementCommit {
        id: id.into(),
        version: Version::new(version),
        claims: vec![GpuClaim {
            worker_id: "w1".into(),
            idx: 0,
            bytes: 20 * GIB,
        }],
        group: None,
    };
    let outcomes = fleet
        .store
        .commit_many(&[claim("x", v.get()), claim("w", w.version.get())])
        .await
        .unwrap();
    assert_eq!(
        outcomes[0],
        CommitOutcome::VersionMoved,
        "a grouped commit for version {v} landed after the instance moved to version {}",
        v.next()
    );
    assert!(
        matches!(outcomes[1], CommitOutcome::Committed(_)),
        "{outcomes:?}"
    );
    let held: Vec<_> = fleet
        .store
        .allocations()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.instance_id, a.version))
        .collect();
    assert_eq!(held, [("w".to_owned(), w.version)]);
    fleet.assert_books_balanced().await;
}

/// Guard: the `gpus_no_overcommit` CHECK (reserved + system reserved <= total), the last line
/// of defence behind every writer's own room check. A write that would overcommit a GPU is
/// refused by the database itself; a worker re-registering with a larger system reservation
/// gives up what no longer fits before its new size is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_overcommit_check_refuses_any_write_past_a_gpus_capacity() {
    let fleet = Fleet::start().await;
    let gpu = berth_proto::GpuInfo {
        index: 0,
        name: "H100".into(),
        uuid: "GPU-w1-0".into(),
        total_bytes: 80 * GIB,
        system_reserved_bytes: GIB,
    };
    let labels = std::collections::BTreeMap::new();
    fleet
        .store
        .register_worker("w1", &labels, std::slice::from_ref(&gpu))
        .await
        .unwrap();
    let StartApplied::Analyzing { transition, .. } = fleet
        .store
        .apply_start("x", CmdSeq::new(1), spec_json(60 * GIB, 1))
        .await
        .unwrap()
    else {
        panic!("x not recorded");
    };
    let committed = fleet
        .store
        .commit_placement("x", transition.version, "w1", &[0], 60 * GIB)
        .await
        .unwrap();
    assert!(
        matches!(committed, CommitOutcome::Committed(_)),
        "{committed:?}"
    );

    // A re-registration that leaves less than the 60 GiB reserved does not write an
    // overcommit: x is taken off first (pending, to be placed again), then the size changes.
    let shrunk = berth_proto::GpuInfo {
        system_reserved_bytes: 30 * GIB,
        ..gpu.clone()
    };
    let registered = fleet
        .store
        .register_worker("w1", &labels, std::slice::from_ref(&shrunk))
        .await
        .unwrap();
    let evicted: Vec<(&str, Option<InstanceState>)> = registered
        .evicted
        .iter()
        .map(|(id, e)| (id.as_str(), e.transition.as_ref().map(|t| t.state)))
        .collect();
    assert_eq!(evicted, [("x", Some(InstanceState::Pending))]);
    let g = fleet.store.gpus().await.unwrap().remove(0);
    assert_eq!(
        (g.reserved_bytes, g.system_reserved_bytes, g.total_bytes),
        (0, 30 * GIB, 80 * GIB)
    );

    // Raw SQL past the capacity, by one byte.
    let mut conn = AsyncPgConnection::establish(&fleet.servers.pg.url())
        .await
        .unwrap();
    let raw = diesel::sql_query(
        "UPDATE gpus SET reserved_bytes = total_bytes - system_reserved_bytes + 1 \
         WHERE worker_id = 'w1' AND idx = 0",
    )
    .execute(&mut conn)
    .await;
    match raw {
        Err(DieselError::DatabaseError(DatabaseErrorKind::CheckViolation, info)) => {
            assert_eq!(info.constraint_name(), Some("gpus_no_overcommit"));
        }
        other => panic!("an overcommitting UPDATE must be refused by the CHECK: {other:?}"),
    }
    fleet.assert_books_balanced().await;
}

/// Guard: the `used_outside_bytes` term of the commit's room check. Memory taken by a process
/// outside berth after the fit (reported by a heartbeat) must make the commit fail; the fit
/// is redone on the database's view and finds no room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_room_check_counts_memory_used_outside_berth() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let stats = fleet.add_analyzer(hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    fleet.start_instance("x", 20 * GIB, 1).await;
    let (id, _, go) = held.recv().await.expect("fit reached the commit");
    assert_eq!(id, "x");

    // Another process takes 70 GiB of the 80: the held 20 GiB no longer fit.
    let beat = StatusMsg::Heartbeat {
        worker_id: "w1".into(),
        usage: vec![GpuUsage {
            index: 0,
            used_outside_bytes: 70 * GIB,
        }],
    };
    fleet.bus.publish_status("w1", &beat).await.unwrap();
    let store = fleet.store.clone();
    wait_until("the heartbeat's usage to be recorded", LIMIT, || {
        let store = store.clone();
        async move {
            let gpus = store.gpus().await.ok()?;
            gpus.iter()
                .all(|g| g.used_outside_bytes == 70 * GIB)
                .then_some(())
        }
    })
    .await;
    go.send(()).expect("the held fit is still waiting");

    wait_commit_settled(&stats).await;
    assert_room_for_outside_use(&fleet).await;
    assert_eq!(
        stats.placements_committed.get(),
        0,
        "committed into memory used outside berth"
    );
    assert_eq!(stats.capacity_conflicts.get(), 1);
    let row = fleet.wait_state("x", InstanceState::Pending, LIMIT).await;
    assert!(row.worker_id.is_none(), "{row:?}");
    assert!(fleet.store.allocations().await.unwrap().is_empty());
    assert_room_for_outside_use(&fleet).await;
    fleet.assert_books_balanced().await;
}

/// Guard: the newest-command check before the fit (`last_command_seq`, asked while the
/// intent is recorded). The analyzer has the command in hand but cannot start on it (its
/// only slot is taken by a held fit) while a newer copy of the same start is stored; the
/// watch hears that copy but it is the same start, so it cancels nothing and marks nothing
/// as heard-other. Only the check keeps the superseded command from costing a fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_command_check_skips_the_fit_of_a_superseded_command() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let mut config = fleet.analyzer_config("analyzer-0");
    config.concurrency = 1;
    let ack_wait = config.ack_wait;
    let stats = fleet.add_analyzer_with(config, hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    // The analyzer's one slot is taken by y's fit, held before its commit.
    fleet.start_instance("y", 20 * GIB, 1).await;
    let (id, _, go_y) = held.recv().await.expect("y's fit reached the commit");
    assert_eq!(id, "y");

    // x's start is delivered to the analyzer, which cannot start on it yet.
    let consumer = fleet.bus.command_consumer(ack_wait).await.unwrap();
    let old = fleet.start_instance("x", 20 * GIB, 1).await;
    wait_until("x's start to be delivered", LIMIT, || {
        let consumer = consumer.clone();
        async move {
            let info = consumer.get_info().await.ok()?;
            (info.num_ack_pending == 2).then_some(())
        }
    })
    .await;
    // The same start again, now the newest command of x.
    let new = fleet.start_instance("x", 20 * GIB, 1).await;
    assert!(new > old);
    go_y.send(()).expect("y's fit is still waiting");

    // The next fit to reach the commit is x's, for the newest command.
    let (id, version, go_x) = held.recv().await.expect("x's fit reached the commit");
    assert_eq!(id, "x");
    let fits_of_old: Vec<_> = stats
        .fit_log()
        .into_iter()
        .filter(|f| f.instance_id == "x" && f.cmd_seq == old)
        .collect();
    assert!(
        fits_of_old.is_empty(),
        "a fit was computed for superseded command {old} (newest {new}): {fits_of_old:?}"
    );
    assert_eq!(stats.fits_skipped_superseded.get(), 1);
    go_x.send(()).expect("x's fit is still waiting");

    let row = fleet.wait_state("x", InstanceState::Running, LIMIT).await;
    assert_eq!(row.cmd_seq, new);
    assert_eq!(row.version, version);
    fleet.wait_state("y", InstanceState::Running, LIMIT).await;
    assert_eq!(stats.fits_skipped_superseded.get(), 1);
    assert_eq!(stats.placements_committed.get(), 2);
    fleet.assert_books_balanced().await;
}

/// Guard: the refit after a capacity conflict. The held fit's GPU is taken by another commit;
/// on release the commit finds no room, and the analyzer fits again on the database's view
/// and places the instance on the worker's other GPU, freed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_conflict_is_refit_onto_the_gpu_still_free() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let stats = fleet.add_analyzer(hooks).await;
    fleet.add_agent(worker("w1", 2, 80, &[])).await;

    // b takes 60 GiB of one GPU, so x's 50 GiB fit only on the other one.
    fleet.start_instance("b", 60 * GIB, 1).await;
    let (id, _, go) = held.recv().await.expect("b's fit reached the commit");
    assert_eq!(id, "b");
    go.send(()).expect("b's fit is still waiting");
    fleet.wait_state("b", InstanceState::Running, LIMIT).await;
    let b_gpu = fleet.store.allocations().await.unwrap()[0].gpu_idx;
    let x_gpu = 1 - b_gpu;

    fleet.start_instance("x", 50 * GIB, 1).await;
    let (id, version, go) = held.recv().await.expect("x's fit reached the commit");
    assert_eq!(id, "x");

    // b goes away, and another placement (committed straight in the store, as another
    // analyzer would) takes x's GPU.
    fleet.stop_instance("b").await;
    fleet.wait_state("b", InstanceState::Stopped, LIMIT).await;
    let StartApplied::Analyzing { transition, .. } = fleet
        .store
        .apply_start("z", CmdSeq::new(1_000_000), spec_json(50 * GIB, 1))
        .await
        .unwrap()
    else {
        panic!("z not recorded");
    };
    let taken = fleet
        .store
        .commit_placement(
            "z",
            transition.version,
            "w1",
            &[x_gpu.unsigned_abs()],
            50 * GIB,
        )
        .await
        .unwrap();
    assert!(matches!(taken, CommitOutcome::Committed(_)), "{taken:?}");
    go.send(()).expect("x's fit is still waiting");

    // The refit reaches the commit again, for the same version; anything else (pending,
    // or placed only after a later republish) means the placement was not refit.
    let deadline = Instant::now() + LIMIT;
    let not_refit = |what: String| {
        format!(
            "x (version {version}) was not refit after losing its GPU: {what}; \
             capacity conflicts {}, refits {}",
            stats.capacity_conflicts.get(),
            stats.refits.get()
        )
    };
    let go = loop {
        if let Ok((id, v, go)) = held.try_recv() {
            assert!(
                id == "x" && v == version,
                "{}",
                not_refit(format!("the next fit to commit was {id} at version {v}"))
            );
            break go;
        }
        let row = fleet.store.instance("x").await.unwrap().unwrap();
        assert!(
            row.state == "analyzing" && row.version == version,
            "{}",
            not_refit(format!("{} at version {}", row.state, row.version))
        );
        assert!(Instant::now() < deadline, "timed out waiting for the refit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stats.capacity_conflicts.get(), 1);
    assert_eq!(stats.refits.get(), 1);
    go.send(()).expect("the refit is still waiting");

    let row = fleet.wait_state("x", InstanceState::Running, LIMIT).await;
    assert_eq!(row.version, version);
    let mine: Vec<_> = fleet
        .store
        .allocations()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.instance_id == "x")
        .map(|a| (a.worker_id, a.gpu_idx, a.bytes))
        .collect();
    assert_eq!(mine, [("w1".to_owned(), b_gpu, 50 * GIB)]);
    assert_eq!(stats.capacity_conflicts.get(), 1);
    assert_eq!(stats.refits.get(), 1);
    fleet.assert_books_balanced().await;
}
