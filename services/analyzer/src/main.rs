//! berth-analyzer: the placement worker. Run as many as you like against one NATS and one
//! PostgreSQL.

use anyhow::Context;
use berth_analyzer::{Analyzer, AnalyzerConfig, Hooks};
use clap::Parser;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(version, about = "berth placement worker")]
struct Args {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    #[command(flatten)]
    nats: berth_bus::NatsArgs,
    /// PostgreSQL URL.
    #[arg(long, env = "BERTH_DATABASE_URL")]
    database_url: String,
    /// Name in logs and NATS connection lists.
    #[arg(long, env = "BERTH_ANALYZER_NAME", default_value = "analyzer")]
    name: String,
    /// Commands handled concurrently.
    #[arg(long, env = "BERTH_ANALYZER_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    concurrency: u32,
    /// Database connections.
    #[arg(long, env = "BERTH_ANALYZER_POOL", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pool_size: u32,
    /// Placement policy.
    #[arg(long, env = "BERTH_POLICY", default_value = "binpack", value_parser = ["binpack", "spread"])]
    policy: String,
    /// Serve Prometheus metrics at http://ADDR/metrics ("off" to disable).
    #[arg(long, env = "BERTH_METRICS_ADDR", default_value = "127.0.0.1:9101", value_parser = berth_telemetry::args::metrics_addr)]
    metrics_addr: berth_telemetry::args::MetricsAddr,
    /// How long a command may stay unacknowledged with an analyzer before another gets it
    /// (all analyzers must agree).
    #[arg(long, env = "BERTH_ACK_WAIT", default_value = "30s", value_parser = berth_telemetry::args::duration)]
    ack_wait: Duration,
    /// A placement unsettled after this long ends in `error`.
    #[arg(long, env = "BERTH_FIT_TIMEOUT", default_value = "20s", value_parser = berth_telemetry::args::duration)]
    fit_timeout: Duration,
    /// How often to sweep for pending, stuck and orphaned instances.
    #[arg(long, env = "BERTH_SWEEP_EVERY", default_value = "5s", value_parser = berth_telemetry::args::duration)]
    sweep_every: Duration,
    /// An instance analyzing, scheduled or stopping for longer than this is handled again.
    #[arg(long, env = "BERTH_STUCK_AFTER", default_value = "60s", value_parser = berth_telemetry::args::duration)]
    stuck_after: Duration,
    /// A worker silent this long is no longer chosen.
    #[arg(long, env = "BERTH_UNREACHABLE_AFTER", default_value = "15s", value_parser = berth_telemetry::args::duration)]
    unreachable_after: Duration,
    /// A worker silent this long loses its instances to other workers.
    #[arg(long, env = "BERTH_GONE_AFTER", default_value = "60s", value_parser = berth_telemetry::args::duration)]
    gone_after: Duration,
    /// A directory the model files that starts name may be read from (repeatable; the
    /// environment variable takes a colon-separated list). Without one, every start that
    /// names a model file ends in `error`.
    #[arg(long = "model-root", env = "BERTH_MODEL_ROOTS", value_delimiter = ':')]
    model_roots: Vec<std::path::PathBuf>,
    /// A model's headers not read within this long end the start in `error`.
    #[arg(long, env = "BERTH_MODEL_READ_TIMEOUT", default_value = "10s", value_parser = berth_telemetry::args::duration)]
    model_read_timeout: Duration,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "BERTH_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    berth_telemetry::init_tracing(args.log_json, "info");
    let mut config = AnalyzerConfig::new(args.nats_url, args.database_url);
    config.name = args.name;
    // The analyzer role sets the streams up, credentials or not.
    config.nats_access = berth_bus::Access {
        provision: true,
        ..args.nats.access()
    };
    config.concurrency = args.concurrency as usize;
    config.pool_size = args.pool_size as usize;
    config.metrics_addr = args.metrics_addr.0;
    config.ack_wait = args.ack_wait;
    config.fit_timeout = args.fit_timeout;
    config.sweep_every = args.sweep_every;
    config.stuck_after = args.stuck_after;
    config.unreachable_after = args.unreachable_after;
    config.gone_after = args.gone_after;
    config.model_roots =
        berth_models::ModelRoots::new(&args.model_roots).context("checking --model-root")?;
    if args.model_roots.is_empty() {
        tracing::warn!("no --model-root: starts that name a model file will be refused");
    }
    config.model_read_timeout = args.model_read_timeout;
    config.policy = match args.policy.as_str() {
        "spread" => berth_fit::Policy::Spread,
        _ => berth_fit::Policy::Binpack,
    };
    let mut analyzer = Analyzer::start(config, Hooks::default())
        .await
        .context("starting the analyzer")?;
    tokio::select! {
        r = berth_telemetry::shutdown_signal() => r.context("waiting for Ctrl-C or SIGTERM")?,
        () = analyzer.stopped() => anyhow::bail!("analyzer loops ended unexpectedly"),
    }
    tracing::info!("shutting down");
    analyzer.shutdown().await;
    Ok(())
}
