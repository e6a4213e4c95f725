//! `berth ready`: whether the fleet can place and run what it is asked: enough analyzers
//! alive (heard on `berth.analyzers.alive`) and enough workers registered and schedulable
//! (PostgreSQL). For scripts: exit 0 once ready, 1 when the deadline passes first.

use anyhow::{Context, Result, bail};
use berth_proto::subjects::ANALYZERS_ALIVE;
use berth_store::Store;
use clap::Args;
use futures::StreamExt;
use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

#[derive(Debug, Args)]
pub struct ReadyArgs {
    /// Analyzers that must be alive.
    #[arg(long, default_value_t = 1)]
    analyzers: usize,
    /// Schedulable workers that must be registered.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Seconds to wait for both before giving up.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Analyzers beat every 500 ms; a window of three beats hears every live one.
const LISTEN: Duration = Duration::from_millis(1500);

pub async fn run(database_url: &str, nats_url: &crate::Nats, args: ReadyArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let bus = tokio::time::timeout(
        Duration::from_secs(args.timeout),
        nats_url.connect("berth-ready"),
    )
    .await
    .with_context(|| {
        format!(
            "no NATS server answered at {nats_url} within {}s",
            args.timeout
        )
    })??;
    let store = Store::connect(database_url, 1)?;
    let mut beats = bus.client().subscribe(ANALYZERS_ALIVE).await?;
    let mut analyzers = BTreeSet::new();
    let workers = loop {
        let listen_until = (Instant::now() + LISTEN).min(deadline);
        while let Ok(Some(beat)) = tokio::time::timeout_at(listen_until.into(), beats.next()).await
        {
            if let Ok(id) = std::str::from_utf8(&beat.payload) {
                analyzers.insert(id.to_owned());
            }
            if analyzers.len() >= args.analyzers {
                break;
            }
        }
        let workers = match store.capacity().await {
            Ok(rows) => rows
                .iter()
                .filter(|(w, gpus)| w.schedulable && !gpus.is_empty())
                .count(),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(%e, "PostgreSQL not ready");
                0
            }
            Err(e) => {
                return Err(e).context(format!(
                    "reading workers from {}",
                    berth_store::connect::redacted(database_url)
                ));
            }
        };
        if analyzers.len() >= args.analyzers && workers >= args.workers {
            break workers;
        }
        if Instant::now() >= deadline {
            bail!(
                "not ready after {}s: {} of {} analyzers alive, {} of {} workers registered and schedulable",
                args.timeout,
                analyzers.len(),
                args.analyzers,
                workers,
                args.workers
            );
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"ready": true, "analyzers": analyzers.len(), "workers": workers})
        );
    } else {
        println!(
            "ready: {} analyzers alive, {workers} workers registered and schedulable",
            analyzers.len()
        );
    }
    Ok(())
}
