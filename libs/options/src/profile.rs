//! What the estimators need to know about a model ([`ModelProfile`]), however it was named:
//! read from a GGUF file or a Hugging Face directory (by `berth-models`), given as numbers
//! ([`ExplicitProfile`]), or carried whole in a start command ([`ModelRef`]).
//!
//! Every profile, from whichever source, passes [`ModelProfile::validate`] before it is used:
//! the readers and [`ExplicitProfile::to_profile`] end with it, a profile carried in a command
//! is checked when it is resolved, and the estimators check again.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// More layers than any model has; a larger count is a corrupt or hostile file.
pub const MAX_LAYERS: u64 = 1 << 14;
/// Largest value accepted for a head count, head width or rank.
pub const MAX_HEADS: u32 = 1 << 16;

/// A profile value that is missing its meaning: out of range, or a per-layer list that does
/// not match the layer count. `what` names the value (a profile field, or the key of the
/// file it was read from).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct InvalidProfile {
    pub what: String,
    pub reason: String,
}

impl InvalidProfile {
    pub fn new(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// A layer count as every profile must have it: 1..=[`MAX_LAYERS`]. Part of
/// [`ModelProfile::validate`]; the readers call it as soon as they read the count, since they
/// size per-layer lists by it.
pub fn layer_count(what: &str, layers: u64) -> Result<u32, InvalidProfile> {
    u32::try_from(layers)
        .ok()
        .filter(|&n| n > 0 && u64::from(n) <= MAX_LAYERS)
        .ok_or_else(|| InvalidProfile::new(what, format!("{layers} layers (1..={MAX_LAYERS})")))
}

/// A model's shape and weight sizes: everything the memory estimators read.
///
/// Serializable, so a profile can be cached, shown as JSON, or carried inline in a start
/// command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Dense feed-forward width (`intermediate_size`). For MoE models the experts' own
    /// width is `experts.feed_forward_length`; without it, this is the expert width.
    pub feed_forward_length: u32,
    pub vocab_size: u32,
    pub attention: Attention,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub experts: Option<Experts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ProfileFormat {
    Gguf,
    HuggingFace,
    Explicit,
}

/// Weight bytes, split the way offloading splits them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// Mixture-of-experts layout. The widths are optional so profiles written before they
/// existed still read; [`Experts::expert_width`] says what a missing one means.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Experts {
    pub count: u32,
    /// Experts routed to per token (`num_experts_per_tok`).
    pub used: u32,
    /// Feed-forward width of one routed expert (`moe_intermediate_size`, GGUF
    /// `expert_feed_forward_length`). `None`: the profile's `feed_forward_length`, which is
    /// the expert width in Mixtral-style configs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feed_forward_length: Option<u32>,
    /// Feed-forward width of the always-active shared experts together (DeepSeek
    /// `n_shared_experts × moe_intermediate_size`, Qwen-MoE `shared_expert_intermediate_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_feed_forward_length: Option<u32>,
    /// Layers with a dense MLP of the profile's `feed_forward_length` instead of experts
    /// (DeepSeek `first_k_dense_replace`, GGUF `leading_dense_block_count`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dense_layers: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Experts {
    /// Width of one routed expert, given the profile's dense `feed_forward_length`.
    pub fn expert_width(&self, feed_forward_length: u32) -> u32 {
        self.feed_forward_length.unwrap_or(feed_forward_length)
    }
}

/// llama.cpp's `set_swa_pattern(n)`: every n-th layer is full attention, the rest slide.
pub fn pattern_layers(layers: u32, n: u32) -> Vec<bool> {
    (0..layers).map(|il| n == 0 || il % n < n - 1).collect()
}

/// How a start command names its model: a path on the worker/analyzer's filesystem (a GGUF
/// file or a Hugging Face directory), a full profile computed elsewhere, or explicit numbers.
/// Serialized externally tagged: `{"path": "/models/x.gguf"}`, `{"profile": {…}}`,
/// `{"explicit": {"parameters": …}}`.
/// `berth-models`' `resolve` turns one into a checked [`ModelProfile`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ModelRef {
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    Path(PathBuf),
    Profile(Box<ModelProfile>),
    Explicit(ExplicitProfile),
}

/// Weight storage for an explicit profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The profile these numbers describe. Beyond [`ModelProfile::validate`], which the
    /// result passes, numbers given by hand must say something: a positive size and at least
    /// one KV head of some width.
    pub fn to_profile(&self) -> Result<ModelProfile, InvalidProfile> {
        if self.parameters == 0 && self.weight_bytes.is_none() {
            return Err(InvalidProfile::new("parameters", "must be positive"));
        }
        let heads = self.heads.unwrap_or(self.kv_heads);
        if self.kv_heads == 0 || self.head_dim == 0 || heads < self.kv_heads {
            return Err(InvalidProfile::new(
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
                    return Err(InvalidProfile::new("parameters", "too many"));
                }
                b.ceil() as u64
            }
        };
        let hidden = self
            .hidden_size
            .unwrap_or_else(|| heads.saturating_mul(self.head_dim));
        let profile = ModelProfile {
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
        };
        profile.validate()?;
        Ok(profile)
    }
}

impl ModelProfile {
    /// The one check every profile passes, whatever its source (a GGUF file, a Hugging Face
    /// directory, explicit numbers, or a whole profile carried in a command): the layer count
    /// in range ([`layer_count`]), the per-layer lists as long as the layer count, and head
    /// counts, widths and ranks plausible. The estimators refuse a profile that fails rather
    /// than allocate or overflow.
    pub fn validate(&self) -> Result<(), InvalidProfile> {
        let bad = |what: &str, reason: String| Err(InvalidProfile::new(what, reason));
        layer_count("layers", u64::from(self.layers))?;
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
        if let Some(e) = self.experts
            && e.dense_layers > self.layers
        {
            return bad(
                "experts.dense_layers",
                format!("{} of {} layers", e.dense_layers, self.layers),
            );
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
}
