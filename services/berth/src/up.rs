//! `berth up`: a whole fleet on one machine, for trying berth and for development.
//!
//! Private NATS and PostgreSQL servers (the harness), then the `berth-analyzer` and
//! `berth-agent` binaries built next to `berth` as child processes: N analyzers and one agent
//! per worker of the inventory. Their logs go to this process's stderr, each line prefixed
//! with the child's name. Ctrl-C or SIGTERM stops the agents, then the analyzers (SIGTERM,
//! then SIGKILL after a grace), then the servers.

use anyhow::{Context, Result, bail};
use berth_harness::{
    Durability, NatsCluster, NatsServer, PgServer, Signal, sibling_binary, workspace_root,
};
use berth_store::Store;
use chrono::Utc;
use clap::Args;
use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long a child has to stop after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);
/// How long the agents have to register through the analyzers.
const STARTUP: Duration = Duration::from_secs(60);
/// How often `berth up` looks for children that exited.
const CHECK_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the servers keep their data (kept across runs).
    #[arg(long, default_value = ".berth")]
    dir: PathBuf,
    /// NATS client port on 127.0.0.1 (a cluster's nodes take this one and the next ones).
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// NATS servers to run: 1, or a JetStream cluster of 3 (ops/nats/cluster-N.conf) whose
    /// streams are kept on every node; the parts get every node's URL.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=3))]
    nats_cluster: u16,
    /// PostgreSQL port on 127.0.0.1.
    #[arg(long, default_value_t = 5433)]
    pg_port: u16,
    /// Simulated GPU inventory (default: ops/inventory/demo.toml).
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// Analyzers to run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    analyzers: u32,
    /// Where the gateway (OpenAI-compatible API, management API, dashboard) listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    gateway_listen: std::net::SocketAddr,
    /// Run the gateway without API keys: anyone who reaches it may use and manage the fleet.
    #[arg(long)]
    no_auth: bool,
    /// Run NATS without roles: any local client may publish anything (by default every part
    /// gets credentials of its own under <dir>/auth, see `berth auth`).
    #[arg(long)]
    no_nats_auth: bool,
    /// Serve NATS over TLS (a CA and a certificate for 127.0.0.1 under <dir>/auth; the
    /// parts trust that CA). Needs NATS roles.
    #[arg(long, conflicts_with = "no_nats_auth")]
    nats_tls: bool,
    /// A directory whose model files starts may name, besides <dir>/models (repeatable):
    /// the analyzers read their headers and the agents run servers on them; any other model
    /// path is refused.
    #[arg(long = "model-root")]
    model_roots: Vec<PathBuf>,
}

/// The name of the admin key `berth up` makes for its local fleet.
const UP_KEY_NAME: &str = "berth-up-admin";

pub async fn run(args: UpArgs) -> Result<()> {
    // Listening from the start: Ctrl-C while the fleet starts stops what was started (the
    // starting future is dropped, and with it every child and server it holds).
    let shutdown = berth_telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    let mut fleet = tokio::select! {
        r = &mut shutdown => {
            r?;
            bail!("interrupted while starting; what had started is stopped");
        }
        fleet = start(args) => fleet?,
    };
    println!(
        "berth is up: NATS {} · PostgreSQL 127.0.0.1:{} (password in {}) · {} analyzers · {} simulated workers from {}",
        fleet.nats.url(),
        fleet.pg.port(),
        fleet.database_url_file.display(),
        fleet.analyzers.names.len(),
        fleet.agents.names.len(),
        fleet.inventory.display()
    );
    println!("logs of the analyzers and agents: on stderr, each line prefixed with its name");
    println!(
        "dashboard and OpenAI-compatible API: http://{}/  (API at /v1, management at /api/v1)",
        fleet.gateway_addr
    );
    match &fleet.admin_key {
        Some(path) => println!(
            "admin key: {} (use it as the bearer key, or paste it into the dashboard)",
            path.display()
        ),
        None => println!("the gateway runs without API keys (--no-auth)"),
    }
    match &fleet.nats_auth {
        Some(auth) => println!(
            "NATS roles on: credentials under {} (berth commands run here use publisher.nk)",
            auth.path().display()
        ),
        None => println!("NATS runs without roles (--no-nats-auth)"),
    }
    println!("try: berth start demo --vram 20GiB --wait   (Ctrl-C stops everything)");

    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        tokio::select! {
            r = &mut shutdown => { r?; break; }
            _ = check.tick() => {
                for group in [&mut fleet.gateway, &mut fleet.analyzers, &mut fleet.agents] {
                    for (name, pid, status) in group.newly_exited() {
                        eprintln!("berth up: {name} (pid {pid}) exited ({status}); the rest keep running");
                    }
                }
            }
        }
    }
    println!("stopping…");
    tokio::task::spawn_blocking(move || drop(fleet)).await?;
    println!("stopped");
    Ok(())
}

