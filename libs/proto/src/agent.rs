//! What the analyzer tells one worker's agent, on `berth.agent.<worker_id>`.

use crate::StartSpec;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentMsg {
    /// Run `instance_id` on these GPUs. Reports about it carry `version`.
    Assign {
        instance_id: String,
        version: i64,
        /// GPU indexes on the worker.
        gpus: Vec<u32>,
        vram_bytes_per_gpu: i64,
        spec: StartSpec,
    },
    /// Stop `instance_id` (whatever version runs) and confirm with a `stopped` report carrying
    /// `version`; the agent confirms even when it runs nothing, so a stop never hangs.
    Unassign { instance_id: String, version: i64 },
}
