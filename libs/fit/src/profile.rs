//! What the estimators need to know about a model, from a GGUF file, a Hugging Face directory,
//! or numbers given inline.

use crate::gguf::{self, GgufError, GgufFile, GgufLimits, MetaValue};
use crate::hf;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};

/// More layers than any model has; a larger count is a corrupt or hostile file.
pub const MAX_LAYERS: u64 = 1 << 14;

/// A model's shape and weight sizes: everything the memory estimators read.
///
/// Serializable, so a profile can be cached, shown as JSON, or carried inline in a start
/// command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelProfile {
    pub format: ProfileFormat,
    /// `general.architecture` (GGUF) or `model_type` (Hugging Face), e.g. "llama".
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How the weights are stored: the dominant ggml type ("Q4_K"), or the Hugging Face dtype
    /// and quantization ("bf16", "fp8", "awq-int4").
    pub weight_dtype: String,
    /// Number of weight elements.
    pub parameters: u64,
    pub weights: WeightBytes,
    /// Transformer blocks.
    pub layers: u32,
    /// Trained context length, tokens (0 when the model does not say).
    pub context_length: u64,
    pub embedding_length: u32,
    /// Largest feed-forward width (per expert for MoE models).
    pub feed_forward_length: u32,
    pub vocab_size: u32,
    pub attention: Attention,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Experts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileFormat {
    Gguf,
    HuggingFace,
    Explicit,
}

/// Weight bytes, split the way offloading splits them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightBytes {
    /// Every weight, once.
    pub total: u64,
    /// Input embeddings (`token_embd`): llama.cpp keeps these in host memory.
    pub input: u64,
    /// The output head and final norm. With tied embeddings this is the size of the shared
    /// embedding matrix, which llama.cpp copies to the GPU and `total` counts once.
    pub output: u64,
    /// Per transformer block; empty when unknown (then `total − input − output` is spread
    /// evenly over the layers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<u64>,
    /// Read from tensor sizes (true) or derived from a parameter count and a dtype (false).
    pub exact: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    pub heads: u32,
    /// KV heads (GQA); the largest when layers differ.
    pub kv_heads: u32,
    /// Per-layer KV heads when layers differ (0: a layer without KV cache, e.g. recurrent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kv_heads_per_layer: Vec<u32>,
    /// Per-head key and value widths.
    pub key_length: u32,
    pub value_length: u32,
    /// Sliding-window attention span, tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<u32>,
    /// Which layers use the window (true) rather than full attention; empty = all full.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sliding_layers: Vec<bool>,
    /// Multi-head latent attention (DeepSeek-V2/V3, Kimi K2): latent KV rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_lora_rank: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub q_lora_rank: Option<u32>,
    /// Rotary part of the key that MLA caches next to the latent (`qk_rope_head_dim`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_dim: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Experts {
    pub count: u32,
    pub used: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{}: {source}", path.display())]
    Gguf {
        path: PathBuf,
        #[source]
        source: GgufError,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("{}: neither a GGUF file nor a directory with config.json", .0.display())]
    NotAModel(PathBuf),
    #[error("the model does not say {0}")]
    Missing(String),
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl ProfileError {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Profiles the model at `path`: a GGUF file (the first shard of a split model brings the
/// others in), or a Hugging Face directory (`config.json` plus safetensors headers or the
/// index). Reads headers only.
pub fn profile_from_path(path: &Path) -> Result<ModelProfile, ProfileError> {
    let io_err = |source| ProfileError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        return hf::profile_from_dir(path);
    }
    if path.file_name().is_some_and(|n| n == "config.json") {
        let dir = path.parent().unwrap_or(Path::new("."));
        return hf::profile_from_dir(dir);
    }
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|f| f.take(4).read(&mut magic))
        .map_err(io_err)?;
    if n == 4 && magic == gguf::GGUF_MAGIC {
        return profile_from_gguf_path(path);
    }
    Err(ProfileError::NotAModel(path.to_owned()))
}