/// What `berth up` runs. Fields drop in order: gateway, agents, analyzers, then the servers.
struct Fleet {
    gateway: Children,
    gateway_addr: std::net::SocketAddr,
    /// Where the admin key for this fleet is, unless it runs without keys.
    admin_key: Option<PathBuf>,
    /// Holds the database URL with its password.
    database_url_file: PathBuf,
    /// The NATS credentials of every part, unless NATS runs without roles.
    nats_auth: Option<berth_bus::auth::AuthDir>,
    agents: Children,
    analyzers: Children,
    nats: Nats,
    pg: PgServer,
    inventory: PathBuf,
}

/// One NATS server, or a cluster.
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Nats {
    /// What the parts take as `--nats-url`: the server's URL, or every node's.
    fn url(&self) -> String {
        match self {
            Nats::Single(s) => s.url(),
            Nats::Cluster(c) => c.urls(),
        }
    }
}

/// Starts the servers, the analyzers and the agents, and waits until every worker has
/// registered.
async fn start(args: UpArgs) -> Result<Fleet> {
    // The binaries and the inventory first: either missing should fail before anything starts.
    let analyzer_bin = sibling_binary("berth-analyzer")?;
    let agent_bin = sibling_binary("berth-agent")?;
    let gateway_bin = sibling_binary("berth-gateway")?;
    let inventory = match args.inventory {
        Some(p) => std::path::absolute(p)?,
        None => workspace_root()
            .context("cannot find ops/inventory/demo.toml; pass --inventory")?
            .join("ops/inventory/demo.toml"),
    };
    let workers = inventory_workers(&agent_bin, &inventory)?;

    let berth_dir = std::path::absolute(&args.dir)?;
    let dir = berth_dir.join("run");
    let (nats_dir, pg_dir) = (dir.join("nats"), dir.join("pg"));
    let (nats_port, pg_port) = (args.nats_port, args.pg_port);
    let nodes = args.nats_cluster;
    let nats_auth = if args.no_nats_auth {
        None
    } else {
        let auth = berth_bus::auth::AuthDir::new(berth_dir.join("auth"));
        auth.init()?;
        for w in &workers {
            auth.add(berth_bus::auth::Role::Agent { worker: w.clone() }, "")?;
        }
        if args.nats_tls && auth.ca().is_none() {
            auth.enable_tls(&["127.0.0.1".into(), "localhost".into()])?;
        }
        Some(auth)
    };
    let nats_config = nats_auth
        .as_ref()
        .map(berth_bus::auth::AuthDir::server_config);
    let nats = tokio::task::spawn_blocking(move || {
        if nodes == 1 {
            return NatsServer::start_on(&nats_dir, nats_port, nats_config.as_deref())
                .map(Nats::Single);
        }
        // A cluster keeps its data apart from the single server's: their streams differ.
        let ports: Vec<u16> = (0..nodes).map(|i| nats_port.saturating_add(i)).collect();
        NatsCluster::start_on(&dir_of_cluster(&nats_dir), &ports, nats_config.as_deref())
            .map(Nats::Cluster)
    })
    .await?
    .with_context(|| format!("starting {nodes} NATS server(s) from port {nats_port}"))?;
    let password = pg_password(&dir)?;
    let pg = tokio::task::spawn_blocking(move || {
        let mut pg = PgServer::start_on(&pg_dir, pg_port, Durability::Safe)?;
        pg.require_password(&password)?;
        Ok::<_, berth_harness::HarnessError>(pg)
    })
    .await?
    .with_context(|| format!("starting PostgreSQL on port {pg_port}"))?;
    // Where the `berth` commands run next to the fleet find the database (and its password).
    write_private(&berth_dir.join("database-url"), &pg.url())?;
    tracing::info!(nats = %nats.url(), postgres_port = pg.port(), "servers started under {}", dir.display());
    let applied = berth_store::migrate(&pg.url()).await?;
    tracing::info!(applied, "migrations done");

    let model_roots = model_roots(&berth_dir, &args.model_roots)?;
    let mut fleet = Fleet {
        gateway: Children::default(),
        gateway_addr: args.gateway_listen,
        admin_key: None,
        database_url_file: berth_dir.join("database-url"),
        nats_auth,
        agents: Children::default(),
        analyzers: Children::default(),
        nats,
        pg,
        inventory,
    };
    for i in 0..args.analyzers {
        let name = format!("analyzer-{i}");
        let mut cmd = Command::new(&analyzer_bin);
        // The URL holds the password: in the environment, not on a command line anyone can read.
        cmd.args(["--nats-url", &fleet.nats.url()])
            .env("BERTH_DATABASE_URL", fleet.pg.url())
            .args(["--name", &name])
            .env("BERTH_MODEL_ROOTS", &model_roots);
        fleet.creds(&mut cmd, "analyzer");
        fleet.analyzers.spawn(name, cmd)?;
    }
    let registered_since = Utc::now();
    for (i, worker) in workers.iter().enumerate() {
        // Simulated GPUs, real model servers: a start with a model file runs llama-server
        // (on the CPU here); a start with only a VRAM claim stays a reservation. Each agent
        // has its own state directory and ports, so two never pick the same one.
        let ports = agent_ports(i)?;
        let mut cmd = Command::new(&agent_bin);
        cmd.args(["--nats-url", &fleet.nats.url(), "--worker", worker])
            .arg("--inventory")
            .arg(&fleet.inventory)
            .args(["--runtime", "process", "--port-range", &ports])
            .arg("--state-dir")
            .arg(dir.join("agents").join(worker))
            .env("BERTH_MODEL_ROOTS", &model_roots);
        fleet.creds(&mut cmd, &format!("agent-{worker}"));
        fleet.agents.spawn(format!("agent-{worker}"), cmd)?;
    }
    wait_registered(&mut fleet, &workers, registered_since).await?;

    if !args.no_auth {
        fleet.admin_key = Some(admin_key(&fleet.pg.url(), &berth_dir).await?);
    }
    let mut cmd = Command::new(&gateway_bin);
    cmd.args([
        "--nats-url",
        &fleet.nats.url(),
        "--listen",
        &args.gateway_listen.to_string(),
    ])
    .env("BERTH_DATABASE_URL", fleet.pg.url());
    if args.no_auth {
        cmd.arg("--no-auth");
    }
    fleet.creds(&mut cmd, "publisher");
    fleet.gateway.spawn("gateway".into(), cmd)?;
    wait_listening(&mut fleet.gateway, args.gateway_listen).await?;
    Ok(fleet)
}

