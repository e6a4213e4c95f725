//! `berth bench place`.

use super::{
    cluster::{self, GIB},
    procs,
    servers::Servers,
    stats::{cpu_seconds, micros_to_ms, ms, peak_rss_mib, summary, unix_ms_now},
};
use anyhow::{Context, Result, bail};
use berth_analyzer::{Analyzer, AnalyzerConfig, Hooks};
use berth_bus::Bus;
use berth_proto::{CmdSeq, Command, InstanceEvent, InstanceState, StartSpec, Version};
use berth_store::{Store, placement::CommitOutcome};
use clap::Args;
use futures::{StreamExt, stream};
use serde_json::{Value, json};
use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Args)]
pub struct PlaceArgs {
    /// Simulated workers.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    workers: u32,
    /// GPUs per worker (80 GiB each).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    gpus_per_worker: u32,
    /// Start commands to publish.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    instances: u32,
    /// Analyzer counts to run, one fresh run each: "1,2,4".
    #[arg(long, default_value = "2", value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=16))]
    analyzers: Vec<u32>,
    /// NATS servers, one fresh run each (with every analyzer count): 1, or a JetStream
    /// cluster of 3 whose streams are kept on every node; "1,3" runs both, side by side.
    #[arg(long, default_value = "1", value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..=3))]
    nats_cluster: Vec<u16>,
    /// Placement policy.
    #[arg(long, default_value = "spread", value_parser = ["spread", "binpack"])]
    policy: String,
    /// Give every other instance a zone selector.
    #[arg(long)]
    selectors: bool,
    /// Fraction of each GPU already taken (0 to 0.99); instance sizes shrink with the room
    /// left so that the run ends with the cluster full: at 0.95, a nearly full cluster where
    /// capacity conflicts are common.
    #[arg(long, default_value_t = 0.0, value_parser = parse_fill)]
    fill: f64,
    /// Publish at this many commands per second instead of as fast as possible.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate: Option<u32>,
    /// Commands each analyzer handles at once.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Database connections per analyzer.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pool: u32,
    /// Run the analyzers as separate `berth-analyzer` processes (built next to `berth`) and
    /// report each one's peak memory.
    #[arg(long)]
    processes: bool,
    /// Give up waiting for the instances to settle after this many seconds.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
    /// Also write every command's latencies to this CSV file (with several analyzer counts,
    /// the last run's): `publish_unix_ms,publish_to_commit_ms,publish_to_event_ms`, in
    /// publish order, to see when in a run the slow ones happened.
    #[arg(long)]
    latency_log: Option<std::path::PathBuf>,
}

fn parse_fill(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if !(0.0..=0.99).contains(&f) {
        return Err(format!("{f} is not between 0 and 0.99"));
    }
    Ok(f)
}

/// Sizes: 1, 2, 4 or 8 GPUs (half, 30 %, 15 %, 5 %), 8 to 40 GiB each.
/// With `fill` > 0 sizes shrink with the room left on each GPU, and grow by 40 %, so the
/// demand slightly exceeds what is left: the run ends with a full cluster.
fn spec(i: u32, selectors: bool, fill: f64) -> StartSpec {
    let gpus = match i % 20 {
        0..=9 => 1,
        10..=15 => 2,
        16..=18 => 4,
        _ => 8,
    };
    let base = [8, 16, 24, 40][(i / 20 % 4) as usize] * GIB;
    let vram = if fill > 0.0 {
        ((base as f64) * (1.0 - fill) * 1.4) as i64
    } else {
        base
    };
    let selector = if selectors && i.is_multiple_of(2) {
        BTreeMap::from([("zone".to_owned(), format!("z{}", i / 2 % 4))])
    } else {
        BTreeMap::new()
    };
    StartSpec {
        model: "bench".into(),
        selector,
        ..StartSpec::claim(vram, gpus)
    }
}

