//! The store's guarantees, checked directly against PostgreSQL: migrations under concurrency,
//! the command-sequence rule, the CAS commit, and the conditional reservation.

use berth_proto::{CmdSeq, GpuInfo, InstanceEvent, InstanceState, Version, status::ReportedState};
use berth_store::reports::{Forward, Report};
use berth_store::{
    Store,
    commands::{StartApplied, StopApplied},
    placement::CommitOutcome,
};
use berth_tests::GIB;
use diesel_async::{AsyncConnection, RunQueryDsl};
use futures::future::join_all;
use std::collections::BTreeMap;
use std::time::Duration;

async fn store_with_worker(servers: &berth_harness::TestServers) -> Store {
    berth_store::migrate(&servers.pg.url())
        .await
        .expect("store setup");
    let store = Store::connect(&servers.pg.url(), 4).expect("store setup");
    let gpus = vec![GpuInfo {
        index: 0,
        name: "H100".into(),
        uuid: String::new(),
        total_bytes: 80 * GIB,
        system_reserved_bytes: GIB,
    }];
    store
        .register_worker("w1", &BTreeMap::new(), &gpus)
        .await
        .expect("store setup");
    store
}

fn servers() -> berth_harness::TestServers {
    berth_tests::init_logs();
    berth_harness::TestServers::start().expect("servers")
}

