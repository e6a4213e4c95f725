//! `berth ps`: the instances table, from PostgreSQL.

use anyhow::{Context, Result};
use berth_proto::size::format_bytes;
use berth_store::Store;
use clap::Args;
use comfy_table::{Table, presets::NOTHING};
use std::time::Duration;

#[derive(Debug, Args)]
pub struct PsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    instance: String,
    state: String,
    worker: Option<String>,
    gpus: Vec<i32>,
    vram_per_gpu: Option<i64>,
    version: i64,
    cmd_seq: i64,
    reason: Option<String>,
}

pub async fn run(database_url: &str, args: PsArgs) -> Result<()> {
    let store = Store::connect(database_url, 1)?;
    let read =
        async { Ok::<_, anyhow::Error>((store.instances().await?, store.allocations().await?)) };
    let (instances, allocs) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .with_context(|| format!("PostgreSQL at {database_url} did not answer within 10 s"))?
        .with_context(|| {
            format!("reading instances from {database_url} (is `berth up` running?)")
        })?;
    let rows: Vec<Row> = instances
        .into_iter()
        .map(|i| {
            let mine: Vec<_> = allocs
                .iter()
                .filter(|a| a.instance_id == i.id && a.version == i.version)
                .collect();
            Row {
                gpus: mine.iter().map(|a| a.gpu_idx).collect(),
                vram_per_gpu: mine.first().map(|a| a.bytes),
                worker: i.worker_id,
                state: i.state,
                version: i.version,
                cmd_seq: i.cmd_seq,
                reason: i.reason,
                instance: i.id,
            }
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_style(NOTHING).set_header([
        "INSTANCE", "STATE", "WORKER", "GPUS", "VRAM/GPU", "VERSION", "REASON",
    ]);
    for r in rows {
        table.add_row([
            r.instance,
            r.state,
            r.worker.unwrap_or_default(),
            r.gpus
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            r.vram_per_gpu.map(format_bytes).unwrap_or_default(),
            r.version.to_string(),
            r.reason.unwrap_or_default(),
        ]);
    }
    println!("{table}");
    Ok(())
}
