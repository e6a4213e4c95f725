//! Queries for the sweeper: what waits, what is stuck, which workers went quiet.

pub use crate::eviction::Evicted;
use crate::{
    InstanceRow, Store, StoreError,
    eviction::{self, Why},
    schema::{allocations, instances, workers},
};
use berth_proto::{InstanceState, lifecycle};
use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};
use std::time::Duration;

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

    /// The GPUs `id`'s placement at `version` holds, ordered by worker and index.
    pub async fn claims(
        &self,
        id: &str,
        version: berth_proto::Version,
    ) -> Result<Vec<crate::placement::GpuClaim>, StoreError> {
        let mut conn = self.conn().await?;
        crate::placement::claims_at(&mut conn, id, version).await
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

    /// Takes `id` off `worker_id`, which is gone: see [`eviction::evict`].
    pub async fn evict(&self, worker_id: &str, id: &str) -> Result<Evicted, StoreError> {
        let mut conn = self.conn().await?;
        (*conn)
            .transaction::<_, StoreError, _>(async |conn| {
                eviction::evict(conn, worker_id, id, Why::Silent).await
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
