//! The topology `docker-compose.yml` describes, as data, and a way to run it without Docker.
//!
//! [`topology`] lists the services of the compose file: image, command, files mounted,
//! environment, published ports, replicas. A test (`tests/compose_topology.rs`) keeps the
//! compose file and this list the same; [`ComposeFleet`] runs the list as local processes
//! with the same configuration files and commands: the hostnames `nats-1..3` and `postgres`
//! become loopback addresses on free ports, what a command reads from a mount is read from
//! the mount's source, and listeners on `0.0.0.0:P` listen on a free loopback port instead.

use crate::{
    HarnessError, NatsCluster, PgServer, Signal, find_pg_bin, free_port,
    nats_cluster::AUTH_INCLUDE, postgres::Durability, stop_children, workspace_root,
};
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The compose file, at the workspace root.
pub const COMPOSE_FILE: &str = "docker-compose.yml";
/// Where `berth auth init --dir` writes the credentials compose mounts (relative to the
/// workspace root; git- and docker-ignored).
pub const AUTH_DIR: &str = ".berth/compose-auth";
/// Where each berth service finds its NATS credentials in its container.
pub const CREDS_TARGET: &str = "/etc/berth/nats.nk";
/// Where a NATS node finds its configuration in its container.
const NATS_CONFIG_TARGET: &str = "/etc/nats/berth.conf";
/// Where the inventory of the simulated agents is mounted.
const INVENTORY_TARGET: &str = "/etc/berth/inventory.toml";
/// The database the PostgreSQL image creates (`POSTGRES_DB`).
pub const DATABASE: &str = "berth";

/// What a service runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Image {
    /// `nats` (the image's entrypoint is nats-server).
    Nats,
    /// `postgres`.
    Postgres,
    /// `berth:local`, built from `ops/Dockerfile`: the command names the binary.
    Berth,
}

/// An environment variable's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    Text(&'static str),
    /// Every NATS node's client URL.
    NatsUrls,
    /// berth's database, with the password from `.env`.
    DatabaseUrl,
    /// The PostgreSQL password from `.env`.
    PgPassword,
    /// The path of a file mounted at this target.
    Mounted(&'static str),
}

impl Value {
    /// The value as the compose file writes it.
    pub fn compose(self) -> String {
        match self {
            Value::Text(t) | Value::Mounted(t) => t.to_owned(),
            Value::NatsUrls => (1..=3)
                .map(|i| format!("nats://nats-{i}:4222"))
                .collect::<Vec<_>>()
                .join(","),
            Value::DatabaseUrl => format!(
                "postgres://postgres:{}@postgres:5432/{DATABASE}",
                Value::PgPassword.compose()
            ),
            Value::PgPassword => "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}".into(),
        }
    }
}

/// A file of the host mounted read-only into a service's container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Relative to the workspace root, as the compose file writes it without its `./`.
    pub source: String,
    pub target: &'static str,
}

/// A container port published on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish {
    pub host_ip: &'static str,
    pub host_port: u16,
    pub container_port: u16,
}

/// One service of the compose file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: &'static str,
    pub image: Image,
    /// The command (for berth's image, the binary and its arguments).
    pub command: Vec<String>,
    pub mounts: Vec<Mount>,
    /// Named volumes: (volume, target).
    pub volumes: Vec<(String, &'static str)>,
    pub env: BTreeMap<&'static str, Value>,
    pub ports: Vec<Publish>,
    pub replicas: u32,
    /// Runs once to completion before the services after it start (`migrate`).
    pub one_shot: bool,
}

impl Service {
    fn new(name: &'static str, image: Image, command: &[&str]) -> Service {
        Service {
            name,
            image,
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            mounts: Vec::new(),
            volumes: Vec::new(),
            env: BTreeMap::new(),
            ports: Vec::new(),
            replicas: 1,
            one_shot: false,
        }
    }

