//! Placement: given a snapshot of the cluster's free VRAM and an instance's needs, choose a
//! worker and GPUs, or explain what was short; and the memory estimates behind those needs.
//!
//! Pure and deterministic: no network, no async, no clock. The only I/O is reading the headers
//! of the model files a caller points [`profile_from_path`] at. The same snapshot and request
//! give the same answer, which keeps it fast to test and to benchmark.
//!
//! - [`gguf`]: GGUF header reader (metadata, tensor infos, ggml type table).
//! - [`hf`]: Hugging Face `config.json` + safetensors headers.
//! - [`profile`]: [`ModelProfile`], from either, or from numbers ([`ExplicitProfile`]).
//! - [`estimate()`]: llama.cpp- and vLLM-style memory estimates ([`Estimate`]).

mod estimate;
mod explain;
pub mod gguf;
pub mod hf;
mod place;
pub mod profile;

pub use estimate::{
    Backend, Claim, CustomClaim, Estimate, EstimateError, EstimateOptions, GpuMemory, KvCacheType,
    LlamaCppOptions, MAX_BATCH, MAX_CONTEXT, MAX_GPUS, VllmKvDtype, VllmOptions, estimate,
};
pub use explain::explain_no_fit;
pub use place::{Placement, Policy, place};
pub use profile::{
    Attention, Experts, ExplicitProfile, ModelProfile, ModelRef, ProfileError, ProfileFormat,
    WeightBytes, WeightDtype, profile_from_path,
};

use std::collections::BTreeMap;

/// One GPU as the fit sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Index on its worker.
    pub index: u32,
    pub name: String,
    /// VRAM berth may still reserve: total − system-reserved − already reserved.
    pub free_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// False for workers that are unreachable or draining: never chosen.
    pub schedulable: bool,
    pub gpus: Vec<Gpu>,
}

/// What an instance needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub vram_per_gpu: u64,
    pub gpus: usize,
    /// Labels a worker must carry, all of them.
    pub selector: BTreeMap<String, String>,
    /// Only GPUs whose name contains this, ignoring case ("H100" matches
    /// "NVIDIA H100 80GB HBM3").
    pub gpu_name: Option<String>,
}

impl Request {
    /// Whether `gpu` is a kind this request accepts.
    pub fn accepts(&self, gpu: &Gpu) -> bool {
        self.gpu_name
            .as_deref()
            .is_none_or(|want| gpu.name.to_lowercase().contains(&want.to_lowercase()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    /// Nothing fits; the message names what each worker was short of.
    #[error("{0}")]
    NoFit(String),
    /// The caller's cancellation check fired between candidates.
    #[error("cancelled")]
    Cancelled,
}

impl Worker {
    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}

pub(crate) fn gib(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}