/// Profiles a GGUF file; for a split model (`…-00001-of-00003.gguf`) every shard's header is
/// read and the tensors summed.
pub fn profile_from_gguf_path(path: &Path) -> Result<ModelProfile, ProfileError> {
    let limits = GgufLimits::default();
    let read = |p: &Path| {
        gguf::read_gguf(p, &limits).map_err(|source| ProfileError::Gguf {
            path: p.to_owned(),
            source,
        })
    };
    let mut file = read(path)?;
    let count = file.get_u64("split.count").ok().flatten().unwrap_or(1);
    if count > 1 {
        let shards = split_paths(path, count).ok_or_else(|| {
            ProfileError::invalid(
                path.display().to_string(),
                format!("split.count is {count} but the name is not NAME-00001-of-NNNNN.gguf"),
            )
        })?;
        for shard in shards.iter().skip(1) {
            let other = read(shard)?;
            file.tensors.extend(other.tensors);
        }
    }
    profile_from_gguf(&file)
}

/// `NAME-00001-of-00003.gguf` → the paths of all three shards.
fn split_paths(first: &Path, count: u64) -> Option<Vec<PathBuf>> {
    if count > 10_000 {
        return None;
    }
    let name = first.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (prefix, tail) = stem.rsplit_once("-of-")?;
    let (prefix, _index) = prefix.rsplit_once('-')?;
    if tail.parse::<u64>().ok()? != count {
        return None;
    }
    let dir = first.parent().unwrap_or(Path::new("."));
    Some(
        (1..=count)
            .map(|i| dir.join(format!("{prefix}-{i:05}-of-{count:05}.gguf")))
            .collect(),
    )
}

/// Architectures whose sliding-window layers llama.cpp lays out in a fixed pattern
/// (`hparams.set_swa_pattern(n)`: layer `il` uses the window when `il % n < n − 1`).
fn swa_pattern(arch: &str) -> Option<u32> {
    match arch {
        "gemma2" | "gpt-oss" | "openai-moe" => Some(2),
        "cohere2" => Some(4),
        "gemma3" => Some(6),
        _ => None,
    }
}

