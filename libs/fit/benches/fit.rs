//! Placement against synthetic clusters.
//!
//! `cargo bench -p berth-fit` (add `-- --quick` for a short run). Profiling and estimating a
//! real model file is benchmarked in `berth-models` (`libs/models/benches/models.rs`).

use berth_fit::{Claim, Gpu, Policy, Request, Shape, Worker, place};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::collections::BTreeMap;
use std::hint::black_box;

const GIB: u64 = 1 << 30;
const GPUS_PER_WORKER: usize = 8;

/// A deterministic cluster of `n_gpus` GPUs on 8-GPU workers: three zones, three GPU models,
/// free memory spread between 0 and the card's size, one worker in twenty draining.
fn cluster(n_gpus: usize) -> Vec<Worker> {
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let models = [("H100", 80u64), ("A100", 40), ("L40S", 48)];
    let zones = ["a", "b", "c"];
    (0..n_gpus.div_ceil(GPUS_PER_WORKER))
        .map(|w| {
            let (name, size) = models[w % models.len()];
            let gpus = (0..GPUS_PER_WORKER.min(n_gpus - w * GPUS_PER_WORKER))
                .map(|i| Gpu {
                    index: i as u32,
                    name: name.into(),
                    uuid: format!("GPU-{w}-{i}"),
                    total_bytes: size * GIB,
                    free_bytes: next() % (size * GIB + 1),
                })
                .collect();
            Worker {
                id: format!("w{w:05}"),
                labels: BTreeMap::from([
                    ("zone".into(), zones[w % zones.len()].into()),
                    ("gpu".into(), name.to_lowercase()),
                ]),
                schedulable: next() % 20 != 0,
                gpus,
                replicas: [(format!("m{}", w % 7), 1)].into_iter().collect(),
            }
        })
        .collect()
}

fn placement(c: &mut Criterion) {
    let mut g = c.benchmark_group("place");
    for n in [100usize, 1_000, 10_000] {
        let workers = cluster(n);
        let fits = Request {
            selector: BTreeMap::from([("zone".into(), "a".into())]),
            group: Some("m3".into()),
            ..Request::simple(30 * GIB, 2)
        };
        // Asks for more than any worker has: every worker is scored and the reason is built.
        let no_fit = Request::simple(79 * GIB, 8);
        // A tensor-parallel search whose first three shapes fit nowhere, then a claiming
        // (vLLM-style) shape on H100s: four passes over the cluster.
        let search = Request {
            gpu_name: Some("H100".into()),
            shapes: [(90, 1), (85, 2), (81, 4), (30, 2)]
                .into_iter()
                .map(|(gib, tp)| Shape {
                    claim: (gib == 30).then_some(Claim::new(0.4, 0)),
                    label: format!("tp={tp}"),
                    ..Shape::new(gib * GIB, tp)
                })
                .collect(),
            ..Request::default()
        };
        // What `berth bench place` asks most: one GPU, no selector, every worker a candidate.
        let any = Request::simple(16 * GIB, 1);
        let never = || false;
        for (name, req, policy) in [
            ("spread/1x16GiB/any", &any, Policy::Spread),
            ("binpack/2x30GiB/zone=a", &fits, Policy::Binpack),
            ("spread/2x30GiB/zone=a", &fits, Policy::Spread),
            ("binpack/no-fit", &no_fit, Policy::Binpack),
            ("spread/tp-search-4-shapes", &search, Policy::Spread),
        ] {
            g.bench_with_input(BenchmarkId::new(name, n), &workers, |b, ws| {
                b.iter(|| place(black_box(ws), black_box(req), policy, &never))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, placement);
criterion_main!(benches);