fn spec() -> serde_json::Value {
    serde_json::json!({"model": "m", "vram_bytes": 10 * GIB, "gpus": 1, "selector": {}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_once() {
    let servers = servers();
    let url = servers.pg.url();
    let applied: Vec<usize> = join_all((0..6).map(|_| berth_store::migrate(&url)))
        .await
        .into_iter()
        .map(|r| r.expect("migration"))
        .collect();
    assert_eq!(applied.iter().filter(|n| **n > 0).count(), 1, "{applied:?}");
    assert_eq!(berth_store::migrate(&url).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_commands_are_stale_and_change_nothing() {
    let servers = servers();
    let store = store_with_worker(&servers).await;
    let StartApplied::Analyzing { transition, .. } = store
        .apply_start("x", CmdSeq::new(10), spec())
        .await
        .unwrap()
    else {
        panic!("first start applies");
    };
    assert_eq!(transition.version, Version::new(1));
    assert_eq!(
        store.apply_stop("x", CmdSeq::new(9), None).await.unwrap(),
        StopApplied::Stale {
            current_seq: CmdSeq::new(10)
        }
    );
    assert!(matches!(
        store
            .apply_start("x", CmdSeq::new(3), spec())
            .await
            .unwrap(),
        StartApplied::Stale { .. }
    ));
    assert_eq!(
        store
            .apply_invalid("x", CmdSeq::new(5), "bad")
            .await
            .unwrap(),
        None
    );
    let row = store.instance("x").await.unwrap().unwrap();
    assert_eq!(
        (row.state.as_str(), row.version.get(), row.cmd_seq.get()),
        ("analyzing", 1, 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_start_is_redone_with_a_new_version() {
    let servers = servers();
    let store = store_with_worker(&servers).await;
    store
        .apply_start("x", CmdSeq::new(4), spec())
        .await
        .unwrap();
    // The analyzer that applied seq 4 died before committing; the redelivery takes over and
    // bumps the version, so a late commit by the first one would miss its CAS.
    let StartApplied::Analyzing { transition, .. } = store
        .apply_start("x", CmdSeq::new(4), spec())
        .await
        .unwrap()
    else {
        panic!("redelivery in analyzing is redone");
    };
    assert_eq!(transition.version, Version::new(2));
    assert_eq!(
        store
            .commit_placement("x", Version::new(1), "w1", &[0], 10 * GIB)
            .await
            .unwrap(),
        CommitOutcome::VersionMoved
    );
    assert!(matches!(
        store
            .commit_placement("x", Version::new(2), "w1", &[0], 10 * GIB)
            .await
            .unwrap(),
        CommitOutcome::Committed(_)
    ));
    // Once placed, a redelivery asks for the assignment to be sent again.
    assert_eq!(
        store
            .apply_start("x", CmdSeq::new(4), spec())
            .await
            .unwrap(),
        StartApplied::AlreadyPlaced {
            version: Version::new(2),
            worker_id: "w1".into(),
            claims: vec![berth_store::placement::GpuClaim {
                worker_id: "w1".into(),
                idx: 0,
                bytes: 10 * GIB,
            }],
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservation_refuses_what_does_not_fit() {
    let servers = servers();
    let store = store_with_worker(&servers).await;
    for (id, seq) in [("a", 1), ("b", 2)] {
        store
            .apply_start(id, CmdSeq::new(seq), spec())
            .await
            .unwrap();
    }
    // 79 GiB usable: 50 fits once, not twice.
    let results = join_all([
        store.commit_placement("a", Version::new(1), "w1", &[0], 50 * GIB),
        store.commit_placement("b", Version::new(1), "w1", &[0], 50 * GIB),
    ])
    .await;
    let committed = results
        .iter()
        .filter(|r| matches!(r, Ok(CommitOutcome::Committed(_))))
        .count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Ok(CommitOutcome::CapacityGone { gpu: 0, .. })))
        .count();
    assert_eq!((committed, refused), (1, 1), "{results:?}");
    assert!(store.gpu_violations().await.unwrap().is_empty());
    let loser = if matches!(results[0], Ok(CommitOutcome::Committed(_))) {
        "b"
    } else {
        "a"
    };
    let row = store.instance(loser).await.unwrap().unwrap();
    assert_eq!(row.state, "analyzing", "a refused commit leaves no trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_holds_gpus_until_the_agent_confirms() {
    let servers = servers();
    let store = store_with_worker(&servers).await;
    store
        .apply_start("x", CmdSeq::new(1), spec())
        .await
        .unwrap();
    store
        .commit_placement("x", Version::new(1), "w1", &[0], 10 * GIB)
        .await
        .unwrap();
    let StopApplied::Stopping {
        transition,
        workers,
    } = store.apply_stop("x", CmdSeq::new(2), None).await.unwrap()
    else {
        panic!("a placed instance stops through its agent");
    };
    assert_eq!(workers, ["w1"]);
    // A late report for the old version changes nothing.
    assert!(
        store
            .apply_report(&Report::new(
                "w1",
                "x",
                Version::new(1),
                ReportedState::Running
            ))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.gpus().await.unwrap()[0].reserved_bytes, 10 * GIB);
    // A confirmation from another worker releases nothing.
    assert!(
        store
            .apply_report(&Report::new(
                "w2",
                "x",
                transition.version,
                ReportedState::Stopped
            ))
            .await
            .unwrap()
            .is_empty()
    );
    let done = store
        .apply_report(&Report::new(
            "w1",
            "x",
            transition.version,
            ReportedState::Stopped,
        ))
        .await
        .unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(store.instance("x").await.unwrap().unwrap().state, "stopped");
    assert_eq!(store.gpus().await.unwrap()[0].reserved_bytes, 0);
    assert!(store.allocations().await.unwrap().is_empty());
}

fn intent(id: &str, seq: u64, spec: serde_json::Value) -> berth_store::commands::StartIntent {
    berth_store::commands::StartIntent {
        id: id.into(),
        seq: CmdSeq::new(seq),
        spec,
    }
}

/// The grouped start (one statement for many commands) keeps every rule of the single one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_starts_keep_the_sequence_rules() {
    let servers = servers();
    let store = store_with_worker(&servers).await;
    // "placed" runs at version 1, "old" has a newer command applied already, "redo" was
    // applied and its analyzer died.
    store
        .apply_start("placed", CmdSeq::new(1), spec())
        .await
        .unwrap();
    assert!(matches!(
        store
            .commit_placement("placed", Version::new(1), "w1", &[0], 10 * GIB)
            .await
            .unwrap(),
        CommitOutcome::Committed(_)
    ));
    store
        .apply_start("old", CmdSeq::new(50), spec())
        .await
        .unwrap();
    store
        .apply_start("redo", CmdSeq::new(7), spec())
        .await
        .unwrap();
    let bigger =
        serde_json::json!({"model": "m", "vram_bytes": 20 * GIB, "gpus": 1, "selector": {}});
    let results = store
        .apply_starts(&[
            intent("new", 12, spec()),
            intent("placed", 9, bigger.clone()),
            intent("dup", 20, spec()),
            intent("old", 30, spec()),
            intent("dup", 21, bigger.clone()),
            intent("redo", 7, spec()),
            intent("dup", 19, spec()),
            intent("new", 12, spec()),
        ])
        .await
        .unwrap();
    let analyzing = |r: &StartApplied| match r {
        StartApplied::Analyzing {
            transition,
            release_on,
        } => Some((
            transition.version.get(),
            transition.cmd_seq.get(),
            release_on.clone(),
        )),
        _ => None,
    };
    assert_eq!(
        analyzing(&results[0]),
        Some((1, 12, vec![])),
        "new instance"
    );
    assert_eq!(
        analyzing(&results[1]),
        Some((2, 9, vec!["w1".to_owned()])),
        "a new spec for a placed instance: the old placement is released"
    );
    assert_eq!(
        results[2],
        StartApplied::Stale {
            current_seq: CmdSeq::new(21)
        }
    );
    assert_eq!(
        results[3],
        StartApplied::Stale {
            current_seq: CmdSeq::new(50)
        }
    );
    assert_eq!(
        analyzing(&results[4]),
        Some((1, 21, vec![])),
        "newest of three"
    );
    assert_eq!(
        analyzing(&results[5]),
        Some((2, 7, vec![])),
        "redelivery redone"
    );
    assert_eq!(
        results[6],
        StartApplied::Stale {
            current_seq: CmdSeq::new(21)
        }
    );
    // A second delivery of the same command in the same group: taken as a redelivery.
    assert_eq!(analyzing(&results[7]), Some((2, 12, vec![])));
    for (id, version, seq) in [
        ("new", 2, 12),
        ("placed", 2, 9),
        ("dup", 1, 21),
        ("old", 1, 50),
    ] {
        let row = store.instance(id).await.unwrap().unwrap();
        assert_eq!(
            (row.version.get(), row.cmd_seq.get()),
            (version, seq),
            "{id}"
        );
    }
    // The old placement of "placed" can no longer land, the new version can.
    assert_eq!(
        store
            .commit_placement("placed", Version::new(1), "w1", &[0], 10 * GIB)
            .await
            .unwrap(),
        CommitOutcome::VersionMoved
    );
    assert!(matches!(
        store
            .commit_placement("placed", Version::new(2), "w1", &[0], 20 * GIB)
            .await
            .unwrap(),
        CommitOutcome::Committed(_)
    ));
    // The same spec again for the placed instance changes nothing but the sequence.
    assert_eq!(
        store
            .apply_starts(&[intent("placed", 10, bigger)])
            .await
            .unwrap(),
        vec![StartApplied::Unchanged {
            version: Version::new(2)
        }]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_reports_move_only_current_placements_forward() {
    use berth_store::reports::Forward;
    let servers = servers();
    let store = store_with_worker(&servers).await;
    // a, b, c placed at version 1 on w1 (1 GiB each); d started but not placed.
    for id in ["a", "b", "c", "d"] {
        store.apply_start(id, CmdSeq::new(1), spec()).await.unwrap();
    }
    for id in ["a", "b", "c"] {
        let placed = store
            .commit_placement(id, Version::new(1), "w1", &[0], GIB)
            .await;
        assert!(
            matches!(placed, Ok(CommitOutcome::Committed(_))),
            "{placed:?}"
        );
    }
    let report = |worker: &str, id: &str, version: i64, state| Forward {
        worker_id: worker.into(),
        instance_id: id.into(),
        version: Version::new(version),
        state,
        endpoint: None,
        restarts: 0,
        reason: None,
    };
    let reports = [
        report("w1", "c", 1, ReportedState::Starting),
        report("w1", "a", 1, ReportedState::Running),
        report("w1", "b", 1, ReportedState::Starting),
        report("w1", "a", 1, ReportedState::Running), // the same report again
        report("w1", "c", 1, ReportedState::Running), // overtakes its starting
        report("w1", "b", 0, ReportedState::Running), // an older version
        report("w2", "b", 1, ReportedState::Running), // another worker
        report("w1", "d", 1, ReportedState::Running), // not placed
        report("w1", "zzz", 1, ReportedState::Running), // unknown
    ];
    let moved = store.forward_reports(&reports).await.unwrap();
    let states: Vec<Option<&str>> = moved
        .iter()
        .map(|t| t.as_ref().map(|t| t.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            None,
            None,
            Some("starting"),
            Some("running"),
            Some("running"),
            None,
            None,
            None,
            None
        ]
    );
    for (id, want) in [
        ("a", "running"),
        ("b", "starting"),
        ("c", "running"),
        ("d", "analyzing"),
    ] {
        assert_eq!(
            store.instance(id).await.unwrap().unwrap().state,
            want,
            "{id}"
        );
    }
    let a = moved[3].as_ref().unwrap();
    assert_eq!((a.version.get(), a.worker_id.as_deref()), (1, Some("w1")));
    // Never backwards: a late starting for a running instance changes nothing.
    let late = store
        .forward_reports(&[report("w1", "a", 1, ReportedState::Starting)])
        .await
        .unwrap();
    assert_eq!(late, [None]);
    assert_eq!(store.instance("a").await.unwrap().unwrap().state, "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grouped_commits_are_each_all_or_nothing() {
    use berth_store::placement::{GpuClaim, PlacementCommit};
    let servers = servers();
    let store = store_with_worker(&servers).await;
    let gpus = |n: u32| -> Vec<GpuInfo> {
        (0..n)
            .map(|index| GpuInfo {
                index,
                name: "H100".into(),
                uuid: String::new(),
                total_bytes: 80 * GIB,
                system_reserved_bytes: GIB,
            })
            .collect()
    };
    store
        .register_worker("w2", &BTreeMap::new(), &gpus(2))
        .await
        .unwrap();
    for id in ["a", "b", "c", "d", "e", "f", "g"] {
        store.apply_start(id, CmdSeq::new(1), spec()).await.unwrap();
    }
    let claim = |worker: &str, idx: u32, gib: i64| GpuClaim {
        worker_id: worker.into(),
        idx,
        bytes: gib * GIB,
    };
    let commit = |id: &str, version: i64, claims: Vec<GpuClaim>| PlacementCommit {
        id: id.into(),
        version: Version::new(version),
        claims,
        group: Some("m".into()),
    };
    // w1:0 has 79 GiB free, w2:0 and w2:1 79 GiB each.
    let outcomes = store
        .commit_many(&[
            // a and b share w1:0 and fit together (30 + 40).
            commit("a", 1, vec![claim("w1", 0, 30)]),
            commit("b", 1, vec![claim("w1", 0, 40)]),
            // c and d together overfill w2:1 (50 + 50): neither commits; d's claim on w2:0
            // is left alone.
            commit("c", 1, vec![claim("w2", 1, 50)]),
            commit("d", 1, vec![claim("w2", 0, 10), claim("w2", 1, 50)]),
            // e's version moved: its 79 GiB on w2:0 counts for nothing.
            commit("e", 7, vec![claim("w2", 0, 79)]),
            // f spans two workers, led by w2.
            commit("f", 1, vec![claim("w2", 0, 20), claim("w1", 0, 5)]),
            // a again in the same group: decided after the first, so its version moved.
            commit("a", 1, vec![claim("w2", 0, 1)]),
        ])
        .await
        .unwrap();
    let kinds: Vec<String> = outcomes
        .iter()
        .map(|o| match o {
            CommitOutcome::Committed(t) => {
                format!("{}@{:?}{:?}", t.state.as_str(), t.worker_id, t.gpus)
            }
            CommitOutcome::VersionMoved => "moved".into(),
            CommitOutcome::CapacityGone { worker_id, gpu } => format!("gone {worker_id}:{gpu}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "scheduled@Some(\"w1\")[0]",
            "scheduled@Some(\"w1\")[0]",
            "gone w2:1",
            "gone w2:1",
            "moved",
            "scheduled@Some(\"w2\")[0]",
            "moved",
        ]
    );
    let reserved: Vec<(String, i32, i64)> = store
        .gpus()
        .await
        .unwrap()
        .into_iter()
        .map(|g| (g.worker_id, g.idx, g.reserved_bytes / GIB))
        .collect();
    assert_eq!(
        reserved,
        [
            ("w1".into(), 0, 75),
            ("w2".into(), 0, 20),
            ("w2".into(), 1, 0)
        ]
    );
    for (id, want) in [
        ("a", "scheduled"),
        ("c", "analyzing"),
        ("d", "analyzing"),
        ("f", "scheduled"),
        ("g", "analyzing"),
    ] {
        assert_eq!(
            store.instance(id).await.unwrap().unwrap().state,
            want,
            "{id}"
        );
    }
    let mut allocs: Vec<(String, String, i32, i64)> = store
        .allocations()
        .await
        .unwrap()
        .into_iter()
        .map(|a| (a.instance_id, a.worker_id, a.gpu_idx, a.bytes / GIB))
        .collect();
    allocs.sort();
    assert_eq!(
        allocs,
        [
            ("a".into(), "w1".into(), 0, 30),
            ("b".into(), "w1".into(), 0, 40),
            ("f".into(), "w1".into(), 0, 5),
            ("f".into(), "w2".into(), 0, 20),
        ]
    );
    let mut replicas = store.replicas().await.unwrap();
    replicas.sort();
    assert_eq!(
        replicas,
        [("w1".into(), "m".into(), 3), ("w2".into(), "m".into(), 1)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_groups_never_overcommit_a_gpu() {
    use berth_store::placement::{GpuClaim, PlacementCommit};
    let servers = servers();
    let store = store_with_worker(&servers).await;
    let ids: Vec<String> = (0..40).map(|i| format!("i{i:02}")).collect();
    for id in &ids {
        store.apply_start(id, CmdSeq::new(1), spec()).await.unwrap();
    }
    // Twenty groups of two racing, each instance wanting 10 GiB of w1:0's 79 GiB: whole
    // groups fit until the GPU is nearly full, and never more than it has.
    let groups: Vec<Vec<PlacementCommit>> = ids
        .chunks(2)
        .map(|chunk| {
            chunk
                .iter()
                .map(|id| PlacementCommit {
                    id: id.clone(),
                    version: Version::new(1),
                    claims: vec![GpuClaim {
                        worker_id: "w1".into(),
                        idx: 0,
                        bytes: 10 * GIB,
                    }],
                    group: None,
                })
                .collect()
        })
        .collect();
    let outcomes = join_all(groups.iter().map(|g| store.commit_many(g))).await;
    let committed = outcomes
        .into_iter()
        .flat_map(|o| o.unwrap())
        .filter(|o| matches!(o, CommitOutcome::Committed(_)))
        .count();
    let reserved = store.gpus().await.unwrap()[0].reserved_bytes;
    assert_eq!(reserved, committed as i64 * 10 * GIB);
    assert!(reserved <= 79 * GIB, "{reserved}");
    assert!(committed >= 6, "only {committed} committed");
}

/// The outbox trigger runs once per statement: every instance a grouped statement changes
/// gets exactly one event, with its GPUs on `scheduled`, and a statement that changes no
/// state records nothing.
#[tokio::test]
async fn grouped_statements_record_one_event_per_change() {
    use berth_store::{
        commands::StartIntent,
        outbox::Relayed,
        placement::{GpuClaim, PlacementCommit},
        reports::Forward,
    };
    let servers = servers();
    let store = store_with_worker(&servers).await;
    let intents: Vec<StartIntent> = ["c", "a", "b"]
        .iter()
        .map(|id| StartIntent {
            id: (*id).into(),
            seq: CmdSeq::new(1),
            spec: spec(),
        })
        .collect();
    store.apply_starts(&intents).await.unwrap();
    // Older commands: stale, nothing changes.
    let older: Vec<StartIntent> = intents
        .iter()
        .map(|i| StartIntent {
            seq: CmdSeq::new(0),
            ..i.clone()
        })
        .collect();
    store.apply_starts(&older).await.unwrap();
    let commit = |id: &str, version: i64, gib: i64| PlacementCommit {
        id: id.into(),
        version: Version::new(version),
        claims: vec![GpuClaim {
            worker_id: "w1".into(),
            idx: 0,
            bytes: gib * GIB,
        }],
        group: None,
    };
    // c's version moved: no change, no event.
    store
        .commit_many(&[commit("b", 1, 30), commit("a", 1, 40), commit("c", 9, 1)])
        .await
        .unwrap();
    let report = |id: &str, state| Forward {
        worker_id: "w1".into(),
        instance_id: id.into(),
        version: Version::new(1),
        state,
        endpoint: None,
        restarts: 0,
        reason: None,
    };
    store
        .forward_reports(&[
            report("b", ReportedState::Starting),
            report("a", ReportedState::Running),
            report("c", ReportedState::Running), // not placed: no change
        ])
        .await
        .unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let relayed = store
        .relay_events(100, |events| {
            seen.lock().unwrap().extend(events.into_iter().map(|e| {
                let e = e.event;
                format!(
                    "{} {} v{} {:?}",
                    e.instance_id,
                    e.state.as_str(),
                    e.version,
                    e.gpus
                )
            }));
            async { Ok::<(), std::convert::Infallible>(()) }
        })
        .await
        .unwrap();
    let seen = seen.into_inner().unwrap();
    assert_eq!(relayed, Relayed::Sent(seen.len()));
    assert_eq!(
        seen,
        [
            "a analyzing v1 []",
            "b analyzing v1 []",
            "c analyzing v1 []",
            "a scheduled v1 [0]",
            "b scheduled v1 [0]",
            "a running v1 []",
            "b starting v1 []",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_a_store_writes_nothing() {
    let servers = servers();
    let store = store_with_worker(&servers).await;
    let gpus_before = store.gpus().await.unwrap();
    let outbox_before = store.outbox_len().await.unwrap();
    store.warm().await.unwrap();
    assert!(store.instances().await.unwrap().is_empty());
    assert!(store.allocations().await.unwrap().is_empty());
    assert_eq!(store.outbox_len().await.unwrap(), outbox_before);
    let gpus_after = store.gpus().await.unwrap();
    assert_eq!(
        gpus_after
            .iter()
            .map(|g| g.reserved_bytes)
            .collect::<Vec<_>>(),
        gpus_before
            .iter()
            .map(|g| g.reserved_bytes)
            .collect::<Vec<_>>()
    );
    // The warmed connections work as before.
    store
        .apply_start("x", CmdSeq::new(1), spec())
        .await
        .unwrap();
    assert!(matches!(
        store
            .commit_placement("x", Version::new(1), "w1", &[0], 10 * GIB)
            .await
            .unwrap(),
        CommitOutcome::Committed(_)
    ));
}

/// A running server's endpoint is stored and published with `running`, a restart takes the
/// instance back to `starting` with the count in its event, reports from before the restart
/// change nothing, and the endpoint goes when the instance stops running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_and_restarts_follow_the_server() {
    let servers = servers();
    let store = store_with_worker(&servers).await;
    let StartApplied::Analyzing { transition, .. } = store
        .apply_start("x", CmdSeq::new(1), spec())
        .await
        .unwrap()
    else {
        panic!("start applies");
    };
    let v = transition.version;
    store
        .commit_placement("x", v, "w1", &[0], 10 * GIB)
        .await
        .unwrap();
    let report = |state, endpoint: Option<&str>, restarts| Forward {
        worker_id: "w1".into(),
        instance_id: "x".into(),
        version: v,
        state,
        endpoint: endpoint.map(str::to_owned),
        restarts,
        reason: (restarts > 0 && state == ReportedState::Starting).then(|| "exit 1".to_owned()),
    };
    let row = || async { store.instance("x").await.unwrap().unwrap() };
    let apply = |f: Forward| {
        let store = store.clone();
        async move { store.forward_reports(&[f]).await.unwrap().pop().flatten() }
    };

    assert!(
        apply(report(ReportedState::Starting, None, 0))
            .await
            .is_some()
    );
    assert!(
        apply(report(ReportedState::Running, Some("10.0.0.5:40001"), 0))
            .await
            .is_some()
    );
    let r = row().await;
    assert_eq!(
        (r.state.as_str(), r.endpoint.as_deref(), r.restarts),
        ("running", Some("10.0.0.5:40001"), 0)
    );
    // The server crashed and was restarted: back to starting, no endpoint.
    assert!(
        apply(report(ReportedState::Starting, None, 1))
            .await
            .is_some()
    );
    let r = row().await;
    assert_eq!(
        (r.state.as_str(), r.endpoint.as_deref(), r.restarts),
        ("starting", None, 1)
    );
    assert_eq!(r.reason.as_deref(), Some("exit 1"), "why it restarted");
    // A running report sent before the restart arrives late: nothing changes.
    assert!(
        apply(report(ReportedState::Running, Some("10.0.0.5:40001"), 0))
            .await
            .is_none()
    );
    assert!(
        apply(report(ReportedState::Starting, None, 1))
            .await
            .is_none()
    );
    assert!(
        apply(report(ReportedState::Running, Some("10.0.0.5:40002"), 1))
            .await
            .is_some()
    );
    assert_eq!(row().await.endpoint.as_deref(), Some("10.0.0.5:40002"));
    // Stopping: the endpoint goes at once, whatever statement moved the instance.
    store.apply_stop("x", CmdSeq::new(2), None).await.unwrap();
    let r = row().await;
    assert_eq!((r.state.as_str(), r.endpoint), ("stopping", None));

    // The events say the same.
    let mut events: Vec<InstanceEvent> = Vec::new();
    store
        .relay_events(100, |batch| {
            events.extend(batch.into_iter().map(|e| e.event));
            async { Ok::<(), std::convert::Infallible>(()) }
        })
        .await
        .unwrap();
    let seen: Vec<(InstanceState, Option<&str>, u32)> = events
        .iter()
        .filter(|e| e.version == v || e.state == InstanceState::Stopping)
        .map(|e| (e.state, e.endpoint.as_deref(), e.restarts))
        .collect();
    assert_eq!(
        seen,
        [
            (InstanceState::Analyzing, None, 0),
            (InstanceState::Scheduled, None, 0),
            (InstanceState::Starting, None, 0),
            (InstanceState::Running, Some("10.0.0.5:40001"), 0),
            (InstanceState::Starting, None, 1),
            (InstanceState::Running, Some("10.0.0.5:40002"), 1),
            (InstanceState::Stopping, None, 0),
        ]
    );
    assert!(
        store
            .apply_report(&Report::new("w1", "x", v, ReportedState::Running))
            .await
            .unwrap()
            .is_empty()
    );
}

/// A GPU UUID belongs to one worker. A second worker may take it over only from a worker
/// that stopped answering and reserves nothing on it (the GPU moved, or the worker was
/// renamed); while its first worker answers, the claim is refused and nothing is recorded;
/// and the database's unique index holds even against a write that skips the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_uuid_belongs_to_one_worker() {
    let servers = servers();
    berth_store::migrate(&servers.pg.url()).await.unwrap();
    let store = Store::connect(&servers.pg.url(), 2).unwrap();
    let gpu = |uuid: &str| GpuInfo {
        index: 0,
        name: "H100".into(),
        uuid: uuid.into(),
        total_bytes: 80 * GIB,
        system_reserved_bytes: 0,
    };
    let none = BTreeMap::new();
    store
        .register_worker("old", &none, &[gpu("GPU-a")])
        .await
        .unwrap();
    let refused = store.register_worker("new", &none, &[gpu("GPU-a")]).await;
    assert!(
        matches!(&refused, Err(berth_store::StoreError::Invalid(why)) if why.contains("worker old")),
        "{refused:?}"
    );
    let owners = |gpus: Vec<berth_store::GpuRow>| -> Vec<(String, String)> {
        gpus.into_iter().map(|g| (g.worker_id, g.uuid)).collect()
    };
    assert_eq!(
        owners(store.gpus().await.unwrap()),
        [("old".to_owned(), "GPU-a".to_owned())]
    );

    // `old` goes silent: its idle GPU changes hands.
    assert_eq!(
        store.mark_unreachable(Duration::ZERO).await.unwrap(),
        ["old"]
    );
    let taken = store
        .register_worker("new", &none, &[gpu("GPU-a")])
        .await
        .unwrap();
    assert_eq!(taken.taken_over, ["GPU-a from worker old"]);
    assert_eq!(
        owners(store.gpus().await.unwrap()),
        [("new".to_owned(), "GPU-a".to_owned())]
    );

    let mut conn = diesel_async::AsyncPgConnection::establish(&servers.pg.url())
        .await
        .unwrap();
    let raw = diesel::sql_query(
        "INSERT INTO gpus (worker_id, idx, name, uuid, total_bytes) \
         VALUES ('old', 0, 'H100', 'GPU-a', 1)",
    )
    .execute(&mut conn)
    .await;
    assert!(
        matches!(
            &raw,
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _
            ))
        ),
        "{raw:?}"
    );
}
