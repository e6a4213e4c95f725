//! `berth estimate`: what a model needs on the GPUs, from its own files.

use anyhow::{Context, Result, bail};
use berth_fit::Request;
use berth_fit::Shape;
use berth_models::{
    EstimateOptions, FlashAttention, KvCacheType, LlamaCppOptions, Scaling, SglangKvDtype,
    SglangOptions, VllmOptions, VllmVersion, context_that_fits, estimate, profile_from_path,
    shapes, workers_note,
};
use clap::Args;
use std::path::PathBuf;

/// Backend options shared by `berth estimate` and `berth start --model-file`.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// The backend that will run the model.
    #[arg(long, default_value = "llama-cpp", value_parser = ["llama-cpp", "vllm", "sglang"])]
    backend: String,
    /// Context length in tokens (llama.cpp `--ctx-size`, vLLM `--max-model-len`, SGLang
    /// `--context-length`); default: the model's own.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=berth_models::MAX_CONTEXT))]
    ctx: Option<u64>,
    /// llama.cpp: layers to offload to the GPUs (default: all).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    gpu_layers: Option<u32>,
    /// llama.cpp: KV cache type for keys and values.
    #[arg(long, default_value = "f16", value_parser = ["f16", "q8_0", "q4_0"])]
    cache_type: String,
    /// vLLM, SGLang: tensor-parallel size.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    tp: Option<u32>,
    /// SGLang: `--mem-fraction-static`, weights and KV pool as a share of the memory free at
    /// start (0 < f < 1). Absent: SGLang's own default for each GPU's size and the TP size.
    #[arg(long, value_parser = parse_fraction)]
    mem_fraction_static: Option<f64>,
    /// SGLang: `--chunked-prefill-size` (default: SGLang's, by GPU size).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(berth_models::MAX_BATCH)))]
    chunked_prefill_size: Option<u32>,
    /// SGLang: `--cuda-graph-max-bs` (default: SGLang's, by GPU size and TP size).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(berth_models::MAX_BATCH)))]
    cuda_graph_max_bs: Option<u32>,
    /// SGLang: no CUDA graphs.
    #[arg(long)]
    disable_cuda_graph: bool,
    /// vLLM: fraction of each GPU the instance claims (0 < f <= 1). Absent: vLLM's own
    /// default, 0.9, as vLLM itself would take it. `none`: reserve only the estimate, and
    /// the agent makes vLLM claim exactly that.
    #[arg(long, value_parser = parse_share)]
    gpu_memory_utilization: Option<Share>,
    /// vLLM: no CUDA graphs.
    #[arg(long)]
    enforce_eager: bool,
    /// vLLM: the engine generation, `v1` (vLLM 0.8 and later, the default) or `v0`, or a
    /// release number such as 0.7.3.
    #[arg(long, value_parser = parse_from_str::<VllmVersion>)]
    vllm_version: Option<VllmVersion>,
    /// vLLM: `--max-num-seqs` (default: vLLM's, 1024 on GPUs of 70 GiB or more but A100s,
    /// else 256; V0 256).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(berth_models::MAX_BATCH)))]
    max_num_seqs: Option<u32>,
    /// vLLM: `--max-num-batched-tokens` (default: vLLM's, 8192 on GPUs of 70 GiB or more
    /// but A100s, else 2048; V0 depends on the context).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(berth_models::MAX_BATCH)))]
    max_num_batched_tokens: Option<u32>,
    /// llama.cpp: `--flash-attn` (auto, llama.cpp's default, on or off).
    #[arg(long, value_parser = parse_from_str::<FlashAttention>)]
    flash_attn: Option<FlashAttention>,
    /// llama.cpp: `--parallel`, sequences sharing the context (default 1, which
    /// llama-server runs as 4 slots over one cache).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(berth_models::MAX_BATCH)))]
    parallel: Option<u32>,
    /// llama.cpp: `--ubatch-size` (default 512).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(berth_models::MAX_BATCH)))]
    ubatch_size: Option<u32>,
}

