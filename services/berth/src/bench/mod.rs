//! `berth bench`: scenarios that start their own private servers, drive berth, and print one
//! JSON document. Figures are measured, not asserted; the ratios to the machine's own
//! ceiling are what compare across machines.

mod cluster;
mod place;
mod procs;
mod stats;
mod storm;

use anyhow::Result;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Placement throughput and latency against a simulated cluster, with the database's own
    /// commit rate measured in the same run as the ceiling.
    Place(place::PlaceArgs),
    /// The reported failure at scale: batch start/stop twice, then a few starts; how much
    /// work superseded commands cost and how fast stops cancel in-flight fits.
    Storm(storm::StormArgs),
}

pub async fn run(cmd: BenchCmd) -> Result<()> {
    let doc = match cmd {
        BenchCmd::Place(args) => Box::pin(place::run(args)).await?,
        BenchCmd::Storm(args) => storm::run(args).await?,
    };
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}
