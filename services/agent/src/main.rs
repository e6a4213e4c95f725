//! berth-agent: runs on a GPU host (or simulates several), registers its GPUs and runs what
//! the analyzers place on it.

use anyhow::{Context, bail};
use berth_agent::{
    Agent, AgentConfig, AgentStats, Inventory, ProcessConfig, Runtime, WorkerSpec,
    backend::Binaries,
    inventory::parse_bytes,
    metrics, nvml,
    supervisor::{PortPool, RestartLimits, ports::parse_range, records},
};
use clap::Parser;
use std::{collections::BTreeMap, path::PathBuf, time::Duration};
use std::{net::SocketAddr, sync::Arc};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(version, about = "berth GPU host agent")]
struct Args {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[command(flatten)]
    nats: berth_bus::NatsArgs,
    /// Simulated inventory (TOML). Without it, GPUs come from NVML.
    #[arg(long, env = "BERTH_INVENTORY")]
    inventory: Option<PathBuf>,
    /// Which worker of the inventory to run; all of them when omitted. With NVML: this
    /// host's worker id (default: the host name).
    #[arg(long, env = "BERTH_WORKER")]
    worker: Option<String>,
    /// Labels for the NVML worker, `key=value`, repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// VRAM per GPU left to the system with NVML (e.g. "1GiB").
    #[arg(long, default_value = "1GiB")]
    system_reserved: String,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_secs: u64,
    /// Accepted for compatibility: an inventory always means simulated GPUs.
    #[arg(long)]
    sim: bool,
    /// Print the workers and GPUs this agent would register (NVML or the inventory) and the
    /// memory in use its first heartbeat would report, as JSON, then exit: a check of the
    /// NVML path on a new host.
    #[arg(long)]
    print_inventory: bool,
    /// Serve Prometheus metrics at http://ADDR/metrics ("off" to disable).
    #[arg(
        long,
        env = "BERTH_AGENT_METRICS_ADDR",
        default_value = "127.0.0.1:9102"
    )]
    metrics_addr: String,
    /// Log as JSON lines.
    #[arg(long, env = "BERTH_LOG_JSON")]
    log_json: bool,
    /// How instances run: `process` starts model servers, `simulated` only reports them
    /// running. Default: simulated with --inventory, process with NVML.
    #[arg(long, env = "BERTH_AGENT_RUNTIME", value_enum)]
    runtime: Option<RuntimeKind>,
    /// llama.cpp's server binary (else `llama-server` on PATH, else the newest build of
    /// ops/build-llama.sh under ~/.cache/berth/llama.cpp/).
    #[arg(long, env = "BERTH_LLAMA_SERVER")]
    llama_server: Option<PathBuf>,
    /// llama.cpp's RPC server, run by the followers of an instance spread over several
    /// workers (else `ggml-rpc-server` on PATH, else the one next to the llama-server found).
    #[arg(long, env = "BERTH_RPC_SERVER")]
    rpc_server: Option<PathBuf>,
    /// vLLM's binary (else `vllm` on PATH).
    #[arg(long, env = "BERTH_VLLM")]
    vllm: Option<PathBuf>,
    /// The Python that has SGLang installed, run as `python -m sglang.launch_server` (else
    /// `python3` on PATH).
    #[arg(long, env = "BERTH_SGLANG_PYTHON")]
    sglang_python: Option<PathBuf>,
    /// Host in the endpoints the agent reports.
    #[arg(long, env = "BERTH_ADVERTISE_HOST", default_value = "127.0.0.1")]
    advertise_host: String,
    /// Address model servers listen on (default: --advertise-host).
    #[arg(long, env = "BERTH_LISTEN_HOST")]
    listen_host: Option<String>,
    /// Ports for model servers, LOW-HIGH.
    #[arg(long, default_value = "40000-40999", value_parser = parse_range)]
    port_range: std::ops::RangeInclusive<u16>,
    /// What runs (instances/) and server logs (logs/). Default: /var/lib/berth-agent when it
    /// can be created, else ./.berth/agent.
    #[arg(long, env = "BERTH_AGENT_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Time a server has to answer its readiness probe.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    startup_timeout: Duration,
    /// Time between health probes of a running server.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    probe_every: Duration,
    /// Failed health probes in a row that count as a crash.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    unhealthy_after: u32,
    /// Time between SIGTERM and SIGKILL when stopping a server.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    stop_grace: Duration,
    /// Restarts of a failing server allowed within --restart-window; then `error`.
    #[arg(long, default_value_t = 5)]
    max_restarts: u32,
    /// The sliding window --max-restarts counts in.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    restart_window: Duration,
    /// Longest wait before a restart (the first is 1 s, doubling).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    restart_backoff_max: Duration,
    /// A model server's log past this size (checked every second) keeps only its last part,
    /// as the previous file (`.log.1`); with the logs of earlier attempts, at most
    /// --logs-kept such files per placement.
    #[arg(long, default_value = "16MiB", value_parser = parse_log_size)]
    log_max_bytes: u64,
    /// Earlier log files kept per placement (earlier attempts, earlier parts).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(0..=100))]
    logs_kept: u64,
    /// On SIGTERM or Ctrl-C, leave the model servers running (with their records in
    /// --state-dir) for the next agent to adopt, e.g. for an upgrade of the agent, instead
    /// of stopping them. An agent always adopts what a previous one left running.
    #[arg(long, env = "BERTH_AGENT_KEEP_SERVERS_ON_EXIT")]
    keep_servers_on_exit: bool,
    /// A directory model servers may be started on files under (repeatable; the environment
    /// variable takes a colon-separated list). Without one, a start naming a model file ends
    /// in `error` instead of running (process runtime).
    #[arg(long = "model-root", env = "BERTH_MODEL_ROOTS", value_delimiter = ':')]
    model_roots: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RuntimeKind {
    Simulated,
    Process,
}

