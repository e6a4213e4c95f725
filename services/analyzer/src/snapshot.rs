//! The analyzer's in-memory view of free VRAM, so a decision costs no database read.
//!
//! Loaded in full at start, then kept fresh by reading only the worker and GPU rows written
//! since the previous read (`Store::capacity_since`): every second and before a "nothing
//! fits" verdict; the GPUs of the workers where a GPU was lost to another analyzer are read
//! again at once. Rows deleted since (seen in the row counts) turn a read into a full
//! reload, and a full reload with the replica counts (replicas placed or released by other
//! analyzers) runs every `full_refresh_every`. A fit takes a *hold* on the GPUs it
//! chose, deducted at once, so concurrent fits in this analyzer choose other GPUs; the hold
//! is settled when the commit lands and given back when it does not. The view may be
//! slightly stale about other analyzers: that costs a capacity conflict at commit (the
//! database refuses, never overcommits), not correctness.

use berth_fit::{
    FitError, Gpu, Lane, Order, Placement, Policy, Replicas, Request, Worker, place, place_from,
};
use berth_store::{GpuRow, Store, StoreError, WorkerRow, placement::CapacityRead};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Mutex,
    time::Instant,
};

/// GPUs (and a replica of the group) held by a fit until its commit settles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    id: u64,
    placement: Placement,
    group: Option<String>,
}

#[derive(Debug)]
struct Inner {
    workers: Vec<Worker>,
    by_id: HashMap<String, usize>,
    holds: HashMap<u64, Hold>,
    next_hold: u64,
    loaded: Option<Instant>,
    /// The snapshot of the last read: the next one reads only rows it could not see.
    seen: Option<String>,
}

#[derive(Debug)]
pub struct Snapshot {
    inner: Mutex<Inner>,
    /// Load replica counts per worker (only the spread policy uses them).
    replicas: bool,
    /// One reload at a time: callers that wanted one while it ran take its result.
    reloading: tokio::sync::Mutex<()>,
}

impl Snapshot {
    /// An empty view; `replicas`: also track replica counts per worker.
    pub fn new(replicas: bool) -> Self {
        Snapshot {
            replicas,
            inner: Mutex::new(Inner {
                workers: Vec::new(),
                by_id: HashMap::new(),
                holds: HashMap::new(),
                next_hold: 0,
                loaded: None,
                seen: None,
            }),
            reloading: tokio::sync::Mutex::new(()),
        }
    }
}

impl Inner {
    /// Only the replica counts of `hold` (its VRAM is left alone).
    fn adjust_replicas(&mut self, hold: &Hold, give_back: bool) {
        let Some(group) = hold.group.as_deref() else {
            return;
        };
        for part in &hold.placement.parts {
            if let Some(&w) = self.by_id.get(&part.worker_id) {
                self.workers[w].count_replica(group, give_back);
            }
        }
    }

    fn adjust(&mut self, hold: &Hold, give_back: bool) {
        for part in &hold.placement.parts {
            if let Some(&w) = self.by_id.get(&part.worker_id) {
                part.apply(&mut self.workers[w], hold.group.as_deref(), give_back);
            }
        }
    }
}

impl Inner {
    /// Deducts the VRAM of the holds in flight again from the GPUs `read` accepts (worker
    /// position, GPU index): those were just read from the database, which does not have
    /// the holds yet. Replica counts are left alone.
    fn deduct_holds_on(&mut self, read: impl Fn(usize, u32) -> bool) {
        for hold in self.holds.values() {
            for part in &hold.placement.parts {
                if let Some(&w) = self.by_id.get(&part.worker_id) {
                    part.apply_vram(&mut self.workers[w], false, |index| read(w, index));
                }
            }
        }
    }

