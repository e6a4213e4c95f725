//! Three analyzers race to place 200 instances on 32 GPUs: no GPU is ever overcommitted,
//! every instance ends running or pending with a reason, and "pending" is honest (it really
//! does not fit in what is left).

use berth_fit::{FitError, Gpu, Policy, Request, Worker, place};
use berth_proto::InstanceState;
use berth_tests::{Fleet, GIB, worker};
use futures::future::join_all;
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

const INSTANCES: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_analyzers_never_overcommit() {
    let mut fleet = Fleet::start().await;
    let mut stats = Vec::new();
    for _ in 0..3 {
        stats.push(fleet.add_analyzer(Default::default()).await);
    }
    for w in 0..8 {
        fleet.add_agent(worker(&format!("w{w}"), 4, 80, &[])).await;
    }

    // Watch the books during the whole run, not only at the end.
    let done = Arc::new(AtomicBool::new(false));
    let samples = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (store, done, samples) = (fleet.store.clone(), done.clone(), samples.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                let v = store.gpu_violations().await.expect("gpu check");
                assert!(v.is_empty(), "overcommit observed: {v:?}");
                samples.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let began = Instant::now();
    join_all((0..INSTANCES).map(|i| {
        let fleet = &fleet;
        async move {
            let vram = [4, 8, 12, 16][i % 4] * GIB;
            let gpus = [1, 1, 2, 4][(i / 4) % 4];
            fleet.start_instance(&format!("i{i:03}"), vram, gpus).await
        }
    }))
    .await;
    let store = fleet.store.clone();
    let rows = berth_tests::wait_until("all 200 settled", Duration::from_secs(120), || {
        let store = store.clone();
        async move {
            let rows = store.instances().await.ok()?;
            let settled = rows.len() == INSTANCES
                && rows
                    .iter()
                    .all(|r| r.state == "running" || r.state == "pending");
            settled.then_some(rows)
        }
    })
    .await;
    let elapsed = began.elapsed();
    done.store(true, Ordering::SeqCst);
    watcher.await.expect("watcher saw no overcommit");
    fleet.assert_books_balanced().await;

    let pending: Vec<_> = rows
        .iter()
        .filter(|r| r.state == InstanceState::Pending.as_str())
        .collect();
    for r in &pending {
        assert!(
            r.reason.as_deref().is_some_and(|s| !s.is_empty()),
            "{} pending without reason",
            r.id
        );
    }
    // Capacity only shrank during the run, so what was refused must not fit now either.
    let free: Vec<Worker> = fleet
        .store
        .capacity()
        .await
        .unwrap()
        .into_iter()
        .map(|(w, gpus)| Worker {
            id: w.id,
            labels: BTreeMap::new(),
            schedulable: true,
            gpus: gpus
                .iter()
                .map(|g| Gpu {
                    index: g.idx.unsigned_abs(),
                    name: g.name.clone(),
                    uuid: g.uuid.clone(),
                    total_bytes: g.total_bytes.unsigned_abs(),
                    free_bytes: g.free_bytes().unsigned_abs(),
                })
                .collect(),
            replicas: Default::default(),
        })
        .collect();
    for r in &pending {
        let spec = r.start_spec().unwrap();
        let req = Request::simple(
            spec.vram_per_gpu(),
            u32::try_from(spec.gpu_count()).unwrap(),
        );
        assert!(
            matches!(
                place(&free, &req, Policy::Binpack, &|| false),
                Err(FitError::NoFit(_))
            ),
            "{} is pending but fits in what is left",
            r.id
        );
    }
    let placed = rows.len() - pending.len();
    let sum = |f: fn(&berth_analyzer::Stats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    println!(
        "concurrency: {placed} placed, {} pending in {elapsed:?} ({:.0} placements/s, {:.0} decisions/s); capacity conflicts {}, refits {}, CAS conflicts {}; {} overcommit samples",
        pending.len(),
        placed as f64 / elapsed.as_secs_f64(),
        rows.len() as f64 / elapsed.as_secs_f64(),
        sum(|s| s.capacity_conflicts.get()),
        sum(|s| s.refits.get()),
        sum(|s| s.cas_conflicts.get()),
        samples.load(Ordering::SeqCst),
    );
    assert!(placed > 0);
}