fn parse_from_str<T: std::str::FromStr<Err = berth_models::EstimateError>>(
    s: &str,
) -> Result<T, String> {
    s.parse()
        .map_err(|e: berth_models::EstimateError| e.to_string())
}

/// What `--gpu-memory-utilization` asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Share {
    Fraction(f64),
    /// `none`: only the estimate.
    EstimateOnly,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(f > 0.0 && f < 1.0) {
        return Err(format!("{f} is not in (0, 1)"));
    }
    Ok(f)
}

fn parse_share(s: &str) -> Result<Share, String> {
    if s == "none" {
        return Ok(Share::EstimateOnly);
    }
    let f: f64 = s
        .parse()
        .map_err(|e| format!("{s:?}: {e} (a fraction, or none)"))?;
    if !(f > 0.0 && f <= 1.0) {
        return Err(format!("{f} is not in (0, 1]"));
    }
    Ok(Share::Fraction(f))
}

impl BackendArgs {
    /// Estimator options for `gpus` GPUs (llama.cpp split; vLLM uses --tp).
    pub fn options(&self, gpus: u32) -> Result<EstimateOptions> {
        let sglang_flags = self.mem_fraction_static.is_some()
            || self.chunked_prefill_size.is_some()
            || self.cuda_graph_max_bs.is_some()
            || self.disable_cuda_graph;
        if sglang_flags && self.backend != "sglang" {
            bail!(
                "--mem-fraction-static, --chunked-prefill-size, --cuda-graph-max-bs and \
                 --disable-cuda-graph are SGLang options; add --backend sglang"
            );
        }
        Ok(match self.backend.as_str() {
            "sglang" => {
                if self.flash_attn.is_some()
                    || self.parallel.is_some()
                    || self.ubatch_size.is_some()
                    || self.gpu_memory_utilization.is_some()
                    || self.vllm_version.is_some()
                    || self.max_num_seqs.is_some()
                    || self.max_num_batched_tokens.is_some()
                    || self.enforce_eager
                {
                    bail!(
                        "--backend sglang takes --tp, --ctx, --mem-fraction-static, \
                         --chunked-prefill-size, --cuda-graph-max-bs and --disable-cuda-graph"
                    );
                }
                EstimateOptions::Sglang(SglangOptions {
                    tensor_parallel: self.tp.unwrap_or(gpus),
                    context_length: self.ctx,
                    mem_fraction_static: self.mem_fraction_static,
                    chunked_prefill_size: self.chunked_prefill_size,
                    cuda_graph_max_bs: self.cuda_graph_max_bs,
                    kv_cache_dtype: SglangKvDtype::Auto,
                    disable_cuda_graph: self.disable_cuda_graph,
                    ..SglangOptions::default()
                })
            }
            "vllm" => {
                if self.flash_attn.is_some()
                    || self.parallel.is_some()
                    || self.ubatch_size.is_some()
                {
                    bail!("--flash-attn, --parallel and --ubatch-size are llama.cpp options");
                }
                EstimateOptions::Vllm(VllmOptions {
                    tensor_parallel: self.tp.unwrap_or(gpus),
                    max_model_len: self.ctx,
                    enforce_eager: self.enforce_eager,
                    vllm_version: self.vllm_version.unwrap_or_default(),
                    max_num_seqs: self.max_num_seqs,
                    max_num_batched_tokens: self.max_num_batched_tokens,
                    gpu_memory_utilization: match self.gpu_memory_utilization {
                        // What vLLM does without the flag.
                        None => VllmOptions::default().gpu_memory_utilization,
                        Some(Share::Fraction(f)) => Some(f),
                        Some(Share::EstimateOnly) => None,
                    },
                    ..Default::default()
                })
            }
            _ => {
                if self.tp.is_some()
                    || self.gpu_memory_utilization.is_some()
                    || self.vllm_version.is_some()
                    || self.max_num_seqs.is_some()
                    || self.max_num_batched_tokens.is_some()
                {
                    bail!(
                        "--tp, --gpu-memory-utilization, --vllm-version, --max-num-seqs and \
                         --max-num-batched-tokens are vLLM options; add --backend vllm"
                    );
                }
                let cache = match self.cache_type.as_str() {
                    "q8_0" => KvCacheType::Q8_0,
                    "q4_0" => KvCacheType::Q4_0,
                    _ => KvCacheType::F16,
                };
                let defaults = LlamaCppOptions::default();
                EstimateOptions::LlamaCpp(LlamaCppOptions {
                    context: self.ctx,
                    gpu_layers: self.gpu_layers,
                    gpus,
                    cache_type_k: cache,
                    cache_type_v: cache,
                    flash_attention: self.flash_attn.unwrap_or_default(),
                    parallel: self.parallel.unwrap_or(defaults.parallel),
                    ubatch: self.ubatch_size.unwrap_or(defaults.ubatch),
                    ..defaults
                })
            }
        })
    }
}

