//! Placement: given a snapshot of the cluster's free VRAM and an instance's needs ([`Request`]:
//! the [`Shape`]s it can run in), choose a worker and GPUs, or explain what was short.
//!
//! Pure and deterministic: no I/O, no async, no clock. The same snapshot and request give the
//! same answer, which keeps it fast to test and to benchmark. Where the shapes come from (model
//! files, memory estimates) is `berth-models`' business.

mod explain;
mod lane;
mod place;

pub use explain::explain_no_fit;
pub use lane::Lane;
pub use place::{Order, Part, Placement, Policy, Slot, place, place_from};

use std::collections::BTreeMap;

/// One GPU as the fit sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Gpu {
    /// Index on its worker.
    pub index: u32,
    pub name: String,
    /// The device's UUID ("GPU-5e3c…"), empty when unknown.
    pub uuid: String,
    /// Memory on the device: what a backend claiming a share of the GPU takes a share of.
    pub total_bytes: u64,
    /// VRAM berth may still reserve: total − system-reserved − already reserved − used by
    /// processes outside berth (as the worker's agent last reported).
    pub free_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Worker {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// False for workers that are unreachable or draining: never chosen.
    pub schedulable: bool,
    pub gpus: Vec<Gpu>,
    /// Instances of each replica group already placed here: under [`Policy::Spread`] a
    /// replica goes to the worker with the fewest of its group.
    pub replicas: Replicas,
}

/// Replica counts per group on one worker. The spread search asks every worker for the
/// request's group, so this is a short list compared by a hash computed once per request
/// ([`GroupKey`]) and the name's length, both stored inline: a map keyed by `String` cost a
/// string compare per entry, through pointers to the heap, and was 40 % of the search. Two
/// names are taken as the same group when their 64-bit hashes and lengths agree; a
/// collision (about 1 in 10^13 for a thousand groups) would only shift which worker spread
/// prefers, never what fits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replicas(Vec<ReplicaCount>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct ReplicaCount {
    hash: u64,
    count: u32,
    group: Box<str>,
}

/// A replica group's name with its hash, computed once and compared with many workers'.
#[derive(Debug, Clone, Copy)]
pub struct GroupKey<'a> {
    hash: u64,
    name: &'a str,
}

impl<'a> GroupKey<'a> {
    pub fn new(name: &'a str) -> Self {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        name.hash(&mut h);
        GroupKey {
            hash: h.finish(),
            name,
        }
    }
}

impl Replicas {
    fn position(&self, group: GroupKey<'_>) -> Option<usize> {
        self.0
            .iter()
            .position(|e| e.hash == group.hash && e.group.len() == group.name.len())
    }

    /// Replicas of `group` here.
    pub fn get(&self, group: GroupKey<'_>) -> u32 {
        self.position(group).map_or(0, |i| self.0[i].count)
    }

    /// Sets the count of `group` (a count of 0 removes it).
    pub fn set(&mut self, group: &str, count: u32) {
        self.set_key(GroupKey::new(group), count);
    }

    fn set_key(&mut self, group: GroupKey<'_>, count: u32) {
        match self.position(group) {
            Some(i) if count == 0 => {
                self.0.swap_remove(i);
            }
            Some(i) => self.0[i].count = count,
            None if count == 0 => {}
            None => self.0.push(ReplicaCount {
                hash: group.hash,
                count,
                group: group.name.into(),
            }),
        }
    }

    /// Groups with at least one replica here.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<S: AsRef<str>> FromIterator<(S, u32)> for Replicas {
    fn from_iter<I: IntoIterator<Item = (S, u32)>>(iter: I) -> Self {
        let mut r = Replicas::default();
        for (group, count) in iter {
            r.set(group.as_ref(), count);
        }
        r
    }
}

