//! A private NATS JetStream cluster: the nodes of `ops/nats/cluster-N.conf` (the files
//! `docker-compose.yml` mounts), each on free loopback ports with its own store, routed to
//! each other. What the compose hostnames cannot give locally (ports, routes, store) is set
//! with command-line flags, which override the file.

use crate::{HarnessError, NatsServer, binaries::workspace_root, http::parse_response};
use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// Nodes described in `ops/nats/`: `cluster-1.conf` to `cluster-3.conf`.
pub const CLUSTER_CONFIGS: usize = 3;
/// Where a node's configuration file sits in its directory, as in its container
/// (`/etc/nats/berth.conf`); the file includes `auth/nats-auth.conf` next to it.
const CONFIG_NAME: &str = "berth.conf";
/// The roles file a node's configuration includes, relative to the configuration.
pub const AUTH_INCLUDE: &str = "auth/nats-auth.conf";
/// How long a cluster has to elect a JetStream leader and bring its streams up to date.
const READY: Duration = Duration::from_secs(60);

/// One node's ports on 127.0.0.1.
#[derive(Debug, Clone, Copy)]
struct Ports {
    client: u16,
    cluster: u16,
    http: u16,
}

/// A NATS cluster of up to three JetStream nodes (`nats-1`…), stopped when dropped.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    ports: Vec<Ports>,
}

