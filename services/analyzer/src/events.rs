//! The event relay. Every committed state change is written to the outbox by the transaction
//! that made it (a trigger on `instances`); this task publishes the outbox to BERTH_EVENTS in
//! commit order and removes what NATS stored. One analyzer relays at a time (the others find
//! the turn taken), each event carries a `Nats-Msg-Id` so a batch re-sent after a crash is
//! dropped by the server as a duplicate: no event is lost, none is published twice.

use crate::context::Ctx;
use berth_bus::Bus;
use berth_store::outbox::{OutboxEvent, Relayed};
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Events per round.
const BATCH: i64 = 512;
/// How often the outbox is looked at without a wake-up (state changes made by other
/// analyzers, a failed round).
const POLL: Duration = Duration::from_millis(50);
/// After a wake-up, how long the relay lets changes gather before a round. A round is a
/// transaction of four statements and a publish per event; woken by every change, at a
/// steady 200 placements/s the relay ran almost five rounds per placement and cost more than
/// the placements themselves. Events are at most this much later.
const GATHER: Duration = Duration::from_millis(20);

/// After a failed round the relay waits this long, doubling up to `MAX_BACKOFF`, so a NATS
/// or PostgreSQL outage is not met with a warning every 50 ms.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = ctx.events_wake.notified() => {}
            () = tokio::time::sleep(POLL) => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(GATHER) => {}
        }
        let pause = match drain(&ctx).await {
            Round::Drained => {
                backoff = FIRST_BACKOFF;
                continue;
            }
            // Another analyzer's relay has the turn and sends our events too (it polls the
            // outbox); asking again at each of our own changes would only cost statements.
            Round::Busy => POLL,
            Round::Failed => {
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                pause
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// How [`drain`] ended.
enum Round {
    /// Nothing more was waiting.
    Drained,
    /// Another relay holds the turn.
    Busy,
    /// A round failed (logged and counted).
    Failed,
}

/// Relays until nothing is waiting, another relay has the turn, or a round fails.
async fn drain(ctx: &Ctx) -> Round {
    loop {
        match ctx
            .store
            .relay_events(BATCH, |events| publish_all(&ctx.bus, events))
            .await
        {
            Ok(Relayed::Sent(0)) => return Round::Drained,
            Ok(Relayed::Busy) => return Round::Busy,
            Ok(Relayed::Sent(n)) => {
                ctx.stats
                    .events_published
                    .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
                // A short round took everything that was waiting: no empty round to confirm.
                if i64::try_from(n).is_ok_and(|n| n < BATCH) {
                    return Round::Drained;
                }
            }
            Err(Ok(e)) => {
                ctx.stats.events_failed.inc();
                tracing::warn!(e, "cannot publish events; will retry");
                return Round::Failed;
            }
            Err(Err(e)) => {
                tracing::warn!(%e, "cannot read the event outbox; will retry");
                return Round::Failed;
            }
        }
    }
}

/// Sends every event, then waits for all of JetStream's acks.
async fn publish_all(bus: &Bus, events: Vec<OutboxEvent>) -> Result<(), String> {
    let mut acks = Vec::with_capacity(events.len());
    for e in &events {
        acks.push(
            bus.send_event(&e.event, &e.msg_id)
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    for ack in acks {
        ack.await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
