//! `berth bench gateway`: what the gateway costs in front of a model server.
//!
//! A real fleet on private servers: an analyzer, a process agent that runs `berth-bench
//! fake-backend` (a tiny OpenAI-compatible server answering at once, or after
//! `--backend-delay` as a model server whose GPU does the work) through the custom backend,
//! and a gateway with an API key. At each concurrency, closed-loop clients send chat
//! completions for a fixed time straight to the backend, then through a `berth-gateway`
//! process: requests per second, latency percentiles, what the gateway adds, and the CPU time
//! each party (clients, gateway, backend) spends per request. Then, for a few fresh
//! instances, the time from the `running` event to the first request the gateway routes.
//!
//! Each run is made with the CPUs `shared` (clients, gateway and backend compete for every
//! core, as when the gateway runs on the model's own host) and `split` (the gateway on the
//! last CPU, the clients and the backend on the others, as when it runs on a host of its
//! own): on a machine with few cores, the first mostly measures how the parties share the
//! CPUs, the second what the gateway itself can carry.

use crate::stats::{ms, summary};
use anyhow::{Context, Result, bail};
use berth_agent::{Agent, AgentConfig, ProcessConfig, Runtime, WorkerSpec, supervisor::PortPool};
use berth_analyzer::{Analyzer, AnalyzerConfig, Hooks};
use berth_bus::Bus;
use berth_gateway::{Gateway, GatewayConfig};
use berth_proto::{Command, InstanceEvent, InstanceState, StartSpec, subjects};
use berth_store::keys::{NewKey, Scope};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Clients sending at once, one run each.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    concurrency: Vec<usize>,
    /// How long each run lasts.
    #[arg(long, default_value = "3s", value_parser = berth_telemetry::args::duration)]
    duration: Duration,
    /// How the CPUs are shared in the load runs: `shared`, `split`, or both (in that order).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "shared,split"
    )]
    cpus: Vec<Cpus>,
    /// How long the fake backend takes to answer each request, without using the CPU (as a
    /// model server does while its GPU works); without it, the backend answers at once.
    #[arg(long, value_parser = berth_telemetry::args::duration)]
    backend_delay: Option<Duration>,
    /// Fresh instances whose running event → first routed request is timed.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
    route_trials: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Cpus {
    /// Every party on every CPU.
    Shared,
    /// The gateway on a CPU of its own.
    Split,
}

const BODY: &str =
    r#"{"model":"bench","messages":[{"role":"user","content":"Say hi"}],"max_tokens":8}"#;
const GIB: i64 = 1 << 30;

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub async fn run(args: GatewayArgs) -> Result<Value> {
    if args.concurrency.iter().any(|&c| c == 0 || c > 4096) {
        bail!("--concurrency values must be 1..=4096");
    }
    let servers = tokio::task::spawn_blocking(berth_harness::TestServers::start)
        .await?
        .context("starting NATS and PostgreSQL (run ops/setup.sh first)")?;
    let (nats, pg) = (servers.nats.url(), servers.pg.url());
    berth_store::migrate(&pg).await?;
    let store = berth_store::Store::connect(&pg, 2)?;
    let bus = Bus::connect(&nats, "bench-gateway").await?;
    let _analyzer = Analyzer::start(
        AnalyzerConfig::new(nats.clone(), pg.clone()),
        Hooks::default(),
    )
    .await?;
    let state = tempfile::tempdir()?;
    let mut process = ProcessConfig::new(state.path().to_path_buf());
    process.ports = PortPool::new(45000..=45999);
    process.startup_probe_every = Duration::from_millis(20);
    let _agent = Agent::start_with(
        AgentConfig {
            nats_url: nats.clone(),
            nats_access: Default::default(),
            worker: WorkerSpec {
                id: "w1".into(),
                labels: Default::default(),
                gpus: (0..8)
                    .map(|index| berth_proto::GpuInfo {
                        index,
                        name: "Simulated H100".into(),
                        uuid: format!("GPU-bench-{index}"),
                        total_bytes: 80 * GIB,
                        system_reserved_bytes: 0,
                    })
                    .collect(),
                usage: berth_agent::Usage::Fixed(Vec::new()),
            },
            heartbeat: Duration::from_secs(1),
            stats: Arc::default(),
        },
        Runtime::Process(Box::new(process)),
    )
    .await?;
    let key = NewKey::generate();
    store.create_key("bench", Scope::Inference, &key).await?;
    let mut config = GatewayConfig::new(nats.clone(), pg.clone());
    config.listen = ([127, 0, 0, 1], 0).into();
    let gateway = Gateway::start(config).await?;
    let client = client();

    // One instance for the load runs.
    let mut events = bus.client().subscribe(subjects::ALL_EVENTS).await?;
    let endpoint = start_and_wait(&bus, &mut events, "load", args.backend_delay)
        .await?
        .1;
    let direct = format!("http://{endpoint}/v1/chat/completions");
    let routed = format!("http://{}/v1/chat/completions", gateway.addr);
    // The gateway may learn of the instance a moment after the event: wait for a route.
    let deadline = Instant::now() + Duration::from_secs(30);
    while send(&client, &routed, Some(&key.secret)).await != Some(200) {
        if Instant::now() > deadline {
            bail!("the gateway never routed to the instance");
        }
    }

    let backend = crate::cpus::descendant_with_arg("fake-backend")?
        .context("the fake backend's process is not below this one")?;
    let mut runs = Vec::new();
    for &mode in &args.cpus {
        runs.extend(
            load_runs(
                mode,
                &args,
                &client,
                &direct,
                &nats,
                &pg,
                &key.secret,
                backend,
            )
            .await?,
        );
    }

    // Running event → first routed request, on fresh instances of a model of their own.
    let mut to_route = Vec::new();
    for i in 0..args.route_trials {
        let id = format!("route-{i}");
        let (at_event, _) = start_and_wait(&bus, &mut events, &id, None).await?;
        let body = BODY.replace("\"bench\"", &format!("\"{id}\""));
        let deadline = at_event + Duration::from_secs(30);
        loop {
            let status = post(&client, &routed, Some(&key.secret), body.clone()).await;
            if status == Some(200) {
                to_route.push(ms(at_event.elapsed()));
                break;
            }
            if Instant::now() > deadline {
                bail!("{id} was never routed");
            }
        }
    }
    gateway.stop().await;
    Ok(json!({
        "scenario": "gateway",
        "duration_s": args.duration.as_secs_f64(),
        "backend": "berth-bench fake-backend",
        "backend_delay_ms": args.backend_delay.map(ms),
        "runs": runs,
        "running_event_to_first_routed_ms": summary(&mut to_route),
    }))
}

