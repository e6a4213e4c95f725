//! The servers a test or benchmark runs on, under one fresh `/tmp/berth-test-*` directory
//! (where `ops/test.sh` looks for servers a crashed run left behind), removed on drop: NATS
//! (one server or a cluster) and PostgreSQL (one server or a primary with a synchronous
//! standby), in the four combinations the tests use.

use crate::{
    CLUSTER_CONFIGS, HarnessError, NatsCluster, NatsServer, PgPair, PgServer,
    postgres::{self, Durability},
};
use std::path::Path;

/// NATS and PostgreSQL of one kind each.
#[derive(Debug)]
pub struct ServerSet<N, P> {
    pub nats: N,
    pub pg: P,
    // Dropped last: the servers stop before their files go.
    dir: tempfile::TempDir,
}

/// One NATS server and one PostgreSQL (tuned for speed: no fsync).
pub type TestServers = ServerSet<NatsServer, PgServer>;
/// A NATS cluster and one PostgreSQL.
pub type ClusterServers = ServerSet<NatsCluster, PgServer>;
/// One NATS server and a PostgreSQL primary with a synchronous standby: a fleet whose
/// database can fail over.
pub type FailoverServers = ServerSet<NatsServer, PgPair>;
/// A 3-node NATS cluster and a PostgreSQL primary with a synchronous standby: no server
/// whose loss stops the fleet.
pub type ReplicatedServers = ServerSet<NatsCluster, PgPair>;

impl<N, P> ServerSet<N, P> {
    /// Makes the directory, then the servers in it (`nats/` and `pg/`).
    fn start_in(
        nats: impl FnOnce(&Path) -> Result<N, HarnessError>,
        pg: impl FnOnce(&Path) -> Result<P, HarnessError>,
    ) -> Result<Self, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("berth-test-")
            .tempdir()
            .map_err(|e| HarnessError::io(std::env::temp_dir(), e))?;
        postgres::open_for_service_user(dir.path())?;
        Ok(ServerSet {
            nats: nats(&dir.path().join("nats"))?,
            pg: pg(&dir.path().join("pg"))?,
            dir,
        })
    }

    /// The directory the servers live in (other processes of a test may keep files there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn fast_pg(dir: &Path) -> Result<PgServer, HarnessError> {
    PgServer::start(dir, Durability::Fast)
}

impl TestServers {
    pub fn start() -> Result<TestServers, HarnessError> {
        TestServers::start_with(None)
    }

    /// Like [`TestServers::start`], with a configuration file for NATS (its roles).
    pub fn start_with(nats_config: Option<&Path>) -> Result<TestServers, HarnessError> {
        ServerSet::start_in(|d| NatsServer::start_with(d, nats_config), fast_pg)
    }
}

impl ClusterServers {
    /// `nodes` NATS nodes, with the roles of `nats_auth` (`berth auth`'s `nats-auth.conf`)
    /// when given.
    pub fn start(nodes: usize, nats_auth: Option<&Path>) -> Result<ClusterServers, HarnessError> {
        ServerSet::start_in(|d| NatsCluster::start(d, nodes, nats_auth), fast_pg)
    }
}

impl FailoverServers {
    pub fn start() -> Result<FailoverServers, HarnessError> {
        ServerSet::start_in(NatsServer::start, PgPair::start)
    }
}

impl ReplicatedServers {
    pub fn start() -> Result<ReplicatedServers, HarnessError> {
        ServerSet::start_in(
            |d| NatsCluster::start(d, CLUSTER_CONFIGS, None),
            PgPair::start,
        )
    }
}
