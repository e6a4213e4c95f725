//! Reading free capacity and committing placements.

use crate::{
    GpuRow, Store, StoreError, Transition, WorkerRow,
    models::AllocationRow,
    schema::{allocations, gpus, instances, workers},
};
use berth_proto::{CmdSeq, InstanceState, Version};
use diesel::{
    dsl::sql,
    prelude::*,
    sql_types::{BigInt, Bool, Nullable, Text},
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use std::collections::{BTreeMap, HashMap, btree_map::Entry};

/// Workers and GPUs read in one snapshot; see [`Store::capacity_since`].
#[derive(Debug, Clone)]
pub struct CapacityRead {
    /// The snapshot this read saw, as `pg_snapshot` text: the `since` of the next read.
    pub snapshot: String,
    /// Ordered by id.
    pub workers: Vec<WorkerRow>,
    /// Ordered by worker id, then index.
    pub gpus: Vec<GpuRow>,
    /// Rows in each table at this snapshot (not only the ones read).
    pub worker_count: i64,
    pub gpu_count: i64,
}

impl CapacityRead {
    /// Each worker read with the GPUs read for it, ordered by worker id then GPU index.
    pub fn grouped(self) -> Vec<(WorkerRow, Vec<GpuRow>)> {
        let mut out: Vec<(WorkerRow, Vec<GpuRow>)> =
            self.workers.into_iter().map(|w| (w, Vec::new())).collect();
        let mut at = 0;
        for g in self.gpus {
            while at < out.len() && out[at].0.id < g.worker_id {
                at += 1;
            }
            if let Some((w, list)) = out.get_mut(at)
                && w.id == g.worker_id
            {
                list.push(g);
            }
        }
        out
    }
}

#[derive(QueryableByName)]
struct ReplicaCountRow {
    #[diesel(sql_type = Text)]
    worker_id: String,
    #[diesel(sql_type = Text)]
    replica_group: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

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
        let read = self.capacity_since(None).await?;
        Ok(read.grouped())
    }

    /// The workers and GPUs, all of them (`since` = `None`) or only the rows written by
    /// transactions that the snapshot `since` (an earlier read's [`CapacityRead::snapshot`])
    /// could not see: what changed since that read, committed or in flight then. Read in one
    /// snapshot, with the number of rows each table has now, so a reader can tell that rows
    /// were deleted (what it holds, with the changes applied, is more than there is).
    pub async fn capacity_since(&self, since: Option<&str>) -> Result<CapacityRead, StoreError> {
        let since = since.map(str::to_owned);
        let mut conn = self.scan_conn().await?;
        conn.build_transaction()
            .repeatable_read()
            .read_only()
            .run::<_, StoreError, _>(async |conn| {
                let snapshot: String = diesel::select(sql::<Text>("pg_current_snapshot()::text"))
                    .get_result(conn)
                    .await?;
                // Every row for a first read; else the rows `since` could not see.
                let changed = |since: &Option<String>| {
                    sql::<Bool>("(")
                        .bind::<Nullable<Text>, _>(since.clone())
                        .sql("::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(changed_xid, ")
                        .bind::<Nullable<Text>, _>(since.clone())
                        .sql("::pg_snapshot))")
                };
                let workers: Vec<WorkerRow> = workers::table
                    .filter(changed(&since))
                    .select(WorkerRow::as_select())
                    .order(workers::id)
                    .load(conn)
                    .await?;
                let gpus: Vec<GpuRow> = gpus::table
                    .filter(changed(&since))
                    .select(GpuRow::as_select())
                    .order((gpus::worker_id, gpus::idx))
                    .load(conn)
                    .await?;
                let (worker_count, gpu_count): (i64, i64) = diesel::select((
                    sql::<BigInt>("(SELECT count(*) FROM workers)"),
                    sql::<BigInt>("(SELECT count(*) FROM gpus)"),
                ))
                .get_result(conn)
                .await?;
                Ok(CapacityRead {
                    snapshot,
                    workers,
                    gpus,
                    worker_count,
                    gpu_count,
                })
            })
            .await
    }

    /// The GPUs of `worker_ids` only, ordered by worker id then GPU index: what a capacity
    /// view refreshes after losing a GPU there, instead of reloading every worker.
    pub async fn gpus_of(&self, worker_ids: &[String]) -> Result<Vec<GpuRow>, StoreError> {
        let mut conn = self.conn().await?;
        Ok(gpus::table
            .filter(gpus::worker_id.eq_any(worker_ids))
            .select(GpuRow::as_select())
            .order((gpus::worker_id, gpus::idx))
            .load(&mut conn)
            .await?)
    }

    /// How many instances of each replica group hold GPUs on each worker:
    /// `(worker, group, instances)`.
    pub async fn replicas(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let mut conn = self.scan_conn().await?;
        // Distinct (worker, group, instance) first, then a count: `count(DISTINCT …)` sorted
        // the rows of every group on its own and took 25 ms for 2,000 allocations.
        let rows: Vec<(String, String, i64)> = diesel::sql_query(
            "SELECT worker_id, replica_group, count(*) AS n FROM ( \
               SELECT DISTINCT worker_id, replica_group, instance_id FROM allocations \
               WHERE replica_group IS NOT NULL) d \
             GROUP BY worker_id, replica_group",
        )
        .load::<ReplicaCountRow>(&mut conn)
        .await?
        .into_iter()
        .map(|r| (r.worker_id, r.replica_group, r.n))
        .collect();
        Ok(rows)
    }

    /// Commits a placement on one worker with the same bytes on each GPU; see
    /// [`Store::commit_claims`].
    pub async fn commit_placement(
        &self,
        id: &str,
        version: Version,
        worker_id: &str,
        gpu_idxs: &[u32],
        bytes_per_gpu: i64,
    ) -> Result<CommitOutcome, StoreError> {
        let claims: Vec<GpuClaim> = gpu_idxs
            .iter()
            .map(|&idx| GpuClaim {
                worker_id: worker_id.to_owned(),
                idx,
                bytes: bytes_per_gpu,
            })
            .collect();
        self.commit_claims(id, version, &claims, None).await
    }

    /// Commits a placement computed for `version` of `id`, in one statement: the version
    /// check, a conditional reservation on each claimed GPU (which must leave room for what
    /// processes outside berth use), and the allocations, tagged with the replica `group`.
    /// Any miss changes nothing. The first claim's worker leads: the instance is reported
    /// under it.
    pub async fn commit_claims(
        &self,
        id: &str,
        version: Version,
        claims: &[GpuClaim],
        group: Option<&str>,
    ) -> Result<CommitOutcome, StoreError> {
        let (leader, sorted) = in_lock_order(id, claims)?;
        let workers: Vec<String> = sorted.iter().map(|(c, _)| c.worker_id.clone()).collect();
        let idxs: Vec<i32> = sorted.iter().map(|(_, idx)| *idx).collect();
        let bytes: Vec<i64> = sorted.iter().map(|(c, _)| c.bytes).collect();
        let mut conn = self.conn().await?;
        let (cmd_seq, committed, full, present): CommitRow = crate::prepared::Commit {
            id,
            version,
            leader: &leader,
            workers: &workers,
            idxs: &idxs,
            bytes: &bytes,
            group,
        }
        .get_result(&mut conn)
        .await?;
        let Some(cmd_seq) = cmd_seq else {
            return Ok(CommitOutcome::VersionMoved);
        };
        if !committed {
            let full = full.unwrap_or_default();
            let present = present.unwrap_or_default();
            let in_order = || sorted.iter().map(|(c, _)| *c);
            let lost = in_order()
                .find(|c| {
                    let key = format!("{}:{}", c.worker_id, c.idx);
                    full.contains(&key) || !present.contains(&key)
                })
                .or_else(|| in_order().next());
            return Ok(CommitOutcome::CapacityGone {
                worker_id: lost.map(|c| c.worker_id.clone()).unwrap_or_default(),
                gpu: lost.map_or(0, |c| c.idx),
            });
        }
        Ok(CommitOutcome::Committed(scheduled(
            id, version, cmd_seq, claims,
        )))
    }

    /// Commits several placements in one statement, each exactly as [`Store::commit_claims`]
    /// would on its own: its version check, a reservation on each claimed GPU, all or
    /// nothing. Answers in the order of `commits`. Placements of one group that claim the
    /// same GPU are checked together: if their sum no longer fits, every one of them gets
    /// `CapacityGone` (and refits), so nothing is ever overcommitted. Instances are locked
    /// in id order, then GPUs in (worker, index) order, like every other writer.
    pub async fn commit_many(
        &self,
        commits: &[PlacementCommit],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let mut out: Vec<Option<CommitOutcome>> = vec![None; commits.len()];
        // A second commit for the same instance in one group goes in a later statement.
        let mut rest: Vec<usize> = (0..commits.len()).collect();
        while !rest.is_empty() {
            let mut round: BTreeMap<&str, usize> = BTreeMap::new();
            let mut later = Vec::new();
            for i in rest {
                match round.entry(commits[i].id.as_str()) {
                    Entry::Vacant(e) => {
                        e.insert(i);
                    }
                    Entry::Occupied(_) => later.push(i),
                }
            }
            let chosen: Vec<usize> = round.into_values().collect();
            let outcomes = if let [one] = chosen[..] {
                let c = &commits[one];
                vec![
                    self.commit_claims(&c.id, c.version, &c.claims, c.group.as_deref())
                        .await?,
                ]
            } else {
                self.commit_group(commits, &chosen).await?
            };
            for (i, o) in chosen.into_iter().zip(outcomes) {
                out[i] = Some(o);
            }
            rest = later;
        }
        out.into_iter()
            .map(|o| o.ok_or_else(|| StoreError::Corrupt("a commit went unanswered".into())))
            .collect()
    }

    /// One statement for `commits[i]` for each `i` in `chosen` (distinct instances, in id
    /// order).
    async fn commit_group(
        &self,
        commits: &[PlacementCommit],
        chosen: &[usize],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let mut arrays = GroupArrays::default();
        for &i in chosen {
            let c = &commits[i];
            let (leader, sorted) = in_lock_order(&c.id, &c.claims)?;
            arrays.ids.push(c.id.clone());
            arrays.versions.push(c.version.get());
            arrays.leaders.push(leader);
            arrays.groups.push(c.group.clone());
            for (g, idx) in sorted {
                arrays.claim_ids.push(c.id.clone());
                arrays.claim_workers.push(g.worker_id.clone());
                arrays.claim_idxs.push(idx);
                arrays.claim_bytes.push(g.bytes);
            }
        }
        let mut conn = self.conn().await?;
        let rows: Vec<GroupRow> = crate::prepared::CommitMany { arrays: &arrays }
            .load(&mut conn)
            .await?;
        let by_id: HashMap<String, GroupRow> = rows.into_iter().map(|r| (r.0.clone(), r)).collect();
        chosen
            .iter()
            .map(|&i| {
                let c = &commits[i];
                let Some((_, cmd_seq, committed, lost)) = by_id.get(&c.id) else {
                    return Err(StoreError::Corrupt(format!(
                        "no answer for the commit of {}",
                        c.id
                    )));
                };
                let Some(cmd_seq) = *cmd_seq else {
                    return Ok(CommitOutcome::VersionMoved);
                };
                if !committed {
                    let (worker_id, gpu) = lost
                        .as_ref()
                        .and_then(|l| l.iter().next())
                        .and_then(|key| key.rsplit_once(':'))
                        .map(|(w, i)| (w.to_owned(), i.parse().unwrap_or(0)))
                        .unwrap_or_default();
                    return Ok(CommitOutcome::CapacityGone { worker_id, gpu });
                }
                Ok(CommitOutcome::Committed(scheduled(
                    &c.id, c.version, cmd_seq, &c.claims,
                )))
            })
            .collect()
    }

    /// Moves `id` from `analyzing` at `version` to `pending` with `reason`. `None` when the
    /// instance moved on meanwhile.
    pub async fn mark_pending(
        &self,
        id: &str,
        version: Version,
        reason: &str,
    ) -> Result<Option<Transition>, StoreError> {
        self.finish_analysis(id, version, InstanceState::Pending, reason)
            .await
    }

    /// Moves `id` from `analyzing` at `version` to `error` with `reason`.
    pub async fn mark_error(
        &self,
        id: &str,
        version: Version,
        reason: &str,
    ) -> Result<Option<Transition>, StoreError> {
        self.finish_analysis(id, version, InstanceState::Error, reason)
            .await
    }

    async fn finish_analysis(
        &self,
        id: &str,
        version: Version,
        state: InstanceState,
        reason: &str,
    ) -> Result<Option<Transition>, StoreError> {
        let reason = berth_proto::text::reason(reason);
        let mut conn = self.conn().await?;
        let seq: Option<i64> = diesel::update(
            instances::table
                .find(id)
                .filter(instances::version.eq(version))
                .filter(instances::state.eq(InstanceState::Analyzing.as_str())),
        )
        .set((
            instances::state.eq(state.as_str()),
            instances::reason.eq(&reason),
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
            cmd_seq: CmdSeq::from_db(cmd_seq),
            worker_id: None,
            gpus: Vec::new(),
            reason: Some(reason),
            endpoint: None,
        }))
    }
}

