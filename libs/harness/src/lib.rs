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

pub use binaries::{
    find_nats_server, find_pg_bin, sibling_binary, test_llama_server, workspace_root,
};
pub use http::{http, parse_response};
pub use nats::NatsServer;
pub use nats_cluster::{AUTH_INCLUDE, CLUSTER_CONFIGS, NatsCluster};
/// The signals [`stop_children`] sends.
pub use nix::sys::signal::Signal;
pub use pg_pair::{FailoverServers, PgPair};
pub use postgres::{Durability, PgServer};
pub use process::{free_port, stop_children};

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

/// A NATS cluster and a PostgreSQL server in one temporary directory, removed on drop.
#[derive(Debug)]
pub struct ClusterServers {
    pub nats: NatsCluster,
    pub pg: PgServer,
    // Dropped last: the servers stop before their files go.
    dir: tempfile::TempDir,
}

impl ClusterServers {
    /// Starts `nodes` NATS nodes (with the roles of `nats_auth`, `berth auth`'s
    /// `nats-auth.conf`, when given) and PostgreSQL under a fresh `/tmp/berth-test-*`.
    pub fn start(
        nodes: usize,
        nats_auth: Option<&std::path::Path>,
    ) -> Result<ClusterServers, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .map_err(|e| HarnessError::io(std::env::temp_dir(), e))?;
        postgres::open_for_service_user(dir.path())?;
        let nats = NatsCluster::start(&dir.path().join("nats"), nodes, nats_auth)?;
        let pg = PgServer::start(&dir.path().join("pg"), postgres::Durability::Fast)?;
        Ok(ClusterServers { nats, pg, dir })
    }

    /// The directory the servers live in (other processes of a test may keep files there).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// A 3-node NATS cluster and a PostgreSQL primary with a synchronous standby under a fresh
/// `/tmp/berth-test-*`: no server whose loss stops the fleet.
#[derive(Debug)]
pub struct ReplicatedServers {
    pub nats: NatsCluster,
    pub pg: PgPair,
    // Dropped last: the servers stop before their files go.
    _dir: tempfile::TempDir,
}

impl ReplicatedServers {
    pub fn start() -> Result<ReplicatedServers, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .map_err(|e| HarnessError::io(std::env::temp_dir(), e))?;
        postgres::open_for_service_user(dir.path())?;
        let nats = NatsCluster::start(&dir.path().join("nats"), CLUSTER_CONFIGS, None)?;
        let pg = PgPair::start(&dir.path().join("pg"))?;
        Ok(ReplicatedServers {
            nats,
            pg,
            _dir: dir,
        })
    }
}

/// A NATS server and a PostgreSQL cluster in one temporary directory, removed on drop.
#[derive(Debug)]
pub struct TestServers {
    pub nats: NatsServer,
    pub pg: PgServer,
    // Dropped last: the servers stop before their files go.
    _dir: tempfile::TempDir,
}

impl TestServers {
    /// Starts both servers under a fresh `/tmp/berth-test-*` directory (tuned for speed:
    /// no fsync).
    pub fn start() -> Result<TestServers, HarnessError> {
        TestServers::start_with(None)
    }

    /// Like [`TestServers::start`], with a configuration file for NATS (its roles).
    pub fn start_with(nats_config: Option<&std::path::Path>) -> Result<TestServers, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .map_err(|e| HarnessError::io(std::env::temp_dir(), e))?;
        postgres::open_for_service_user(dir.path())?;
        let nats = NatsServer::start_with(&dir.path().join("nats"), nats_config)?;
        let pg = PgServer::start(&dir.path().join("pg"), postgres::Durability::Fast)?;
        Ok(TestServers {
            nats,
            pg,
            _dir: dir,
        })
    }
}
