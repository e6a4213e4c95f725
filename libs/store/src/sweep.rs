//! Queries for the sweeper: what waits, what is stuck, which workers went quiet.

use crate::{
    InstanceRow, Store, StoreError, Transition,
    reports::{Upto, holds_any, release},
    schema::{allocations, instances, workers},
};
use berth_proto::{InstanceState, lifecycle};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use std::time::Duration;

/// An instance taken off a worker that went away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub transition: Option<Transition>,
    /// The instance should be placed again (its start command republished).
    pub replace: bool,
}

fn ago(d: Duration) -> DateTime<Utc> {
    Utc::now() - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Store {
    /// Instances in `state`, least recently changed first.
    pub async fn instances_in(
        &self,
        state: InstanceState,
        limit: i64,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(instances::table
            .filter(instances::state.eq(state.as_str()))
            .order(instances::updated_at)
            .limit(limit)
            .select(InstanceRow::as_select())
            .load(&mut conn)
            .await?)
    }

    /// Instances in one of `states` whose last change is older than `older_than`.
    pub async fn stuck(
        &self,
        states: &[InstanceState],
        older_than: Duration,
        limit: i64,
    ) -> Result<Vec<InstanceRow>, StoreError> {
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        let mut conn = self.scan_conn().await?;
        Ok(instances::table
            .filter(instances::state.eq_any(names))
            .filter(instances::updated_at.lt(ago(older_than)))
            .order(instances::updated_at)
            .limit(limit)
            .select(InstanceRow::as_select())
            .load(&mut conn)
            .await?)
    }

    /// Workers still holding GPUs for `id`.
    pub async fn holders(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(allocations::table
            .filter(allocations::instance_id.eq(id))
            .select(allocations::worker_id)
            .distinct()
            .load(&mut conn)
            .await?)
    }

    /// Marks schedulable workers whose last heartbeat is older than `silent_for` as not
    /// schedulable; returns their ids.
    pub async fn mark_unreachable(&self, silent_for: Duration) -> Result<Vec<String>, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(diesel::update(
            workers::table
                .filter(workers::schedulable.eq(true))
                .filter(workers::last_heartbeat.lt(ago(silent_for))),
        )
        .set(workers::schedulable.eq(false))
        .returning(workers::id)
        .get_results(&mut conn)
        .await?)
    }

    /// Workers silent for longer than `gone_after` that still hold GPUs for some instance.
    pub async fn gone_workers(&self, gone_after: Duration) -> Result<Vec<String>, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(workers::table
            .inner_join(allocations::table.on(allocations::worker_id.eq(workers::id)))
            .filter(workers::schedulable.eq(false))
            .filter(workers::last_heartbeat.lt(ago(gone_after)))
            .select(workers::id)
            .distinct()
            .load(&mut conn)
            .await?)
    }

    /// Takes `id` off `worker_id`, which is gone: its allocations there are released; if it
    /// was placed there it goes back to `pending` to be placed again; if it was stopping and
    /// holds nothing else, it is `stopped`.
    pub async fn evict(&self, worker_id: &str, id: &str) -> Result<Evicted, StoreError> {
        let mut conn = self.conn().await?;
        (*conn)
            .transaction::<_, StoreError, _>(async |conn| {
                let row: InstanceRow = instances::table
                    .find(id)
                    .select(InstanceRow::as_select())
                    .for_update()
                    .first(conn)
                    .await?;
                let freed = release(conn, id, worker_id, Upto::All).await?;
                // Placed here: the current placement had this worker, as its only or as one
                // of several (then the other parts are stopped when it is placed again).
                let placed_there = row.worker_id.as_deref() == Some(worker_id)
                    || freed.iter().any(|a| a.version == row.version);
                let current = row.lifecycle_state()?;
                let holds_more = holds_any(conn, id).await?;
                let (state, reason) =
                    match lifecycle::after_worker_lost(current, placed_there, holds_more) {
                        Some(InstanceState::Pending) => (
                            InstanceState::Pending,
                            format!("worker {worker_id} stopped answering; placing again"),
                        ),
                        Some(next) => (
                            next,
                            format!("worker {worker_id} stopped answering; its GPUs were released"),
                        ),
                        None => {
                            return Ok(Evicted {
                                transition: None,
                                replace: false,
                            });
                        }
                    };
                let placed_here = state == InstanceState::Pending;
                diesel::update(instances::table.find(id))
                    .set((
                        instances::state.eq(state.as_str()),
                        instances::reason.eq(&reason),
                        instances::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(conn)
                    .await?;
                Ok(Evicted {
                    transition: Some(Transition {
                        instance_id: id.to_owned(),
                        state,
                        version: row.version,
                        cmd_seq: row.cmd_seq,
                        worker_id: row.worker_id.clone(),
                        gpus: Vec::new(),
                        reason: Some(reason),
                        endpoint: None,
                    }),
                    replace: placed_here,
                })
            })
            .await
    }

    /// Instances that hold GPUs at their current version although they are not placed
    /// (`pending`, `error`, `stopped`): stages of a multi-worker placement left behind when
    /// another stage failed or went silent. `(id, version)`, at most `limit`.
    pub async fn stranded(
        &self,
        limit: i64,
    ) -> Result<Vec<(String, berth_proto::Version)>, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(instances::table
            .filter(instances::state.eq_any(lifecycle::UNPLACED_AT_REST.map(InstanceState::as_str)))
            .filter(diesel::dsl::exists(
                allocations::table
                    .filter(allocations::instance_id.eq(instances::id))
                    .filter(allocations::version.eq(instances::version)),
            ))
            .select((instances::id, instances::version))
            .limit(limit)
            .load(&mut conn)
            .await?)
    }

    /// Instances holding GPUs on `worker_id`.
    pub async fn instances_on(&self, worker_id: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(allocations::table
            .filter(allocations::worker_id.eq(worker_id))
            .select(allocations::instance_id)
            .distinct()
            .load(&mut conn)
            .await?)
    }
}
