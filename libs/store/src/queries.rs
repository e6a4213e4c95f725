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
        let mut conn = self.conn().await?;
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

    pub async fn allocations(&self) -> Result<Vec<AllocationRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(allocations::table
            .select(AllocationRow::as_select())
            .order((allocations::instance_id, allocations::gpu_idx))
            .load(&mut conn)
            .await?)
    }

    pub async fn gpus(&self) -> Result<Vec<GpuRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(gpus::table
            .select(GpuRow::as_select())
            .order((gpus::worker_id, gpus::idx))
            .load(&mut conn)
            .await?)
    }

    /// GPUs reserved past their capacity, or whose reserved total differs from the sum of
    /// their allocations. Empty when the books are right.
    pub async fn gpu_violations(&self) -> Result<Vec<GpuViolation>, StoreError> {
        let gpus = self.gpus().await?;
        let allocs = self.allocations().await?;
        let mut out = Vec::new();
        for g in gpus {
            let held: i64 = allocs
                .iter()
                .filter(|a| a.worker_id == g.worker_id && a.gpu_idx == g.idx)
                .map(|a| a.bytes)
                .sum();
            if g.reserved_bytes + g.system_reserved_bytes > g.total_bytes {
                out.push(GpuViolation {
                    worker_id: g.worker_id.clone(),
                    idx: g.idx,
                    what: format!(
                        "reserved {} + system {} > total {}",
                        g.reserved_bytes, g.system_reserved_bytes, g.total_bytes
                    ),
                });
            }
            if held != g.reserved_bytes {
                out.push(GpuViolation {
                    worker_id: g.worker_id,
                    idx: g.idx,
                    what: format!("reserved {} but allocations sum to {held}", g.reserved_bytes),
                });
            }
        }
        Ok(out)
    }
}
