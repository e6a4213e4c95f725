//! The placement search end to end: tensor-parallel sizes tried in order, a model spread over
//! two workers (llama.cpp; never vLLM), partial offload, vLLM's share of each GPU, explicit
//! GPU ids, replicas kept apart under spread, and memory used outside berth (live, from
//! heartbeats).

use berth_fit::Shape;
use berth_models::{
    EstimateOptions, LlamaCppOptions, ModelRef, Scaling, VllmOptions, estimate, profile_from_path,
    shapes,
};
use berth_proto::{Command, GpuUsage, InstanceState, StartSpec, StatusMsg};
use berth_store::AllocationRow;
use berth_tests::{Fleet, GIB, wait_until, worker, write_llama_8b_config};
use std::{path::Path, time::Duration};

const LIMIT: Duration = Duration::from_secs(30);

/// vLLM reserving only its estimate (no utilization share), 4k context.
fn vllm_exact() -> EstimateOptions {
    EstimateOptions::Vllm(VllmOptions {
        max_model_len: Some(4096),
        gpu_memory_utilization: None,
        ..VllmOptions::default()
    })
}

fn spec_for(dir: &Path, backend: EstimateOptions, scaling: Option<Scaling>) -> StartSpec {
    StartSpec {
        model: "llama-8b".into(),
        model_ref: Some(Box::new(ModelRef::Path(dir.to_path_buf()))),
        backend: Some(Box::new(backend)),
        scaling,
        ..StartSpec::default()
    }
}

/// A model directory and a vLLM start for it with `scaling`, and the shapes the analyzer
/// will try for it.
fn vllm_search(scaling: Scaling) -> (tempfile::TempDir, StartSpec, Vec<Shape>) {
    search(vllm_exact(), scaling)
}

/// The same with llama.cpp, the one backend that runs over several workers.
fn llama_search(scaling: Scaling) -> (tempfile::TempDir, StartSpec, Vec<Shape>) {
    let llama = EstimateOptions::LlamaCpp(LlamaCppOptions {
        context: Some(4096),
        ..LlamaCppOptions::default()
    });
    search(llama, scaling)
}

fn search(
    backend: EstimateOptions,
    scaling: Scaling,
) -> (tempfile::TempDir, StartSpec, Vec<Shape>) {
    let dir = tempfile::tempdir().expect("tempdir");
    write_llama_8b_config(dir.path());
    let spec = spec_for(dir.path(), backend, Some(scaling));
    let all = shapes_of(dir.path(), &spec);
    (dir, spec, all)
}

/// The llama.cpp shape over two workers, one GPU each.
const OVER_TWO: &str = "split over 2 workers × 1 GPUs";

/// One GPU per worker, up to two workers.
const ONE_GPU_TWO_WORKERS: Scaling = Scaling {
    max_gpus: Some(1),
    max_workers: Some(2),
    partial_offload: false,
};

/// The shapes the analyzer will try for `spec`, by the same library.
fn shapes_of(dir: &Path, spec: &StartSpec) -> Vec<Shape> {
    let profile = profile_from_path(dir).expect("profile");
    shapes(
        &profile,
        spec.backend.as_deref().expect("backend"),
        &spec.scaling.clone().unwrap_or_default(),
    )
    .expect("shapes")
}

fn shape<'a>(all: &'a [Shape], label: &str) -> &'a Shape {
    all.iter()
        .find(|s| s.label == label)
        .unwrap_or_else(|| panic!("no shape {label} in {all:?}"))
}

async fn allocations_of(fleet: &Fleet, id: &str) -> Vec<AllocationRow> {
    let mut a: Vec<_> = fleet
        .store
        .allocations()
        .await
        .expect("allocations")
        .into_iter()
        .filter(|a| a.instance_id == id)
        .collect();
    a.sort_by(|x, y| (&x.worker_id, x.gpu_idx).cmp(&(&y.worker_id, y.gpu_idx)));
    a
}

