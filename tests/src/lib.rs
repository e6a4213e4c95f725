//! Shared setup for the integration tests: a private NATS + PostgreSQL, analyzers and
//! simulated agents in this process, and checks of berth's invariants.

pub mod hold;
pub mod serving;

use berth_agent::{Agent, AgentConfig, AgentStats, Runtime, WorkerSpec};
use berth_analyzer::{Analyzer, AnalyzerConfig, Hooks, Stats};
use berth_bus::Bus;
use berth_harness::{FailoverServers, ReplicatedServers, TestServers};
use berth_proto::{CmdSeq, Command, GpuInfo, InstanceState, StartSpec, StopSpec};
use berth_store::{InstanceRow, Store};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

pub const GIB: i64 = 1 << 30;

/// Where the workspace's binaries are: `target/<profile>/`, above the test executable in
/// `target/<profile>/deps/`.
pub fn binaries_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(std::path::Path::parent)
        .expect("test executable is in target/<profile>/deps")
        .to_path_buf()
}

/// The workspace binary `name` (`berth`, `berth-analyzer`, …), which must be built.
pub fn built_binary(name: &str) -> std::path::PathBuf {
    let path = binaries_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `cargo build --bins` first (`ops/test.sh` does)",
        path.display()
    );
    path
}

/// What a fleet runs on: one PostgreSQL ([`TestServers`], the default) or a primary with a
/// synchronous standby ([`FailoverServers`], see [`Fleet::start_failover`]).
pub trait Servers: Send + Sync + 'static {
    fn nats_url(&self) -> String;
    /// The URL every part of the fleet connects to the database with.
    fn database_url(&self) -> String;
}

impl Servers for TestServers {
    fn nats_url(&self) -> String {
        self.nats.url()
    }
    fn database_url(&self) -> String {
        self.pg.url()
    }
}

impl Servers for FailoverServers {
    fn nats_url(&self) -> String {
        self.nats.url()
    }
    /// Both nodes, `target_session_attrs=read-write`: it follows a promotion.
    fn database_url(&self) -> String {
        self.pg.url()
    }
}

impl Servers for ReplicatedServers {
    /// Every node, comma separated: a client moves to another when one is lost.
    fn nats_url(&self) -> String {
        self.nats.urls()
    }
    fn database_url(&self) -> String {
        self.pg.url()
    }
}

/// Servers plus the processes under test, all torn down on drop.
pub struct Fleet<S = TestServers> {
    /// Counters of every in-process agent, by worker.
    pub agent_stats: Arc<AgentStats>,
    pub store: Store,
    pub bus: Bus,
    pub analyzers: Vec<Analyzer>,
    pub agents: Vec<Agent>,
    pub servers: S,
    /// NATS roles, when the servers enforce them: analyzers and agents get their own.
    pub auth: Option<berth_bus::auth::AuthDir>,
}

/// Logs to the test's output when RUST_LOG is set.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

impl Fleet {
    /// Fresh servers with the schema and streams in place; no analyzer, no agent yet.
    pub async fn start() -> Fleet {
        Fleet::start_with(None).await
    }

    /// Like [`Fleet::start`] with NATS enforcing the roles of `auth` (which must list every
    /// worker's agent already); `bus` is then the analyzer role.
    pub async fn start_with(auth: Option<berth_bus::auth::AuthDir>) -> Fleet {
        let config = auth.as_ref().map(berth_bus::auth::AuthDir::server_config);
        Fleet::started(
            move || TestServers::start_with(config.as_deref()),
            "NATS and PostgreSQL",
            auth,
        )
        .await
    }
}

impl Fleet<FailoverServers> {
    /// Like [`Fleet::start`] on a PostgreSQL primary with a synchronous standby: every
    /// part of the fleet connects with the pair's two-host URL, so
    /// `servers.pg.kill_primary()` then `servers.pg.promote_standby()` is a failover.
    pub async fn start_failover() -> Fleet<FailoverServers> {
        Fleet::started(FailoverServers::start, "NATS and a PostgreSQL pair", None).await
    }
}

impl Fleet<ReplicatedServers> {
    /// Like [`Fleet::start`] on a 3-node NATS cluster (streams with three copies) and a
    /// PostgreSQL primary with a synchronous standby.
    pub async fn start_replicated() -> Fleet<ReplicatedServers> {
        Fleet::started(
            ReplicatedServers::start,
            "a NATS cluster and a PostgreSQL pair",
            None,
        )
        .await
    }
}

