//! Applying commands: a command takes effect only if its stream sequence is newer than the
//! instance's `cmd_seq`; each applied command bumps the instance's version.

use crate::{
    Store, StoreError, Transition,
    models::InstanceRow,
    schema::{allocations, instances},
};
use berth_proto::{CmdSeq, InstanceState, Version, lifecycle};
use diesel::prelude::*;
use diesel_async::{
    AsyncConnection, AsyncPgConnection, RunQueryDsl, pooled_connection::deadpool::Object,
};
use std::{
    cmp::Ordering,
    collections::{BTreeMap, HashMap, btree_map::Entry},
};

/// What applying a start did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartApplied {
    /// A newer command was already applied: nothing changed.
    Stale { current_seq: CmdSeq },
    /// Intent recorded: the instance is `analyzing` at `version`. `release_on` lists workers
    /// still holding an older placement of this instance: they must be told to stop it.
    Analyzing {
        transition: Transition,
        release_on: Vec<String>,
    },
    /// The instance already runs (or is being started) with exactly this spec: the command
    /// is recorded as applied and nothing else changes.
    Unchanged { version: Version },
    /// This very command was applied and placed before (a redelivery after a crash): the
    /// assignment may not have reached the agent, so send it again.
    AlreadyPlaced {
        version: Version,
        /// The leading worker (the first of several for a multi-worker placement).
        worker_id: String,
        /// Every GPU of the placement, ordered by worker and index.
        claims: Vec<crate::placement::GpuClaim>,
    },
}

/// What applying a stop did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopApplied {
    Stale {
        current_seq: CmdSeq,
    },
    /// Nothing was placed: the instance is `stopped` at once.
    Stopped(Transition),
    /// GPUs are held on these workers: the instance is `stopping` until their agents confirm.
    Stopping {
        transition: Transition,
        workers: Vec<String>,
    },
}

/// Records the starts that simply apply (new instances, or a newer command for one that is
/// not already running this very spec) in one statement; returns no row for an instance that
/// needs a closer look (stale, redelivered, or unchanged). One row per instance (the caller
/// sorts them by id, the row lock order, and keeps one command per instance, since one
/// statement cannot update a row twice). The arrays keep the text constant, so it is
/// prepared once.
pub(crate) const START_UPSERT_MANY: &str = "\
    INSERT INTO instances (id, spec, desired, state, cmd_seq, version) \
    SELECT t.id, t.spec, 'running', 'analyzing', t.seq, 1 \
    FROM unnest($1::text[], $2::jsonb[], $3::bigint[]) AS t(id, spec, seq) \
    ON CONFLICT (id) DO UPDATE SET spec = EXCLUDED.spec, desired = 'running', \
        state = 'analyzing', reason = NULL, cmd_seq = EXCLUDED.cmd_seq, \
        version = instances.version + 1, worker_id = NULL, updated_at = now() \
    WHERE instances.cmd_seq < EXCLUDED.cmd_seq \
      AND NOT (instances.state IN ('scheduled', 'starting', 'running') \
               AND instances.spec = EXCLUDED.spec) \
    RETURNING id, version, (xmax::text <> '0') AS existed";

/// A start command to record: instance, stream sequence, spec.
#[derive(Debug, Clone, PartialEq)]
pub struct StartIntent {
    pub id: String,
    pub seq: CmdSeq,
    pub spec: serde_json::Value,
}

impl Store {
    /// Records a start command with sequence `seq` for `id`.
    pub async fn apply_start(
        &self,
        id: &str,
        seq: CmdSeq,
        spec: serde_json::Value,
    ) -> Result<StartApplied, StoreError> {
        let intent = StartIntent {
            id: id.to_owned(),
            seq,
            spec,
        };
        let mut applied = self.apply_starts(std::slice::from_ref(&intent)).await?;
        applied
            .pop()
            .ok_or_else(|| StoreError::Corrupt(format!("no result for the start of {id}")))
    }

