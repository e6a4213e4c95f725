//! Taking an instance off a worker that can no longer hold it: the worker went silent for
//! good, or it came back with less GPU memory than berth had reserved there.

use crate::{
    InstanceRow, StoreError, Transition,
    reports::{Upto, holds_any, release},
    schema::instances,
};
use berth_proto::{InstanceState, lifecycle};
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

/// An instance taken off a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evicted {
    pub transition: Option<Transition>,
    /// The instance should be placed again (its start command republished).
    pub replace: bool,
}

/// Why an instance leaves a worker: said in its reason.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Why {
    /// No heartbeat for longer than the sweeper's limit.
    Silent,
    /// The worker registered again with GPU `gpu` holding `capacity` bytes for berth, or
    /// without it (`None`), less than berth had reserved there.
    Shrank { gpu: i32, capacity: Option<i64> },
}

impl Why {
    fn reason(self, worker_id: &str, placing_again: bool) -> String {
        let cause = match self {
            Why::Silent => format!("worker {worker_id} stopped answering"),
            Why::Shrank {
                gpu,
                capacity: Some(bytes),
            } => format!(
                "worker {worker_id} registered again with {:.1} GiB for berth on GPU {gpu}, \
                 less than it held",
                bytes as f64 / (1u64 << 30) as f64
            ),
            Why::Shrank {
                gpu,
                capacity: None,
            } => format!("worker {worker_id} registered again without GPU {gpu}"),
        };
        if placing_again {
            format!("{cause}; placing again")
        } else {
            format!("{cause}; its GPUs were released")
        }
    }
}

/// Takes `id` off `worker_id` in the caller's transaction: its allocations there are
/// released; if it was placed there it goes back to `pending` to be placed again; if it was
/// stopping and holds nothing else, it is `stopped`. Locks the instance row first (the
/// crate's lock order).
pub(crate) async fn evict(
    conn: &mut AsyncPgConnection,
    worker_id: &str,
    id: &str,
    why: Why,
) -> Result<Evicted, StoreError> {
    let row: InstanceRow = instances::table
        .find(id)
        .select(InstanceRow::as_select())
        .for_update()
        .first(conn)
        .await?;
    let freed = release(conn, id, worker_id, Upto::All).await?;
    // Placed here: the current placement had this worker, as its only or as one of several
    // (then the other parts are stopped when it is placed again).
    let placed_there = row.worker_id.as_deref() == Some(worker_id)
        || freed.iter().any(|a| a.version == row.version);
    let current = row.lifecycle_state()?;
    let holds_more = holds_any(conn, id).await?;
    let Some(state) = lifecycle::after_worker_lost(current, placed_there, holds_more) else {
        return Ok(Evicted {
            transition: None,
            replace: false,
        });
    };
    let replace = state == InstanceState::Pending;
    let reason = why.reason(worker_id, replace);
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
        replace,
    })
}
