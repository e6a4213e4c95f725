//! From intent to placement: the superseded check, the fit, and the CAS commit.

use crate::grouped::Grouped;
use crate::{agent_link::to_i64, context::Ctx, in_flight::FitGuard, intake::Handled};
use berth_fit::{FitError, Placement, Request};
use berth_proto::{CmdSeq, StartSpec, Version};
use berth_store::{
    Store, StoreError,
    placement::{CommitOutcome, GpuClaim, PlacementCommit},
};
use std::time::SystemTime;

/// How a placement attempt ended.
enum Settled {
    Handled(Handled),
    /// Abandoned because a newer command was heard (not yet confirmed).
    Cancelled,
}

/// A fit registered in flight ([`crate::in_flight::InFlight::begin`]) and the superseded
/// check asked after that, both done by the caller while the start's intent was being
/// recorded.
pub(crate) struct Began<'a> {
    pub(crate) guard: FitGuard<'a>,
    pub(crate) newest: Result<Option<CmdSeq>, berth_bus::BusError>,
}

/// Places `id` (now `analyzing` at `version` for command `seq`), or leaves it `pending` with
/// the reason nothing fits. `began`: the first attempt's registration and check, if the
/// caller made them.
pub async fn place(
    ctx: &Ctx,
    id: &str,
    seq: CmdSeq,
    version: Version,
    spec: &StartSpec,
    picked_at: SystemTime,
    mut began: Option<Began<'_>>,
) -> Handled {
    loop {
        // In flight from the registration on (here, or the caller's): a newer command heard
        // from then on cancels this fit, and one stored before is seen by the check, which
        // is asked after the registration. No gap between the two.
        let (guard, newest) = match began.take() {
            Some(b) => (b.guard, b.newest),
            None => {
                let guard = ctx.fits.begin(id, seq, spec);
                (guard, ctx.bus.last_command_seq(id).await)
            }
        };
        // No wasted work: a command that is no longer the newest costs no fit.
        match newest {
            Ok(Some(last)) if last > seq => {
                tracing::debug!(%last, "superseded before the fit; skipped");
                ctx.stats.fits_skipped_superseded.inc();
                return Handled::Done;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(%e, "cannot check for newer commands; will retry");
                return Handled::Retry;
            }
        }
        // Another command was heard just before the fit began: it may be newer and not
        // stored yet, so ask again (briefly) before computing anything.
        if ctx.fits.heard_other_lately(id, spec)
            && matches!(confirm_superseded(ctx, id, seq).await, Ok(true))
        {
            tracing::debug!("superseded by a command heard before the fit; skipped");
            ctx.stats.fits_skipped_superseded.inc();
            return Handled::Done;
        }
        let token = guard.token().clone();
        let settled = tokio::time::timeout(
            ctx.config.fit_timeout,
            place_until_settled(ctx, id, seq, version, spec, picked_at, &token),
        )
        .await;
        drop(guard);
        match settled {
            Ok(Settled::Handled(handled)) => return handled,
            Ok(Settled::Cancelled) => match confirm_superseded(ctx, id, seq).await {
                Ok(true) => return Handled::Done,
                Ok(false) => {
                    // An older command heard late: nothing newer exists, so place again.
                    tracing::info!("cancelled by a command that was not newer; placing again");
                    ctx.stats.false_cancels.inc();
                }
                Err(e) => {
                    tracing::warn!(%e, "cannot confirm the cancellation; will retry");
                    return Handled::Retry;
                }
            },
            Err(_) => return timed_out(ctx, id, version, &token).await,
        }
    }
}

