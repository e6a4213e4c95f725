//! Reading free capacity and committing placements.

use crate::{
    GpuRow, Store, StoreError, Transition, WorkerRow,
    models::AllocationRow,
    schema::{allocations, gpus, instances, workers},
};
use berth_proto::InstanceState;
use diesel::prelude::*;
use diesel_async::{AsyncConnection, RunQueryDsl};

/// The outcome of a placement commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed(Transition),
    /// The instance moved past the version the placement was computed for: nothing written.
    VersionMoved,
    /// Another placement took the room on this GPU first: nothing written; refit.
    CapacityGone {
        worker_id: String,
        gpu: u32,
    },
}

impl Store {
    /// Every worker with its GPUs, ordered by worker id then GPU index.
    pub async fn capacity(&self) -> Result<Vec<(WorkerRow, Vec<GpuRow>)>, StoreError> {
        let mut conn = self.conn().await?;
        let ws: Vec<WorkerRow> = workers::table
            .select(WorkerRow::as_select())
            .order(workers::id)
            .load(&mut conn)
            .await?;
        let gs: Vec<GpuRow> = gpus::table
            .select(GpuRow::as_select())
            .order((gpus::worker_id, gpus::idx))
            .load(&mut conn)
            .await?;
        let mut out: Vec<(WorkerRow, Vec<GpuRow>)> =
            ws.into_iter().map(|w| (w, Vec::new())).collect();
        let mut at = 0;
        for g in gs {
            while at < out.len() && out[at].0.id < g.worker_id {
                at += 1;
            }
            if let Some((w, list)) = out.get_mut(at)
                && w.id == g.worker_id
            {
                list.push(g);
            }
        }
        Ok(out)
    }

    /// Commits a placement computed for `version` of `id`: in one transaction, the version
    /// check, a conditional reservation on each GPU, and the allocations. Any miss rolls the
    /// whole transaction back.
    pub async fn commit_placement(
        &self,
        id: &str,
        version: i64,
        worker_id: &str,
        gpu_idxs: &[u32],
        bytes_per_gpu: i64,
    ) -> Result<CommitOutcome, StoreError> {
        let mut sorted: Vec<u32> = gpu_idxs.to_vec();
        sorted.sort_unstable();
        let idxs = sorted
            .iter()
            .map(|&g| i32::try_from(g))
            .collect::<Result<Vec<i32>, _>>()
            .map_err(|_| StoreError::Corrupt(format!("GPU index out of range in {gpu_idxs:?}")))?;
        let mut conn = self.conn().await?;
        let result = (*conn)
            .transaction::<_, TxError, _>(async |conn| {
                // The CAS first: it takes the instance row lock, same order as commands.
                let cmd_seq: i64 = diesel::update(
                    instances::table
                        .find(id)
                        .filter(instances::version.eq(version))
                        .filter(instances::state.eq(InstanceState::Analyzing.as_str())),
                )
                .set((
                    instances::state.eq(InstanceState::Scheduled.as_str()),
                    instances::worker_id.eq(worker_id),
                    instances::reason.eq(None::<String>),
                    instances::updated_at.eq(diesel::dsl::now),
                ))
                .returning(instances::cmd_seq)
                .get_result(conn)
                .await
                .optional()?
                .ok_or(TxError::Abort(CommitOutcome::VersionMoved))?;
                for (&gpu, &idx) in sorted.iter().zip(&idxs) {
                    let reserved = diesel::update(
                        gpus::table.find((worker_id, idx)).filter(
                            (gpus::reserved_bytes + bytes_per_gpu + gpus::system_reserved_bytes)
                                .le(gpus::total_bytes),
                        ),
                    )
                    .set(gpus::reserved_bytes.eq(gpus::reserved_bytes + bytes_per_gpu))
                    .execute(conn)
                    .await?;
                    if reserved != 1 {
                        return Err(TxError::Abort(CommitOutcome::CapacityGone {
                            worker_id: worker_id.to_owned(),
                            gpu,
                        }));
                    }
                }
                let rows: Vec<AllocationRow> = idxs
                    .iter()
                    .map(|&gpu_idx| AllocationRow {
                        instance_id: id.to_owned(),
                        worker_id: worker_id.to_owned(),
                        gpu_idx,
                        version,
                        bytes: bytes_per_gpu,
                    })
                    .collect();
                diesel::insert_into(allocations::table)
                    .values(&rows)
                    .execute(conn)
                    .await?;
                Ok(Transition {
                    instance_id: id.to_owned(),
                    state: InstanceState::Scheduled,
                    version,
                    cmd_seq,
                    worker_id: Some(worker_id.to_owned()),
                    gpus: sorted.clone(),
                    reason: None,
                })
            })
            .await;
        match result {
            Ok(t) => Ok(CommitOutcome::Committed(t)),
            Err(TxError::Abort(outcome)) => Ok(outcome),
            Err(TxError::Store(e)) => Err(e),
        }
    }

    /// Moves `id` from `analyzing` at `version` to `pending` with `reason`. `None` when the
    /// instance moved on meanwhile.
    pub async fn mark_pending(
        &self,
        id: &str,
        version: i64,
        reason: &str,
    ) -> Result<Option<Transition>, StoreError> {
        self.finish_analysis(id, version, InstanceState::Pending, reason)
            .await
    }

    /// Moves `id` from `analyzing` at `version` to `error` with `reason`.
    pub async fn mark_error(
        &self,
        id: &str,
        version: i64,
        reason: &str,
    ) -> Result<Option<Transition>, StoreError> {
        self.finish_analysis(id, version, InstanceState::Error, reason)
            .await
    }

    async fn finish_analysis(
        &self,
        id: &str,
        version: i64,
        state: InstanceState,
        reason: &str,
    ) -> Result<Option<Transition>, StoreError> {
        let mut conn = self.conn().await?;
        let seq: Option<i64> = diesel::update(
            instances::table
                .find(id)
                .filter(instances::version.eq(version))
                .filter(instances::state.eq(InstanceState::Analyzing.as_str())),
        )
        .set((
            instances::state.eq(state.as_str()),
            instances::reason.eq(reason),
            instances::updated_at.eq(diesel::dsl::now),
        ))
        .returning(instances::cmd_seq)
        .get_result(&mut conn)
        .await
        .optional()?;
        Ok(seq.map(|cmd_seq| Transition {
            instance_id: id.to_owned(),
            state,
            version,
            cmd_seq,
            worker_id: None,
            gpus: Vec::new(),
            reason: Some(reason.to_owned()),
        }))
    }
}

/// Inside the commit transaction: an abort rolls back and reports the outcome set before it.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error("placement not committed: {0:?}")]
    Abort(CommitOutcome),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<diesel::result::Error> for TxError {
    fn from(e: diesel::result::Error) -> Self {
        TxError::Store(StoreError::Db(e))
    }
}
