//! Start and stop commands: what a client publishes to `berth.cmd.instance.<id>`.
//!
//! Decoding is strict about what matters and lenient about the rest: unknown fields are
//! ignored and optional fields default, but a missing `op`, an unknown `op`, a missing
//! required field or an implausible value each get their own typed error, which the analyzer
//! turns into a dead letter with that reason.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Largest command payload the analyzer accepts; anything bigger is dead-lettered.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Largest VRAM claim per GPU (2 TiB): far above any GPU made, so a bigger value is a mistake.
pub const MAX_VRAM_PER_GPU: i64 = 2 << 40;
/// Most GPUs one instance may ask for.
pub const MAX_GPUS: i64 = 64;
/// Most selector entries and the longest model name.
pub const MAX_SELECTOR_ENTRIES: usize = 32;
pub const MAX_MODEL_LEN: usize = 256;
/// Most explicit GPU ids in one start command.
pub const MAX_GPU_IDS: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    Start(StartSpec),
    Stop(StopSpec),
}

/// What to run and what it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StartSpec {
    /// Model name, informational.
    #[serde(default)]
    pub model: String,
    /// VRAM to reserve on each GPU, in bytes. Required unless `model_ref` is given, in which
    /// case 0 (or absent) means "estimate it from the model".
    #[serde(default)]
    pub vram_bytes: i64,
    /// Number of GPUs, all on one worker. With an estimate, the backend options decide.
    #[serde(default = "one")]
    pub gpus: i64,
    /// Worker labels that must all match (`zone = "a"`).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Only GPUs whose name contains this, ignoring case: "H100", "A100-SXM4-80GB".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_name: Option<String>,
    /// Where the memory needs come from: `{"path": "/models/x.gguf"}` (a GGUF file or a
    /// Hugging Face directory readable by the analyzers), `{"explicit": {...}}` (numbers), or
    /// `{"profile": {...}}` (a full profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_ref: Option<Box<berth_options::ModelRef>>,
    /// The backend that will run it and its options, for the estimate (default: llama.cpp,
    /// full offload, the model's context, `gpus` GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Box<berth_options::EstimateOptions>>,
    /// Only these GPUs: `worker:index` or GPU UUIDs. The instance waits (`pending`) until
    /// enough of them have room.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_ids: Vec<String>,
    /// How far the placement search may scale an estimated model: more GPUs per worker,
    /// several workers, partial offload (needs `model_ref`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaling: Option<berth_options::Scaling>,
    /// Replicas of one group are kept on different workers under the spread policy
    /// (default: `model`, when given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_group: Option<String>,
}

impl Default for StartSpec {
    fn default() -> Self {
        StartSpec {
            model: String::new(),
            vram_bytes: 0,
            gpus: 1,
            selector: BTreeMap::new(),
            gpu_name: None,
            model_ref: None,
            backend: None,
            gpu_ids: Vec::new(),
            scaling: None,
            replica_group: None,
        }
    }
}

