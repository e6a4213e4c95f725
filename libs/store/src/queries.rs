//! Reads for the CLI, the tests and the invariant checks.

use crate::{
    GpuRow, InstanceRow, Store, StoreError,
    models::AllocationRow,
    schema::{allocations, gpus, instances},
};
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

/// A GPU whose bookkeeping breaks an invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuViolation {
    pub worker_id: String,
    pub idx: i32,
    pub what: String,
}

impl Store {
    pub async fn instances(&self) -> Result<Vec<InstanceRow>, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(instances::table
            .select(InstanceRow::as_select())
            .order(instances::id)
            .load(&mut conn)
            .await?)
    }

    pub async fn instance(&self, id: &str) -> Result<Option<InstanceRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(instances::table
            .find(id)
            .select(InstanceRow::as_select())
            .first(&mut conn)
            .await
            .optional()?)
    }

    /// How many instances are in each state.
    pub async fn count_by_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(instances::table
            .group_by(instances::state)
            .select((instances::state, diesel::dsl::count_star()))
            .load(&mut conn)
            .await?)
    }

    pub async fn allocations(&self) -> Result<Vec<AllocationRow>, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(allocations::table
            .select(AllocationRow::as_select())
            .order((allocations::instance_id, allocations::gpu_idx))
            .load(&mut conn)
            .await?)
    }

    pub async fn gpus(&self) -> Result<Vec<GpuRow>, StoreError> {
        let mut conn = self.scan_conn().await?;
        Ok(gpus::table
            .select(GpuRow::as_select())
            .order((gpus::worker_id, gpus::idx))
            .load(&mut conn)
            .await?)
    }

    /// GPUs reserved past their capacity, or whose reserved total differs from the sum of
    /// their allocations. Empty when the books are right. One statement, so one snapshot.
    pub async fn gpu_violations(&self) -> Result<Vec<GpuViolation>, StoreError> {
        let mut conn = self.scan_conn().await?;
        let rows: Vec<GpuBooks> = diesel::sql_query(
            "SELECT g.worker_id, g.idx, g.total_bytes, g.system_reserved_bytes, g.reserved_bytes, \
                    COALESCE(SUM(a.bytes), 0)::BIGINT AS allocated \
             FROM gpus g LEFT JOIN allocations a ON a.worker_id = g.worker_id AND a.gpu_idx = g.idx \
             GROUP BY g.worker_id, g.idx \
             HAVING g.reserved_bytes + g.system_reserved_bytes > g.total_bytes \
                 OR g.reserved_bytes <> COALESCE(SUM(a.bytes), 0) \
             ORDER BY g.worker_id, g.idx",
        )
        .load(&mut conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| GpuViolation {
                what: format!(
                    "reserved {} + system {} of total {}; allocations sum to {}",
                    r.reserved_bytes, r.system_reserved_bytes, r.total_bytes, r.allocated
                ),
                worker_id: r.worker_id,
                idx: r.idx,
            })
            .collect())
    }
}

#[derive(QueryableByName)]
struct GpuBooks {
    #[diesel(sql_type = diesel::sql_types::Text)]
    worker_id: String,
    #[diesel(sql_type = diesel::sql_types::Integer)]
    idx: i32,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    total_bytes: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    system_reserved_bytes: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    reserved_bytes: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    allocated: i64,
}