pub async fn run(args: PlaceArgs) -> Result<Value> {
    let mut runs = Vec::new();
    for nodes in args.nats_cluster.clone() {
        for k in args.analyzers.clone() {
            runs.push(
                run_one(&args, k, nodes)
                    .await
                    .with_context(|| format!("run with {k} analyzers, {nodes} NATS servers"))?,
            );
        }
    }
    Ok(json!({
        "scenario": "place",
        "workers": args.workers,
        "gpus": args.workers * args.gpus_per_worker,
        "instances": args.instances,
        "policy": args.policy,
        "selectors": args.selectors,
        "fill": args.fill,
        "rate": args.rate,
        "concurrency_per_analyzer": args.concurrency,
        "pool_per_analyzer": args.pool,
        "nats_servers": args.nats_cluster,
        "runs": runs,
    }))
}

/// Per decided command, in publish order: when it was published (Unix ms), publish to
/// commit and publish to event (ms). The commit time is the one its transaction wrote into
/// the event (whole milliseconds, so each figure is up to 1 ms short); the event time is when
/// the subscriber had it, which adds the event relay's delay.
fn latencies(
    decided: &HashMap<String, Decided>,
    published: &HashMap<String, Published>,
) -> Vec<(f64, f64, f64)> {
    let mut lines: Vec<(f64, f64, f64)> = decided
        .iter()
        .filter_map(|(id, d)| {
            let p = published.get(id)?;
            Some((
                p.unix_ms,
                (d.committed_unix_ms as f64 - p.unix_ms).max(0.0),
                ms(d.seen.duration_since(p.at)),
            ))
        })
        .collect();
    lines.sort_by(|a, b| a.0.total_cmp(&b.0));
    lines
}

/// `--latency-log`: a CSV line per decided command.
fn write_latency_log(
    (path, out): &mut (std::path::PathBuf, std::io::BufWriter<std::fs::File>),
    lines: &[(f64, f64, f64)],
) -> Result<()> {
    use std::io::Write;
    let written = (|| {
        writeln!(
            out,
            "publish_unix_ms,publish_to_commit_ms,publish_to_event_ms"
        )?;
        for (at, commit, event) in lines {
            writeln!(out, "{at:.3},{commit:.3},{event:.3}")?;
        }
        out.flush()
    })();
    written.with_context(|| format!("cannot write the latency log {}", path.display()))
}

/// What the event subscriber saw per instance.
#[derive(Default)]
struct Seen {
    /// The deciding event (`scheduled`, `pending` or `error`): when it reached the
    /// subscriber, and when its transaction committed (the event's `at_ms`).
    decided: HashMap<String, Decided>,
    running: usize,
}

struct Decided {
    state: InstanceState,
    seen: Instant,
    committed_unix_ms: i64,
}

/// When a command was published, on both clocks: `Instant` to compare with when its event
/// was seen, wall time to compare with the commit time the database wrote into the event.
struct Published {
    at: Instant,
    unix_ms: f64,
}

