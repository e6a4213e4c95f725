//! What the analyzer tells one worker's agent, on `berth.agent.<worker_id>`.

use crate::{StartSpec, Version};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "messages are decoded and handled one at a time; boxing would only add an allocation"
)]
pub enum AgentMsg {
    /// Run `instance_id` on these GPUs. Reports about it carry `version`.
    Assign {
        instance_id: String,
        version: Version,
        /// GPU indexes on the worker.
        gpus: Vec<u32>,
        /// The most reserved on any one of `gpus`.
        vram_bytes_per_gpu: i64,
        spec: StartSpec,
        /// Bytes reserved on each of `gpus`, in the same order, when they differ (a share of
        /// GPUs of different sizes); empty: `vram_bytes_per_gpu` on each.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        gpu_bytes: Vec<i64>,
        /// For an instance spread over several workers: all of them in stage order, this one
        /// included (the first leads). Empty when it runs on this worker alone.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        workers: Vec<String>,
    },
    /// Stop `instance_id` (whatever version runs) and confirm with a `stopped` report carrying
    /// `version`; the agent confirms even when it runs nothing, so a stop never hangs.
    Unassign {
        instance_id: String,
        version: Version,
    },
}
