//! Reading free capacity and committing placements.

use crate::{
    GpuRow, Store, StoreError, Transition, WorkerRow,
    schema::{gpus, instances, workers},
};
use berth_proto::InstanceState;
use diesel::prelude::*;
use diesel_async::RunQueryDsl;

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
        let (cmd_seq, committed, full, present): CommitRow = crate::prepared::Commit {
            id,
            version,
            worker_id,
            idxs: &idxs,
            bytes: bytes_per_gpu,
        }
        .get_result(&mut conn)
        .await?;
        let done = CommitResult {
            cmd_seq,
            committed,
            full,
            present,
        };
        let Some(cmd_seq) = done.cmd_seq else {
            return Ok(CommitOutcome::VersionMoved);
        };
        if !done.committed {
            let full = done.full.unwrap_or_default();
            let gpu = sorted
                .iter()
                .zip(&idxs)
                .find(|(_, i)| {
                    full.contains(i) || !done.present.as_ref().is_some_and(|p| p.contains(i))
                })
                .map_or(
                    sorted.iter().copied().next().unwrap_or_default(),
                    |(g, _)| *g,
                );
            return Ok(CommitOutcome::CapacityGone {
                worker_id: worker_id.to_owned(),
                gpu,
            });
        }
        Ok(CommitOutcome::Committed(Transition {
            instance_id: id.to_owned(),
            state: InstanceState::Scheduled,
            version,
            cmd_seq,
            worker_id: Some(worker_id.to_owned()),
            gpus: sorted,
            reason: None,
        }))
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

/// The placement commit, one statement and so one atomic step without a transaction
/// block; see [`Store::commit_placement`]. Locks the instance row (the CAS), then the GPU
/// rows in index order, checks every GPU has room on its latest version, and only then
/// changes anything: all or nothing. `$4` is the GPU index array.
pub(crate) const COMMIT: &str = "\
    WITH inst AS ( \
        SELECT cmd_seq FROM instances \
        WHERE id = $1 AND version = $2 AND state = 'analyzing' FOR UPDATE \
    ), g AS ( \
        SELECT idx, reserved_bytes + $5 + system_reserved_bytes <= total_bytes AS room \
        FROM gpus WHERE worker_id = $3 AND idx = ANY($4) AND EXISTS (SELECT 1 FROM inst) \
        ORDER BY idx FOR UPDATE \
    ), ok AS ( \
        SELECT EXISTS (SELECT 1 FROM inst) \
           AND (SELECT count(*) FROM g WHERE room) = cardinality($4::int[]) AS go \
    ), cas AS ( \
        UPDATE instances SET state = 'scheduled', worker_id = $3, reason = NULL, \
            updated_at = now() \
        FROM ok WHERE ok.go AND id = $1 \
        RETURNING 1 \
    ), res AS ( \
        UPDATE gpus SET reserved_bytes = reserved_bytes + $5 \
        FROM ok WHERE ok.go AND worker_id = $3 AND idx = ANY($4) \
        RETURNING idx \
    ), ins AS ( \
        INSERT INTO allocations (instance_id, worker_id, gpu_idx, version, bytes) \
        SELECT $1, $3, idx, $2, $5 FROM res \
        RETURNING 1 \
    ) \
    SELECT (SELECT cmd_seq FROM inst) AS cmd_seq, \
           (SELECT go FROM ok) AS committed, \
           (SELECT array_agg(idx) FROM g WHERE NOT room) AS full, \
           (SELECT array_agg(idx) FROM g) AS present";

type CommitRow = (Option<i64>, bool, Option<Vec<i32>>, Option<Vec<i32>>);

struct CommitResult {
    cmd_seq: Option<i64>,
    committed: bool,
    full: Option<Vec<i32>>,
    present: Option<Vec<i32>>,
}
