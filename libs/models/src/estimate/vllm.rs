//! vLLM-style estimate: weights split by tensor (and pipeline) parallelism, a paged KV cache
//! for `max_model_len`, the activation peak of vLLM's profiling run, non-torch memory, NCCL
//! and CUDA graphs, and the `gpu_memory_utilization` claim. Each term and the vLLM code it
//! follows is in docs/estimation.md.

use super::{Backend, Claim, Estimate, GpuMemory};
use berth_options::{ModelProfile, VllmOptions, VllmVersion};

/// fused_moe works through at most this many tokens at once (`VLLM_FUSED_MOE_CHUNK_SIZE`:
/// 16384 in current releases, 32768 in the V0 era).
fn fused_moe_chunk(v: VllmVersion) -> u64 {
    match v {
        VllmVersion::V1 => 16 * 1024,
        VllmVersion::V0 => 32 * 1024,
    }
}

/// Bytes per logit the sampler holds at its peak in the profiling run, whose dummy requests
/// ask for top-k and top-p. V1's PyTorch-native `apply_top_k_top_p` (the default without
/// `VLLM_USE_FLASHINFER_SAMPLER=1`) holds the 16-bit logits, their f32 copy, the sorted
/// values and int64 indices, two masks, the sorted probabilities and the scattered result
/// (2 + 4 + 4 + 8 + 1 + 4 + 1 + 4). V0's sampler also kept probabilities and log-probabilities
/// (40, calibrated on vLLM PR 10511's log; the code count gives 32).
fn sampler_bytes_per_logit(v: VllmVersion) -> u64 {
    match v {
        VllmVersion::V1 => 28,
        VllmVersion::V0 => 40,
    }
}

/// The activation peak of vLLM's profiling run on one GPU, split in the forward pass over
/// `tokens` and the sampler over `seqs` sequences (zero on GPUs that do not sample).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Activation {
    pub forward: u64,
    pub sampler: u64,
}

impl Activation {
    pub fn peak(self) -> u64 {
        self.forward.max(self.sampler)
    }
}

/// `profile_run`'s dummy forward (`_dummy_run(max_num_batched_tokens)`) and sampler
/// (`_dummy_sampler_run`): the largest live tensors, in the activation dtype.
pub(crate) fn activation(
    p: &ModelProfile,
    version: VllmVersion,
    tokens: u64,
    seqs: u64,
    tp: u64,
) -> Activation {
    let act = if p.weight_dtype == "f32" { 4 } else { 2 };
    let h = u64::from(p.embedding_length);
    let a = &p.attention;
    let mul = |x: u64, y: u64| x.saturating_mul(y);
    // Hidden states, residual and the normed input of the current layer.
    let stream = mul(mul(3, tokens), mul(h, act));
    // q, k, v and the attention output, heads split by TP.
    let heads = u64::from(a.heads);
    let kv = u64::from(a.kv_heads);
    let (kl, vl) = (u64::from(a.key_length), u64::from(a.value_length));
    let attn_width = mul(heads, kl)
        .saturating_add(mul(kv, kl.saturating_add(vl)))
        .saturating_add(mul(heads, vl));
    let attn = mul(mul(tokens, attn_width / tp), act);
    // Dense MLP: gate_up (2·ff) and the activated half (ff), split by TP.
    let dense_mlp = |ff: u64| mul(mul(tokens, mul(3, ff) / tp), act);
    let ff = u64::from(p.feed_forward_length);
    let mlp = match p.experts {
        None => dense_mlp(ff),
        Some(e) => {
            let k = u64::from(e.used.max(1));
            let ffe = u64::from(e.expert_width(p.feed_forward_length));
            let chunk = tokens.min(fused_moe_chunk(version));
            // fused_moe's intermediate caches (k·2·ffe, k·ffe, k·hidden per token) and the
            // router logits in f32.
            let routed = mul(
                mul(mul(chunk, k), (mul(3, ffe) / tp).saturating_add(h)),
                act,
            )
            .saturating_add(mul(mul(tokens, u64::from(e.count)), 4));
            let shared = e
                .shared_feed_forward_length
                .map_or(0, |s| dense_mlp(u64::from(s)));
            // The shared experts' output waits for the routed ones.
            let moe = routed.max(shared).saturating_add(mul(mul(tokens, h), act));
            if e.dense_layers > 0 {
                moe.max(dense_mlp(ff))
            } else {
                moe
            }
        }
    };
    let forward = stream.saturating_add(attn.max(mlp));
    // The sampler runs on the last hidden state of each dummy sequence while the forward's
    // output (tokens × hidden) is still held.
    let logits = mul(
        mul(seqs, u64::from(p.vocab_size)),
        sampler_bytes_per_logit(version),
    );
    let sampler = logits.saturating_add(mul(mul(tokens, h), act));
    Activation { forward, sampler }
}

