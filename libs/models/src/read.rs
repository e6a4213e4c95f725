//! From what a command names ([`ModelRef`]) or a path to a [`ModelProfile`]: a GGUF file or a
//! Hugging Face directory is read by [`gguf`] or [`hf`], every file opened through a
//! [`ModelAccess`] (where model files may be read, and the reads' cancellation); every
//! profile, read or given, passes [`ModelProfile::validate`].

use crate::gguf::{self, GgufError};
use crate::hf;
use crate::roots::{ModelAccess, OpenError};
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
    /// A file outside the model roots, missing there, or not a regular file.
    #[error(transparent)]
    Refused(#[from] OpenError),
    /// The reads were cancelled (or ran past their deadline) before the profile was read.
    #[error("reading the model's headers was cancelled or took too long")]
    Cancelled,
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
/// index). Reads headers only, from anywhere this process can read (regular files and
/// directories only): for a user's own process, such as `berth estimate`.
pub fn profile_from_path(path: &Path) -> Result<ModelProfile, ProfileError> {
    read_profile(path, &ModelAccess::anywhere())
}

/// [`profile_from_path`], opening every file through `access`: only under its roots, and
/// ending in [`ProfileError::Cancelled`] once its reads are cancelled.
pub fn read_profile(path: &Path, access: &ModelAccess) -> Result<ModelProfile, ProfileError> {
    let read = read_uncancelled(path, access);
    if read.is_err() && access.cancel.is_cancelled() {
        return Err(ProfileError::Cancelled);
    }
    read
}

fn read_uncancelled(path: &Path, access: &ModelAccess) -> Result<ModelProfile, ProfileError> {
    let opened = access.roots.open(path)?;
    if opened.meta.is_dir() {
        return hf::profile_from_dir(&opened.path, access);
    }
    if opened.path.file_name().is_some_and(|n| n == "config.json") {
        let dir = opened.path.parent().unwrap_or(Path::new("/"));
        return hf::profile_from_dir(dir, access);
    }
    let mut magic = [0u8; 4];
    let n = crate::cancel::Guarded::new(opened.file, access.cancel.clone())
        .take(4)
        .read(&mut magic)
        .map_err(|source| ProfileError::Io {
            path: path.to_owned(),
            source,
        })?;
    if n == 4 && magic == gguf::GGUF_MAGIC {
        return gguf::profile_from_gguf_path_in(&opened.path, access);
    }
    Err(ProfileError::NotAModel(path.to_owned()))
}

/// The profile a command names: read from the files for a path (headers only, through
/// `access`), checked for a profile or numbers given inline.
pub fn resolve(model: &ModelRef, access: &ModelAccess) -> Result<ModelProfile, ProfileError> {
    match model {
        ModelRef::Path(p) => read_profile(p, access),
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
        let any = ModelAccess::anywhere();
        let from_explicit = resolve(&ModelRef::Explicit(explicit.clone()), &any).unwrap_err();
        let mut inline = resolve(
            &ModelRef::Explicit(ExplicitProfile {
                heads: None,
                ..explicit
            }),
            &any,
        )
        .unwrap();
        inline.attention.heads = heads;
        let from_inline = resolve(&ModelRef::Profile(Box::new(inline)), &any).unwrap_err();
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
        let any = ModelAccess::anywhere();
        let p = resolve(&r, &any).unwrap();
        assert_eq!(p.weights.total, 2000);
        let back = ModelRef::Profile(Box::new(p.clone()));
        let j = serde_json::to_string(&back).unwrap();
        assert_eq!(
            resolve(&serde_json::from_str::<ModelRef>(&j).unwrap(), &any).unwrap(),
            p
        );
        let mut bad = p;
        bad.layers = 0;
        assert!(resolve(&ModelRef::Profile(Box::new(bad)), &any).is_err());
        let r: ModelRef = serde_json::from_str(r#"{"path": "/nonexistent/model.gguf"}"#).unwrap();
        assert!(matches!(
            resolve(&r, &any),
            Err(ProfileError::Refused(OpenError::Io { .. }))
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
            Err(ProfileError::Refused(OpenError::Io { .. }))
        ));
        // A directory without config.json.
        assert!(profile_from_path(dir.path()).is_err());
    }
}
