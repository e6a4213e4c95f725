//! vLLM-style estimate: weights split by tensor (and pipeline) parallelism, a paged KV cache
//! for `max_model_len`, the activation peak of the profiling run, non-torch memory and CUDA
//! graphs, and the `gpu_memory_utilization` claim.

use super::{Backend, Claim, Estimate, GpuMemory};
use berth_options::{ModelProfile, VllmOptions};

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
            let tokens = (w.saturating_sub(1) + u64::from(o.max_num_batched_tokens)).min(len);
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

    // Activation peak of the profiling run (heuristic, calibrated on published vLLM logs;
    // see docs/estimation.md): the MLP and residual stream over the batched tokens in 16-bit,
    // plus f32 logits and sampling buffers for max_num_seqs sequences.
    let t = u64::from(o.max_num_batched_tokens);
    let ffw = super::ffn_width_per_token(p);
    let act = t
        .saturating_mul((4 * u64::from(p.embedding_length)).saturating_add(ffw.saturating_mul(3)))
        .saturating_mul(2)
        .saturating_add(
            u64::from(o.max_num_seqs)
                .saturating_mul(u64::from(p.vocab_size))
                .saturating_mul(8),
        );

    let graphs = if o.enforce_eager {
        0
    } else {
        o.cuda_graph_bytes
    };
    let non_torch =
        o.non_torch_bytes
            .saturating_add(if n_gpus > 1 { o.multi_gpu_bytes } else { 0 });
    let in_share_graphs = if o.cuda_graphs_in_share { graphs } else { 0 };

    let gpus = (0..n_gpus)
        .map(|g| {
            let stage = g / tp as usize;
            GpuMemory::new(
                weights,
                stage_kv[stage],
                act,
                non_torch.saturating_add(graphs),
            )
        })
        .collect();
    let claim = o
        .gpu_memory_utilization
        .filter(|u| u.is_finite() && *u > 0.0)
        .map(|u| Claim {
            fraction: u.min(1.0),
            extra_bytes: graphs - in_share_graphs,
        });
    if claim.is_some() {
        notes.push(
            "the KV cache grows to fill the claimed share; the totals are the minimum to start"
                .into(),
        );
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
    use berth_options::{EstimateOptions, GIB, MIB, VllmKvDtype};

    fn est(p: &ModelProfile, o: VllmOptions) -> Estimate {
        run(p, &EstimateOptions::Vllm(o)).unwrap()
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
        assert_eq!(
            e.claim_on(80 * GIB),
            (80.0 * 0.9 * GIB as f64).ceil() as u64
        );
        assert!(e.fits_gpu(80 * GIB, 80 * GIB));
        // 8B in bf16 needs ~18 GiB: a 16 GiB GPU cannot hold it at any share.
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
                max_num_batched_tokens: 2048,
                ..VllmOptions::default()
            },
        );
        let blocks = (4095u64 + 2048).div_ceil(16) + 1;
        assert_eq!(e.gpus[0].kv_cache, 32 * blocks * 16 * 8 * 256 * 2);
    }
}
