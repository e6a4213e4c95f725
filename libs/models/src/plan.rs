//! The ways an instance can run: from a profile, backend options and how far the caller lets
//! the search scale, the [`Shape`]s the placement search tries, most preferred first.
//!
//! - On one worker: the backend's own GPU count, or with [`Scaling::max_gpus`] every count
//!   up to it the backend can split the model over (vLLM, SGLang: tensor-parallel sizes the
//!   attention and KV heads divide over; llama.cpp: layer splits).
//! - On several workers, when [`Scaling::max_workers`] allows: one pipeline stage per
//!   worker, llama.cpp only (its RPC servers on the followers hold their layers). berth's
//!   agents cannot run vLLM or a custom server over several workers, so those get no such
//!   shape ([`workers_note`] says so in a "nothing fits" reason).
//! - llama.cpp partial offload, when [`Scaling::partial_offload`] allows and no full offload
//!   fits: fewer layers on the GPU, the rest in host memory.

use crate::estimate;
use berth_fit::Shape;
use berth_options::{EstimateError, EstimateOptions, MAX_GPUS, ModelProfile, Scaling};

/// Partial-offload steps tried (fractions of the layers, largest first).
const OFFLOAD_STEPS: u32 = 8;

/// The shapes to try for `profile` under `options` and `scaling`, most preferred first:
/// fewest GPUs on one worker, then more GPUs, then several workers, then partial offload.
pub fn shapes(
    profile: &ModelProfile,
    options: &EstimateOptions,
    scaling: &Scaling,
) -> Result<Vec<Shape>, EstimateError> {
    scaling.validate()?;
    // The options as given must be valid even when the search overrides their GPU count.
    let own = estimate(profile, options)?;
    let mut out = Vec::new();
    match options {
        EstimateOptions::Custom(_) => out.push(own.shape(String::new())),
        EstimateOptions::Vllm(o) => {
            let tps = match scaling.max_gpus {
                Some(max) => tensor_parallel_sizes(profile, max),
                None => vec![o.tensor_parallel],
            };
            // Pipeline stages only within the worker, as the options ask.
            let pp = if scaling.max_gpus.is_some() {
                1
            } else {
                o.pipeline_parallel.max(1)
            };
            for &tp in &tps {
                if u64::from(tp) * u64::from(pp) > u64::from(MAX_GPUS) {
                    continue;
                }
                let mut v = o.clone();
                v.tensor_parallel = tp;
                v.pipeline_parallel = pp;
                let e = estimate(profile, &EstimateOptions::Vllm(v))?;
                let label = match pp {
                    1 => format!("tp={tp}"),
                    pp => format!("tp={tp} pp={pp}"),
                };
                out.push(Shape {
                    gpus_per_worker: tp * pp,
                    ..e.shape(label)
                });
            }
        }
        EstimateOptions::Sglang(o) => {
            let tps = match scaling.max_gpus {
                Some(max) => tensor_parallel_sizes(profile, max),
                None => vec![o.tensor_parallel],
            };
            for &tp in &tps {
                let mut s = o.clone();
                s.tensor_parallel = tp;
                let e = estimate(profile, &EstimateOptions::Sglang(s))?;
                out.push(e.shape(format!("tp={tp}")));
            }
        }
        EstimateOptions::LlamaCpp(o) => {
            let counts: Vec<u32> = match scaling.max_gpus {
                Some(max) => (1..=max.min(profile.layers.max(1))).collect(),
                None => vec![o.gpus.max(1)],
            };
            for workers in 1..=scaling.workers() {
                for &g in &counts {
                    let total = g * workers;
                    if total > profile.layers.max(1) || total > MAX_GPUS {
                        break;
                    }
                    let mut l = o.clone();
                    l.gpus = total;
                    let e = estimate(profile, &EstimateOptions::LlamaCpp(l))?;
                    let label = match workers {
                        1 if g == 1 => "1 GPU".to_owned(),
                        1 => format!("split over {g} GPUs"),
                        w => format!("split over {w} workers × {g} GPUs"),
                    };
                    out.push(Shape {
                        workers,
                        gpus_per_worker: g,
                        ..e.shape(label)
                    });
                }
            }
            if scaling.partial_offload && o.gpu_layers.is_none() && profile.layers > 1 {
                let n = profile.layers;
                let mut last = n + 1;
                for step in (1..OFFLOAD_STEPS).rev() {
                    let layers = (n * step / OFFLOAD_STEPS).max(1);
                    if layers >= last {
                        continue;
                    }
                    last = layers;
                    let mut l = o.clone();
                    l.gpus = counts.first().copied().unwrap_or(1);
                    l.gpu_layers = Some(layers);
                    let e = estimate(profile, &EstimateOptions::LlamaCpp(l.clone()))?;
                    out.push(e.shape(format!("{layers} of {n} layers on GPU")));
                }
            }
        }
    }
    Ok(out)
}

