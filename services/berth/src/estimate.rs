//! `berth estimate`: what a model needs on the GPUs, from its own files.

use anyhow::{Context, Result, bail};
use berth_fit::{
    EstimateOptions, KvCacheType, LlamaCppOptions, VllmOptions, estimate, profile_from_path,
};
use clap::Args;
use std::path::PathBuf;

/// Backend options shared by `berth estimate` and `berth start --model-file`.
#[derive(Debug, Clone, Args)]
pub struct BackendArgs {
    /// The backend that will run the model.
    #[arg(long, default_value = "llama-cpp", value_parser = ["llama-cpp", "vllm"])]
    backend: String,
    /// Context length in tokens (llama.cpp `--ctx-size`, vLLM `--max-model-len`); default:
    /// the model's own.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=berth_fit::MAX_CONTEXT))]
    ctx: Option<u64>,
    /// llama.cpp: layers to offload to the GPUs (default: all).
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    gpu_layers: Option<u32>,
    /// llama.cpp: KV cache type for keys and values.
    #[arg(long, default_value = "f16", value_parser = ["f16", "q8_0", "q4_0"])]
    cache_type: String,
    /// vLLM: tensor-parallel size.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    tp: Option<u32>,
    /// vLLM: fraction of each GPU the instance claims (0 < f <= 1).
    #[arg(long, value_parser = parse_fraction)]
    gpu_memory_utilization: Option<f64>,
    /// vLLM: no CUDA graphs.
    #[arg(long)]
    enforce_eager: bool,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(f > 0.0 && f <= 1.0) {
        return Err(format!("{f} is not in (0, 1]"));
    }
    Ok(f)
}

impl BackendArgs {
    /// Estimator options for `gpus` GPUs (llama.cpp split; vLLM uses --tp).
    pub fn options(&self, gpus: u32) -> Result<EstimateOptions> {
        Ok(match self.backend.as_str() {
            "vllm" => EstimateOptions::Vllm(VllmOptions {
                tensor_parallel: self.tp.unwrap_or(gpus),
                max_model_len: self.ctx,
                enforce_eager: self.enforce_eager,
                gpu_memory_utilization: self.gpu_memory_utilization,
                ..Default::default()
            }),
            _ => {
                if self.tp.is_some() || self.gpu_memory_utilization.is_some() {
                    bail!("--tp and --gpu-memory-utilization are vLLM options; add --backend vllm");
                }
                let cache = match self.cache_type.as_str() {
                    "q8_0" => KvCacheType::Q8_0,
                    "q4_0" => KvCacheType::Q4_0,
                    _ => KvCacheType::F16,
                };
                EstimateOptions::LlamaCpp(LlamaCppOptions {
                    context: self.ctx,
                    gpu_layers: self.gpu_layers,
                    gpus,
                    cache_type_k: cache,
                    cache_type_v: cache,
                    ..Default::default()
                })
            }
        })
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
    /// Print JSON (profile and estimate) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &EstimateArgs) -> Result<()> {
    let profile = profile_from_path(&args.path)
        .with_context(|| format!("reading model {}", args.path.display()))?;
    let options = args.backend.options(args.gpus)?;
    let est = estimate(&profile, &options)?;
    if args.json {
        let doc = serde_json::json!({ "profile": profile, "options": options, "estimate": est });
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
    Ok(())
}