/// Whether the stream holds a command for `id` newer than `seq`. The plain copy a watch
/// hears can arrive a moment before the stream has stored it, so a "no" is asked again
/// shortly before it counts.
async fn confirm_superseded(ctx: &Ctx, id: &str, seq: CmdSeq) -> Result<bool, berth_bus::BusError> {
    for pause_ms in [0, 2, 20] {
        tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
        if ctx
            .bus
            .last_command_seq_alone(id)
            .await?
            .is_some_and(|last| last > seq)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

async fn timed_out(
    ctx: &Ctx,
    id: &str,
    version: Version,
    token: &tokio_util::sync::CancellationToken,
) -> Handled {
    token.cancel();
    ctx.stats.fits_timed_out.inc();
    let reason = format!(
        "placement did not finish within {:?}",
        ctx.config.fit_timeout
    );
    match ctx.store.mark_error(id, version, &reason).await {
        Ok(Some(t)) => {
            ctx.events.announce(&t);
            Handled::Done
        }
        Ok(None) => Handled::Done,
        Err(e) => transient(&e),
    }
}

#[allow(clippy::too_many_arguments)]
async fn place_until_settled(
    ctx: &Ctx,
    id: &str,
    seq: CmdSeq,
    version: Version,
    spec: &StartSpec,
    picked_at: SystemTime,
    token: &tokio_util::sync::CancellationToken,
) -> Settled {
    let request = match ctx.profiles.request(spec).await {
        Ok(r) => r,
        Err(reason) => {
            tracing::warn!(reason, "cannot work out what the instance needs");
            return Settled::Handled(match ctx.store.mark_error(id, version, &reason).await {
                Ok(Some(t)) => {
                    ctx.events.announce(&t);
                    Handled::Done
                }
                Ok(None) => Handled::Done,
                Err(e) => transient(&e),
            });
        }
    };
    let mut refreshed_for_no_fit = false;
    for attempt in 0..=ctx.config.max_refits {
        if !ctx.snapshot.is_loaded()
            && let Err(e) = ctx.snapshot.refresh(&ctx.store).await
        {
            return Settled::Handled(transient(&e));
        }
        ctx.stats.record_fit(id, seq, picked_at);
        let began = std::time::Instant::now();
        let searched = ctx
            .snapshot
            .fit(&request, ctx.config.policy, id, ctx.peers.lane(), &|| {
                token.is_cancelled()
            });
        let took = began.elapsed();
        ctx.stats.fit_seconds.0.observe(took.as_secs_f64());
        ctx.stats.sample_fit(took);
        let (placement, hold) = match searched {
            Ok(found) => found,
            Err(FitError::Cancelled) => {
                ctx.stats.record_cancel(id);
                return Settled::Cancelled;
            }
            Err(FitError::NoFit(_)) if !refreshed_for_no_fit => {
                // Before saying "nothing fits", look at the database's view: others may
                // have freed VRAM since our last refresh.
                refreshed_for_no_fit = true;
                if let Err(e) = ctx.snapshot.refresh_since(&ctx.store, began).await {
                    return Settled::Handled(transient(&e));
                }
                continue;
            }
            Err(FitError::NoFit(reason)) => {
                ctx.hooks.before_pending(id, version).await;
                return Settled::Handled(
                    settle_pending(ctx, id, seq, version, &request, &reason).await,
                );
            }
        };
        let shape = request
            .shapes
            .get(placement.shape)
            .map(|s| s.label.as_str())
            .unwrap_or_default();
        let outcome = commit(ctx, id, version, &request, &placement, token).await;
        match &outcome {
            Some(Ok(CommitOutcome::Committed(_))) => ctx.snapshot.settle(&hold),
            _ => ctx.snapshot.release(&hold),
        }
        match outcome {
            None => return Settled::Cancelled,
            Some(Ok(CommitOutcome::Committed(t))) => {
                ctx.stats.placements_committed.inc();
                if !shape.is_empty() {
                    tracing::info!(shape, workers = placement.parts.len(), "placed");
                }
                ctx.events.announce(&t);
                // If this fails the message is redelivered and the assignments sent again.
                return Settled::Handled(
                    match ctx.agents.assign(id, version, spec, &placement).await {
                        Ok(()) => Handled::Done,
                        Err(e) => {
                            tracing::warn!(%e, "cannot send assignment; will retry");
                            Handled::Retry
                        }
                    },
                );
            }
            Some(Ok(CommitOutcome::VersionMoved)) => {
                tracing::info!("instance moved on during the fit; placement dropped");
                ctx.stats.cas_conflicts.inc();
                return Settled::Handled(Handled::Done);
            }
            Some(Ok(CommitOutcome::CapacityGone { worker_id, gpu })) => {
                tracing::debug!(
                    attempt,
                    worker_id,
                    gpu,
                    "lost the GPU to another placement; refitting"
                );
                ctx.stats.capacity_conflicts.inc();
                ctx.stats.refits.inc();
                let workers: Vec<String> = placement
                    .parts
                    .iter()
                    .map(|p| p.worker_id.clone())
                    .collect();
                if let Err(e) = ctx.snapshot.refresh_workers(&ctx.store, &workers).await {
                    return Settled::Handled(transient(&e));
                }
            }
            Some(Err(e)) => return Settled::Handled(transient(&e)),
        }
    }
    let reason = format!(
        "lost the race for free VRAM {} times in a row; waiting for capacity",
        ctx.config.max_refits + 1
    );
    Settled::Handled(settle_pending(ctx, id, seq, version, &request, &reason).await)
}

/// The hook, the last cancellation check, and the CAS commit. `None`: cancelled.
async fn commit(
    ctx: &Ctx,
    id: &str,
    version: Version,
    request: &Request,
    placement: &Placement,
    token: &tokio_util::sync::CancellationToken,
) -> Option<Result<CommitOutcome, StoreError>> {
    // Whatever a test holds here is abandoned the moment a newer command arrives.
    tokio::select! {
        () = ctx.hooks.before_commit(id, version) => {}
        () = token.cancelled() => {}
    }
    if token.is_cancelled() {
        ctx.stats.record_cancel(id);
        return None;
    }
    let began = std::time::Instant::now();
    let claims: Vec<GpuClaim> = placement
        .parts
        .iter()
        .flat_map(|part| {
            part.gpus.iter().map(|slot| GpuClaim {
                worker_id: part.worker_id.clone(),
                idx: slot.index,
                bytes: to_i64(slot.bytes),
            })
        })
        .collect();
    // Grouped with the other commits in hand (see `grouped.rs`); each stays all or nothing.
    let committed = ctx
        .commits
        .call(PlacementCommit {
            id: id.to_owned(),
            version,
            claims,
            group: request.group.clone(),
        })
        .await
        .unwrap_or_else(|e| Err(StoreError::Group(e.to_string())));
    ctx.stats.sample_commit(began.elapsed());
    Some(committed)
}

/// Most placements in one grouped commit, and such statements in flight at once. One: the
/// placements decided while a commit runs go out together in the next, so a steady flow
/// still makes groups, where several slots gave each placement a statement of its own (at a
/// steady 1,000/s that cost PostgreSQL twice the CPU per placement, and the queueing that
/// followed tripled the p99).
const MAX_COMMIT_GROUP: usize = 64;
const COMMIT_GROUPS_IN_FLIGHT: usize = 1;

/// Commits placements in groups: one statement for the placements decided at the same
/// moment, each still checked and applied all or nothing.
pub fn spawn_commits(store: Store) -> Grouped<PlacementCommit, Result<CommitOutcome, StoreError>> {
    Grouped::spawn(
        MAX_COMMIT_GROUP,
        COMMIT_GROUPS_IN_FLIGHT,
        move |commits: Vec<PlacementCommit>| {
            let store = store.clone();
            async move {
                // Not retried here: a commit whose answer was lost may have landed, and only
                // the redelivered command (which finds it placed) can tell.
                match store.commit_many(&commits).await {
                    Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
                    Err(e) => {
                        let reason = e.to_string();
                        commits
                            .iter()
                            .map(|_| Err(StoreError::Group(reason.clone())))
                            .collect()
                    }
                }
            }
        },
    )
}

async fn settle_pending(
    ctx: &Ctx,
    id: &str,
    seq: CmdSeq,
    version: Version,
    request: &Request,
    reason: &str,
) -> Handled {
    match ctx.store.mark_pending(id, version, reason).await {
        Ok(Some(t)) => {
            ctx.stats.pending.inc();
            ctx.events.announce(&t);
            // Capacity may have freed between our view and this commit, and whoever freed it
            // did not see us pending yet: look once more on a view loaded after the commit.
            let committed = std::time::Instant::now();
            match ctx.snapshot.refresh_since(&ctx.store, committed).await {
                Ok(()) if ctx.snapshot.would_fit(request, ctx.config.policy) => {
                    crate::sweeper::republish(ctx, id, seq).await;
                }
                Ok(()) => {}
                Err(e) => tracing::warn!(%e, "cannot look again; the sweep will"),
            }
            Handled::Done
        }
        Ok(None) => {
            ctx.stats.cas_conflicts.inc();
            Handled::Done
        }
        Err(e) => transient(&e),
    }
}

fn transient(e: &StoreError) -> Handled {
    tracing::warn!(%e, "database error during placement; will retry");
    Handled::Retry
}
