//! How far the placement search may scale an estimated model beyond its backend options' own
//! GPU count ([`Scaling`]). `berth-models`' `shapes` turns it into the shapes to try.

use crate::EstimateError;
use serde::{Deserialize, Serialize};

/// Most GPUs per worker a search may try.
pub const MAX_SEARCH_GPUS: u32 = 64;
/// Most workers one instance may span.
pub const MAX_SEARCH_WORKERS: u32 = 16;

/// How far the placement search may go beyond the backend options' own GPU count.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct Scaling {
    /// Try every GPU count up to this many on one worker that the backend can split the model
    /// over, fewest first; the backend options' own count (`tensor_parallel`, `gpus`) is then
    /// ignored. `None`: exactly the options' count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_gpus: Option<u32>,
    /// Allow spreading the model over up to this many workers (one pipeline stage each) when
    /// it fits on no single worker. `None` or 1: one worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
    /// llama.cpp only: when no full offload fits anywhere, keep some layers in host memory.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub partial_offload: bool,
}

impl Scaling {
    pub fn validate(&self) -> Result<(), EstimateError> {
        let bad = |what: String| Err(EstimateError::InvalidOptions(what));
        if self.max_gpus.is_some_and(|g| g == 0 || g > MAX_SEARCH_GPUS) {
            return bad(format!("max_gpus must be 1..={MAX_SEARCH_GPUS}"));
        }
        if self
            .max_workers
            .is_some_and(|w| w == 0 || w > MAX_SEARCH_WORKERS)
        {
            return bad(format!("max_workers must be 1..={MAX_SEARCH_WORKERS}"));
        }
        Ok(())
    }

    /// Workers the search may spread an instance over: at least one.
    pub fn workers(&self) -> u32 {
        self.max_workers.unwrap_or(1).max(1)
    }
}
