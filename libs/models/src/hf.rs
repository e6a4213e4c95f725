//! Hugging Face model directories: `config.json` for the shape; safetensors headers (or
//! `model.safetensors.index.json`) for exact weight bytes.

use crate::read::ProfileError;
use crate::roots::ModelAccess;
pub use crate::safetensors::{MAX_SAFETENSORS_HEADER, weights_from_safetensors};
use berth_options::{
    Attention, Experts, MAX_LAYERS, ModelProfile, ProfileFormat, WeightBytes, pattern_layers,
};
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

/// config.json and the index are small; anything larger is not one.
const MAX_JSON_FILE: u64 = 64 << 20;
/// More shards than any published model.
const MAX_SHARDS: usize = 4096;

/// Weight bytes read from safetensors headers or the index.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HfWeights {
    pub total: u64,
    pub parameters: Option<u64>,
    pub input: u64,
    pub output: u64,
    /// Per `layers.N` index; empty when only the total is known.
    pub layers: Vec<u64>,
    /// safetensors dtype holding the most bytes ("BF16", "F8_E4M3", "I32" …).
    pub dtype: Option<String>,
    /// Whether an `lm_head` tensor was seen (false: tied, or only the index was read).
    pub has_lm_head: bool,
}

/// Profiles a Hugging Face model directory (`dir` canonical, already checked by `access`),
/// opening each of its files through `access`.
pub fn profile_from_dir(dir: &Path, access: &ModelAccess) -> Result<ModelProfile, ProfileError> {
    let config_path = dir.join("config.json");
    // Inside a checked directory, whether config.json exists may be told.
    if std::fs::symlink_metadata(&config_path).is_err() {
        return Err(ProfileError::NotAModel(dir.to_owned()));
    }
    let config = read_json(&config_path, access)?;
    let shards = safetensors_files(dir)?;
    let weights = if !shards.is_empty() {
        Some(weights_from_safetensors(
            &shards,
            layer_count(&config),
            access,
        )?)
    } else {
        let index = dir.join("model.safetensors.index.json");
        if std::fs::symlink_metadata(&index).is_ok() {
            Some(weights_from_index(&index, access)?)
        } else {
            None
        }
    };
    profile_from_config(&config, weights.as_ref())
}

