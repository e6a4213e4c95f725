//! Memory estimates: how many bytes an instance needs on each GPU, by backend.
//!
//! Every formula and its public source is in `docs/estimation.md`. The estimators are pure
//! functions of a [`ModelProfile`] and the backend's options.

mod llama_cpp;
mod sglang;
mod vllm;

use berth_fit::{Claim, Shape, gib};
use berth_options::{
    EstimateError, EstimateOptions, LlamaCppOptions, MAX_CONTEXT, ModelProfile, SglangOptions,
    VllmOptions,
};
use serde::{Deserialize, Serialize};
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    LlamaCpp,
    Vllm,
    Sglang,
    Custom,
}

/// What one GPU holds, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuMemory {
    pub weights: u64,
    pub kv_cache: u64,
    /// llama.cpp compute buffers; vLLM activation peak.
    pub compute: u64,
    /// CUDA context and library workspaces; vLLM non-torch memory and CUDA graphs.
    pub overhead: u64,
    pub total: u64,
}

impl GpuMemory {
    pub(crate) fn new(weights: u64, kv_cache: u64, compute: u64, overhead: u64) -> Self {
        Self {
            weights,
            kv_cache,
            compute,
            overhead,
            total: weights
                .saturating_add(kv_cache)
                .saturating_add(compute)
                .saturating_add(overhead),
        }
    }
}

/// A memory estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub backend: Backend,
    /// Context the KV cache is sized for, tokens (llama.cpp `n_ctx`, vLLM `max_model_len`).
    pub context: u64,
    /// The minimum each GPU must hold, one entry per GPU used.
    pub gpus: Vec<GpuMemory>,
    /// Bytes left in host memory (weights and KV of layers not offloaded, input embeddings).
    pub host_bytes: u64,
    /// When set, the instance takes this share of each GPU whatever it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<Claim>,
    /// Assumptions worth knowing, in words.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Estimates the memory `profile` needs under `opts`. Both may come from outside (a start
/// command), so both are checked first; the arithmetic saturates rather than overflows.
pub fn estimate(profile: &ModelProfile, opts: &EstimateOptions) -> Result<Estimate, EstimateError> {
    profile
        .validate()
        .map_err(|e| EstimateError::InvalidProfile(e.to_string()))?;
    opts.validate()?;
    Ok(match opts {
        EstimateOptions::LlamaCpp(o) => llama_cpp::estimate(profile, o),
        EstimateOptions::Vllm(o) => vllm::estimate(profile, o),
        EstimateOptions::Sglang(o) => sglang::estimate(profile, o),
        EstimateOptions::Custom(c) => Estimate {
            backend: Backend::Custom,
            context: profile.context_length,
            gpus: vec![GpuMemory::new(0, 0, 0, c.bytes_per_gpu); c.gpus.max(1) as usize],
            host_bytes: 0,
            claim: None,
            notes: vec!["explicit claim, not estimated".into()],
        },
    })
}

