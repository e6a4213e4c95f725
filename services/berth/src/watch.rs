//! `berth watch`: state changes as they happen, one line each.

use anyhow::Result;
use berth_proto::{InstanceEvent, subjects};
use clap::Args;
use futures::StreamExt;

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only this instance.
    instance: Option<String>,
    /// Exit after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
}

pub async fn run(nats_url: &crate::Nats, args: WatchArgs) -> Result<()> {
    let subject = match &args.instance {
        Some(id) => subjects::event_subject(id)?,
        None => format!("{}.*", subjects::EVENTS_PREFIX),
    };
    let bus = nats_url.connect("berth-watch").await?;
    let mut sub = bus.client().subscribe(subject).await?;
    let mut seen = 0;
    while args.count.is_none_or(|c| seen < c) {
        let Some(msg) = sub.next().await else { break };
        let ev: InstanceEvent = match berth_proto::decode(&msg.payload) {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("undecodable event on {}: {e}", msg.subject);
                continue;
            }
        };
        if args.json {
            println!("{}", serde_json::to_string(&ev)?);
        } else {
            println!("{}", line(&ev));
        }
        seen += 1;
    }
    Ok(())
}

/// One readable line for an event.
pub fn line(ev: &InstanceEvent) -> String {
    let at = chrono::DateTime::from_timestamp_millis(ev.at_ms)
        .map(|t| t.format("%H:%M:%S%.3f").to_string())
        .unwrap_or_default();
    let mut s = format!("{at} {} {} v{}", ev.instance_id, ev.state, ev.version);
    if let Some(w) = &ev.worker_id {
        s.push_str(&format!(" on {w}"));
        if !ev.gpus.is_empty() {
            s.push_str(&format!(" gpus {:?}", ev.gpus));
        }
    }
    if let Some(e) = &ev.endpoint {
        s.push_str(&format!(" at {e}"));
    }
    if ev.restarts > 0 {
        s.push_str(&format!(" (restart {})", ev.restarts));
    }
    if let Some(r) = &ev.reason {
        s.push_str(&format!(" — {r}"));
    }
    s
}