/// A size like "16MiB", at least 4 KiB.
fn parse_log_size(s: &str) -> Result<u64, String> {
    let bytes = parse_bytes(s)?;
    match u64::try_from(bytes) {
        Ok(b) if b >= 4096 => Ok(b),
        _ => Err(format!("{s:?}: a log size is at least 4KiB")),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e}"))
}

/// The runtime the flags ask for.
fn runtime(args: &Args) -> anyhow::Result<Runtime> {
    let kind = args.runtime.unwrap_or(if args.inventory.is_some() {
        RuntimeKind::Simulated
    } else {
        RuntimeKind::Process
    });
    if kind == RuntimeKind::Simulated {
        return Ok(Runtime::Simulated);
    }
    if args.state_dir.is_none() {
        // The system directory when it can be made, else the local one (`state_dir`).
        let _ = std::fs::create_dir_all(SYSTEM_STATE_DIR);
    }
    let mut config = ProcessConfig::new(state_dir(args));
    config.ports = PortPool::new(args.port_range.clone());
    config.advertise_host = args.advertise_host.clone();
    config.listen_host = args
        .listen_host
        .clone()
        .unwrap_or_else(|| args.advertise_host.clone());
    config.binaries = Binaries {
        llama_server: args.llama_server.clone(),
        rpc_server: args.rpc_server.clone(),
        vllm: args.vllm.clone(),
        sglang_python: args.sglang_python.clone(),
    };
    config.startup_timeout = args.startup_timeout;
    config.probe_every = args.probe_every;
    config.unhealthy_after = args.unhealthy_after;
    config.grace = args.stop_grace;
    config.keep_servers_on_exit = args.keep_servers_on_exit;
    config.model_roots =
        berth_models::ModelRoots::new(&args.model_roots).context("checking --model-root")?;
    config.log_max_bytes = args.log_max_bytes;
    config.logs_kept = usize::try_from(args.logs_kept)?;
    config.restarts = RestartLimits {
        max_restarts: args.max_restarts,
        window: args.restart_window,
        backoff: berth_retry::RetryPolicy {
            first_delay: Duration::from_secs(1).min(args.restart_backoff_max),
            max_delay: args.restart_backoff_max,
            give_up_after: None,
        },
    };
    Ok(Runtime::Process(Box::new(config)))
}

