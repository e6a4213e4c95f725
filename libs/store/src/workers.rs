//! Registrations: a worker and its GPUs, checked against the books. A worker that comes back
//! with less memory than berth reserved on it gives up the instances that no longer fit
//! before its new sizes are written, so no GPU is ever over capacity, not even for a moment.

use crate::{
    Store, StoreError,
    eviction::{self, Evicted, Why},
    schema::{allocations, gpus, workers},
};
use berth_proto::GpuInfo;
use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use std::collections::BTreeMap;

/// A registration that changes a GPU under berth's reservations can race a placement that
/// committed on the old sizes; the registration then reconciles again, this many times.
const ATTEMPTS: usize = 3;

/// What a registration did beyond recording the worker.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Instances taken off the worker because their GPUs shrank or went away: announce each
    /// transition, stop what still runs of them on the worker, and place them again.
    pub evicted: Vec<(String, Evicted)>,
    /// GPU rows of silent workers that held nothing and whose UUIDs this worker now reports
    /// (the GPU moved, or the worker was renamed): removed.
    pub taken_over: Vec<String>,
}

impl Store {
    /// Records a worker and its GPUs (insert or update; reservations are kept where they still
    /// fit). A GPU that now has less room for berth than is reserved on it, or that the worker
    /// no longer reports, first gives up the instances holding it, largest first, until what
    /// remains fits. A GPU UUID registered by another worker that answers, or that holds
    /// reservations, is refused ([`StoreError::Invalid`]): one GPU is never counted twice.
    pub async fn register_worker(
        &self,
        worker_id: &str,
        labels: &BTreeMap<String, String>,
        gpu_list: &[GpuInfo],
    ) -> Result<Registered, StoreError> {
        let labels = serde_json::to_value(labels)
            .map_err(|e| StoreError::Corrupt(format!("labels: {e}")))?;
        let mut wanted = Vec::with_capacity(gpu_list.len());
        for g in gpu_list {
            let idx = i32::try_from(g.index)
                .map_err(|_| StoreError::Invalid(format!("GPU index {} is too large", g.index)))?;
            wanted.push((idx, g));
        }
        let mut conn = self.conn().await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let done = (*conn)
                .transaction::<_, StoreError, _>(async |conn| {
                    register(conn, worker_id, &labels, &wanted).await
                })
                .await;
            match done {
                Err(e) if attempt < ATTEMPTS && is_overcommit(&e) => {
                    tracing::info!(
                        worker_id,
                        attempt,
                        "a placement committed on the old GPU sizes; reconciling again"
                    );
                }
                done => return done,
            }
        }
    }
}

fn is_overcommit(e: &StoreError) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    matches!(
        e,
        StoreError::Db(Error::DatabaseError(DatabaseErrorKind::CheckViolation, info))
            if info.constraint_name() == Some("gpus_no_overcommit")
    )
}

async fn register(
    conn: &mut AsyncPgConnection,
    worker_id: &str,
    labels: &serde_json::Value,
    wanted: &[(i32, &GpuInfo)],
) -> Result<Registered, StoreError> {
    diesel::insert_into(workers::table)
        .values((
            workers::id.eq(worker_id),
            workers::labels.eq(labels),
            workers::schedulable.eq(true),
        ))
        .on_conflict(workers::id)
        .do_update()
        .set((
            workers::labels.eq(labels),
            workers::schedulable.eq(true),
            workers::last_heartbeat.eq(diesel::dsl::now),
        ))
        .execute(conn)
        .await?;
    let taken_over = claim_uuids(conn, worker_id, wanted).await?;
    let evicted = make_room(conn, worker_id, wanted).await?;
    for (idx, g) in wanted {
        diesel::insert_into(gpus::table)
            .values((
                gpus::worker_id.eq(worker_id),
                gpus::idx.eq(idx),
                gpus::name.eq(&g.name),
                gpus::uuid.eq(&g.uuid),
                gpus::total_bytes.eq(g.total_bytes),
                gpus::system_reserved_bytes.eq(g.system_reserved_bytes),
            ))
            .on_conflict((gpus::worker_id, gpus::idx))
            .do_update()
            .set((
                gpus::name.eq(excluded(gpus::name)),
                gpus::uuid.eq(excluded(gpus::uuid)),
                gpus::total_bytes.eq(excluded(gpus::total_bytes)),
                gpus::system_reserved_bytes.eq(excluded(gpus::system_reserved_bytes)),
            ))
            .execute(conn)
            .await?;
    }
    // GPUs the worker no longer reports go; whatever held them was evicted above.
    let present: Vec<i32> = wanted.iter().map(|(idx, _)| *idx).collect();
    diesel::delete(
        gpus::table
            .filter(gpus::worker_id.eq(worker_id))
            .filter(gpus::idx.ne_all(present)),
    )
    .execute(conn)
    .await?;
    Ok(Registered {
        evicted,
        taken_over,
    })
}

