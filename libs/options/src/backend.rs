//! The backend a start command names and the options that change its memory use
//! ([`EstimateOptions`]): plain serde types, checked by their `validate` methods. The
//! estimators that read them are in `berth-models`.

use serde::{Deserialize, Serialize};

/// Bytes in a MiB and a GiB.
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
/// Most GPUs one instance may span.
pub const MAX_GPUS: u32 = 4096;
/// Largest batch, micro-batch or parallel-sequence count accepted.
pub const MAX_BATCH: u32 = 1 << 24;
/// Longest context accepted, tokens.
pub const MAX_CONTEXT: u64 = 1 << 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    #[error("invalid model profile: {0}")]
    InvalidProfile(String),
    #[error("invalid backend options: {0}")]
    InvalidOptions(String),
}

/// Which backend will run the model, with its options. Serialized with a `backend` tag:
/// `{"backend": "llama_cpp", "context": 8192}`, `{"backend": "vllm", "tensor_parallel": 2}`,
/// `{"backend": "sglang", "tensor_parallel": 2}`,
/// `{"backend": "custom", "bytes_per_gpu": 1073741824, "gpus": 1}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum EstimateOptions {
    LlamaCpp(LlamaCppOptions),
    Vllm(VllmOptions),
    Sglang(SglangOptions),
    /// An explicit claim: no estimate, the caller says what to reserve.
    Custom(CustomClaim),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CustomClaim {
    pub bytes_per_gpu: u64,
    #[serde(default = "one")]
    pub gpus: u32,
    /// The server to run, as an argv template (program first); empty: a reservation only,
    /// nothing is run. Placeholders: `{model}` (the model path, else its name), `{port}`,
    /// `{host}`, `{gpus}` (how many GPUs), `{ctx}` (`context`, which must then be set);
    /// `{{` and `}}` are literal braces. Checked by [`CustomClaim::validate`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub argv: Vec<String>,
    /// Path the server answers 200 on once ready (default `/health`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_path: Option<String>,
    /// Context length, tokens, for `{ctx}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<u64>,
}

fn one() -> u32 {
    1
}

impl Default for CustomClaim {
    /// Nothing reserved on one GPU, nothing run.
    fn default() -> Self {
        Self {
            bytes_per_gpu: 0,
            gpus: 1,
            argv: Vec::new(),
            ready_path: None,
            context: None,
        }
    }
}

/// Most arguments of a custom server's argv template.
pub const MAX_ARGV: usize = 256;
/// Longest argument of an argv template, and longest readiness path.
pub const MAX_ARG_BYTES: usize = 4096;

/// What a placeholder of a custom argv template stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placeholder {
    Model,
    Port,
    Host,
    Gpus,
    Ctx,
}

/// A piece of one templated argument: literal text or a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePiece<'a> {
    Text(&'a str),
    Placeholder(Placeholder),
}

/// Splits one argument of an argv template into text and placeholders; `{{` and `}}` are
/// literal braces. An unknown placeholder or an unpaired brace is an error.
pub fn template_pieces(arg: &str) -> Result<Vec<TemplatePiece<'_>>, EstimateError> {
    let bad = |what: String| EstimateError::InvalidOptions(format!("argv {arg:?}: {what}"));
    let mut pieces = Vec::new();
    let mut rest = arg;
    while let Some(at) = rest.find(['{', '}']) {
        if at > 0 {
            pieces.push(TemplatePiece::Text(&rest[..at]));
        }
        let tail = &rest[at..];
        if let Some(after) = tail
            .strip_prefix("{{")
            .map(|r| ("{", r))
            .or_else(|| tail.strip_prefix("}}").map(|r| ("}", r)))
        {
            pieces.push(TemplatePiece::Text(after.0));
            rest = after.1;
            continue;
        }
        if tail.starts_with('}') {
            return Err(bad("unpaired '}' (write '}}' for a literal brace)".into()));
        }
        let Some(end) = tail.find('}') else {
            return Err(bad("unclosed '{' (write '{{' for a literal brace)".into()));
        };
        let name = &tail[1..end];
        let p = match name {
            "model" => Placeholder::Model,
            "port" => Placeholder::Port,
            "host" => Placeholder::Host,
            "gpus" => Placeholder::Gpus,
            "ctx" => Placeholder::Ctx,
            _ => {
                return Err(bad(format!(
                    "unknown placeholder {{{name}}}; known: {{model}} {{port}} {{host}} {{gpus}} {{ctx}}"
                )));
            }
        };
        pieces.push(TemplatePiece::Placeholder(p));
        rest = &tail[end + 1..];
    }
    if !rest.is_empty() {
        pieces.push(TemplatePiece::Text(rest));
    }
    Ok(pieces)
}