/// What an instance needs: the ways it can run, and where it may run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    /// Ways to run it, most preferred first (fewest GPUs first): the search takes the first
    /// shape that fits anywhere. Empty never fits.
    pub shapes: Vec<Shape>,
    /// Labels a worker must carry, all of them.
    pub selector: BTreeMap<String, String>,
    /// Only GPUs whose name contains this, ignoring case ("H100" matches
    /// "NVIDIA H100 80GB HBM3").
    pub gpu_name: Option<String>,
    /// Only these GPUs, each `worker:index` or a GPU UUID; empty allows any.
    pub gpu_ids: Vec<String>,
    /// The replica group (usually the model): spread keeps a group's replicas apart.
    pub group: Option<String>,
    /// Said in a "nothing fits" reason: a way of running it that was ruled out (vLLM over
    /// several workers).
    pub note: Option<String>,
}

impl Request {
    /// One shape: `gpus` GPUs on one worker with `vram_per_gpu` free each.
    pub fn simple(vram_per_gpu: u64, gpus: u32) -> Request {
        Request {
            shapes: vec![Shape::new(vram_per_gpu, gpus)],
            ..Request::default()
        }
    }

    /// Whether `gpu` on `worker_id` is one this request may use (kind and explicit ids).
    pub fn accepts(&self, worker_id: &str, gpu: &Gpu) -> bool {
        let kind = self
            .gpu_name
            .as_deref()
            .is_none_or(|want| contains_ignore_case(&gpu.name, want));
        kind && (self.gpu_ids.is_empty()
            || self.gpu_ids.iter().any(|id| names_gpu(id, worker_id, gpu)))
    }
}

/// Whether `haystack` contains `needle`, ignoring ASCII case, without allocating: it runs
/// for every GPU of every worker the search meets.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// Whether `id` (`worker:index` or a UUID) names `gpu` on `worker_id`.
fn names_gpu(id: &str, worker_id: &str, gpu: &Gpu) -> bool {
    if !gpu.uuid.is_empty() && id.eq_ignore_ascii_case(&gpu.uuid) {
        return true;
    }
    id.rsplit_once(':')
        .is_some_and(|(w, i)| w == worker_id && i.parse::<u32>().is_ok_and(|i| i == gpu.index))
}

/// One way to run an instance: how many workers and GPUs, and what each GPU must hold.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Shape {
    /// Workers the instance spans (pipeline stages on separate hosts); 1 keeps it on one.
    pub workers: u32,
    /// GPUs on each of those workers.
    pub gpus_per_worker: u32,
    /// Least memory each GPU must have free.
    pub vram_per_gpu: u64,
    /// A backend that takes a share of each GPU whatever it needs (vLLM's
    /// `gpu_memory_utilization`) reserves that share instead, and its need must fit inside.
    pub claim: Option<Claim>,
    /// How the shape runs, for explanations: "tp=2", "pp=2 × tp=4", "24 of 32 layers".
    pub label: String,
}

impl Shape {
    pub fn new(vram_per_gpu: u64, gpus: u32) -> Shape {
        Shape {
            workers: 1,
            gpus_per_worker: gpus,
            vram_per_gpu,
            claim: None,
            label: String::new(),
        }
    }

    /// Bytes this shape reserves on a GPU of `total_bytes`, or `None` when the GPU is too
    /// small for it (a claimed share that cannot hold the need).
    pub fn need_on(&self, total_bytes: u64) -> Option<u64> {
        match self.claim {
            None => Some(self.vram_per_gpu),
            Some(c) => {
                let share = c.share_of(total_bytes);
                (share >= self.vram_per_gpu).then_some(share)
            }
        }
    }