fn one() -> i64 {
    1
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StopSpec {
    /// Free text kept with the instance, for people reading `berth ps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl StopSpec {
    /// A reason is shown with the instance: bounded, one line, no control characters.
    pub fn validate(&self) -> Result<(), String> {
        match &self.reason {
            Some(r) => crate::text::check("reason", r, crate::text::MAX_REASON_BYTES)
                .map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("payload is {len} bytes; commands are limited to {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("payload is not a MessagePack map: {0}")]
    Undecodable(String),
    #[error("command has no \"op\" field (expected \"start\" or \"stop\")")]
    MissingOp,
    #[error("unknown op {0:?} (expected \"start\" or \"stop\")")]
    UnknownOp(String),
    #[error("invalid {op} command: {detail}")]
    BadFields { op: &'static str, detail: String },
    #[error("invalid start command: {0}")]
    Invalid(String),
}

/// Just the tag, to tell "not a map" from "a map with a bad op" before the full decode.
#[derive(Deserialize)]
struct Envelope {
    op: Option<Tag>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Tag {
    Text(String),
    Other(serde::de::IgnoredAny),
}

impl Command {
    pub fn encode(&self) -> Result<Vec<u8>, crate::CodecError> {
        crate::encode(self)
    }

    /// Decodes and validates a command payload.
    pub fn decode(bytes: &[u8]) -> Result<Command, CommandError> {
        if bytes.len() > MAX_COMMAND_BYTES {
            return Err(CommandError::TooLarge {
                len: bytes.len(),
                max: MAX_COMMAND_BYTES,
            });
        }
        // Internally tagged enums would also accept an array; the protocol is maps only.
        if !bytes
            .first()
            .is_some_and(|b| matches!(b, 0x80..=0x8f | 0xde | 0xdf))
        {
            return Err(CommandError::Undecodable(
                "the payload must be a MessagePack map".into(),
            ));
        }
        let envelope: Envelope = crate::codec::decode_raw(bytes)
            .map_err(|e| CommandError::Undecodable(e.to_string()))?;
        let op = envelope.op.ok_or(CommandError::MissingOp)?;
        let op_name = match op {
            Tag::Text(t) if t == "start" => "start",
            Tag::Text(t) if t == "stop" => "stop",
            Tag::Text(other) => return Err(CommandError::UnknownOp(other)),
            Tag::Other(_) => return Err(CommandError::UnknownOp("<not a string>".into())),
        };
        let cmd: Command =
            crate::codec::decode_raw(bytes).map_err(|e| CommandError::BadFields {
                op: op_name,
                detail: e.to_string(),
            })?;
        match &cmd {
            Command::Start(spec) => spec.validate().map_err(CommandError::Invalid)?,
            Command::Stop(spec) => spec
                .validate()
                .map_err(|detail| CommandError::BadFields { op: "stop", detail })?,
        }
        Ok(cmd)
    }
}

impl StartSpec {
    /// A start that claims `vram_bytes` on each of `gpus` GPUs, nothing else set.
    pub fn claim(vram_bytes: i64, gpus: i64) -> StartSpec {
        StartSpec {
            vram_bytes,
            gpus,
            ..StartSpec::default()
        }
    }

    /// Checks the values a decoder cannot: ranges and sizes.
    pub fn validate(&self) -> Result<(), String> {
        if self.model_ref.is_none() && self.vram_bytes == 0 {
            return Err("vram_bytes is required (or give model_ref to estimate it)".into());
        }
        if self.vram_bytes < 0 {
            return Err(format!(
                "vram_bytes must be positive, got {}",
                self.vram_bytes
            ));
        }
        if self.vram_bytes > MAX_VRAM_PER_GPU {
            return Err(format!(
                "vram_bytes {} is more than any GPU has (limit {} per GPU)",
                self.vram_bytes,
                bytesize::ByteSize::b(MAX_VRAM_PER_GPU.unsigned_abs())
                    .display()
                    .iec()
            ));
        }
        if !(1..=MAX_GPUS).contains(&self.gpus) {
            return Err(format!(
                "gpus must be between 1 and {MAX_GPUS}, got {}",
                self.gpus
            ));
        }
        if self.model.len() > MAX_MODEL_LEN {
            return Err(format!(
                "model name is {} bytes long; at most {MAX_MODEL_LEN}",
                self.model.len()
            ));
        }
        if self
            .gpu_name
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.len() > MAX_MODEL_LEN)
        {
            return Err(format!("gpu_name must be 1 to {MAX_MODEL_LEN} bytes long"));
        }
        if self.gpu_ids.len() > MAX_GPU_IDS
            || self
                .gpu_ids
                .iter()
                .any(|id| id.is_empty() || id.len() > MAX_MODEL_LEN)
        {
            return Err(format!(
                "gpu_ids takes at most {MAX_GPU_IDS} ids of 1 to {MAX_MODEL_LEN} bytes each"
            ));
        }
        if let Some(s) = &self.scaling {
            if self.model_ref.is_none() || self.vram_bytes > 0 {
                return Err(
                    "scaling needs model_ref and no vram_bytes: an explicit claim has a fixed shape"
                        .into(),
                );
            }
            s.validate().map_err(|e| e.to_string())?;
        }
        if self
            .replica_group
            .as_ref()
            .is_some_and(|g| g.is_empty() || g.len() > MAX_MODEL_LEN)
        {
            return Err(format!(
                "replica_group must be 1 to {MAX_MODEL_LEN} bytes long"
            ));
        }
        if self.selector.len() > MAX_SELECTOR_ENTRIES {
            return Err(format!(
                "selector has {} entries; at most {MAX_SELECTOR_ENTRIES}",
                self.selector.len()
            ));
        }
        // Every text, the model's options included: the spec is stored as jsonb, which
        // refuses a NUL, and shown in terminals.
        let as_json = serde_json::to_value(self).map_err(|e| e.to_string())?;
        crate::text::check_all(&as_json).map_err(|e| e.to_string())
    }

    /// VRAM per GPU as an unsigned count, valid after [`StartSpec::validate`].
    pub fn vram_per_gpu(&self) -> u64 {
        self.vram_bytes.max(0).unsigned_abs()
    }

    /// The replica group: `replica_group`, else the model name, else none.
    pub fn group(&self) -> Option<&str> {
        self.replica_group
            .as_deref()
            .or((!self.model.is_empty()).then_some(self.model.as_str()))
    }

    /// GPU count as an unsigned count, valid after [`StartSpec::validate`].
    pub fn gpu_count(&self) -> usize {
        usize::try_from(self.gpus).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Serialize;

    #[derive(Serialize)]
    struct AnyMap<'a> {
        op: &'a str,
        vram_bytes: i64,
        extra_field: &'a str,
    }

    fn start(vram: i64, gpus: i64) -> Command {
        Command::Start(StartSpec {
            model: "m".into(),
            vram_bytes: vram,
            gpus,
            selector: BTreeMap::from([("zone".into(), "a".into())]),
            gpu_name: Some("H100".into()),
            model_ref: None,
            backend: None,
            ..StartSpec::default()
        })
    }

    #[test]
    fn round_trips_start_and_stop() {
        for cmd in [start(1 << 30, 2), Command::Stop(StopSpec::default())] {
            let bytes = cmd.encode().unwrap();
            assert_eq!(Command::decode(&bytes).unwrap(), cmd);
        }
    }

    #[test]
    fn ignores_unknown_fields_and_defaults_optional_ones() {
        let bytes = crate::encode(&AnyMap {
            op: "start",
            vram_bytes: 1024,
            extra_field: "from a newer client",
        })
        .unwrap();
        let Command::Start(spec) = Command::decode(&bytes).unwrap() else {
            panic!("expected a start");
        };
        assert_eq!((spec.gpus, spec.model.as_str()), (1, ""));
        assert!(spec.selector.is_empty());
    }

    #[test]
    fn typed_errors_for_bad_input() {
        assert!(matches!(
            Command::decode(&crate::encode(&("stop",)).unwrap()),
            Err(CommandError::Undecodable(_))
        ));
        assert!(matches!(
            Command::decode(b"\xc1garbage"),
            Err(CommandError::Undecodable(_))
        ));
        assert!(matches!(
            Command::decode(&crate::encode(&BTreeMap::from([("x", 1)])).unwrap()),
            Err(CommandError::MissingOp)
        ));
        assert_eq!(
            Command::decode(&crate::encode(&BTreeMap::from([("op", "explode")])).unwrap()),
            Err(CommandError::UnknownOp("explode".into()))
        );
        assert!(matches!(
            Command::decode(&crate::encode(&BTreeMap::from([("op", "start")])).unwrap()),
            Err(CommandError::Invalid(why)) if why.contains("vram_bytes is required")
        ));
        assert!(matches!(
            Command::decode(
                &crate::encode(&BTreeMap::from([("op", "start"), ("gpus", "two")])).unwrap()
            ),
            Err(CommandError::BadFields { op: "start", .. })
        ));
        assert!(matches!(
            Command::decode(&vec![0u8; MAX_COMMAND_BYTES + 1]),
            Err(CommandError::TooLarge { .. })
        ));
        for (vram, gpus) in [(-1, 1), (0, 1), (MAX_VRAM_PER_GPU + 1, 1), (1, 0), (1, 65)] {
            let bytes = start(vram, gpus).encode().unwrap();
            assert!(
                matches!(Command::decode(&bytes), Err(CommandError::Invalid(_))),
                "vram {vram} gpus {gpus} should be invalid"
            );
        }
    }

    #[test]
    fn a_model_reference_replaces_the_vram_claim() {
        let cmd = Command::Start(StartSpec {
            model: "smollm2".into(),
            vram_bytes: 0,
            gpus: 1,
            selector: BTreeMap::new(),
            gpu_name: None,
            model_ref: Some(Box::new(berth_options::ModelRef::Path(
                "/models/smollm2.gguf".into(),
            ))),
            backend: Some(Box::new(berth_options::EstimateOptions::LlamaCpp(
                Default::default(),
            ))),
            ..StartSpec::default()
        });
        assert_eq!(Command::decode(&cmd.encode().unwrap()).unwrap(), cmd);
    }

    #[test]
    fn placement_options_round_trip_and_are_checked() {
        let path = || Some(Box::new(berth_options::ModelRef::Path("/m.gguf".into())));
        let ok = StartSpec {
            model: "llama".into(),
            model_ref: path(),
            gpu_ids: vec!["w1:0".into(), "GPU-abc".into()],
            scaling: Some(berth_options::Scaling {
                max_gpus: Some(8),
                max_workers: Some(2),
                partial_offload: true,
            }),
            ..StartSpec::default()
        };
        let cmd = Command::Start(ok.clone());
        assert_eq!(Command::decode(&cmd.encode().unwrap()).unwrap(), cmd);
        assert_eq!(ok.group(), Some("llama"));
        let named = StartSpec {
            replica_group: Some("g".into()),
            ..ok.clone()
        };
        assert_eq!(named.group(), Some("g"));
        let bad = [
            (
                StartSpec {
                    gpu_ids: vec![String::new()],
                    ..ok.clone()
                },
                "gpu_ids",
            ),
            (
                StartSpec {
                    gpu_ids: vec!["w:0".into(); MAX_GPU_IDS + 1],
                    ..ok.clone()
                },
                "gpu_ids",
            ),
            (
                StartSpec {
                    vram_bytes: 1 << 30,
                    ..ok.clone()
                },
                "scaling needs model_ref",
            ),
            (
                StartSpec {
                    model_ref: None,
                    vram_bytes: 1 << 30,
                    ..ok.clone()
                },
                "scaling needs model_ref",
            ),
            (
                StartSpec {
                    scaling: Some(berth_options::Scaling {
                        max_gpus: Some(0),
                        ..Default::default()
                    }),
                    ..ok.clone()
                },
                "max_gpus",
            ),
            (
                StartSpec {
                    replica_group: Some(String::new()),
                    ..ok
                },
                "replica_group",
            ),
        ];
        for (spec, want) in bad {
            let bytes = Command::Start(spec).encode().unwrap();
            match Command::decode(&bytes) {
                Err(CommandError::Invalid(why)) => assert!(why.contains(want), "{why}"),
                other => panic!("expected {want:?}, got {other:?}"),
            }
        }
        // A misspelt scaling option is refused, not ignored.
        let raw = serde_json::json!({
            "op": "start",
            "model_ref": {"path": "/m.gguf"},
            "scaling": {"max_gpu": 2},
        });
        assert!(matches!(
            Command::decode(&crate::encode(&raw).unwrap()),
            Err(CommandError::BadFields { .. })
        ));
    }

    #[test]
    fn text_with_control_characters_is_refused_in_every_field() {
        let nul = |raw: serde_json::Value| Command::decode(&crate::encode(&raw).unwrap());
        for (raw, field) in [
            (
                serde_json::json!({"op": "start", "vram_bytes": 1, "model": "a\u{0}b"}),
                "model",
            ),
            (
                serde_json::json!({"op": "start", "vram_bytes": 1, "selector": {"zone": "a\u{0}"}}),
                "selector.zone",
            ),
            (
                serde_json::json!({"op": "start", "model_ref": {"path": "/m\u{0}.gguf"}}),
                "model_ref.path",
            ),
            (
                serde_json::json!({"op": "start", "vram_bytes": 1, "gpu_ids": ["w\n0"]}),
                "gpu_ids",
            ),
        ] {
            match nul(raw) {
                Err(CommandError::Invalid(why)) => assert!(why.contains(field), "{why}"),
                other => panic!("{field}: expected a refusal, got {other:?}"),
            }
        }
        match nul(serde_json::json!({"op": "stop", "reason": "bye\u{0}"})) {
            Err(CommandError::BadFields { op: "stop", detail }) => {
                assert!(detail.contains("reason"), "{detail}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert!(matches!(
            nul(serde_json::json!({"op": "stop", "reason": "x".repeat(5000)})),
            Err(CommandError::BadFields { .. })
        ));
        assert!(nul(serde_json::json!({"op": "stop", "reason": "maintenance ✓"})).is_ok());
    }

    #[test]
    fn deeply_nested_commands_are_refused() {
        // The nesting sits inside a start's field, where the decoder recurses into it.
        let mut bytes = vec![0x82, 0xa2, b'o', b'p', 0xa5];
        bytes.extend_from_slice(b"start");
        bytes.extend_from_slice(&[0xa5]);
        bytes.extend_from_slice(b"extra");
        bytes.extend_from_slice(&crate::codec::tests::nested_maps(5_000));
        let handle = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || Command::decode(&bytes))
            .unwrap();
        assert!(matches!(
            handle.join().unwrap(),
            Err(CommandError::Undecodable(why)) if why.contains("depth")
        ));
    }

    proptest::proptest! {
        #[test]
        fn whatever_decodes_round_trips(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            // Never a panic; and a command that decodes is the same after encoding again.
            if let Ok(cmd) = Command::decode(&bytes) {
                proptest::prop_assert_eq!(Command::decode(&cmd.encode().unwrap()).unwrap(), cmd);
            }
        }

        #[test]
        fn starts_with_any_text_round_trip_or_are_refused_by_name(
            model in "\\PC{0,40}|[\\x00-\\x1f]{1,3}",
            zone in "\\PC{0,10}|a\\x00b",
        ) {
            let cmd = Command::Start(StartSpec {
                model: model.clone(),
                selector: BTreeMap::from([("zone".to_owned(), zone.clone())]),
                ..StartSpec::claim(1 << 30, 1)
            });
            match Command::decode(&cmd.encode().unwrap()) {
                Ok(back) => {
                    proptest::prop_assert_eq!(back, cmd);
                    proptest::prop_assert!(!model.chars().chain(zone.chars()).any(char::is_control));
                }
                Err(CommandError::Invalid(why)) => {
                    proptest::prop_assert!(why.contains("control character") || why.contains("bytes long"), "{}", why);
                }
                Err(other) => proptest::prop_assert!(false, "{other}"),
            }
        }

        #[test]
        fn valid_starts_round_trip(vram in 1..=MAX_VRAM_PER_GPU, gpus in 1..=MAX_GPUS) {
            let cmd = start(vram, gpus);
            proptest::prop_assert_eq!(Command::decode(&cmd.encode().unwrap()).unwrap(), cmd);
        }
    }
}
