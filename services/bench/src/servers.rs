//! The private servers a benchmark run starts: one NATS server or a NATS cluster, and
//! PostgreSQL.

use anyhow::Result;
use berth_harness::{ClusterServers, PgServer, TestServers};

/// NATS (one server, or a cluster of nodes) and PostgreSQL, stopped when dropped.
pub enum Servers {
    Single(TestServers),
    Cluster(ClusterServers),
}

impl Servers {
    /// One NATS server for `nodes` = 1, else a cluster of that many (JetStream keeps each
    /// stream on three of them, or on every one of fewer).
    pub async fn start(nodes: u16) -> Result<Servers> {
        Ok(if nodes == 1 {
            Servers::Single(tokio::task::spawn_blocking(TestServers::start).await??)
        } else {
            let n = usize::from(nodes);
            Servers::Cluster(
                tokio::task::spawn_blocking(move || ClusterServers::start(n, None)).await??,
            )
        })
    }

    /// What berth's processes take as `--nats-url`.
    pub fn nats_url(&self) -> String {
        match self {
            Servers::Single(s) => s.nats.url(),
            Servers::Cluster(c) => c.nats.urls(),
        }
    }

    /// The NATS servers' process ids.
    pub fn nats_pids(&self) -> Vec<u32> {
        match self {
            Servers::Single(s) => s.nats.pid().into_iter().collect(),
            Servers::Cluster(c) => c.nats.pids(),
        }
    }

    pub fn pg(&self) -> &PgServer {
        match self {
            Servers::Single(s) => &s.pg,
            Servers::Cluster(c) => &c.pg,
        }
    }
}
