//! The analyzer's capacity view kept up to date by reading only the rows written since its
//! previous read (`Store::capacity_since`): after every kind of change it must equal a view
//! loaded from scratch, and a read must return the changed rows, not the whole cluster.

use berth_analyzer::Snapshot;
use berth_fit::{Lane, Policy, Request, Worker};
use berth_proto::{CmdSeq, GpuInfo, Version, status::GpuUsage, status::ReportedState};
use berth_store::Store;
use berth_store::reports::Report;
use berth_tests::GIB;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use std::collections::BTreeMap;

fn gpu(index: u32) -> GpuInfo {
    GpuInfo {
        index,
        name: "H100".into(),
        // Each worker's GPUs are its own: UUIDs are unique across workers.
        uuid: String::new(),
        total_bytes: 80 * GIB,
        system_reserved_bytes: GIB,
    }
}

fn spec() -> serde_json::Value {
    serde_json::json!({"model": "m", "vram_bytes": 10 * GIB, "gpus": 1, "selector": {}})
}

async fn setup(servers: &berth_harness::TestServers) -> Store {
    berth_store::migrate(&servers.pg.url())
        .await
        .expect("migrate");
    let store = Store::connect(&servers.pg.url(), 4).expect("connect");
    for (id, gpus) in [("w1", 1), ("w2", 2)] {
        store
            .register_worker(
                id,
                &BTreeMap::new(),
                &(0..gpus).map(gpu).collect::<Vec<_>>(),
            )
            .await
            .expect("register");
    }
    store
}

/// The view's workers, ordered by id (a view kept by changes appends new workers).
fn sorted(view: &Snapshot) -> Vec<Worker> {
    let mut workers = view.workers();
    workers.sort_by(|a, b| a.id.cmp(&b.id));
    workers
}