/// The largest context (llama.cpp `n_ctx`, vLLM `max_model_len`) at which `profile` under
/// `options` fits GPUs of `gpu_total_bytes` each, as [`Estimate::fits_gpu`] judges a free GPU:
/// for vLLM the longest request the KV cache left in its share can hold, for llama.cpp the
/// largest `-c` whose buffers fit. Searched up to the model's trained context (the longest
/// vLLM accepts), or [`MAX_CONTEXT`] when the model states none; `None` when not even one
/// token fits. Custom claims have no context to size.
pub fn context_that_fits(
    profile: &ModelProfile,
    options: &EstimateOptions,
    gpu_total_bytes: u64,
) -> Result<Option<u64>, EstimateError> {
    let with = |ctx: u64| -> Result<bool, EstimateError> {
        let o = with_context(options, ctx).ok_or_else(|| {
            EstimateError::InvalidOptions("a custom claim has no context to fit".into())
        })?;
        Ok(estimate(profile, &o)?.fits_gpu(gpu_total_bytes, gpu_total_bytes))
    };
    let cap = match profile.context_length {
        0 => MAX_CONTEXT,
        c => c.min(MAX_CONTEXT),
    };
    if with(cap)? {
        return Ok(Some(cap));
    }
    if !with(1)? {
        return Ok(None);
    }
    // The need grows with the context: the largest fitting one lies in [lo, hi).
    let (mut lo, mut hi) = (1, cap);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if with(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

/// `options` with the context set to `ctx`; `None` for a custom claim, which has none.
fn with_context(options: &EstimateOptions, ctx: u64) -> Option<EstimateOptions> {
    match options {
        EstimateOptions::LlamaCpp(l) => Some(EstimateOptions::LlamaCpp(LlamaCppOptions {
            context: Some(ctx),
            ..l.clone()
        })),
        EstimateOptions::Vllm(v) => Some(EstimateOptions::Vllm(VllmOptions {
            max_model_len: Some(ctx),
            ..v.clone()
        })),
        EstimateOptions::Sglang(s) => Some(EstimateOptions::Sglang(SglangOptions {
            context_length: Some(ctx),
            ..s.clone()
        })),
        EstimateOptions::Custom(_) => None,
    }
}

impl Estimate {
    /// GPUs the instance uses.
    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    /// The largest per-GPU minimum: what every chosen GPU must have free when all GPUs of a
    /// placement are asked for the same amount.
    pub fn max_per_gpu(&self) -> u64 {
        self.gpus.iter().map(|g| g.total).max().unwrap_or(0)
    }

    /// Sum over the GPUs.
    pub fn total(&self) -> GpuMemory {
        let mut t = GpuMemory::default();
        for g in &self.gpus {
            t.weights = t.weights.saturating_add(g.weights);
            t.kv_cache = t.kv_cache.saturating_add(g.kv_cache);
            t.compute = t.compute.saturating_add(g.compute);
            t.overhead = t.overhead.saturating_add(g.overhead);
            t.total = t.total.saturating_add(g.total);
        }
        t
    }

    /// What the instance reserves on a GPU with `gpu_total_bytes` of memory: the claimed
    /// share when the backend claims one (and the share holds the need), else the estimate.
    pub fn claim_on(&self, gpu_total_bytes: u64) -> u64 {
        self.shape(String::new())
            .need_on(gpu_total_bytes)
            .unwrap_or_else(|| self.max_per_gpu())
    }

    /// Whether the instance can start on a GPU with `gpu_total_bytes` of memory of which
    /// `free_bytes` are free: the claim must be free, and for a claiming backend the
    /// estimate must fit inside the claimed share (vLLM refuses to start otherwise).
    pub fn fits_gpu(&self, gpu_total_bytes: u64, free_bytes: u64) -> bool {
        self.shape(String::new())
            .need_on(gpu_total_bytes)
            .is_some_and(|need| need <= free_bytes)
    }

    /// For a claiming backend, the KV cache it allocates on each GPU of `gpu_total_bytes`
    /// (the least over the GPUs): the claimed share less everything but the minimum KV
    /// cache. This is what vLLM logs as "Available KV cache memory". `None` without a claim,
    /// or when the share cannot hold the rest.
    pub fn kv_room_on(&self, gpu_total_bytes: u64) -> Option<u64> {
        let share = self.claim?.share_of(gpu_total_bytes);
        self.gpus
            .iter()
            .map(|g| share.checked_sub(g.total.saturating_sub(g.kv_cache)))
            .try_fold(u64::MAX, |least, room| room.map(|r| least.min(r)))
            .filter(|_| !self.gpus.is_empty())
    }

    /// The placement shape of this estimate on one worker: as many GPUs as it uses, each
    /// with the largest per-GPU need free (or the claimed share, for a claiming backend).
    pub fn shape(&self, label: String) -> Shape {
        Shape {
            claim: self.claim,
            label,
            ..Shape::new(
                self.max_per_gpu(),
                u32::try_from(self.gpu_count()).unwrap_or(u32::MAX),
            )
        }
    }

    /// The breakdown as a plain-text table.
    pub fn to_table(&self) -> String {
        let header = ["GPU", "weights", "KV cache", "compute", "overhead", "total"];
        let mut rows: Vec<[String; 6]> = self
            .gpus
            .iter()
            .enumerate()
            .map(|(i, g)| {
                [
                    i.to_string(),
                    gib(g.weights),
                    gib(g.kv_cache),
                    gib(g.compute),
                    gib(g.overhead),
                    gib(g.total),
                ]
            })
            .collect();
        if self.gpus.len() > 1 {
            let t = self.total();
            rows.push([
                "all".into(),
                gib(t.weights),
                gib(t.kv_cache),
                gib(t.compute),
                gib(t.overhead),
                gib(t.total),
            ]);
        }
        let mut width = header.map(str::len);
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &[String]| {
            for (i, (c, w)) in cells.iter().zip(width).enumerate() {
                if i == 0 {
                    let _ = write!(out, "{c:<w$}");
                } else {
                    let _ = write!(out, "  {c:>w$}");
                }
            }
            out.push('\n');
        };
        line(&mut out, &header.map(String::from));
        for r in &rows {
            line(&mut out, r);
        }
        let backend = match self.backend {
            Backend::LlamaCpp => "llama.cpp",
            Backend::Vllm => "vLLM",
            Backend::Sglang => "SGLang",
            Backend::Custom => "custom",
        };
        let _ = writeln!(out, "backend {backend}, context {} tokens", self.context);
        if self.host_bytes > 0 {
            let _ = writeln!(out, "host memory: {}", gib(self.host_bytes));
        }
        if let Some(c) = self.claim {
            if !c.leave.is_empty() {
                let _ = write!(out, "claims a share of each GPU by its size");
            } else if c.before_bytes > 0 {
                let _ = write!(
                    out,
                    "claims {} + {:.1}% of the rest of each GPU",
                    gib(c.before_bytes),
                    c.fraction * 100.0
                );
            } else {
                let _ = write!(out, "claims {:.0}% of each GPU", c.fraction * 100.0);
            }
            if c.extra_bytes > 0 {
                let _ = write!(out, " + {}", gib(c.extra_bytes));
            }
            let _ = writeln!(out, " (needs at least the totals above)");
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        out
    }
}

/// The widest feed-forward intermediate one token passes through: the dense MLP, or for
/// MoE layers the routed experts' width times the experts per token plus the shared
/// experts (the larger when some layers stay dense).
pub(crate) fn ffn_width_per_token(p: &ModelProfile) -> u64 {
    let dense = u64::from(p.feed_forward_length);
    match p.experts {
        None => dense,
        Some(e) => {
            let moe = u64::from(e.expert_width(p.feed_forward_length))
                .saturating_mul(u64::from(e.used.max(1)))
                .saturating_add(u64::from(e.shared_feed_forward_length.unwrap_or(0)));
            if e.dense_layers > 0 {
                moe.max(dense)
            } else {
                moe
            }
        }
    }
}

pub(crate) fn pad(x: u64, to: u64) -> u64 {
    if to == 0 {
        return x;
    }
    x.div_ceil(to).saturating_mul(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_options::{
        CustomClaim, ExplicitProfile, FlashAttention, GIB, KvCacheType, LlamaCppOptions, MAX_BATCH,
        MAX_CONTEXT, VllmKvDtype, VllmOptions, VllmVersion, WeightDtype,
    };

    pub(crate) fn llama3_8b() -> ModelProfile {
        ExplicitProfile {
            parameters: 8_030_261_248,
            dtype: WeightDtype::Bf16,
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            context_length: 8192,
            heads: Some(32),
            hidden_size: Some(4096),
            intermediate_size: Some(14336),
            vocab_size: Some(128_256),
            weight_bytes: None,
            name: Some("Llama-3-8B".into()),
        }
        .to_profile()
        .unwrap()
    }

    #[test]
    fn custom_claims_pass_through() {
        let e = estimate(
            &llama3_8b(),
            &EstimateOptions::Custom(CustomClaim {
                bytes_per_gpu: 5 * GIB,
                gpus: 2,
                ..CustomClaim::default()
            }),
        )
        .unwrap();
        assert_eq!(e.gpu_count(), 2);
        assert_eq!(e.max_per_gpu(), 5 * GIB);
        assert_eq!(e.total().total, 10 * GIB);
        let s = e.shape("x".into());
        assert_eq!(
            (s.vram_per_gpu, s.gpus_per_worker, s.workers),
            (5 * GIB, 2, 1)
        );
    }

    #[test]
    fn claims_and_fits() {
        let mut e = estimate(
            &llama3_8b(),
            &EstimateOptions::Custom(CustomClaim {
                bytes_per_gpu: 20 * GIB,
                gpus: 1,
                ..CustomClaim::default()
            }),
        )
        .unwrap();
        assert!(e.fits_gpu(80 * GIB, 20 * GIB));
        assert!(!e.fits_gpu(80 * GIB, 20 * GIB - 1));
        e.claim = Some(Claim::new(0.5, GIB));
        assert_eq!(e.claim_on(80 * GIB), 41 * GIB);
        // Never below the need, but then it does not fit inside the share.
        assert_eq!(e.claim_on(24 * GIB), 20 * GIB);
        assert!(!e.fits_gpu(24 * GIB, 24 * GIB));
        assert!(e.fits_gpu(80 * GIB, 41 * GIB));
        assert!(!e.fits_gpu(80 * GIB, 40 * GIB));
        assert_eq!(e.shape(String::new()).need_on(80 * GIB), Some(41 * GIB));
        assert_eq!(e.shape(String::new()).need_on(24 * GIB), None);
    }

    #[test]
    fn options_from_json() {
        let o: EstimateOptions = serde_json::from_str(
            r#"{"backend": "llama_cpp", "context": 4096, "cache_type_k": "q8_0"}"#,
        )
        .unwrap();
        let EstimateOptions::LlamaCpp(l) = &o else {
            panic!("{o:?}")
        };
        assert_eq!(l.context, Some(4096));
        assert_eq!(l.cache_type_k, KvCacheType::Q8_0);
        assert_eq!(l.cache_type_v, KvCacheType::F16);
        let o: EstimateOptions = serde_json::from_str(
            r#"{"backend": "vllm", "tensor_parallel": 2, "kv_cache_dtype": "fp8"}"#,
        )
        .unwrap();
        let EstimateOptions::Vllm(v) = &o else {
            panic!("{o:?}")
        };
        assert_eq!((v.tensor_parallel, v.kv_cache_dtype), (2, VllmKvDtype::Fp8));
        let o: EstimateOptions =
            serde_json::from_str(r#"{"backend": "custom", "bytes_per_gpu": 100}"#).unwrap();
        assert_eq!(
            o,
            EstimateOptions::Custom(CustomClaim {
                bytes_per_gpu: 100,
                gpus: 1,
                ..CustomClaim::default()
            })
        );
        assert!(serde_json::from_str::<EstimateOptions>(r#"{"backend": "tgi"}"#).is_err());
    }

    #[test]
    fn hostile_inputs_are_refused() {
        let p = llama3_8b();
        let huge = |o| estimate(&p, &o).unwrap_err();
        for o in [
            EstimateOptions::LlamaCpp(LlamaCppOptions {
                gpus: u32::MAX,
                ..LlamaCppOptions::default()
            }),
            EstimateOptions::LlamaCpp(LlamaCppOptions {
                ubatch: 0,
                ..LlamaCppOptions::default()
            }),
            EstimateOptions::Vllm(VllmOptions {
                tensor_parallel: u32::MAX,
                pipeline_parallel: u32::MAX,
                ..VllmOptions::default()
            }),
            EstimateOptions::Vllm(VllmOptions {
                gpu_memory_utilization: Some(f64::NAN),
                ..VllmOptions::default()
            }),
            EstimateOptions::Vllm(VllmOptions {
                max_model_len: Some(u64::MAX),
                ..VllmOptions::default()
            }),
            EstimateOptions::Vllm(VllmOptions {
                max_num_seqs: Some(0),
                ..VllmOptions::default()
            }),
            EstimateOptions::Custom(CustomClaim {
                bytes_per_gpu: 1,
                gpus: u32::MAX,
                ..CustomClaim::default()
            }),
        ] {
            assert!(matches!(huge(o), EstimateError::InvalidOptions(_)));
        }
        let mut bad = p.clone();
        bad.layers = u32::MAX;
        let o = EstimateOptions::LlamaCpp(LlamaCppOptions::default());
        assert!(matches!(
            estimate(&bad, &o),
            Err(EstimateError::InvalidProfile(_))
        ));
        let mut bad = p.clone();
        bad.weights.layers = vec![1; 3];
        assert!(estimate(&bad, &o).is_err());
        // Extreme but accepted values saturate instead of overflowing.
        let mut big = p.clone();
        big.embedding_length = u32::MAX;
        big.feed_forward_length = u32::MAX;
        big.vocab_size = u32::MAX;
        big.experts = Some(berth_options::Experts {
            count: u32::MAX,
            used: u32::MAX,
            feed_forward_length: Some(u32::MAX),
            shared_feed_forward_length: Some(u32::MAX),
            dense_layers: 1,
        });
        big.context_length = MAX_CONTEXT;
        for o in [
            EstimateOptions::LlamaCpp(LlamaCppOptions {
                flash_attention: FlashAttention::Off,
                ubatch: MAX_BATCH,
                ..LlamaCppOptions::default()
            }),
            EstimateOptions::Vllm(VllmOptions {
                max_num_batched_tokens: Some(MAX_BATCH),
                max_num_seqs: Some(MAX_BATCH),
                non_torch_bytes: u64::MAX,
                ..VllmOptions::default()
            }),
            EstimateOptions::Vllm(VllmOptions {
                vllm_version: VllmVersion::V0,
                tensor_parallel: 4,
                ..VllmOptions::default()
            }),
        ] {
            let e = estimate(&big, &o).unwrap();
            assert!(e.max_per_gpu() > 1 << 60, "{e:?}");
        }
    }

    #[test]
    fn the_context_that_fits() {
        let mut p = llama3_8b();
        p.context_length = 131_072;
        let gib24 = 24 * GIB;
        let at = |o: &EstimateOptions, ctx: u64| {
            estimate(&p, &with_context(o, ctx).unwrap())
                .unwrap()
                .fits_gpu(gib24, gib24)
        };
        for o in [
            EstimateOptions::Vllm(VllmOptions::default()),
            EstimateOptions::LlamaCpp(LlamaCppOptions::default()),
        ] {
            let ctx = context_that_fits(&p, &o, gib24).unwrap().unwrap();
            assert!(ctx < 131_072, "{ctx}");
            assert!(at(&o, ctx) && !at(&o, ctx + 1), "{ctx}");
        }
        // vLLM: the longest request the KV cache left in the share holds, to a block.
        let v = EstimateOptions::Vllm(VllmOptions::default());
        let ctx = context_that_fits(&p, &v, gib24).unwrap().unwrap();
        assert_eq!(ctx % 16, 0);
        let room = estimate(&p, &v).unwrap().kv_room_on(gib24).unwrap();
        assert_eq!(ctx, room / 131_072 / 16 * 16);
        // llama.cpp: to llama.cpp's 256-cell padding.
        let l = EstimateOptions::LlamaCpp(LlamaCppOptions::default());
        assert_eq!(context_that_fits(&p, &l, gib24).unwrap().unwrap() % 256, 0);
        // The trained context caps it; a GPU too small fits nothing.
        assert_eq!(context_that_fits(&p, &v, 141 * GIB).unwrap(), Some(131_072));
        assert_eq!(context_that_fits(&p, &v, 8 * GIB).unwrap(), None);
        assert!(
            context_that_fits(&p, &EstimateOptions::Custom(CustomClaim::default()), gib24).is_err()
        );
    }

    #[test]
    fn table_and_json() {
        let e = estimate(
            &llama3_8b(),
            &EstimateOptions::LlamaCpp(LlamaCppOptions {
                gpus: 2,
                ..LlamaCppOptions::default()
            }),
        )
        .unwrap();
        let t = e.to_table();
        assert!(t.starts_with("GPU"), "{t}");
        assert!(t.contains("\nall "), "{t}");
        assert!(t.contains("backend llama.cpp, context 8192 tokens"), "{t}");
        let j = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Estimate>(&j).unwrap(), e);
    }
}
