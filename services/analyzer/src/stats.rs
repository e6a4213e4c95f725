//! Counters of what the analyzer did, in Prometheus form; with the `testing` feature, also a
//! bounded log of recent fits and exact latency samples for tests and benchmarks.

use prometheus_client::{
    metrics::{
        counter::Counter,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use std::time::{Duration, SystemTime};
#[cfg(feature = "testing")]
use std::{collections::VecDeque, sync::Mutex};

/// Fits remembered in [`Stats::fit_log`].
#[cfg(feature = "testing")]
const FIT_LOG_CAP: usize = 100_000;

/// Fit durations, from 1 µs to about 1 s.
#[derive(Debug, Clone)]
pub struct FitHistogram(pub Histogram);

impl Default for FitHistogram {
    fn default() -> Self {
        FitHistogram(Histogram::new(exponential_buckets(1e-6, 4.0, 11)))
    }
}

/// A bounded reservoir of durations in microseconds (the first `SAMPLES_CAP` are kept).
#[cfg(feature = "testing")]
#[derive(Debug, Default)]
pub struct Samples(Mutex<Vec<u32>>);

#[cfg(feature = "testing")]
const SAMPLES_CAP: usize = 1_000_000;

#[cfg(feature = "testing")]
impl Samples {
    fn record(&self, d: Duration) {
        if let Ok(mut v) = self.0.lock()
            && v.len() < SAMPLES_CAP
        {
            v.push(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
        }
    }

    pub fn take(&self) -> Vec<u32> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }
}

/// One fit computation: for which command, and when its message was picked up.
#[cfg(feature = "testing")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FitRecord {
    pub instance_id: String,
    pub cmd_seq: berth_proto::CmdSeq,
    pub picked_at: SystemTime,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub commands_applied: Counter,
    pub commands_stale: Counter,
    pub commands_dead_lettered: Counter,
    pub fits_computed: Counter,
    pub fits_skipped_superseded: Counter,
    pub fits_cancelled: Counter,
    /// Fits cancelled by a command that turned out not to be newer (heard late), redone.
    pub false_cancels: Counter,
    /// Reports from backends running a placement berth no longer wants there; stopped.
    pub stale_reports_fenced: Counter,
    pub placements_committed: Counter,
    pub cas_conflicts: Counter,
    pub capacity_conflicts: Counter,
    pub refits: Counter,
    pub pending: Counter,
    pub reports_applied: Counter,
    /// Agent reports dropped: undecodable, implausible, or sent on another worker's subject.
    pub reports_rejected: Counter,
    pub fits_timed_out: Counter,
    pub commands_watched: Counter,
    pub republished: Counter,
    /// Assignments sent again for instances left `scheduled` with no agent answering.
    pub assignments_resent: Counter,
    pub workers_unreachable: Counter,
    pub evictions: Counter,
    /// Full sweeps finished, and those that left workers alone because the database had
    /// failed lately (silence then proves nothing).
    pub sweeps: Counter,
    pub sweeps_without_silence: Counter,
    /// Statements that recorded start intents, and the intents they carried.
    pub start_groups: Counter,
    pub starts_grouped: Counter,
    /// Events JetStream did not store (not sent, or no ack).
    pub events_failed: Counter,
    pub events_published: Counter,
    pub fit_seconds: FitHistogram,
    /// Recent fit durations and commit transaction durations, in microseconds, for
    /// benchmarks that want exact percentiles.
    #[cfg(feature = "testing")]
    pub fit_micros: Samples,
    #[cfg(feature = "testing")]
    pub commit_micros: Samples,
    #[cfg(feature = "testing")]
    fit_log: Mutex<VecDeque<FitRecord>>,
    #[cfg(feature = "testing")]
    cancel_log: Mutex<VecDeque<(String, SystemTime)>>,
}

/// Appends to a bounded log, dropping the oldest entry when full.
#[cfg(feature = "testing")]
fn push_bounded<T>(log: &Mutex<VecDeque<T>>, entry: T) {
    if let Ok(mut log) = log.lock() {
        if log.len() == FIT_LOG_CAP {
            log.pop_front();
        }
        log.push_back(entry);
    }
}

impl Stats {
    /// A fit ran for command `cmd_seq` of `instance_id`, picked up at `picked_at`.
    pub(crate) fn record_fit(
        &self,
        instance_id: &str,
        cmd_seq: berth_proto::CmdSeq,
        picked_at: SystemTime,
    ) {
        self.fits_computed.inc();
        #[cfg(feature = "testing")]
        push_bounded(
            &self.fit_log,
            FitRecord {
                instance_id: instance_id.to_owned(),
                cmd_seq,
                picked_at,
            },
        );
        #[cfg(not(feature = "testing"))]
        let _ = (instance_id, cmd_seq, picked_at);
    }

    /// A fit for `instance_id` was abandoned because a newer command arrived.
    pub(crate) fn record_cancel(&self, instance_id: &str) {
        self.fits_cancelled.inc();
        #[cfg(feature = "testing")]
        push_bounded(
            &self.cancel_log,
            (instance_id.to_owned(), SystemTime::now()),
        );
        #[cfg(not(feature = "testing"))]
        let _ = instance_id;
    }

    /// How long a fit took (kept exactly only for tests and benchmarks).
    pub(crate) fn sample_fit(&self, took: Duration) {
        #[cfg(feature = "testing")]
        self.fit_micros.record(took);
        #[cfg(not(feature = "testing"))]
        let _ = took;
    }

    /// How long a commit transaction took (kept only for tests and benchmarks).
    pub(crate) fn sample_commit(&self, took: Duration) {
        #[cfg(feature = "testing")]
        self.commit_micros.record(took);
        #[cfg(not(feature = "testing"))]
        let _ = took;
    }

    /// When recent fits were abandoned, oldest first.
    #[cfg(feature = "testing")]
    pub fn cancel_log(&self) -> Vec<(String, SystemTime)> {
        self.cancel_log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The most recent fits, oldest first.
    #[cfg(feature = "testing")]
    pub fn fit_log(&self) -> Vec<FitRecord> {
        self.fit_log
            .lock()
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Registers every counter (clones share their values) under `berth_analyzer_*`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("berth_analyzer");
        for (name, help, counter) in self.counters() {
            sub.register(name, help, counter.clone());
        }
        sub.register(
            "fit_seconds",
            "Time of one placement search",
            self.fit_seconds.0.clone(),
        );
    }

    fn counters(&self) -> [(&'static str, &'static str, &Counter); 27] {
        [
            (
                "commands_applied",
                "Commands applied to an instance",
                &self.commands_applied,
            ),
            (
                "commands_stale",
                "Commands older than the applied one",
                &self.commands_stale,
            ),
            (
                "commands_dead_lettered",
                "Commands rejected to BERTH_DLQ",
                &self.commands_dead_lettered,
            ),
            (
                "fits_computed",
                "Placement searches run",
                &self.fits_computed,
            ),
            (
                "fits_skipped_superseded",
                "Fits skipped: a newer command existed",
                &self.fits_skipped_superseded,
            ),
            (
                "fits_cancelled",
                "Fits abandoned in flight",
                &self.fits_cancelled,
            ),
            (
                "false_cancels",
                "Fits cancelled by a command heard late that was not newer; redone",
                &self.false_cancels,
            ),
            (
                "stale_reports_fenced",
                "Backends found running a stale placement and told to stop",
                &self.stale_reports_fenced,
            ),
            (
                "placements_committed",
                "Placements committed",
                &self.placements_committed,
            ),
            (
                "cas_conflicts",
                "Commits refused: the instance version moved",
                &self.cas_conflicts,
            ),
            (
                "capacity_conflicts",
                "Commits refused: a GPU's room was taken",
                &self.capacity_conflicts,
            ),
            (
                "refits",
                "Fits run again after a capacity conflict",
                &self.refits,
            ),
            ("pending", "Instances left pending", &self.pending),
            (
                "reports_applied",
                "Agent reports that changed an instance",
                &self.reports_applied,
            ),
            (
                "reports_rejected",
                "Agent reports dropped: undecodable, implausible, or about another worker than their subject names",
                &self.reports_rejected,
            ),
            (
                "fits_timed_out",
                "Placements abandoned after the fit timeout",
                &self.fits_timed_out,
            ),
            (
                "commands_watched",
                "Commands seen by the cancellation watch",
                &self.commands_watched,
            ),
            (
                "republished",
                "Commands republished to re-evaluate an instance",
                &self.republished,
            ),
            (
                "assignments_resent",
                "Assignments sent again to agents that had not answered",
                &self.assignments_resent,
            ),
            (
                "workers_unreachable",
                "Workers marked unreachable",
                &self.workers_unreachable,
            ),
            (
                "evictions",
                "Instances taken off a worker that went away or shrank",
                &self.evictions,
            ),
            ("sweeps", "Full sweeps finished", &self.sweeps),
            (
                "sweeps_without_silence",
                "Sweeps that judged no worker silent: the database failed within unreachable-after",
                &self.sweeps_without_silence,
            ),
            (
                "start_groups",
                "Statements that recorded start intents",
                &self.start_groups,
            ),
            (
                "starts_grouped",
                "Start intents recorded (over start_groups: the mean group size)",
                &self.starts_grouped,
            ),
            (
                "events_failed",
                "State-change events JetStream did not store",
                &self.events_failed,
            ),
            (
                "events_published",
                "State-change events relayed from the outbox to NATS",
                &self.events_published,
            ),
        ]
    }

    /// Prometheus text exposition of these counters.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        self.register(&mut registry);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
