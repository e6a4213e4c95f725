//! What a start command says about its model and how to run it, as plain serde types: the
//! model ([`ModelRef`]: a path, a whole [`ModelProfile`], or [`ExplicitProfile`] numbers), the
//! backend and its options ([`EstimateOptions`]), and how far the placement search may scale
//! it ([`Scaling`]); each with the checks a decoder cannot make.
//!
//! No I/O and no model readers: the wire crate (`berth-proto`) carries these types, and
//! `berth-models` reads model files into profiles and estimates from them.
//!
//! - [`profile`]: [`ModelProfile`] and its one validator, [`ModelProfile::validate`].
//! - [`backend`]: [`EstimateOptions`], [`LlamaCppOptions`], [`VllmOptions`],
//!   [`SglangOptions`].
//! - [`scaling`]: [`Scaling`] and its limits.

pub mod backend;
pub mod profile;
pub mod scaling;

pub use backend::{
    CustomClaim, DEFAULT_OVERHEAD, EstimateError, EstimateOptions, FlashAttention, GIB,
    KvCacheType, LLAMA_SERVER_AUTO_PARALLEL, LlamaCppOptions, MAX_ARG_BYTES, MAX_ARGV, MAX_BATCH,
    MAX_CONTEXT, MAX_GPUS, MIB, Placeholder, SGLANG_GPU_CLASSES, SglangGpuClass, SglangKvDtype,
    SglangOptions, TemplatePiece, VLLM_CUDA_CONTEXT, VllmKvDtype, VllmOptions, VllmVersion,
    template_pieces,
};
pub use profile::{
    Attention, Experts, ExplicitProfile, InvalidProfile, MAX_HEADS, MAX_LAYERS, ModelProfile,
    ModelRef, ProfileFormat, WeightBytes, WeightDtype, layer_count, pattern_layers,
};
pub use scaling::{MAX_SEARCH_GPUS, MAX_SEARCH_WORKERS, Scaling};
