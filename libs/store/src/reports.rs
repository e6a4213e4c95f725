//! What agents tell us: registrations, heartbeats and instance status.

use crate::{
    Store, StoreError, Transition,
    models::{AllocationRow, InstanceRow},
    schema::{allocations, gpus, instances, workers},
};
use berth_proto::{CmdSeq, GpuUsage, InstanceState, Version, lifecycle, status::ReportedState};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use std::collections::BTreeMap;

/// A `starting` or `running` report of a placement on one worker; see
/// [`Store::forward_reports`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub worker_id: String,
    pub instance_id: String,
    pub version: Version,
    /// `Starting` or `Running` (anything else counts as `Running`).
    pub state: ReportedState,
    /// Where the server answers, with `Running`.
    pub endpoint: Option<String>,
    /// Times the agent restarted this placement's server.
    pub restarts: u32,
    /// Why, with a restart: how the server failed (exit code, last log lines).
    pub reason: Option<String>,
}

fn forward_state(reported: ReportedState) -> InstanceState {
    if reported == ReportedState::Starting {
        InstanceState::Starting
    } else {
        InstanceState::Running
    }
}

/// Many `starting`/`running` reports in one statement; `$1`..`$4` are parallel arrays
/// (instance id, version, worker, target state), one row per placement. The rows are locked
/// in id order first, like every writer that locks several instances, so two groups never
/// deadlock; the update then checks each row again on its latest version. Every row is
/// reached through its key (a lateral lookup, `= ANY`), so the plan, made once per
/// connection, stays a few index probes however much the table has grown since.
pub(crate) const FORWARD_MANY: &str = "\
    WITH f AS ( \
        SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::text[], \
                             $6::int[], $7::text[]) \
            AS f(id, version, worker_id, to_state, endpoint, restarts, reason) \
    ), locked AS ( \
        SELECT l.id FROM (SELECT * FROM f ORDER BY id) s CROSS JOIN LATERAL ( \
            SELECT i.id FROM instances i \
            WHERE i.id = s.id AND i.version = s.version AND i.worker_id = s.worker_id \
              AND s.restarts >= i.restarts AND (i.state = 'scheduled' \
                OR (i.state = 'starting' AND s.to_state = 'running') \
                OR (s.to_state = 'starting' AND s.restarts > i.restarts \
                    AND i.state IN ('starting', 'running'))) \
            FOR UPDATE \
        ) l \
    ) \
    UPDATE instances i SET state = f.to_state, reason = f.reason, endpoint = f.endpoint, \
        restarts = f.restarts, updated_at = now() \
    FROM f \
    WHERE i.id = ANY (ARRAY(SELECT id FROM locked)) AND i.id = f.id \
      AND i.version = f.version AND i.worker_id = f.worker_id \
      AND f.restarts >= i.restarts AND (i.state = 'scheduled' \
        OR (i.state = 'starting' AND f.to_state = 'running') \
        OR (f.to_state = 'starting' AND f.restarts > i.restarts \
            AND i.state IN ('starting', 'running'))) \
    RETURNING i.id, i.version, i.worker_id, i.cmd_seq";

/// An agent's report about one instance; see [`Store::apply_report`].
#[derive(Debug, Clone, Copy)]
pub struct Report<'a> {
    pub worker_id: &'a str,
    pub instance_id: &'a str,
    pub version: Version,
    pub state: ReportedState,
    pub reason: Option<&'a str>,
    /// One part of an instance spread over several workers.
    pub shared: bool,
    /// Where the server answers, with `Running`.
    pub endpoint: Option<&'a str>,
    /// Times the agent restarted this placement's server.
    pub restarts: u32,
}

impl<'a> Report<'a> {
    /// A report with no reason, endpoint or restart, from one worker.
    pub fn new(
        worker_id: &'a str,
        instance_id: &'a str,
        version: Version,
        state: ReportedState,
    ) -> Self {
        Report {
            worker_id,
            instance_id,
            version,
            state,
            reason: None,
            shared: false,
            endpoint: None,
            restarts: 0,
        }
    }
}

/// What a heartbeat changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The worker had been marked unreachable: its capacity is back.
    pub back: bool,
    /// Memory used outside berth went down on some GPU: more room than before.
    pub freed: bool,
}

