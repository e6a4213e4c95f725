//! The event relay. Every committed state change is written to the outbox by the transaction
//! that made it (a trigger on `instances`); this task publishes the outbox to BERTH_EVENTS,
//! each instance's events in commit order, and removes what NATS stored. One analyzer relays at a time (the others find
//! the turn taken), each event carries a `Nats-Msg-Id` so a batch re-sent after a crash is
//! dropped by the server as a duplicate: no event is lost, none is published twice.

use crate::context::Ctx;
use berth_bus::{Bus, BusError};
use berth_store::{
    Transition,
    outbox::{OutboxEvent, RelayError, Relayed},
};
use std::{collections::HashMap, sync::Arc, time::Duration};
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

/// Sends the events in waves of at most one event per instance, waiting for every ack of a
/// wave before the next. Sent all at once, a publish refused while a stream changes leader
/// could be followed by a later event of the same instance that the new leader stores: the
/// round's retry would then store the refused one after it, and the instance's newest event
/// would no longer be its state.
async fn publish_all(bus: &Bus, events: Vec<OutboxEvent>) -> Result<(), BusError> {
    for wave in waves(&events) {
        let mut acks = Vec::with_capacity(wave.len());
        for e in wave {
            acks.push(bus.send_event(&e.event, &e.msg_id).await?);
        }
        for ack in acks {
            ack.await?;
        }
    }
    Ok(())
}

/// `events` (in outbox order) in waves: the k-th wave holds each instance's k-th event.
fn waves(events: &[OutboxEvent]) -> Vec<Vec<&OutboxEvent>> {
    let mut next: HashMap<&str, usize> = HashMap::new();
    let mut waves: Vec<Vec<&OutboxEvent>> = Vec::new();
    for e in events {
        let k = next.entry(e.event.instance_id.as_str()).or_insert(0);
        if waves.len() <= *k {
            waves.push(Vec::new());
        }
        waves[*k].push(e);
        *k += 1;
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_proto::{CmdSeq, InstanceEvent, InstanceState, Version};

    fn event(id: &str, version: i64) -> OutboxEvent {
        OutboxEvent {
            msg_id: format!("{id}:{version}"),
            event: InstanceEvent {
                instance_id: id.into(),
                state: InstanceState::Analyzing,
                version: Version::new(version),
                cmd_seq: CmdSeq::new(1),
                worker_id: None,
                gpus: Vec::new(),
                reason: None,
                endpoint: None,
                restarts: 0,
                at_ms: 0,
            },
        }
    }

    #[test]
    fn each_wave_holds_one_event_per_instance_in_outbox_order() {
        let events = [
            event("a", 1),
            event("b", 1),
            event("a", 2),
            event("a", 3),
            event("c", 1),
            event("b", 2),
        ];
        let ids =
            |w: &Vec<&OutboxEvent>| -> Vec<String> { w.iter().map(|e| e.msg_id.clone()).collect() };
        let waves: Vec<Vec<String>> = waves(&events).iter().map(ids).collect();
        assert_eq!(
            waves,
            [vec!["a:1", "b:1", "c:1"], vec!["a:2", "b:2"], vec!["a:3"],]
        );
        assert!(super::waves(&[]).is_empty());
    }
}
