//! `berth up`: a whole fleet on one machine, for trying berth and for development.

use anyhow::{Context, Result};
use berth_agent::{Agent, AgentConfig, Inventory};
use berth_analyzer::{Analyzer, AnalyzerConfig, Hooks};
use berth_harness::{Durability, NatsServer, PgServer, workspace_root};
use clap::Args;
use std::{path::PathBuf, time::Duration};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the servers keep their data (kept across runs).
    #[arg(long, default_value = ".berth")]
    dir: PathBuf,
    /// NATS client port on 127.0.0.1.
    #[arg(long, default_value_t = 4222)]
    nats_port: u16,
    /// PostgreSQL port on 127.0.0.1.
    #[arg(long, default_value_t = 5433)]
    pg_port: u16,
    /// Simulated GPU inventory (default: ops/inventory/demo.toml).
    #[arg(long)]
    inventory: Option<PathBuf>,
    /// Analyzers to run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    analyzers: u32,
}

pub async fn run(args: UpArgs) -> Result<()> {
    let inventory_path = match args.inventory {
        Some(p) => p,
        None => workspace_root()
            .context("cannot find ops/inventory/demo.toml; pass --inventory")?
            .join("ops/inventory/demo.toml"),
    };
    // Read the inventory first: a bad file should fail before anything starts.
    let inventory = Inventory::load(&inventory_path)?;
    let dir = std::path::absolute(&args.dir)?.join("run");
    let (nats_dir, pg_dir) = (dir.join("nats"), dir.join("pg"));
    let (nats_port, pg_port) = (args.nats_port, args.pg_port);
    let nats = tokio::task::spawn_blocking(move || NatsServer::start_on(&nats_dir, nats_port))
        .await?
        .with_context(|| format!("starting NATS on port {nats_port}"))?;
    let pg =
        tokio::task::spawn_blocking(move || PgServer::start_on(&pg_dir, pg_port, Durability::Safe))
            .await?
            .with_context(|| format!("starting PostgreSQL on port {pg_port}"))?;
    tracing::info!(nats = %nats.url(), postgres = %pg.url(), "servers started under {}", dir.display());

    let applied = berth_store::migrate(&pg.url()).await?;
    tracing::info!(applied, "migrations done");
    let mut analyzers = Vec::new();
    for i in 0..args.analyzers {
        let mut config = AnalyzerConfig::new(nats.url(), pg.url());
        config.name = format!("analyzer-{i}");
        analyzers.push(Analyzer::start(config, Hooks::default()).await?);
    }
    let mut agents = Vec::new();
    let agent_stats = std::sync::Arc::new(berth_agent::AgentStats::default());
    for worker in inventory.workers {
        let id = worker.id.clone();
        let config = AgentConfig {
            nats_url: nats.url(),
            worker,
            heartbeat: Duration::from_secs(5),
            stats: agent_stats.clone(),
        };
        agents.push(
            Agent::start(config)
                .await
                .with_context(|| format!("agent {id}"))?,
        );
    }
    println!(
        "berth is up: NATS {} · PostgreSQL {} · {} analyzers · {} simulated workers from {}",
        nats.url(),
        pg.url(),
        analyzers.len(),
        agents.len(),
        inventory_path.display()
    );
    println!("try: berth start demo --vram 20GiB --wait   (Ctrl-C stops everything)");

    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    println!("stopping…");
    for a in agents {
        a.shutdown().await;
    }
    for a in analyzers {
        a.shutdown().await;
    }
    drop(nats);
    drop(pg);
    println!("stopped");
    Ok(())
}