impl CustomClaim {
    /// Bounds and placeholders of the argv template and the readiness path.
    pub fn validate(&self) -> Result<(), EstimateError> {
        let bad = |what: String| Err(EstimateError::InvalidOptions(what));
        if self.gpus > MAX_GPUS {
            return bad(format!("gpus must be at most {MAX_GPUS}"));
        }
        if self.argv.len() > MAX_ARGV {
            return bad(format!(
                "argv has {} entries; at most {MAX_ARGV}",
                self.argv.len()
            ));
        }
        let text_ok = |what: &str, s: &str| {
            if s.len() > MAX_ARG_BYTES {
                return bad(format!(
                    "{what} is {} bytes; at most {MAX_ARG_BYTES}",
                    s.len()
                ));
            }
            if s.chars().any(char::is_control) {
                return bad(format!("{what} {s:?} holds a control character"));
            }
            Ok(())
        };
        for arg in &self.argv {
            text_ok("argv entry", arg)?;
            for piece in template_pieces(arg)? {
                if piece == TemplatePiece::Placeholder(Placeholder::Ctx) && self.context.is_none() {
                    return bad("argv uses {ctx} but context is not set".into());
                }
            }
        }
        if self.argv.first().is_some_and(|p| p.trim().is_empty()) {
            return bad("argv must start with the program".into());
        }
        if let Some(path) = &self.ready_path {
            text_ok("ready_path", path)?;
            if !path.starts_with('/') || path.contains(char::is_whitespace) {
                return bad(format!(
                    "ready_path {path:?} must be an absolute URL path without spaces"
                ));
            }
        }
        if self.context.is_some_and(|c| c > MAX_CONTEXT) {
            return bad(format!("context must be at most {MAX_CONTEXT}"));
        }
        Ok(())
    }
}

impl EstimateOptions {
    pub fn validate(&self) -> Result<(), EstimateError> {
        match self {
            Self::LlamaCpp(o) => o.validate(),
            Self::Vllm(o) => o.validate(),
            Self::Sglang(o) => o.validate(),
            Self::Custom(c) => c.validate(),
        }
    }
}

/// KV cache element types llama.cpp accepts (`--cache-type-k/-v`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum KvCacheType {
    F32,
    #[default]
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Iq4Nl,
    Q5_0,
    Q5_1,
}

/// llama.cpp server options that change memory use. Missing JSON fields take the defaults,
/// which are llama-server's own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct LlamaCppOptions {
    /// `--ctx-size`; `None` sizes the cache for the model's trained context.
    pub context: Option<u64>,
    /// `--n-gpu-layers`; `None` offloads every layer and the output layer. `layers + 1` is the
    /// same as `None`; `layers` keeps the output layer on the host.
    pub gpu_layers: Option<u32>,
    /// GPUs to split the offloaded layers across (`--split-mode layer`, even split).
    pub gpus: u32,
    pub cache_type_k: KvCacheType,
    pub cache_type_v: KvCacheType,
    /// `--flash-attn on|off|auto` (llama.cpp's default: auto). With it, attention scores are
    /// not materialised, so the compute buffer does not grow with the context. On the wire
    /// `true`/`false` (what older senders wrote) or `"auto"`/`"on"`/`"off"`; auto is left
    /// out, so older readers take their own default (on).
    #[serde(skip_serializing_if = "FlashAttention::is_auto")]
    pub flash_attention: FlashAttention,
    /// `--ubatch-size` (llama.cpp's default: 512).
    pub ubatch: u32,
    /// `--parallel`: sequences sharing the context (sizes sliding-window caches). 1, the
    /// default, is what llama-server turns into 4 slots over one unified cache (it does so
    /// whenever it is given 1 without `--kv-unified`), and is estimated as 4.
    pub parallel: u32,
    /// `--swa-full`: full-size cache for sliding-window layers.
    pub swa_full: bool,
    /// CUDA context, cuBLAS workspace and the like, per GPU used.
    pub overhead_per_gpu: u64,
}

impl Default for LlamaCppOptions {
    fn default() -> Self {
        Self {
            context: None,
            gpu_layers: None,
            gpus: 1,
            cache_type_k: KvCacheType::F16,
            cache_type_v: KvCacheType::F16,
            flash_attention: FlashAttention::Auto,
            ubatch: 512,
            parallel: 1,
            swa_full: false,
            overhead_per_gpu: DEFAULT_OVERHEAD,
        }
    }
}

