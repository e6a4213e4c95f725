//! A PostgreSQL primary with a synchronous streaming standby, for failover tests: kill the
//! primary, promote the standby, and see what berth does in between.

use crate::{
    HarnessError,
    postgres::{Durability, PgServer},
};
use std::{
    path::Path,
    time::{Duration, Instant},
};

/// The standby's `application_name`, which the primary names as its synchronous standby,
/// and its replication slot.
const STANDBY: &str = "standby";

/// How long a node may take to replicate or to be promoted before the harness gives up.
const LIMIT: Duration = Duration::from_secs(60);

/// Two clusters: a primary that acknowledges a commit only once the standby has flushed it
/// (`synchronous_commit = on`, `synchronous_standby_names = 'standby'`), and the standby,
/// streaming through its own replication slot. What was acknowledged survives the loss of
/// the primary. Both stop when dropped.
#[derive(Debug)]
pub struct PgPair {
    nodes: [PgServer; 2],
    /// Which of `nodes` takes writes: the first, until [`PgPair::promote_standby`].
    primary: usize,
    /// The `postgres` role's password, once [`PgPair::require_password`] set one.
    password: Option<String>,
}

impl PgPair {
    /// Starts a primary under `dir/a` and its standby under `dir/b` (fsync off: test data),
    /// and returns once the standby replicates synchronously.
    pub fn start(dir: &Path) -> Result<PgPair, HarnessError> {
        let primary = PgServer::start_with_settings(
            &dir.join("a"),
            Durability::Fast,
            &[
                "wal_level=replica".into(),
                "max_wal_senders=4".into(),
                "max_replication_slots=4".into(),
                format!("synchronous_standby_names={STANDBY}"),
                // Durability::Fast turns it off; a pair is about acknowledged commits.
                "synchronous_commit=on".into(),
            ],
        )?;
        let standby = PgServer::start_standby(&primary, &dir.join("b"), STANDBY, Vec::new())?;
        let pair = PgPair {
            nodes: [primary, standby],
            primary: 0,
            password: None,
        };
        pair.wait_synchronous()?;
        Ok(pair)
    }

    /// A URL naming both nodes, in their order, with `target_session_attrs=read-write`: a
    /// client connects to whichever takes writes, before and after a promotion.
    pub fn url(&self) -> String {
        let user = match &self.password {
            Some(p) => format!("postgres:{p}"),
            None => "postgres".into(),
        };
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        format!(
            "postgres://{user}@{}/postgres?target_session_attrs=read-write",
            hosts.join(",")
        )
    }

    /// The node that takes writes now.
    pub fn primary(&self) -> &PgServer {
        &self.nodes[self.primary]
    }

    /// The other node: the standby, or after a promotion the old primary.
    pub fn standby(&self) -> &PgServer {
        &self.nodes[1 - self.primary]
    }

    /// Both nodes, in the order [`PgPair::url`] names them.
    pub fn nodes(&self) -> &[PgServer; 2] {
        &self.nodes
    }

    /// SIGKILLs the primary and every backend of it (see [`PgServer::kill`]). Nothing takes
    /// writes until [`PgPair::promote_standby`].
    pub fn kill_primary(&mut self) {
        self.nodes[self.primary].kill();
    }

    /// Promotes the standby and returns once it takes writes; it is the primary from then
    /// on, without a synchronous standby of its own (its commits no longer wait).
    pub fn promote_standby(&mut self) -> Result<(), HarnessError> {
        let standby = 1 - self.primary;
        // Waits (up to the 60 s given) until the promotion is done.
        let promoted = self.nodes[standby].query("SELECT pg_promote(true, 60)")?;
        if promoted != "t" {
            return Err(HarnessError::Failed {
                what: "promoting the standby".into(),
                detail: format!("pg_promote answered {promoted:?}"),
            });
        }
        self.primary = standby;
        self.wait_writable(LIMIT)
    }

    /// Waits until the primary takes writes (it does once [`PgPair::promote_standby`]
    /// returned; this is for a promotion made some other way).
    pub fn wait_writable(&self, limit: Duration) -> Result<(), HarnessError> {
        wait_for("the primary to take writes", limit, || {
            Ok(self.primary().accepts_writes())
        })
    }