/// A placement's leader and its claims in lock order, each with its stored index.
type Ordered<'c> = (String, Vec<(&'c GpuClaim, i32)>);

/// The leader (the first claim's worker) and the claims in (worker, index) order, the GPU
/// row lock order, each with its index as stored. Refuses a placement without claims.
fn in_lock_order<'c>(id: &str, claims: &'c [GpuClaim]) -> Result<Ordered<'c>, StoreError> {
    let Some(leader) = <[GpuClaim]>::first(claims).map(|c| c.worker_id.clone()) else {
        return Err(StoreError::Corrupt(format!(
            "placement of {id} claims no GPU"
        )));
    };
    let mut sorted = claims
        .iter()
        .map(|c| i32::try_from(c.idx).map(|idx| (c, idx)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| StoreError::Corrupt(format!("GPU index out of range in {claims:?}")))?;
    sorted.sort_unstable_by(|(a, _), (b, _)| (&a.worker_id, a.idx).cmp(&(&b.worker_id, b.idx)));
    Ok((leader, sorted))
}

/// The `scheduled` transition of a committed placement: reported under the first claim's
/// worker, with its GPUs.
fn scheduled(id: &str, version: Version, cmd_seq: i64, claims: &[GpuClaim]) -> Transition {
    let leader = <[GpuClaim]>::first(claims).map(|c| c.worker_id.clone());
    let mut gpus: Vec<u32> = claims
        .iter()
        .filter(|c| Some(&c.worker_id) == leader.as_ref())
        .map(|c| c.idx)
        .collect();
    gpus.sort_unstable();
    Transition {
        instance_id: id.to_owned(),
        state: InstanceState::Scheduled,
        version,
        cmd_seq: CmdSeq::from_db(cmd_seq),
        worker_id: leader,
        gpus,
        reason: None,
        endpoint: None,
    }
}

