//! Estimates against published measurements, term by term.
//!
//! Each row names the case, the term, what the backend's own log (or `nvidia-smi`) printed,
//! what berth estimates for the same scope, and where it was published. Rows with a
//! tolerance are asserted; the others are reported (docs/estimation.md says why they are
//! off). llama.cpp rows use the CUDA buffers llama.cpp printed at load (weights + KV +
//! compute, no CUDA context); vLLM rows use vLLM's memory-profiling log lines.

use berth_models::hf::profile_from_config;
use berth_models::{
    Estimate, EstimateOptions, ExplicitProfile, FlashAttention, LlamaCppOptions, ModelProfile,
    SglangOptions, VllmOptions, VllmVersion, WeightDtype, estimate,
};
use std::path::Path;

const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

fn mib(x: f64) -> u64 {
    (x * MIB).round() as u64
}

#[allow(clippy::too_many_arguments)]
fn explicit(
    params: u64,
    layers: u32,
    hidden: u32,
    heads: u32,
    kv_heads: u32,
    ff: u32,
    vocab: u32,
    context: u64,
) -> ModelProfile {
    ExplicitProfile {
        parameters: params,
        dtype: WeightDtype::Bf16,
        layers,
        kv_heads,
        head_dim: hidden / heads,
        context_length: context,
        heads: Some(heads),
        hidden_size: Some(hidden),
        intermediate_size: Some(ff),
        vocab_size: Some(vocab),
        weight_bytes: None,
        name: None,
    }
    .to_profile()
    .expect("a valid explicit profile")
}

/// A profile from one of the config fixtures in `tests/fixtures`.
fn fixture(name: &str) -> ModelProfile {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("fixture");
    profile_from_config(&serde_json::from_str(&text).expect("json"), None).expect("profile")
}

/// A GGUF-like profile: weight bytes as the file has them, the input embeddings apart (they
/// stay in host memory) and the output head counted for the GPU.
fn with_gguf_weights(mut p: ModelProfile, total: u64, input: u64, output: u64) -> ModelProfile {
    p.weights.total = total;
    p.weights.input = input;
    p.weights.output = output;
    p.weights.layers.clear();
    p.weights.exact = true;
    p
}

struct Row {
    case: &'static str,
    term: &'static str,
    measured: f64,
    estimated: f64,
    /// Asserted within this relative error; `None`: reported only.
    tolerance: Option<f64>,
}

fn no_overhead(e: &Estimate) -> f64 {
    let g = e.gpus[0];
    (g.weights + g.kv_cache + g.compute) as f64
}

fn vllm(p: &ModelProfile, o: VllmOptions) -> Estimate {
    estimate(p, &EstimateOptions::Vllm(o)).expect("estimate")
}