impl NatsCluster {
    /// Starts `size` nodes (1 to 3) under `dir` on free ports, with the roles of
    /// `auth_config` (`berth auth`'s `nats-auth.conf`) when given, and waits until they have
    /// a JetStream leader.
    pub fn start(
        dir: &Path,
        size: usize,
        auth_config: Option<&Path>,
    ) -> Result<NatsCluster, HarnessError> {
        let mut last = None;
        // A free port can be taken by someone else before a node binds it: try again.
        for _ in 0..3 {
            let clients = (0..size)
                .map(|_| crate::free_port())
                .collect::<Result<Vec<_>, _>>()?;
            match NatsCluster::start_on(dir, &clients, auth_config) {
                Ok(cluster) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(HarnessError::Failed {
            what: "NATS cluster".into(),
            detail: "no attempt made".into(),
        }))
    }

    /// Like [`NatsCluster::start`], with these client ports (one per node; `berth up`'s are
    /// configured). Cluster and monitoring ports are free ones.
    pub fn start_on(
        dir: &Path,
        client_ports: &[u16],
        auth_config: Option<&Path>,
    ) -> Result<NatsCluster, HarnessError> {
        let size = client_ports.len();
        if !(1..=CLUSTER_CONFIGS).contains(&size) {
            return Err(HarnessError::Failed {
                what: "NATS cluster".into(),
                detail: format!("{size} nodes asked for; ops/nats/ describes 1 to 3"),
            });
        }
        let ports = client_ports
            .iter()
            .map(|&client| {
                Ok(Ports {
                    client,
                    cluster: crate::free_port()?,
                    http: crate::free_port()?,
                })
            })
            .collect::<Result<Vec<_>, HarnessError>>()?;
        let routes = ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{}", p.cluster))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = NatsCluster {
            nodes: Vec::with_capacity(size),
            ports,
        };
        for i in 0..size {
            let node_dir = dir.join(format!("nats-{}", i + 1));
            let config = lay_out_config(&node_dir, i, auth_config)?;
            let p = cluster.ports[i];
            let flags = vec![
                "-m".into(),
                p.http.to_string(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", p.cluster),
                "--routes".into(),
                routes.clone(),
            ];
            let node =
                NatsServer::start_node(&node_dir, p.client, Some(&config), &node_name(i), flags)?;
            cluster.nodes.push(node);
        }
        cluster.wait_ready()?;
        Ok(cluster)
    }

    /// How many nodes the cluster has (running or not).
    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Every node's client URL, comma separated: what berth's processes take as
    /// `--nats-url` to reach whichever node is up.
    pub fn urls(&self) -> String {
        (0..self.size())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client URL of node `node` (0-based).
    pub fn url(&self, node: usize) -> String {
        format!("nats://127.0.0.1:{}", self.ports[node].client)
    }

    /// The server name of node `node` (`nats-1` for 0).
    pub fn name(&self, node: usize) -> String {
        node_name(node)
    }

    /// The node (0-based) listening on client port `port`.
    pub fn node_on_port(&self, port: u16) -> Option<usize> {
        self.ports.iter().position(|p| p.client == port)
    }

    /// The process ids of the running nodes (benchmarks read their CPU time).
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(NatsServer::pid).collect()
    }

    /// Node `node`'s log, every run of it.
    pub fn log(&self, node: usize) -> String {
        self.nodes[node].log()
    }

    /// Whether node `node`'s process runs.
    pub fn is_running(&self, node: usize) -> bool {
        self.nodes[node].is_running()
    }

    /// SIGKILLs node `node`, as a lost machine: no goodbye to the cluster or its clients.
    pub fn kill(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Starts node `node` again on its ports and data (after [`NatsCluster::kill`]) and waits
    /// until the cluster is ready again: a leader, and every node's streams caught up.
    pub fn restart(&mut self, node: usize) -> Result<(), HarnessError> {
        self.start_again(node)?;
        self.wait_ready()
    }

    /// Starts node `node` again (after [`NatsCluster::kill`]) without waiting for the cluster
    /// to take it back: the caller goes on, and [`NatsCluster::wait_ready`] says when it has.
    pub fn start_again(&mut self, node: usize) -> Result<(), HarnessError> {
        self.nodes[node].restart()
    }

    /// Makes every running node read its configuration again (new users from `berth auth`).
    pub fn reload(&self) -> Result<(), HarnessError> {
        self.nodes.iter().try_for_each(NatsServer::reload)
    }

    /// The server name of the JetStream meta leader, as a running node sees it.
    pub fn leader(&self) -> Option<String> {
        self.running().find_map(|i| {
            let (status, body) = get(self.ports[i].http, "/jsz").ok()?;
            let jsz: serde_json::Value = serde_json::from_str(&body).ok()?;
            let leader = jsz.pointer("/meta_cluster/leader")?.as_str()?;
            (status == 200 && !leader.is_empty()).then(|| leader.to_owned())
        })
    }

    /// Waits until the running nodes agree on a JetStream meta leader and each says it is
    /// healthy (`/healthz`: the leader known, every stream and consumer it holds current).
    pub fn wait_ready(&self) -> Result<(), HarnessError> {
        let deadline = Instant::now() + READY;
        loop {
            let last = match self.readiness() {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() > deadline {
                let logs: String = self
                    .running()
                    .map(|i| format!("\n--- {} ---\n{}", node_name(i), tail(&self.log(i))))
                    .collect();
                return Err(HarnessError::Failed {
                    what: "NATS cluster".into(),
                    detail: format!("not ready after {READY:?}: {last}{logs}"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `Ok` when the cluster is ready, else what is missing.
    fn readiness(&self) -> Result<(), String> {
        let mut leaders = Vec::new();
        for i in self.running() {
            let name = node_name(i);
            let (status, body) = get(self.ports[i].http, "/healthz").map_err(|e| e.to_string())?;
            if status != 200 {
                return Err(format!("{name} /healthz: {status} {}", body.trim()));
            }
            let (_, jsz) = get(self.ports[i].http, "/jsz").map_err(|e| e.to_string())?;
            let jsz: serde_json::Value =
                serde_json::from_str(&jsz).map_err(|e| format!("{name} /jsz: {e}"))?;
            let leader = jsz
                .pointer("/meta_cluster/leader")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default();
            if leader.is_empty() {
                return Err(format!("{name} knows no JetStream leader"));
            }
            leaders.push(leader.to_owned());
        }
        leaders.dedup();
        match leaders.len() {
            1 => Ok(()),
            0 => Err("no node runs".into()),
            _ => Err(format!("the nodes name different leaders: {leaders:?}")),
        }
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.size()).filter(|&i| self.nodes[i].is_running())
    }
}

fn node_name(i: usize) -> String {
    format!("nats-{}", i + 1)
}

/// The configuration file of node `i` as its container sees it: `ops/nats/cluster-<i+1>.conf`
/// as `<node_dir>/conf/berth.conf`, with the roles file it includes beside it (a link to
/// `auth_config`, so that a reload reads what `berth auth` wrote last; without roles, a file
/// that grants nothing and asks nothing). Returns the configuration's path.
fn lay_out_config(
    node_dir: &Path,
    i: usize,
    auth_config: Option<&Path>,
) -> Result<PathBuf, HarnessError> {
    let source = workspace_root()
        .map(|r| r.join(format!("ops/nats/cluster-{}.conf", i + 1)))
        .filter(|p| p.is_file())
        .ok_or_else(|| HarnessError::Missing {
            what: "ops/nats/cluster-N.conf",
            hint: "run from the berth repository (the cluster's configuration lives there)".into(),
        })?;
    let conf_dir = node_dir.join("conf");
    let auth_dir = conf_dir.join("auth");
    std::fs::create_dir_all(&auth_dir).map_err(|e| HarnessError::io(&auth_dir, e))?;
    let config = conf_dir.join(CONFIG_NAME);
    let include = conf_dir.join(AUTH_INCLUDE);
    for path in [&config, &include] {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(HarnessError::io(path, e)),
        }
    }
    std::os::unix::fs::symlink(&source, &config).map_err(|e| HarnessError::io(&config, e))?;
    match auth_config {
        Some(auth) => {
            let auth = std::path::absolute(auth).map_err(|e| HarnessError::io(auth, e))?;
            std::os::unix::fs::symlink(&auth, &include)
        }
        None => std::fs::write(&include, "# No NATS roles: any client may connect.\n"),
    }
    .map_err(|e| HarnessError::io(&include, e))?;
    Ok(config)
}

/// A GET on a node's monitoring port: status and body.
fn get(port: u16, path: &str) -> Result<(u16, String), HarnessError> {
    let failed = |e: std::io::Error| HarnessError::Failed {
        what: format!("GET http://127.0.0.1:{port}{path}"),
        detail: e.to_string(),
    };
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(failed)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(failed)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(failed)?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(failed)?;
    Ok(parse_response(&out))
}

/// The last lines of a log, for an error message.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
