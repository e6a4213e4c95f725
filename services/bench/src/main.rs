//! `berth-bench`: scenarios that start their own private servers, drive berth, and print one
//! JSON document. Figures are measured, not asserted; the ratios to the machine's own
//! ceiling are what compare across machines. Users run it as `berth bench ...`: the `berth`
//! client hands its arguments to this binary, which links the analyzer for in-process
//! statistics so that the client does not have to.

mod cluster;
mod cpus;
mod gateway;
mod place;
mod procs;
mod servers;
mod stats;
mod storm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "berth bench",
    bin_name = "berth bench",
    version,
    about = "Benchmarks on private servers; each prints one JSON document"
)]
struct Cli {
    #[command(subcommand)]
    command: BenchCmd,
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Placement throughput and latency against a simulated cluster, with the database's own
    /// commit rate measured in the same run as the ceiling.
    Place(place::PlaceArgs),
    /// The reported failure at scale: batch start/stop twice, then a few starts; how much
    /// work superseded commands cost and how fast stops cancel in-flight fits.
    Storm(storm::StormArgs),
    /// What the gateway adds in front of a model server: requests/s and latency at rising
    /// concurrency, straight and through it, and the time from `running` to the first routed
    /// request.
    Gateway(gateway::GatewayArgs),
    /// A tiny OpenAI-compatible server that answers at once (the gateway benchmark runs it).
    #[command(hide = true)]
    FakeBackend(gateway::FakeBackendArgs),
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    berth_telemetry::init_tracing(false, "warn");
    let doc = match cli.command {
        // Boxed: the benchmark's future is large, and only it needs to be.
        BenchCmd::Place(args) => Box::pin(place::run(args)).await?,
        BenchCmd::Storm(args) => storm::run(args).await?,
        BenchCmd::Gateway(args) => Box::pin(gateway::run(args)).await?,
        BenchCmd::FakeBackend(args) => return gateway::fake_backend(args).await,
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
