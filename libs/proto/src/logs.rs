//! Reading a model server's log from whichever worker runs it: a core NATS request on
//! `berth.logs.<worker>` that the worker's agent answers from its state directory, so no
//! disk needs to be shared.

use crate::Version;
use serde::{Deserialize, Serialize};

/// Most bytes one answer carries; a longer log is read in several requests (`offset`).
pub const MAX_LOG_CHUNK: u32 = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsRequest {
    pub instance_id: String,
    /// The placement's version; absent: the newest one this worker has a log of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<Version>,
    /// 0: the server's current log; 1: the file before it (the attempt before the last
    /// restart, or the earlier part of a log the agent cut at its size cap), and so on.
    #[serde(default)]
    pub previous: u32,
    /// Read from this byte on (a follow); absent: the last `tail_lines` lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// With no offset: how many lines from the end (default 100).
    #[serde(default = "hundred")]
    pub tail_lines: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsReply {
    /// The placement the log belongs to.
    pub version: Version,
    /// Where the next read of a follow starts.
    pub offset: u64,
    pub text: String,
    /// Why there is nothing to read (no such log on this worker …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_with_defaults_round_trips() {
        let bytes = crate::encode(&serde_json::json!({"instance_id": "smol"})).unwrap();
        let r: LogsRequest = crate::decode(&bytes).unwrap();
        assert_eq!(
            (r.tail_lines, r.previous, r.offset, r.version),
            (100, 0, None, None)
        );
        assert_eq!(
            crate::decode::<LogsRequest>(&crate::encode(&r).unwrap()).unwrap(),
            r
        );
    }
}