    /// GPUs in all.
    pub fn gpu_count(&self) -> u64 {
        u64::from(self.workers) * u64::from(self.gpus_per_worker)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FitError {
    /// Nothing fits; the message names what each worker was short of.
    #[error("{0}")]
    NoFit(String),
    /// The caller's cancellation check fired between candidates.
    #[error("cancelled")]
    Cancelled,
}

/// The share of each GPU a backend takes regardless of need (vLLM's
/// `gpu_memory_utilization`, SGLang's `mem_fraction_static`):
/// `before_bytes + ⌈fraction × (GPU total − before_bytes)⌉ + extra_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Claim {
    pub fraction: f64,
    /// Allocated outside the fraction (CUDA graphs in vLLM before it profiled them).
    pub extra_bytes: u64,
    /// Taken before the backend measures the memory it takes its fraction of (SGLang takes
    /// its fraction of the memory free after its CUDA context and NCCL exist); 0 when the
    /// fraction is of the GPU's total (vLLM).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub before_bytes: u64,
    /// When not empty, the fraction depends on the GPU's size instead of being `fraction`
    /// (SGLang without `--mem-fraction-static`): see [`LeaveTiers`].
    #[serde(default, skip_serializing_if = "LeaveTiers::is_empty")]
    pub leave: LeaveTiers,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Most size classes a [`LeaveTiers`] holds.
pub const MAX_TIERS: usize = 8;

/// A fraction that depends on the GPU's size: a GPU of `total` bytes takes
/// `round((total − leave) / total, 3)`, where `leave` is that of the first tier whose
/// `below_bytes` is above `total` (the last tier covers every larger GPU). This is how
/// SGLang picks its default `mem_fraction_static` (`ServerArgs._handle_gpu_memory_settings`).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "Vec<LeaveTier>", into = "Vec<LeaveTier>")]
pub struct LeaveTiers {
    tiers: [LeaveTier; MAX_TIERS],
    len: usize,
}

/// GPUs with less memory than `below_bytes` (and not in an earlier tier) leave `leave_bytes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaveTier {
    pub below_bytes: u64,
    pub leave_bytes: u64,
}

impl From<Vec<LeaveTier>> for LeaveTiers {
    /// Keeps the first [`MAX_TIERS`] tiers.
    fn from(list: Vec<LeaveTier>) -> Self {
        let mut t = LeaveTiers::default();
        for tier in list.into_iter().take(MAX_TIERS) {
            t.tiers[t.len] = tier;
            t.len += 1;
        }
        t
    }
}

impl From<LeaveTiers> for Vec<LeaveTier> {
    fn from(t: LeaveTiers) -> Self {
        t.as_slice().to_vec()
    }
}

impl LeaveTiers {
    pub fn as_slice(&self) -> &[LeaveTier] {
        &self.tiers[..self.len.min(MAX_TIERS)]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The fraction a GPU of `total_bytes` takes; `None` without tiers.
    pub fn fraction_of(&self, total_bytes: u64) -> Option<f64> {
        let tiers = self.as_slice();
        let tier = tiers
            .iter()
            .find(|t| total_bytes < t.below_bytes)
            .or(tiers.last())?;
        if total_bytes == 0 {
            return Some(0.0);
        }
        #[expect(clippy::cast_precision_loss, reason = "GPU sizes stay below 2^53")]
        let f = total_bytes.saturating_sub(tier.leave_bytes) as f64 / total_bytes as f64;
        Some((f * 1000.0).round() / 1000.0)
    }
}

impl Claim {
    /// A share of `fraction` of each GPU's total, with `extra_bytes` outside it.
    pub fn new(fraction: f64, extra_bytes: u64) -> Claim {
        Claim {
            fraction,
            extra_bytes,
            before_bytes: 0,
            leave: LeaveTiers::default(),
        }
    }

    /// The fraction taken of a GPU of `total_bytes`: by its size when tiers are set.
    pub fn fraction_on(&self, total_bytes: u64) -> f64 {
        self.leave.fraction_of(total_bytes).unwrap_or(self.fraction)
    }

