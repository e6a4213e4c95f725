//! Nothing stuck: pending instances are re-evaluated when capacity appears, and a periodic
//! sweep handles what a lost wake-up, a dead analyzer or a silent worker left behind.

use crate::{agent_link::placement_of, context::Ctx};
use berth_fit::{Lane, place};
use berth_proto::{CmdSeq, InstanceState, Version};
use berth_store::{InstanceRow, StoreError};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Most instances handled per sweep step.
const BATCH: i64 = 1000;

pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    // Analyzers started together would sweep at the same moments, their scans competing
    // with each other and with placements: each starts at a random point of the period.
    let every = ctx.config.sweep_every;
    let phase = every.mul_f64(rand::random::<f64>());
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let full = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => true,
            () = ctx.wake.notified() => false,
        };
        let result = if full {
            sweep(&ctx).await
        } else {
            wake_pending(&ctx).await
        };
        if let Err(e) = result {
            if e.is_transient() {
                ctx.store_health.failed();
            }
            tracing::warn!(%e, "sweep failed; next round retries");
        }
    }
}

/// Republishes the command of each pending instance that fits in today's free capacity, as
/// long as it is still the instance's newest command. Capacity taken by one is deducted
/// before the next is tried, so a small release does not wake the whole queue.
pub async fn wake_pending(ctx: &Ctx) -> Result<(), StoreError> {
    let pending = ctx
        .store
        .instances_in(InstanceState::Pending, BATCH)
        .await?;
    if pending.is_empty() {
        return Ok(());
    }
    ctx.snapshot.refresh(&ctx.store).await?;
    let mut workers = ctx.snapshot.workers();
    for row in pending {
        let Some(spec) = row.start_spec() else {
            continue;
        };
        let Ok(request) = ctx.profiles.request(&spec).await else {
            continue;
        };
        let Ok(p) = place(&workers, &request, ctx.config.policy, &|| false) else {
            continue;
        };
        for part in &p.parts {
            if let Some(w) = workers.iter_mut().find(|w| w.id == part.worker_id) {
                part.apply(w, request.group.as_deref(), false);
            }
        }
        republish(ctx, &row.id, row.cmd_seq).await;
    }
    Ok(())
}

pub async fn republish(ctx: &Ctx, id: &str, cmd_seq: CmdSeq) {
    match ctx.bus.republish_command(id, cmd_seq).await {
        Ok(Some(new_seq)) => {
            tracing::info!(
                instance_id = id,
                %cmd_seq,
                %new_seq,
                "command republished for re-evaluation"
            );
            ctx.stats.republished.inc();
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(instance_id = id, %e, "cannot republish"),
    }
}

/// Stops what still runs of `id`'s placement at `version` after the instance left it (one
/// stage of an instance spread over several workers failed or went silent): the other
/// stages hold their GPUs until their agents confirm. An unassign stops versions below the
/// one it names, hence `version + 1`. Failures are logged; the next sweep tries again.
pub async fn stop_stranded(ctx: &Ctx, id: &str, version: Version) {
    match ctx.store.holders(id).await {
        Ok(holders) => {
            let _ = ctx.agents.unassign(id, version.next(), &holders).await;
        }
        Err(e) => tracing::warn!(%e, instance_id = id, "cannot find the stages to stop"),
    }
}

/// One full round: silent workers, gone workers, stuck instances, then pending ones.
pub async fn sweep(ctx: &Ctx) -> Result<(), StoreError> {
    let cfg = &ctx.config;
    if !ctx.store_health.reachable_for(cfg.unreachable_after) {
        // Heartbeats of the last while may not be recorded yet: nobody is silent for sure.
        sweep_instances(ctx).await?;
        ctx.stats.sweeps_without_silence.inc();
        ctx.stats.sweeps.inc();
        return Ok(());
    }
    for worker in ctx.store.mark_unreachable(cfg.unreachable_after).await? {
        tracing::warn!(
            worker,
            "no heartbeat for {:?}: not schedulable",
            cfg.unreachable_after
        );
        ctx.stats.workers_unreachable.inc();
    }
    for worker in ctx.store.gone_workers(cfg.gone_after).await? {
        for id in ctx.store.instances_on(&worker).await? {
            let evicted = ctx.store.evict(&worker, &id).await?;
            ctx.stats.evictions.inc();
            if let Some(t) = &evicted.transition {
                ctx.events.announce(t);
                if evicted.replace {
                    stop_stranded(ctx, &id, t.version).await;
                }
            }
        }
    }
    sweep_instances(ctx).await?;
    ctx.stats.sweeps.inc();
    Ok(())
}

/// The instances' part of a sweep: stuck analyses and stops, stranded stages, pending ones.
async fn sweep_instances(ctx: &Ctx) -> Result<(), StoreError> {
    let cfg = &ctx.config;
    for row in ctx
        .store
        .stuck(&[InstanceState::Analyzing], cfg.stuck_after, BATCH)
        .await?
    {
        republish(ctx, &row.id, row.cmd_seq).await;
    }
    for (id, version) in ctx.store.stranded(BATCH).await? {
        stop_stranded(ctx, &id, version).await;
    }
    // Agents that have not answered: assignments and unassigns are sent again.
    let unanswered = [InstanceState::Scheduled, InstanceState::Stopping];
    let lane = ctx.peers.lane();
    for row in ctx
        .store
        .stuck(&unanswered, cfg.stuck_after, BATCH)
        .await?
        .iter()
        .filter(|r| in_lane(lane, r))
    {
        if row.state == InstanceState::Scheduled.as_str() {
            resend_assignment(ctx, row).await?;
        } else {
            let holders = ctx.store.holders(&row.id).await?;
            // A failure is logged there; the next sweep sends again.
            let _ = ctx.agents.unassign(&row.id, row.version, &holders).await;
        }
    }
    wake_pending(ctx).await
}

/// Whether the analyzer of `lane` resends what `row`'s agents have not answered: only the
/// one whose lane holds the instance's (leading) worker does, so that one message goes out
/// per sweep rather than one per analyzer. While the analyzers disagree about the lanes (one
/// joined or went silent a moment ago), a resend may be doubled or wait for a later sweep.
fn in_lane(lane: Lane, row: &InstanceRow) -> bool {
    row.worker_id.as_deref().is_none_or(|w| lane.holds(w))
}

/// Sends the assignments of an instance that stays `scheduled` again: its agents never
/// answered, so they may never have got them (a publish lost with a NATS node, a command
/// that ran out of deliveries before the assignment went out). Agents ignore an assignment
/// of a version they already run, so a duplicate is harmless.
async fn resend_assignment(ctx: &Ctx, row: &InstanceRow) -> Result<(), StoreError> {
    let (Some(leader), Some(spec)) = (row.worker_id.as_deref(), row.start_spec()) else {
        return Ok(());
    };
    let claims = ctx.store.claims(&row.id, row.version).await?;
    if claims.is_empty() {
        return Ok(());
    }
    let placement = placement_of(leader, &claims);
    match ctx
        .agents
        .assign(&row.id, row.version, &spec, &placement)
        .await
    {
        Ok(()) => {
            tracing::info!(
                instance_id = row.id,
                version = %row.version,
                cmd_seq = %row.cmd_seq,
                "assignment sent again: no agent answered"
            );
            ctx.stats.assignments_resent.inc();
        }
        // The next sweep sends again.
        Err(e) => tracing::warn!(instance_id = row.id, %e, "cannot send the assignment again"),
    }
    Ok(())
}