/// Per-GPU CUDA footprint outside llama.cpp's own buffers (context, cuBLAS, kernels).
pub const DEFAULT_OVERHEAD: u64 = 400 * MIB;

/// Slots llama-server runs when given `--parallel 1` (or nothing) without `--kv-unified`.
pub const LLAMA_SERVER_AUTO_PARALLEL: u32 = 4;

impl LlamaCppOptions {
    pub fn validate(&self) -> Result<(), EstimateError> {
        let bad = |what: &str| Err(EstimateError::InvalidOptions(what.into()));
        if self.gpus == 0 || self.gpus > MAX_GPUS {
            return bad(&format!("gpus must be 1..={MAX_GPUS}"));
        }
        if self.ubatch == 0 || self.ubatch > MAX_BATCH {
            return bad(&format!("ubatch must be 1..={MAX_BATCH}"));
        }
        if self.parallel == 0 || self.parallel > MAX_BATCH {
            return bad(&format!("parallel must be 1..={MAX_BATCH}"));
        }
        if self.context.is_some_and(|c| c > MAX_CONTEXT) {
            return bad(&format!("context must be at most {MAX_CONTEXT}"));
        }
        Ok(())
    }

    /// Sequences llama-server really runs: `parallel`, except that 1 becomes 4.
    pub fn sequences(&self) -> u32 {
        if self.parallel <= 1 {
            LLAMA_SERVER_AUTO_PARALLEL
        } else {
            self.parallel
        }
    }
}

/// llama.cpp's `--flash-attn`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(rename_all = "snake_case"))]
pub enum FlashAttention {
    /// llama.cpp's default: on where the device supports it for the model (CUDA does for
    /// the usual head sizes), so estimated as on.
    #[default]
    Auto,
    On,
    Off,
}

impl FlashAttention {
    pub fn is_auto(&self) -> bool {
        *self == Self::Auto
    }

    /// Whether attention scores stay unmaterialised (auto counts as on).
    pub fn enabled(self) -> bool {
        self != Self::Off
    }

    /// The `--flash-attn` argument.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        }
    }
}

impl std::str::FromStr for FlashAttention {
    type Err = EstimateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" | "true" => Ok(Self::On),
            "off" | "false" => Ok(Self::Off),
            _ => Err(EstimateError::InvalidOptions(format!(
                "flash_attention {s:?}: expected auto, on or off"
            ))),
        }
    }
}

impl Serialize for FlashAttention {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            // Booleans, as older readers expect.
            Self::On => s.serialize_bool(true),
            Self::Off => s.serialize_bool(false),
            Self::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for FlashAttention {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bool(true) => Ok(Self::On),
            Raw::Bool(false) => Ok(Self::Off),
            Raw::Word(w) => w.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `--kv-cache-dtype`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// The vLLM engine generation, which decides how vLLM profiles memory and its scheduler
/// defaults (see docs/estimation.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VllmVersion {
    /// The V1 engine: vLLM's default since 0.8.0, the only one since 0.11.
    #[default]
    V1,
    /// The V0 engine: vLLM before 0.8.0 (and `VLLM_USE_V1=0` up to 0.10).
    V0,
}

impl std::str::FromStr for VllmVersion {
    type Err = EstimateError;

    /// `v1`, `v0`, or a release number (`0.7.3`), which names the engine that release ran
    /// by default.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            EstimateError::InvalidOptions(format!(
                "vLLM version {s:?}: expected v0, v1 or a release such as 0.7.3"
            ))
        };
        match s {
            "v1" | "V1" => return Ok(Self::V1),
            "v0" | "V0" => return Ok(Self::V0),
            _ => {}
        }
        let mut parts = s.trim_start_matches('v').split('.');
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        Ok(if major == 0 && minor < 8 {
            Self::V0
        } else {
            Self::V1
        })
    }
}