/// How far the placement search may scale a model, shared by `berth estimate` and
/// `berth start --model-file`.
#[derive(Debug, Clone, Args)]
pub struct ScalingArgs {
    /// Try every GPU count up to this many on one worker that the model can be split over
    /// (vLLM tensor-parallel sizes), fewest first.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(berth_models::MAX_SEARCH_GPUS)))]
    max_gpus: Option<u32>,
    /// Allow spreading the model over up to this many workers (one pipeline stage each)
    /// when it fits on no single worker.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=i64::from(berth_models::MAX_SEARCH_WORKERS)))]
    max_workers: Option<u32>,
    /// llama.cpp: keep some layers in host memory when no full offload fits.
    #[arg(long)]
    partial_offload: bool,
}

impl ScalingArgs {
    /// The scaling asked for, `None` when no flag was given.
    pub fn scaling(&self) -> Option<Scaling> {
        (self.max_gpus.is_some() || self.max_workers.is_some() || self.partial_offload).then_some(
            Scaling {
                max_gpus: self.max_gpus,
                max_workers: self.max_workers,
                partial_offload: self.partial_offload,
            },
        )
    }
}

#[derive(Debug, Args)]
pub struct EstimateArgs {
    /// A GGUF file, or a Hugging Face model directory (config.json + safetensors or index).
    path: PathBuf,
    /// GPUs to split over (llama.cpp); vLLM uses --tp.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    gpus: u32,
    #[command(flatten)]
    backend: BackendArgs,
    /// With these, also list the shapes the placement search would try, in order.
    #[command(flatten)]
    scaling: ScalingArgs,
    /// Also find the largest context (llama.cpp `--ctx-size`, vLLM `--max-model-len`) that
    /// fits GPUs of this size ("80GiB"), with these options and GPU count.
    #[arg(long, value_parser = parse_size)]
    fit_context: Option<u64>,
    /// Does it fit on these GPUs? One worker's GPUs per value, as comma-separated groups of
    /// COUNTxSIZE (2x80GiB) or NAME[:COUNT] (H100:4); repeat for several workers. Answers
    /// with the shape and GPUs berth would choose, or why nothing fits.
    #[arg(long, value_name = "GPUS")]
    on: Vec<String>,
    /// With --on: look GPU names up in this agent inventory (ops/inventory/*.toml format)
    /// instead of berth's table of common GPUs.
    #[arg(long, value_name = "FILE", requires = "on")]
    inventory: Option<PathBuf>,
    /// Does it fit on the live cluster now? Reads the workers and their free GPU memory
    /// from PostgreSQL (--database-url / BERTH_DATABASE_URL).
    #[arg(long, conflicts_with = "on")]
    cluster: bool,
    /// Print JSON (profile and estimate) instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let b = berth_proto::size::parse_bytes(s)?;
    u64::try_from(b)
        .ok()
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("{s:?} must be positive"))
}

