//! SGLang-style estimate: weights split by tensor parallelism, a token-granular KV pool for
//! the context, the activation of one prefill chunk, CUDA graphs, and the
//! `mem_fraction_static` claim, which SGLang takes of the memory free once its CUDA context
//! and NCCL exist. Each term and the SGLang code it follows is in docs/estimation.md.

use super::vllm::activation;
use super::{Backend, Claim, Estimate, GpuMemory};
use berth_fit::{LeaveTier, LeaveTiers};
use berth_options::{MIB, ModelProfile, SGLANG_GPU_CLASSES, SglangOptions, VllmVersion};

/// Requests the `req_to_token` pool is sized for at least (`init_memory_pool`:
/// `min(max(pool / context × 512, 2048), 4096)`); taken at its floor.
const REQ_TO_TOKEN_REQUESTS: u64 = 2048;
/// Bytes per logit SGLang's sampler holds for a decode batch: the f32 logits and their
/// softmax probabilities.
const SAMPLER_BYTES_PER_LOGIT: u64 = 8;
/// SGLang's own allowance for CUDA graphs per captured batch size (2 MiB per batch size up
/// to `cuda_graph_max_bs`, in `_handle_gpu_memory_settings`).
const GRAPH_BYTES_PER_BATCH: u64 = 2 * MIB;

/// KV bytes per token on one GPU (`ModelRunner.cell_size`): K and V of this GPU's KV heads
/// in every layer, or the MLA latent (replicated on every rank).
pub(crate) fn cell_size(p: &ModelProfile, o: &SglangOptions) -> u64 {
    let a = &p.attention;
    let bytes = o.kv_cache_dtype.bytes();
    let tp = u64::from(o.tensor_parallel.max(1));
    (0..p.layers as usize)
        .map(|il| match a.kv_lora_rank {
            Some(rank) => (u64::from(rank) + u64::from(a.rope_dim.unwrap_or(0))) * bytes,
            None => {
                let heads = u64::from(p.kv_heads_of(il));
                if heads == 0 {
                    return 0;
                }
                (heads / tp)
                    .max(1)
                    .saturating_mul(u64::from(a.key_length) + u64::from(a.value_length))
                    .saturating_mul(bytes)
            }
        })
        .fold(0u64, u64::saturating_add)
}

pub(super) fn estimate(p: &ModelProfile, o: &SglangOptions) -> Estimate {
    let mut notes = Vec::new();
    let tp = u64::from(o.tensor_parallel.max(1));
    let n_gpus = tp as usize;
    let len = match o.context_length {
        Some(l) => l,
        None => p.context_length.max(1),
    };
    // Without a GPU to look at, SGLang's defaults for an 80 GiB one.
    let chunk = u64::from(o.resolved_chunked_prefill_size(None));
    let graph_bs = u64::from(o.resolved_cuda_graph_max_bs(None));

    let weights = p.weights.total.div_ceil(tp);
    let kv = cell_size(p, o)
        .saturating_mul(len)
        .saturating_mul(u64::from(o.concurrent_sequences.max(1)));

    // One prefill chunk through the model (the same intermediates vLLM's profile run
    // holds), and a decode batch's logits in the sampler.
    let forward = activation(p, VllmVersion::V1, chunk, 1, tp).forward;
    let hidden_bytes = if p.weight_dtype == "f32" { 4 } else { 2 };
    let sampler = graph_bs
        .saturating_mul(u64::from(p.vocab_size))
        .saturating_mul(SAMPLER_BYTES_PER_LOGIT)
        .saturating_add(
            chunk
                .saturating_mul(u64::from(p.embedding_length))
                .saturating_mul(hidden_bytes),
        );
    let compute = forward.max(sampler);

    let graphs = if o.disable_cuda_graph {
        0
    } else {
        graph_bs.saturating_mul(GRAPH_BYTES_PER_BATCH)
    };
    // ReqToTokenPool: int32 token indexes of (requests + 1) × (context + 4).
    let req_to_token = (REQ_TO_TOKEN_REQUESTS + 1)
        .saturating_mul(len.saturating_add(4))
        .saturating_mul(4);
    let nccl = if n_gpus > 1 { o.multi_gpu_bytes } else { 0 };
    let before = o.cuda_context_bytes.saturating_add(nccl);
    let outside = compute.saturating_add(graphs).saturating_add(req_to_token);
    let overhead = before.saturating_add(graphs).saturating_add(req_to_token);

    let gpus = vec![GpuMemory::new(weights, kv, compute, overhead); n_gpus];
    let claim = Claim {
        before_bytes: before,
        leave: match o.mem_fraction_static {
            Some(_) => LeaveTiers::default(),
            None => default_leave(o),
        },
        ..Claim::new(o.mem_fraction_static.unwrap_or(FALLBACK_FRACTION), outside)
    };
    notes.push(
        "the KV pool grows to fill mem_fraction_static of the memory free at start; the totals \
         are the minimum to start"
            .into(),
    );
    if o.mem_fraction_static.is_none()
        || o.chunked_prefill_size.is_none()
        || o.cuda_graph_max_bs.is_none()
    {
        notes.push(format!(
            "SGLang picks its memory settings by the GPU's size; the terms above take its \
             defaults for 80 GiB GPUs ({chunk}-token prefill chunks, CUDA graphs up to batch \
             {graph_bs}), the claim each GPU's own"
        ));
    }
    if p.attention.sliding_window.is_some() {
        notes.push("sliding-window layers are sized for the whole context".into());
    }
    if !p.weights.exact {
        notes.push("weight sizes derived from the parameter count, not read from files".into());
    }
    if tp > 1 && !p.supports_tensor_parallel(tp as u32) {
        notes.push(format!(
            "tensor parallel size {tp} does not divide the model's {} attention heads / {} KV heads",
            p.attention.heads, p.attention.kv_heads
        ));
    }
    Estimate {
        backend: Backend::Sglang,
        context: len,
        gpus,
        host_bytes: 0,
        claim: Some(claim),
        notes,
    }
}