    fn mount(mut self, source: impl Into<String>, target: &'static str) -> Service {
        self.mounts.push(Mount {
            source: source.into(),
            target,
        });
        self
    }

    fn publish(mut self, host_port: u16, container_port: u16) -> Service {
        self.ports.push(Publish {
            host_ip: "127.0.0.1",
            host_port,
            container_port,
        });
        self
    }

    /// A berth service: the shared environment, and the NATS credentials of `user`.
    fn berth(name: &'static str, command: &[&str], user: &str) -> Service {
        let mut s = Service::new(name, Image::Berth, command)
            .mount(format!("{AUTH_DIR}/{user}.nk"), CREDS_TARGET);
        s.env = BTreeMap::from([
            ("BERTH_NATS_URL", Value::NatsUrls),
            ("BERTH_DATABASE_URL", Value::DatabaseUrl),
            ("BERTH_NATS_CREDS", Value::Mounted(CREDS_TARGET)),
            ("RUST_LOG", Value::Text("info")),
        ]);
        s
    }

    /// The volumes as the compose file lists them: `./source:target:ro`, `volume:target`.
    pub fn compose_volumes(&self) -> Vec<String> {
        self.mounts
            .iter()
            .map(|m| format!("./{}:{}:ro", m.source, m.target))
            .chain(self.volumes.iter().map(|(v, t)| format!("{v}:{t}")))
            .collect()
    }

    /// The ports as the compose file lists them: `ip:host:container`.
    pub fn compose_ports(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("{}:{}:{}", p.host_ip, p.host_port, p.container_port))
            .collect()
    }

    /// The environment as the compose file writes it.
    pub fn compose_env(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.compose()))
            .collect()
    }
}

/// The services of `docker-compose.yml`, in the order they start.
pub fn topology() -> Vec<Service> {
    let mut services = Vec::new();
    for i in 1..=3u16 {
        let name: &'static str = ["nats-1", "nats-2", "nats-3"][usize::from(i - 1)];
        let mut node = Service::new(
            name,
            Image::Nats,
            &["-c", NATS_CONFIG_TARGET, "-sd", "/data/jetstream"],
        )
        .mount(format!("ops/nats/cluster-{i}.conf"), NATS_CONFIG_TARGET)
        .mount(
            format!("{AUTH_DIR}/nats-auth.conf"),
            // The configuration includes the roles file relative to itself.
            nats_include_target(),
        );
        node.volumes
            .push((format!("nats-{i}-data"), "/data/jetstream"));
        if i == 1 {
            node = node.publish(4222, 4222).publish(8222, 8222);
        }
        services.push(node);
    }
    let mut pg = Service::new("postgres", Image::Postgres, &[]).publish(5432, 5432);
    pg.env = BTreeMap::from([
        ("POSTGRES_PASSWORD", Value::PgPassword),
        ("POSTGRES_DB", Value::Text(DATABASE)),
    ]);
    pg.volumes
        .push(("pg-data".into(), "/var/lib/postgresql/data"));
    services.push(pg);
    let mut migrate = Service::berth("migrate", &["berth", "migrate"], "publisher");
    migrate.one_shot = true;
    services.push(migrate);
    let mut analyzer = Service::berth("analyzer", &["berth-analyzer"], "analyzer");
    analyzer.replicas = 2;
    services.push(analyzer);
    for (name, worker) in [("agent-a", "gpu-a"), ("agent-b", "gpu-b")] {
        services.push(
            Service::berth(
                name,
                &[
                    "berth-agent",
                    "--worker",
                    worker,
                    "--inventory",
                    INVENTORY_TARGET,
                    "--sim",
                ],
                &format!("agent-{worker}"),
            )
            .mount("ops/inventory/demo.toml", INVENTORY_TARGET),
        );
    }
    services.push(
        Service::berth(
            "gateway",
            &["berth-gateway", "--listen", "0.0.0.0:8080"],
            "publisher",
        )
        .publish(8080, 8080),
    );
    services
}