/// The model roots of the fleet, as `BERTH_MODEL_ROOTS` lists them: `<dir>/models` (made
/// if missing, where `ops/fetch-models.sh` puts the demo model) and the `--model-root`s,
/// each checked here so a wrong one fails before anything starts.
fn model_roots(berth_dir: &Path, extra: &[PathBuf]) -> Result<std::ffi::OsString> {
    let models = berth_dir.join("models");
    std::fs::create_dir_all(&models).with_context(|| format!("creating {}", models.display()))?;
    let roots = berth_models::ModelRoots::new(std::iter::once(&models).chain(extra))?;
    let dirs = roots.roots().unwrap_or_default();
    if let Some(bad) = dirs
        .iter()
        .find(|d| d.as_os_str().as_encoded_bytes().contains(&b':'))
    {
        bail!(
            "model root {} holds a ':', which BERTH_MODEL_ROOTS cannot carry",
            bad.display()
        );
    }
    Ok(std::env::join_paths(dirs)?)
}

/// Where a cluster's nodes keep their data, beside the single server's.
fn dir_of_cluster(nats_dir: &Path) -> PathBuf {
    nats_dir.with_file_name("nats-cluster")
}

/// The admin key of this fleet, in `<dir>/admin.key` (readable by its owner only): the one
/// there if it still opens the gateway, else a new one (replacing the old live key).
async fn admin_key(database_url: &str, dir: &Path) -> Result<PathBuf> {
    use berth_store::keys::{NewKey, Scope, digest};
    let path = dir.join("admin.key");
    let store = Store::connect(database_url, 1)?;
    if let Ok(existing) = std::fs::read_to_string(&path) {
        let d = digest(existing.trim());
        if store
            .live_keys()
            .await?
            .iter()
            .any(|k| k.digest == d && k.scope == Scope::Admin)
        {
            return Ok(path);
        }
    }
    store.revoke_key(UP_KEY_NAME).await?;
    let key = NewKey::generate();
    store.create_key(UP_KEY_NAME, Scope::Admin, &key).await?;
    write_private(&path, &key.secret)?;
    Ok(path)
}

