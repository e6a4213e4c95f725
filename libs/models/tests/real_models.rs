//! Real model files, when `ops/fetch-models.sh` has fetched them into `<workspace>/.berth/models`.
//! Without them these tests print a note and pass, so `cargo test` works offline; under CI
//! (`CI` set), where the test command fetches them, they fail instead.

use berth_models::gguf::{GgmlType, GgufLimits, read_gguf};
use berth_models::{
    EstimateOptions, LlamaCppOptions, ProfileFormat, VllmOptions, estimate, profile_from_path,
};
use std::path::PathBuf;

fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.berth/models")
}

fn smollm2() -> Option<PathBuf> {
    let path = models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        // ops/test.sh fetches it: under CI its absence is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is absent under CI",
            path.display()
        );
        println!(
            "note: {} is absent; run ops/fetch-models.sh to test against it",
            path.display()
        );
        None
    }
}

/// Values checked against the file with an independent Python reader of the GGUF layout.
#[test]
fn smollm2_header() {
    let Some(path) = smollm2() else { return };
    let g = read_gguf(&path, &GgufLimits::default()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.metadata.len(), 33);
    assert_eq!(g.tensors.len(), 272);
    assert_eq!(g.data_offset, 1_785_664);
    assert_eq!(g.data_offset + g.data_bytes, 98_362_432);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.get_u64("general.file_type").unwrap(), Some(3));
    assert_eq!(
        g.get("tokenizer.ggml.tokens").and_then(|v| v.array_len()),
        Some(49_152)
    );
    assert_eq!(
        g.get("tokenizer.ggml.merges").and_then(|v| v.array_len()),
        Some(48_900)
    );
    let count = |t| g.tensors.iter().filter(|x| x.ggml_type == t).count();
    assert_eq!(
        (
            count(GgmlType::Q4_1),
            count(GgmlType::F32),
            count(GgmlType::Q8_0)
        ),
        (210, 61, 1)
    );
    assert_eq!(g.tensor_bytes(), 96_576_768);
    assert_eq!(g.parameter_count(), 134_515_008);

    // Every array kept: the token list is really there.
    let all = read_gguf(&path, &GgufLimits::keep_all_arrays()).unwrap();
    let tokens = all
        .get("tokenizer.ggml.tokens")
        .unwrap()
        .as_array()
        .unwrap();
    assert_eq!(tokens[1].as_str(), Some("<|im_start|>"));
}

#[test]
fn smollm2_profile_and_estimates() {
    let Some(path) = smollm2() else { return };
    let p = profile_from_path(&path).unwrap();
    assert_eq!(p.format, ProfileFormat::Gguf);
    assert_eq!(p.architecture, "llama");
    assert_eq!(p.layers, 30);
    assert_eq!(p.embedding_length, 576);
    assert_eq!(p.feed_forward_length, 1536);
    assert_eq!(p.attention.heads, 9);
    assert_eq!(p.attention.kv_heads, 3);
    assert_eq!(p.attention.key_length, 64);
    assert_eq!(p.context_length, 8192);
    assert_eq!(p.vocab_size, 49_152);
    assert_eq!(p.weight_dtype, "Q4_1");
    assert_eq!(p.weights.total, 96_576_768);
    assert_eq!(p.weights.input, 30_081_024);
    // Tied embeddings: the output head is token_embd again, plus the final norm.
    assert_eq!(p.weights.output, 30_081_024 + 2_304);
    assert_eq!(p.weights.layers.len(), 30);
    assert_eq!(p.weights.layers[0], 2_216_448);
    assert_eq!(p.tensor_parallel_sizes(8), vec![1, 3]);

    let e = estimate(
        &p,
        &EstimateOptions::LlamaCpp(LlamaCppOptions {
            context: Some(8192),
            ..LlamaCppOptions::default()
        }),
    )
    .unwrap();
    let g = e.gpus[0];
    // KV: 2 × 30 layers × 8192 × 3 heads × 64 × 2 bytes = 180 MiB.
    assert_eq!(g.kv_cache, 180 << 20);
    assert_eq!(g.weights, 30 * 2_216_448 + 30_081_024 + 2_304);
    assert_eq!(e.host_bytes, 30_081_024);
    println!("{}", e.to_table());

    let v = estimate(&p, &EstimateOptions::Vllm(VllmOptions::default())).unwrap();
    println!("{}", v.to_table());
    assert_eq!(v.gpus[0].weights, 96_576_768);
}

/// Any other GGUF file someone put there parses without error.
#[test]
fn every_fetched_gguf_parses() {
    let Ok(entries) = std::fs::read_dir(models_dir()) else {
        println!("note: no {} directory", models_dir().display());
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_some_and(|x| x == "gguf") {
            let start = std::time::Instant::now();
            let p = profile_from_path(&path).unwrap();
            println!(
                "{}: {} {} layers, {} in {:?}",
                path.display(),
                p.architecture,
                p.layers,
                p.weight_dtype,
                start.elapsed()
            );
        }
    }
}

/// Mutations of the real header (byte flips, huge lengths written over counts and lengths,
/// truncations): the parser answers with a value or an error, quickly, never a panic.
#[test]
fn mutated_smollm2_headers_never_panic() {
    use berth_models::gguf::parse_gguf;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let Some(path) = smollm2() else { return };
    let g = read_gguf(&path, &GgufLimits::default()).unwrap();
    let mut header = std::fs::read(&path).unwrap();
    header.truncate(g.data_offset as usize);
    let n = header.len();
    let strategy = (
        proptest::collection::vec((0..n, any::<u8>()), 1..8),
        proptest::option::of((
            0..n,
            prop_oneof![Just(u64::MAX), Just(1u64 << 31), any::<u64>()],
        )),
        proptest::option::of(0..n),
    );
    let mut runner = TestRunner::new(Config {
        cases: 48,
        ..Config::default()
    });
    runner
        .run(&strategy, |(flips, huge, cut)| {
            let mut b = header.clone();
            for (at, x) in flips {
                b[at] ^= x | 1;
            }
            if let Some((at, v)) = huge {
                let at = at.min(n - 8);
                b[at..at + 8].copy_from_slice(&v.to_le_bytes());
            }
            if let Some(cut) = cut {
                b.truncate(cut);
            }
            let start = std::time::Instant::now();
            let _ = parse_gguf(&b[..], &GgufLimits::default());
            prop_assert!(start.elapsed() < std::time::Duration::from_secs(5));
            Ok(())
        })
        .unwrap();
}