/// vLLM engine arguments that change memory use. Missing JSON fields take the defaults;
/// `None` means what vLLM itself does without the flag.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The engine generation; decides the profiling run and the scheduler defaults.
    pub vllm_version: VllmVersion,
    /// `--max-num-seqs`: the sampler's batch in the profiling run. `None`: vLLM's default
    /// (V1: 1024 on GPUs of 70 GiB or more but A100s, else 256, estimated as 1024; V0: 256).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_num_seqs: Option<u32>,
    /// `--max-num-batched-tokens`: the profiling run's batch. `None`: vLLM's default (V1:
    /// 8192 on GPUs of 70 GiB or more but A100s, else 2048, estimated as 8192; V0: 2048 with
    /// chunked prefill, which it enables past a 32 768-token `max_model_len`, else
    /// `max(max_model_len, 2048)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_num_batched_tokens: Option<u32>,
    pub kv_cache_dtype: VllmKvDtype,
    /// `--block-size`, tokens per KV block.
    pub block_size: u32,
    /// `--enforce-eager`: no CUDA graphs.
    pub enforce_eager: bool,
    /// `--gpu-memory-utilization`: the share of each GPU the instance takes, whatever it
    /// needs. `None` reserves only the estimate (as with `--kv-cache-memory`).
    pub gpu_memory_utilization: Option<f64>,
    /// Memory outside PyTorch's allocator per GPU: the CUDA context (the first
    /// [`VLLM_CUDA_CONTEXT`] of it, which exists before vLLM's baseline snapshot and so lies
    /// outside the utilization share) and what vLLM logs as non-torch memory.
    pub non_torch_bytes: u64,
    /// Added per GPU when more than one GPU (NCCL, custom all-reduce buffers).
    pub multi_gpu_bytes: u64,
    pub cuda_graph_bytes: u64,
    /// vLLM ≥ 0.21 profiles CUDA graph memory inside the utilization share; older versions
    /// allocated it on top. The V0 engine always allocated it on top.
    pub cuda_graphs_in_share: bool,
}

/// The CUDA context vLLM's memory accounting leaves out (per GPU).
pub const VLLM_CUDA_CONTEXT: u64 = 512 * MIB;

impl Default for VllmOptions {
    fn default() -> Self {
        Self {
            tensor_parallel: 1,
            pipeline_parallel: 1,
            max_model_len: None,
            concurrent_sequences: 1,
            vllm_version: VllmVersion::V1,
            max_num_seqs: None,
            max_num_batched_tokens: None,
            kv_cache_dtype: VllmKvDtype::Auto,
            block_size: 16,
            enforce_eager: false,
            gpu_memory_utilization: Some(0.9),
            non_torch_bytes: VLLM_CUDA_CONTEXT + 256 * MIB,
            multi_gpu_bytes: GIB + GIB / 2,
            cuda_graph_bytes: 512 * MIB,
            cuda_graphs_in_share: true,
        }
    }
}

/// vLLM's largest default `max_num_batched_tokens` / `max_num_seqs` (V1 on large GPUs).
const V1_BATCHED_TOKENS: u32 = 8192;
const V1_SEQS: u32 = 1024;
/// V0's `_DEFAULT_MAX_NUM_BATCHED_TOKENS` and `max_num_seqs`.
const V0_BATCHED_TOKENS: u32 = 2048;
const V0_SEQS: u32 = 256;
/// V0 enabled chunked prefill by default past this `max_model_len`.
const V0_CHUNKED_PREFILL_ABOVE: u64 = 32 * 1024;

impl VllmOptions {
    pub fn validate(&self) -> Result<(), EstimateError> {
        let bad = |what: String| Err(EstimateError::InvalidOptions(what));
        let gpus = u64::from(self.tensor_parallel) * u64::from(self.pipeline_parallel);
        if self.tensor_parallel == 0 || self.pipeline_parallel == 0 || gpus > u64::from(MAX_GPUS) {
            return bad(format!(
                "tensor_parallel × pipeline_parallel must be 1..={MAX_GPUS}"
            ));
        }
        if self.block_size == 0 {
            return bad("block_size must be positive".into());
        }
        for (what, v) in [
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_num_seqs", self.max_num_seqs),
        ] {
            if v.is_some_and(|v| v == 0 || v > MAX_BATCH) {
                return bad(format!("{what} must be 1..={MAX_BATCH}"));
            }
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

    /// `max_num_seqs` as vLLM would run it (the larger of V1's GPU-dependent defaults).
    pub fn resolved_max_num_seqs(&self) -> u32 {
        self.max_num_seqs.unwrap_or(match self.vllm_version {
            VllmVersion::V1 => V1_SEQS,
            VllmVersion::V0 => V0_SEQS,
        })
    }

    /// `max_num_batched_tokens` as vLLM would run it for a `max_model_len` of `len`
    /// (V1: the larger of its GPU-dependent defaults; V0: by chunked prefill).
    pub fn resolved_max_num_batched_tokens(&self, len: u64) -> u32 {
        self.max_num_batched_tokens
            .unwrap_or(match self.vllm_version {
                VllmVersion::V1 => V1_BATCHED_TOKENS,
                VllmVersion::V0 if len > V0_CHUNKED_PREFILL_ABOVE => V0_BATCHED_TOKENS,
                VllmVersion::V0 => u32::try_from(len.max(u64::from(V0_BATCHED_TOKENS)))
                    .unwrap_or(MAX_BATCH)
                    .min(MAX_BATCH),
            })
    }
}

impl VllmOptions {
    /// What vLLM allocates per GPU outside its `gpu_memory_utilization` share: the CUDA
    /// context (created before its baseline snapshot) and, where graphs are not profiled in
    /// the share (V0, or before vLLM 0.21), the CUDA graphs.
    pub fn outside_share_bytes(&self) -> u64 {
        let graphs_in_share = self.cuda_graphs_in_share && self.vllm_version == VllmVersion::V1;
        let graphs = if self.enforce_eager || graphs_in_share {
            0
        } else {
            self.cuda_graph_bytes
        };
        self.non_torch_bytes
            .min(VLLM_CUDA_CONTEXT)
            .saturating_add(graphs)
    }
}

/// SGLang's `--kv-cache-dtype`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SglangKvDtype {
    /// The model's activation dtype: 16-bit.
    #[default]
    Auto,
    Fp8E4m3,
    Fp8E5m2,
}

impl SglangKvDtype {
    pub fn bytes(self) -> u64 {
        match self {
            Self::Auto => 2,
            Self::Fp8E4m3 | Self::Fp8E5m2 => 1,
        }
    }

