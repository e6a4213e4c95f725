//! Private NATS and PostgreSQL servers on free loopback ports, for the tests, `berth up` and
//! `berth bench`. Each server lives in a directory of its own and is stopped when its handle
//! is dropped, also when a test panics.
//!
//! PostgreSQL refuses to run as root; when this process is root, the cluster is owned by and
//! run as the `postgres` user (`ops/setup.sh` makes sure it exists).

mod binaries;
pub mod compose;
mod http;
mod nats;
mod nats_cluster;
mod pg_pair;
mod postgres;
mod process;
mod servers;

pub use binaries::{
    find_nats_server, find_pg_bin, sibling_binary, test_llama_server, workspace_root,
};
pub use http::{http, parse_response};
pub use nats::NatsServer;
pub use nats_cluster::{AUTH_INCLUDE, CLUSTER_CONFIGS, NatsCluster};
/// The signals [`stop_children`] sends.
pub use nix::sys::signal::Signal;
pub use pg_pair::PgPair;
pub use postgres::{Durability, PgServer};
pub use process::{free_port, stop_children};
pub use servers::{ClusterServers, FailoverServers, ReplicatedServers, ServerSet, TestServers};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("{what} not found: {hint}")]
    Missing { what: &'static str, hint: String },
    #[error("{what} failed: {detail}")]
    Failed { what: String, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl HarnessError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HarnessError::Io {
            path: path.into(),
            source,
        }
    }
}