/// Writes `text` and a newline to `path`, readable by its owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    Ok(berth_bus::auth::write_private(
        path,
        format!("{text}\n").as_bytes(),
    )?)
}

/// The password of this fleet's PostgreSQL: the one kept under `dir`, or a new one.
fn pg_password(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("pg-password");
    if let Ok(p) = std::fs::read_to_string(&path) {
        let p = p.trim();
        if !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(p.to_owned());
        }
    }
    let bytes: [u8; 24] = rand::random();
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&path, &password)?;
    Ok(password)
}

/// Waits until something accepts connections on `addr`; fails if the child exits first or
/// after [`STARTUP`].
async fn wait_listening(children: &mut Children, addr: std::net::SocketAddr) -> Result<()> {
    let deadline = Instant::now() + STARTUP;
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        if let Some((name, pid, status)) = children.newly_exited().into_iter().next() {
            bail!("{name} (pid {pid}) exited ({status}) while starting (is {addr} in use?)");
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the gateway does not listen on {addr} after {STARTUP:?}");
        }
    }
}

impl Fleet {
    /// Gives `cmd` the NATS credentials of `user`, when NATS runs with roles.
    fn creds(&self, cmd: &mut Command, user: &str) {
        if let Some(auth) = &self.nats_auth {
            cmd.arg("--nats-creds").arg(auth.creds(user));
            if let Some(ca) = auth.ca() {
                cmd.arg("--nats-ca").arg(ca);
            }
        }
    }
}

/// Ports for the model servers of the `i`th agent of this machine: 100 each from 40000.
fn agent_ports(i: usize) -> Result<String> {
    let first = u16::try_from(i)
        .ok()
        .and_then(|i| i.checked_mul(100))
        .and_then(|o| o.checked_add(40_000))
        .filter(|p| *p <= 65_435)
        .context("too many workers in the inventory for one machine's port ranges")?;
    Ok(format!("{first}-{}", first + 99))
}

