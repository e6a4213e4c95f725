//! The analyzer's in-memory view of free VRAM, so a decision costs no database read.
//!
//! Loaded in full at start and refreshed periodically (and on demand before a "nothing fits"
//! verdict or after losing a GPU to another analyzer). A fit takes a *hold* on the GPUs it
//! chose, deducted at once, so concurrent fits in this analyzer choose other GPUs; the hold
//! is settled when the commit lands and given back when it does not. The view may be
//! slightly stale about other analyzers: that costs a capacity conflict at commit (the
//! database refuses, never overcommits), not correctness.

use crate::placing::to_fit_workers;
use berth_fit::{FitError, Placement, Policy, Request, Worker, place, place_from};
use berth_store::{Store, StoreError};
use std::{
    collections::HashMap,
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

impl Snapshot {
    /// Reloads free capacity from the database; holds still in flight stay deducted.
    pub async fn refresh(&self, store: &Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        self.reload(store, true).await
    }

    /// Reloads free capacity; replica counts too with `replicas` (the periodic refresh),
    /// else the previous counts are kept: a conflict needs fresh VRAM figures, and a replica
    /// placed elsewhere meanwhile only shifts a preference until the next refresh.
    async fn reload(&self, store: &Store, replicas: bool) -> Result<(), StoreError> {
        let started = Instant::now();
        let capacity = store.capacity().await?;
        let counts = if self.replicas && replicas {
            Some(store.replicas().await?)
        } else {
            None
        };
        let reload_counts = counts.is_some();
        let mut workers = to_fit_workers(capacity, counts.unwrap_or_default());
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
        Ok(())
    }

    /// Reloads the free VRAM of `worker_ids` only (holds in flight there stay deducted):
    /// losing a GPU to another analyzer says exactly which part of the view was stale.
    /// Workers added or removed meanwhile wait for the periodic refresh.
    pub async fn refresh_workers(
        &self,
        store: &Store,
        worker_ids: &[String],
    ) -> Result<(), StoreError> {
        let rows = store.gpus_of(worker_ids).await?;
        let Ok(mut inner) = self.inner.lock() else {
            return Ok(());
        };
        let inner = &mut *inner;
        for row in &rows {
            let Some(&w) = inner.by_id.get(&row.worker_id) else {
                continue;
            };
            let index = row.idx.unsigned_abs();
            if let Some(gpu) = inner.workers[w].gpus.iter_mut().find(|g| g.index == index) {
                gpu.free_bytes = u64::try_from(row.free_bytes()).unwrap_or(0);
            }
        }
        for hold in inner.holds.values() {
            for part in &hold.placement.parts {
                if worker_ids.contains(&part.worker_id)
                    && let Some(&w) = inner.by_id.get(&part.worker_id)
                {
                    // VRAM only: the replica counts were not reloaded.
                    part.apply(&mut inner.workers[w], None, false);
                }
            }
        }
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
            self.reload(store, false).await
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

    /// Chooses GPUs for `request` and holds them. Among equally good candidates the choice
    /// depends on `salt` (the instance id), so analyzers working on different instances at
    /// the same moment rarely pick the same GPU.
    pub fn fit(
        &self,
        request: &Request,
        policy: Policy,
        salt: &str,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(Placement, Hold), FitError> {
        let Ok(mut inner) = self.inner.lock() else {
            return Err(FitError::NoFit(
                "internal error: capacity view unavailable".into(),
            ));
        };
        let first = usize::try_from(hash(salt)).unwrap_or(0);
        let chosen = place_from(&inner.workers, first, request, policy, cancelled)?;
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

/// Refreshes `ctx.snapshot` every `every` until `shutdown`.
pub async fn keep_fresh(
    ctx: std::sync::Arc<crate::context::Ctx>,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = ctx.snapshot.refresh(&ctx.store).await {
            tracing::warn!(%e, "capacity refresh failed");
        }
    }
}
