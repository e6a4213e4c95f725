//! Models: reading a model's files into a [`ModelProfile`], estimating the memory it needs
//! under a backend's options, and the placement [`Shape`](berth_fit::Shape)s those estimates
//! give.
//!
//! Pure and deterministic but for one kind of I/O: reading the headers of the model files a
//! caller points [`profile_from_path`] (or [`read_profile`], [`resolve`]) at, bounded in
//! memory and time. The option types a start command
//! carries are `berth-options`' and re-exported here; the placement search is `berth-fit`'s.
//!
//! - [`gguf`]: GGUF header reader (metadata, tensor infos, ggml type table), and the profile
//!   of a GGUF file.
//! - [`hf`]: Hugging Face `config.json` + safetensors headers, and the profile they give.
//! - [`profile_from_path`], [`read_profile`], [`resolve`]: the profile of a path, or of what a
//!   command names. Every profile passes the one validator, [`ModelProfile::validate`].
//! - [`ModelRoots`], [`ModelAccess`]: where model files may be read from (canonical paths
//!   under configured roots, regular files only), and [`ReadCancel`]: reads that stop when
//!   their reader gives up on them.
//! - [`estimate()`]: llama.cpp- and vLLM-style memory estimates ([`Estimate`]), and
//!   [`context_that_fits`] on GPUs of a given size.
//! - [`shapes`]: the shapes an estimated model can run in, for the placement search.

mod cancel;
mod estimate;
pub mod gguf;
pub mod hf;
mod plan;
mod read;
mod roots;
mod safetensors;

pub use berth_options::*;
pub use cancel::{CancelOnDrop, ReadCancel};
pub use estimate::{Backend, Estimate, GpuMemory, context_that_fits, estimate};
pub use plan::{shapes, workers_note};
pub use read::{ProfileError, profile_from_path, read_profile, resolve};
pub use roots::{ModelAccess, ModelRoots, NOT_UNDER_A_ROOT, OpenError, Opened, RootError};