/// Where a node's roles file is mounted: beside its configuration, as it includes it.
fn nats_include_target() -> &'static str {
    // `/etc/nats/` + AUTH_INCLUDE, spelled out because targets are static text.
    const TARGET: &str = "/etc/nats/auth/nats-auth.conf";
    debug_assert!(TARGET.ends_with(AUTH_INCLUDE));
    TARGET
}

/// The topology of [`topology`] running as local processes: the NATS cluster and PostgreSQL
/// of the harness, then every berth service (replicas included) from `bin_dir`. Stopped
/// when dropped: berth's processes first, then the servers.
#[derive(Debug)]
pub struct ComposeFleet {
    processes: Vec<Child>,
    names: Vec<String>,
    pub nats: NatsCluster,
    pub pg: PgServer,
    database_url: String,
    published: BTreeMap<(String, u16), SocketAddr>,
    dir: tempfile::TempDir,
}

/// How long the one-shot services have to finish.
const ONE_SHOT: Duration = Duration::from_secs(60);

impl ComposeFleet {
    /// Runs the topology with the binaries of `bin_dir` (`target/debug`) and the credentials
    /// `berth auth init` wrote to `auth_dir` (what the compose file mounts from
    /// [`AUTH_DIR`]).
    pub fn start(bin_dir: &Path, auth_dir: &Path) -> Result<ComposeFleet, HarnessError> {
        let root = workspace_root().ok_or_else(|| HarnessError::Missing {
            what: COMPOSE_FILE,
            hint: "run from the berth repository".into(),
        })?;
        let dir = tempfile::Builder::new()
            .prefix("berth-compose-")
            .tempdir()
            .map_err(|e| HarnessError::io(std::env::temp_dir(), e))?;
        crate::postgres::open_for_service_user(dir.path())?;
        let services = topology();
        let nodes = services.iter().filter(|s| s.image == Image::Nats).count();
        let nats = NatsCluster::start(
            &dir.path().join("nats"),
            nodes,
            Some(&auth_dir.join("nats-auth.conf")),
        )?;
        let mut pg = PgServer::start(&dir.path().join("pg"), Durability::Fast)?;
        pg.require_password(&random_password()?)?;
        create_database(&pg.url())?;
        let database_url = match pg.url().rsplit_once('/') {
            Some((server, _)) => format!("{server}/{DATABASE}"),
            None => pg.url(),
        };
        let mut fleet = ComposeFleet {
            processes: Vec::new(),
            names: Vec::new(),
            nats,
            pg,
            database_url,
            published: BTreeMap::new(),
            dir,
        };
        for service in services.iter().filter(|s| s.image == Image::Berth) {
            for replica in 0..service.replicas {
                let name = if service.replicas > 1 {
                    format!("{}-{}", service.name, replica + 1)
                } else {
                    service.name.to_owned()
                };
                let mut cmd = fleet.command(service, &root, auth_dir, bin_dir)?;
                let log_path = fleet.dir.path().join(format!("{name}.log"));
                let log =
                    std::fs::File::create(&log_path).map_err(|e| HarnessError::io(&log_path, e))?;
                let log2 = log
                    .try_clone()
                    .map_err(|e| HarnessError::io(&log_path, e))?;
                let mut child = cmd
                    .stdin(Stdio::null())
                    .stdout(log)
                    .stderr(log2)
                    .spawn()
                    .map_err(|e| HarnessError::io(bin_dir.join(&service.command[0]), e))?;
                if service.one_shot {
                    let status = wait_exit(&mut child, ONE_SHOT);
                    if !matches!(status, Some(s) if s.success()) {
                        return Err(HarnessError::Failed {
                            what: name.clone(),
                            detail: format!("{status:?}; log:\n{}", fleet.log(&name)),
                        });
                    }
                    continue;
                }
                fleet.processes.push(child);
                fleet.names.push(name);
            }
        }
        Ok(fleet)
    }

