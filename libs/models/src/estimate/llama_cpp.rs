//! llama.cpp-style estimate: weights of the offloaded layers and the output layer, KV cache
//! by context and cache type, compute buffers, and a fixed CUDA footprint per GPU.

use super::{Backend, Estimate, GpuMemory, pad};
use crate::gguf::GgmlType;
use berth_options::{KvCacheType, LlamaCppOptions, ModelProfile};

impl From<KvCacheType> for GgmlType {
    fn from(t: KvCacheType) -> GgmlType {
        match t {
            KvCacheType::F32 => GgmlType::F32,
            KvCacheType::F16 => GgmlType::F16,
            KvCacheType::Bf16 => GgmlType::BF16,
            KvCacheType::Q8_0 => GgmlType::Q8_0,
            KvCacheType::Q4_0 => GgmlType::Q4_0,
            KvCacheType::Q4_1 => GgmlType::Q4_1,
            KvCacheType::Iq4Nl => GgmlType::IQ4_NL,
            KvCacheType::Q5_0 => GgmlType::Q5_0,
            KvCacheType::Q5_1 => GgmlType::Q5_1,
        }
    }
}

/// Bytes of a row of `n` elements of cache type `t`, a partial last block counted whole.
fn kv_row_bytes(t: KvCacheType, n: u64) -> u64 {
    let t = GgmlType::from(t);
    n.div_ceil(t.block_size()).saturating_mul(t.type_size())
}

/// llama.cpp pads the KV cache size to this many cells.
const KV_PAD: u64 = 256;
/// When no context is given and the model states none.
const FALLBACK_CONTEXT: u64 = 4096;

