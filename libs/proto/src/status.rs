//! What agents report, on `berth.status.<worker_id>`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Index on the worker (NVML index, or position in the simulated inventory).
    pub index: u32,
    pub name: String,
    /// NVML UUID where known; simulated GPUs get a stable made-up one.
    #[serde(default)]
    pub uuid: String,
    pub total_bytes: i64,
    /// VRAM berth must leave alone on this GPU (driver, display, other tenants).
    #[serde(default)]
    pub system_reserved_bytes: i64,
}

/// What a GPU has in use outside berth, as its agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuUsage {
    pub index: u32,
    pub used_outside_bytes: i64,
}

/// States an agent may report for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedState {
    Starting,
    Running,
    Stopped,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StatusMsg {
    /// Sent at agent start: the worker and its GPUs (replaces what was known).
    Register {
        worker_id: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        gpus: Vec<GpuInfo>,
    },
    Heartbeat {
        worker_id: String,
        /// Memory in use on each GPU by processes berth did not start, when the agent can
        /// see it (NVML); placements leave it alone. Absent: unchanged.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        usage: Vec<GpuUsage>,
    },
    /// The state of an instance's backend; applied only if `version` is the instance's.
    Instance {
        worker_id: String,
        instance_id: String,
        version: i64,
        state: ReportedState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// This worker runs one part of an instance spread over several workers.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        shared: bool,
    },
}