    /// The local command of one berth service: its binary from `bin_dir`, its arguments
    /// and environment with mount targets, hostnames and listeners made local.
    fn command(
        &mut self,
        service: &Service,
        root: &Path,
        auth_dir: &Path,
        bin_dir: &Path,
    ) -> Result<Command, HarnessError> {
        let source = |target: &str| {
            service
                .mounts
                .iter()
                .find(|m| m.target == target)
                .map(|m| local_source(&m.source, root, auth_dir))
        };
        let mut cmd = Command::new(bin_dir.join(&service.command[0]));
        for arg in &service.command[1..] {
            if let Some(path) = source(arg) {
                cmd.arg(path);
            } else if let Some(port) = arg.strip_prefix("0.0.0.0:") {
                let container: u16 = port.parse().map_err(|_| HarnessError::Failed {
                    what: service.name.into(),
                    detail: format!("listen address {arg}"),
                })?;
                let local = SocketAddr::from(([127, 0, 0, 1], free_port()?));
                self.published
                    .insert((service.name.to_owned(), container), local);
                cmd.arg(local.to_string());
            } else {
                cmd.arg(arg);
            }
        }
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        for (key, value) in &service.env {
            let local = match value {
                Value::Text(t) => (*t).to_owned(),
                Value::NatsUrls => self.nats.urls(),
                Value::DatabaseUrl => self.database_url.clone(),
                Value::PgPassword => String::new(),
                Value::Mounted(t) => source(t)
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            };
            cmd.env(key, local);
        }
        // Each container has a loopback of its own; here the processes share one, so the
        // metrics listeners (127.0.0.1:910x by default) are off.
        cmd.env("BERTH_METRICS_ADDR", "off")
            .env("BERTH_AGENT_METRICS_ADDR", "off");
        Ok(cmd)
    }

    /// Where a service's container port is reached here.
    pub fn published(&self, service: &str, container_port: u16) -> Option<SocketAddr> {
        self.published
            .get(&(service.to_owned(), container_port))
            .copied()
    }

    /// berth's database (`berth`), with its password.
    pub fn database_url(&self) -> &str {
        &self.database_url
    }

    /// The running berth processes by name (`analyzer-1`, `agent-a`, …).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The processes that have exited, with how.
    pub fn exited(&mut self) -> Vec<(String, String)> {
        self.processes
            .iter_mut()
            .zip(&self.names)
            .filter_map(|(c, n)| Some((n.clone(), c.try_wait().ok()??.to_string())))
            .collect()
    }

    /// A process's output so far.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for ComposeFleet {
    fn drop(&mut self) {
        stop_children(
            &mut self.processes,
            Signal::SIGTERM,
            Duration::from_secs(10),
        );
    }
}

/// A mount's source here: under `auth_dir` for the credentials, else in the workspace.
fn local_source(source: &str, root: &Path, auth_dir: &Path) -> PathBuf {
    match source.strip_prefix(AUTH_DIR) {
        Some(rest) => auth_dir.join(rest.trim_start_matches('/')),
        None => root.join(source),
    }
}

/// Waits for `child` to exit, up to `limit`; its status, or `None` (then it is killed).
fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A password for this run's PostgreSQL, as `.env` would hold one: 24 hex digits.
fn random_password() -> Result<String, HarnessError> {
    use std::io::Read;
    let mut bytes = [0u8; 12];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| HarnessError::io("/dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What the PostgreSQL image does with `POSTGRES_DB`: creates the database.
fn create_database(url: &str) -> Result<(), HarnessError> {
    let out = Command::new(find_pg_bin()?.join("psql"))
        .arg(url)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!("CREATE DATABASE {DATABASE}"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::io("psql", e))?;
    if !out.status.success() {
        return Err(HarnessError::Failed {
            what: format!("creating the {DATABASE} database"),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}
