//! The event relay. Every committed state change is written to the outbox by the transaction
//! that made it (a trigger on `instances`); this task publishes the outbox to BERTH_EVENTS in
//! commit order and removes what NATS stored. One analyzer relays at a time (the others find
//! the turn taken), each event carries a `Nats-Msg-Id` so a batch re-sent after a crash is
//! dropped by the server as a duplicate: no event is lost, none is published twice.

use crate::context::Ctx;
use berth_bus::{Bus, BusError};
use berth_store::{
    Transition,
    outbox::{OutboxEvent, RelayError, Relayed},
};
use std::{sync::Arc, time::Duration};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The relay's doorbell: a committed change wakes it (the event itself was written to the
/// outbox by the transaction that made the change).
#[derive(Debug, Default)]
pub(crate) struct Events {
    wake: Notify,
}

impl Events {
    /// Logs a committed transition and wakes the relay.
    pub(crate) fn announce(&self, t: &Transition) {
        tracing::info!(
            instance_id = %t.instance_id,
            version = t.version.get(),
            cmd_seq = t.cmd_seq.get(),
            state = %t.state,
            worker = t.worker_id.as_deref().unwrap_or(""),
            reason = t.reason.as_deref().unwrap_or(""),
            "state changed"
        );
        self.wake.notify_one();
    }
}

/// Events per round.
const BATCH: i64 = 512;
/// How often the outbox is looked at without a wake-up (state changes made by other
/// analyzers, a failed round).
const POLL: Duration = Duration::from_millis(50);
/// After a wake-up, how long the relay lets changes gather before a round. A round is a
/// transaction of four statements and a publish per event; woken by every change, at a
/// steady 200 placements/s the relay ran almost five rounds per placement and cost more than
/// the placements themselves. Events are at most this much later. 3 ms costs no more CPU
/// than 10 ms did (at 200/s and at 1,000/s) and takes 10–30 ms off the p99 from publish to
/// event at 1,000/s.
const GATHER: Duration = Duration::from_millis(3);

/// After a failed round the relay waits this long, doubling up to `MAX_BACKOFF`, so a NATS
/// or PostgreSQL outage is not met with a warning every 50 ms.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub(crate) async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = ctx.events.wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(GATHER) => {}
        }
        if drain(&ctx).await {
            backoff = FIRST_BACKOFF;
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Relays until nothing is waiting or another relay has the turn (true), or a round fails
/// (false).
async fn drain(ctx: &Ctx) -> bool {
    loop {
        match ctx
            .store
            .relay_events(BATCH, |events| publish_all(&ctx.bus, events))
            .await
        {
            Ok(Relayed::Sent(0) | Relayed::Busy) => return true,
            Ok(Relayed::Sent(n)) => {
                ctx.stats
                    .events_published
                    .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
                // A short round took everything that was waiting: no empty round to confirm.
                if i64::try_from(n).is_ok_and(|n| n < BATCH) {
                    return true;
                }
            }
            Err(RelayError::Publish(e)) => {
                ctx.stats.events_failed.inc();
                tracing::warn!(%e, "cannot publish events; will retry");
                return false;
            }
            Err(RelayError::Store(e)) => {
                tracing::warn!(%e, "cannot read the event outbox; will retry");
                return false;
            }
        }
    }
}

/// Sends every event, then waits for all of JetStream's acks.
async fn publish_all(bus: &Bus, events: Vec<OutboxEvent>) -> Result<(), BusError> {
    let mut acks = Vec::with_capacity(events.len());
    for e in &events {
        acks.push(bus.send_event(&e.event, &e.msg_id).await?);
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}