/// Checks that no other worker has registered one of these GPU UUIDs. A silent worker's GPU
/// that holds nothing is handed over (its row removed); any other is a refusal.
async fn claim_uuids(
    conn: &mut AsyncPgConnection,
    worker_id: &str,
    wanted: &[(i32, &GpuInfo)],
) -> Result<Vec<String>, StoreError> {
    let uuids: Vec<&str> = wanted
        .iter()
        .map(|(_, g)| g.uuid.as_str())
        .filter(|u| !u.is_empty())
        .collect();
    if uuids.is_empty() {
        return Ok(Vec::new());
    }
    let elsewhere: Vec<(String, i32, String, i64, bool)> = gpus::table
        .inner_join(workers::table)
        .filter(gpus::uuid.eq_any(&uuids))
        .filter(gpus::worker_id.ne(worker_id))
        .select((
            gpus::worker_id,
            gpus::idx,
            gpus::uuid,
            gpus::reserved_bytes,
            workers::schedulable,
        ))
        .for_update()
        .load(conn)
        .await?;
    if let Some((other, _, uuid, _, _)) = elsewhere
        .iter()
        .find(|(_, _, _, reserved, answers)| *answers || *reserved > 0)
    {
        return Err(StoreError::Invalid(format!(
            "GPU {uuid} is registered by worker {other}; a GPU belongs to one worker"
        )));
    }
    let mut taken_over = Vec::new();
    for (other, idx, uuid, _, _) in elsewhere {
        diesel::delete(gpus::table.find((&other, idx)))
            .execute(conn)
            .await?;
        taken_over.push(format!("{uuid} from worker {other}"));
    }
    Ok(taken_over)
}

/// Evicts instances from the worker's GPUs that will have less room for berth than is
/// reserved on them (or will not exist), largest holder first, until the rest fits.
async fn make_room(
    conn: &mut AsyncPgConnection,
    worker_id: &str,
    wanted: &[(i32, &GpuInfo)],
) -> Result<Vec<(String, Evicted)>, StoreError> {
    let room: BTreeMap<i32, i64> = wanted
        .iter()
        .map(|(idx, g)| (*idx, g.total_bytes - g.system_reserved_bytes))
        .collect();
    // Read without locks: eviction locks each instance row before its allocations and GPUs
    // (the crate's lock order). A placement that commits meanwhile makes the GPU update
    // below fail its CHECK, and the registration runs again.
    let mut reserved: BTreeMap<i32, i64> = gpus::table
        .filter(gpus::worker_id.eq(worker_id))
        .select((gpus::idx, gpus::reserved_bytes))
        .load(conn)
        .await?
        .into_iter()
        .collect();
    let over = |reserved: &BTreeMap<i32, i64>| -> Option<i32> {
        reserved
            .iter()
            .find(|(idx, held)| **held > room.get(idx).copied().unwrap_or(0))
            .map(|(idx, _)| *idx)
    };
    if over(&reserved).is_none() {
        return Ok(Vec::new());
    }
    let held: Vec<(String, i32, i64)> = allocations::table
        .filter(allocations::worker_id.eq(worker_id))
        .select((
            allocations::instance_id,
            allocations::gpu_idx,
            allocations::bytes,
        ))
        .load(conn)
        .await?;
    let mut chosen: BTreeMap<String, Why> = BTreeMap::new();
    while let Some(gpu) = over(&reserved) {
        // The largest holder of the GPU not chosen yet frees the most with one move.
        let Some((id, _, _)) = held
            .iter()
            .filter(|(id, idx, _)| *idx == gpu && !chosen.contains_key(id))
            .max_by_key(|(id, _, bytes)| (*bytes, std::cmp::Reverse(id.clone())))
        else {
            // Nothing left to evict: the books disagree with themselves; the CHECK below
            // refuses the sizes rather than write an overcommit.
            break;
        };
        for (_, idx, bytes) in held.iter().filter(|(other, _, _)| other == id) {
            if let Some(r) = reserved.get_mut(idx) {
                *r -= bytes;
            }
        }
        chosen.insert(
            id.clone(),
            Why::Shrank {
                gpu,
                capacity: room.get(&gpu).copied(),
            },
        );
    }
    // In id order: two registrations evicting the same instances lock them alike.
    let mut evicted = Vec::with_capacity(chosen.len());
    for (id, why) in chosen {
        let out = eviction::evict(conn, worker_id, &id, why).await?;
        evicted.push((id, out));
    }
    Ok(evicted)
}