impl Store {
    /// Notes that `worker_id` is alive and schedulable again, and records the memory its
    /// GPUs have in use outside berth (`usage`, when the agent reports it). `None` for a
    /// worker that never registered. One transaction: a heartbeat cut off by a failover
    /// leaves nothing of itself, and the next one is recorded whole.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        usage: &[GpuUsage],
    ) -> Result<Option<Beat>, StoreError> {
        // GPU rows are locked in index order, as a placement commit locks them.
        let mut usage: Vec<(i32, i64)> = usage
            .iter()
            .filter_map(|u| {
                let used = u64::try_from(u.used_outside_bytes).ok()?;
                Some((
                    i32::try_from(u.index).ok()?,
                    i64::try_from(used).unwrap_or(i64::MAX),
                ))
            })
            .collect();
        usage.sort_unstable();
        let mut conn = self.conn().await?;
        (*conn)
            .transaction::<_, StoreError, _>(async |conn| {
                let was: Option<bool> = workers::table
                    .find(worker_id)
                    .select(workers::schedulable)
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?;
                let Some(was_schedulable) = was else {
                    return Ok(None);
                };
                diesel::update(workers::table.find(worker_id))
                    .set((
                        workers::last_heartbeat.eq(diesel::dsl::now),
                        workers::schedulable.eq(true),
                    ))
                    .execute(conn)
                    .await?;
                let mut beat = Beat {
                    back: !was_schedulable,
                    freed: false,
                };
                if usage.is_empty() {
                    return Ok(Some(beat));
                }
                let known: Vec<(i32, i64, i64)> = gpus::table
                    .filter(gpus::worker_id.eq(worker_id))
                    .select((gpus::idx, gpus::used_outside_bytes, gpus::total_bytes))
                    .load(conn)
                    .await?;
                for &(idx, used) in &usage {
                    let Some(&(_, old, total)) = known.iter().find(|(i, _, _)| *i == idx) else {
                        continue;
                    };
                    // No GPU has more in use than it has: a larger figure is a broken or
                    // hostile agent, and would keep the GPU out of service even after it is
                    // corrected.
                    let used = used.min(total);
                    if old == used {
                        continue;
                    }
                    beat.freed |= used < old;
                    diesel::update(gpus::table.find((worker_id, idx)))
                        .set(gpus::used_outside_bytes.eq(used))
                        .execute(conn)
                        .await?;
                }
                Ok(Some(beat))
            })
            .await
    }

    /// Applies many `starting`/`running` reports of single-worker placements in one
    /// statement: the common case of [`Store::apply_report`], which moves only the instance
    /// row forward. Answers in the order of `reports`: the transition made, or `None` when
    /// the report changed nothing (not the current placement on that worker, or not a step
    /// forward). Of the same report twice, or `starting` and `running` of one placement in
    /// one group, only the furthest step is applied; the others answer `None`, as they
    /// would once it is.
    pub async fn forward_reports(
        &self,
        reports: &[Forward],
    ) -> Result<Vec<Option<Transition>>, StoreError> {
        // One row per placement, in instance id order (the row lock order of every writer).
        let key = |r: &Forward| (r.instance_id.clone(), r.version, r.worker_id.clone());
        let mut chosen: BTreeMap<(String, Version, String), usize> = BTreeMap::new();
        for (i, r) in reports.iter().enumerate() {
            chosen
                .entry(key(r))
                .and_modify(|k| {
                    // The furthest step: the latest restart, then running over starting.
                    let rank = |f: &Forward| (f.restarts, f.state == ReportedState::Running);
                    if rank(r) >= rank(&reports[*k]) {
                        *k = i;
                    }
                })
                .or_insert(i);
        }
        let rows: Vec<&Forward> = chosen.values().map(|&i| &reports[i]).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.instance_id.as_str()).collect();
        let versions: Vec<i64> = rows.iter().map(|r| r.version.get()).collect();
        let workers: Vec<&str> = rows.iter().map(|r| r.worker_id.as_str()).collect();
        let states: Vec<&str> = rows
            .iter()
            .map(|r| forward_state(r.state).as_str())
            .collect();
        let endpoints: Vec<Option<&str>> = rows.iter().map(|r| r.endpoint.as_deref()).collect();
        let restarts: Vec<i32> = rows
            .iter()
            .map(|r| i32::try_from(r.restarts).unwrap_or(i32::MAX))
            .collect();
        // Agents copy reasons from server logs: one line, bounded.
        let reasons: Vec<Option<String>> = rows
            .iter()
            .map(|r| r.reason.as_deref().map(berth_proto::text::reason))
            .collect();
        let reasons: Vec<Option<&str>> = reasons.iter().map(Option::as_deref).collect();
        let mut conn = self.conn().await?;
        let moved: Vec<(String, i64, String, i64)> = crate::prepared::ForwardMany {
            ids: &ids,
            versions: &versions,
            workers: &workers,
            states: &states,
            endpoints: &endpoints,
            restarts: &restarts,
            reasons: &reasons,
        }
        .load(&mut conn)
        .await?;
        let moved: BTreeMap<(String, Version, String), CmdSeq> = moved
            .into_iter()
            .map(|(id, version, worker, cmd_seq)| {
                (
                    (id, Version::new(version), worker),
                    CmdSeq::from_db(cmd_seq),
                )
            })
            .collect();
        Ok(reports
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let k = key(r);
                if chosen.get(&k) != Some(&i) {
                    return None;
                }
                Some(Transition {
                    instance_id: r.instance_id.clone(),
                    state: forward_state(r.state),
                    version: r.version,
                    cmd_seq: *moved.get(&k)?,
                    worker_id: Some(r.worker_id.clone()),
                    gpus: Vec::new(),
                    reason: r.reason.clone(),
                    endpoint: r.endpoint.clone(),
                })
            })
            .collect())
    }

    /// Applies an agent's report about `id`. Reports name the version they were given and
    /// move the instance only along the lifecycle (a late `starting` after `running` is
    /// ignored), so reordered or old reports are harmless. `stopped` and `error` release the
    /// reporting worker's allocations of older versions (`stopped`) or up to this version
    /// (`error`). A `shared` report comes from one of several workers an instance is
    /// spread over: that part is marked ready, and the instance runs once every part is,
    /// at the endpoint its leading worker reported (the others' are their stages' servers).
    /// Returns the transitions made.
    pub async fn apply_report(&self, report: &Report<'_>) -> Result<Vec<Transition>, StoreError> {
        let Report {
            worker_id,
            instance_id: id,
            version,
            state: reported,
            reason,
            shared,
            endpoint,
            restarts,
        } = *report;
        // On one worker, `starting` and `running` touch only the instance row: the grouped
        // forward statement, with one report.
        if !shared && matches!(reported, ReportedState::Starting | ReportedState::Running) {
            let forward = Forward {
                worker_id: worker_id.to_owned(),
                instance_id: id.to_owned(),
                version,
                state: reported,
                endpoint: endpoint.map(str::to_owned),
                restarts,
                reason: reason.map(str::to_owned),
            };
            return Ok(self
                .forward_reports(std::slice::from_ref(&forward))
                .await?
                .into_iter()
                .flatten()
                .collect());
        }
        // Agents copy reasons from server logs: one line, bounded.
        let reason = reason.map(berth_proto::text::reason);
        let mut conn = self.conn().await?;
        (*conn)
            .transaction::<_, StoreError, _>(async |conn| {
                let Some(row) = instances::table
                    .find(id)
                    .select(InstanceRow::as_select())
                    .for_update()
                    .first(conn)
                    .await
                    .optional()?
                else {
                    return Ok(Vec::new());
                };
                let current = version == row.version
                    && if shared {
                        holds_at(conn, id, worker_id, version).await?
                    } else {
                        row.worker_id.as_deref() == Some(worker_id)
                    };
                let state = row.lifecycle_state()?;
                // Restarts are counted per worker; an instance spread over several is not
                // restarted part by part (a failed stage fails the instance).
                let restarts = lifecycle::Restarts::Same;
                let mut out = Vec::new();
                match reported {
                    ReportedState::Starting | ReportedState::Running => {
                        let next =
                            lifecycle::after_report(state, reported, restarts).filter(|_| current);
                        // Reports of one instance serialize on its row lock, so the last
                        // part to report `running` sees every other part ready.
                        let all_ready = reported == ReportedState::Starting
                            || !shared
                            || (next.is_some()
                                && all_ready_after(conn, id, worker_id, version).await?);
                        // The instance answers at its leader's endpoint (the followers' are
                        // their stages' RPC servers).
                        let leads = row.worker_id.as_deref() == Some(worker_id);
                        let endpoint =
                            endpoint.filter(|_| leads && reported == ReportedState::Running);
                        if let Some(next) = next.filter(|_| all_ready) {
                            out.push(set_state(conn, &row, next, None, endpoint).await?);
                        }
                    }
                    // A stop is confirmed at the version its unassign named: the instance's
                    // (a stop) or one past a stale placement's (a fence), never beyond the
                    // next version, so a forged version cannot free the current placement.
                    ReportedState::Stopped if version <= row.version.next() => {
                        release(conn, id, worker_id, Upto::Before(version)).await?;
                    }
                    ReportedState::Stopped => {}
                    // A failure is of a placement berth made: none lies past the current one.
                    ReportedState::Error if version > row.version => {}
                    ReportedState::Error => {
                        release(conn, id, worker_id, Upto::Through(version)).await?;
                        if let Some(next) =
                            lifecycle::after_report(state, reported, restarts).filter(|_| current)
                        {
                            let why = reason.as_deref().unwrap_or("backend failed");
                            out.push(set_state(conn, &row, next, Some(why), None).await?);
                        }
                    }
                }
                if state == InstanceState::Stopping
                    && let Some(next) = lifecycle::after_release(state, holds_any(conn, id).await?)
                {
                    out.push(set_state(conn, &row, next, row.reason.as_deref(), None).await?);
                }
                Ok(out)
            })
            .await
    }
}