const SYSTEM_STATE_DIR: &str = "/var/lib/berth-agent";

/// --state-dir, else the system directory if it exists, else `./.berth/agent`.
fn state_dir(args: &Args) -> PathBuf {
    match &args.state_dir {
        Some(dir) => dir.clone(),
        None if std::path::Path::new(SYSTEM_STATE_DIR).is_dir() => PathBuf::from(SYSTEM_STATE_DIR),
        None => PathBuf::from(".berth/agent"),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    berth_telemetry::init_tracing(args.log_json, "info");
    let workers = workers(&args)?;
    if args.print_inventory {
        let mut doc = Vec::with_capacity(workers.len());
        for w in &workers {
            // What the first heartbeat would report: checks NVML's memory reading too.
            let usage = match &w.usage {
                berth_agent::Usage::Fixed(fixed) => fixed.clone(),
                berth_agent::Usage::Nvml => {
                    // The servers a process agent recorded here are berth's, not outside.
                    let ours = records::own_pids(&state_dir(&args).join("instances"));
                    nvml::UsageReader::open()?.read(&ours)?
                }
            };
            doc.push(serde_json::json!({
                "worker": w.id, "labels": w.labels, "gpus": w.gpus, "usage": usage,
            }));
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let runtime = runtime(&args)?;
    let stats = Arc::new(AgentStats::default());
    let shutdown = CancellationToken::new();
    if args.metrics_addr != "off" {
        let addr: SocketAddr = args.metrics_addr.parse().with_context(|| {
            format!(
                "--metrics-addr {:?} is not host:port or \"off\"",
                args.metrics_addr
            )
        })?;
        metrics::serve(stats.clone(), addr, shutdown.clone())
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let mut agents = Vec::new();
    for worker in workers {
        let config = AgentConfig {
            nats_url: args.nats_url.clone(),
            nats_access: args.nats.access(),
            heartbeat: Duration::from_secs(args.heartbeat_secs),
            worker,
            stats: stats.clone(),
        };
        let id = config.worker.id.clone();
        agents.push(
            Agent::start_with(config, runtime.clone())
                .await
                .with_context(|| format!("starting agent {id}"))?,
        );
        tracing::info!(worker = id, "agent running");
    }
    berth_telemetry::shutdown_signal()
        .await
        .context("waiting for Ctrl-C or SIGTERM")?;
    for a in agents {
        a.shutdown().await;
    }
    shutdown.cancel();
    Ok(())
}

fn workers(args: &Args) -> anyhow::Result<Vec<WorkerSpec>> {
    if let Some(path) = &args.inventory {
        let inv = Inventory::load(path)?;
        return match &args.worker {
            None => Ok(inv.workers),
            Some(id) => match inv.workers.into_iter().find(|w| &w.id == id) {
                Some(w) => Ok(vec![w]),
                None => bail!("worker {id:?} is not in {}", path.display()),
            },
        };
    }
    let reserved = parse_bytes(&args.system_reserved).map_err(anyhow::Error::msg)?;
    let id = match &args.worker {
        Some(id) => id.clone(),
        None => hostname()?,
    };
    berth_proto::subjects::validate_id(&id).with_context(|| format!("worker id {id:?}"))?;
    Ok(vec![WorkerSpec {
        id,
        labels: args.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
        gpus: nvml::gpus(reserved)?,
        usage: berth_agent::Usage::Nvml,
    }])
}

fn hostname() -> anyhow::Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(name.trim().replace(['.', ' '], "-"))
}