async fn start(fleet: &Fleet, id: &str, spec: StartSpec) {
    fleet
        .bus
        .publish_command(id, &Command::Start(spec))
        .await
        .expect("publish start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_parallel_search_takes_the_fewest_gpus_that_fit() {
    let (_dir, spec, all) = vllm_search(Scaling {
        max_gpus: Some(4),
        ..Scaling::default()
    });
    let (tp1, tp2) = (shape(&all, "tp=1"), shape(&all, "tp=2"));
    // GPUs too small for tp=1, big enough for tp=2.
    let card = (tp1.vram_per_gpu + tp2.vram_per_gpu) / 2;
    let card_gib = i64::try_from(card.div_ceil(GIB.unsigned_abs())).expect("size");
    assert!(card_gib * GIB < i64::try_from(tp1.vram_per_gpu).expect("size"));

    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 4, card_gib, &[])).await;
    start(&fleet, "llama", spec.clone()).await;
    fleet
        .wait_state("llama", InstanceState::Running, LIMIT)
        .await;
    let allocs = allocations_of(&fleet, "llama").await;
    assert_eq!(allocs.len(), 2, "tp=2 uses two GPUs: {allocs:?}");
    for a in &allocs {
        assert_eq!(a.bytes.unsigned_abs(), tp2.vram_per_gpu);
    }

    // Pinned to one free GPU, which holds neither tp=1 (too small) nor tp=2 (one GPU):
    // the reason names what each shape needed there.
    let free = (0..4)
        .find(|i| allocs.iter().all(|a| a.gpu_idx != *i))
        .expect("a free GPU");
    let pinned = StartSpec {
        gpu_ids: vec![format!("w1:{free}")],
        ..spec
    };
    start(&fleet, "pinned", pinned).await;
    let row = fleet
        .wait_state("pinned", InstanceState::Pending, LIMIT)
        .await;
    let reason = row.reason.expect("reason");
    assert!(reason.contains("tp=1 needs"), "{reason}");
    assert!(reason.contains("tp=2 needs 2 × "), "{reason}");
    assert!(reason.contains("(only GPUs w1:"), "{reason}");
    fleet.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_too_big_for_any_worker_runs_across_two() {
    let (_dir, spec, all) = llama_search(ONE_GPU_TWO_WORKERS);
    let (one, two) = (shape(&all, "1 GPU"), shape(&all, OVER_TWO));
    let spec = &spec;
    assert_eq!((two.workers, two.gpus_per_worker), (2, 1));
    let card_gib = i64::try_from(two.vram_per_gpu.div_ceil(GIB.unsigned_abs())).expect("size");
    assert!(card_gib * GIB < i64::try_from(one.vram_per_gpu).expect("size"));

    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, card_gib, &[])).await;
    fleet.add_agent(worker("w2", 1, card_gib, &[])).await;
    start(&fleet, "big", spec.clone()).await;
    // Running only once both stages reported running.
    let row = fleet.wait_state("big", InstanceState::Running, LIMIT).await;
    let allocs = allocations_of(&fleet, "big").await;
    let workers: Vec<_> = allocs.iter().map(|a| a.worker_id.as_str()).collect();
    assert_eq!(workers, ["w1", "w2"], "{allocs:?}");
    assert!(allocs.iter().all(|a| a.version == row.version));
    assert!(
        [Some("w1"), Some("w2")].contains(&row.worker_id.as_deref()),
        "{row:?}"
    );
    fleet.assert_books_balanced().await;

    // A stop reaches both agents and frees both GPUs.
    fleet.stop_instance("big").await;
    fleet.wait_state("big", InstanceState::Stopped, LIMIT).await;
    assert!(allocations_of(&fleet, "big").await.is_empty());
    fleet.assert_books_balanced().await;

    // Started again, then one stage fails: the instance is in error and the other stage is
    // stopped and gives its GPU back.
    start(&fleet, "big", spec.clone()).await;
    let row = fleet.wait_state("big", InstanceState::Running, LIMIT).await;
    let failed = StatusMsg::Instance {
        worker_id: "w2".into(),
        instance_id: "big".into(),
        version: row.version,
        state: berth_proto::status::ReportedState::Error,
        reason: Some("CUDA out of memory".into()),
        shared: true,
        endpoint: None,
        restarts: 0,
    };
    fleet
        .bus
        .publish_status("w2", &failed)
        .await
        .expect("report");
    let row = fleet.wait_state("big", InstanceState::Error, LIMIT).await;
    assert_eq!(row.reason.as_deref(), Some("CUDA out of memory"));
    let store = fleet.store.clone();
    wait_until("the surviving stage to give its GPU back", LIMIT, || {
        let store = store.clone();
        async move {
            let allocs = store.allocations().await.ok()?;
            allocs.iter().all(|a| a.instance_id != "big").then_some(())
        }
    })
    .await;
    fleet.assert_books_balanced().await;
}

