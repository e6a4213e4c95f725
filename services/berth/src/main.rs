//! `berth`: run a local fleet, publish start/stop commands, look at instances.

mod bench;
mod estimate;
mod keys;
mod logs;
mod ps;
mod publish;
mod ready;
mod up;
mod watch;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Defaults match what `berth up` starts, so the other commands work against it unchanged.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5433/postgres";

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "Place AI model instances on GPU clusters"
)]
struct Cli {
    /// NATS server URL(s), comma separated.
    #[arg(long, global = true, env = "BERTH_NATS_URL", default_value = DEFAULT_NATS_URL)]
    nats_url: String,
    /// PostgreSQL URL (for ps and migrate).
    #[arg(long, global = true, env = "BERTH_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    database_url: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a local fleet: private NATS and PostgreSQL under .berth/, analyzers and simulated
    /// agents. Ctrl-C stops everything.
    Up(up::UpArgs),
    /// Ask for an instance to run.
    Start(publish::StartArgs),
    /// Ask for an instance to stop.
    Stop(publish::StopArgs),
    /// List instances with their state, placement and reason.
    Ps(ps::PsArgs),
    /// Print state changes as they happen.
    Watch(watch::WatchArgs),
    /// An instance's server log, from the worker that runs it.
    Logs(logs::LogsArgs),
    /// Wait until enough analyzers are alive and workers registered (exit 0), for scripts.
    Ready(ready::ReadyArgs),
    /// API keys for the gateway: create (printed once), list, revoke.
    Keys(keys::KeysArgs),
    /// Apply database migrations (analyzers also do this at start).
    Migrate,
    /// What a model needs on the GPUs, estimated from its own files.
    Estimate(estimate::EstimateArgs),
    /// Benchmarks on private servers (`place`, `storm`); each prints one JSON document.
    /// Runs `berth-bench`, built next to `berth`, with the same arguments.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let default = if matches!(cli.command, Cmd::Up(_)) {
        "info,async_nats=warn"
    } else {
        "warn"
    };
    berth_telemetry::init_tracing(false, default);
    match cli.command {
        Cmd::Up(args) => up::run(args).await,
        Cmd::Start(args) => publish::start(&cli.nats_url, args).await,
        Cmd::Stop(args) => publish::stop(&cli.nats_url, args).await,
        Cmd::Ps(args) => ps::run(&cli.database_url, &cli.nats_url, args).await,
        Cmd::Watch(args) => watch::run(&cli.nats_url, args).await,
        Cmd::Logs(args) => logs::run(&cli.database_url, &cli.nats_url, args).await,
        Cmd::Ready(args) => ready::run(&cli.database_url, &cli.nats_url, args).await,
        Cmd::Keys(args) => keys::run(&cli.database_url, args).await,
        Cmd::Bench { args } => bench::run(&args),
        Cmd::Estimate(args) => estimate::run(&args),
        Cmd::Migrate => {
            let applied = berth_store::migrate(&cli.database_url).await?;
            println!("migrations applied: {applied}");
            Ok(())
        }
    }
}
