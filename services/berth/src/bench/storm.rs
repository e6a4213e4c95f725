//! `berth bench storm` (filled in below).

use anyhow::Result;
use clap::Args;
use serde_json::Value;

#[derive(Debug, Clone, Args)]
pub struct StormArgs {}

pub async fn run(_args: StormArgs) -> Result<Value> {
    anyhow::bail!("not yet")
}