/// Builds a profile from a parsed GGUF header.
pub fn profile_from_gguf(g: &GgufFile) -> Result<ModelProfile, ProfileError> {
    let arch = g
        .architecture()
        .ok_or_else(|| ProfileError::Missing("general.architecture".into()))?
        .to_owned();
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| -> Result<Option<u64>, ProfileError> {
        let full = key(k);
        match g.get(&full) {
            None => Ok(None),
            Some(v) => scalar_or_max(v)
                .map(Some)
                .ok_or_else(|| ProfileError::invalid(full, "not a non-negative integer")),
        }
    };
    let u32_of = |k: &str, v: u64| {
        u32::try_from(v).map_err(|_| ProfileError::invalid(key(k), format!("{v} is out of range")))
    };

    let layers = num("block_count")?.ok_or_else(|| ProfileError::Missing(key("block_count")))?;
    if layers == 0 || layers > MAX_LAYERS {
        return Err(ProfileError::invalid(
            key("block_count"),
            format!("{layers} layers"),
        ));
    }
    let n_layers = u32_of("block_count", layers)?;
    let n_embd = u32_of(
        "embedding_length",
        num("embedding_length")?.ok_or_else(|| ProfileError::Missing(key("embedding_length")))?,
    )?;
    let n_ff = u32_of(
        "feed_forward_length",
        num("feed_forward_length")?.unwrap_or(0),
    )?;
    let context = num("context_length")?.unwrap_or(0);
    let heads = u32_of(
        "attention.head_count",
        num("attention.head_count")?.unwrap_or(0),
    )?;

    let kv_key = key("attention.head_count_kv");
    let (kv_heads, kv_per_layer) = match g.get(&kv_key) {
        None => (heads, Vec::new()),
        Some(MetaValue::Array { items, .. }) => {
            let per: Vec<u32> = items
                .iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| ProfileError::invalid(&kv_key, "not a list of head counts"))?;
            if per.len() != n_layers as usize {
                return Err(ProfileError::invalid(
                    &kv_key,
                    format!("{} entries for {n_layers} layers", per.len()),
                ));
            }
            let max = per.iter().copied().max().unwrap_or(0);
            if per.iter().all(|&h| h == max) {
                (max, Vec::new())
            } else {
                (max, per)
            }
        }
        Some(v) => (
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| ProfileError::invalid(&kv_key, "not a head count"))?,
            Vec::new(),
        ),
    };
    let head_dim_default = n_embd.checked_div(heads).unwrap_or(0);
    let key_length = match num("attention.key_length")? {
        Some(v) => u32_of("attention.key_length", v)?,
        None => head_dim_default,
    };
    let value_length = match num("attention.value_length")? {
        Some(v) => u32_of("attention.value_length", v)?,
        None => key_length,
    };

    let sliding_window = num("attention.sliding_window")?
        .filter(|&w| w > 0)
        .map(|w| u32_of("attention.sliding_window", w))
        .transpose()?;
    let sliding_layers = match sliding_window {
        None => Vec::new(),
        Some(_) => match g.get(&key("attention.sliding_window_pattern")) {
            Some(MetaValue::Array { items, .. }) if items.len() == n_layers as usize => {
                items.iter().map(|v| v.as_bool().unwrap_or(false)).collect()
            }
            Some(v) if v.as_u64().is_some_and(|p| p > 0 && p <= MAX_LAYERS) => {
                pattern_layers(n_layers, v.as_u64().unwrap_or(1) as u32)
            }
            _ => match swa_pattern(&arch) {
                Some(p) => pattern_layers(n_layers, p),
                // Unknown layout: assume full attention everywhere (over-estimates, safely).
                None => Vec::new(),
            },
        },
    };

    let experts = match num("expert_count")? {
        Some(c) if c > 0 => Some(Experts {
            count: u32_of("expert_count", c)?,
            used: u32_of("expert_used_count", num("expert_used_count")?.unwrap_or(0))?,
        }),
        _ => None,
    };
    let opt32 = |k: &str| -> Result<Option<u32>, ProfileError> {
        num(k)?.filter(|&v| v > 0).map(|v| u32_of(k, v)).transpose()
    };
    let kv_lora_rank = opt32("attention.kv_lora_rank")?;
    let q_lora_rank = opt32("attention.q_lora_rank")?;
    let rope_dim = if kv_lora_rank.is_some() {
        opt32("rope.dimension_count")?
    } else {
        None
    };

    let vocab_size = match num("vocab_size")? {
        Some(v) => u32_of("vocab_size", v)?,
        None => g
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::array_len)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    };

    // Weights, split the way llama.cpp places them.
    let mut layer_bytes = vec![0u64; n_layers as usize];
    let (mut input, mut output, mut output_head, mut embd) = (0u64, 0u64, 0u64, 0u64);
    let mut by_type: Vec<(gguf::GgmlType, u64)> = Vec::new();
    for t in &g.tensors {
        let b = t.bytes();
        match by_type.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
            Some((_, n)) => *n = n.saturating_add(b),
            None => by_type.push((t.ggml_type, b)),
        }
        match t.block_index() {
            Some(i) if (i as usize) < layer_bytes.len() => {
                layer_bytes[i as usize] = layer_bytes[i as usize].saturating_add(b)
            }
            _ => {
                let base = t.name.split('.').next().unwrap_or("");
                match base {
                    "token_embd" => {
                        embd = embd.saturating_add(b);
                        input = input.saturating_add(b);
                    }
                    "position_embd" | "token_types" | "token_embd_norm" => {
                        input = input.saturating_add(b)
                    }
                    "output" => {
                        output_head = output_head.saturating_add(b);
                        output = output.saturating_add(b);
                    }
                    // output_norm, rope_freqs, extra (e.g. next-token) blocks: with the output.
                    _ => output = output.saturating_add(b),
                }
            }
        }
    }
    if output_head == 0 {
        // Tied embeddings: llama.cpp duplicates token_embd as the output head.
        output = output.saturating_add(embd);
    }
    let weight_dtype = by_type
        .iter()
        .max_by_key(|(_, n)| *n)
        .map(|(t, _)| t.name().to_owned())
        .unwrap_or_else(|| "unknown".into());

    Ok(ModelProfile {
        format: ProfileFormat::Gguf,
        name: g.get_str("general.name").ok().flatten().map(str::to_owned),
        architecture: arch,
        weight_dtype,
        parameters: g.parameter_count(),
        weights: WeightBytes {
            total: g.tensor_bytes(),
            input,
            output,
            layers: layer_bytes,
            exact: true,
        },
        layers: n_layers,
        context_length: context,
        embedding_length: n_embd,
        feed_forward_length: n_ff,
        vocab_size,
        attention: Attention {
            heads,
            kv_heads,
            kv_heads_per_layer: kv_per_layer,
            key_length,
            value_length,
            sliding_window,
            sliding_layers,
            kv_lora_rank,
            q_lora_rank,
            rope_dim,
        },
        experts,
    })
}

