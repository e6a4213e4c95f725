//! State-change events, on `berth.events.instance.<id>`, one per committed transition.

use crate::{CmdSeq, InstanceState, Version};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceEvent {
    pub instance_id: String,
    pub state: InstanceState,
    pub version: Version,
    /// Stream sequence of the command this state belongs to.
    pub cmd_seq: CmdSeq,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Where the instance's model server answers (`host:port`): on `running`, when an agent
    /// runs a server for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Times the agent restarted the instance's server after a failure (left out when 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub restarts: u32,
    /// Milliseconds since the Unix epoch when the change was written: the database server's
    /// clock at the end of the statement that made it, just before its commit.
    pub at_ms: i64,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
