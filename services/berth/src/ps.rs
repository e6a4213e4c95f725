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
    /// Show one instance in detail: its spec, placement, last command, the state changes of
    /// the last day (from the event stream) and its latest rejected command.
    #[arg(long, value_name = "INSTANCE")]
    explain: Option<String>,
}

#[derive(Debug, serde::Serialize)]
struct Row {
    instance: String,
    state: String,
    worker: Option<String>,
    gpus: Vec<i32>,
    /// Every GPU as `worker:index`: an instance may span several workers.
    gpu_ids: Vec<String>,
    vram_per_gpu: Option<i64>,
    version: berth_proto::Version,
    cmd_seq: berth_proto::CmdSeq,
    reason: Option<String>,
    /// Where its model server answers while it runs one (`host:port`).
    endpoint: Option<String>,
    /// Times its agent restarted the server of the current placement.
    restarts: i32,
}

pub async fn run(database_url: &str, nats_url: &crate::Nats, args: PsArgs) -> Result<()> {
    let store = Store::connect(database_url, 1)?;
    if let Some(id) = &args.explain {
        return explain(&store, nats_url, id, args.json).await;
    }
    let read =
        async { Ok::<_, anyhow::Error>((store.instances().await?, store.allocations().await?)) };
    let (instances, allocs) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .with_context(|| {
            format!(
                "PostgreSQL at {} did not answer within 10 s",
                berth_store::connect::redacted(database_url)
            )
        })?
        .with_context(|| {
            format!(
                "reading instances from {} (is `berth up` running?)",
                berth_store::connect::redacted(database_url)
            )
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
                gpu_ids: mine
                    .iter()
                    .map(|a| format!("{}:{}", a.worker_id, a.gpu_idx))
                    .collect(),
                vram_per_gpu: mine.iter().map(|a| a.bytes).max(),
                worker: i.worker_id,
                state: i.state,
                version: i.version,
                cmd_seq: i.cmd_seq,
                reason: i.reason,
                endpoint: i.endpoint,
                restarts: i.restarts,
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
        "INSTANCE", "STATE", "WORKER", "GPUS", "VRAM/GPU", "VERSION", "ENDPOINT", "REASON",
    ]);
    for r in rows {
        let gpus = gpus_cell(&r);
        table.add_row([
            r.instance,
            r.state,
            r.worker.unwrap_or_default(),
            gpus,
            r.vram_per_gpu.map(format_bytes).unwrap_or_default(),
            r.version.to_string(),
            r.endpoint.unwrap_or_default(),
            short(r.reason.as_deref().unwrap_or_default()),
        ]);
    }
    println!("{table}");
    Ok(())
}

/// Longest reason `berth ps` shows in its table; `--explain` and `--json` have all of it.
const SHORT_REASON: usize = 72;

/// A reason cut to one short line for the table.
fn short(reason: &str) -> String {
    if reason.chars().count() <= SHORT_REASON {
        return reason.to_owned();
    }
    let mut cut: String = reason.chars().take(SHORT_REASON - 1).collect();
    cut.push('…');
    cut
}

/// GPU indexes on the instance's worker, or `worker:index` for each when it spans several.
fn gpus_cell(r: &Row) -> String {
    let one_worker = r.gpu_ids.iter().all(|g| {
        g.rsplit_once(':')
            .is_some_and(|(w, _)| Some(w) == r.worker.as_deref())
    });
    if one_worker {
        r.gpus
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    } else {
        r.gpu_ids.join(",")
    }
}

/// `berth ps --explain ID`.
async fn explain(store: &Store, nats_url: &crate::Nats, id: &str, json: bool) -> Result<()> {
    berth_proto::subjects::validate_id(id)?;
    let row = tokio::time::timeout(Duration::from_secs(10), store.instance(id))
        .await
        .context("PostgreSQL did not answer within 10 s")??
        .with_context(|| format!("no instance {id:?}"))?;
    let allocs: Vec<_> = store
        .allocations()
        .await?
        .into_iter()
        .filter(|a| a.instance_id == id)
        .collect();
    let bus = tokio::time::timeout(Duration::from_secs(10), nats_url.connect("berth-ps"))
        .await
        .with_context(|| format!("no NATS server answered at {nats_url} within 10 s"))??;
    let history = bus.history(id, 1000).await?;
    let rejected = bus.last_dead_letter(id).await?;
    if json {
        let doc = serde_json::json!({
            "instance": row.id,
            "state": row.state,
            "desired": row.desired,
            "reason": row.reason,
            "version": row.version,
            "cmd_seq": row.cmd_seq,
            "worker": row.worker_id,
            "endpoint": row.endpoint,
            "restarts": row.restarts,
            "spec": row.spec,
            "allocations": allocs.iter().map(|a| serde_json::json!({
                "worker": a.worker_id, "gpu": a.gpu_idx, "version": a.version, "bytes": a.bytes,
            })).collect::<Vec<_>>(),
            "history": history,
            "last_rejected": rejected.map(|(seq, reason)| serde_json::json!({"cmd_seq": seq, "reason": reason})),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("instance   {}", row.id);
    println!(
        "state      {} (desired {}), version {}, last command {}",
        row.state, row.desired, row.version, row.cmd_seq
    );
    if let Some(reason) = &row.reason {
        println!("reason     {reason}");
    }
    if let Some(endpoint) = &row.endpoint {
        println!("endpoint   {endpoint}");
    }
    if row.restarts > 0 {
        println!("restarts   {} (this placement)", row.restarts);
    }
    if let Some(spec) = &row.spec {
        println!("spec       {spec}");
    }
    for a in &allocs {
        println!(
            "holds      {} GPU {}: {} (version {})",
            a.worker_id,
            a.gpu_idx,
            format_bytes(a.bytes),
            a.version
        );
    }
    if let Some((seq, reason)) = rejected {
        println!("rejected   command {seq}: {reason}");
    }
    println!("history (last 24 h):");
    for ev in &history {
        println!("  {}  (command {})", crate::watch::line(ev), ev.cmd_seq);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_reasons_are_cut_for_the_table() {
        assert_eq!(super::short("no GPU"), "no GPU");
        let long = "w1: 2 GPUs short; ".repeat(20);
        let cut = super::short(&long);
        assert_eq!(cut.chars().count(), super::SHORT_REASON);
        assert!(cut.ends_with('…'));
    }
}

#[cfg(test)]
mod documented {
    /// The field names of the `berth ps --json` table in docs/protocol.md.
    fn documented_fields() -> Vec<String> {
        let doc = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md"),
        )
        .expect("docs/protocol.md");
        let start = doc.find("## `berth ps --json`").expect("the section");
        let section = &doc[start..];
        let end = section[3..].find("\n## ").map_or(section.len(), |e| e + 3);
        section[..end]
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn ps_json_fields_are_the_documented_ones() {
        let row = super::Row {
            instance: "m".into(),
            state: "running".into(),
            worker: Some("w1".into()),
            gpus: vec![0],
            gpu_ids: vec!["w1:0".into()],
            vram_per_gpu: Some(1),
            version: berth_proto::Version::new(1),
            cmd_seq: berth_proto::CmdSeq::new(1),
            reason: None,
            endpoint: None,
            restarts: 0,
        };
        let serde_json::Value::Object(fields) = serde_json::to_value(&row).unwrap() else {
            panic!("a row is an object");
        };
        let printed: Vec<String> = fields.keys().cloned().collect();
        let mut documented = documented_fields();
        documented.sort();
        let mut printed_sorted = printed;
        printed_sorted.sort();
        assert_eq!(printed_sorted, documented);
    }
}