/// One placement to commit; see [`Store::commit_many`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementCommit {
    pub id: String,
    pub version: Version,
    /// The first claim's worker leads.
    pub claims: Vec<GpuClaim>,
    pub group: Option<String>,
}

/// The parameters of [`COMMIT_MANY`]: per instance, then per claim.
#[derive(Debug, Default)]
pub(crate) struct GroupArrays {
    pub ids: Vec<String>,
    pub versions: Vec<i64>,
    pub leaders: Vec<String>,
    pub groups: Vec<Option<String>>,
    pub claim_ids: Vec<String>,
    pub claim_workers: Vec<String>,
    pub claim_idxs: Vec<i32>,
    pub claim_bytes: Vec<i64>,
}

/// (instance id, cmd_seq if its version still matched, committed, claims that had no room)
pub(crate) type GroupRow = (String, Option<i64>, bool, Option<Vec<String>>);

/// The room check of both commit statements, written once: the claimed GPUs of `$claims`
/// (a query with `worker_id`, `idx` and `bytes` columns, at most one row per GPU) locked in
/// (worker, index) order, the order of every writer, each reached through its key and with
/// `room` true when it can take the bytes on its latest version (including what is used
/// outside berth). The `gpus_no_overcommit` CHECK is the last line of defence behind it.
macro_rules! gpus_with_room {
    ($claims:literal) => {
        concat!(
            "SELECT l.* FROM (",
            $claims,
            " ORDER BY worker_id, idx) c CROSS JOIN LATERAL ( \
                SELECT gpus.worker_id, gpus.idx, \
                    gpus.reserved_bytes + c.bytes + gpus.system_reserved_bytes \
                        + gpus.used_outside_bytes <= gpus.total_bytes AS room \
                FROM gpus WHERE gpus.worker_id = c.worker_id AND gpus.idx = c.idx \
                FOR UPDATE \
            ) l"
        )
    };
}