/// Brings `view` up to date by changes and checks it against a view loaded from scratch.
async fn assert_same_as_fresh(view: &Snapshot, store: &Store, after: &str) {
    view.refresh(store).await.expect("refresh");
    let fresh = Snapshot::new(false);
    fresh.refresh(store).await.expect("full load");
    let (mut kept, mut full) = (sorted(view), sorted(&fresh));
    // Replica counts are kept apart from VRAM (reloaded in full now and then).
    for w in kept.iter_mut().chain(full.iter_mut()) {
        w.replicas = Default::default();
    }
    assert_eq!(kept, full, "view kept by changes differs after {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_kept_by_changes_matches_a_fresh_load_after_each_kind_of_change() {
    let servers = berth_harness::TestServers::start().expect("servers");
    let store = setup(&servers).await;
    let view = Snapshot::new(false);
    view.refresh(&store).await.expect("first load");
    assert_eq!(sorted(&view).len(), 2);

    store
        .apply_start("x", CmdSeq::new(1), spec())
        .await
        .unwrap();
    store
        .commit_placement("x", Version::new(1), "w2", &[1], 10 * GIB)
        .await
        .unwrap();
    assert_same_as_fresh(&view, &store, "a commit").await;
    let free = |view: &Snapshot| {
        sorted(view)[1]
            .gpus
            .iter()
            .map(|g| g.free_bytes)
            .collect::<Vec<_>>()
    };
    assert_eq!(free(&view), [79 * GIB as u64, 69 * GIB as u64]);

    let usage = [GpuUsage {
        index: 0,
        used_outside_bytes: 5 * GIB,
    }];
    store.heartbeat("w2", &usage).await.unwrap();
    assert_same_as_fresh(&view, &store, "memory used outside berth").await;
    assert_eq!(free(&view), [74 * GIB as u64, 69 * GIB as u64]);

    store.apply_stop("x", CmdSeq::new(2), None).await.unwrap();
    let instance = store.instance("x").await.unwrap().unwrap();
    store
        .apply_report(&Report::new(
            "w2",
            "x",
            instance.version,
            ReportedState::Stopped,
        ))
        .await
        .unwrap();
    assert_same_as_fresh(&view, &store, "a release").await;

    let labels = BTreeMap::from([("zone".to_owned(), "b".to_owned())]);
    store
        .register_worker("w3", &labels, &[gpu(0), gpu(1), gpu(2)])
        .await
        .unwrap();
    assert_same_as_fresh(&view, &store, "a new worker").await;
    assert_eq!(sorted(&view)[2].labels, labels);

    // w2 comes back with one GPU fewer: the row is deleted, which only a full reload shows.
    store
        .register_worker("w2", &labels, &[gpu(0)])
        .await
        .unwrap();
    assert_same_as_fresh(&view, &store, "a GPU removed").await;
    assert_eq!(sorted(&view)[1].gpus.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_returns_only_what_changed_including_what_was_in_flight() {
    let servers = berth_harness::TestServers::start().expect("servers");
    let store = setup(&servers).await;
    let first = store.capacity_since(None).await.unwrap();
    assert_eq!((first.workers.len(), first.gpus.len()), (2, 3));
    assert_eq!((first.worker_count, first.gpu_count), (2, 3));

    let nothing = store.capacity_since(Some(&first.snapshot)).await.unwrap();
    assert!(nothing.workers.is_empty() && nothing.gpus.is_empty());

    store
        .apply_start("x", CmdSeq::new(1), spec())
        .await
        .unwrap();
    store
        .commit_placement("x", Version::new(1), "w2", &[1], 10 * GIB)
        .await
        .unwrap();
    let after_commit = store.capacity_since(Some(&first.snapshot)).await.unwrap();
    assert!(after_commit.workers.is_empty());
    let changed: Vec<(String, i32)> = after_commit
        .gpus
        .iter()
        .map(|g| (g.worker_id.clone(), g.idx))
        .collect();
    assert_eq!(changed, [("w2".to_owned(), 1)]);

    // A change in flight during a read is not visible to it, and the next read returns it
    // once committed, although its transaction began before that read.
    let mut open = AsyncPgConnection::establish(&servers.pg.url())
        .await
        .unwrap();
    diesel::sql_query("BEGIN").execute(&mut open).await.unwrap();
    diesel::sql_query("UPDATE gpus SET used_outside_bytes = 7 WHERE worker_id = 'w1'")
        .execute(&mut open)
        .await
        .unwrap();
    let during = store
        .capacity_since(Some(&after_commit.snapshot))
        .await
        .unwrap();
    assert!(during.gpus.is_empty(), "{:?}", during.gpus);
    diesel::sql_query("COMMIT")
        .execute(&mut open)
        .await
        .unwrap();
    let after = store.capacity_since(Some(&during.snapshot)).await.unwrap();
    assert_eq!(after.gpus.len(), 1);
    assert_eq!(
        (
            after.gpus[0].worker_id.as_str(),
            after.gpus[0].used_outside_bytes
        ),
        ("w1", 7)
    );

    // A view holding GPUs for a fit in flight keeps them deducted when those GPUs are read
    // again.
    let view = Snapshot::new(false);
    view.refresh(&store).await.unwrap();
    let request = Request::simple(70 * GIB as u64, 1);
    let (placement, _hold) = view
        .fit(&request, Policy::Binpack, "y", Lane::ALL, &|| false)
        .expect("fits");
    let part = &placement.parts[0];
    let held = (part.worker_id.clone(), part.gpus[0].index);
    diesel::sql_query(format!(
        "UPDATE gpus SET used_outside_bytes = 0 WHERE worker_id = '{}' AND idx = {}",
        held.0, held.1
    ))
    .execute(&mut open)
    .await
    .unwrap();
    view.refresh(&store).await.unwrap();
    let free = sorted(&view)
        .iter()
        .find(|w| w.id == held.0)
        .and_then(|w| w.gpus.iter().find(|g| g.index == held.1))
        .map(|g| g.free_bytes)
        .unwrap();
    let db_free = store
        .gpus()
        .await
        .unwrap()
        .iter()
        .find(|g| g.worker_id == held.0 && g.idx == i32::try_from(held.1).unwrap())
        .map(|g| g.free_bytes())
        .unwrap();
    assert_eq!(free, u64::try_from(db_free).unwrap() - 70 * GIB as u64);
}
