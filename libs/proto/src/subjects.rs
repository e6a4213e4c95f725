//! Subject names and the rules for the ids embedded in them.

/// Commands: one subject per instance; the stream keeps only the newest message of each.
pub const CMD_PREFIX: &str = "berth.cmd.instance";
/// Dead letters of commands, by instance id (or `unknown`).
pub const DLQ_PREFIX: &str = "berth.dlq.cmd";
/// Assignments for one worker's agent.
pub const AGENT_PREFIX: &str = "berth.agent";
/// Reports from agents (registration, heartbeats, instance status), by worker.
pub const STATUS_PREFIX: &str = "berth.status";
/// Requests for a model server's log, answered by the worker's agent (core NATS).
pub const LOGS_PREFIX: &str = "berth.logs";
/// Requests for the RPC server a follower runs for its stage of an instance spread over
/// several workers, answered by that worker's agent (core NATS; see [`crate::rpc`]).
pub const RPC_PREFIX: &str = "berth.rpc";
/// State-change events, by instance.
pub const EVENTS_PREFIX: &str = "berth.events.instance";
/// Analyzers' heartbeats: the payload is the sender's member id (UTF-8). Core NATS, not
/// JetStream: only the analyzers alive now matter.
pub const ANALYZERS_ALIVE: &str = "berth.analyzers.alive";
/// An analyzer shutting down: the payload is its member id.
pub const ANALYZERS_GONE: &str = "berth.analyzers.gone";

/// Longest id accepted for an instance or a worker.
pub const MAX_ID_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("id is empty")]
    Empty,
    #[error("id is {0} characters long; at most {MAX_ID_LEN} are allowed")]
    TooLong(usize),
    #[error(
        "id {id:?} contains {ch:?}; ids may contain only ASCII letters, digits, '-' and '_' \
         (they become one NATS subject token)"
    )]
    BadChar { id: String, ch: char },
}

/// Checks that `id` can be used as one subject token (no dots, wildcards or spaces).
pub fn validate_id(id: &str) -> Result<(), InvalidId> {
    if id.is_empty() {
        return Err(InvalidId::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(InvalidId::TooLong(id.len()));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        Some(ch) => Err(InvalidId::BadChar {
            id: id.to_owned(),
            ch,
        }),
        None => Ok(()),
    }
}

fn join(prefix: &str, id: &str) -> Result<String, InvalidId> {
    validate_id(id)?;
    Ok(format!("{prefix}.{id}"))
}

pub fn cmd_subject(instance_id: &str) -> Result<String, InvalidId> {
    join(CMD_PREFIX, instance_id)
}

pub fn agent_subject(worker_id: &str) -> Result<String, InvalidId> {
    join(AGENT_PREFIX, worker_id)
}

pub fn status_subject(worker_id: &str) -> Result<String, InvalidId> {
    join(STATUS_PREFIX, worker_id)
}

pub fn logs_subject(worker_id: &str) -> Result<String, InvalidId> {
    join(LOGS_PREFIX, worker_id)
}

pub fn rpc_subject(worker_id: &str) -> Result<String, InvalidId> {
    join(RPC_PREFIX, worker_id)
}

pub fn event_subject(instance_id: &str) -> Result<String, InvalidId> {
    join(EVENTS_PREFIX, instance_id)
}

/// The DLQ subject for a command that arrived on `cmd_subject`; `unknown` when the
/// instance cannot be identified.
pub fn dlq_subject(instance_id: Option<&str>) -> String {
    match instance_id.filter(|id| validate_id(id).is_ok()) {
        Some(id) => format!("{DLQ_PREFIX}.{id}"),
        None => format!("{DLQ_PREFIX}.unknown"),
    }
}

/// The worker id of a status subject, if the subject is one.
pub fn worker_of_status_subject(subject: &str) -> Option<&str> {
    let id = subject.strip_prefix(STATUS_PREFIX)?.strip_prefix('.')?;
    validate_id(id).ok().map(|()| id)
}

/// The instance id of a command subject, if the subject is one.
pub fn instance_of_cmd_subject(subject: &str) -> Option<&str> {
    let id = subject.strip_prefix(CMD_PREFIX)?.strip_prefix('.')?;
    validate_id(id).ok().map(|()| id)
}

/// The instance id of an event subject, if the subject is one.
pub fn instance_of_event_subject(subject: &str) -> Option<&str> {
    let id = subject.strip_prefix(EVENTS_PREFIX)?.strip_prefix('.')?;
    validate_id(id).ok().map(|()| id)
}

/// What a subscriber to every instance's events listens on.
pub const ALL_EVENTS: &str = "berth.events.instance.*";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        assert_eq!(
            cmd_subject("llama-3_8b").unwrap(),
            "berth.cmd.instance.llama-3_8b"
        );
        assert_eq!(instance_of_cmd_subject("berth.cmd.instance.a1"), Some("a1"));
    }

    #[test]
    fn rejects_ids_that_are_not_one_token() {
        for bad in ["", "a.b", "a b", "*", ">", "a>", "é", &"x".repeat(129)] {
            assert!(validate_id(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(instance_of_cmd_subject("berth.cmd.instance.a.b"), None);
        assert_eq!(instance_of_cmd_subject("berth.cmd.other.a"), None);
        assert_eq!(worker_of_status_subject("berth.status.w-1"), Some("w-1"));
        assert_eq!(worker_of_status_subject("berth.status.w.1"), None);
        assert_eq!(dlq_subject(Some("a.b")), "berth.dlq.cmd.unknown");
        assert_eq!(rpc_subject("w-1").unwrap(), "berth.rpc.w-1");
        assert!(rpc_subject("w.1").is_err() && rpc_subject(">").is_err());
    }
}