    /// Applies rows written since the last read (`read`): workers' labels and state, GPUs'
    /// figures, new workers and GPUs. The holds in flight are deducted again from each GPU
    /// read, since the database's figure does not have them. `false` when the view then
    /// holds more rows than the database has: some were deleted, and only a full reload
    /// can tell which.
    fn apply_changes(&mut self, read: CapacityRead) -> bool {
        for row in read.workers {
            let labels = serde_json::from_value(row.labels).unwrap_or_default();
            match self.by_id.get(&row.id) {
                Some(&w) => {
                    self.workers[w].labels = labels;
                    self.workers[w].schedulable = row.schedulable;
                }
                None => {
                    self.by_id.insert(row.id.clone(), self.workers.len());
                    self.workers.push(Worker {
                        id: row.id,
                        labels,
                        schedulable: row.schedulable,
                        gpus: Vec::new(),
                        replicas: Replicas::default(),
                    });
                }
            }
        }
        let mut read_gpus: HashSet<(usize, u32)> = HashSet::with_capacity(read.gpus.len());
        let mut complete = true;
        for row in &read.gpus {
            let Some(&w) = self.by_id.get(&row.worker_id) else {
                complete = false;
                continue;
            };
            let gpu = to_fit_gpu(row);
            read_gpus.insert((w, gpu.index));
            let gpus = &mut self.workers[w].gpus;
            match gpus.binary_search_by_key(&gpu.index, |g| g.index) {
                Ok(at) => gpus[at] = gpu,
                Err(at) => gpus.insert(at, gpu),
            }
        }
        if !read_gpus.is_empty() {
            self.deduct_holds_on(|w, index| read_gpus.contains(&(w, index)));
        }
        let gpus_here: usize = self.workers.iter().map(|w| w.gpus.len()).sum();
        self.seen = Some(read.snapshot);
        complete
            && i64::try_from(self.workers.len()) == Ok(read.worker_count)
            && i64::try_from(gpus_here) == Ok(read.gpu_count)
    }
}

impl Snapshot {
    /// Brings the view up to date with the database: only what changed since the last read,
    /// or everything (replica counts too) when nothing was read yet. Holds still in flight
    /// stay deducted.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        self.catch_up(store).await
    }

    /// Reloads every worker and GPU and the replica counts: what reading changes cannot
    /// show (rows deleted, replicas that other analyzers placed or released).
    pub async fn reload_all(&self, store: &Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        self.reload(store, true).await
    }

    /// Applies the rows written since the last read; falls back to a full reload when there
    /// was no read yet or rows were deleted since.
    async fn catch_up(&self, store: &Store) -> Result<(), StoreError> {
        let started = Instant::now();
        let seen = self.inner.lock().ok().and_then(|i| i.seen.clone());
        let Some(seen) = seen else {
            return self.reload(store, true).await;
        };
        let read = store.capacity_since(Some(&seen)).await?;
        let complete = {
            let Ok(mut inner) = self.inner.lock() else {
                return Ok(());
            };
            let complete = inner.apply_changes(read);
            inner.loaded = Some(started);
            complete
        };
        if complete {
            Ok(())
        } else {
            self.reload(store, false).await
        }
    }

    /// Reloads free capacity; replica counts too with `replicas`, else the previous counts
    /// are kept: a replica placed elsewhere meanwhile only shifts a preference until the next
    /// full reload.
    async fn reload(&self, store: &Store, replicas: bool) -> Result<(), StoreError> {
        let started = Instant::now();
        let read = store.capacity_since(None).await?;
        let seen = read.snapshot.clone();
        let counts = if self.replicas && replicas {
            Some(store.replicas().await?)
        } else {
            None
        };
        let reload_counts = counts.is_some();
        let mut workers = to_fit_workers(read.grouped(), counts.unwrap_or_default());
        let Ok(mut inner) = self.inner.lock() else {
            return Ok(());
        };
        if !reload_counts {
            // Keep the counts this view had (held replicas are added back below).
            let holds: Vec<Hold> = inner.holds.values().cloned().collect();
            for h in &holds {
                inner.adjust_replicas(h, true);
            }
            for w in &mut workers {
                if let Some(&i) = inner.by_id.get(&w.id) {
                    w.replicas = std::mem::take(&mut inner.workers[i].replicas);
                }
            }
        }
        inner.by_id = workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.id.clone(), i))
            .collect();
        inner.workers = workers;
        let holds: Vec<Hold> = inner.holds.values().cloned().collect();
        for h in &holds {
            inner.adjust(h, false);
        }
        inner.loaded = Some(started);
        inner.seen = Some(seen);
        Ok(())
    }

    /// Reads the GPUs of `worker_ids` again (holds in flight there stay deducted): losing a
    /// GPU to another analyzer says exactly which part of the view was stale. A GPU the
    /// database no longer has leaves the view, so it is not chosen again.
    pub async fn refresh_workers(
        &self,
        store: &Store,
        worker_ids: &[String],
    ) -> Result<(), StoreError> {
        let rows = store.gpus_of(worker_ids).await?;
        let Ok(mut inner) = self.inner.lock() else {
            return Ok(());
        };
        let mut read: HashSet<usize> = HashSet::with_capacity(worker_ids.len());
        for id in worker_ids {
            let Some(&w) = inner.by_id.get(id) else {
                continue;
            };
            read.insert(w);
            inner.workers[w].gpus = rows
                .iter()
                .filter(|r| &r.worker_id == id)
                .map(to_fit_gpu)
                .collect();
        }
        inner.deduct_holds_on(|w, _| read.contains(&w));
        Ok(())
    }

    /// Refreshes unless a refresh started at or after `since` already happened.
    pub async fn refresh_since(&self, store: &Store, since: Instant) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        let fresh = self
            .inner
            .lock()
            .ok()
            .and_then(|i| i.loaded)
            .is_some_and(|at| at >= since);
        if fresh {
            Ok(())
        } else {
            self.catch_up(store).await
        }
    }

    /// Whether `request` fits the current view (nothing is held).
    pub fn would_fit(&self, request: &Request, policy: Policy) -> bool {
        self.inner
            .lock()
            .is_ok_and(|i| place(&i.workers, request, policy, &|| false).is_ok())
    }

    /// A copy of the current view (holds deducted).
    pub fn workers(&self) -> Vec<Worker> {
        self.inner
            .lock()
            .map(|i| i.workers.clone())
            .unwrap_or_default()
    }

    pub fn is_loaded(&self) -> bool {
        self.inner.lock().is_ok_and(|i| i.loaded.is_some())
    }

    /// Chooses GPUs for `request`, preferring the workers of `lane`, and holds them. Among
    /// equally good candidates the choice depends on `salt` (the instance id), so fits of
    /// different instances at the same moment rarely pick the same GPU.
    pub fn fit(
        &self,
        request: &Request,
        policy: Policy,
        salt: &str,
        lane: Lane,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Placement, Hold), FitError> {
        let Ok(mut inner) = self.inner.lock() else {
            return Err(FitError::NoFit(
                "internal error: capacity view unavailable".into(),
            ));
        };
        let first = usize::try_from(hash(salt)).unwrap_or(0);
        let order = Order { first, lane };
        let chosen = place_from(&inner.workers, order, request, policy, cancelled)?;
        inner.next_hold += 1;
        let hold = Hold {
            id: inner.next_hold,
            placement: chosen.clone(),
            group: request.group.clone(),
        };
        inner.adjust(&hold, false);
        inner.holds.insert(hold.id, hold.clone());
        Ok((chosen, hold))
    }

    /// The commit landed: the deduction stays (the database has it now too).
    pub fn settle(&self, hold: &Hold) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.holds.remove(&hold.id);
        }
    }

    /// The commit did not land: give the VRAM back.
    pub fn release(&self, hold: &Hold) {
        if let Ok(mut inner) = self.inner.lock()
            && inner.holds.remove(&hold.id).is_some()
        {
            inner.adjust(hold, true);
        }
    }
}