impl<S: Servers> Fleet<S> {
    /// Starts `what` with `start` (off the async threads: it waits on processes), then
    /// [`Fleet::on`] them.
    async fn started<F>(start: F, what: &str, auth: Option<berth_bus::auth::AuthDir>) -> Fleet<S>
    where
        F: FnOnce() -> Result<S, berth_harness::HarnessError> + Send + 'static,
        S: Send + 'static,
    {
        init_logs();
        let servers = tokio::task::spawn_blocking(start)
            .await
            .expect("harness task")
            .unwrap_or_else(|e| panic!("start {what} (run ops/setup.sh first): {e:?}"));
        Fleet::on(servers, auth).await
    }

    /// The schema and streams in place on `servers`; no analyzer, no agent yet.
    async fn on(servers: S, auth: Option<berth_bus::auth::AuthDir>) -> Fleet<S> {
        let url = servers.database_url();
        berth_store::migrate(&url).await.expect("migrate");
        let store = Store::connect(&url, 8).expect("pool");
        let access = berth_bus::Access {
            creds: auth.as_ref().map(|a| a.creds("analyzer")),
            tls_ca: auth.as_ref().and_then(berth_bus::auth::AuthDir::ca),
            ..berth_bus::Access::default()
        };
        let bus = Bus::connect_as(&servers.nats_url(), "test", &access)
            .await
            .expect("bus");
        Fleet {
            agent_stats: Arc::default(),
            store,
            bus,
            analyzers: Vec::new(),
            agents: Vec::new(),
            servers,
            auth,
        }
    }

    /// The configuration tests use: production values, but sweeps and redelivery fast
    /// enough that a test waits seconds, not minutes.
    pub fn analyzer_config(&self, name: &str) -> AnalyzerConfig {
        let mut c = AnalyzerConfig::new(self.servers.nats_url(), self.servers.database_url());
        c.name = name.into();
        c.nats_access.creds = self.auth.as_ref().map(|a| a.creds("analyzer"));
        c.nats_access.tls_ca = self.auth.as_ref().and_then(berth_bus::auth::AuthDir::ca);
        c.ack_wait = Duration::from_secs(2);
        c.sweep_every = Duration::from_millis(250);
        c.stuck_after = Duration::from_secs(5);
        c.unreachable_after = Duration::from_secs(1);
        c.gone_after = Duration::from_secs(2);
        c.model_roots = test_model_roots();
        c
    }

    /// Starts an analyzer in this process; returns its counters.
    pub async fn add_analyzer(&mut self, hooks: Hooks) -> Arc<Stats> {
        let name = format!("analyzer-{}", self.analyzers.len());
        let config = self.analyzer_config(&name);
        self.add_analyzer_with(config, hooks).await
    }

    /// Starts an analyzer with a custom configuration.
    pub async fn add_analyzer_with(&mut self, config: AnalyzerConfig, hooks: Hooks) -> Arc<Stats> {
        let a = Analyzer::start(config, hooks)
            .await
            .expect("analyzer start");
        let stats = a.stats.clone();
        self.analyzers.push(a);
        stats
    }

    /// Starts a simulated agent for `worker` and waits until the worker is registered.
    pub async fn add_agent(&mut self, worker: WorkerSpec) {
        self.add_agent_with(worker, Runtime::Simulated).await;
    }

    /// Starts an agent for `worker` with `runtime` (e.g. real processes) and waits until the
    /// worker is registered.
    pub async fn add_agent_with(&mut self, worker: WorkerSpec, runtime: Runtime) {
        let id = worker.id.clone();
        let gpus = worker.gpus.len();
        let config = AgentConfig {
            nats_url: self.servers.nats_url(),
            nats_access: berth_bus::Access {
                creds: self.auth.as_ref().map(|a| a.creds(&format!("agent-{id}"))),
                tls_ca: self.auth.as_ref().and_then(berth_bus::auth::AuthDir::ca),
                provision: self.auth.is_none(),
                ..berth_bus::Access::default()
            },
            worker,
            heartbeat: Duration::from_millis(300),
            stats: self.agent_stats.clone(),
        };
        let agent = Agent::start_with(config, runtime)
            .await
            .expect("agent start");
        self.agents.push(agent);
        let store = self.store.clone();
        wait_until(
            &format!("worker {id} registered"),
            Duration::from_secs(20),
            || {
                let store = store.clone();
                let id = id.clone();
                async move {
                    let n = store
                        .gpus()
                        .await
                        .ok()?
                        .iter()
                        .filter(|g| g.worker_id == id)
                        .count();
                    (n == gpus).then_some(())
                }
            },
        )
        .await;
    }