async fn run_one(args: &PlaceArgs, k: u32, nats_nodes: u16) -> Result<Value> {
    // Opened first, so a path that cannot be written fails before the run, not after it.
    let mut latency_log = args
        .latency_log
        .as_ref()
        .map(|path| {
            std::fs::File::create(path)
                .with_context(|| format!("cannot write the latency log {}", path.display()))
                .map(|f| (path.clone(), std::io::BufWriter::new(f)))
        })
        .transpose()?;
    let servers = Servers::start(nats_nodes).await?;
    let nats_url = servers.nats_url();
    let db = servers.pg().url();
    berth_store::migrate(&db).await?;
    let store = Store::connect(&db, 16)?;
    cluster::register(
        &store,
        args.workers as usize,
        args.gpus_per_worker,
        args.fill,
    )
    .await?;
    let ceiling_rounds = ceiling(&db, k * args.pool).await?;
    let ceiling = ceiling_rounds.first().copied().unwrap_or(f64::NAN);

    let bus = Bus::connect(&nats_url, "bench").await?;
    let stream_replicas = bus
        .jetstream()
        .get_stream(berth_bus::CMD_STREAM)
        .await?
        .info()
        .await?
        .config
        .num_replicas;
    let shutdown = CancellationToken::new();
    let agent = cluster::bulk_agent(bus.clone(), shutdown.clone()).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut events = bus
        .client()
        .subscribe(berth_proto::subjects::ALL_EVENTS)
        .await?;
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(msg) = events.next().await {
                let Ok(ev) = berth_proto::decode::<InstanceEvent>(&msg.payload) else {
                    continue;
                };
                let now = Instant::now();
                let Ok(mut s) = seen.lock() else { return };
                match ev.state {
                    InstanceState::Scheduled | InstanceState::Pending | InstanceState::Error => {
                        s.decided.entry(ev.instance_id).or_insert(Decided {
                            state: ev.state,
                            seen: now,
                            committed_unix_ms: ev.at_ms,
                        });
                    }
                    InstanceState::Running => s.running += 1,
                    _ => {}
                }
            }
        })
    };

    let policy = if args.policy == "binpack" {
        berth_fit::Policy::Binpack
    } else {
        berth_fit::Policy::Spread
    };
    let mut analyzers = Vec::new();
    let mut procs = Vec::new();
    for i in 0..k {
        let name = format!("bench-{i}");
        if args.processes {
            let settings = procs::Settings {
                nats_url: nats_url.clone(),
                database_url: db.clone(),
                concurrency: args.concurrency,
                pool: args.pool,
                policy: args.policy.clone(),
            };
            procs.push(procs::AnalyzerProc::start(&name, &settings).await?);
            continue;
        }
        let mut c = AnalyzerConfig::new(nats_url.clone(), db.clone());
        c.name = name;
        c.concurrency = args.concurrency as usize;
        c.pool_size = args.pool as usize;
        c.policy = policy;
        // The simulated workers send no heartbeats: keep them schedulable for the run.
        c.unreachable_after = Duration::from_secs(24 * 3600);
        c.gone_after = Duration::from_secs(48 * 3600);
        analyzers.push(Analyzer::start(c, Hooks::default()).await?);
    }

    // CPU per part of the system over the run itself (publish to settled).
    let analyzer_pids: Vec<u32> = procs.iter().filter_map(procs::AnalyzerProc::pid).collect();
    let cpu_roots = [
        (
            "postgres",
            servers.pg().pid().into_iter().collect::<Vec<_>>(),
            true,
        ),
        ("nats", servers.nats_pids(), true),
        ("bench_process", vec![std::process::id()], false),
        ("analyzer_processes", analyzer_pids, true),
    ];
    let cpu_now = || -> Vec<f64> {
        cpu_roots
            .iter()
            .map(|(_, pids, tree)| cpu_seconds(pids, *tree).unwrap_or(f64::NAN))
            .collect()
    };
    let cpu_before = cpu_now();
    let n = args.instances;
    let published: Arc<Mutex<HashMap<String, Published>>> = Arc::new(Mutex::new(HashMap::new()));
    let began = Instant::now();
    let began_unix_ms = unix_ms_now();
    let pace = args
        .rate
        .map(|r| Duration::from_secs_f64(1.0 / f64::from(r)));
    stream::iter(0..n)
        .map(|i| {
            let (bus, published) = (bus.clone(), published.clone());
            let cmd = Command::Start(spec(i, args.selectors, args.fill));
            async move {
                if let Some(p) = pace {
                    tokio::time::sleep_until((began + p * i).into()).await;
                }
                let id = format!("b{i:07}");
                let at = Published {
                    at: Instant::now(),
                    unix_ms: unix_ms_now(),
                };
                bus.publish_command(&id, &cmd).await?;
                if let Ok(mut m) = published.lock() {
                    m.insert(id, at);
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(if pace.is_some() { 4096 } else { 256 })
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>>>()?;
    let published_in = began.elapsed();

    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let (decided, running, placed) = {
            let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            let placed = s
                .decided
                .values()
                .filter(|d| d.state == InstanceState::Scheduled)
                .count();
            (s.decided.len(), s.running, placed)
        };
        if decided == n as usize && running >= placed {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {decided} of {n} instances decided ({running} running) after {}s",
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settled_in = began.elapsed();
    let cpu_used: Vec<f64> = cpu_now()
        .into_iter()
        .zip(&cpu_before)
        .map(|(after, before)| after - before)
        .collect();
    if std::env::var_os("BERTH_PG_STATEMENT_STATS").is_some() {
        print_statement_stats(&db).await?;
    }
    // Counters summed over the analyzers, by their /metrics names.
    let mut counters: HashMap<String, u64> = HashMap::new();
    let mut rss = Vec::new();
    for p in &procs {
        for (name, n) in p.counters().await? {
            *counters.entry(name).or_default() += n;
        }
        rss.push(p.peak_rss_mib());
    }
    for a in &analyzers {
        let s = &a.stats;
        for (name, n) in [
            ("fits_computed", s.fits_computed.get()),
            ("cas_conflicts", s.cas_conflicts.get()),
            ("capacity_conflicts", s.capacity_conflicts.get()),
            ("refits", s.refits.get()),
            ("start_groups", s.start_groups.get()),
            ("starts_grouped", s.starts_grouped.get()),
            ("events_failed", s.events_failed.get()),
        ] {
            *counters.entry(name.to_owned()).or_default() += n;
        }
    }
    let count = |name: &str| counters.get(name).copied().unwrap_or(0);

    let doc = {
        let s = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let published = published.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        let placed = s
            .decided
            .values()
            .filter(|d| d.state == InstanceState::Scheduled)
            .count();
        let pending = s
            .decided
            .values()
            .filter(|d| d.state == InstanceState::Pending)
            .count();
        let errors = s.decided.len() - placed - pending;
        // To the last commit by the database's clock (in the event), not to when its event
        // reached the bench: the relay's delay is not placement time.
        let last_commit_unix_ms = s
            .decided
            .values()
            .map(|d| d.committed_unix_ms as f64)
            .fold(began_unix_ms, f64::max);
        let window = ((last_commit_unix_ms - began_unix_ms) / 1000.0).max(1e-9);
        let lines = latencies(&s.decided, &published);
        let mut to_commit: Vec<f64> = lines.iter().map(|l| l.1).collect();
        let mut to_event: Vec<f64> = lines.iter().map(|l| l.2).collect();
        if let Some(log) = &mut latency_log {
            write_latency_log(log, &lines)?;
        }
        // Per-decision timings are sampled in process only.
        let stats: Vec<_> = analyzers.iter().map(|a| a.stats.clone()).collect();
        let mut fit_ms: Vec<f64> = stats
            .iter()
            .flat_map(|s| micros_to_ms(s.fit_micros.take()))
            .collect();
        let mut commit_ms: Vec<f64> = stats
            .iter()
            .flat_map(|s| micros_to_ms(s.commit_micros.take()))
            .collect();
        let rate = placed as f64 / window;
        let cpu_total: f64 = cpu_used.iter().filter(|c| c.is_finite()).sum();
        let round2 = |x: f64| (x * 100.0).round() / 100.0;
        let cpu_parts: serde_json::Map<String, Value> = cpu_roots
            .iter()
            .zip(&cpu_used)
            .filter(|((name, _, _), _)| args.processes || *name != "analyzer_processes")
            .map(|((name, _, _), used)| ((*name).to_owned(), json!(round2(*used))))
            .collect();
        let per_group =
            (count("starts_grouped") as f64 / count("start_groups").max(1) as f64 * 10.0).round()
                / 10.0;
        let doc = json!({
            "analyzers": k,
            "nats_servers": nats_nodes,
            "stream_replicas": stream_replicas,
            "placed": placed,
            "pending": pending,
            "errors": errors,
            "placements_per_s": rate.round(),
            "decisions_per_s": (s.decided.len() as f64 / window).round(),
            "ceiling_commits_per_s": ceiling.round(),
            "ceiling_rounds_per_s": ceiling_rounds.iter().map(|r| r.round()).collect::<Vec<_>>(),
            "ratio_to_ceiling": (rate / ceiling * 1000.0).round() / 1000.0,
            "publish_s": (published_in.as_secs_f64() * 1000.0).round() / 1000.0,
            "first_publish_to_last_commit_s": (window * 1000.0).round() / 1000.0,
            "all_running_s": (settled_in.as_secs_f64() * 1000.0).round() / 1000.0,
            "publish_to_commit_ms": summary(&mut to_commit),
            "publish_to_event_ms": summary(&mut to_event),
            "fit_ms": summary(&mut fit_ms),
            "commit_tx_ms": summary(&mut commit_ms),
            "fits": count("fits_computed"),
            "cas_conflicts": count("cas_conflicts"),
            "capacity_conflicts": count("capacity_conflicts"),
            "refits": count("refits"),
            "start_intents_per_statement": per_group,
            "events_failed": count("events_failed"),
            "cpu_s_during_run": cpu_parts,
            "cores_busy_during_run": round2(cpu_total / settled_in.as_secs_f64().max(1e-9)),
            "cpu_ms_per_placement": round2(cpu_total * 1000.0 / (placed.max(1) as f64)),
            "analyzer_processes": args.processes,
            "peak_rss_mib_bench_process": peak_rss_mib(None),
            "peak_rss_mib_analyzer_processes": rss,
        });
        doc
    };
    shutdown.cancel();
    for a in analyzers {
        a.shutdown().await;
    }
    for p in procs {
        p.stop().await;
    }
    watcher.abort();
    let _ = agent.await;
    Ok(doc)
}

/// The database's own rate for the bare placement commit (version CAS + conditional VRAM
/// reservation + allocation rows), with `connections` connections, in a database of its own
/// on the same server: the best of a few timed rounds after a warm-up (fresh connections
/// still fill their caches and plan their statements), so that one slow moment of a shared
/// machine does not lower the bar. Returns every round's rate, the best first.
async fn ceiling(base_url: &str, connections: u32) -> Result<Vec<f64>> {
    const WARM_UP: u32 = 500;
    const ROUNDS: u32 = 3;
    const PER_ROUND: u32 = 3000;
    let url = berth_store::create_database(base_url, "ceiling").await?;
    berth_store::migrate(&url).await?;
    let store = Store::connect(&url, connections as usize)?;
    // 800 GPUs of 80 GiB: room for every commit at 1 GiB each.
    cluster::register(&store, 100, 8, 0.0).await?;
    let spec = json!({"model": "ceiling", "vram_bytes": GIB, "gpus": 1, "selector": {}});
    let total = WARM_UP + ROUNDS * PER_ROUND;
    stream::iter(0..total)
        .map(|i| {
            let (store, spec) = (&store, spec.clone());
            async move {
                store
                    .apply_start(&format!("c{i}"), CmdSeq::new(1), spec)
                    .await
            }
        })
        .buffer_unordered(connections as usize)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let commit_all = |ids: std::ops::Range<u32>| {
        let store = &store;
        async move {
            let n = ids.len();
            let began = Instant::now();
            let outcomes = stream::iter(ids)
                .map(|i| async move {
                    let worker = format!("w{:05}", i % 100);
                    store
                        .commit_placement(
                            &format!("c{i}"),
                            Version::FIRST,
                            &worker,
                            &[i / 100 % 8],
                            GIB,
                        )
                        .await
                })
                .buffer_unordered(connections as usize)
                .collect::<Vec<_>>()
                .await;
            let elapsed = began.elapsed().as_secs_f64();
            let committed = outcomes
                .into_iter()
                .filter(|o| matches!(o, Ok(CommitOutcome::Committed(_))))
                .count();
            if committed != n {
                bail!("ceiling run committed {committed} of {n}");
            }
            Ok(n as f64 / elapsed)
        }
    };
    commit_all(0..WARM_UP).await?;
    let mut rates = Vec::new();
    for r in 0..ROUNDS {
        let from = WARM_UP + r * PER_ROUND;
        rates.push(commit_all(from..from + PER_ROUND).await?);
    }
    rates.sort_by(|a, b| b.total_cmp(a));
    Ok(rates)
}

/// With `BERTH_PG_STATEMENT_STATS` set (the harness then loads pg_stat_statements), prints
/// the statements PostgreSQL spent the most time in, to stderr: where a run's database time
/// went. Execution time includes waiting for locks and for a CPU.
async fn print_statement_stats(db: &str) -> Result<()> {
    let sql = "SET pg_stat_statements.track = 'top'; CREATE EXTENSION IF NOT EXISTS pg_stat_statements; \
        SELECT round(total_exec_time::numeric, 1) AS ms, calls, rows, \
               left(regexp_replace(query, '\\s+', ' ', 'g'), 160) AS statement \
        FROM pg_stat_statements \
        WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
        ORDER BY total_exec_time DESC LIMIT 20";
    let psql = berth_harness::find_pg_bin()?.join("psql");
    let out = tokio::process::Command::new(psql)
        .arg(db)
        .args(["-X", "-q", "-c", sql])
        .output()
        .await
        .context("running psql")?;
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