    /// The `--kv-cache-dtype` argument.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Fp8E4m3 => "fp8_e4m3",
            Self::Fp8E5m2 => "fp8_e5m2",
        }
    }
}

/// SGLang server arguments (`python -m sglang.launch_server`) that change memory use.
/// Missing JSON fields take the defaults; `None` means what SGLang itself does without the
/// flag, which for the memory settings depends on the GPU (see docs/estimation.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct SglangOptions {
    /// `--tp-size`.
    pub tensor_parallel: u32,
    /// `--context-length`; `None` is the model's context length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u64>,
    /// Full-length sequences the KV pool must hold at once for the instance to be useful.
    pub concurrent_sequences: u32,
    /// `--mem-fraction-static`: weights and KV pool as a share of the memory free once the
    /// CUDA context and NCCL exist. `None`: SGLang's own default, which it picks by the
    /// GPU's memory and the TP size (`ServerArgs._handle_gpu_memory_settings`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_fraction_static: Option<f64>,
    /// `--chunked-prefill-size`. `None`: SGLang's, by GPU memory (2048 below 35 GiB, 4096
    /// below 60 GiB, 8192 below 160 GiB, else 16384).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chunked_prefill_size: Option<u32>,
    /// `--cuda-graph-max-bs`. `None`: SGLang's, by GPU memory and TP size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_graph_max_bs: Option<u32>,
    pub kv_cache_dtype: SglangKvDtype,
    /// `--disable-cuda-graph`.
    pub disable_cuda_graph: bool,
    /// The CUDA context, created before SGLang measures the memory it takes its share of.
    pub cuda_context_bytes: u64,
    /// Added per GPU when more than one (NCCL communicators and custom all-reduce buffers,
    /// also in place before SGLang measures).
    pub multi_gpu_bytes: u64,
}

impl Default for SglangOptions {
    fn default() -> Self {
        Self {
            tensor_parallel: 1,
            context_length: None,
            concurrent_sequences: 1,
            mem_fraction_static: None,
            chunked_prefill_size: None,
            cuda_graph_max_bs: None,
            kv_cache_dtype: SglangKvDtype::Auto,
            disable_cuda_graph: false,
            cuda_context_bytes: 512 * MIB,
            multi_gpu_bytes: GIB + GIB / 2,
        }
    }
}

/// SGLang's defaults for one size class of GPU: below `below_mib` of memory (MiB, as
/// `get_device_memory_capacity` reports it), the chunked-prefill size and the largest CUDA
/// graph batch for TP below 4 and from 4 on (`ServerArgs._handle_gpu_memory_settings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SglangGpuClass {
    pub below_mib: u64,
    pub chunked_prefill_size: u32,
    pub cuda_graph_max_bs: [u32; 2],
}