pub async fn run(args: &EstimateArgs, database_url: &str) -> Result<()> {
    let names = match &args.inventory {
        Some(path) => crate::fit_here::GpuNames::from_inventory(path)?,
        None => crate::fit_here::GpuNames::default(),
    };
    let on = args
        .on
        .iter()
        .map(|spec| crate::fit_here::parse_worker(spec, &names).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let profile = profile_from_path(&args.path)
        .with_context(|| format!("reading model {}", args.path.display()))?;
    let options = args.backend.options(args.gpus)?;
    let est = estimate(&profile, &options)?;
    let scaling = args.scaling.scaling();
    let shapes = scaling
        .as_ref()
        .map(|s| shapes(&profile, &options, s))
        .transpose()?;
    let note = scaling.as_ref().and_then(|s| workers_note(&options, s));
    // The request an analyzer builds for a start with these options (needs.rs), placed on
    // the GPUs asked about.
    let workers = if args.cluster {
        Some(crate::fit_here::workers_in_cluster(database_url).await?)
    } else if on.is_empty() {
        None
    } else {
        Some(crate::fit_here::workers_on(&on))
    };
    let placed = match workers {
        Some(workers) => {
            let scaling = scaling.clone().unwrap_or_default();
            let request = Request {
                shapes: berth_models::shapes(&profile, &options, &scaling)?,
                note: workers_note(&options, &scaling),
                ..Request::default()
            };
            Some(crate::fit_here::answer(&workers, &request))
        }
        None => None,
    };
    let fit = args
        .fit_context
        .map(|gpu| context_that_fits(&profile, &options, gpu).map(|ctx| (gpu, ctx)))
        .transpose()?;
    if args.json {
        let mut doc =
            serde_json::json!({ "profile": profile, "options": options, "estimate": est });
        if let Some(shapes) = &shapes {
            doc["shapes"] = serde_json::to_value(shapes)?;
        }
        if let Some(note) = &note {
            doc["note"] = serde_json::Value::from(note.as_str());
        }
        if let Some((gpu, ctx)) = fit {
            doc["context_that_fits"] = serde_json::json!({ "gpu_bytes": gpu, "context": ctx });
        }
        if let Some(placed) = &placed {
            doc["placement"] = serde_json::to_value(placed)?;
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "{} ({}, {} layers, context {}, {} parameters)",
        profile
            .name
            .clone()
            .unwrap_or_else(|| args.path.display().to_string()),
        profile.architecture,
        profile.layers,
        profile.context_length,
        profile.parameters
    );
    print!("{}", est.to_table());
    if let Some(shapes) = shapes {
        println!("\nplacement shapes, tried in order (the first that fits anywhere wins):");
        print!("{}", shapes_table(&shapes));
    }
    if let Some(note) = note {
        println!("({note})");
    }
    if let Some((gpu, ctx)) = fit {
        let gpu = bytesize::ByteSize::b(gpu).display().iec();
        match ctx {
            Some(ctx) => println!("largest context that fits GPUs of {gpu}: {ctx} tokens"),
            None => println!("no context fits GPUs of {gpu}"),
        }
    }
    if let Some(placed) = placed {
        print!("\n{}", placed.to_text());
    }
    Ok(())
}

fn shapes_table(shapes: &[Shape]) -> String {
    let mut table = comfy_table::Table::new();
    table.load_style(comfy_table::presets::NOTHING).set_header([
        "SHAPE",
        "WORKERS",
        "GPUS/WORKER",
        "NEEDS/GPU",
    ]);
    for s in shapes {
        let need = bytesize::ByteSize::b(s.vram_per_gpu)
            .display()
            .iec()
            .to_string();
        let need = match s.claim {
            Some(c) if !c.leave.is_empty() => format!("a share by GPU size (≥ {need})"),
            Some(c) => format!("{:.0}% of the GPU (≥ {need})", c.fraction * 100.0),
            None => need,
        };
        table.add_row([
            s.label.clone(),
            s.workers.to_string(),
            s.gpus_per_worker.to_string(),
            need,
        ]);
    }
    format!("{table}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        backend: BackendArgs,
    }

    fn options(args: &[&str]) -> Result<EstimateOptions> {
        let cli = Cli::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))?;
        cli.backend.options(1)
    }

    #[test]
    fn fit_context_takes_a_gpu_size() {
        #[derive(Parser)]
        struct Estimate {
            #[command(flatten)]
            args: EstimateArgs,
        }
        let parse = |size: &str| {
            Estimate::try_parse_from(["berth", "/m", "--fit-context", size])
                .map(|e| e.args.fit_context)
        };
        assert_eq!(parse("80GiB").unwrap(), Some(80 << 30));
        assert!(parse("0").is_err());
        assert!(parse("lots").is_err());
    }

    #[test]
    fn backend_flags_reach_the_options() {
        let EstimateOptions::Vllm(v) = options(&["--backend", "vllm"]).unwrap() else {
            panic!("not vLLM")
        };
        // Unset: what vLLM does itself.
        assert_eq!(
            (v.max_num_seqs, v.max_num_batched_tokens, v.vllm_version),
            (None, None, VllmVersion::V1)
        );
        let EstimateOptions::Vllm(v) = options(&[
            "--backend",
            "vllm",
            "--vllm-version",
            "0.7.3",
            "--max-num-seqs",
            "64",
            "--max-num-batched-tokens",
            "4096",
        ])
        .unwrap() else {
            panic!("not vLLM")
        };
        assert_eq!(
            (v.max_num_seqs, v.max_num_batched_tokens, v.vllm_version),
            (Some(64), Some(4096), VllmVersion::V0)
        );
        let EstimateOptions::LlamaCpp(l) = options(&[
            "--flash-attn",
            "off",
            "--parallel",
            "2",
            "--ubatch-size",
            "256",
        ])
        .unwrap() else {
            panic!("not llama.cpp")
        };
        assert_eq!(
            (l.flash_attention, l.parallel, l.ubatch),
            (FlashAttention::Off, 2, 256)
        );
        let EstimateOptions::LlamaCpp(l) = options(&[]).unwrap() else {
            panic!("not llama.cpp")
        };
        assert_eq!(l, LlamaCppOptions::default());
        let EstimateOptions::Sglang(sg) = options(&[
            "--backend",
            "sglang",
            "--tp",
            "2",
            "--mem-fraction-static",
            "0.8",
            "--chunked-prefill-size",
            "4096",
        ])
        .unwrap() else {
            panic!("not SGLang")
        };
        assert_eq!(
            (
                sg.tensor_parallel,
                sg.mem_fraction_static,
                sg.chunked_prefill_size,
                sg.cuda_graph_max_bs
            ),
            (2, Some(0.8), Some(4096), None)
        );
        // Unset: what SGLang does itself.
        let EstimateOptions::Sglang(sg) = options(&["--backend", "sglang"]).unwrap() else {
            panic!("not SGLang")
        };
        assert_eq!(sg, SglangOptions::default());
        for bad in [
            &["--mem-fraction-static", "0.8"][..],
            &["--backend", "sglang", "--mem-fraction-static", "1"],
            &["--backend", "sglang", "--gpu-memory-utilization", "0.9"],
            &["--backend", "vllm", "--disable-cuda-graph"],
            &["--max-num-seqs", "64"],
            &["--backend", "vllm", "--flash-attn", "on"],
            &["--backend", "vllm", "--vllm-version", "v2"],
            &["--flash-attn", "maybe"],
        ] {
            assert!(options(bad).is_err(), "{bad:?}");
        }
    }
}
