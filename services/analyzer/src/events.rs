//! Event acks off the hot path: a placement sends its events and moves on; this task waits
//! for JetStream's answers and logs and counts the failures (events are best effort, the
//! state in PostgreSQL is the truth).

use crate::stats::Stats;
use berth_bus::{BusError, EventAck};
use futures::{StreamExt, stream::FuturesUnordered};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Acks waited for at once; when that many are outstanding, senders wait for room (so a
/// stalled NATS slows placements down instead of growing memory).
const ACKS_IN_FLIGHT: usize = 1024;

/// The sending side; the task ends once every sender is dropped and the acks are in.
#[derive(Debug, Clone)]
pub struct EventAcks {
    tx: mpsc::Sender<(String, EventAck)>,
}

impl EventAcks {
    pub fn spawn(stats: Arc<Stats>) -> EventAcks {
        let (tx, mut rx) = mpsc::channel::<(String, EventAck)>(ACKS_IN_FLIGHT);
        tokio::spawn(async move {
            let mut pending = FuturesUnordered::new();
            loop {
                tokio::select! {
                    next = rx.recv(), if pending.len() < ACKS_IN_FLIGHT => match next {
                        Some((instance_id, ack)) => {
                            pending.push(async move { (instance_id, ack.await) });
                        }
                        None => break,
                    },
                    Some((instance_id, outcome)) = pending.next(), if !pending.is_empty() => {
                        report(&stats, &instance_id, outcome);
                    }
                }
            }
            while let Some((instance_id, outcome)) = pending.next().await {
                report(&stats, &instance_id, outcome);
            }
        });
        EventAcks { tx }
    }

    /// Hands over the ack of `instance_id`'s event; waits inline if the task is gone.
    pub async fn watch(&self, instance_id: &str, ack: EventAck, stats: &Stats) {
        if let Err(mpsc::error::SendError((_, ack))) =
            self.tx.send((instance_id.to_owned(), ack)).await
        {
            report(stats, instance_id, ack.await);
        }
    }
}

fn report(stats: &Stats, instance_id: &str, outcome: Result<(), BusError>) {
    if let Err(e) = outcome {
        stats.events_failed.inc();
        tracing::warn!(%e, instance_id, "event not stored");
    }
}
