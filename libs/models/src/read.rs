//! From what a command names ([`ModelRef`]) or a path to a [`ModelProfile`]: a GGUF file or a
//! Hugging Face directory is read by [`gguf`] or [`hf`]; every profile, read or given, passes
//! [`ModelProfile::validate`].

use crate::gguf::{self, GgufError};
use crate::hf;
use berth_options::{InvalidProfile, ModelProfile, ModelRef};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a model's profile could not be had: its files could not be read, or what they (or the
/// command) say is missing or out of range.
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
    /// A value out of range, or a profile that fails [`ModelProfile::validate`].
    #[error(transparent)]
    Invalid(#[from] InvalidProfile),
}

impl ProfileError {
    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid(InvalidProfile::new(what, reason))
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
        return gguf::profile_from_gguf_path(path);
    }
    Err(ProfileError::NotAModel(path.to_owned()))
}

/// The profile a command names: read from the files for a path (headers only), checked for a
/// profile or numbers given inline.
pub fn resolve(model: &ModelRef) -> Result<ModelProfile, ProfileError> {
    match model {
        ModelRef::Path(p) => profile_from_path(p),
        ModelRef::Profile(p) => {
            p.validate()?;
            Ok((**p).clone())
        }
        ModelRef::Explicit(e) => Ok(e.to_profile()?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::testutil::{file, string};
    use crate::gguf::{GgufLimits, MetaValue, parse_gguf};
    use berth_options::{ExplicitProfile, MAX_HEADS, WeightDtype};

    /// A profile read from a GGUF file, from a Hugging Face config, built from explicit numbers
    /// or carried whole in a command is refused by the same check, in the same words.
    #[test]
    fn every_source_passes_the_same_validator() {
        let heads = MAX_HEADS + 1;
        let want = format!("attention.heads: {heads} exceeds {MAX_HEADS}");
        let bytes = file(
            3,
            &[
                ("general.architecture", string("x")),
                ("x.block_count", MetaValue::U32(2)),
                ("x.embedding_length", MetaValue::U32(64)),
                ("x.attention.head_count", MetaValue::U32(heads)),
            ],
            &[],
        );
        let g = parse_gguf(&bytes[..], &GgufLimits::default()).unwrap();
        let from_gguf = gguf::profile_from_gguf(&g).unwrap_err();
        let config = serde_json::json!({
            "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": heads,
        });
        let from_hf = hf::profile_from_config(&config, None).unwrap_err();
        let explicit = ExplicitProfile {
            parameters: 1000,
            dtype: WeightDtype::F16,
            layers: 2,
            kv_heads: 1,
            head_dim: 8,
            context_length: 64,
            heads: Some(heads),
            hidden_size: None,
            intermediate_size: None,
            vocab_size: None,
            weight_bytes: None,
            name: None,
        };
        let from_explicit = resolve(&ModelRef::Explicit(explicit.clone())).unwrap_err();
        let mut inline = resolve(&ModelRef::Explicit(ExplicitProfile {
            heads: None,
            ..explicit
        }))
        .unwrap();
        inline.attention.heads = heads;
        let from_inline = resolve(&ModelRef::Profile(Box::new(inline))).unwrap_err();
        for e in [from_gguf, from_hf, from_explicit, from_inline] {
            assert!(matches!(&e, ProfileError::Invalid(_)), "{e:?}");
            assert_eq!(e.to_string(), want);
        }
    }

    #[test]
    fn model_refs_resolve() {
        let j = r#"{"explicit": {"parameters": 1000, "dtype": "f16", "layers": 2,
                    "kv_heads": 1, "head_dim": 8, "context_length": 64}}"#;
        let r: ModelRef = serde_json::from_str(j).unwrap();
        let p = resolve(&r).unwrap();
        assert_eq!(p.weights.total, 2000);
        let back = ModelRef::Profile(Box::new(p.clone()));
        let j = serde_json::to_string(&back).unwrap();
        assert_eq!(
            resolve(&serde_json::from_str::<ModelRef>(&j).unwrap()).unwrap(),
            p
        );
        let mut bad = p;
        bad.layers = 0;
        assert!(resolve(&ModelRef::Profile(Box::new(bad))).is_err());
        let r: ModelRef = serde_json::from_str(r#"{"path": "/nonexistent/model.gguf"}"#).unwrap();
        assert!(matches!(resolve(&r), Err(ProfileError::Io { .. })));
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