/// Why `options` get no shape over several workers although `scaling` allows them, for the
/// reason of a start that fits nowhere; `None` when they can have such shapes (llama.cpp).
pub fn workers_note(options: &EstimateOptions, scaling: &Scaling) -> Option<String> {
    let backend = match options {
        _ if scaling.workers() <= 1 => return None,
        EstimateOptions::LlamaCpp(_) => return None,
        EstimateOptions::Vllm(_) => "vLLM",
        EstimateOptions::Sglang(_) => "SGLang",
        EstimateOptions::Custom(_) => "a custom backend",
    };
    Some(format!(
        "{backend} cannot run over several workers, only llama.cpp can: max_workers {} not used",
        scaling.workers()
    ))
}

/// Tensor-parallel sizes up to `max` that vLLM accepts for this model: the attention heads
/// divide evenly, and the KV heads either divide evenly or are replicated a whole number of
/// times (tp a multiple of the KV heads). MLA models shard heads only.
fn tensor_parallel_sizes(p: &ModelProfile, max: u32) -> Vec<u32> {
    let heads = p.attention.heads;
    let kv = p.attention.kv_heads;
    (1..=max)
        .filter(|&tp| heads == 0 || heads.is_multiple_of(tp))
        .filter(|&tp| {
            p.attention.kv_lora_rank.is_some()
                || kv == 0
                || kv.is_multiple_of(tp)
                || tp.is_multiple_of(kv)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_options::{
        ExplicitProfile, LlamaCppOptions, MAX_SEARCH_WORKERS, VllmOptions, WeightDtype,
    };

    fn model(heads: u32, kv_heads: u32, layers: u32) -> ModelProfile {
        ExplicitProfile {
            parameters: 8_030_261_248,
            dtype: WeightDtype::Bf16,
            layers,
            kv_heads,
            head_dim: 128,
            context_length: 8192,
            heads: Some(heads),
            hidden_size: Some(4096),
            intermediate_size: Some(14336),
            vocab_size: Some(128_256),
            weight_bytes: None,
            name: None,
        }
        .to_profile()
        .unwrap()
    }

    fn labels(s: &[Shape]) -> Vec<&str> {
        s.iter().map(|s| s.label.as_str()).collect()
    }

    #[test]
    fn tp_sizes_divide_the_heads() {
        let p = model(32, 8, 32);
        assert_eq!(tensor_parallel_sizes(&p, 8), [1, 2, 4, 8]);
        assert_eq!(tensor_parallel_sizes(&p, 16), [1, 2, 4, 8, 16]);
        // 40 heads, 8 KV heads: 5 divides the heads but not the KV heads.
        assert_eq!(tensor_parallel_sizes(&model(40, 8, 32), 8), [1, 2, 4, 8]);
        // 28 heads, 4 KV heads: 7 fails on KV, 8 fails on the heads.
        assert_eq!(tensor_parallel_sizes(&model(28, 4, 32), 8), [1, 2, 4]);
    }

    #[test]
    fn only_llama_cpp_spreads_over_workers() {
        let scaling = Scaling {
            max_gpus: Some(1),
            max_workers: Some(2),
            partial_offload: false,
        };
        let vllm = EstimateOptions::Vllm(VllmOptions::default());
        let v = shapes(&model(32, 8, 32), &vllm, &scaling).unwrap();
        assert_eq!(labels(&v), ["tp=1"]);
        let why = workers_note(&vllm, &scaling).unwrap();
        assert!(
            why.contains("vLLM cannot run over several workers"),
            "{why}"
        );
        let llama = EstimateOptions::LlamaCpp(LlamaCppOptions::default());
        let l = shapes(&model(32, 8, 32), &llama, &scaling).unwrap();
        assert_eq!(labels(&l), ["1 GPU", "split over 2 workers × 1 GPUs"]);
        assert_eq!((l[1].workers, l[1].gpus_per_worker), (2, 1));
        assert!(l[1].vram_per_gpu < l[0].vram_per_gpu);
        assert_eq!(workers_note(&llama, &scaling), None);
        assert_eq!(workers_note(&vllm, &Scaling::default()), None);
    }

    #[test]
    fn vllm_search_gets_cheaper_per_gpu() {
        let o = EstimateOptions::Vllm(VllmOptions {
            gpu_memory_utilization: None,
            ..VllmOptions::default()
        });
        let s = shapes(
            &model(32, 8, 32),
            &o,
            &Scaling {
                max_gpus: Some(4),
                max_workers: None,
                partial_offload: false,
            },
        )
        .unwrap();
        assert_eq!(labels(&s), ["tp=1", "tp=2", "tp=4"]);
        for w in s.windows(2) {
            assert!(w[1].vram_per_gpu < w[0].vram_per_gpu, "{s:?}");
        }
        assert!(s.iter().all(|s| s.workers == 1));
    }

    #[test]
    fn fixed_options_give_one_shape_with_the_claim() {
        let o = EstimateOptions::Vllm(VllmOptions {
            tensor_parallel: 2,
            ..VllmOptions::default()
        });
        let s = shapes(&model(32, 8, 32), &o, &Scaling::default()).unwrap();
        assert_eq!(labels(&s), ["tp=2"]);
        assert_eq!(s[0].gpus_per_worker, 2);
        assert!(s[0].claim.is_some());
    }

    #[test]
    fn llama_cpp_splits_and_partial_offload() {
        let o = EstimateOptions::LlamaCpp(LlamaCppOptions::default());
        let s = shapes(
            &model(32, 8, 32),
            &o,
            &Scaling {
                max_gpus: Some(2),
                max_workers: None,
                partial_offload: true,
            },
        )
        .unwrap();
        assert_eq!(
            labels(&s),
            [
                "1 GPU",
                "split over 2 GPUs",
                "28 of 32 layers on GPU",
                "24 of 32 layers on GPU",
                "20 of 32 layers on GPU",
                "16 of 32 layers on GPU",
                "12 of 32 layers on GPU",
                "8 of 32 layers on GPU",
                "4 of 32 layers on GPU"
            ]
        );
        for w in s[2..].windows(2) {
            assert!(w[1].vram_per_gpu < w[0].vram_per_gpu, "{s:?}");
        }
    }

    #[test]
    fn bad_scaling_is_refused() {
        let o = EstimateOptions::LlamaCpp(LlamaCppOptions::default());
        for bad in [
            Scaling {
                max_gpus: Some(0),
                ..Scaling::default()
            },
            Scaling {
                max_workers: Some(MAX_SEARCH_WORKERS + 1),
                ..Scaling::default()
            },
        ] {
            assert!(matches!(
                shapes(&model(32, 8, 32), &o, &bad),
                Err(EstimateError::InvalidOptions(_))
            ));
        }
        assert!(serde_json::from_str::<Scaling>(r#"{"max_gpu": 2}"#).is_err());
    }
}
