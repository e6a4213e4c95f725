//! Agent reports: registrations, heartbeats, and instance status.

use crate::grouped::Grouped;
use crate::{
    context::Ctx,
    intake::{Handled, pull_loop},
};
use async_nats::jetstream::{Message, consumer::PullConsumer};
use berth_proto::{StatusMsg, Version, status::ReportedState};
use berth_retry::{RetryPolicy, retry};
use berth_store::{
    Store, StoreError, Transition,
    reports::{Forward, Report},
    workers::Registered,
};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Most reports in one grouped statement, and such statements in flight at once (one, as
/// for commits: see `placing::COMMIT_GROUPS_IN_FLIGHT`).
const MAX_GROUP: usize = 256;
const GROUPS_IN_FLIGHT: usize = 1;

/// A group of forward reports could not be applied (already logged); each is redelivered.
#[derive(Debug, Clone, Copy)]
pub struct NotApplied;

pub type Forwarded = Result<Option<Transition>, NotApplied>;

/// Applies `starting`/`running` reports of single-worker placements in groups.
pub fn spawn_forwards(store: Store) -> Grouped<Forward, Forwarded> {
    Grouped::spawn(MAX_GROUP, GROUPS_IN_FLIGHT, move |reports: Vec<Forward>| {
        let store = store.clone();
        async move {
            let applied = retry(
                "apply reports",
                RetryPolicy::QUICK,
                StoreError::is_transient,
                || store.forward_reports(&reports),
            )
            .await;
            match applied {
                Ok(moved) => moved.into_iter().map(Ok).collect(),
                Err(e) => {
                    tracing::warn!(%e, n = reports.len(), "cannot apply reports; they will be redelivered");
                    vec![Err(NotApplied); reports.len()]
                }
            }
        }
    })
}

pub async fn run(ctx: Arc<Ctx>, consumer: PullConsumer, shutdown: CancellationToken) {
    let concurrency = ctx.config.concurrency;
    pull_loop("reports", consumer, concurrency, shutdown, move |msg| {
        let ctx = ctx.clone();
        // Decoded here, as the messages come in, so each takes its instance's place in line
        // in arrival order.
        let report = checked_report(&msg.subject, &msg.payload);
        let turn = match &report {
            Ok(StatusMsg::Instance { instance_id, .. }) => Some(ctx.report_order.take(instance_id)),
            _ => None,
        };
        async move {
            let mut turn = turn;
            if let Some(t) = turn.as_mut() {
                t.wait().await;
            }
            handle(&ctx, &msg, report).await
        }
    })
    .await;
}

/// A backend runs a placement that is not the instance's current one on this worker (an
/// agent restarted and forgot a stop, or a stop and an assignment crossed): tell the agent to
/// stop it. An unassign stops versions below the one it names, so `version + 1` can never
/// touch a newer placement on that worker.
async fn fence_if_stale(
    ctx: &Ctx,
    worker_id: &str,
    id: &str,
    version: Version,
) -> Result<(), berth_store::StoreError> {
    if ctx.store.is_placed_on(id, worker_id, version).await? {
        return Ok(());
    }
    tracing::info!(
        worker_id,
        %version,
        "a backend runs a stale placement; stopping it"
    );
    ctx.stats.stale_reports_fenced.inc();
    let _ = ctx
        .agents
        .unassign(id, version.next(), &[worker_id.to_owned()])
        .await;
    Ok(())
}

/// After a registration that took instances off the worker (its GPUs shrank or went away):
/// each change is announced, what still runs of them there and on other workers is stopped,
/// and the sweeper's wake-up places them again.
async fn reconciled(ctx: &Ctx, worker_id: &str, registered: Registered) {
    for moved in &registered.taken_over {
        tracing::warn!(worker_id, moved, "GPU taken over from a silent worker");
    }
    for (id, evicted) in registered.evicted {
        ctx.stats.evictions.inc();
        let Some(t) = &evicted.transition else {
            continue;
        };
        tracing::warn!(
            instance_id = id,
            version = t.version.get(),
            worker_id,
            reason = t.reason.as_deref().unwrap_or_default(),
            "instance no longer fits its worker"
        );
        ctx.events.announce(t);
        // An unassign stops versions below the one it names: the placement that was here,
        // never a newer one made meanwhile.
        let _ = ctx
            .agents
            .unassign(&id, t.version.next(), &[worker_id.to_owned()])
            .await;
        if evicted.replace {
            crate::sweeper::stop_stranded(ctx, &id, t.version).await;
        }
    }
}

/// Decodes a report and checks it against its subject: an agent speaks only for the worker
/// its subject names (the server's permissions say who may publish there).
fn checked_report(subject: &str, payload: &[u8]) -> Result<StatusMsg, String> {
    let report = StatusMsg::decode(payload)?;
    match berth_proto::subjects::worker_of_status_subject(subject) {
        Some(worker) if worker == report.worker_id() => Ok(report),
        _ => Err(format!(
            "report about worker {:?} sent on {subject:?}",
            report.worker_id()
        )),
    }
}

async fn handle(ctx: &Ctx, msg: &Message, report: Result<StatusMsg, String>) -> Handled {
    let report = match report {
        Ok(r) => r,
        Err(why) => {
            tracing::warn!(subject = %msg.subject, why, "dropping agent report");
            ctx.stats.reports_rejected.inc();
            return Handled::Done;
        }
    };
    let result = match &report {
        StatusMsg::Register {
            worker_id,
            labels,
            gpus,
        } => match ctx.store.register_worker(worker_id, labels, gpus).await {
            Ok(registered) => {
                tracing::info!(worker_id, gpus = gpus.len(), "worker registered");
                reconciled(ctx, worker_id, registered).await;
                ctx.wake.notify_one();
                Ok(())
            }
            Err(StoreError::Invalid(why)) => {
                tracing::warn!(worker_id, why, "registration refused");
                ctx.stats.reports_rejected.inc();
                Ok(())
            }
            Err(e) => Err(e),
        },
        StatusMsg::Heartbeat { worker_id, usage } => {
            match ctx.store.heartbeat(worker_id, usage).await {
                Ok(Some(beat)) => {
                    if beat.back {
                        tracing::info!(worker_id, "worker answers again: schedulable");
                    }
                    if beat.back || beat.freed {
                        // Capacity came back: pending instances may fit now.
                        ctx.wake.notify_one();
                    }
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            }
        }
        StatusMsg::Instance {
            worker_id,
            instance_id,
            version,
            state,
            reason,
            shared,
            endpoint,
            restarts,
        } => {
            let span =
                tracing::info_span!("report", instance_id, version = version.get(), worker_id);
            let _enter = span.enter();
            let applied =
                if !*shared && matches!(state, ReportedState::Starting | ReportedState::Running) {
                    // The common case, one step forward on one worker: grouped with the others.
                    let forward = Forward {
                        worker_id: worker_id.clone(),
                        instance_id: instance_id.clone(),
                        version: *version,
                        state: *state,
                        endpoint: endpoint.clone(),
                        restarts: *restarts,
                        reason: reason.clone(),
                    };
                    match ctx.forwards.call(forward).await {
                        Ok(Ok(moved)) => Ok(moved.into_iter().collect()),
                        Ok(Err(NotApplied)) | Err(_) => return Handled::Retry,
                    }
                } else {
                    ctx.store
                        .apply_report(&Report {
                            worker_id,
                            instance_id,
                            version: *version,
                            state: *state,
                            reason: reason.as_deref(),
                            shared: *shared,
                            endpoint: endpoint.as_deref(),
                            restarts: *restarts,
                        })
                        .await
                };
            match applied {
                Ok(transitions) => {
                    for t in &transitions {
                        ctx.stats.reports_applied.inc();
                        ctx.events.announce(t);
                        if *shared && t.state == berth_proto::InstanceState::Error {
                            // One stage failed: the others stop too and give their GPUs back
                            // (an unassign stops versions below the one it names).
                            // Best effort: the sweep stops stranded stages it finds later.
                            crate::sweeper::stop_stranded(ctx, instance_id, t.version).await;
                        }
                    }
                    if matches!(state, ReportedState::Stopped | ReportedState::Error) {
                        // GPUs were released: pending instances may fit now.
                        ctx.wake.notify_one();
                    }
                    if transitions.is_empty()
                        && matches!(state, ReportedState::Starting | ReportedState::Running)
                    {
                        fence_if_stale(ctx, worker_id, instance_id, *version).await
                    } else {
                        Ok(())
                    }
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => Handled::Done,
        Err(e) if e.is_transient() => {
            ctx.store_health.failed();
            tracing::warn!(%e, "report not applied; will retry");
            Handled::Retry
        }
        Err(e) => {
            tracing::error!(%e, ?report, "report rejected");
            Handled::Done
        }
    }
}