/// A number, or the largest of a per-layer list of numbers.
fn scalar_or_max(v: &MetaValue) -> Option<u64> {
    match v {
        MetaValue::Array { items, .. } => {
            let mut max = 0;
            for i in items {
                max = max.max(i.as_u64()?);
            }
            Some(max)
        }
        _ => v.as_u64(),
    }
}

/// llama.cpp's `set_swa_pattern(n)`: every n-th layer is full attention, the rest slide.
pub(crate) fn pattern_layers(layers: u32, n: u32) -> Vec<bool> {
    (0..layers).map(|il| n == 0 || il % n < n - 1).collect()
}

/// How a start command names its model: a path on the worker/analyzer's filesystem (a GGUF
/// file or a Hugging Face directory), a full profile computed elsewhere, or explicit numbers.
/// Serialized externally tagged: `{"path": "/models/x.gguf"}`, `{"profile": {…}}`,
/// `{"explicit": {"parameters": …}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelRef {
    Path(PathBuf),
    Profile(Box<ModelProfile>),
    Explicit(ExplicitProfile),
}

impl ModelRef {
    /// The profile: read from the files for a path (headers only), checked for the others.
    pub fn resolve(&self) -> Result<ModelProfile, ProfileError> {
        match self {
            Self::Path(p) => profile_from_path(p),
            Self::Profile(p) => {
                p.validate()?;
                Ok((**p).clone())
            }
            Self::Explicit(e) => e.to_profile(),
        }
    }
}

/// Weight storage for an explicit profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDtype {
    F32,
    F16,
    Bf16,
    Fp8,
    Int8,
    Int4,
}

impl WeightDtype {
    /// Bits per parameter, quantization scales included for the integer formats (one f16
    /// scale per group of 128 weights, AWQ/GPTQ's usual layout).
    pub fn bits(self) -> f64 {
        match self {
            Self::F32 => 32.0,
            Self::F16 | Self::Bf16 => 16.0,
            Self::Fp8 => 8.0,
            Self::Int8 => 8.0 + 16.0 / 128.0,
            Self::Int4 => 4.0 + 2.0 * 16.0 / 128.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Fp8 => "fp8",
            Self::Int8 => "int8",
            Self::Int4 => "int4",
        }
    }
}

/// A profile given as numbers, for clients without files to share (e.g. inline in a start
/// command). Optional fields refine the estimate; without them the attention head count is
/// taken equal to the KV heads and the vocabulary and hidden size are left out of the compute
/// estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplicitProfile {
    pub parameters: u64,
    pub dtype: WeightDtype,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub context_length: u64,
    #[serde(default)]
    pub heads: Option<u32>,
    #[serde(default)]
    pub hidden_size: Option<u32>,
    #[serde(default)]
    pub intermediate_size: Option<u32>,
    #[serde(default)]
    pub vocab_size: Option<u32>,
    /// Exact weight bytes when known (overrides `parameters × dtype`).
    #[serde(default)]
    pub weight_bytes: Option<u64>,
    #[serde(default)]
    pub name: Option<String>,
}