pub(super) fn estimate(p: &ModelProfile, o: &LlamaCppOptions) -> Estimate {
    let mut notes = Vec::new();
    let n_layer = p.layers as usize;
    let ctx = match o.context.filter(|&c| c > 0) {
        Some(c) => c,
        None if p.context_length > 0 => p.context_length,
        None => {
            notes.push(format!(
                "the model states no context length; sized for {FALLBACK_CONTEXT} tokens"
            ));
            FALLBACK_CONTEXT
        }
    };
    let kv_size = pad(ctx, KV_PAD);
    let ubatch = u64::from(o.ubatch.max(1)).min(kv_size);
    let n_gpus = o.gpus.max(1) as usize;

    // Which layers are offloaded: the last `ngl` ones; the output layer when ngl > n_layer
    // (llama_model::load_tensors: i_gpu_start, act_gpu_layers).
    let ngl = o
        .gpu_layers
        .map_or(n_layer + 1, |n| (n as usize).min(n_layer + 1));
    let first_gpu_layer = n_layer.saturating_sub(ngl);
    let output_on_gpu = ngl > n_layer;
    // Even `--tensor-split`: offloaded layer k of ngl goes to GPU ⌊k · G / ngl⌋.
    let gpu_of = |il: usize| -> Option<usize> {
        if il < first_gpu_layer || ngl == 0 {
            return None;
        }
        Some(((il - first_gpu_layer) * n_gpus / ngl).min(n_gpus - 1))
    };

    let layer_weights = p.layer_weight_bytes();
    let mut weights = vec![0u64; n_gpus];
    let mut kv = vec![0u64; n_gpus];
    let mut has_layers = vec![false; n_gpus];
    let mut host = p.weights.input;
    let mla_k_only = p.attention.kv_lora_rank.is_some() && p.attention.kv_heads == 1;
    for (il, w) in layer_weights.iter().enumerate() {
        let cells = if p.is_sliding(il) && !o.swa_full {
            let window = u64::from(p.attention.sliding_window.unwrap_or(0));
            kv_size.min(pad(
                window
                    .saturating_mul(u64::from(o.sequences()))
                    .saturating_add(ubatch),
                KV_PAD,
            ))
        } else {
            kv_size
        };
        let kv_heads = u64::from(p.kv_heads_of(il));
        let k_row = kv_row_bytes(o.cache_type_k, u64::from(p.attention.key_length) * kv_heads);
        // MLA with a V-less cache (llama.cpp PR 19067): the latent lives in K alone.
        let v_row = if mla_k_only {
            0
        } else {
            kv_row_bytes(
                o.cache_type_v,
                u64::from(p.attention.value_length) * kv_heads,
            )
        };
        let layer_kv = k_row.saturating_add(v_row).saturating_mul(cells);
        match gpu_of(il) {
            Some(g) => {
                weights[g] = weights[g].saturating_add(*w);
                kv[g] = kv[g].saturating_add(layer_kv);
                has_layers[g] = true;
            }
            None => host = host.saturating_add(*w).saturating_add(layer_kv),
        }
    }
    let last = n_gpus - 1;
    if output_on_gpu {
        weights[last] = weights[last].saturating_add(p.weights.output);
        has_layers[last] = true;
    } else {
        host = host.saturating_add(p.weights.output);
    }
    if mla_k_only {
        notes.push("MLA: latent K cache only (llama.cpp since PR 19067)".into());
    }

    // Compute buffers (heuristic; see docs/estimation.md).
    let n_embd = u64::from(p.embedding_length);
    let n_head = u64::from(p.attention.heads);
    let n_ff = super::ffn_width_per_token(p);
    let width = if o.flash_attention.enabled() {
        n_ff.saturating_mul(2)
    } else {
        kv_size.saturating_mul(1 + n_head)
    };
    let attn = (4 * ubatch).saturating_mul(width.saturating_add(1 + 4 * n_embd));
    let logits = (4 * ubatch).saturating_mul(n_embd + u64::from(p.vocab_size));
    let partial = ngl < n_layer + 1;
    // With layers on the host, llama.cpp copies host weights to the GPU for large batches
    // one matrix at a time; the largest is usually the output head.
    let staging = if partial { p.weights.output } else { 0 };

    let gpus: Vec<GpuMemory> = (0..n_gpus)
        .map(|g| {
            let used = has_layers[g] || (g == 0 && ngl == 0);
            if !used {
                return GpuMemory::default();
            }
            let mut compute = attn;
            if g == last {
                compute = compute.max(logits);
            }
            if g == 0 {
                compute = compute.saturating_add(staging);
            }
            GpuMemory::new(weights[g], kv[g], compute, o.overhead_per_gpu)
        })
        .collect();
    if n_gpus > ngl.max(1) {
        notes.push(format!(
            "{n_gpus} GPUs for {ngl} offloaded layers: some get none"
        ));
    }
    if !p.weights.exact {
        notes.push("weight sizes derived from the parameter count, not read from tensors".into());
    }
    Estimate {
        backend: Backend::LlamaCpp,
        context: ctx,
        gpus,
        host_bytes: host,
        claim: None,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::super::estimate as run;
    use super::*;
    use crate::estimate::tests::llama3_8b;
    use berth_options::{DEFAULT_OVERHEAD, EstimateOptions, FlashAttention, GIB};

    fn est(p: &ModelProfile, o: LlamaCppOptions) -> Estimate {
        run(p, &EstimateOptions::LlamaCpp(o)).unwrap()
    }

    #[test]
    fn kv_cache_formula() {
        let p = llama3_8b();
        let e = est(
            &p,
            LlamaCppOptions {
                context: Some(8192),
                ..LlamaCppOptions::default()
            },
        );
        // 2 × 32 layers × 8192 × 8 heads × 128 × 2 bytes = 1 GiB exactly.
        assert_eq!(e.gpus[0].kv_cache, GIB);
        let q8 = est(
            &p,
            LlamaCppOptions {
                context: Some(8192),
                cache_type_k: KvCacheType::Q8_0,
                cache_type_v: KvCacheType::Q8_0,
                ..LlamaCppOptions::default()
            },
        );
        // q8_0: 34 bytes per 32 elements.
        assert_eq!(q8.gpus[0].kv_cache, GIB / 2 / 32 * 34);
        let q4 = est(
            &p,
            LlamaCppOptions {
                context: Some(8192),
                cache_type_k: KvCacheType::Q4_0,
                cache_type_v: KvCacheType::Q4_0,
                ..LlamaCppOptions::default()
            },
        );
        assert_eq!(q4.gpus[0].kv_cache, GIB / 4 / 32 * 36);
        // Context is padded to 256 cells.
        let odd = est(
            &p,
            LlamaCppOptions {
                context: Some(8000),
                ..LlamaCppOptions::default()
            },
        );
        assert_eq!(odd.gpus[0].kv_cache, GIB);
    }

    /// The test GGUF file's profile.
    fn tiny() -> ModelProfile {
        crate::gguf::profile_from_gguf(
            &crate::gguf::parse_gguf(
                &crate::gguf::testutil::tiny_llama(3)[..],
                &crate::gguf::GgufLimits::default(),
            )
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn full_offload_holds_every_weight_but_the_input() {
        let p = tiny();
        let e = est(&p, LlamaCppOptions::default());
        let g = e.gpus[0];
        assert_eq!(
            g.weights,
            p.weights.layers.iter().sum::<u64>() + p.weights.output
        );
        assert_eq!(e.host_bytes, p.weights.input);
        assert_eq!(g.overhead, DEFAULT_OVERHEAD);
        assert_eq!(g.total, g.weights + g.kv_cache + g.compute + g.overhead);
    }

    #[test]
    fn a_gguf_model_at_two_context_sizes() {
        let p = tiny();
        let at = |ctx| {
            est(
                &p,
                LlamaCppOptions {
                    context: Some(ctx),
                    ..LlamaCppOptions::default()
                },
            )
            .gpus[0]
        };
        let (small, large) = (at(512), at(2048));
        // 2 layers × (K + V) × 2 KV heads × 16 × 2 bytes per cell.
        assert_eq!(small.kv_cache, 512 * 2 * 2 * 32 * 2);
        assert_eq!(large.kv_cache, 4 * small.kv_cache);
        assert_eq!(large.weights, small.weights);
        // Flash attention (auto: on) keeps the compute buffer flat.
        assert_eq!(large.compute, small.compute);
    }

    #[test]
    fn partial_offload_and_split() {
        let p = llama3_8b();
        let per_layer = p.layer_weight_bytes()[0];
        let full = est(&p, LlamaCppOptions::default());
        let half = est(
            &p,
            LlamaCppOptions {
                gpu_layers: Some(16),
                ..LlamaCppOptions::default()
            },
        );
        assert_eq!(half.gpus[0].weights, 16 * per_layer);
        assert_eq!(half.gpus[0].kv_cache, full.gpus[0].kv_cache / 2);
        assert!(half.host_bytes >= 16 * per_layer);
        let none = est(
            &p,
            LlamaCppOptions {
                gpu_layers: Some(0),
                ..LlamaCppOptions::default()
            },
        );
        assert_eq!((none.gpus[0].weights, none.gpus[0].kv_cache), (0, 0));

        let split = est(
            &p,
            LlamaCppOptions {
                gpus: 2,
                ..LlamaCppOptions::default()
            },
        );
        assert_eq!(split.gpu_count(), 2);
        // 33 offloaded "layers" (32 + output): 17 on GPU 0 (0..=16), 16 + output on GPU 1.
        assert_eq!(split.gpus[0].weights, 17 * per_layer);
        assert_eq!(split.gpus[1].weights, 15 * per_layer);
        assert_eq!(
            split.gpus.iter().map(|g| g.kv_cache).sum::<u64>(),
            full.gpus[0].kv_cache
        );
        assert!(split.max_per_gpu() < full.max_per_gpu());
    }

    #[test]
    fn sliding_window_layers_are_capped() {
        let mut p = llama3_8b();
        p.attention.sliding_window = Some(1024);
        p.attention.sliding_layers = berth_options::pattern_layers(32, 2);
        let e = est(
            &p,
            LlamaCppOptions {
                context: Some(32768),
                ..LlamaCppOptions::default()
            },
        );
        let per_cell = 2 * 8 * 128 * 2;
        // llama-server's 4 default slots each keep a window.
        let swa_cells = pad(4 * 1024 + 512, 256);
        assert_eq!(
            e.gpus[0].kv_cache,
            16 * per_cell * 32768 + 16 * per_cell * swa_cells
        );
        let full = est(
            &p,
            LlamaCppOptions {
                context: Some(32768),
                swa_full: true,
                ..LlamaCppOptions::default()
            },
        );
        assert_eq!(full.gpus[0].kv_cache, 32 * per_cell * 32768);
    }

    #[test]
    fn mla_caches_the_latent_only() {
        let mut p = llama3_8b();
        p.attention.kv_lora_rank = Some(512);
        p.attention.rope_dim = Some(64);
        p.attention.kv_heads = 1;
        p.attention.key_length = 576;
        p.attention.value_length = 512;
        let e = est(
            &p,
            LlamaCppOptions {
                context: Some(4096),
                ..LlamaCppOptions::default()
            },
        );
        assert_eq!(e.gpus[0].kv_cache, 32 * 4096 * 576 * 2);
    }

    #[test]
    fn flash_attention_keeps_compute_flat() {
        let p = llama3_8b();
        let c = |fa, ctx| {
            est(
                &p,
                LlamaCppOptions {
                    context: Some(ctx),
                    flash_attention: if fa {
                        FlashAttention::On
                    } else {
                        FlashAttention::Off
                    },
                    ..LlamaCppOptions::default()
                },
            )
            .gpus[0]
                .compute
        };
        assert_eq!(c(true, 8192), c(true, 65536));
        assert!(c(false, 65536) > 4 * c(false, 8192) / 2);
        // Logits for a 512-token micro-batch over a 128k vocabulary: ~258 MiB.
        assert_eq!(c(true, 8192), 4 * 512 * (4096 + 128_256));
    }
}