/// The size classes, smallest first; the last covers every larger GPU.
pub const SGLANG_GPU_CLASSES: [SglangGpuClass; 6] = [
    // T4, 4080.
    SglangGpuClass {
        below_mib: 20 * 1024,
        chunked_prefill_size: 2048,
        cuda_graph_max_bs: [8, 8],
    },
    // A10, 4090, 5090.
    SglangGpuClass {
        below_mib: 35 * 1024,
        chunked_prefill_size: 2048,
        cuda_graph_max_bs: [24, 80],
    },
    // A100 40GB, L40.
    SglangGpuClass {
        below_mib: 60 * 1024,
        chunked_prefill_size: 4096,
        cuda_graph_max_bs: [32, 160],
    },
    // H100, A100 80GB.
    SglangGpuClass {
        below_mib: 90 * 1024,
        chunked_prefill_size: 8192,
        cuda_graph_max_bs: [256, 512],
    },
    // H20, H200.
    SglangGpuClass {
        below_mib: 160 * 1024,
        chunked_prefill_size: 8192,
        cuda_graph_max_bs: [256, 512],
    },
    // B200, MI300.
    SglangGpuClass {
        below_mib: u64::MAX,
        chunked_prefill_size: 16384,
        cuda_graph_max_bs: [512, 512],
    },
];

/// The class an 80 GiB GPU falls in: what an estimate that knows no GPU assumes.
const SGLANG_LARGE_GPU_MIB: u64 = 80 * 1024;

impl SglangOptions {
    pub fn validate(&self) -> Result<(), EstimateError> {
        let bad = |what: String| Err(EstimateError::InvalidOptions(what));
        if self.tensor_parallel == 0 || self.tensor_parallel > MAX_GPUS {
            return bad(format!("tensor_parallel must be 1..={MAX_GPUS}"));
        }
        if self
            .context_length
            .is_some_and(|l| l == 0 || l > MAX_CONTEXT)
        {
            return bad(format!("context_length must be 1..={MAX_CONTEXT}"));
        }
        for (what, v) in [
            ("chunked_prefill_size", self.chunked_prefill_size),
            ("cuda_graph_max_bs", self.cuda_graph_max_bs),
        ] {
            if v.is_some_and(|v| v == 0 || v > MAX_BATCH) {
                return bad(format!("{what} must be 1..={MAX_BATCH}"));
            }
        }
        if let Some(f) = self.mem_fraction_static
            && !(f > 0.0 && f < 1.0)
        {
            return bad(format!("mem_fraction_static {f} is not in (0, 1)"));
        }
        Ok(())
    }

    /// The size class of a GPU with `gpu_mib` MiB.
    pub fn class(gpu_mib: u64) -> SglangGpuClass {
        SGLANG_GPU_CLASSES
            .iter()
            .copied()
            .find(|c| gpu_mib < c.below_mib)
            .unwrap_or(SGLANG_GPU_CLASSES[SGLANG_GPU_CLASSES.len() - 1])
    }

    /// `--chunked-prefill-size` as SGLang runs it on a GPU of `gpu_mib` MiB (an 80 GiB one
    /// when `None`).
    pub fn resolved_chunked_prefill_size(&self, gpu_mib: Option<u64>) -> u32 {
        self.chunked_prefill_size.unwrap_or_else(|| {
            Self::class(gpu_mib.unwrap_or(SGLANG_LARGE_GPU_MIB)).chunked_prefill_size
        })
    }

    /// `--cuda-graph-max-bs` as SGLang runs it on a GPU of `gpu_mib` MiB (an 80 GiB one
    /// when `None`).
    pub fn resolved_cuda_graph_max_bs(&self, gpu_mib: Option<u64>) -> u32 {
        self.cuda_graph_max_bs.unwrap_or_else(|| {
            let c = Self::class(gpu_mib.unwrap_or(SGLANG_LARGE_GPU_MIB));
            c.cuda_graph_max_bs[usize::from(self.tensor_parallel >= 4)]
        })
    }

    /// What SGLang leaves out of its static share on a GPU of `gpu_mib` MiB when it picks
    /// `mem_fraction_static` itself, in MiB: 512 for constant metadata, 1.5 per token of the
    /// largest prefill chunk (at least 2048), 2 per CUDA graph batch size, 128 per GPU of
    /// the instance, and at least 10 GiB on GPUs over 60 GiB.
    pub fn default_reserve_mib(&self, gpu_mib: u64) -> f64 {
        let chunk = f64::from(self.resolved_chunked_prefill_size(Some(gpu_mib)).max(2048));
        let graphs = f64::from(self.resolved_cuda_graph_max_bs(Some(gpu_mib)));
        let reserve =
            512.0 + chunk * 1.5 + graphs * 2.0 + f64::from(self.tensor_parallel) / 8.0 * 1024.0;
        if gpu_mib > 60 * 1024 {
            reserve.max(10.0 * 1024.0)
        } else {
            reserve
        }
    }