    /// Waits until the primary names the standby as its synchronous one and streams to it.
    pub fn wait_synchronous(&self) -> Result<(), HarnessError> {
        let sql = format!(
            "SELECT sync_state || ' ' || state FROM pg_stat_replication \
             WHERE application_name = '{STANDBY}'"
        );
        wait_for("the standby to replicate synchronously", LIMIT, || {
            Ok(self.primary().query(&sql)? == "sync streaming")
        })
    }

    /// TCP connections to either node need `password` from now on (see
    /// [`PgServer::require_password`]); the standby keeps replicating over the socket.
    pub fn require_password(&mut self, password: &str) -> Result<(), HarnessError> {
        self.nodes[self.primary].require_password(password)?;
        self.nodes[1 - self.primary].require_scram(password)?;
        self.password = Some(password.to_owned());
        Ok(())
    }

    /// Both nodes serve TLS with this certificate chain and key (PEM), after a restart of
    /// each; returns once the standby replicates synchronously again.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) -> Result<(), HarnessError> {
        for node in &mut self.nodes {
            node.enable_tls(cert_pem, key_pem)?;
        }
        self.wait_synchronous()
    }
}

/// Polls `done` every 20 ms until it is true or `limit` passes; an error counts as not yet
/// (a node may still be starting) and is told if it was the last answer.
fn wait_for(
    what: &str,
    limit: Duration,
    mut done: impl FnMut() -> Result<bool, HarnessError>,
) -> Result<(), HarnessError> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match done() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if Instant::now() > deadline {
            return Err(HarnessError::Failed {
                what: what.into(),
                detail: match last {
                    Some(e) => format!("not done after {limit:?}: {e}"),
                    None => format!("not done after {limit:?}"),
                },
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::postgres::{children_of, open_for_service_user};

    fn pair() -> (tempfile::TempDir, PgPair) {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-pair-")
            .tempdir()
            .unwrap();
        open_for_service_user(dir.path()).unwrap();
        let pair = PgPair::start(&dir.path().join("pg")).unwrap();
        (dir, pair)
    }

    #[test]
    fn a_commit_on_the_primary_is_applied_on_the_standby_before_it_returns() {
        let (_dir, pair) = pair();
        assert!(pair.primary().accepts_writes());
        assert!(!pair.standby().accepts_writes());
        // remote_apply: the commit returns only once the standby applied it, so the read
        // right after sees it, with no wait, only if the standby is the synchronous one.
        pair.primary()
            .query("SET synchronous_commit = remote_apply; CREATE TABLE t AS SELECT 42 AS x")
            .unwrap();
        assert_eq!(pair.standby().query("SELECT x FROM t").unwrap(), "42");
        assert!(pair.standby().query("INSERT INTO t VALUES (1)").is_err());
        let url = pair.url();
        for node in pair.nodes() {
            assert!(url.contains(&format!("127.0.0.1:{}", node.port())), "{url}");
        }
        assert!(url.ends_with("?target_session_attrs=read-write"), "{url}");
    }

    #[test]
    fn the_promoted_standby_takes_writes_and_keeps_what_was_acknowledged() {
        let (_dir, mut pair) = pair();
        pair.primary()
            .query("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
            .unwrap();
        let old = pair.primary().port();
        pair.kill_primary();
        assert!(pair.primary().pid().is_none());
        assert!(!pair.standby().accepts_writes());
        pair.promote_standby().unwrap();
        assert_ne!(pair.primary().port(), old);
        assert!(pair.primary().accepts_writes());
        assert!(
            !pair.standby().accepts_writes(),
            "the old primary stays dead"
        );
        // Acknowledged with synchronous_commit = on: flushed on the standby, so kept.
        assert_eq!(pair.primary().query("SELECT x FROM t").unwrap(), "7");
        // And its own commits no longer wait for a standby that is gone.
        pair.primary().query("INSERT INTO t VALUES (8)").unwrap();
    }

    #[test]
    fn a_killed_server_leaves_no_backend_behind() {
        let (_dir, mut pair) = pair();
        let pid = pair
            .primary()
            .pid()
            .and_then(|p| i32::try_from(p).ok())
            .unwrap();
        let backends = children_of(pid);
        assert!(!backends.is_empty(), "a running postmaster has children");
        pair.kill_primary();
        for backend in backends {
            // Killed: gone, or a zombie until its new parent reaps it.
            wait_for("a killed backend to exit", Duration::from_secs(10), || {
                let state = std::fs::read_to_string(format!("/proc/{backend}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim().to_owned()));
                Ok(state.is_none_or(|s| s.starts_with('Z')))
            })
            .unwrap();
        }
    }
}
