//! How the leader of an instance spread over several workers finds its followers' stages: a
//! core NATS request on `berth.rpc.<follower>` that the follower's agent answers with the
//! endpoint of the RPC server (llama.cpp's `ggml-rpc-server`) it runs for that placement,
//! once it accepts connections. No disk is shared between workers.

use crate::Version;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcRequest {
    pub instance_id: String,
    /// The placement's version: a follower answers only for the placement it runs.
    pub version: Version,
}

/// Where a follower's stage is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RpcPartState {
    /// Accepting connections at `endpoint`.
    Ready,
    /// Assigned, its server not ready yet (launching, or restarting after a crash).
    NotYet,
    /// This worker runs no stage of that placement (not assigned yet, or stopped).
    NotAssigned,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RpcReply {
    pub state: RpcPartState,
    /// `host:port` of the RPC server, with `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Restarts of the follower's server: a leader that sees it change reconnects.
    #[serde(default)]
    pub restarts: u32,
}

impl RpcReply {
    pub fn not_assigned() -> RpcReply {
        RpcReply {
            state: RpcPartState::NotAssigned,
            endpoint: None,
            restarts: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let req = RpcRequest {
            instance_id: "big".into(),
            version: Version::new(3),
        };
        assert_eq!(
            crate::decode::<RpcRequest>(&crate::encode(&req).unwrap()).unwrap(),
            req
        );
        let ready = RpcReply {
            state: RpcPartState::Ready,
            endpoint: Some("10.0.0.2:40001".into()),
            restarts: 1,
        };
        assert_eq!(
            crate::decode::<RpcReply>(&crate::encode(&ready).unwrap()).unwrap(),
            ready
        );
        let bytes = crate::encode(&serde_json::json!({"state": "not_assigned"})).unwrap();
        assert_eq!(
            crate::decode::<RpcReply>(&bytes).unwrap(),
            RpcReply::not_assigned()
        );
    }
}