impl ExplicitProfile {
    pub fn to_profile(&self) -> Result<ModelProfile, ProfileError> {
        if self.layers == 0 || u64::from(self.layers) > MAX_LAYERS {
            return Err(ProfileError::invalid(
                "layers",
                format!("{} layers", self.layers),
            ));
        }
        if self.parameters == 0 && self.weight_bytes.is_none() {
            return Err(ProfileError::invalid("parameters", "must be positive"));
        }
        let heads = self.heads.unwrap_or(self.kv_heads);
        if self.kv_heads == 0 || self.head_dim == 0 || heads < self.kv_heads {
            return Err(ProfileError::invalid(
                "attention",
                format!(
                    "{} heads, {} KV heads of width {}",
                    heads, self.kv_heads, self.head_dim
                ),
            ));
        }
        let total = match self.weight_bytes {
            Some(b) => b,
            None => {
                let b = self.parameters as f64 * self.dtype.bits() / 8.0;
                if !b.is_finite() || b >= u64::MAX as f64 {
                    return Err(ProfileError::invalid("parameters", "too many"));
                }
                b.ceil() as u64
            }
        };
        let hidden = self
            .hidden_size
            .unwrap_or_else(|| heads.saturating_mul(self.head_dim));
        Ok(ModelProfile {
            format: ProfileFormat::Explicit,
            architecture: "explicit".into(),
            name: self.name.clone(),
            weight_dtype: self.dtype.name().into(),
            parameters: self.parameters,
            weights: WeightBytes {
                total,
                input: 0,
                output: 0,
                layers: Vec::new(),
                exact: self.weight_bytes.is_some(),
            },
            layers: self.layers,
            context_length: self.context_length,
            embedding_length: hidden,
            feed_forward_length: self.intermediate_size.unwrap_or(0),
            vocab_size: self.vocab_size.unwrap_or(0),
            attention: Attention {
                heads,
                kv_heads: self.kv_heads,
                kv_heads_per_layer: Vec::new(),
                key_length: self.head_dim,
                value_length: self.head_dim,
                sliding_window: None,
                sliding_layers: Vec::new(),
                kv_lora_rank: None,
                q_lora_rank: None,
                rope_dim: None,
            },
            experts: None,
        })
    }
}

/// Largest value accepted for a head count, head width or rank.
const MAX_HEADS: u32 = 1 << 16;

impl ModelProfile {
    /// Checks that the shape is plausible and the per-layer lists match the layer count. A
    /// profile read from a file passes by construction; one carried inline in a command may
    /// not, and the estimators refuse it rather than allocate or overflow.
    pub fn validate(&self) -> Result<(), ProfileError> {
        let bad = |what: &str, reason: String| Err(ProfileError::invalid(what, reason));
        if self.layers == 0 || u64::from(self.layers) > MAX_LAYERS {
            return bad("layers", format!("{} (1..={MAX_LAYERS})", self.layers));
        }
        let n = self.layers as usize;
        let a = &self.attention;
        for (what, len) in [
            ("weights.layers", self.weights.layers.len()),
            ("attention.kv_heads_per_layer", a.kv_heads_per_layer.len()),
            ("attention.sliding_layers", a.sliding_layers.len()),
        ] {
            if len != 0 && len != n {
                return bad(what, format!("{len} entries for {n} layers"));
            }
        }
        for (what, v) in [
            ("attention.heads", a.heads),
            ("attention.kv_heads", a.kv_heads),
            ("attention.key_length", a.key_length),
            ("attention.value_length", a.value_length),
            ("attention.kv_lora_rank", a.kv_lora_rank.unwrap_or(0)),
            ("attention.rope_dim", a.rope_dim.unwrap_or(0)),
        ] {
            if v > MAX_HEADS {
                return bad(what, format!("{v} exceeds {MAX_HEADS}"));
            }
        }
        if let Some(h) = a.kv_heads_per_layer.iter().find(|&&h| h > MAX_HEADS) {
            return bad(
                "attention.kv_heads_per_layer",
                format!("{h} exceeds {MAX_HEADS}"),
            );
        }
        Ok(())
    }

    /// Weight bytes of each layer: the per-layer split when known, else the layer share of
    /// the total spread evenly.
    pub fn layer_weight_bytes(&self) -> Vec<u64> {
        let n = self.layers as usize;
        if self.weights.layers.len() == n {
            return self.weights.layers.clone();
        }
        let rest = self
            .weights
            .total
            .saturating_sub(self.weights.input)
            .saturating_sub(self.weights.output);
        let each = rest / n.max(1) as u64;
        let mut v = vec![each; n];
        if let Some(last) = v.last_mut() {
            *last = last.saturating_add(rest) - each * n as u64;
        }
        v
    }

    /// KV heads of layer `il`.
    pub fn kv_heads_of(&self, il: usize) -> u32 {
        self.attention
            .kv_heads_per_layer
            .get(il)
            .copied()
            .unwrap_or(self.attention.kv_heads)
    }

    /// Whether layer `il` uses sliding-window attention.
    pub fn is_sliding(&self, il: usize) -> bool {
        self.attention.sliding_window.is_some()
            && self
                .attention
                .sliding_layers
                .get(il)
                .copied()
                .unwrap_or(false)
    }