/// Several placement commits in one statement; see [`Store::commit_many`]. `$1`..`$4` are
/// per instance (id, version, leader, replica group), `$5`..`$8` per claim (instance id,
/// worker, index, bytes). Claims of instances whose version moved are left out before the
/// room check; GPUs are checked against the sum of the remaining claims on them.
pub(crate) const COMMIT_MANY: &str = concat!(
    "\
    WITH req AS ( \
        SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) \
            AS r(id, version, leader, grp) \
    ), inst AS ( \
        SELECT l.id, l.cmd_seq FROM (SELECT id, version FROM req ORDER BY id) r \
        CROSS JOIN LATERAL ( \
            SELECT i.id, i.cmd_seq FROM instances i \
            WHERE i.id = r.id AND i.version = r.version AND i.state = 'analyzing' \
            FOR UPDATE \
        ) l \
    ), want AS ( \
        SELECT * FROM unnest($5::text[], $6::text[], $7::int[], $8::bigint[]) \
            AS w(id, worker_id, idx, bytes) \
        WHERE w.id IN (SELECT id FROM inst) \
    ), need AS ( \
        SELECT worker_id, idx, sum(bytes) AS bytes FROM want GROUP BY worker_id, idx \
    ), g AS ( \
    ",
    gpus_with_room!("SELECT * FROM need"),
    " \
    ), lost AS ( \
        SELECT want.id, want.worker_id || ':' || want.idx AS gpu FROM want \
        LEFT JOIN g ON g.worker_id = want.worker_id AND g.idx = want.idx \
        WHERE g.room IS NOT TRUE \
    ), ok AS ( \
        SELECT id FROM inst WHERE id NOT IN (SELECT id FROM lost) \
    ), cas AS ( \
        UPDATE instances SET state = 'scheduled', worker_id = req.leader, reason = NULL, \
            updated_at = now() \
        FROM req WHERE instances.id = ANY (ARRAY(SELECT id FROM ok)) AND instances.id = req.id \
        RETURNING 1 \
    ), okneed AS ( \
        SELECT worker_id, idx, sum(bytes) AS bytes FROM want \
        WHERE id IN (SELECT id FROM ok) GROUP BY worker_id, idx \
    ), res AS ( \
        UPDATE gpus SET reserved_bytes = gpus.reserved_bytes + okneed.bytes \
        FROM okneed WHERE gpus.worker_id = ANY (ARRAY(SELECT worker_id FROM okneed)) \
            AND gpus.worker_id = okneed.worker_id AND gpus.idx = okneed.idx \
        RETURNING 1 \
    ), ins AS ( \
        INSERT INTO allocations (instance_id, worker_id, gpu_idx, version, bytes, replica_group) \
        SELECT want.id, want.worker_id, want.idx, req.version, want.bytes, req.grp \
        FROM want JOIN req ON req.id = want.id WHERE want.id IN (SELECT id FROM ok) \
        RETURNING 1 \
    ) \
    SELECT req.id, inst.cmd_seq, req.id IN (SELECT id FROM ok) AS committed, \
        (SELECT array_agg(lost.gpu) FROM lost WHERE lost.id = req.id) AS lost \
    FROM req LEFT JOIN inst ON inst.id = req.id"
);

