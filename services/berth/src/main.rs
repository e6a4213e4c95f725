//! `berth`: run a local fleet, publish start/stop commands, look at instances.

mod auth;
mod bench;
mod estimate;
mod fit_here;
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
    #[command(flatten)]
    nats: berth_bus::NatsArgs,
    /// PostgreSQL URL (for ps, keys, logs, ready, migrate and estimate --cluster). Default: the one `berth up`
    /// wrote to .berth/database-url when it is there, else
    /// postgres://postgres@127.0.0.1:5433/postgres.
    #[arg(long, global = true, env = "BERTH_DATABASE_URL")]
    database_url: Option<String>,
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
    /// NATS credentials for each part of a fleet: init, add-agent, add-publisher, list.
    Auth(auth::AuthArgs),
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
    let nats = Nats::new(cli.nats_url, &cli.nats);
    let database_url = database_url(cli.database_url);
    let cli_database_url = &database_url;
    match cli.command {
        Cmd::Up(args) => up::run(args).await,
        Cmd::Start(args) => publish::start(&nats, args).await,
        Cmd::Stop(args) => publish::stop(&nats, args).await,
        Cmd::Ps(args) => ps::run(cli_database_url, &nats, args).await,
        Cmd::Watch(args) => watch::run(&nats, args).await,
        Cmd::Logs(args) => logs::run(cli_database_url, &nats, args).await,
        Cmd::Ready(args) => ready::run(cli_database_url, &nats, args).await,
        Cmd::Auth(args) => auth::run(&args),
        Cmd::Keys(args) => keys::run(cli_database_url, args).await,
        Cmd::Bench { args } => bench::run(&args),
        Cmd::Estimate(args) => estimate::run(&args, cli_database_url).await,
        Cmd::Migrate => {
            let applied = berth_store::migrate(cli_database_url).await?;
            println!("migrations applied: {applied}");
            Ok(())
        }
    }
}

/// Where the commands reach NATS, and as whom.
#[derive(Debug)]
pub struct Nats {
    url: String,
    access: berth_bus::Access,
}

/// The publisher credentials `berth up` makes, used when none are given and they exist,
/// with the CA of its NATS when that serves TLS.
const LOCAL_CREDS: &str = ".berth/auth/publisher.nk";
const LOCAL_CA: &str = ".berth/auth/nats-ca.pem";

impl Nats {
    fn new(url: String, args: &berth_bus::NatsArgs) -> Nats {
        let mut args = args.clone();
        if args.nats_creds.is_none() && std::path::Path::new(LOCAL_CREDS).is_file() {
            args.nats_creds = Some(LOCAL_CREDS.into());
            if args.nats_ca.is_none() && std::path::Path::new(LOCAL_CA).is_file() {
                args.nats_ca = Some(LOCAL_CA.into());
            }
        }
        Nats {
            url,
            access: args.access(),
        }
    }

    pub async fn connect(&self, name: &str) -> Result<berth_bus::Bus, berth_bus::BusError> {
        berth_bus::Bus::connect_as(&self.url, name, &self.access).await
    }
}

impl std::fmt::Display for Nats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

/// Where `berth up` writes its database URL (with the password it made).
const LOCAL_DATABASE_URL: &str = ".berth/database-url";

fn database_url(given: Option<String>) -> String {
    given
        .or_else(|| {
            let url = std::fs::read_to_string(LOCAL_DATABASE_URL).ok()?;
            Some(url.trim().to_owned()).filter(|u| !u.is_empty())
        })
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}