    /// Whether a tensor-parallel size suits the model: vLLM requires the attention heads to
    /// divide evenly, and the KV heads either to divide evenly or to be replicated a whole
    /// number of times.
    pub fn supports_tensor_parallel(&self, tp: u32) -> bool {
        if tp == 0 {
            return false;
        }
        if tp == 1 {
            return true;
        }
        let a = &self.attention;
        if a.heads == 0 || !a.heads.is_multiple_of(tp) {
            return false;
        }
        if a.kv_lora_rank.is_some() {
            return true;
        }
        let kv = a.kv_heads.max(1);
        if kv >= tp {
            kv.is_multiple_of(tp)
        } else {
            tp.is_multiple_of(kv)
        }
    }

    /// The tensor-parallel sizes up to `max` that [`Self::supports_tensor_parallel`].
    pub fn tensor_parallel_sizes(&self, max: u32) -> Vec<u32> {
        (1..=max)
            .filter(|&tp| self.supports_tensor_parallel(tp))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::testutil::*;
    use crate::gguf::{GgmlType, parse_gguf};

    #[test]
    fn profile_of_the_tiny_llama() {
        let bytes = tiny_llama(3);
        let g = parse_gguf(&bytes[..], &GgufLimits::default()).unwrap();
        let p = profile_from_gguf(&g).unwrap();
        assert_eq!(p.format, ProfileFormat::Gguf);
        assert_eq!(p.architecture, "llama");
        assert_eq!(p.name.as_deref(), Some("tiny"));
        assert_eq!(p.layers, 2);
        assert_eq!(p.context_length, 2048);
        assert_eq!(p.embedding_length, 64);
        assert_eq!(p.feed_forward_length, 128);
        assert_eq!(p.vocab_size, 256);
        assert_eq!(p.attention.heads, 4);
        assert_eq!(p.attention.kv_heads, 2);
        assert_eq!(p.attention.key_length, 16);
        assert_eq!(p.attention.value_length, 16);
        assert_eq!(p.experts, None);
        let embd = GgmlType::Q8_0.row_bytes(64).unwrap() * 256;
        assert_eq!(p.weights.input, embd);
        // Tied: the output head is the embedding copy, plus the norm.
        assert_eq!(p.weights.output, embd + 64 * 4);
        assert_eq!(
            p.weights.total,
            p.weights.input + p.weights.layers.iter().sum::<u64>() + 64 * 4
        );
        assert_eq!(p.weights.layers[0], p.weights.layers[1]);
        assert_eq!(p.parameters, g.parameter_count());
        // The profile survives JSON.
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<ModelProfile>(&json).unwrap(), p);
    }

    fn arch_file(arch: &str, extra: Vec<(String, MetaValue)>) -> GgufFile {
        let mut kvs: Vec<(String, MetaValue)> = vec![
            ("general.architecture".into(), string(arch)),
            (format!("{arch}.block_count"), MetaValue::U32(12)),
            (format!("{arch}.embedding_length"), MetaValue::U32(1024)),
            (format!("{arch}.attention.head_count"), MetaValue::U32(8)),
        ];
        kvs.extend(extra);
        let refs: Vec<(&str, MetaValue)> =
            kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let bytes = file(3, &refs, &[]);
        parse_gguf(&bytes[..], &GgufLimits::default()).unwrap()
    }

    #[test]
    fn sliding_window_patterns() {
        let g = arch_file(
            "gemma3",
            vec![(
                "gemma3.attention.sliding_window".into(),
                MetaValue::U32(1024),
            )],
        );
        let p = profile_from_gguf(&g).unwrap();
        assert_eq!(p.attention.sliding_window, Some(1024));
        let full: Vec<usize> = (0..12).filter(|&i| !p.is_sliding(i)).collect();
        assert_eq!(full, vec![5, 11]);

        // An explicit pattern array wins; an unknown architecture without one slides nowhere.
        let pattern = MetaValue::Array {
            elem: gguf::ValueType::Bool,
            items: (0..12).map(|i| MetaValue::Bool(i % 3 != 0)).collect(),
        };
        let g = arch_file(
            "newarch",
            vec![
                (
                    "newarch.attention.sliding_window".into(),
                    MetaValue::U32(64),
                ),
                ("newarch.attention.sliding_window_pattern".into(), pattern),
            ],
        );
        let p = profile_from_gguf(&g).unwrap();
        assert_eq!((0..12).filter(|&i| p.is_sliding(i)).count(), 8);
        let g = arch_file(
            "newarch",
            vec![(
                "newarch.attention.sliding_window".into(),
                MetaValue::U32(64),
            )],
        );
        assert_eq!(
            (0..12)
                .filter(|&i| profile_from_gguf(&g).unwrap().is_sliding(i))
                .count(),
            0
        );
    }