    /// `mem_fraction_static` as SGLang runs it on a GPU of `gpu_total_bytes`: the one set,
    /// else `round((gpu − reserve) / gpu, 3)` (`_handle_gpu_memory_settings`).
    pub fn resolved_mem_fraction_static(&self, gpu_total_bytes: u64) -> f64 {
        if let Some(f) = self.mem_fraction_static {
            return f;
        }
        #[expect(clippy::cast_precision_loss, reason = "GPU sizes stay below 2^53")]
        let mib = gpu_total_bytes as f64 / MIB as f64;
        if mib <= 0.0 {
            return 0.0;
        }
        let f = (mib - self.default_reserve_mib(gpu_total_bytes / MIB)) / mib;
        ((f * 1000.0).round() / 1000.0).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn custom(argv: &[&str]) -> CustomClaim {
        CustomClaim {
            bytes_per_gpu: GIB,
            gpus: 1,
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            ..CustomClaim::default()
        }
    }

    #[test]
    fn templates_split_into_text_and_placeholders() {
        use TemplatePiece::Text;
        let p = TemplatePiece::Placeholder;
        assert_eq!(
            template_pieces("--listen={host}:{port}").unwrap(),
            vec![
                Text("--listen="),
                p(Placeholder::Host),
                Text(":"),
                p(Placeholder::Port)
            ]
        );
        assert_eq!(
            template_pieces("{{json}}").unwrap(),
            vec![Text("{"), Text("json"), Text("}")]
        );
        assert_eq!(
            template_pieces("{model}").unwrap(),
            vec![p(Placeholder::Model)]
        );
        for bad in ["{modle}", "{port", "port}", "{}", "{{port}"] {
            assert!(template_pieces(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn older_llama_cpp_messages_still_read() {
        // What senders wrote before flash attention had three states.
        let old: LlamaCppOptions =
            serde_json::from_str(r#"{"flash_attention": false, "parallel": 1}"#).unwrap();
        assert_eq!(old.flash_attention, FlashAttention::Off);
        let on: LlamaCppOptions = serde_json::from_str(r#"{"flash_attention": true}"#).unwrap();
        assert_eq!(on.flash_attention, FlashAttention::On);
        let auto: LlamaCppOptions = serde_json::from_str(r#"{"flash_attention": "auto"}"#).unwrap();
        assert_eq!(auto, LlamaCppOptions::default());
        assert!(
            serde_json::from_str::<LlamaCppOptions>(r#"{"flash_attention": "maybe"}"#).is_err()
        );
        // Auto is left out (older readers default to on); on and off stay booleans.
        let j = serde_json::to_value(LlamaCppOptions::default()).unwrap();
        assert!(j.get("flash_attention").is_none(), "{j}");
        let j = serde_json::to_value(LlamaCppOptions {
            flash_attention: FlashAttention::Off,
            ..LlamaCppOptions::default()
        })
        .unwrap();
        assert_eq!(j["flash_attention"], serde_json::json!(false));
        assert_eq!(LlamaCppOptions::default().sequences(), 4);
    }

    #[test]
    fn older_vllm_messages_still_read_and_defaults_stay_off_the_wire() {
        // Older senders wrote every field, the batch sizes included.
        let old: VllmOptions = serde_json::from_str(
            r#"{"max_num_seqs": 256, "max_num_batched_tokens": 8192, "non_torch_bytes": 1610612736}"#,
        )
        .unwrap();
        assert_eq!(
            (
                old.max_num_seqs,
                old.max_num_batched_tokens,
                old.vllm_version
            ),
            (Some(256), Some(8192), VllmVersion::V1)
        );
        let j = serde_json::to_value(VllmOptions::default()).unwrap();
        assert!(j.get("max_num_seqs").is_none(), "{j}");
        assert!(j.get("max_num_batched_tokens").is_none(), "{j}");
        assert_eq!(j["vllm_version"], serde_json::json!("v1"));
        let v0: VllmOptions = serde_json::from_str(r#"{"vllm_version": "v0"}"#).unwrap();
        assert_eq!(v0.vllm_version, VllmVersion::V0);
    }

    #[test]
    fn vllm_versions_name_engines() {
        for (s, v) in [
            ("v1", VllmVersion::V1),
            ("v0", VllmVersion::V0),
            ("0.7.3", VllmVersion::V0),
            ("v0.6.5", VllmVersion::V0),
            ("0.8.0", VllmVersion::V1),
            ("0.21.1", VllmVersion::V1),
            ("1.0", VllmVersion::V1),
        ] {
            assert_eq!(s.parse::<VllmVersion>().unwrap(), v, "{s}");
        }
        for bad in ["", "v2", "latest", "0", "x.y"] {
            assert!(bad.parse::<VllmVersion>().is_err(), "{bad}");
        }
        assert!(
            VllmOptions {
                max_num_batched_tokens: Some(0),
                ..VllmOptions::default()
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn sglang_picks_its_share_by_gpu_size_as_sglang_does() {
        let o = SglangOptions::default();
        // L40S (46068 MiB), TP 1: 512 + 4096 × 1.5 + 32 × 2 + 128 = 6848 MiB left, 0.851
        // (what SGLang printed for Llama-3.1-8B there, sgl-project/sglang PR 13023).
        assert_eq!(o.resolved_mem_fraction_static(46_068 * MIB), 0.851);
        // H100 (81559 MiB): 512 + 12288 + 512 + 128 = 13440 MiB left, 0.835; at TP 4 the
        // graphs go to 512 and the parallel term to 512: 14336 MiB, 0.824.
        assert_eq!(o.resolved_mem_fraction_static(81_559 * MIB), 0.835);
        let tp4 = SglangOptions {
            tensor_parallel: 4,
            ..SglangOptions::default()
        };
        assert_eq!(tp4.resolved_mem_fraction_static(81_559 * MIB), 0.824);
        assert_eq!(tp4.resolved_cuda_graph_max_bs(Some(81_559)), 512);
        // RTX 4090 (24564 MiB): 512 + 3072 + 48 + 128 = 3760, 0.847; T4 (15360): 0.757.
        assert_eq!(o.resolved_mem_fraction_static(24_564 * MIB), 0.847);
        assert_eq!(o.resolved_mem_fraction_static(15_360 * MIB), 0.757);
        // H200 (143771 MiB): the 10 GiB floor does not bind, 13440 left, 0.907.
        assert_eq!(o.resolved_mem_fraction_static(143_771 * MIB), 0.907);
        assert_eq!(o.resolved_chunked_prefill_size(None), 8192);
        assert_eq!(o.resolved_chunked_prefill_size(Some(200 * 1024)), 16384);
        let set = SglangOptions {
            mem_fraction_static: Some(0.93),
            ..SglangOptions::default()
        };
        assert_eq!(set.resolved_mem_fraction_static(46_068 * MIB), 0.93);
        for bad in [
            SglangOptions {
                mem_fraction_static: Some(1.0),
                ..SglangOptions::default()
            },
            SglangOptions {
                tensor_parallel: 0,
                ..SglangOptions::default()
            },
            SglangOptions {
                chunked_prefill_size: Some(0),
                ..SglangOptions::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // Unset fields stay off the wire, so SGLang's own defaults apply.
        let j = serde_json::to_value(EstimateOptions::Sglang(SglangOptions::default())).unwrap();
        assert_eq!(j["backend"], serde_json::json!("sglang"));
        assert!(j.get("mem_fraction_static").is_none(), "{j}");
        let back: EstimateOptions =
            serde_json::from_str(r#"{"backend": "sglang", "tensor_parallel": 2}"#).unwrap();
        assert_eq!(
            back,
            EstimateOptions::Sglang(SglangOptions {
                tensor_parallel: 2,
                ..SglangOptions::default()
            })
        );
    }

    #[test]
    fn a_custom_template_is_bounded_and_names_known_placeholders() {
        assert!(
            custom(&["python3", "srv.py", "--port", "{port}"])
                .validate()
                .is_ok()
        );
        assert!(custom(&[]).validate().is_ok());
        assert!(custom(&["srv", "{nope}"]).validate().is_err());
        assert!(custom(&["srv", "line\nbreak"]).validate().is_err());
        assert!(custom(&["srv", "a\u{1b}[2J"]).validate().is_err());
        assert!(custom(&["srv", "-c", "{ctx}"]).validate().is_err());
        let with_ctx = CustomClaim {
            context: Some(4096),
            ..custom(&["srv", "-c", "{ctx}"])
        };
        assert!(with_ctx.validate().is_ok());
        assert!(custom(&[" ", "x"]).validate().is_err());
        let long = "x".repeat(MAX_ARG_BYTES + 1);
        assert!(custom(&["srv", &long]).validate().is_err());
        assert!(custom(&vec!["a"; MAX_ARGV + 1]).validate().is_err());
        for (path, ok) in [("/health", true), ("health", false), ("/a b", false)] {
            let c = CustomClaim {
                ready_path: Some(path.into()),
                ..custom(&["srv"])
            };
            assert_eq!(c.validate().is_ok(), ok, "{path}");
        }
    }
}