fn rows() -> Vec<Row> {
    let mut rows = Vec::new();

    // L1. TriLM 3.9B, f16, n_ctx 512, n_ubatch 512, no flash attention, all 31/31 layers on one
    // RTX 4080. llama.cpp printed: CPU buffer 297.00 MiB (token_embd), CUDA0 buffer 7317.71
    // MiB, KV 180.00 MiB, CUDA0 compute buffer 105.00 MiB.
    // Source: https://github.com/mozilla-ai/llamafile/pull/552 (log in the description).
    // Shape from the same log: 30 layers; 3072-wide KV per layer (180 MiB / 512 cells); vocab
    // 50688 (297 MiB / 3072 / 2). The head count (24) is assumed; the logits term dominates
    // the compute buffer at this context, so it does not move the estimate.
    let trilm = with_gguf_weights(
        explicit(3_990_000_000, 30, 3072, 24, 24, 9216, 50_688, 2048),
        mib(297.00 + 7317.71),
        mib(297.00),
        mib(297.00),
    );
    let e = estimate(
        &trilm,
        &EstimateOptions::LlamaCpp(LlamaCppOptions {
            context: Some(512),
            flash_attention: FlashAttention::Off,
            ..LlamaCppOptions::default()
        }),
    )
    .expect("estimate");
    rows.push(Row {
        case: "llama.cpp TriLM-3.9B f16 ctx 512",
        term: "CUDA buffers",
        measured: mib(7317.71 + 180.00 + 105.00) as f64,
        estimated: no_overhead(&e),
        tolerance: Some(0.10),
    });

    // L2. Meta Llama 3.1 8B Instruct, Q4_K_M (ollama blob sha256-667b0c19…), n_ctx 8192,
    // n_ubatch 512, no flash attention, 33/33 layers offloaded. llama.cpp printed: CPU model
    // buffer 281.81 MiB, CUDA0 model buffer 4403.49 MiB
    // (https://github.com/ollama/ollama/issues/11292), CUDA0 KV buffer 1024.00 MiB and CUDA0
    // compute buffer 560.00 MiB. The KV and compute lines come from ollama server logs of
    // the same blob and settings found in public GitHub text that my search tool could not
    // attribute to a URL (three separate logs, identical figures).
    let llama31 = with_gguf_weights(
        explicit(8_030_261_248, 32, 4096, 32, 8, 14336, 128_256, 131_072),
        mib(281.81 + 4403.49),
        mib(281.81),
        // output.weight is Q6_K in Q4_K_M files: 128256 × 4096 × 210/256 bytes.
        128_256 * 4096 * 210 / 256,
    );
    let e = estimate(
        &llama31,
        &EstimateOptions::LlamaCpp(LlamaCppOptions {
            context: Some(8192),
            flash_attention: FlashAttention::Off,
            ..LlamaCppOptions::default()
        }),
    )
    .expect("estimate");
    rows.push(Row {
        case: "llama.cpp Llama-3.1-8B Q4_K_M ctx 8192",
        term: "CUDA buffers",
        measured: mib(4403.49 + 1024.00 + 560.00) as f64,
        estimated: no_overhead(&e),
        tolerance: Some(0.10),
    });

    // V1, V2. Meta-Llama-3-8B, bf16, max_model_len 8192, H100 80GB, vLLM 0.6.5 (V0 engine:
    // no chunked prefill at 8K, so the profiling batch is 8192 tokens; 256 sequences). vLLM's
    // memory profiling log: tp=1: weights 14.96 GiB, non_torch 1.79 GiB, activation peak
    // 1.26 GiB; tp=2: weights 7.48 GiB, non_torch 3.58 GiB, activation peak 1.26 GiB (per
    // GPU). Source: https://github.com/vllm-project/vllm/pull/10511 (youkaichao's sanity
    // checks). The profile runs before CUDA graphs are captured: compared eager. V0's
    // sampler coefficient was calibrated on these two rows.
    let llama3 = fixture("llama-3-8b.json");
    for (tp, weights, non_torch, act) in [(1, 14.96, 1.79, 1.26), (2, 7.48, 3.58, 1.26)] {
        let e = vllm(
            &llama3,
            VllmOptions {
                vllm_version: VllmVersion::V0,
                tensor_parallel: tp,
                enforce_eager: true,
                ..VllmOptions::default()
            },
        );
        let g = e.gpus[0];
        let case = if tp == 1 {
            "vLLM 0.6.5 (V0) Llama-3-8B bf16 tp=1"
        } else {
            "vLLM 0.6.5 (V0) Llama-3-8B bf16 tp=2"
        };
        rows.push(Row {
            case,
            term: "weights",
            measured: weights * GIB,
            estimated: g.weights as f64,
            tolerance: Some(0.02),
        });
        rows.push(Row {
            case,
            term: "activation peak",
            measured: act * GIB,
            estimated: g.compute as f64,
            tolerance: Some(0.10),
        });
        rows.push(Row {
            case,
            term: "non-torch",
            measured: non_torch * GIB,
            estimated: g.overhead as f64,
            tolerance: None,
        });
        rows.push(Row {
            case,
            term: "all but KV",
            measured: (weights + non_torch + act) * GIB,
            estimated: (g.total - g.kv_cache) as f64,
            tolerance: Some(0.15),
        });
    }

    // V3. Qwen3-235B-A22B-FP8 (MoE, 8 of 128 experts of 1536), tp=4 on H200 (139.72 GiB,
    // so vLLM's large-GPU defaults: 8192 batched tokens, 1024 sequences), V1 engine of July
    // 2025 (before CUDA graphs were profiled in the share), --gpu-memory-utilization 0.5.
    // vLLM's log per rank: requested 69.86 GiB; total non KV cache memory 62.79 GiB; torch
    // peak memory increase 5.62 GiB; non-torch forward increase 2.04 GiB; weights 55.13 GiB;
    // available KV cache memory 7.07 GiB.
    // Source: https://github.com/vllm-project/vllm/pull/21429 (the test result, "Before").
    let qwen3 = fixture("qwen3-235b-a22b-fp8.json");
    let e = vllm(
        &qwen3,
        VllmOptions {
            tensor_parallel: 4,
            gpu_memory_utilization: Some(0.5),
            // That release captured CUDA graphs after the profile, outside the share.
            enforce_eager: true,
            ..VllmOptions::default()
        },
    );
    let g = e.gpus[0];
    let case = "vLLM 0.10 (V1) Qwen3-235B-A22B-FP8 tp=4";
    // Non-torch memory in the share: all but the CUDA context (non-torch and NCCL buffers).
    let inside_non_torch = (g.overhead - 512 * (1 << 20)) as f64;
    rows.push(Row {
        case,
        term: "weights",
        measured: 55.13 * GIB,
        estimated: g.weights as f64,
        tolerance: Some(0.02),
    });
    rows.push(Row {
        case,
        term: "activation peak",
        measured: 5.62 * GIB,
        estimated: g.compute as f64,
        tolerance: None,
    });
    rows.push(Row {
        case,
        term: "non-torch (in share)",
        measured: 2.04 * GIB,
        estimated: inside_non_torch,
        tolerance: None,
    });
    rows.push(Row {
        case,
        term: "all but KV (in share)",
        measured: 62.79 * GIB,
        estimated: (g.weights + g.compute) as f64 + inside_non_torch,
        tolerance: Some(0.10),
    });
    let total = (69.86 / 0.5 * GIB) as u64;
    rows.push(Row {
        case,
        term: "available KV cache",
        measured: 7.07 * GIB,
        estimated: e.kv_room_on(total).expect("the share holds the model") as f64,
        tolerance: None,
    });

    // V4, V5. Yi-1.5-34B-Chat, bf16, tp=4 on 4 × RTX 4090 (24564 MiB each), vLLM 0.5.4 (V0),
    // --gpu-memory-utilization 0.9. nvidia-smi per card: 23859 MiB with CUDA graphs, 21395 MiB
    // with --enforce-eager. Source: https://github.com/vllm-project/vllm/issues/7553.
    // vLLM 0.5.4 captured CUDA graphs after sizing the KV cache: graphs outside the share.
    // Shape from the model's config.json: 60 layers, hidden 7168, 56 heads, 8 KV heads,
    // intermediate 20480, vocab 64000, 4096 positions, 34.39 B parameters.
    let yi = explicit(34_388_917_248, 60, 7168, 56, 8, 20480, 64_000, 4096);
    let card = 24_564 * (1 << 20);
    for (eager, measured) in [(false, 23_859.0), (true, 21_395.0)] {
        let e = vllm(
            &yi,
            VllmOptions {
                vllm_version: VllmVersion::V0,
                tensor_parallel: 4,
                enforce_eager: eager,
                ..VllmOptions::default()
            },
        );
        assert!(e.fits_gpu(card, card), "Yi-34B at tp=4 must fit a 4090");
        rows.push(Row {
            case: if eager {
                "vLLM 0.5.4 (V0) Yi-1.5-34B tp=4 util 0.9 eager"
            } else {
                "vLLM 0.5.4 (V0) Yi-1.5-34B tp=4 util 0.9 graphs"
            },
            term: "nvidia-smi per GPU",
            measured: measured * MIB,
            estimated: e.claim_on(card) as f64,
            tolerance: Some(0.10),
        });
    }
    // S1. Qwen3-235B-A22B-FP8, tp=4 on 4 × H100 (81559 MiB each), SGLang of July 2025,
    // --mem-fraction-static 0.93. SGLang printed: "KV Cache is allocated. #tokens: 367404,
    // K size: 8.23 GB, V size: 8.23 GB" (GiB: SGLang divides by 2^30). Its pool is the
    // fraction of the memory free after the CUDA context and NCCL, less the weights
    // (ModelRunner.profile_max_num_token). Source:
    // https://github.com/vllm-project/vllm/issues/21348 (the description).
    let e = estimate(
        &qwen3,
        &EstimateOptions::Sglang(SglangOptions {
            tensor_parallel: 4,
            mem_fraction_static: Some(0.93),
            ..SglangOptions::default()
        }),
    )
    .expect("estimate");
    let h100 = 81_559 * (1 << 20);
    // 94 layers × one of 4 KV heads per GPU × (128 + 128) × 2 bytes.
    let cell = 94.0 * 256.0 * 2.0;
    rows.push(Row {
        case: "SGLang (2025-07) Qwen3-235B-A22B-FP8 tp=4, mfs 0.93",
        term: "KV pool",
        measured: 367_404.0 * cell,
        estimated: e.kv_room_on(h100).expect("the share holds the model") as f64,
        tolerance: Some(0.05),
    });
    rows
}

#[test]
fn estimates_against_published_measurements() {
    let rows = rows();
    println!(
        "{:<46} {:<22} {:>12} {:>12} {:>8}",
        "case", "term", "measured", "estimated", "error"
    );
    for r in &rows {
        let err = (r.estimated - r.measured) / r.measured;
        println!(
            "{:<46} {:<22} {:>8.0} MiB {:>8.0} MiB {:>+7.1}%{}",
            r.case,
            r.term,
            r.measured / MIB,
            r.estimated / MIB,
            err * 100.0,
            if r.tolerance.is_none() {
                " (reported)"
            } else {
                ""
            }
        );
    }
    for r in &rows {
        let err = (r.estimated - r.measured) / r.measured;
        if let Some(t) = r.tolerance {
            assert!(
                err.abs() <= t,
                "{} {}: estimated {:.0} MiB, measured {:.0} MiB ({:+.1}%)",
                r.case,
                r.term,
                r.estimated / MIB,
                r.measured / MIB,
                err * 100.0
            );
        }
    }
}
