//! `berth bench storm`: the reported failure at scale. Instances are batch-started and
//! batch-stopped twice, then a few are started again. Fits are made slow on purpose (a delay
//! before each commit, abandoned on cancellation) so that stops meet fits in flight.

use super::{
    cluster::{self, GIB},
    stats::{ms, summary},
};
use anyhow::{Result, bail};
use berth_analyzer::{Analyzer, AnalyzerConfig, Hooks};
use berth_bus::Bus;
use berth_harness::TestServers;
use berth_proto::{CmdSeq, Command, InstanceState, StartSpec, StopSpec};
use berth_store::Store;
use clap::Args;
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    /// Instances in each batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    instances: u32,
    /// Instances started again at the end.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    survivors: u32,
    /// Analyzers.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=16))]
    analyzers: u32,
    /// Extra time each fit takes before its commit (a large cluster, a slow estimate), so
    /// that stops find fits in flight.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    fit_delay_ms: u64,
    /// Simulated workers (8 GPUs of 80 GiB each).
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    workers: u32,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
}

/// Each published command: its sequence, whether it is a stop, when it was sent and when
/// JetStream acknowledged it.
type Published = HashMap<String, Vec<Sent>>;

#[derive(Debug, Clone, Copy)]
struct Sent {
    seq: CmdSeq,
    is_stop: bool,
    sent: SystemTime,
    acked: SystemTime,
}