    /// Records many start commands: one statement for all that simply apply (new instances,
    /// newer commands), then the rest one by one as [`Store::apply_start`] would. Results
    /// come in the order of `intents`. Of several commands for one instance only the newest
    /// is applied; the older ones are `Stale`, as they would be once the newest is recorded.
    pub async fn apply_starts(
        &self,
        intents: &[StartIntent],
    ) -> Result<Vec<StartApplied>, StoreError> {
        let mut results: Vec<Option<StartApplied>> = vec![None; intents.len()];
        // The newest command per instance, in id order (the row lock order of every writer).
        let mut newest: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, intent) in intents.iter().enumerate() {
            match newest.entry(intent.id.as_str()) {
                Entry::Vacant(e) => {
                    e.insert(i);
                }
                Entry::Occupied(mut e) => {
                    let kept = *e.get();
                    let (older, newer) = match intents[kept].seq.cmp(&intent.seq) {
                        Ordering::Less => (kept, i),
                        Ordering::Greater => (i, kept),
                        // A second delivery of the same command: handled after the batch,
                        // one by one, like any redelivery.
                        Ordering::Equal => continue,
                    };
                    e.insert(newer);
                    results[older] = Some(StartApplied::Stale {
                        current_seq: intents[newer].seq,
                    });
                }
            }
        }
        let rows: Vec<&StartIntent> = newest.values().map(|&i| &intents[i]).collect();
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        let specs: Vec<&serde_json::Value> = rows.iter().map(|r| &r.spec).collect();
        let seqs: Vec<i64> = rows.iter().map(|r| r.seq.to_db()).collect();
        let mut conn = self.conn().await?;
        let upserted: Vec<(String, i64, bool)> = crate::prepared::StartUpsertMany {
            ids: &ids,
            specs: &specs,
            seqs: &seqs,
        }
        .load(&mut conn)
        .await?;
        // As in `apply_start`: a placement of an older version committed before the upsert
        // is visible to this later statement; one that did not will miss its CAS.
        let existed: Vec<&str> = upserted
            .iter()
            .filter(|(_, _, existed)| *existed)
            .map(|(id, _, _)| id.as_str())
            .collect();
        let mut holding: HashMap<String, Vec<String>> = HashMap::new();
        if !existed.is_empty() {
            let held: Vec<(String, String)> = allocations::table
                .filter(allocations::instance_id.eq_any(&existed))
                .select((allocations::instance_id, allocations::worker_id))
                .distinct()
                .order((allocations::instance_id, allocations::worker_id))
                .load(&mut conn)
                .await?;
            for (id, worker) in held {
                holding.entry(id).or_default().push(worker);
            }
        }
        for (id, version, _) in upserted {
            let Some(&i) = newest.get(id.as_str()) else {
                return Err(StoreError::Corrupt(format!("upsert returned unknown {id}")));
            };
            results[i] = Some(StartApplied::Analyzing {
                transition: analyzing(&id, intents[i].seq, Version::new(version)),
                release_on: holding.remove(&id).unwrap_or_default(),
            });
        }
        // What the statement left alone needs a look at the locked row.
        let mut out = Vec::with_capacity(intents.len());
        for (result, intent) in results.into_iter().zip(intents) {
            out.push(match result {
                Some(r) => r,
                None => start_closely(&mut conn, &intent.id, intent.seq, &intent.spec).await?,
            });
        }
        Ok(out)
    }

    /// Records a stop command with sequence `seq` for `id`, with an optional reason.
    pub async fn apply_stop(
        &self,
        id: &str,
        seq: CmdSeq,
        reason: Option<String>,
    ) -> Result<StopApplied, StoreError> {
        let reason = reason.as_deref().map(berth_proto::text::reason);
        let mut conn = self.conn().await?;
        let id = id.to_owned();
        (*conn)
            .transaction::<_, StoreError, _>(async |conn| {
                let created = lock_or_create(
                    conn,
                    &id,
                    seq,
                    "stopped",
                    "stopped",
                    None,
                    reason.as_deref(),
                )
                .await?;
                let Some(row) = created else {
                    return Ok(StopApplied::Stopped(Transition {
                        instance_id: id.clone(),
                        state: InstanceState::Stopped,
                        version: Version::FIRST,
                        cmd_seq: seq,
                        worker_id: None,
                        gpus: Vec::new(),
                        reason,
                        endpoint: None,
                    }));
                };
                let redo = row.cmd_seq == seq && row.state == InstanceState::Stopping.as_str();
                if !(row.cmd_seq < seq || redo) {
                    return Ok(StopApplied::Stale {
                        current_seq: row.cmd_seq,
                    });
                }
                let workers = holding_workers(conn, &id).await?;
                let state = lifecycle::after_stop(!workers.is_empty());
                let version = if redo {
                    row.version
                } else {
                    row.version.next()
                };
                diesel::update(instances::table.find(&id))
                    .set((
                        instances::desired.eq("stopped"),
                        instances::state.eq(state.as_str()),
                        instances::reason.eq(&reason),
                        instances::cmd_seq.eq(seq),
                        instances::version.eq(version),
                        instances::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(conn)
                    .await?;
                let transition = Transition {
                    instance_id: id.clone(),
                    state,
                    version,
                    cmd_seq: seq,
                    worker_id: row.worker_id,
                    gpus: Vec::new(),
                    reason,
                    endpoint: None,
                };
                Ok(if workers.is_empty() {
                    StopApplied::Stopped(transition)
                } else {
                    StopApplied::Stopping {
                        transition,
                        workers,
                    }
                })
            })
            .await
    }

    /// Records that command `seq` for `id` was invalid. An instance that holds nothing goes
    /// to `error` with the reason (and any fit in flight for it is invalidated). One that is
    /// placed keeps running as it was, with the rejection in its reason: a bad command must not
    /// hide a backend that still holds GPUs. `None` when a newer command was already applied.
    pub async fn apply_invalid(
        &self,
        id: &str,
        seq: CmdSeq,
        reason: &str,
    ) -> Result<Option<Transition>, StoreError> {
        let mut conn = self.conn().await?;
        let id = id.to_owned();
        let reason = berth_proto::text::reason(reason);
        (*conn)
            .transaction::<_, StoreError, _>(async |conn| {
                let created =
                    lock_or_create(conn, &id, seq, "stopped", "error", None, Some(&reason)).await?;
                let row = match created {
                    None => return Ok(Some(error_transition(&id, seq, Version::FIRST, reason))),
                    Some(row) if row.cmd_seq < seq => row,
                    Some(_) => return Ok(None),
                };
                if !holding_workers(conn, &id).await?.is_empty() {
                    let note =
                        berth_proto::text::reason(&format!("command {seq} rejected: {reason}"));
                    diesel::update(instances::table.find(&id))
                        .set((
                            instances::reason.eq(&note),
                            instances::cmd_seq.eq(seq),
                            instances::updated_at.eq(diesel::dsl::now),
                        ))
                        .execute(conn)
                        .await?;
                    let state = row
                        .state
                        .parse()
                        .map_err(|e| StoreError::Corrupt(format!("{e}")))?;
                    return Ok(Some(Transition {
                        instance_id: id.clone(),
                        state,
                        version: row.version,
                        cmd_seq: seq,
                        worker_id: row.worker_id,
                        gpus: Vec::new(),
                        reason: Some(note),
                        endpoint: None,
                    }));
                }
                diesel::update(instances::table.find(&id))
                    .set((
                        instances::state.eq(InstanceState::Error.as_str()),
                        instances::reason.eq(&reason),
                        instances::cmd_seq.eq(seq),
                        instances::version.eq(row.version.next()),
                        instances::updated_at.eq(diesel::dsl::now),
                    ))
                    .execute(conn)
                    .await?;
                Ok(Some(error_transition(&id, seq, row.version.next(), reason)))
            })
            .await
    }
}

/// The start rules on the locked row, for a command the one-statement upsert left alone
/// (stale, redelivered, unchanged, or already placed).
async fn start_closely(
    conn: &mut Object<AsyncPgConnection>,
    id: &str,
    seq: CmdSeq,
    spec: &serde_json::Value,
) -> Result<StartApplied, StoreError> {
    let id = id.to_owned();
    (**conn)
        .transaction::<_, StoreError, _>(async |conn| {
            let Some(row) =
                lock_or_create(conn, &id, seq, "running", "analyzing", Some(spec), None).await?
            else {
                return Ok(StartApplied::Analyzing {
                    transition: analyzing(&id, seq, Version::FIRST),
                    release_on: Vec::new(),
                });
            };
            if row.cmd_seq == seq && row.state == InstanceState::Scheduled.as_str() {
                return already_placed(conn, &row).await;
            }
            let state = row.lifecycle_state()?;
            if !(row.cmd_seq < seq || (row.cmd_seq == seq && lifecycle::REDO.contains(&state))) {
                return Ok(StartApplied::Stale {
                    current_seq: row.cmd_seq,
                });
            }
            let placed = lifecycle::is_placed(state);
            if row.cmd_seq < seq && placed && row.spec.as_ref() == Some(spec) {
                diesel::update(instances::table.find(&id))
                    .set(instances::cmd_seq.eq(seq))
                    .execute(conn)
                    .await?;
                return Ok(StartApplied::Unchanged {
                    version: row.version,
                });
            }
            let version = row.version.next();
            diesel::update(instances::table.find(&id))
                .set((
                    instances::spec.eq(Some(spec)),
                    instances::desired.eq("running"),
                    instances::state.eq(InstanceState::Analyzing.as_str()),
                    instances::reason.eq(None::<String>),
                    instances::cmd_seq.eq(seq),
                    instances::version.eq(version),
                    instances::worker_id.eq(None::<String>),
                    instances::updated_at.eq(diesel::dsl::now),
                ))
                .execute(conn)
                .await?;
            Ok(StartApplied::Analyzing {
                transition: analyzing(&id, seq, version),
                release_on: holding_workers(conn, &id).await?,
            })
        })
        .await
}

fn error_transition(id: &str, seq: CmdSeq, version: Version, reason: String) -> Transition {
    Transition {
        instance_id: id.to_owned(),
        state: InstanceState::Error,
        version,
        cmd_seq: seq,
        worker_id: None,
        gpus: Vec::new(),
        reason: Some(reason),
        endpoint: None,
    }
}

fn analyzing(id: &str, seq: CmdSeq, version: Version) -> Transition {
    Transition {
        instance_id: id.to_owned(),
        state: InstanceState::Analyzing,
        version,
        cmd_seq: seq,
        worker_id: None,
        gpus: Vec::new(),
        reason: None,
        endpoint: None,
    }
}

/// Creates the instance in `state` at version 1 if it does not exist (returns `None`), or
/// locks its row and returns it. Either way the caller holds the row until commit.
async fn lock_or_create(
    conn: &mut AsyncPgConnection,
    id: &str,
    seq: CmdSeq,
    desired: &str,
    state: &str,
    spec: Option<&serde_json::Value>,
    reason: Option<&str>,
) -> Result<Option<InstanceRow>, StoreError> {
    let inserted = diesel::insert_into(instances::table)
        .values((
            instances::id.eq(id),
            instances::spec.eq(spec),
            instances::reason.eq(reason),
            instances::desired.eq(desired),
            instances::state.eq(state),
            instances::cmd_seq.eq(seq),
            instances::version.eq(Version::FIRST),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    if inserted == 1 {
        return Ok(None);
    }
    let row = instances::table
        .find(id)
        .select(InstanceRow::as_select())
        .for_update()
        .first(conn)
        .await?;
    Ok(Some(row))
}

/// Workers holding GPUs for `id`, from any version. Runs after the row lock, so it sees every
/// placement committed for the instance.
async fn holding_workers(
    conn: &mut AsyncPgConnection,
    id: &str,
) -> Result<Vec<String>, StoreError> {
    Ok(allocations::table
        .filter(allocations::instance_id.eq(id))
        .select(allocations::worker_id)
        .distinct()
        .order(allocations::worker_id)
        .load(conn)
        .await?)
}

async fn already_placed(
    conn: &mut AsyncPgConnection,
    row: &InstanceRow,
) -> Result<StartApplied, StoreError> {
    let worker_id = row.worker_id.clone().ok_or_else(|| {
        StoreError::Corrupt(format!("scheduled instance {} has no worker", row.id))
    })?;
    Ok(StartApplied::AlreadyPlaced {
        version: row.version,
        worker_id,
        claims: crate::placement::claims_at(conn, &row.id, row.version).await?,
    })
}