fn hash(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

/// Brings `ctx.snapshot` up to date every `every`, with a full reload every `full_every`,
/// until `shutdown`.
pub async fn keep_fresh(
    ctx: std::sync::Arc<crate::context::Ctx>,
    every: std::time::Duration,
    full_every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full = Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let refreshed = if last_full.elapsed() >= full_every {
            last_full = Instant::now();
            ctx.snapshot.reload_all(&ctx.store).await
        } else {
            ctx.snapshot.refresh(&ctx.store).await
        };
        if let Err(e) = refreshed {
            tracing::warn!(%e, "capacity refresh failed");
        }
    }
}

/// A GPU row as the fit sees it.
fn to_fit_gpu(g: &GpuRow) -> Gpu {
    Gpu {
        index: g.idx.unsigned_abs(),
        name: g.name.clone(),
        uuid: g.uuid.clone(),
        total_bytes: u64::try_from(g.total_bytes).unwrap_or(0),
        free_bytes: u64::try_from(g.free_bytes()).unwrap_or(0),
    }
}

/// The fit's view of the cluster: free VRAM per GPU, labels and replica counts per worker.
fn to_fit_workers(
    capacity: Vec<(WorkerRow, Vec<GpuRow>)>,
    replicas: Vec<(String, String, i64)>,
) -> Vec<Worker> {
    let mut per_worker: HashMap<String, Replicas> = HashMap::new();
    for (worker, group, n) in replicas {
        per_worker
            .entry(worker)
            .or_default()
            .set(&group, u32::try_from(n).unwrap_or(u32::MAX));
    }
    capacity
        .into_iter()
        .map(|(w, gpus)| Worker {
            labels: serde_json::from_value::<BTreeMap<String, String>>(w.labels)
                .unwrap_or_default(),
            schedulable: w.schedulable,
            gpus: gpus.iter().map(to_fit_gpu).collect(),
            replicas: per_worker.remove(&w.id).unwrap_or_default(),
            id: w.id,
        })
        .collect()
}