/// One run's figures, direct and through the gateway side by side.
fn compared(cpus: Cpus, clients: usize, straight: &Load, through: &Load) -> Value {
    let cpus = match cpus {
        Cpus::Shared => "shared",
        Cpus::Split => "split",
    };
    let added = |p: &str| {
        let a = through.latency[p].as_f64().unwrap_or(0.0);
        let b = straight.latency[p].as_f64().unwrap_or(0.0);
        ((a - b) * 1000.0).round() / 1000.0
    };
    json!({
        "cpus": cpus,
        "concurrency": clients,
        "direct": straight.doc(),
        "gateway": through.doc(),
        "added_ms": { "p50": added("p50"), "p99": added("p99") },
        "throughput_ratio": ((through.rate / straight.rate.max(f64::MIN_POSITIVE)) * 1000.0).round() / 1000.0,
    })
}

/// The load runs of one CPU arrangement, each with the gateway as a process of its own (the
/// `berth-gateway` binary next to this one): on every CPU (`shared`), or on the last CPU with
/// this process (clients, analyzer, agent) and the backend it started on the others
/// (`split`). Every thread goes back to all CPUs afterwards.
#[allow(clippy::too_many_arguments)]
async fn load_runs(
    mode: Cpus,
    args: &GatewayArgs,
    client: &Client,
    direct: &str,
    nats: &str,
    pg: &str,
    key: &str,
    backend: u32,
) -> Result<Vec<Value>> {
    let all = crate::cpus::usable()?;
    let gateway_cpus = match mode {
        Cpus::Shared => all.clone(),
        Cpus::Split => match all.split_last().filter(|(_, rest)| !rest.is_empty()) {
            Some((&last, rest)) => {
                crate::cpus::pin_process(rest)?;
                vec![last]
            }
            None => {
                tracing::warn!("one CPU only: no split runs");
                return Ok(Vec::new());
            }
        },
    };
    let runs = async {
        let program = std::env::current_exe()?.with_file_name("berth-gateway");
        if !program.is_file() {
            bail!(
                "{} not found: the load runs start the gateway binary (cargo build --bins)",
                program.display()
            );
        }
        let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let argv: Vec<String> = [
            "--nats-url",
            nats,
            "--database-url",
            pg,
            "--listen",
            &listen.to_string(),
            "--name",
            "bench-load",
            "--metrics-addr",
            "off",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let gateway = crate::cpus::spawn_on(&gateway_cpus, &program, &argv)?;
        let routed = format!("http://{listen}/v1/chat/completions");
        let deadline = Instant::now() + Duration::from_secs(30);
        while send(client, &routed, Some(key)).await != Some(200) {
            if Instant::now() > deadline {
                bail!("the gateway process never routed to the instance");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let parties = Parties {
            gateway: gateway.pid(),
            backend,
        };
        let mut runs = Vec::new();
        for &c in &args.concurrency {
            let straight = load(client, direct, None, c, args.duration, &parties).await;
            let through = load(client, &routed, Some(key), c, args.duration, &parties).await;
            runs.push(compared(mode, c, &straight, &through));
        }
        Ok(runs)
    }
    .await;
    if mode == Cpus::Split {
        crate::cpus::pin_process(&all)?;
    }
    runs
}

fn client() -> Client {
    let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
    http.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(http)
}

/// Starts `id` on the fake backend and waits for its `running` event: when it came, and the
/// endpoint.
async fn start_and_wait(
    bus: &Bus,
    events: &mut async_nats::Subscriber,
    id: &str,
    delay: Option<Duration>,
) -> Result<(Instant, String)> {
    let server = std::env::current_exe()?;
    let mut argv = vec![
        server.display().to_string(),
        "fake-backend".into(),
        "--host".into(),
        "{host}".into(),
        "--port".into(),
        "{port}".into(),
    ];
    if let Some(d) = delay {
        argv.extend(["--delay".into(), format!("{}us", d.as_micros())]);
    }
    let model = if id == "load" { "bench" } else { id };
    let spec = StartSpec {
        model: model.into(),
        backend: Some(Box::new(berth_options::EstimateOptions::Custom(
            berth_options::CustomClaim {
                bytes_per_gpu: GIB.unsigned_abs(),
                argv,
                ..Default::default()
            },
        ))),
        ..StartSpec::claim(GIB, 1)
    };
    bus.publish_command(id, &Command::Start(spec)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let msg = tokio::time::timeout_at(deadline, events.next())
            .await
            .with_context(|| format!("{id} did not run within 60 s"))?
            .context("event subscription ended")?;
        let Ok(ev) = berth_proto::decode::<InstanceEvent>(&msg.payload) else {
            continue;
        };
        if ev.instance_id != id {
            continue;
        }
        match ev.state {
            InstanceState::Running => {
                return Ok((
                    Instant::now(),
                    ev.endpoint.context("running without an endpoint")?,
                ));
            }
            InstanceState::Error => bail!("{id}: {}", ev.reason.unwrap_or_default()),
            _ => {}
        }
    }
}

async fn send(client: &Client, url: &str, key: Option<&str>) -> Option<u16> {
    post(client, url, key, BODY.to_owned()).await
}

async fn post(client: &Client, url: &str, key: Option<&str>, body: String) -> Option<u16> {
    let mut req = hyper::Request::post(url).header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let req = req.body(Full::new(Bytes::from(body))).ok()?;
    let resp = client.request(req).await.ok()?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.ok()?;
    Some(status)
}

struct Load {
    rate: f64,
    errors: u64,
    latency: Value,
    /// CPU time each party spent per request answered, in microseconds.
    cpu_us: Value,
}

impl Load {
    fn doc(&self) -> Value {
        json!({
            "requests_per_s": (self.rate * 10.0).round() / 10.0,
            "errors": self.errors,
            "latency_ms": self.latency,
            "cpu_us_per_request": self.cpu_us,
        })
    }
}

/// The processes whose CPU time a load run reads, besides this one (the clients).
struct Parties {
    gateway: u32,
    backend: u32,
}

impl Parties {
    /// CPU seconds so far: clients, gateway, backend.
    fn cpu(&self) -> [f64; 3] {
        let of = |pid: u32| crate::stats::cpu_seconds(&[pid], false).unwrap_or(f64::NAN);
        [of(std::process::id()), of(self.gateway), of(self.backend)]
    }
}

/// `clients` closed loops posting to `url` for `duration`.
async fn load(
    client: &Client,
    url: &str,
    key: Option<&str>,
    clients: usize,
    duration: Duration,
    parties: &Parties,
) -> Load {
    let cpu_before = parties.cpu();
    let start = Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (client, url, key) = (client.clone(), url.to_owned(), key.map(str::to_owned));
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < end {
                let t = Instant::now();
                match send(&client, &url, key.as_deref()).await {
                    Some(200) => samples.push(ms(t.elapsed())),
                    _ => errors += 1,
                }
            }
            (samples, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((s, e)) = t.await {
            all.extend(s);
            errors += e;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_after = parties.cpu();
    let answered = all.len().max(1) as f64;
    let per_request = |i: usize| ((cpu_after[i] - cpu_before[i]) * 1e6 / answered).round();
    Load {
        rate: all.len() as f64 / elapsed,
        errors,
        latency: summary(&mut all),
        cpu_us: json!({
            "clients": per_request(0),
            "gateway": per_request(1),
            "backend": per_request(2),
        }),
    }
}

/// `berth-bench fake-backend`: an OpenAI-compatible server that answers at once, for the
/// gateway benchmark (run by the agent like any model server).
#[derive(Debug, clap::Args)]
pub struct FakeBackendArgs {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long)]
    port: u16,
    /// Time taken before each answer, sleeping.
    #[arg(long, value_parser = berth_telemetry::args::duration)]
    delay: Option<Duration>,
}

pub async fn fake_backend(args: FakeBackendArgs) -> Result<()> {
    use axum::{
        Router,
        routing::{get, post},
    };
    const REPLY: &str = r#"{"id":"chatcmpl-bench","object":"chat.completion","created":0,"model":"bench","choices":[{"index":0,"finish_reason":"stop","message":{"role":"assistant","content":"Hi!"}}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
    let delay = args.delay;
    let app = Router::new()
        .route("/health", get(|| async { r#"{"status":"ok"}"# }))
        .route(
            "/v1/chat/completions",
            post(move |_body: Bytes| async move {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                ([("content-type", "application/json")], REPLY)
            }),
        );
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port)).await?;
    axum::serve(listener, app).await?;
    Ok(())
}
