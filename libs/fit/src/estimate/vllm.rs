//! vLLM-style estimate: weights split by tensor (and pipeline) parallelism, a paged KV cache
//! for `max_model_len`, the activation peak of the profiling run, non-torch memory and CUDA
//! graphs, and the `gpu_memory_utilization` claim.

use super::{
    Backend, Claim, Estimate, EstimateError, GIB, GpuMemory, MAX_BATCH, MAX_CONTEXT, MAX_GPUS, MIB,
};
use crate::profile::ModelProfile;
use serde::{Deserialize, Serialize};

/// `--kv-cache-dtype`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VllmKvDtype {
    /// The model's activation dtype: 16-bit.
    #[default]
    Auto,
    Fp8,
    Fp8E4m3,
    Fp8E5m2,
}

impl VllmKvDtype {
    pub fn bytes(self) -> u64 {
        match self {
            Self::Auto => 2,
            Self::Fp8 | Self::Fp8E4m3 | Self::Fp8E5m2 => 1,
        }
    }
}

/// vLLM engine arguments that change memory use. Missing JSON fields take the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VllmOptions {
    /// `--tensor-parallel-size`.
    pub tensor_parallel: u32,
    /// `--pipeline-parallel-size`.
    pub pipeline_parallel: u32,
    /// `--max-model-len`; `None` is the model's context length.
    pub max_model_len: Option<u64>,
    /// Full-length sequences the KV cache must hold at once for the instance to be useful
    /// (vLLM refuses to start below one).
    pub concurrent_sequences: u32,
    /// `--max-num-seqs`: sizes the sampler's share of the profiling run.
    pub max_num_seqs: u32,
    /// `--max-num-batched-tokens`: the profiling run's batch.
    pub max_num_batched_tokens: u32,
    pub kv_cache_dtype: VllmKvDtype,
    /// `--block-size`, tokens per KV block.
    pub block_size: u32,
    /// `--enforce-eager`: no CUDA graphs.
    pub enforce_eager: bool,
    /// `--gpu-memory-utilization`: the share of each GPU the instance takes, whatever it
    /// needs. `None` reserves only the estimate (as with `--kv-cache-memory`).
    pub gpu_memory_utilization: Option<f64>,
    /// CUDA context, cuBLAS, NCCL buffers … per GPU.
    pub non_torch_bytes: u64,
    /// Added per GPU when more than one GPU (NCCL, custom all-reduce buffers).
    pub multi_gpu_bytes: u64,
    pub cuda_graph_bytes: u64,
    /// vLLM ≥ 0.21 profiles CUDA graph memory inside the utilization share; older versions
    /// allocated it on top.
    pub cuda_graphs_in_share: bool,
}

impl Default for VllmOptions {
    fn default() -> Self {
        Self {
            tensor_parallel: 1,
            pipeline_parallel: 1,
            max_model_len: None,
            concurrent_sequences: 1,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            kv_cache_dtype: VllmKvDtype::Auto,
            block_size: 16,
            enforce_eager: false,
            gpu_memory_utilization: Some(0.9),
            non_torch_bytes: GIB + GIB / 2,
            multi_gpu_bytes: GIB + GIB / 2,
            cuda_graph_bytes: 512 * MIB,
            cuda_graphs_in_share: true,
        }
    }
}

impl VllmOptions {
    pub fn validate(&self) -> Result<(), EstimateError> {
        let bad = |what: String| Err(EstimateError::InvalidOptions(what));
        let gpus = u64::from(self.tensor_parallel) * u64::from(self.pipeline_parallel);
        if self.tensor_parallel == 0 || self.pipeline_parallel == 0 || gpus > u64::from(MAX_GPUS) {
            return bad(format!(
                "tensor_parallel × pipeline_parallel must be 1..={MAX_GPUS}"
            ));
        }
        if self.block_size == 0 || self.max_num_batched_tokens > MAX_BATCH {
            return bad(format!(
                "block_size must be positive and max_num_batched_tokens at most {MAX_BATCH}"
            ));
        }
        if self.max_model_len.is_some_and(|l| l > MAX_CONTEXT) {
            return bad(format!("max_model_len must be at most {MAX_CONTEXT}"));
        }
        if let Some(u) = self.gpu_memory_utilization
            && !(u > 0.0 && u <= 1.0)
        {
            return bad(format!("gpu_memory_utilization {u} is not in (0, 1]"));
        }
        Ok(())
    }
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
    let ffw = match p.experts {
        Some(e) => u64::from(p.feed_forward_length) * u64::from(e.used.max(1)),
        None => u64::from(p.feed_forward_length),
    };
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
    use super::super::{EstimateOptions, estimate as run};
    use super::*;
    use crate::estimate::tests::llama3_8b;

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