    pub async fn start_instance(&self, id: &str, vram: i64, gpus: i64) -> CmdSeq {
        let cmd = Command::Start(StartSpec {
            model: "test-model".into(),
            ..StartSpec::claim(vram, gpus)
        });
        self.bus
            .publish_command(id, &cmd)
            .await
            .expect("publish start")
    }

    pub async fn stop_instance(&self, id: &str) -> CmdSeq {
        let cmd = Command::Stop(StopSpec::default());
        self.bus
            .publish_command(id, &cmd)
            .await
            .expect("publish stop")
    }

    /// Waits until each of `ids` exists and is in the state `expected` gives it.
    pub async fn wait_states(
        &self,
        limit: Duration,
        ids: &[String],
        expected: impl Fn(&str) -> InstanceState,
    ) -> Vec<InstanceRow> {
        let store = self.store.clone();
        let expected = &expected;
        wait_until("instances to settle", limit, || {
            let store = store.clone();
            async move {
                let rows = store.instances().await.ok()?;
                let settled = ids.iter().all(|id| {
                    rows.iter()
                        .any(|r| &r.id == id && r.state == expected(id).as_str())
                });
                settled.then_some(rows)
            }
        })
        .await
    }

    /// Waits until `id` is in `state`; returns its row.
    pub async fn wait_state(&self, id: &str, state: InstanceState, limit: Duration) -> InstanceRow {
        let store = self.store.clone();
        wait_until(&format!("{id} to be {state}"), limit, || {
            let store = store.clone();
            async move {
                let row = store.instance(id).await.ok()??;
                (row.state == state.as_str()).then_some(row)
            }
        })
        .await
    }

    /// Waits until the command with sequence `seq` is the instance's applied one.
    pub async fn wait_applied(&self, id: &str, seq: CmdSeq, limit: Duration) -> InstanceRow {
        let store = self.store.clone();
        wait_until(&format!("{id} to apply command {seq}"), limit, || {
            let store = store.clone();
            async move {
                let row = store.instance(id).await.ok()??;
                (row.cmd_seq == seq).then_some(row)
            }
        })
        .await
    }

    /// Checks the invariants that must hold at every moment: no GPU reserved past its
    /// capacity, reservations equal to the allocations, and no allocation held by an
    /// instance that is stopped, pending, in error or analyzing.
    pub async fn assert_books_balanced(&self) {
        let violations = self.store.gpu_violations().await.expect("gpu check");
        assert!(
            violations.is_empty(),
            "GPU invariants broken: {violations:#?}"
        );
        let instances = self.store.instances().await.expect("instances");
        for a in self.store.allocations().await.expect("allocations") {
            let inst = instances
                .iter()
                .find(|i| i.id == a.instance_id)
                .expect("instance");
            let holds_ok = ["scheduled", "starting", "running", "stopping"].contains(&inst.state.as_str())
                // a replaced placement is held until its agent confirms the stop
                || a.version < inst.version;
            assert!(holds_ok, "{} is {} but holds {a:?}", inst.id, inst.state);
        }
    }
}

/// The model roots of the tests' analyzers and agents: the system's temporary directory
/// (where tests write their model files) and the repository's `.berth/models` (the real GGUF
/// of `ops/fetch-models.sh`), when it exists.
pub fn test_model_roots() -> berth_models::ModelRoots {
    let models = serving::repo().join(".berth/models");
    let roots = std::iter::once(std::env::temp_dir()).chain(models.is_dir().then_some(models));
    berth_models::ModelRoots::new(roots).expect("the tests' model roots")
}

/// Polls `probe` until it returns `Some`, or panics after `limit` with what was awaited.
pub async fn wait_until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A simulated worker with `count` GPUs of `vram_gib` each and the given labels.
pub fn worker(id: &str, count: u32, vram_gib: i64, labels: &[(&str, &str)]) -> WorkerSpec {
    WorkerSpec {
        id: id.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        gpus: (0..count)
            .map(|index| GpuInfo {
                index,
                name: "Simulated H100".into(),
                uuid: format!("GPU-{id}-{index}"),
                total_bytes: vram_gib * GIB,
                system_reserved_bytes: 0,
            })
            .collect(),
        usage: berth_agent::Usage::Fixed(Vec::new()),
    }
}

/// A Llama-3-8B-shaped Hugging Face config (32 layers, 32 heads, 8 KV heads, ~16 GB of bf16
/// weights), as a model directory holds it.
pub fn write_llama_8b_config(dir: &std::path::Path) {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "vocab_size": 128256,
        "torch_dtype": "bfloat16",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config.json");
}