fn read_json(path: &Path, access: &ModelAccess) -> Result<Value, ProfileError> {
    let io_err = |source| ProfileError::Io {
        path: path.to_owned(),
        source,
    };
    let (_, _, f) = access.open_file(path)?;
    let mut buf = Vec::new();
    f.take(MAX_JSON_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    if buf.len() as u64 > MAX_JSON_FILE {
        return Err(ProfileError::invalid(
            path.display().to_string(),
            format!("larger than {MAX_JSON_FILE} bytes"),
        ));
    }
    serde_json::from_slice(&buf).map_err(|source| ProfileError::Json {
        path: path.to_owned(),
        source,
    })
}

/// The `*.safetensors` entries of `dir` (files or links; each is checked when opened).
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ProfileError> {
    let io_err = |source| ProfileError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let path = entry.path();
        let ty = entry.file_type().map_err(io_err)?;
        if path.extension().is_some_and(|e| e == "safetensors") && !ty.is_dir() {
            out.push(path);
            if out.len() > MAX_SHARDS {
                return Err(ProfileError::invalid(
                    dir.display().to_string(),
                    format!("more than {MAX_SHARDS} safetensors files"),
                ));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The text model's section of a config: multimodal configs nest it under `text_config`.
fn text_config(config: &Value) -> &Value {
    match config.get("text_config") {
        Some(t) if t.is_object() && config.get("num_hidden_layers").is_none() => t,
        _ => config,
    }
}

fn layer_count(config: &Value) -> Option<u64> {
    first_u64(
        text_config(config),
        &["num_hidden_layers", "n_layer", "num_layers"],
    )
    .filter(|&n| n <= MAX_LAYERS)
}

fn first_u64(v: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_u64))
}

/// `model.safetensors.index.json`: `metadata.total_size` is the exact weight bytes.
pub fn weights_from_index(path: &Path, access: &ModelAccess) -> Result<HfWeights, ProfileError> {
    let v = read_json(path, access)?;
    let meta = v.get("metadata");
    let total = meta
        .and_then(|m| m.get("total_size"))
        .and_then(Value::as_u64)
        .ok_or_else(|| {
            ProfileError::invalid(path.display().to_string(), "no metadata.total_size")
        })?;
    Ok(HfWeights {
        total,
        parameters: meta
            .and_then(|m| m.get("total_parameters"))
            .and_then(Value::as_u64),
        ..HfWeights::default()
    })
}

/// Bits per weight of a `quantization_config`, with a name for it.
fn quantization(q: &Value) -> Option<(String, f64)> {
    let method = q
        .get("quant_method")
        .and_then(Value::as_str)?
        .to_lowercase();
    let bits = q.get("bits").and_then(Value::as_u64);
    let group = q
        .get("group_size")
        .and_then(Value::as_i64)
        .filter(|&g| g > 0)
        .unwrap_or(128) as f64;
    Some(match method.as_str() {
        "fp8" | "fbgemm_fp8" | "modelopt" => ("fp8".into(), 8.0),
        "mxfp4" => ("mxfp4".into(), 4.25),
        "awq" | "gptq" | "awq_marlin" | "gptq_marlin" | "autoround" | "auto-round" => {
            let b = bits.unwrap_or(4);
            // Packed weights plus an f16 scale (and a packed zero point) per group.
            (
                format!("{method}-int{b}"),
                b as f64 + 16.0 / group + b as f64 / group,
            )
        }
        "bitsandbytes" => {
            if q.get("load_in_4bit").and_then(Value::as_bool) == Some(true) {
                // 4-bit weights and an f32 absmax per 64; double quantization stores the
                // absmax in 8 bits with an f32 scale per 256 of them.
                let double = q.get("bnb_4bit_use_double_quant").and_then(Value::as_bool);
                let absmax = if double == Some(true) {
                    8.0 / 64.0 + 32.0 / (64.0 * 256.0)
                } else {
                    32.0 / 64.0
                };
                ("bnb-4bit".into(), 4.0 + absmax)
            } else {
                ("bnb-8bit".into(), 8.0)
            }
        }
        "compressed-tensors" => {
            let fmt = q.get("format").and_then(Value::as_str).unwrap_or("");
            let nb = q
                .get("config_groups")
                .and_then(Value::as_object)
                .and_then(|g| g.values().next())
                .and_then(|g| g.get("weights"))
                .and_then(|w| w.get("num_bits"))
                .and_then(Value::as_u64)
                .unwrap_or(8);
            if fmt.contains("float") {
                (format!("compressed-fp{nb}"), nb as f64)
            } else {
                (format!("compressed-int{nb}"), nb as f64 + 16.0 / group)
            }
        }
        other => (other.to_owned(), bits.map_or(16.0, |b| b as f64)),
    })
}

/// Layers of an MoE config that keep a dense MLP: DeepSeek's leading
/// `first_k_dense_replace`, Qwen-MoE's `mlp_only_layers` and the layers between its
/// `decoder_sparse_step` sparse ones.
fn dense_mlp_layers(c: &Value, layers: u32) -> u32 {
    let n = u64::from(layers);
    let leading = first_u64(c, &["first_k_dense_replace"]).unwrap_or(0);
    let listed = c
        .get("mlp_only_layers")
        .and_then(Value::as_array)
        .map_or(0, |l| {
            l.iter()
                .filter(|v| v.as_u64().is_some_and(|i| i < n))
                .count() as u64
        });
    let between = match first_u64(c, &["decoder_sparse_step"]) {
        Some(step) if step > 1 => n - n / step,
        _ => 0,
    };
    u32::try_from(
        leading
            .saturating_add(listed)
            .saturating_add(between)
            .min(n),
    )
    .unwrap_or(layers)
}

fn dtype_bits(name: &str) -> Option<(String, f64)> {
    Some(match name {
        "float32" | "float" | "fp32" => ("f32".into(), 32.0),
        "float16" | "half" | "fp16" => ("f16".into(), 16.0),
        "bfloat16" | "bf16" => ("bf16".into(), 16.0),
        "float8_e4m3fn" | "fp8" => ("fp8".into(), 8.0),
        _ => return None,
    })
}

/// Builds a profile from a parsed `config.json` and, when available, the weights read from
/// the files. Without them the weight bytes are estimated from the shape and dtype. The
/// profile passes [`ModelProfile::validate`].
pub fn profile_from_config(
    config: &Value,
    weights: Option<&HfWeights>,
) -> Result<ModelProfile, ProfileError> {
    let c = text_config(config);
    let u = |keys: &[&str]| first_u64(c, keys);
    let u32_of = |what: &str, v: u64| {
        u32::try_from(v).map_err(|_| ProfileError::invalid(what, format!("{v} is out of range")))
    };
    let layers = u(&["num_hidden_layers", "n_layer", "num_layers"])
        .ok_or_else(|| ProfileError::Missing("num_hidden_layers".into()))?;
    let layers = berth_options::layer_count("num_hidden_layers", layers)?;
    let hidden = u32_of(
        "hidden_size",
        u(&["hidden_size", "n_embd", "d_model"])
            .ok_or_else(|| ProfileError::Missing("hidden_size".into()))?,
    )?;
    let heads = u32_of(
        "num_attention_heads",
        u(&["num_attention_heads", "n_head", "num_heads"])
            .ok_or_else(|| ProfileError::Missing("num_attention_heads".into()))?,
    )?;
    if heads == 0 {
        return Err(ProfileError::invalid("num_attention_heads", "0"));
    }
    let kv_heads = match u(&[
        "num_key_value_heads",
        "num_kv_heads",
        "multi_query_group_num",
    ]) {
        Some(v) => u32_of("num_key_value_heads", v)?,
        None => heads,
    };
    let kv_lora_rank = u(&["kv_lora_rank"])
        .map(|v| u32_of("kv_lora_rank", v))
        .transpose()?;
    let q_lora_rank = u(&["q_lora_rank"])
        .map(|v| u32_of("q_lora_rank", v))
        .transpose()?;
    let rope_dim = u(&["qk_rope_head_dim"])
        .map(|v| u32_of("qk_rope_head_dim", v))
        .transpose()?;
    let (key_length, value_length) = match (u(&["qk_nope_head_dim"]), rope_dim) {
        (Some(nope), Some(rope)) => {
            let v = u(&["v_head_dim"]).unwrap_or(nope);
            (
                u32_of("qk_head_dim", nope.saturating_add(u64::from(rope)))?,
                u32_of("v_head_dim", v)?,
            )
        }
        _ => {
            let hd = match u(&["head_dim"]) {
                Some(v) => u32_of("head_dim", v)?,
                None => hidden / heads,
            };
            (hd, hd)
        }
    };
    let context = u(&[
        "max_position_embeddings",
        "n_positions",
        "max_sequence_length",
        "seq_length",
    ])
    .unwrap_or(0);
    let inter = u(&[
        "intermediate_size",
        "n_inner",
        "ffn_dim",
        "moe_intermediate_size",
    ])
    .unwrap_or(0);
    let moe_inter = u(&["moe_intermediate_size"]).filter(|&v| v > 0);
    let vocab = u32_of(
        "vocab_size",
        u(&["vocab_size", "padded_vocab_size"]).unwrap_or(0),
    )?;
    let arch = c
        .get("model_type")
        .or_else(|| config.get("model_type"))
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_owned();

    let experts = match u(&["num_local_experts", "num_experts", "n_routed_experts"]) {
        Some(n) if n > 0 => {
            // Shared experts: Qwen-MoE states their width, DeepSeek their count.
            let shared = match (
                u(&["shared_expert_intermediate_size"]).filter(|&v| v > 0),
                u(&["n_shared_experts", "num_shared_experts"]).filter(|&v| v > 0),
            ) {
                (Some(width), _) => Some(width),
                (None, Some(count)) => Some(count.saturating_mul(moe_inter.unwrap_or(inter))),
                (None, None) => None,
            };
            Some(Experts {
                count: u32_of("num_experts", n)?,
                used: u32_of(
                    "num_experts_per_tok",
                    u(&["num_experts_per_tok", "moe_topk"]).unwrap_or(0),
                )?,
                feed_forward_length: moe_inter
                    .map(|v| u32_of("moe_intermediate_size", v))
                    .transpose()?,
                shared_feed_forward_length: shared
                    .map(|v| u32_of("shared_expert_intermediate_size", v))
                    .transpose()?,
                dense_layers: dense_mlp_layers(c, layers),
            })
        }
        _ => None,
    };

    // Sliding window: which layers use it.
    let disabled = c.get("use_sliding_window").and_then(Value::as_bool) == Some(false);
    let window = u(&["sliding_window"]).filter(|&w| w > 0 && !disabled);
    let sliding_window = window.map(|w| u32_of("sliding_window", w)).transpose()?;
    let sliding_layers = match sliding_window {
        None => Vec::new(),
        Some(_) => {
            if let Some(types) = c.get("layer_types").and_then(Value::as_array) {
                types
                    .iter()
                    .take(layers as usize)
                    .map(|t| t.as_str().is_some_and(|s| s.contains("sliding")))
                    .collect()
            } else if let Some(p) =
                u(&["sliding_window_pattern"]).filter(|&p| p > 0 && p <= MAX_LAYERS)
            {
                pattern_layers(layers, p as u32)
            } else {
                match arch.as_str() {
                    "gemma2" => pattern_layers(layers, 2),
                    "gemma3" | "gemma3_text" => pattern_layers(layers, 6),
                    "cohere2" => pattern_layers(layers, 4),
                    // Mistral's config means every layer slides.
                    "mistral" => vec![true; layers as usize],
                    // Unknown layout: full attention everywhere (over-estimates, safely).
                    _ => Vec::new(),
                }
            }
        }
    };

    let dtype_name = c
        .get("torch_dtype")
        .or_else(|| c.get("dtype"))
        .or_else(|| config.get("torch_dtype"))
        .or_else(|| config.get("dtype"))
        .and_then(Value::as_str)
        .unwrap_or("bfloat16");
    let quant = config
        .get("quantization_config")
        .or_else(|| c.get("quantization_config"))
        .and_then(quantization);
    let quantized = quant.is_some();
    let (weight_dtype, bits) = match quant {
        Some(q) => q,
        None => dtype_bits(dtype_name).unwrap_or_else(|| (dtype_name.to_owned(), 16.0)),
    };
    // Quantization covers the decoder's linear layers; embeddings and the output head stay
    // in the model's 16-bit dtype (bitsandbytes replaces only nn.Linear modules, and AWQ,
    // GPTQ and FP8 checkpoints leave lm_head and the embeddings unquantized).
    let embed_bits = if quantized {
        dtype_bits(dtype_name).map_or(16.0, |(_, b)| b)
    } else {
        bits
    };
    let tied = c
        .get("tie_word_embeddings")
        .or_else(|| config.get("tie_word_embeddings"))
        .and_then(Value::as_bool)
        .unwrap_or(false);

    // Parameters from the shape (used when the files do not say).
    let h = u64::from(hidden);
    let (nh, kl, vl) = (
        u64::from(heads),
        u64::from(key_length),
        u64::from(value_length),
    );
    let attn = match kv_lora_rank.map(u64::from) {
        // MLA: q (through its own low rank when there is one), the latent kv_a, its
        // up-projection kv_b to the heads' keys and values, and o.
        Some(rank) => {
            let q = match q_lora_rank.map(u64::from) {
                Some(qr) => h.saturating_add(nh.saturating_mul(kl)).saturating_mul(qr),
                None => h.saturating_mul(nh).saturating_mul(kl),
            };
            let rope = u64::from(rope_dim.unwrap_or(0));
            let nope = kl.saturating_sub(rope);
            q.saturating_add(h.saturating_mul(rank.saturating_add(rope)))
                .saturating_add(
                    rank.saturating_mul(nh)
                        .saturating_mul(nope.saturating_add(vl)),
                )
                .saturating_add(nh.saturating_mul(vl).saturating_mul(h))
        }
        None => h
            .saturating_mul(nh)
            .saturating_mul(kl)
            .saturating_mul(2)
            .saturating_add(
                h.saturating_mul(u64::from(kv_heads))
                    .saturating_mul(kl.saturating_add(vl)),
            ),
    };
    let dense_mlp = h.saturating_mul(inter).saturating_mul(3);
    let mlp_params = match experts {
        Some(e) => {
            // Routed experts with their router, plus the shared experts.
            let moe = h
                .saturating_mul(moe_inter.unwrap_or(inter))
                .saturating_mul(3)
                .saturating_mul(u64::from(e.count))
                .saturating_add(h.saturating_mul(u64::from(e.count)))
                .saturating_add(
                    h.saturating_mul(u64::from(e.shared_feed_forward_length.unwrap_or(0)))
                        .saturating_mul(3),
                );
            let dense = u64::from(e.dense_layers);
            moe.saturating_mul(u64::from(layers) - dense)
                .saturating_add(dense_mlp.saturating_mul(dense))
        }
        None => dense_mlp.saturating_mul(u64::from(layers)),
    };
    let embed = u64::from(vocab) * h;
    let embed_params = if tied { embed } else { embed.saturating_mul(2) };
    let shape_params = u64::from(layers)
        .saturating_mul(attn)
        .saturating_add(mlp_params)
        .saturating_add(embed_params);

    let (parameters, weights) = match weights {
        Some(w) => {
            let parameters = w
                .parameters
                .unwrap_or_else(|| (w.total as f64 * 8.0 / bits).round() as u64);
            let per_layer = w.layers.len() == layers as usize && w.layers.iter().any(|&b| b > 0);
            let mut output = w.output;
            if per_layer && !w.has_lm_head {
                // Tied: the head is the embedding matrix.
                output = output.saturating_add(w.input);
            }
            (
                parameters,
                WeightBytes {
                    total: w.total,
                    input: if per_layer { w.input } else { 0 },
                    output: if per_layer { output } else { 0 },
                    layers: if per_layer {
                        w.layers.clone()
                    } else {
                        Vec::new()
                    },
                    exact: true,
                },
            )
        }
        None => {
            let total = (shape_params.saturating_sub(embed_params) as f64 * bits / 8.0
                + embed_params as f64 * embed_bits / 8.0)
                .ceil() as u64;
            let emb_bytes = (embed as f64 * embed_bits / 8.0) as u64;
            (
                shape_params,
                WeightBytes {
                    total,
                    input: emb_bytes,
                    output: emb_bytes,
                    layers: Vec::new(),
                    exact: false,
                },
            )
        }
    };
    let profile = ModelProfile {
        format: ProfileFormat::HuggingFace,
        architecture: arch,
        name: config
            .get("_name_or_path")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        weight_dtype,
        parameters,
        weights,
        layers,
        context_length: context,
        embedding_length: hidden,
        feed_forward_length: u32_of("intermediate_size", inter)?,
        vocab_size: vocab,
        attention: Attention {
            heads,
            kv_heads,
            kv_heads_per_layer: Vec::new(),
            key_length,
            value_length,
            sliding_window,
            sliding_layers,
            kv_lora_rank,
            q_lora_rank,
            rope_dim: kv_lora_rank.and(rope_dim),
        },
        experts,
    };
    profile.validate()?;
    Ok(profile)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::read::profile_from_path;
    use serde_json::{Map, json};
    use std::fs::File;

    /// Llama-3-8B's config.json (the keys that matter).
    pub(crate) fn llama3_8b_config() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "max_position_embeddings": 8192,
            "vocab_size": 128256,
            "torch_dtype": "bfloat16",
            "tie_word_embeddings": false
        })
    }

    /// Writes a safetensors file whose header lists `tensors` (name, dtype, shape, bytes per
    /// element); the data is a sparse hole of the right length.
    pub(crate) fn write_safetensors(path: &Path, tensors: &[(String, &str, Vec<u64>, u64)]) {
        let mut header = Map::new();
        let mut off = 0u64;
        for (name, dtype, shape, elem) in tensors {
            let bytes = shape.iter().product::<u64>() * elem;
            header.insert(
                name.clone(),
                json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + bytes]}),
            );
            off += bytes;
        }
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let h = serde_json::to_vec(&header).unwrap();
        let mut f = File::create(path).unwrap();
        std::io::Write::write_all(&mut f, &(h.len() as u64).to_le_bytes()).unwrap();
        std::io::Write::write_all(&mut f, &h).unwrap();
        f.set_len(8 + h.len() as u64 + off).unwrap();
    }

    /// A two-shard Llama-3-8B-shaped safetensors model in bf16.
    fn llama_tensors(
        layers: std::ops::Range<u64>,
        ends: bool,
    ) -> Vec<(String, &'static str, Vec<u64>, u64)> {
        let mut v = Vec::new();
        if ends {
            v.push((
                "model.embed_tokens.weight".into(),
                "BF16",
                vec![128_256, 4096],
                2,
            ));
            v.push(("lm_head.weight".into(), "BF16", vec![128_256, 4096], 2));
            v.push(("model.norm.weight".into(), "BF16", vec![4096], 2));
        }
        for l in layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            v.push((p("self_attn.q_proj.weight"), "BF16", vec![4096, 4096], 2));
            v.push((p("self_attn.k_proj.weight"), "BF16", vec![1024, 4096], 2));
            v.push((p("self_attn.v_proj.weight"), "BF16", vec![1024, 4096], 2));
            v.push((p("self_attn.o_proj.weight"), "BF16", vec![4096, 4096], 2));
            v.push((p("mlp.gate_proj.weight"), "BF16", vec![14336, 4096], 2));
            v.push((p("mlp.up_proj.weight"), "BF16", vec![14336, 4096], 2));
            v.push((p("mlp.down_proj.weight"), "BF16", vec![4096, 14336], 2));
            v.push((p("input_layernorm.weight"), "BF16", vec![4096], 2));
            v.push((p("post_attention_layernorm.weight"), "BF16", vec![4096], 2));
        }
        v
    }

    const LLAMA3_8B_PARAMS: u64 = 8_030_261_248;

    #[test]
    fn safetensors_headers_give_exact_bytes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            llama3_8b_config().to_string(),
        )
        .unwrap();
        write_safetensors(
            &dir.path().join("model-00001-of-00002.safetensors"),
            &llama_tensors(0..16, true),
        );
        write_safetensors(
            &dir.path().join("model-00002-of-00002.safetensors"),
            &llama_tensors(16..32, false),
        );
        let p = profile_from_path(dir.path()).unwrap();
        assert_eq!(p.format, ProfileFormat::HuggingFace);
        assert_eq!(p.architecture, "llama");
        assert_eq!(p.parameters, LLAMA3_8B_PARAMS);
        assert_eq!(p.weights.total, 2 * LLAMA3_8B_PARAMS);
        assert!(p.weights.exact);
        assert_eq!(p.weight_dtype, "bf16");
        assert_eq!(p.weights.layers.len(), 32);
        assert_eq!(p.weights.input, 128_256 * 4096 * 2);
        assert_eq!(p.weights.output, 128_256 * 4096 * 2 + 4096 * 2);
        assert_eq!(
            (
                p.layers,
                p.attention.heads,
                p.attention.kv_heads,
                p.attention.key_length
            ),
            (32, 32, 8, 128)
        );
        assert_eq!(
            (p.context_length, p.vocab_size, p.feed_forward_length),
            (8192, 128_256, 14336)
        );
        // config.json itself works as the path too.
        assert_eq!(
            profile_from_path(&dir.path().join("config.json")).unwrap(),
            p
        );
    }

    #[test]
    fn index_gives_the_total() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            llama3_8b_config().to_string(),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            json!({"metadata": {"total_size": 16_060_522_496u64}, "weight_map": {}}).to_string(),
        )
        .unwrap();
        let p = profile_from_path(dir.path()).unwrap();
        assert_eq!(p.weights.total, 16_060_522_496);
        assert!(p.weights.exact);
        assert_eq!(p.parameters, LLAMA3_8B_PARAMS);
        assert!(p.weights.layers.is_empty());
        assert_eq!(p.layer_weight_bytes().iter().sum::<u64>(), p.weights.total);
    }

    #[test]
    fn config_alone_is_estimated() {
        let p = profile_from_config(&llama3_8b_config(), None).unwrap();
        assert!(!p.weights.exact);
        // The shape formula lands within 0.1 % of the real count (it skips the norms).
        let err = (p.parameters as f64 - LLAMA3_8B_PARAMS as f64).abs() / LLAMA3_8B_PARAMS as f64;
        assert!(err < 0.001, "{}", p.parameters);
        assert_eq!(p.weights.total, 2 * p.parameters);
    }

    #[test]
    fn quantized_moe_mla_and_sliding_configs() {
        let mut c = llama3_8b_config();
        c["quantization_config"] = json!({"quant_method": "awq", "bits": 4, "group_size": 128});
        let p = profile_from_config(&c, None).unwrap();
        assert_eq!(p.weight_dtype, "awq-int4");
        // Linear layers at 4 + 16/128 + 4/128 bits, embeddings and head in f16: 5.73 GB,
        // the size of published Llama-3-8B AWQ checkpoints.
        let gb = p.weights.total as f64 / 1e9;
        assert!((5.70..5.76).contains(&gb), "{gb}");
        c["quantization_config"] = json!({"quant_method": "fp8"});
        let p = profile_from_config(&c, None).unwrap();
        let embeddings = 2 * 128_256 * 4096;
        assert_eq!(
            (p.weight_dtype.as_str(), p.weights.total),
            ("fp8", p.parameters + embeddings)
        );

        let p = fixture("deepseek-v3.json");
        assert_eq!(
            p.experts,
            Some(Experts {
                count: 256,
                used: 8,
                feed_forward_length: Some(2048),
                shared_feed_forward_length: Some(2048),
                dense_layers: 3,
            })
        );
        assert_eq!(
            (p.attention.kv_lora_rank, p.attention.rope_dim),
            (Some(512), Some(64))
        );
        assert_eq!(
            (p.attention.key_length, p.attention.value_length),
            (192, 128)
        );
        assert_eq!(p.feed_forward_length, 18432);
        // 671 B parameters (DeepSeek-V3's model card, without the MTP layer).
        assert_within(p.parameters, 671_000_000_000, 0.01);

        let gemma = json!({
            "model_type": "gemma3", "text_config": {
                "model_type": "gemma3_text", "num_hidden_layers": 12, "hidden_size": 1152,
                "intermediate_size": 6912, "num_attention_heads": 4, "num_key_value_heads": 1,
                "head_dim": 256, "sliding_window": 512, "max_position_embeddings": 32768,
                "vocab_size": 262144
            }, "torch_dtype": "bfloat16"
        });
        let p = profile_from_config(&gemma, None).unwrap();
        assert_eq!(p.architecture, "gemma3_text");
        assert_eq!(p.attention.key_length, 256);
        assert_eq!(
            (0..12).filter(|&i| !p.is_sliding(i)).collect::<Vec<_>>(),
            vec![5, 11]
        );

        let mut qwen = llama3_8b_config();
        qwen["sliding_window"] = json!(4096);
        qwen["use_sliding_window"] = json!(false);
        assert_eq!(
            profile_from_config(&qwen, None)
                .unwrap()
                .attention
                .sliding_window,
            None
        );
        qwen["use_sliding_window"] = json!(true);
        qwen["layer_types"] = json!(
            (0..32)
                .map(|i| if i < 28 {
                    "full_attention"
                } else {
                    "sliding_attention"
                })
                .collect::<Vec<_>>()
        );
        let p = profile_from_config(&qwen, None).unwrap();
        assert_eq!((0..32).filter(|&i| p.is_sliding(i)).count(), 4);
    }

    /// A profile from a fixture config in `tests/fixtures`.
    pub(crate) fn fixture(name: &str) -> ModelProfile {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        profile_from_config(&serde_json::from_str(&text).unwrap(), None).unwrap()
    }

    fn assert_within(got: u64, want: u64, tolerance: f64) {
        let err = (got as f64 - want as f64) / want as f64;
        assert!(
            err.abs() <= tolerance,
            "{got} vs {want}: {:+.2}%",
            err * 100.0
        );
    }

    #[test]
    fn moe_configs_carry_expert_widths() {
        // Mixtral: intermediate_size is the expert width; no shared experts, no dense layers.
        let p = fixture("mixtral-8x7b.json");
        assert_eq!(
            p.experts,
            Some(Experts {
                count: 8,
                used: 2,
                ..Experts::default()
            })
        );
        assert_eq!(p.feed_forward_length, 14336);
        assert_within(p.parameters, 46_702_792_704, 0.001);
        // Qwen-MoE states the shared experts' width; every layer is sparse.
        let p = fixture("qwen1.5-moe-a2.7b.json");
        assert_eq!(
            p.experts,
            Some(Experts {
                count: 60,
                used: 4,
                feed_forward_length: Some(1408),
                shared_feed_forward_length: Some(5632),
                dense_layers: 0,
            })
        );
        assert_within(p.parameters, 14_315_784_192, 0.01);
        // DeepSeek-V2-Lite: two shared experts of the expert width, the first layer dense.
        let p = fixture("deepseek-v2-lite.json");
        assert_eq!(
            p.experts,
            Some(Experts {
                count: 64,
                used: 6,
                feed_forward_length: Some(1408),
                shared_feed_forward_length: Some(2816),
                dense_layers: 1,
            })
        );
        assert_eq!(p.feed_forward_length, 10944);
        assert_within(p.parameters, 15_706_484_224, 0.01);
        // Older profiles without the widths still read, the dense width standing in.
        let old: Experts = serde_json::from_str(r#"{"count": 8, "used": 2}"#).unwrap();
        assert_eq!(old.expert_width(14336), 14336);
        let mut odd = serde_json::from_str::<Value>(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/deepseek-v2-lite.json"),
            )
            .unwrap(),
        )
        .unwrap();
        odd["first_k_dense_replace"] = json!(1000);
        assert_eq!(
            profile_from_config(&odd, None)
                .unwrap()
                .experts
                .unwrap()
                .dense_layers,
            27
        );
    }

    #[test]
    fn bitsandbytes_keeps_embeddings_in_16_bits() {
        let p = fixture("llama-3-8b-bnb-4bit.json");
        assert_eq!(p.weight_dtype, "bnb-4bit");
        assert!(!p.weights.exact);
        // Embeddings and head in bf16, as bitsandbytes quantizes nn.Linear only.
        assert_eq!(p.weights.input, 128_256 * 4096 * 2);
        assert_eq!(p.weights.output, 128_256 * 4096 * 2);
        // 6.98 B linear weights at 4.127 bits (nf4 with double-quantized absmax) + 2.10 GB
        // of embeddings: 5.70 GB, the size of unsloth/llama-3-8b-bnb-4bit's safetensors.
        let gb = p.weights.total as f64 / 1e9;
        assert!((5.65..5.75).contains(&gb), "{gb}");
        // Counting the embeddings as 4-bit would have given 4.14 GB, a quarter too small.
        assert!(p.weights.total as f64 > 1.3 * 8.03e9 * 4.127 / 8.0);
    }

    #[test]
    fn bad_directories_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(matches!(
            profile_from_path(d),
            Err(ProfileError::NotAModel(_))
        ));
        std::fs::write(d.join("config.json"), "{not json").unwrap();
        assert!(matches!(
            profile_from_path(d),
            Err(ProfileError::Json { .. })
        ));
        std::fs::write(d.join("config.json"), "{}").unwrap();
        assert!(matches!(
            profile_from_path(d),
            Err(ProfileError::Missing(_))
        ));
        std::fs::write(
            d.join("config.json"),
            json!({"num_hidden_layers": 1u64 << 40, "hidden_size": 8, "num_attention_heads": 1})
                .to_string(),
        )
        .unwrap();
        assert!(matches!(
            profile_from_path(d),
            Err(ProfileError::Invalid { .. })
        ));
        std::fs::write(d.join("config.json"), llama3_8b_config().to_string()).unwrap();

        let st = d.join("model.safetensors");
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 2, 3], "shorter than"),
            (u64::MAX.to_le_bytes().to_vec(), "exceeds"),
            (100u64.to_le_bytes().to_vec(), "does not fit"),
            (
                [&5u64.to_le_bytes()[..], b"hello"].concat(),
                "not a JSON object",
            ),
            (
                {
                    let h = br#"{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#;
                    [&(h.len() as u64).to_le_bytes()[..], h].concat()
                },
                "spans",
            ),
            (
                {
                    let h = br#"{"a": {"dtype": "F32", "shape": [4]}}"#;
                    [&(h.len() as u64).to_le_bytes()[..], h].concat()
                },
                "no data_offsets",
            ),
            (
                {
                    let h = br#"{"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 0]}}"#;
                    [&(h.len() as u64).to_le_bytes()[..], h].concat()
                },
                "no valid shape",
            ),
        ];
        for (bytes, want) in cases {
            std::fs::write(&st, &bytes).unwrap();
            let err = profile_from_path(d).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?}: {err}");
        }
    }

    proptest::proptest! {
        /// Arbitrary bytes as a safetensors file, or as a header behind a valid length, never
        /// panic: an error or a value.
        #[test]
        fn hostile_safetensors_never_panic(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            json_like in "[{}\\[\\]\"a-z0-9:, ]{0,200}",
        ) {
            let dir = tempfile::tempdir().unwrap();
            let f = dir.path().join("x.safetensors");
            std::fs::write(&f, &raw).unwrap();
            let _ = weights_from_safetensors(std::slice::from_ref(&f), Some(4), &crate::ModelAccess::anywhere());
            let h = json_like.as_bytes();
            std::fs::write(&f, [&(h.len() as u64).to_le_bytes()[..], h].concat()).unwrap();
            let _ = weights_from_safetensors(std::slice::from_ref(&f), Some(4), &crate::ModelAccess::anywhere());
        }

        /// Arbitrary JSON values in the config's keys never panic.
        #[test]
        fn odd_configs_never_panic(
            layers in proptest::prop_oneof![proptest::prelude::any::<i64>(), 0i64..100],
            hidden in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..=u64::from(u32::MAX)],
            heads in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..=u64::from(u32::MAX)],
            kv in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..=u64::from(u32::MAX)],
            window in proptest::prelude::any::<u64>(),
            pattern in proptest::prop_oneof![proptest::prelude::any::<u64>(), 0u64..64],
            nope in proptest::prelude::any::<u64>(),
        ) {
            let c = json!({
                "num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                "num_key_value_heads": kv, "sliding_window": window,
                "sliding_window_pattern": pattern, "vocab_size": hidden,
                "intermediate_size": kv, "num_local_experts": kv, "num_experts_per_tok": heads,
                "qk_nope_head_dim": nope, "qk_rope_head_dim": heads, "head_dim": kv,
            });
            if let Ok(p) = profile_from_config(&c, None) {
                let _ = crate::estimate(&p, &berth_options::EstimateOptions::Vllm(Default::default()));
                let _ = crate::estimate(&p, &berth_options::EstimateOptions::LlamaCpp(Default::default()));
            }
        }
    }
}