async fn set_state(
    conn: &mut AsyncPgConnection,
    row: &InstanceRow,
    state: InstanceState,
    reason: Option<&str>,
    endpoint: Option<&str>,
) -> Result<Transition, StoreError> {
    diesel::update(instances::table.find(&row.id))
        .set((
            instances::state.eq(state.as_str()),
            instances::reason.eq(reason),
            instances::endpoint.eq(endpoint),
            instances::updated_at.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
    Ok(Transition {
        instance_id: row.id.clone(),
        state,
        version: row.version,
        cmd_seq: row.cmd_seq,
        worker_id: row.worker_id.clone(),
        gpus: Vec::new(),
        reason: reason.map(str::to_owned),
        endpoint: endpoint.map(str::to_owned),
    })
}

/// Which versions of an instance's allocations a report releases.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Upto {
    /// Every version: the worker is gone.
    All,
    /// Older than this version: a stop confirmed under version v ends placements before v.
    Before(Version),
    /// Up to and including it: a failed backend ends its own placement too.
    Through(Version),
}

/// Deletes the instance's allocations on `worker_id` selected by `upto` and gives their VRAM
/// back to the GPUs.
pub(crate) async fn release(
    conn: &mut AsyncPgConnection,
    id: &str,
    worker_id: &str,
    upto: Upto,
) -> Result<Vec<AllocationRow>, StoreError> {
    let mine = allocations::table
        .filter(allocations::instance_id.eq(id))
        .filter(allocations::worker_id.eq(worker_id));
    let freed: Vec<AllocationRow> = match upto {
        Upto::All => {
            diesel::delete(mine)
                .returning(AllocationRow::as_returning())
                .get_results(conn)
                .await?
        }
        Upto::Before(v) => {
            diesel::delete(mine.filter(allocations::version.lt(v)))
                .returning(AllocationRow::as_returning())
                .get_results(conn)
                .await?
        }
        Upto::Through(v) => {
            diesel::delete(mine.filter(allocations::version.le(v)))
                .returning(AllocationRow::as_returning())
                .get_results(conn)
                .await?
        }
    };
    let mut sorted = freed.clone();
    sorted.sort_by_key(|a| a.gpu_idx);
    for a in &sorted {
        diesel::update(gpus::table.find((&a.worker_id, a.gpu_idx)))
            .set(gpus::reserved_bytes.eq(gpus::reserved_bytes - a.bytes))
            .execute(conn)
            .await?;
    }
    Ok(freed)
}

impl Store {
    /// Whether `worker_id` runs `id`'s current placement at `version` (as its only worker or
    /// one of several). A backend reporting anything else runs something berth no longer
    /// wants there.
    pub async fn is_placed_on(
        &self,
        id: &str,
        worker_id: &str,
        version: Version,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn().await?;
        let row: Option<(Version, String, Option<String>)> = instances::table
            .find(id)
            .select((instances::version, instances::state, instances::worker_id))
            .first(&mut conn)
            .await
            .optional()?;
        let Some((current, state, leader)) = row else {
            return Ok(false);
        };
        if current != version || !lifecycle::is_placed(crate::models::parse_state(&state)?) {
            return Ok(false);
        }
        if leader.as_deref() == Some(worker_id) {
            return Ok(true);
        }
        holds_at(&mut conn, id, worker_id, version).await
    }
}

/// Whether `worker_id` holds GPUs for `id` at `version`.
async fn holds_at(
    conn: &mut AsyncPgConnection,
    id: &str,
    worker_id: &str,
    version: Version,
) -> Result<bool, StoreError> {
    Ok(diesel::select(diesel::dsl::exists(
        allocations::table
            .filter(allocations::instance_id.eq(id))
            .filter(allocations::worker_id.eq(worker_id))
            .filter(allocations::version.eq(version)),
    ))
    .get_result(conn)
    .await?)
}

/// Marks `worker_id`'s part of `id` at `version` ready; true when every part now is.
async fn all_ready_after(
    conn: &mut AsyncPgConnection,
    id: &str,
    worker_id: &str,
    version: Version,
) -> Result<bool, StoreError> {
    let at_version = || {
        allocations::table
            .filter(allocations::instance_id.eq(id))
            .filter(allocations::version.eq(version))
    };
    diesel::update(at_version().filter(allocations::worker_id.eq(worker_id)))
        .set(allocations::ready.eq(true))
        .execute(conn)
        .await?;
    let waiting: bool = diesel::select(diesel::dsl::exists(
        at_version().filter(allocations::ready.eq(false)),
    ))
    .get_result(conn)
    .await?;
    Ok(!waiting)
}

pub(crate) async fn holds_any(conn: &mut AsyncPgConnection, id: &str) -> Result<bool, StoreError> {
    Ok(diesel::select(diesel::dsl::exists(
        allocations::table.filter(allocations::instance_id.eq(id)),
    ))
    .get_result(conn)
    .await?)
}