/// The worker ids of `inventory`, as the agent reads it (`--print-inventory`): the file is
/// checked by the code that will run it, without linking the agent into this client.
fn inventory_workers(agent_bin: &Path, inventory: &Path) -> Result<Vec<String>> {
    let out = Command::new(agent_bin)
        .arg("--inventory")
        .arg(inventory)
        .arg("--print-inventory")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", agent_bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} --inventory {} failed ({}): {}",
            agent_bin.display(),
            inventory.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let doc: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)
        .context("berth-agent --print-inventory printed no JSON list")?;
    let workers: Vec<String> = doc
        .iter()
        .filter_map(|w| Some(w.get("worker")?.as_str()?.to_owned()))
        .collect();
    if workers.is_empty() || workers.len() != doc.len() {
        bail!("{} lists no workers", inventory.display());
    }
    Ok(workers)
}

/// Waits until every worker has registered (a heartbeat recorded after `since`), which also
/// means an analyzer is taking reports; fails if a child exits first or after [`STARTUP`].
async fn wait_registered(
    fleet: &mut Fleet,
    workers: &[String],
    since: chrono::DateTime<Utc>,
) -> Result<()> {
    let store = Store::connect(&fleet.pg.url(), 1)?;
    let deadline = Instant::now() + STARTUP;
    let mut interval = tokio::time::interval(Duration::from_millis(100));
    loop {
        interval.tick().await;
        for group in [&mut fleet.analyzers, &mut fleet.agents] {
            if let Some((name, pid, status)) = group.newly_exited().into_iter().next() {
                bail!("{name} (pid {pid}) exited ({status}) while the fleet was starting");
            }
        }
        let fresh: BTreeSet<String> = store
            .capacity()
            .await?
            .into_iter()
            .filter(|(w, _)| w.last_heartbeat >= since)
            .map(|(w, _)| w.id)
            .collect();
        let missing: Vec<&str> = workers
            .iter()
            .filter(|w| !fresh.contains(*w))
            .map(String::as_str)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("workers {missing:?} not registered after {STARTUP:?}");
        }
    }
}

/// Child processes of `berth up`, each with its name. Dropping the group stops them all:
/// SIGTERM, then SIGKILL for those still running after [`GRACE`].
#[derive(Default)]
struct Children {
    names: Vec<String>,
    children: Vec<Child>,
    exited: Vec<bool>,
}

impl Children {
    /// Starts `cmd` as `name` with its own metrics port and its output relayed to stderr.
    fn spawn(&mut self, name: String, mut cmd: Command) -> Result<()> {
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], berth_harness::free_port()?));
        cmd.args(["--metrics-addr", &metrics.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,async_nats=warn");
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        if let Some(out) = child.stdout.take() {
            relay(&name, out);
        }
        if let Some(err) = child.stderr.take() {
            relay(&name, err);
        }
        println!(
            "{name:<16} pid {:<8} metrics http://{metrics}/metrics",
            child.id()
        );
        self.names.push(name);
        self.children.push(child);
        self.exited.push(false);
        Ok(())
    }

    /// The children that exited since the last call: name, pid and how.
    fn newly_exited(&mut self) -> Vec<(String, u32, String)> {
        let mut out = Vec::new();
        for ((child, name), exited) in self
            .children
            .iter_mut()
            .zip(&self.names)
            .zip(&mut self.exited)
        {
            if !*exited && let Ok(Some(status)) = child.try_wait() {
                *exited = true;
                out.push((name.clone(), child.id(), status.to_string()));
            }
        }
        out
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        berth_harness::stop_children(&mut self.children, Signal::SIGTERM, GRACE);
    }
}

/// Copies a child's output to stderr line by line, prefixed with its name, until it closes.
fn relay(name: &str, from: impl Read + Send + 'static) {
    let prefix = format!("{name} | ");
    std::thread::spawn(move || {
        for line in BufReader::new(from).split(b'\n').map_while(Result::ok) {
            let mut err = std::io::stderr().lock();
            // Nowhere to report a failed write to stderr; keep draining so the child never
            // blocks on a full pipe.
            let _ = err
                .write_all(prefix.as_bytes())
                .and_then(|()| err.write_all(&line))
                .and_then(|()| err.write_all(b"\n"));
        }
    });
}
