//! Rows as read from the database, and the transitions queries report back.

use crate::schema::{allocations, gpus, instances, workers};
use berth_proto::{CmdSeq, InstanceEvent, InstanceState, Version};
use chrono::{DateTime, Utc};
use diesel::prelude::*;

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = instances)]
pub struct InstanceRow {
    pub id: String,
    pub spec: Option<serde_json::Value>,
    pub desired: String,
    pub state: String,
    pub reason: Option<String>,
    pub cmd_seq: CmdSeq,
    pub version: Version,
    pub worker_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Where its model server answers, while it runs one (`host:port`).
    pub endpoint: Option<String>,
    /// Times its agent restarted the server of the current placement.
    pub restarts: i32,
}

impl InstanceRow {
    /// The stored state, decoded; a value outside the lifecycle is corrupt data.
    pub fn lifecycle_state(&self) -> Result<InstanceState, crate::StoreError> {
        parse_state(&self.state)
    }

    /// The start spec it was placed for, decoded; `None` for an instance never started or
    /// a stored spec this version cannot read.
    pub fn start_spec(&self) -> Option<berth_proto::StartSpec> {
        self.spec
            .clone()
            .and_then(|s| serde_json::from_value(s).ok())
    }
}

/// Decodes a stored state.
pub(crate) fn parse_state(state: &str) -> Result<InstanceState, crate::StoreError> {
    state
        .parse()
        .map_err(|e| crate::StoreError::Corrupt(format!("{e}")))
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = workers)]
pub struct WorkerRow {
    pub id: String,
    pub labels: serde_json::Value,
    pub schedulable: bool,
    pub last_heartbeat: DateTime<Utc>,
    pub registered_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = gpus)]
pub struct GpuRow {
    pub worker_id: String,
    pub idx: i32,
    pub name: String,
    pub uuid: String,
    pub total_bytes: i64,
    pub system_reserved_bytes: i64,
    pub reserved_bytes: i64,
    pub used_outside_bytes: i64,
}

impl GpuRow {
    /// VRAM that berth may still reserve on this GPU (negative when processes outside berth
    /// use more than was left).
    pub fn free_bytes(&self) -> i64 {
        self.total_bytes
            .saturating_sub(self.system_reserved_bytes)
            .saturating_sub(self.reserved_bytes)
            .saturating_sub(self.used_outside_bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = allocations)]
pub struct AllocationRow {
    pub instance_id: String,
    pub worker_id: String,
    pub gpu_idx: i32,
    pub version: Version,
    pub bytes: i64,
}

/// A committed state change, ready to be published as an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub instance_id: String,
    pub state: InstanceState,
    pub version: Version,
    pub cmd_seq: CmdSeq,
    pub worker_id: Option<String>,
    pub gpus: Vec<u32>,
    pub reason: Option<String>,
    pub endpoint: Option<String>,
}

impl Transition {
    pub fn to_event(&self) -> InstanceEvent {
        InstanceEvent {
            instance_id: self.instance_id.clone(),
            state: self.state,
            version: self.version,
            cmd_seq: self.cmd_seq,
            worker_id: self.worker_id.clone(),
            gpus: self.gpus.clone(),
            reason: self.reason.clone(),
            at_ms: Utc::now().timestamp_millis(),
            endpoint: self.endpoint.clone(),
            restarts: 0,
        }
    }
}