pub async fn run(args: StormArgs) -> Result<Value> {
    if args.survivors > args.instances {
        bail!(
            "--survivors {} is more than --instances {}",
            args.survivors,
            args.instances
        );
    }
    let servers = tokio::task::spawn_blocking(TestServers::start).await??;
    let db = servers.pg.url();
    berth_store::migrate(&db).await?;
    let store = Store::connect(&db, 8)?;
    cluster::register(&store, args.workers as usize, 8, 0.0).await?;
    let bus = Bus::connect(&servers.nats.url(), "storm").await?;
    let shutdown = CancellationToken::new();
    let agent = cluster::bulk_agent(bus.clone(), shutdown.clone()).await?;

    let delay = Duration::from_millis(args.fit_delay_ms);
    let hooks = Hooks {
        before_commit: Some(Arc::new(move |_, _| Box::pin(tokio::time::sleep(delay)))),
        ..Default::default()
    };
    let mut analyzers = Vec::new();
    for i in 0..args.analyzers {
        let mut c = AnalyzerConfig::new(servers.nats.url(), db.clone());
        c.name = format!("storm-{i}");
        c.concurrency = 256;
        c.unreachable_after = Duration::from_secs(24 * 3600);
        c.gone_after = Duration::from_secs(48 * 3600);
        analyzers.push(Analyzer::start(c, hooks.clone()).await?);
    }

    let ids: Vec<String> = (0..args.instances).map(|i| format!("s{i:06}")).collect();
    let start = Command::Start(StartSpec::claim(8 * GIB, 1));
    let stop = Command::Stop(StopSpec::default());
    let mut published = Published::new();
    let began = Instant::now();
    let fits = |stats: &[Arc<berth_analyzer::Stats>]| {
        stats.iter().map(|s| s.fits_computed.get()).sum::<u64>()
    };
    let stats: Vec<_> = analyzers.iter().map(|a| a.stats.clone()).collect();
    for round in 0..2 {
        let before = fits(&stats);
        batch(&bus, &ids, &start, false, &mut published).await?;
        // Stop while fits are in flight, as a person would a moment after starting.
        let wanted = u64::from(args.instances / 10).clamp(1, 100);
        let wait_until = Instant::now() + Duration::from_secs(5);
        while fits(&stats) < before + wanted && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        batch(&bus, &ids, &stop, true, &mut published).await?;
        tracing::info!(round, "batch start + stop published");
    }
    let survivors = &ids[..args.survivors as usize];
    let survivors_published = Instant::now();
    batch(&bus, survivors, &start, false, &mut published).await?;

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let survivors_running = loop {
        let rows = store.instances().await?;
        let settled = rows.len() == ids.len()
            && rows.iter().all(|r| {
                let want = if survivors.contains(&r.id) {
                    InstanceState::Running
                } else {
                    InstanceState::Stopped
                };
                r.state == want.as_str()
            });
        if settled {
            break survivors_published.elapsed();
        }
        if Instant::now() > deadline {
            bail!("not settled after {}s", args.timeout);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let total = began.elapsed();

    // A fit for a command that a newer, already stored command had superseded at pickup.
    let wasted = stats
        .iter()
        .flat_map(|s| s.fit_log())
        .filter(|fit| {
            published[&fit.instance_id]
                .iter()
                .any(|p| p.seq > fit.cmd_seq && p.acked < fit.picked_at)
        })
        .count();
    // From each stop's publish (and from its acknowledgement by JetStream) to the abandonment
    // of the fit it cancelled: the newest stop sent before the abandonment. The watch hears
    // a command as it is published, so a fit can be abandoned before the publisher has the
    // stream's acknowledgement: those count 0 ms after the ack.
    let cancels: Vec<(SystemTime, Sent)> = stats
        .iter()
        .flat_map(|s| s.cancel_log())
        .filter_map(|(id, at)| {
            let stop = published[&id]
                .iter()
                .filter(|p| p.is_stop && p.sent <= at)
                .max_by_key(|p| p.seq)?;
            Some((at, *stop))
        })
        .collect();
    let mut cancel_ms: Vec<f64> = cancels
        .iter()
        .filter_map(|(at, stop)| Some(ms(at.duration_since(stop.sent).ok()?)))
        .collect();
    let mut cancel_after_ack_ms: Vec<f64> = cancels
        .iter()
        .map(|(at, stop)| ms(at.duration_since(stop.acked).unwrap_or_default()))
        .collect();
    let before_ack = cancels.iter().filter(|(at, stop)| *at < stop.acked).count();
    let sum = |f: &dyn Fn(&berth_analyzer::Stats) -> u64| stats.iter().map(|s| f(s)).sum::<u64>();
    let doc = json!({
        "scenario": "storm",
        "instances": args.instances,
        "survivors": args.survivors,
        "analyzers": args.analyzers,
        "fit_delay_ms": args.fit_delay_ms,
        "commands": 4 * args.instances + args.survivors,
        "fits_for_commands_superseded_before_pickup": wasted,
        "fits_computed": sum(&|s| s.fits_computed.get()),
        "fits_skipped_superseded": sum(&|s| s.fits_skipped_superseded.get()),
        "fits_cancelled_in_flight": sum(&|s| s.fits_cancelled.get()),
        "commands_stale": sum(&|s| s.commands_stale.get()),
        "cas_conflicts": sum(&|s| s.cas_conflicts.get()),
        "placements_committed": sum(&|s| s.placements_committed.get()),
        "survivors_running_after_s": (survivors_running.as_secs_f64() * 1000.0).round() / 1000.0,
        "total_s": (total.as_secs_f64() * 1000.0).round() / 1000.0,
        "stop_to_abandon_ms": summary(&mut cancel_ms),
        "stop_stored_to_abandon_ms": summary(&mut cancel_after_ack_ms),
        "abandoned_before_the_stop_was_acknowledged": before_ack,
    });
    shutdown.cancel();
    for a in analyzers {
        a.shutdown().await;
    }
    let _ = agent.await;
    drop(servers);
    Ok(doc)
}

async fn batch(
    bus: &Bus,
    ids: &[String],
    cmd: &Command,
    is_stop: bool,
    published: &mut Published,
) -> Result<()> {
    let acks = stream::iter(ids)
        .map(|id| async move {
            let sent = SystemTime::now();
            let seq = bus.publish_command(id, cmd).await?;
            let acked = SystemTime::now();
            anyhow::Ok((
                id.clone(),
                Sent {
                    seq,
                    is_stop,
                    sent,
                    acked,
                },
            ))
        })
        .buffer_unordered(256)
        .collect::<Vec<_>>()
        .await;
    for ack in acks {
        let (id, sent) = ack?;
        published.entry(id).or_default().push(sent);
    }
    Ok(())
}