/// A GPU a placement reserves, and how much.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuClaim {
    pub worker_id: String,
    pub idx: u32,
    pub bytes: i64,
}

/// The GPUs `id`'s placement at `version` holds, ordered by worker and index.
pub(crate) async fn claims_at(
    conn: &mut AsyncPgConnection,
    id: &str,
    version: Version,
) -> Result<Vec<GpuClaim>, StoreError> {
    let allocs: Vec<AllocationRow> = allocations::table
        .filter(allocations::instance_id.eq(id))
        .filter(allocations::version.eq(version))
        .select(AllocationRow::as_select())
        .order((allocations::worker_id, allocations::gpu_idx))
        .load(conn)
        .await?;
    Ok(allocs
        .into_iter()
        .map(|a| GpuClaim {
            worker_id: a.worker_id,
            idx: a.gpu_idx.unsigned_abs(),
            bytes: a.bytes,
        })
        .collect())
}

/// The placement commit, one statement and so one atomic step without a transaction
/// block; see [`Store::commit_claims`]. Locks the instance row (the CAS), then the GPU rows
/// in (worker, index) order, checks every GPU has room on its latest version (including
/// what is used outside berth), and only then changes anything: all or nothing. `$4`, `$5`
/// and `$6` are the claims as parallel arrays (worker, index, bytes).
pub(crate) const COMMIT: &str = concat!(
    "\
    WITH inst AS ( \
        SELECT cmd_seq FROM instances \
        WHERE id = $1 AND version = $2 AND state = 'analyzing' FOR UPDATE \
    ), want AS ( \
        SELECT * FROM unnest($4::text[], $5::int[], $6::bigint[]) AS w(worker_id, idx, bytes) \
    ), g AS ( \
    ",
    gpus_with_room!("SELECT * FROM want WHERE EXISTS (SELECT 1 FROM inst)"),
    " \
    ), ok AS ( \
        SELECT EXISTS (SELECT 1 FROM inst) \
           AND (SELECT count(*) FROM g WHERE room) = cardinality($5::int[]) AS go \
    ), cas AS ( \
        UPDATE instances SET state = 'scheduled', worker_id = $3, reason = NULL, \
            updated_at = now() \
        FROM ok WHERE ok.go AND id = $1 \
        RETURNING 1 \
    ), res AS ( \
        UPDATE gpus SET reserved_bytes = gpus.reserved_bytes + want.bytes \
        FROM ok, want \
        WHERE ok.go AND gpus.worker_id = ANY ($4::text[]) \
            AND gpus.worker_id = want.worker_id AND gpus.idx = want.idx \
        RETURNING gpus.worker_id, gpus.idx, want.bytes \
    ), ins AS ( \
        INSERT INTO allocations (instance_id, worker_id, gpu_idx, version, bytes, replica_group) \
        SELECT $1, res.worker_id, res.idx, $2, res.bytes, $7 FROM res \
        RETURNING 1 \
    ) \
    SELECT (SELECT cmd_seq FROM inst) AS cmd_seq, \
           (SELECT go FROM ok) AS committed, \
           (SELECT array_agg(worker_id || ':' || idx) FROM g WHERE NOT room) AS full, \
           (SELECT array_agg(worker_id || ':' || idx) FROM g) AS present"
);

pub(crate) type CommitRow = (Option<i64>, bool, Option<Vec<String>>, Option<Vec<String>>);