    /// The bytes claimed on a GPU of `total_bytes`:
    /// `before + ⌈fraction × (total − before)⌉ + extra`.
    pub fn share_of(&self, total_bytes: u64) -> u64 {
        let of = total_bytes.saturating_sub(self.before_bytes);
        let share = (of as f64 * self.fraction_on(total_bytes)).ceil();
        let share = if share.is_finite() && share >= 0.0 {
            share.min(u64::MAX as f64) as u64
        } else {
            0
        };
        share
            .saturating_add(self.extra_bytes)
            .saturating_add(self.before_bytes.min(total_bytes))
    }
}

impl Worker {
    /// One more replica of `group` here, or with `give_back` one less.
    pub fn count_replica(&mut self, group: &str, give_back: bool) {
        let key = GroupKey::new(group);
        let n = self.replicas.get(key);
        let n = if give_back {
            n.saturating_sub(1)
        } else {
            n.saturating_add(1)
        };
        self.replicas.set_key(key, n);
    }

    /// Replicas of `group` on this worker.
    pub fn replicas_of(&self, group: Option<GroupKey<'_>>) -> u32 {
        group.map_or(0, |g| self.replicas.get(g))
    }

    pub fn matches(&self, selector: &BTreeMap<String, String>) -> bool {
        selector
            .iter()
            .all(|(k, v)| self.labels.get(k).is_some_and(|have| have == v))
    }
}

/// Bytes in IEC units ("20.0 GiB"), as explanations and estimate tables show them.
pub fn gib(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_share_can_depend_on_the_gpu_size_and_start_after_a_context() {
        const GIB: u64 = 1 << 30;
        // vLLM: a fraction of the total.
        assert_eq!(Claim::new(0.5, GIB).share_of(80 * GIB), 41 * GIB);
        // SGLang: the fraction of what is free after its context, the context itself on top.
        let c = Claim {
            before_bytes: 2 * GIB,
            ..Claim::new(0.5, GIB)
        };
        assert_eq!(c.share_of(82 * GIB), 2 * GIB + 40 * GIB + GIB);
        // By size: small GPUs leave 4 GiB, larger ones 10 GiB, rounded to a thousandth.
        let c = Claim {
            leave: vec![
                LeaveTier {
                    below_bytes: 60 * GIB,
                    leave_bytes: 4 * GIB,
                },
                LeaveTier {
                    below_bytes: u64::MAX,
                    leave_bytes: 10 * GIB,
                },
            ]
            .into(),
            ..Claim::new(0.88, 0)
        };
        assert_eq!(c.fraction_on(40 * GIB), 0.9);
        assert_eq!(c.fraction_on(80 * GIB), 0.875);
        assert_eq!(c.fraction_on(u64::MAX), 1.0);
        assert_eq!(c.share_of(40 * GIB), 36 * GIB);
        // The wire form: tiers as a list, absent when empty.
        let j = serde_json::to_value(c).unwrap();
        assert_eq!(j["leave"][1]["leave_bytes"], serde_json::json!(10 * GIB));
        assert_eq!(serde_json::from_value::<Claim>(j).unwrap(), c);
        let plain = serde_json::to_value(Claim::new(0.9, 0)).unwrap();
        assert!(plain.get("leave").is_none() && plain.get("before_bytes").is_none());
        assert_eq!(
            serde_json::from_str::<Claim>(r#"{"fraction": 0.9, "extra_bytes": 0}"#).unwrap(),
            Claim::new(0.9, 0)
        );
    }

    #[test]
    fn replica_counts_go_up_and_down_per_group() {
        let mut w = Worker::default();
        let (a, b) = (GroupKey::new("llama"), GroupKey::new("qwen"));
        w.count_replica("llama", false);
        w.count_replica("llama", false);
        w.count_replica("qwen", false);
        assert_eq!((w.replicas_of(Some(a)), w.replicas_of(Some(b))), (2, 1));
        assert_eq!(w.replicas_of(None), 0);
        assert_eq!(w.replicas_of(Some(GroupKey::new("llam"))), 0);
        w.count_replica("qwen", true);
        w.count_replica("qwen", true); // never below zero
        assert_eq!((w.replicas_of(Some(a)), w.replicas_of(Some(b))), (2, 0));
        assert_eq!(w.replicas.len(), 1, "a group back at zero is dropped");
        let from: Replicas = [("llama", 2), ("none", 0)].into_iter().collect();
        assert_eq!(from, w.replicas);
    }
}