/// vLLM cannot run over several workers: a start that would fit only as two stages stays
/// pending and says why, and none of its shapes spans workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_is_never_spread_over_workers_and_the_reason_says_so() {
    let (_dir, spec, all) = vllm_search(ONE_GPU_TWO_WORKERS);
    assert!(all.iter().all(|s| s.workers == 1), "{all:?}");
    let one = shape(&all, "tp=1");
    // Half the model's need per card: two stages would fit, one worker cannot.
    let card_gib =
        i64::try_from((one.vram_per_gpu / 2).div_ceil(GIB.unsigned_abs()) + 1).expect("size");
    assert!(card_gib * GIB < i64::try_from(one.vram_per_gpu).expect("size"));

    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, card_gib, &[])).await;
    fleet.add_agent(worker("w2", 1, card_gib, &[])).await;
    start(&fleet, "big", spec).await;
    let row = fleet.wait_state("big", InstanceState::Pending, LIMIT).await;
    let reason = row.reason.unwrap_or_default();
    assert!(
        reason.contains("vLLM cannot run over several workers"),
        "{reason}"
    );
    assert!(allocations_of(&fleet, "big").await.is_empty());
    fleet.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_offload_only_when_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_llama_8b_config(dir.path());
    let llama = EstimateOptions::LlamaCpp(LlamaCppOptions {
        context: Some(4096),
        ..LlamaCppOptions::default()
    });
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 8, &[])).await;

    // Full offload of ~16 GB does not fit an 8 GiB card: pending.
    start(&fleet, "full", spec_for(dir.path(), llama.clone(), None)).await;
    fleet
        .wait_state("full", InstanceState::Pending, LIMIT)
        .await;

    let spec = spec_for(
        dir.path(),
        llama,
        Some(Scaling {
            partial_offload: true,
            ..Scaling::default()
        }),
    );
    let all = shapes_of(dir.path(), &spec);
    let expected = all
        .iter()
        .find(|s| s.vram_per_gpu <= (8 * GIB).unsigned_abs())
        .expect("some partial offload fits 8 GiB");
    assert!(expected.label.contains("layers on GPU"), "{expected:?}");
    start(&fleet, "partial", spec).await;
    fleet
        .wait_state("partial", InstanceState::Running, LIMIT)
        .await;
    let allocs = allocations_of(&fleet, "partial").await;
    assert_eq!(allocs.len(), 1);
    assert_eq!(allocs[0].bytes.unsigned_abs(), expected.vram_per_gpu);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_reserves_its_share_of_each_gpu() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_llama_8b_config(dir.path());
    let backend = EstimateOptions::Vllm(VllmOptions {
        max_model_len: Some(4096),
        gpu_memory_utilization: Some(0.85),
        ..VllmOptions::default()
    });
    let profile = profile_from_path(dir.path()).expect("profile");
    let e = estimate(&profile, &backend).expect("estimate");

    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 40, &[])).await;
    start(&fleet, "share", spec_for(dir.path(), backend, None)).await;
    fleet
        .wait_state("share", InstanceState::Running, LIMIT)
        .await;
    let allocs = allocations_of(&fleet, "share").await;
    assert_eq!(allocs.len(), 1);
    let claimed = e.claim_on((40 * GIB).unsigned_abs());
    assert_eq!(allocs[0].bytes.unsigned_abs(), claimed);
    // The share, not the estimate: 85 % of 40 GiB is well above a ~17 GiB need.
    assert!(claimed > e.max_per_gpu() + 10 * GIB.unsigned_abs(), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_gpu_ids_by_index_or_uuid() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 2, 80, &[])).await;
    fleet.add_agent(worker("w2", 2, 80, &[])).await;
    for (id, gpu, want) in [
        ("by-index", "w2:1", ("w2", 1)),
        ("by-uuid", "GPU-w1-1", ("w1", 1)),
    ] {
        start(
            &fleet,
            id,
            StartSpec {
                gpu_ids: vec![gpu.into()],
                ..StartSpec::claim(10 * GIB, 1)
            },
        )
        .await;
        fleet.wait_state(id, InstanceState::Running, LIMIT).await;
        let allocs = allocations_of(&fleet, id).await;
        assert_eq!(allocs.len(), 1);
        assert_eq!((allocs[0].worker_id.as_str(), allocs[0].gpu_idx), want);
    }
    // A GPU that does not exist: pending, and the reason says which GPUs were allowed.
    start(
        &fleet,
        "nowhere",
        StartSpec {
            gpu_ids: vec!["w9:0".into()],
            ..StartSpec::claim(10 * GIB, 1)
        },
    )
    .await;
    let row = fleet
        .wait_state("nowhere", InstanceState::Pending, LIMIT)
        .await;
    let reason = row.reason.expect("reason");
    assert!(reason.contains("only GPUs w9:0"), "{reason}");
    assert!(reason.contains("w1: no usable GPUs"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spread_keeps_replicas_of_a_model_apart() {
    let mut fleet = Fleet::start().await;
    let mut config = fleet.analyzer_config("spread");
    config.policy = berth_fit::Policy::Spread;
    fleet.add_analyzer_with(config, Default::default()).await;
    fleet.add_agent(worker("big", 4, 80, &[])).await;
    fleet.add_agent(worker("small", 1, 40, &[])).await;
    let replica = |group: &str| StartSpec {
        model: group.into(),
        ..StartSpec::claim(10 * GIB, 1)
    };
    let worker_of = |fleet: &Fleet, id: &'static str| {
        let store = fleet.store.clone();
        async move {
            store
                .instance(id)
                .await
                .expect("instance")
                .and_then(|r| r.worker_id)
                .expect("placed")
        }
    };
    start(&fleet, "llama-1", replica("llama")).await;
    fleet
        .wait_state("llama-1", InstanceState::Running, LIMIT)
        .await;
    assert_eq!(worker_of(&fleet, "llama-1").await, "big");
    // "big" is still the emptiest, but already holds a llama.
    start(&fleet, "llama-2", replica("llama")).await;
    fleet
        .wait_state("llama-2", InstanceState::Running, LIMIT)
        .await;
    assert_eq!(worker_of(&fleet, "llama-2").await, "small");
    // Another model is not held back by llama's replicas.
    start(&fleet, "qwen-1", replica("qwen")).await;
    fleet
        .wait_state("qwen-1", InstanceState::Running, LIMIT)
        .await;
    assert_eq!(worker_of(&fleet, "qwen-1").await, "big");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_used_outside_berth_is_left_alone_and_its_release_wakes_pending() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 40, &[])).await;
    let report_usage = |bytes: i64| StatusMsg::Heartbeat {
        worker_id: "w1".into(),
        usage: vec![GpuUsage {
            index: 0,
            used_outside_bytes: bytes,
        }],
    };
    let outside_is = |fleet: &Fleet, bytes: i64| {
        let store = fleet.store.clone();
        async move {
            wait_until(
                &format!("GPU w1:0 to show {bytes} bytes used outside berth"),
                LIMIT,
                || {
                    let store = store.clone();
                    async move {
                        let gpus = store.gpus().await.ok()?;
                        gpus.iter()
                            .any(|g| g.worker_id == "w1" && g.used_outside_bytes == bytes)
                            .then_some(())
                    }
                },
            )
            .await;
        }
    };
    // Another tenant takes 30 of the 40 GiB (as NVML would show it).
    fleet
        .bus
        .publish_status("w1", &report_usage(30 * GIB))
        .await
        .expect("heartbeat");
    outside_is(&fleet, 30 * GIB).await;
    fleet.start_instance("tight", 20 * GIB, 1).await;
    let row = fleet
        .wait_state("tight", InstanceState::Pending, LIMIT)
        .await;
    assert!(
        row.reason
            .as_deref()
            .is_some_and(|r| r.contains("largest free 10.0 GiB")),
        "{row:?}"
    );
    // The tenant leaves: the next heartbeat shows the room and the instance is placed
    // without any new command.
    fleet
        .bus
        .publish_status("w1", &report_usage(0))
        .await
        .expect("heartbeat");
    fleet
        .wait_state("tight", InstanceState::Running, LIMIT)
        .await;
    fleet.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stage_worker_moves_the_whole_instance() {
    let (_dir, spec, all) = llama_search(ONE_GPU_TWO_WORKERS);
    let two = shape(&all, OVER_TWO);
    let card_gib = i64::try_from(two.vram_per_gpu.div_ceil(GIB.unsigned_abs())).expect("size");

    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, card_gib, &[])).await;
    fleet.add_agent(worker("w2", 1, card_gib, &[])).await;
    start(&fleet, "big", spec).await;
    let first = fleet.wait_state("big", InstanceState::Running, LIMIT).await;
    // A third worker appears, then the second stage's worker goes silent.
    fleet.add_agent(worker("w3", 1, card_gib, &[])).await;
    let silent = fleet.agents.remove(1);
    silent.abort();
    let store = fleet.store.clone();
    let moved = wait_until("big to run again on w1 and w3", LIMIT, || {
        let store = store.clone();
        async move {
            let row = store.instance("big").await.ok()??;
            let allocs = store.allocations().await.ok()?;
            let mut on: Vec<_> = allocs
                .iter()
                .filter(|a| a.instance_id == "big")
                .map(|a| (a.worker_id.clone(), a.version))
                .collect();
            on.sort();
            let placed = on == [("w1".into(), row.version), ("w3".into(), row.version)];
            (row.state == "running" && placed).then_some(row)
        }
    })
    .await;
    assert!(moved.version > first.version);
    let w2 = fleet
        .store
        .gpus()
        .await
        .expect("gpus")
        .into_iter()
        .find(|g| g.worker_id == "w2")
        .expect("w2's GPU");
    assert_eq!(
        w2.reserved_bytes, 0,
        "the silent worker's share is released"
    );
    fleet.assert_books_balanced().await;
}