    #[test]
    fn per_layer_kv_heads_moe_and_mla() {
        let kv = MetaValue::Array {
            elem: gguf::ValueType::U32,
            items: (0..12)
                .map(|i| MetaValue::U32(if i % 4 == 3 { 0 } else { 2 }))
                .collect(),
        };
        let g = arch_file(
            "deepseek2",
            vec![
                ("deepseek2.attention.head_count_kv".into(), kv),
                ("deepseek2.expert_count".into(), MetaValue::U32(64)),
                ("deepseek2.expert_used_count".into(), MetaValue::U32(6)),
                (
                    "deepseek2.attention.kv_lora_rank".into(),
                    MetaValue::U32(512),
                ),
                (
                    "deepseek2.attention.q_lora_rank".into(),
                    MetaValue::U32(1536),
                ),
                ("deepseek2.rope.dimension_count".into(), MetaValue::U32(64)),
                ("deepseek2.attention.key_length".into(), MetaValue::U32(576)),
                (
                    "deepseek2.attention.value_length".into(),
                    MetaValue::U32(512),
                ),
            ],
        );
        let p = profile_from_gguf(&g).unwrap();
        assert_eq!(p.attention.kv_heads, 2);
        assert_eq!(p.kv_heads_of(3), 0);
        assert_eq!(p.kv_heads_of(4), 2);
        assert_eq!(p.experts, Some(Experts { count: 64, used: 6 }));
        assert_eq!(p.attention.kv_lora_rank, Some(512));
        assert_eq!(p.attention.q_lora_rank, Some(1536));
        assert_eq!(p.attention.rope_dim, Some(64));
        assert_eq!(
            (p.attention.key_length, p.attention.value_length),
            (576, 512)
        );
    }

    #[test]
    fn bad_architecture_values_are_errors() {
        for (k, v, want) in [
            ("x.block_count", MetaValue::U64(1 << 40), "layers"),
            (
                "x.block_count",
                string("many"),
                "not a non-negative integer",
            ),
            (
                "x.embedding_length",
                MetaValue::U64(1 << 40),
                "out of range",
            ),
        ] {
            let g = arch_file("x", vec![]);
            let mut g = g;
            g.metadata.insert(k.into(), v);
            let err = profile_from_gguf(&g).unwrap_err().to_string();
            assert!(err.contains(want), "{k}: {err}");
        }
        let mut g = arch_file("x", vec![]);
        g.metadata.remove("general.architecture");
        assert!(matches!(
            profile_from_gguf(&g),
            Err(ProfileError::Missing(_))
        ));
    }

