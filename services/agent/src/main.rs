//! berth-agent: runs on a GPU host (or simulates several), registers its GPUs and runs what
//! the analyzers place on it.

use anyhow::{Context, bail};
use berth_agent::{
    Agent, AgentConfig, AgentStats, Inventory, WorkerSpec, inventory::parse_bytes, metrics, nvml,
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
                berth_agent::Usage::Nvml => nvml::UsageReader::open()?.read()?,
            };
            doc.push(serde_json::json!({
                "worker": w.id, "labels": w.labels, "gpus": w.gpus, "usage": usage,
            }));
        }
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
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
            heartbeat: Duration::from_secs(args.heartbeat_secs),
            worker,
            stats: stats.clone(),
        };
        let id = config.worker.id.clone();
        agents.push(
            Agent::start(config)
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