pub(super) fn estimate(p: &ModelProfile, o: &VllmOptions) -> Estimate {
    let mut notes = Vec::new();
    let tp = u64::from(o.tensor_parallel.max(1));
    let pp = o.pipeline_parallel.max(1) as usize;
    let n_gpus = tp as usize * pp;
    let len = match o.max_model_len.filter(|&l| l > 0) {
        Some(l) => l,
        None => p.context_length.max(1),
    };
    let block = u64::from(o.block_size.max(1));
    let kv_bytes = o.kv_cache_dtype.bytes();
    let a = &p.attention;
    // V0 never turned chunked prefill on by itself for sliding-window models
    // (EngineArgs.create_engine_config), so it profiled the whole max_model_len.
    let batched = match (o.vllm_version, o.max_num_batched_tokens) {
        (VllmVersion::V0, None) if a.sliding_window.is_some() => len.max(2048),
        _ => u64::from(o.resolved_max_num_batched_tokens(len)),
    };
    let seqs = u64::from(o.resolved_max_num_seqs()).min(batched);

    // KV bytes per token of one layer on one GPU (CacheEngine.get_cache_block_size / the V1
    // KV cache specs): K and V for this GPU's KV heads, or the MLA latent, replicated.
    let per_token = |il: usize| -> u64 {
        match (a.kv_lora_rank, a.rope_dim) {
            (Some(rank), rope) => {
                (u64::from(rank) + u64::from(rope.unwrap_or(0))).saturating_mul(kv_bytes)
            }
            _ => {
                let heads = u64::from(p.kv_heads_of(il));
                if heads == 0 {
                    return 0;
                }
                let per_gpu = (heads / tp).max(1);
                per_gpu
                    .saturating_mul(u64::from(a.key_length) + u64::from(a.value_length))
                    .saturating_mul(kv_bytes)
            }
        }
    };
    // Blocks one sequence of `len` tokens needs in layer il: all of them, or for a
    // sliding-window layer the window plus one batch (SlidingWindowSpec).
    let blocks = |il: usize| -> u64 {
        let full = len.div_ceil(block);
        if p.is_sliding(il) {
            let w = u64::from(a.sliding_window.unwrap_or(0));
            let tokens = (w.saturating_sub(1) + batched).min(len);
            (tokens.div_ceil(block) + 1).min(full)
        } else {
            full
        }
    };

    // Pipeline stages take contiguous layer ranges.
    let n_layer = p.layers as usize;
    let per_stage = n_layer.div_ceil(pp);
    let mut stage_kv = vec![0u64; pp];
    for il in 0..n_layer {
        let s = (il / per_stage.max(1)).min(pp - 1);
        let bytes = blocks(il)
            .saturating_mul(block)
            .saturating_mul(per_token(il))
            .saturating_mul(u64::from(o.concurrent_sequences.max(1)));
        stage_kv[s] = stage_kv[s].saturating_add(bytes);
    }

    // Weights: sharded by TP (embeddings and head are vocab-parallel), layers by PP.
    let weights = p.weights.total.div_ceil(n_gpus as u64);

    let act = activation(p, o.vllm_version, batched, seqs, tp);

    // Memory outside the torch allocator, and what of it lies outside the share vLLM sizes
    // its KV cache against: the CUDA context exists before vLLM's baseline snapshot. NCCL
    // and all-reduce buffers come after it (V0 initialised NCCL after the snapshot; V1's
    // profile run pre-allocates the communication buffers), so they count inside.
    let graphs = if o.enforce_eager {
        0
    } else {
        o.cuda_graph_bytes
    };
    let nccl = if n_gpus > 1 { o.multi_gpu_bytes } else { 0 };
    let overhead = o
        .non_torch_bytes
        .saturating_add(nccl)
        .saturating_add(graphs);
    let outside = o.outside_share_bytes();

    let gpus = (0..n_gpus)
        .map(|g| {
            let stage = g / tp as usize;
            // Only the last stage samples; in V0 only its first TP rank (the driver).
            let samples =
                stage == pp - 1 && (o.vllm_version == VllmVersion::V1 || g % tp as usize == 0);
            let compute = if samples { act.peak() } else { act.forward };
            GpuMemory::new(weights, stage_kv[stage], compute, overhead)
        })
        .collect();
    let claim = o
        .gpu_memory_utilization
        .filter(|u| u.is_finite() && *u > 0.0)
        .map(|u| Claim::new(u.min(1.0), outside));
    if claim.is_some() {
        notes.push(
            "the KV cache grows to fill the claimed share; the totals are the minimum to start"
                .into(),
        );
    }
    if o.vllm_version == VllmVersion::V1
        && (o.max_num_seqs.is_none() || o.max_num_batched_tokens.is_none())
    {
        notes.push(format!(
            "vLLM's defaults for GPUs of 70 GiB or more: {batched} batched tokens, {seqs} \
             sequences; on smaller GPUs and A100s vLLM takes 2048 and 256, which need less"
        ));
    }
    if a.kv_lora_rank.is_some() {
        notes.push("MLA: one latent cache per token, replicated on every TP rank".into());
    }
    if !p.weights.exact {
        notes.push("weight sizes derived from the parameter count, not read from files".into());
    }
    if tp > 1 && !p.supports_tensor_parallel(tp as u32) {
        notes.push(format!(
            "tensor parallel size {tp} does not divide the model's {} attention heads / {} KV heads",
            a.heads, a.kv_heads
        ));
    }
    Estimate {
        backend: Backend::Vllm,
        context: len,
        gpus,
        host_bytes: 0,
        claim,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::super::estimate as run;
    use super::*;
    use crate::estimate::tests::llama3_8b;
    use crate::hf::tests::fixture;
    use berth_options::{EstimateOptions, GIB, MIB, VllmKvDtype};

    fn est(p: &ModelProfile, o: VllmOptions) -> Estimate {
        run(p, &EstimateOptions::Vllm(o)).unwrap()
    }

    fn v0() -> VllmOptions {
        VllmOptions {
            vllm_version: VllmVersion::V0,
            ..VllmOptions::default()
        }
    }

    #[test]
    fn kv_blocks_are_rounded_to_16_tokens() {
        let p = llama3_8b();
        let kv = |len| {
            est(
                &p,
                VllmOptions {
                    max_model_len: Some(len),
                    ..VllmOptions::default()
                },
            )
            .gpus[0]
                .kv_cache
        };
        // 128 KiB per token (32 layers × 2 × 8 × 128 × 2 bytes).
        assert_eq!(kv(8192), 8192 * 131_072);
        assert_eq!(kv(8193), (8192 + 16) * 131_072);
        assert_eq!(kv(1), 16 * 131_072);
    }

    #[test]
    fn tensor_parallel_splits_weights_and_kv_heads() {
        let p = llama3_8b();
        let one = est(&p, VllmOptions::default());
        let two = est(
            &p,
            VllmOptions {
                tensor_parallel: 2,
                ..VllmOptions::default()
            },
        );
        assert_eq!(two.gpu_count(), 2);
        assert_eq!(two.gpus[0].weights, one.gpus[0].weights / 2);
        assert_eq!(two.gpus[0].kv_cache, one.gpus[0].kv_cache / 2);
        // 8 KV heads at tp=16 are replicated: one head per GPU.
        let sixteen = est(
            &p,
            VllmOptions {
                tensor_parallel: 16,
                ..VllmOptions::default()
            },
        );
        assert_eq!(sixteen.gpus[0].kv_cache, one.gpus[0].kv_cache / 8);
        assert!(sixteen.notes.is_empty() || !sixteen.notes.iter().any(|n| n.contains("divide")));
        let three = est(
            &p,
            VllmOptions {
                tensor_parallel: 3,
                ..VllmOptions::default()
            },
        );
        assert!(three.notes.iter().any(|n| n.contains("does not divide")));
        let pp = est(
            &p,
            VllmOptions {
                pipeline_parallel: 2,
                ..VllmOptions::default()
            },
        );
        assert_eq!(pp.gpus[0].kv_cache, one.gpus[0].kv_cache / 2);
        // Only the last stage samples.
        assert!(pp.gpus[0].compute < pp.gpus[1].compute);
    }

    #[test]
    fn scheduler_defaults_follow_the_engine() {
        let v1 = VllmOptions::default();
        assert_eq!(
            (
                v1.resolved_max_num_batched_tokens(8192),
                v1.resolved_max_num_seqs()
            ),
            (8192, 1024)
        );
        assert_eq!(v1.resolved_max_num_batched_tokens(1 << 20), 8192);
        let v0 = v0();
        assert_eq!(v0.resolved_max_num_seqs(), 256);
        // No chunked prefill up to 32K: the whole max_model_len, at least 2048.
        assert_eq!(v0.resolved_max_num_batched_tokens(8192), 8192);
        assert_eq!(v0.resolved_max_num_batched_tokens(32_768), 32_768);
        assert_eq!(v0.resolved_max_num_batched_tokens(1024), 2048);
        // Chunked prefill past 32K.
        assert_eq!(v0.resolved_max_num_batched_tokens(131_072), 2048);
        let set = VllmOptions {
            max_num_batched_tokens: Some(4096),
            max_num_seqs: Some(64),
            ..v0
        };
        assert_eq!(
            (
                set.resolved_max_num_batched_tokens(131_072),
                set.resolved_max_num_seqs()
            ),
            (4096, 64)
        );
    }

    #[test]
    fn v0_profiled_the_whole_context_of_sliding_window_models() {
        let mut p = llama3_8b();
        p.context_length = 131_072;
        let long = est(&p, v0()).gpus[0].compute;
        p.attention.sliding_window = Some(4096);
        p.attention.sliding_layers = vec![true; 32];
        let sliding = est(&p, v0()).gpus[0].compute;
        let forward = |t: u64| activation(&p, VllmVersion::V0, t, 256, 1).peak();
        assert_eq!((long, sliding), (forward(2048), forward(131_072)));
    }

    #[test]
    fn activation_terms_of_a_dense_model() {
        let p = llama3_8b();
        // V1: 8192 tokens through the model; the sampler over 1024 sequences.
        let a = activation(&p, VllmVersion::V1, 8192, 1024, 1);
        let stream = 3 * 8192 * 4096 * 2;
        let mlp = 8192 * 3 * 14336 * 2;
        assert_eq!(a.forward, stream + mlp);
        let hidden = 8192 * 4096 * 2;
        assert_eq!(a.sampler, 1024 * 128_256 * 28 + hidden);
        assert_eq!(a.peak(), a.sampler);
        // TP divides the MLP and the attention heads, not the sampler (logits are gathered).
        let two = activation(&p, VllmVersion::V1, 8192, 1024, 2);
        assert_eq!(two.forward, stream + mlp / 2);
        assert_eq!(two.sampler, a.sampler);
        // V0's sampler sorted for top-k/top-p and kept probabilities and logprobs.
        let old = activation(&p, VllmVersion::V0, 8192, 256, 1);
        assert_eq!(old.sampler, 256 * 128_256 * 40 + hidden);
        // The estimate uses the resolved defaults.
        let e = est(&p, VllmOptions::default());
        assert_eq!(e.gpus[0].compute, a.peak());
        let e = est(&p, v0());
        assert_eq!(e.gpus[0].compute, old.peak());
        // In V0 only the driver samples.
        let e = est(
            &p,
            VllmOptions {
                tensor_parallel: 2,
                ..v0()
            },
        );
        let two_old = activation(&p, VllmVersion::V0, 8192, 256, 2);
        assert_eq!(
            (e.gpus[0].compute, e.gpus[1].compute),
            (two_old.peak(), two_old.forward)
        );
    }

    #[test]
    fn moe_activation_uses_the_expert_width() {
        // DeepSeek-V3: 8 of 256 experts of 2048, one shared, three dense layers of 18432.
        let p = fixture("deepseek-v3.json");
        let t: u64 = 8192;
        let a = activation(&p, VllmVersion::V1, t, 1024, 8);
        let h = 7168;
        let routed = t * 8 * (3 * 2048 / 8 + h) * 2 + t * 256 * 4;
        let moe = routed + t * h * 2;
        let dense = t * (3 * 18432 / 8) * 2;
        let attn = t * ((128 * 192 + 128 * 320 + 128 * 128) / 8) * 2;
        assert_eq!(a.forward, 3 * t * h * 2 + moe.max(dense).max(attn));
        // The dense intermediate_size per routed expert, as before, would be 5× this.
        let before = t * (4 * h + 3 * 18432 * 8) * 2;
        assert!(before > 5 * a.forward, "{before} vs {}", a.forward);
        // Mixtral: the experts' width is intermediate_size.
        let p = fixture("mixtral-8x7b.json");
        let a = activation(&p, VllmVersion::V0, 32_768, 256, 2);
        let t: u64 = 32_768;
        let routed = t * 2 * (3 * 14336 / 2 + 4096) * 2 + t * 8 * 4;
        assert_eq!(a.forward, 3 * t * 4096 * 2 + routed + t * 4096 * 2);
        // Qwen-MoE's shared experts run beside the routed ones.
        let p = fixture("qwen1.5-moe-a2.7b.json");
        let a = activation(&p, VllmVersion::V1, 8192, 1024, 1);
        let t: u64 = 8192;
        let routed = t * 4 * (3 * 1408 + 2048) * 2 + t * 60 * 4;
        let shared = t * 3 * 5632 * 2;
        let attn = t * (16 * 128 * 4) * 2;
        assert_eq!(
            a.forward,
            3 * t * 2048 * 2 + (routed.max(shared) + t * 2048 * 2).max(attn)
        );
    }

    #[test]
    fn non_torch_nccl_and_graphs() {
        let p = llama3_8b();
        let one = est(&p, VllmOptions::default());
        // CUDA context + non-torch increase, and CUDA graphs.
        assert_eq!(one.gpus[0].overhead, 768 * MIB + 512 * MIB);
        let two = est(
            &p,
            VllmOptions {
                tensor_parallel: 2,
                ..VllmOptions::default()
            },
        );
        assert_eq!(two.gpus[0].overhead, 768 * MIB + 1536 * MIB + 512 * MIB);
        // The CUDA context comes before vLLM's baseline snapshot, outside the share; NCCL
        // buffers and (since 0.21) CUDA graphs inside.
        let c = two.claim.unwrap();
        assert_eq!(c.extra_bytes, 512 * MIB);
        // V0 captured graphs after sizing the KV cache, on top of the share.
        let old = est(
            &p,
            VllmOptions {
                tensor_parallel: 2,
                ..v0()
            },
        );
        assert_eq!(old.claim.unwrap().extra_bytes, 512 * MIB + 512 * MIB);
        let eager = est(
            &p,
            VllmOptions {
                enforce_eager: true,
                ..VllmOptions::default()
            },
        );
        assert_eq!(one.gpus[0].overhead - eager.gpus[0].overhead, 512 * MIB);
    }

    #[test]
    fn named_models_term_by_term() {
        // Qwen2.5-32B at tp=2, max_model_len 32768.
        let p = fixture("qwen2.5-32b.json");
        let e = est(
            &p,
            VllmOptions {
                tensor_parallel: 2,
                ..VllmOptions::default()
            },
        );
        let g = e.gpus[0];
        assert_eq!(g.weights, p.weights.total.div_ceil(2));
        assert!((30.4..30.6).contains(&(g.weights as f64 / GIB as f64)));
        // 64 layers × 4 of 8 KV heads × (128 + 128) × 2 bytes per token.
        assert_eq!(g.kv_cache, 32_768 * 64 * 4 * 256 * 2);
        let t = 8192;
        let forward = 3 * t * 5120 * 2 + t * (3 * 27648 / 2) * 2;
        assert_eq!(activation(&p, VllmVersion::V1, t, 1024, 2).forward, forward);
        assert_eq!(g.compute, 1024 * 152_064 * 28 + t * 5120 * 2);

        // A bitsandbytes 4-bit model from its config: embeddings and head stay bf16.
        let p = fixture("llama-3-8b-bnb-4bit.json");
        let e = est(&p, VllmOptions::default());
        assert_eq!(e.gpus[0].weights, p.weights.total);
        assert!(e.notes.iter().any(|n| n.contains("parameter count")));

        // DeepSeek-V2-Lite (MLA + MoE): one 576-wide latent per token and layer.
        let p = fixture("deepseek-v2-lite.json");
        let e = est(
            &p,
            VllmOptions {
                max_model_len: Some(8192),
                ..VllmOptions::default()
            },
        );
        assert_eq!(e.gpus[0].kv_cache, 27 * 8192 * 576 * 2);
        let a = activation(&p, VllmVersion::V1, 8192, 1024, 1);
        let t: u64 = 8192;
        let routed = t * 6 * (3 * 1408 + 2048) * 2 + t * 64 * 4;
        let shared = t * 3 * 2816 * 2;
        let moe = routed.max(shared) + t * 2048 * 2;
        let dense = t * 3 * 10944 * 2;
        let attn = t * (16 * 192 + 16 * 320 + 16 * 128) * 2;
        assert_eq!(a.forward, 3 * t * 2048 * 2 + moe.max(dense).max(attn));
    }

    #[test]
    fn fp8_cache_and_eager_mode() {
        let p = llama3_8b();
        let base = est(&p, VllmOptions::default());
        let fp8 = est(
            &p,
            VllmOptions {
                kv_cache_dtype: VllmKvDtype::Fp8,
                enforce_eager: true,
                ..VllmOptions::default()
            },
        );
        assert_eq!(fp8.gpus[0].kv_cache, base.gpus[0].kv_cache / 2);
        assert_eq!(base.gpus[0].overhead - fp8.gpus[0].overhead, 512 * MIB);
    }

    #[test]
    fn utilization_is_a_claim() {
        let p = llama3_8b();
        let e = est(&p, VllmOptions::default());
        // The share, and the CUDA context vLLM's accounting leaves out.
        let share = (80.0 * 0.9 * GIB as f64).ceil() as u64;
        assert_eq!(e.claim_on(80 * GIB), share + 512 * MIB);
        assert!(e.fits_gpu(80 * GIB, 80 * GIB));
        // 8B in bf16 needs ~19 GiB: a 16 GiB GPU cannot hold it at any share.
        assert!(!e.fits_gpu(16 * GIB, 16 * GIB));
        let old = est(
            &p,
            VllmOptions {
                cuda_graphs_in_share: false,
                ..VllmOptions::default()
            },
        );
        assert_eq!(old.claim_on(80 * GIB), e.claim_on(80 * GIB) + 512 * MIB);
        let exact = est(
            &p,
            VllmOptions {
                gpu_memory_utilization: None,
                ..VllmOptions::default()
            },
        );
        assert_eq!(exact.claim_on(80 * GIB), exact.max_per_gpu());
        assert_eq!(exact.kv_room_on(80 * GIB), None);
        // The KV cache vLLM allocates: the share less weights, activation, non-torch
        // memory inside the share and (in share since 0.21) CUDA graphs.
        let g = e.gpus[0];
        let inside = g.weights + g.compute + 256 * MIB + 512 * MIB;
        assert_eq!(e.kv_room_on(80 * GIB), Some(share - inside));
        assert_eq!(e.kv_room_on(16 * GIB), None);
    }

    #[test]
    fn mla_and_sliding_window() {
        let mut p = llama3_8b();
        p.attention.kv_lora_rank = Some(512);
        p.attention.rope_dim = Some(64);
        let e = est(
            &p,
            VllmOptions {
                max_model_len: Some(4096),
                tensor_parallel: 4,
                ..VllmOptions::default()
            },
        );
        assert_eq!(e.gpus[0].kv_cache, 32 * 4096 * 576 * 2);

        let mut p = llama3_8b();
        p.attention.sliding_window = Some(4096);
        p.attention.sliding_layers = vec![true; 32];
        let e = est(
            &p,
            VllmOptions {
                max_model_len: Some(131_072),
                max_num_batched_tokens: Some(2048),
                ..VllmOptions::default()
            },
        );
        let blocks = (4095u64 + 2048).div_ceil(16) + 1;
        assert_eq!(e.gpus[0].kv_cache, 32 * blocks * 16 * 8 * 256 * 2);
    }
}