/// SGLang's `mem_fraction_static` when the GPU's size is unknown.
const FALLBACK_FRACTION: f64 = 0.88;

/// What SGLang leaves out of its static share, per size class of GPU, when it picks
/// `mem_fraction_static` itself. Within a class only the 10 GiB floor above 60 GiB varies,
/// which the 60–90 GiB class always meets.
fn default_leave(o: &SglangOptions) -> LeaveTiers {
    SGLANG_GPU_CLASSES
        .iter()
        .map(|c| {
            // Any size in the class gives its reserve: take the smallest.
            let lower = SGLANG_GPU_CLASSES
                .iter()
                .map(|x| x.below_mib)
                .filter(|&b| b < c.below_mib)
                .max()
                .unwrap_or(0);
            #[expect(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "a reserve of a few GiB, in bytes"
            )]
            let leave = (o.default_reserve_mib(lower + 1) * MIB as f64).ceil() as u64;
            LeaveTier {
                below_bytes: c.below_mib.saturating_mul(MIB),
                leave_bytes: leave,
            }
        })
        .collect::<Vec<_>>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::super::estimate as run;
    use super::*;
    use crate::estimate::tests::llama3_8b;
    use berth_options::{EstimateOptions, GIB, SglangKvDtype};

    fn est(p: &ModelProfile, o: SglangOptions) -> Estimate {
        run(p, &EstimateOptions::Sglang(o)).unwrap()
    }

    #[test]
    fn the_kv_pool_holds_the_context_token_by_token() {
        let p = llama3_8b();
        // 32 layers × 8 KV heads × (128 + 128) × 2 bytes: 128 KiB per token, no pages.
        assert_eq!(cell_size(&p, &SglangOptions::default()), 131_072);
        let e = est(
            &p,
            SglangOptions {
                context_length: Some(8193),
                ..SglangOptions::default()
            },
        );
        assert_eq!(e.gpus[0].kv_cache, 8193 * 131_072);
        let two = est(
            &p,
            SglangOptions {
                tensor_parallel: 2,
                kv_cache_dtype: SglangKvDtype::Fp8E4m3,
                ..SglangOptions::default()
            },
        );
        assert_eq!(two.gpu_count(), 2);
        assert_eq!(two.gpus[0].kv_cache, 8192 * 131_072 / 4);
        assert_eq!(two.gpus[0].weights, p.weights.total.div_ceil(2));
    }

    #[test]
    fn the_share_is_taken_of_what_is_free_after_the_context() {
        let p = llama3_8b();
        let e = est(
            &p,
            SglangOptions {
                mem_fraction_static: Some(0.8),
                ..SglangOptions::default()
            },
        );
        let g = e.gpus[0];
        let c = e.claim.unwrap();
        assert_eq!(c.before_bytes, 512 * MIB);
        // The KV pool SGLang allocates (profile_max_num_token): 0.8 of the memory free after
        // the context, less the weights.
        let t = 80 * GIB;
        let free = t - 512 * MIB;
        let pool = (free as f64 * 0.8).ceil() as u64 - g.weights;
        assert_eq!(e.kv_room_on(t), Some(pool));
        // Activations, graphs and the request table live in the rest of the GPU, which berth
        // reserves as well: the claim is SGLang's whole footprint.
        assert_eq!(
            e.claim_on(t),
            512 * MIB + (free as f64 * 0.8).ceil() as u64 + g.compute + g.overhead - 512 * MIB
        );
        // Graphs at SGLang's own 2 MiB per batch size (256 on an 80 GiB GPU at TP 1).
        let eager = est(
            &p,
            SglangOptions {
                disable_cuda_graph: true,
                ..SglangOptions::default()
            },
        );
        assert_eq!(g.overhead - eager.gpus[0].overhead, 512 * MIB);
    }

    #[test]
    fn without_a_fraction_each_gpu_gets_sglangs_own_default() {
        let p = llama3_8b();
        let e = est(&p, SglangOptions::default());
        let c = e.claim.unwrap();
        let o = SglangOptions::default();
        for mib in [15_360u64, 24_564, 46_068, 81_559, 143_771, 183_359] {
            assert_eq!(
                c.fraction_on(mib * MIB),
                o.resolved_mem_fraction_static(mib * MIB),
                "{mib} MiB"
            );
        }
        // An 8B model in bf16 fits a 24 GiB card at SGLang's share for it, not a T4.
        assert!(e.fits_gpu(24_564 * MIB, 24_564 * MIB));
        assert!(!e.fits_gpu(15_360 * MIB, 15_360 * MIB));
    }

    #[test]
    fn activation_is_one_prefill_chunk() {
        let p = llama3_8b();
        let e = est(
            &p,
            SglangOptions {
                chunked_prefill_size: Some(4096),
                cuda_graph_max_bs: Some(16),
                ..SglangOptions::default()
            },
        );
        let t = 4096u64;
        let forward = 3 * t * 4096 * 2 + t * 3 * 14336 * 2;
        assert_eq!(e.gpus[0].compute, forward);
        let graphs = 16 * 2 * MIB;
        let req = 2049 * (8192 + 4) * 4;
        assert_eq!(e.gpus[0].overhead, 512 * MIB + graphs + req);
    }
}
