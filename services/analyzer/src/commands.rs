//! Handling one command message: decode, dead-letter bad input, apply start or stop.

use crate::{
    agent_link::placement_of, context::Ctx, intake::Handled, intents::NotRecorded, placing,
};
use async_nats::jetstream::Message;
use berth_proto::{CmdSeq, Command, StartSpec, StopSpec, subjects::instance_of_cmd_subject};
use berth_retry::{RetryPolicy, retry};
use berth_store::{
    StoreError,
    commands::{StartApplied, StartIntent, StopApplied},
};
use std::time::SystemTime;
use tracing::Instrument;

pub async fn handle(ctx: &Ctx, msg: &Message) -> Handled {
    let picked_at = SystemTime::now();
    let seq = match msg.info() {
        Ok(info) => CmdSeq::new(info.stream_sequence),
        Err(e) => {
            tracing::warn!(%e, "message without JetStream metadata; dropping");
            return Handled::Done;
        }
    };
    let subject = msg.subject.as_str();
    let instance_id = instance_of_cmd_subject(subject);
    let span = tracing::info_span!(
        "command",
        instance_id = instance_id.unwrap_or("?"),
        cmd_seq = seq.get()
    );
    async move {
        let Some(id) = instance_id else {
            let reason = format!("subject {subject:?} does not name a valid instance id");
            return dead_letter(ctx, msg, None, seq, &reason).await;
        };
        ctx.fits.supersede(id, seq);
        let handled = match Command::decode(&msg.payload) {
            Err(e) => return dead_letter(ctx, msg, Some(id), seq, &e.to_string()).await,
            Ok(Command::Start(spec)) => start(ctx, id, seq, spec, picked_at).await,
            Ok(Command::Stop(spec)) => stop(ctx, id, seq, spec).await,
        };
        match handled {
            Handled::Refused(why) => dead_letter(ctx, msg, Some(id), seq, &why).await,
            other => other,
        }
    }
    .instrument(span)
    .await
}

/// Retries transient store errors a few times; `Err` means give the message back.
async fn stored<T, F, Fut>(what: &str, op: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    retry(what, RetryPolicy::QUICK, StoreError::is_transient, op).await
}

/// A store error as the command's outcome: redelivered while the database is unavailable,
/// refused (dead-lettered) when the database refuses the command's data or fails in a way
/// that retrying cannot mend, so no command is retried forever.
fn outcome<T>(r: Result<T, StoreError>) -> Result<T, Handled> {
    r.map_err(|e| {
        if e.is_transient() {
            tracing::warn!(%e, "database unavailable; command will be redelivered");
            Handled::Retry
        } else {
            Handled::Refused(format!("the database refused the command: {e}"))
        }
    })
}

async fn dead_letter(
    ctx: &Ctx,
    msg: &Message,
    id: Option<&str>,
    seq: CmdSeq,
    reason: &str,
) -> Handled {
    tracing::warn!(reason, "dead-lettering command");
    if let Err(e) = ctx
        .bus
        .dead_letter(id, &msg.subject, seq, msg.payload.clone(), reason)
        .await
    {
        tracing::warn!(%e, "cannot dead-letter; will retry");
        return Handled::Retry;
    }
    ctx.stats.commands_dead_lettered.inc();
    if let Some(id) = id {
        let marked = stored("mark invalid", || ctx.store.apply_invalid(id, seq, reason)).await;
        match outcome(marked) {
            Ok(Some(t)) => ctx.events.announce(&t),
            Ok(None) => {
                ctx.stats.commands_stale.inc();
            }
            Err(Handled::Refused(why)) => {
                // The copy is in the dead-letter stream; the instance keeps its state.
                tracing::error!(why, "cannot mark the instance for a rejected command");
            }
            Err(h) => return h,
        }
    }
    Handled::Done
}

async fn start(
    ctx: &Ctx,
    id: &str,
    seq: CmdSeq,
    spec: StartSpec,
    picked_at: SystemTime,
) -> Handled {
    let spec_json = match serde_json::to_value(&spec) {
        Ok(v) => v,
        Err(e) => {
            // Cannot happen for a decoded spec; logged so it is seen if it ever does.
            tracing::error!(%e, "cannot store the spec");
            return Handled::Done;
        }
    };
    let intent = StartIntent {
        id: id.to_owned(),
        seq,
        spec: spec_json,
    };
    // In flight from here, and the superseded check (see `placing::place`) is asked while
    // the intent is recorded rather than after: one round trip less before the fit.
    let guard = ctx.fits.begin(id, seq, &spec);
    // Grouped with the other starts in hand; transient errors were retried there.
    let (applied, newest) = tokio::join!(ctx.intents.apply(intent), ctx.bus.last_command_seq(id));
    let applied = match applied {
        Ok(applied) => applied,
        Err(not_recorded) => {
            return match not_recorded {
                NotRecorded::Unavailable => Handled::Retry,
                NotRecorded::Refused(why) => Handled::Refused(why),
            };
        }
    };
    let StartApplied::Analyzing {
        transition,
        release_on,
    } = applied
    else {
        drop(guard);
        return not_placing(ctx, id, &spec, applied).await;
    };
    ctx.stats.commands_applied.inc();
    ctx.events.announce(&transition);
    if ctx
        .agents
        .unassign(id, transition.version, &release_on)
        .await
        .is_err()
    {
        return Handled::Retry;
    }
    let began = placing::Began { guard, newest };
    placing::place(
        ctx,
        id,
        seq,
        transition.version,
        &spec,
        picked_at,
        Some(began),
    )
    .await
}

/// A start that needs no placement: stale, unchanged, or placed already (the assignments
/// are sent again).
async fn not_placing(ctx: &Ctx, id: &str, spec: &StartSpec, applied: StartApplied) -> Handled {
    match applied {
        StartApplied::Stale { current_seq } => {
            tracing::debug!(%current_seq, "stale start ignored");
            ctx.stats.commands_stale.inc();
            Handled::Done
        }
        StartApplied::Unchanged { version } => {
            tracing::debug!(%version, "same spec as the running placement; nothing to do");
            ctx.stats.commands_applied.inc();
            Handled::Done
        }
        StartApplied::AlreadyPlaced {
            version,
            worker_id,
            claims,
        } => {
            // A redelivery after a crash between commit and assignment: send them again.
            let placement = placement_of(&worker_id, &claims);
            match ctx.agents.assign(id, version, spec, &placement).await {
                Ok(()) => Handled::Done,
                Err(_) => Handled::Retry,
            }
        }
        // Placed by the caller; never passed here.
        StartApplied::Analyzing { .. } => Handled::Retry,
    }
}

async fn stop(ctx: &Ctx, id: &str, seq: CmdSeq, spec: StopSpec) -> Handled {
    let applied = stored("apply stop", || {
        ctx.store.apply_stop(id, seq, spec.reason.clone())
    })
    .await;
    let applied = match outcome(applied) {
        Ok(a) => a,
        Err(h) => return h,
    };
    match applied {
        StopApplied::Stale { current_seq } => {
            tracing::debug!(%current_seq, "stale stop ignored");
            ctx.stats.commands_stale.inc();
        }
        StopApplied::Stopped(t) => {
            ctx.stats.commands_applied.inc();
            ctx.events.announce(&t);
        }
        StopApplied::Stopping {
            transition,
            workers,
        } => {
            ctx.stats.commands_applied.inc();
            ctx.events.announce(&transition);
            if ctx
                .agents
                .unassign(id, transition.version, &workers)
                .await
                .is_err()
            {
                return Handled::Retry;
            }
        }
    }
    Handled::Done
}