    #[test]
    fn explicit_profiles() {
        let e = ExplicitProfile {
            parameters: 8_030_000_000,
            dtype: WeightDtype::Bf16,
            layers: 32,
            kv_heads: 8,
            head_dim: 128,
            context_length: 8192,
            heads: Some(32),
            hidden_size: None,
            intermediate_size: None,
            vocab_size: Some(128_256),
            weight_bytes: None,
            name: None,
        };
        let p = e.to_profile().unwrap();
        assert_eq!(p.weights.total, 16_060_000_000);
        assert_eq!(p.embedding_length, 4096);
        assert_eq!(p.layer_weight_bytes().iter().sum::<u64>(), p.weights.total);
        assert_eq!(p.tensor_parallel_sizes(8), vec![1, 2, 4, 8]);
        // From JSON, with only the required fields.
        let j = r#"{"parameters": 1000000, "dtype": "int4", "layers": 4, "kv_heads": 2,
                    "head_dim": 64, "context_length": 4096}"#;
        let p = serde_json::from_str::<ExplicitProfile>(j)
            .unwrap()
            .to_profile()
            .unwrap();
        assert_eq!(p.attention.heads, 2);
        for bad in [
            ExplicitProfile {
                layers: 0,
                ..e.clone()
            },
            ExplicitProfile {
                kv_heads: 0,
                ..e.clone()
            },
            ExplicitProfile {
                heads: Some(4),
                ..e.clone()
            },
            ExplicitProfile {
                parameters: 0,
                ..e.clone()
            },
            ExplicitProfile {
                parameters: u64::MAX,
                dtype: WeightDtype::F32,
                ..e
            },
        ] {
            assert!(bad.to_profile().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn model_refs_resolve() {
        let j = r#"{"explicit": {"parameters": 1000, "dtype": "f16", "layers": 2,
                    "kv_heads": 1, "head_dim": 8, "context_length": 64}}"#;
        let r: ModelRef = serde_json::from_str(j).unwrap();
        let p = r.resolve().unwrap();
        assert_eq!(p.weights.total, 2000);
        let back = ModelRef::Profile(Box::new(p.clone()));
        let j = serde_json::to_string(&back).unwrap();
        assert_eq!(
            serde_json::from_str::<ModelRef>(&j)
                .unwrap()
                .resolve()
                .unwrap(),
            p
        );
        let mut bad = p;
        bad.layers = 0;
        assert!(ModelRef::Profile(Box::new(bad)).resolve().is_err());
        let r: ModelRef = serde_json::from_str(r#"{"path": "/nonexistent/model.gguf"}"#).unwrap();
        assert!(matches!(r.resolve(), Err(ProfileError::Io { .. })));
    }

    #[test]
    fn tensor_parallel_rules() {
        let mut p = ExplicitProfile {
            parameters: 1,
            dtype: WeightDtype::F16,
            layers: 1,
            kv_heads: 2,
            head_dim: 64,
            context_length: 1,
            heads: Some(24),
            hidden_size: None,
            intermediate_size: None,
            vocab_size: None,
            weight_bytes: None,
            name: None,
        }
        .to_profile()
        .unwrap();
        // 24 heads: 1,2,3,4,6,8; 2 KV heads: divides or is divided by tp → 1,2,4,6,8.
        assert_eq!(p.tensor_parallel_sizes(8), vec![1, 2, 4, 6, 8]);
        p.attention.kv_lora_rank = Some(512);
        assert_eq!(p.tensor_parallel_sizes(8), vec![1, 2, 3, 4, 6, 8]);
        assert!(!p.supports_tensor_parallel(0));
    }

    #[test]
    fn split_names() {
        let v = split_paths(Path::new("/m/Big-Q4_K_M-00001-of-00003.gguf"), 3).unwrap();
        assert_eq!(v[2], Path::new("/m/Big-Q4_K_M-00003-of-00003.gguf"));
        assert!(split_paths(Path::new("/m/Big.gguf"), 3).is_none());
        assert!(split_paths(Path::new("/m/Big-00001-of-00002.gguf"), 3).is_none());
    }

    #[test]
    fn split_files_are_summed() {
        let dir = tempfile::tempdir().unwrap();
        let t = |name: &str| Tensor {
            name: name.into(),
            dims: vec![32, 4],
            ty: GgmlType::F16,
        };
        let meta = |idx: u16| {
            vec![
                ("general.architecture", string("llama")),
                ("llama.block_count", MetaValue::U32(2)),
                ("llama.embedding_length", MetaValue::U32(32)),
                ("split.count", MetaValue::U16(2)),
                ("split.no", MetaValue::U16(idx)),
            ]
        };
        let a = file(3, &meta(0), &[t("blk.0.attn_q.weight")]);
        let b = file(3, &meta(1), &[t("blk.1.attn_q.weight")]);
        let first = dir.path().join("m-00001-of-00002.gguf");
        std::fs::write(&first, a).unwrap();
        let second = dir.path().join("m-00002-of-00002.gguf");
        std::fs::write(&second, b).unwrap();
        let p = profile_from_path(&first).unwrap();
        assert_eq!(p.weights.layers, vec![256, 256]);
        std::fs::remove_file(&second).unwrap();
        assert!(matches!(
            profile_from_path(&first),
            Err(ProfileError::Gguf { .. })
        ));
    }

    #[test]
    fn not_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.bin");
        std::fs::write(&f, b"hello").unwrap();
        assert!(matches!(
            profile_from_path(&f),
            Err(ProfileError::NotAModel(_))
        ));
        assert!(matches!(
            profile_from_path(&dir.path().join("missing")),
            Err(ProfileError::Io { .. })
        ));
        // A directory without config.json.
        assert!(profile_from_path(dir.path()).is_err());
    }
}
