//! Profiling a real GGUF file and estimating from its profile.
//!
//! `cargo bench -p berth-models` (add `-- --quick` for a short run). It needs
//! `ops/fetch-models.sh` to have run; without the file it is skipped with a note. Placement is
//! benchmarked in `berth-fit` (`libs/fit/benches/fit.rs`).

use berth_models::{EstimateOptions, LlamaCppOptions, estimate, profile_from_path};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::path::PathBuf;

fn smollm2() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.berth/models");
    let path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    path.is_file().then_some(path)
}

fn profiling(c: &mut Criterion) {
    let Some(path) = smollm2() else {
        eprintln!("skipping the GGUF benchmark: run ops/fetch-models.sh first");
        return;
    };
    c.bench_function("profile/SmolLM2-135M-Q4_1.gguf", |b| {
        b.iter(|| profile_from_path(black_box(&path)))
    });
    let Ok(profile) = profile_from_path(&path) else {
        return;
    };
    let opts = EstimateOptions::LlamaCpp(LlamaCppOptions::default());
    // Errors are values here too: the benchmark measures the call either way.
    c.bench_function("estimate/llama.cpp/SmolLM2", |b| {
        b.iter(|| estimate(black_box(&profile), black_box(&opts)))
    });
}

criterion_group!(benches, profiling);
criterion_main!(benches);
