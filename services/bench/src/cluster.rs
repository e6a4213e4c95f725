//! Simulated clusters registered straight into the store, and a bulk agent that answers for
//! every worker at once.

use anyhow::Result;
use async_nats::jetstream::{self, consumer::pull};
use berth_bus::{AGENT_STREAM, Bus};
use berth_proto::{AgentMsg, GpuInfo, StatusMsg, status::ReportedState};
use berth_store::Store;
use futures::{StreamExt, stream};
use std::{collections::BTreeMap, sync::Arc};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub const GIB: i64 = 1 << 30;

/// Registers `workers` × `gpus` GPUs of 80 GiB, labelled `zone=z0..z3`, with `fill` of each
/// GPU set aside as system-reserved (a nearly full cluster at 0.95).
pub async fn register(store: &Store, workers: usize, gpus: u32, fill: f64) -> Result<()> {
    let total = 80 * GIB;
    let reserved = ((total as f64) * fill) as i64;
    stream::iter(0..workers)
        .map(|w| async move {
            let labels = BTreeMap::from([("zone".to_owned(), format!("z{}", w % 4))]);
            let list: Vec<GpuInfo> = (0..gpus)
                .map(|index| GpuInfo {
                    index,
                    name: "Simulated H100".into(),
                    uuid: String::new(),
                    total_bytes: total,
                    system_reserved_bytes: reserved,
                })
                .collect();
            store
                .register_worker(&format!("w{w:05}"), &labels, &list)
                .await
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    Ok(())
}

/// Answers every assignment for every worker: `running` for an assign, `stopped` for an
/// unassign. Stands in for a thousand agents without a thousand consumers.
pub async fn bulk_agent(
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let consumer = bus
        .jetstream()
        .create_consumer_on_stream(
            pull::Config {
                durable_name: Some("bench-agent".into()),
                filter_subject: "berth.agent.>".into(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 20_000,
                ..Default::default()
            },
            AGENT_STREAM,
        )
        .await?;
    let mut messages = consumer.messages().await?;
    Ok(tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(256));
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return,
                m = messages.next() => match m { Some(Ok(m)) => m, Some(Err(_)) => continue, None => return },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let bus = bus.clone();
            tokio::spawn(async move {
                let worker = msg
                    .subject
                    .as_str()
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let report = match berth_proto::decode::<AgentMsg>(&msg.payload) {
                    Ok(AgentMsg::Assign {
                        instance_id,
                        version,
                        ..
                    }) => Some((instance_id, version, ReportedState::Running)),
                    Ok(AgentMsg::Unassign {
                        instance_id,
                        version,
                    }) => Some((instance_id, version, ReportedState::Stopped)),
                    Err(_) => None,
                };
                if let Some((instance_id, version, state)) = report {
                    let status = StatusMsg::Instance {
                        worker_id: worker.clone(),
                        instance_id,
                        version,
                        state,
                        reason: None,
                        shared: false,
                        endpoint: None,
                        restarts: 0,
                    };
                    let _ = bus.publish_status(&worker, &status).await;
                }
                let _ = msg.ack().await;
                drop(permit);
            });
        }
    }))
}
