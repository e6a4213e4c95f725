//! The placement search: shapes in order of preference, workers in order, GPUs by policy.

use crate::{FitError, GroupKey, Lane, Request, Shape, Worker, explain_no_fit};
use std::cmp::Reverse;

/// How to choose among workers and GPUs that all fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Fill the fullest GPUs first, keeping large holes free for large models.
    #[default]
    Binpack,
    /// Use the emptiest GPUs first, spreading load and blast radius; replicas of one group
    /// go to the workers holding the fewest of that group.
    Spread,
}

/// Where an instance goes: one part per worker, the first being the leader (the worker the
/// instance is reported under).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Index into [`Request::shapes`] of the shape that fitted.
    pub shape: usize,
    pub parts: Vec<Part>,
}

/// The GPUs used on one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub worker_id: String,
    /// Ascending by index.
    pub gpus: Vec<Slot>,
}

/// One GPU and the bytes reserved on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub bytes: u64,
}

impl Placement {
    /// The leader's worker id.
    pub fn worker_id(&self) -> &str {
        self.parts.first().map_or("", |p| p.worker_id.as_str())
    }
}

impl Part {
    /// GPU indexes, ascending.
    pub fn indexes(&self) -> Vec<u32> {
        self.gpus.iter().map(|s| s.index).collect()
    }

    /// The most reserved on any one GPU of this part.
    pub fn max_bytes(&self) -> u64 {
        self.gpus.iter().map(|s| s.bytes).max().unwrap_or(0)
    }

    /// Takes this part's VRAM and a replica of `group` from `worker` (the worker it names),
    /// or with `give_back` returns them: how a view of the cluster follows its own decisions
    /// until it is reloaded.
    pub fn apply(&self, worker: &mut Worker, group: Option<&str>, give_back: bool) {
        self.apply_vram(worker, give_back, |_| true);
        if let Some(group) = group {
            worker.count_replica(group, give_back);
        }
    }

    /// Only the VRAM of [`Part::apply`], and only on the GPUs whose index `on` accepts: a
    /// view that has just read some GPUs again deducts what it holds on those alone.
    pub fn apply_vram(&self, worker: &mut Worker, give_back: bool, on: impl Fn(u32) -> bool) {
        for slot in self.gpus.iter().filter(|s| on(s.index)) {
            if let Some(g) = worker.gpus.iter_mut().find(|g| g.index == slot.index) {
                g.free_bytes = if give_back {
                    g.free_bytes.saturating_add(slot.bytes)
                } else {
                    g.free_bytes.saturating_sub(slot.bytes)
                };
            }
        }
    }
}

/// Chooses where `request` runs: the first of its shapes that fits, on the best workers and
/// GPUs for `policy`. `cancelled` is polled between workers so a superseded fit stops early.
///
/// Score of a worker for a shape: the free VRAM its chosen GPUs would have left. Binpack
/// takes the lowest (tightest fit); spread takes the fewest replicas of the request's group,
/// then the highest. Ties go to the worker met first.
pub fn place(
    workers: &[Worker],
    request: &Request,
    policy: Policy,
    cancelled: &dyn Fn() -> bool,
) -> Result<Placement, FitError> {
    place_from(workers, Order::default(), request, policy, cancelled)
}

/// How a search meets the workers: see [`place_from`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Order {
    /// The index of the worker met first (wrapping around): ties go to the worker met first.
    pub first: usize,
    /// The workers preferred.
    pub lane: Lane,
}

/// [`place`], meeting workers from `order.first` on (wrapping around), so that callers
/// deciding for different instances at once break ties differently, and preferring the
/// workers of `order.lane`, so that callers deciding at the same moment rarely choose the
/// same GPUs: a worker outside the lane is chosen only where too few in it can take the
/// shape, or (under spread) where it holds no replica of the group and those in the lane
/// that can all hold one. The shapes keep their order: a lane never makes a later shape win.
pub fn place_from(
    workers: &[Worker],
    order: Order,
    request: &Request,
    policy: Policy,
    cancelled: &dyn Fn() -> bool,
) -> Result<Placement, FitError> {
    let Order { first, lane } = order;
    let first = if workers.is_empty() {
        0
    } else {
        first % workers.len()
    };
    let order = || workers[first..].iter().chain(&workers[..first]);
    let group = match policy {
        Policy::Spread => request.group.as_deref().map(GroupKey::new),
        Policy::Binpack => None,
    };
    for (i, shape) in request.shapes.iter().enumerate() {
        let want = shape.workers.max(1) as usize;
        let search = Search {
            request,
            shape,
            policy,
            group,
            lane,
        };
        let best = best_candidates(order(), want, &search, cancelled)?;
        if best.len() < want {
            continue;
        }
        let parts = best.into_iter().map(Candidate::part).collect();
        return Ok(Placement { shape: i, parts });
    }
    Err(FitError::NoFit(explain_no_fit(workers, request)))
}

/// How good a worker is for a shape, lower first: whether it holds a replica of the
/// request's group at all, whether it is outside the lane, how many replicas of the group it
/// holds (those three under spread only), then the free VRAM its GPUs would have left
/// (binpack) or its complement (spread).
///
/// Keeping replicas apart comes first; balancing their counts comes after the lane, because
/// a view knows the counts of other analyzers' lanes only from its last full reload: ranking
/// those counts first would send each analyzer into the others' lanes, where they wrongly
/// look emptier.
type Rank = (bool, bool, u32, u128);

/// A worker that can take a shape's share, with the GPUs it would use.
struct Candidate<'w> {
    worker: &'w Worker,
    rank: Rank,
    slots: Vec<crate::Slot>,
}

impl Candidate<'_> {
    fn part(self) -> Part {
        let mut gpus = self.slots;
        gpus.sort_unstable_by_key(|s| s.index);
        Part {
            worker_id: self.worker.id.clone(),
            gpus,
        }
    }
}

/// Workers met between two looks at `cancelled` (a token's check takes a lock).
const CANCEL_POLL_EVERY: usize = 64;

/// The best `want` workers that can take the shape's share, best first (fewer when fewer
/// can), polling `cancelled` every few workers.
///
/// The search meets every worker, so the per-worker step allocates nothing: the GPUs are
/// chosen in one reused buffer, and a worker that cannot beat the ones already kept is
/// dropped before its GPUs are copied out.
fn best_candidates<'w>(
    workers: impl Iterator<Item = &'w Worker>,
    want: usize,
    search: &Search<'_>,
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Candidate<'w>>, FitError> {
    // Stable sorts keep equal ranks in the order the workers were met: ties go to the first.
    let prune = |best: &mut Vec<Candidate<'w>>| {
        best.sort_by_key(|c| c.rank);
        best.truncate(want);
    };
    let mut best: Vec<Candidate<'w>> = Vec::new();
    // Once `want` are kept, the rank a newcomer must beat (a tie goes to the one kept).
    let mut cut: Option<Rank> = None;
    let mut scratch = Vec::new();
    for (i, worker) in workers.enumerate() {
        if i % CANCEL_POLL_EVERY == 0 && cancelled() {
            return Err(FitError::Cancelled);
        }
        let Some(rank) = choose_gpus(worker, search, cut, &mut scratch) else {
            continue;
        };
        if cut.is_some_and(|cut| rank >= cut) {
            continue;
        }
        best.push(Candidate {
            worker,
            rank,
            slots: scratch.iter().map(|(_, s)| *s).collect(),
        });
        // Only the best few are kept, so a large cluster costs no large buffer.
        if best.len() > 2 * want + 16 {
            prune(&mut best);
            cut = best.last().filter(|_| best.len() == want).map(|c| c.rank);
        }
    }
    prune(&mut best);
    Ok(best)
}

/// What one shape's search looks for.
struct Search<'r> {
    request: &'r Request,
    shape: &'r Shape,
    policy: Policy,
    /// The request's replica group under spread (hashed once for all workers).
    group: Option<GroupKey<'r>>,
    lane: Lane,
}

/// Picks, into `chosen`, the GPUs of `worker` that fit the shape per policy (each with the
/// free bytes it would have left), and returns the worker's rank for it; `None` when the
/// worker cannot take it, or cannot beat `cut`.
fn choose_gpus(
    worker: &Worker,
    search: &Search<'_>,
    cut: Option<Rank>,
    chosen: &mut Vec<(u64, crate::Slot)>,
) -> Option<Rank> {
    let Search {
        request,
        shape,
        policy,
        group,
        lane,
    } = *search;
    let k = shape.gpus_per_worker as usize;
    if k == 0 || worker.gpus.len() < k || !worker.schedulable || !worker.matches(&request.selector)
    {
        return None;
    }
    // The replica count (spread) and the lane rank before the GPUs: a worker that loses to
    // the ones kept on those cannot win whatever its GPUs, so they are not looked at.
    let replicas = worker.replicas_of(group);
    let outside = !lane.holds(&worker.id);
    let held = replicas > 0;
    if cut.is_some_and(|(h, o, r, _)| (held, outside, replicas) > (h, o, r)) {
        return None;
    }
    // Hoisted out of the per-GPU loop: most requests take any GPU, at a fixed need.
    let any_gpu = request.gpu_name.is_none() && request.gpu_ids.is_empty();
    let fixed_need = shape.claim.is_none().then_some(shape.vram_per_gpu);
    let offer = |g: &crate::Gpu| {
        if !any_gpu && !request.accepts(&worker.id, g) {
            return None;
        }
        let need = match fixed_need {
            Some(need) => need,
            None => shape.need_on(g.total_bytes)?,
        };
        let left = g.free_bytes.checked_sub(need)?;
        Some((
            left,
            crate::Slot {
                index: g.index,
                bytes: need,
            },
        ))
    };
    // Best first per policy; the index breaks ties.
    let by_policy = |a: &(u64, crate::Slot), b: &(u64, crate::Slot)| match policy {
        Policy::Binpack => (a.0, a.1.index).cmp(&(b.0, b.1.index)),
        Policy::Spread => (Reverse(a.0), a.1.index).cmp(&(Reverse(b.0), b.1.index)),
    };
    chosen.clear();
    if k == 1 {
        chosen.extend(worker.gpus.iter().filter_map(offer).min_by(by_policy));
    } else {
        chosen.extend(worker.gpus.iter().filter_map(offer));
        if chosen.len() > k {
            // Only which k GPUs matter (their order is set later): select, not sort.
            chosen.select_nth_unstable_by(k - 1, by_policy);
            chosen.truncate(k);
        }
    }
    if chosen.len() < k {
        return None;
    }
    let leftover: u128 = chosen.iter().map(|(left, _)| u128::from(*left)).sum();
    Some(match policy {
        Policy::Binpack => (false, outside, 0, leftover),
        Policy::Spread => (held, outside, replicas, u128::MAX - leftover),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Claim, Gpu, Replicas};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const GIB: u64 = 1 << 30;

    fn worker(id: &str, zone: &str, free_gib: &[u64]) -> Worker {
        Worker {
            id: id.into(),
            labels: BTreeMap::from([("zone".into(), zone.into())]),
            schedulable: true,
            gpus: free_gib
                .iter()
                .enumerate()
                .map(|(i, f)| Gpu {
                    index: u32::try_from(i).unwrap(),
                    name: "H100".into(),
                    uuid: format!("GPU-{id}-{i}"),
                    total_bytes: 80 * GIB,
                    free_bytes: f * GIB,
                })
                .collect(),
            replicas: Replicas::default(),
        }
    }

    fn req(vram_gib: u64, gpus: u32) -> Request {
        Request::simple(vram_gib * GIB, gpus)
    }

    fn never() -> impl Fn() -> bool {
        || false
    }

    fn chosen(p: &Placement) -> (&str, Vec<u32>) {
        (p.worker_id(), p.parts[0].indexes())
    }

    #[test]
    fn binpack_takes_the_tightest_gpus() {
        let ws = [worker("a", "x", &[80, 30, 25]), worker("b", "x", &[21])];
        let p = place(&ws, &req(20, 1), Policy::Binpack, &never()).unwrap();
        assert_eq!(chosen(&p), ("b", vec![0]));
        let p = place(&ws, &req(20, 2), Policy::Binpack, &never()).unwrap();
        assert_eq!(chosen(&p), ("a", vec![1, 2]));
        assert_eq!(p.parts[0].gpus[0].bytes, 20 * GIB);
    }

    #[test]
    fn spread_takes_the_emptiest_gpus() {
        let ws = [worker("a", "x", &[80, 30, 25]), worker("b", "x", &[21])];
        let p = place(&ws, &req(20, 1), Policy::Spread, &never()).unwrap();
        assert_eq!(chosen(&p), ("a", vec![0]));
    }

    #[test]
    fn honours_selector_and_schedulable() {
        let mut down = worker("a", "x", &[80]);
        down.schedulable = false;
        let ws = [down, worker("b", "y", &[80]), worker("c", "x", &[40])];
        let mut r = req(20, 1);
        r.selector.insert("zone".into(), "x".into());
        let p = place(&ws, &r, Policy::Spread, &never()).unwrap();
        assert_eq!(p.worker_id(), "c");
    }

    #[test]
    fn place_from_rotates_ties() {
        let ws = [worker("a", "x", &[40]), worker("b", "x", &[40])];
        let from = |first| Order {
            first,
            lane: Lane::ALL,
        };
        let p = place_from(&ws, from(1), &req(20, 1), Policy::Binpack, &never()).unwrap();
        assert_eq!(p.worker_id(), "b");
        let p = place_from(&ws, from(2), &req(20, 1), Policy::Binpack, &never()).unwrap();
        assert_eq!(p.worker_id(), "a");
    }

    #[test]
    fn no_fit_explains_each_worker() {
        let ws = [worker("a", "x", &[10, 30]), worker("b", "x", &[5])];
        let Err(FitError::NoFit(why)) = place(&ws, &req(20, 2), Policy::Binpack, &never()) else {
            panic!("should not fit");
        };
        assert!(why.contains("a: 2 × H100, largest free 30.0 GiB"), "{why}");
        assert!(why.contains("1 of 2 GPUs have it"), "{why}");
        assert!(why.contains("b: 1 × H100, largest free 5.0 GiB"), "{why}");
    }

    #[test]
    fn gpu_name_filter_picks_the_right_kind() {
        let mut l4 = worker("l4s", "x", &[80, 80]);
        for g in &mut l4.gpus {
            g.name = "NVIDIA L4".into();
        }
        let ws = [worker("h100s", "x", &[30]), l4];
        let mut r = req(20, 1);
        r.gpu_name = Some("l4".into());
        let p = place(&ws, &r, Policy::Binpack, &never()).unwrap();
        assert_eq!(p.worker_id(), "l4s");
        r.gpu_name = Some("A100".into());
        let Err(FitError::NoFit(why)) = place(&ws, &r, Policy::Binpack, &never()) else {
            panic!("no A100 anywhere");
        };
        assert!(why.contains("GPUs named like \"A100\""), "{why}");
        assert!(why.contains("h100s: no usable GPUs"), "{why}");
    }

    #[test]
    fn explicit_gpu_ids_by_index_or_uuid() {
        let ws = [worker("a", "x", &[80, 80]), worker("b", "x", &[80, 80])];
        let mut r = req(20, 1);
        r.gpu_ids = vec!["b:1".into()];
        let p = place(&ws, &r, Policy::Spread, &never()).unwrap();
        assert_eq!(chosen(&p), ("b", vec![1]));
        r.gpu_ids = vec!["gpu-a-1".into()];
        let p = place(&ws, &r, Policy::Spread, &never()).unwrap();
        assert_eq!(chosen(&p), ("a", vec![1]));
        // Two listed GPUs on different workers cannot hold a 2-GPU single-worker shape.
        r.gpu_ids = vec!["a:0".into(), "b:0".into()];
        r.shapes[0].gpus_per_worker = 2;
        let Err(FitError::NoFit(why)) = place(&ws, &r, Policy::Spread, &never()) else {
            panic!("the listed GPUs are on two workers");
        };
        assert!(why.contains("only GPUs a:0, b:0"), "{why}");
        r.gpu_ids = vec!["a:9".into(), "nonsense".into()];
        r.shapes[0].gpus_per_worker = 1;
        assert!(place(&ws, &r, Policy::Spread, &never()).is_err());
    }

    #[test]
    fn shapes_are_tried_in_order() {
        // 50 GiB on one GPU does not fit; 2 × 26.0 GiB does, on worker b.
        let ws = [worker("a", "x", &[40, 10]), worker("b", "x", &[30, 30])];
        let mut r = req(50, 1);
        r.shapes[0].label = "tp=1".into();
        r.shapes.push(Shape {
            label: "tp=2".into(),
            ..Shape::new(26 * GIB, 2)
        });
        let p = place(&ws, &r, Policy::Binpack, &never()).unwrap();
        assert_eq!((p.shape, chosen(&p)), (1, ("b", vec![0, 1])));
        // With room for tp=1 the first shape wins even though tp=2 would also fit.
        let ws = [worker("a", "x", &[60, 10]), worker("b", "x", &[30, 30])];
        let p = place(&ws, &r, Policy::Binpack, &never()).unwrap();
        assert_eq!((p.shape, chosen(&p)), (0, ("a", vec![0])));
        let ws = [worker("a", "x", &[40, 10]), worker("b", "x", &[30, 20])];
        let Err(FitError::NoFit(why)) = place(&ws, &r, Policy::Binpack, &never()) else {
            panic!("neither shape fits");
        };
        assert!(
            why.contains("b: 2 × H100, largest free 30.0 GiB: tp=1 needs 50.0 GiB per GPU (0 of 2 GPUs have it); tp=2 needs 2 × 26.0 GiB (1 of 2 GPUs have it)"),
            "{why}"
        );
    }

    #[test]
    fn claims_take_a_share_of_each_gpu() {
        let mut small = worker("small", "x", &[24]);
        small.gpus[0].total_bytes = 24 * GIB;
        let ws = [small, worker("big", "x", &[70])];
        let mut r = req(16, 1);
        r.shapes[0].claim = Some(Claim::new(0.9, 0));
        // 0.9 × 24.0 GiB holds the 16 GiB need and is free, so binpack takes the small card,
        // reserving the share, not the need.
        let p = place(&ws, &r, Policy::Binpack, &never()).unwrap();
        assert_eq!(p.worker_id(), "small");
        assert_eq!(
            p.parts[0].gpus[0].bytes,
            Claim::new(0.9, 0).share_of(24 * GIB)
        );
        // 0.9 × 80.0 GiB = 72 GiB is more than the 70 free on the big card.
        let ws = [worker("big", "x", &[70])];
        let Err(FitError::NoFit(why)) = place(&ws, &r, Policy::Binpack, &never()) else {
            panic!("the share is not free");
        };
        assert!(why.contains("needs 72.0 GiB per GPU"), "{why}");
        // A share too small for the need never fits, however free.
        let mut tiny = worker("tiny", "x", &[16]);
        tiny.gpus[0].total_bytes = 16 * GIB;
        assert!(place(&[tiny], &r, Policy::Binpack, &never()).is_err());
    }

    #[test]
    fn spread_keeps_replicas_apart() {
        let mut a = worker("a", "x", &[80, 80]);
        a.replicas.set("llama", 1);
        let b = worker("b", "x", &[40, 40]);
        let mut r = req(20, 1);
        r.group = Some("llama".into());
        // a is emptier, but already holds a replica.
        let p = place(&[a.clone(), b.clone()], &r, Policy::Spread, &never()).unwrap();
        assert_eq!(p.worker_id(), "b");
        r.group = Some("other".into());
        let p = place(&[a, b], &r, Policy::Spread, &never()).unwrap();
        assert_eq!(p.worker_id(), "a");
    }

    /// The lane of two holding `id`, and an id in the other lane.
    fn lane_and_stranger(id: &str) -> (Lane, String) {
        let lane = (0..2)
            .filter_map(|i| Lane::new(i, 2))
            .find(|l| l.holds(id))
            .unwrap();
        let stranger = (0..)
            .map(|i| format!("s{i}"))
            .find(|s| !lane.holds(s))
            .unwrap();
        (lane, stranger)
    }

    fn in_lane(lane: Lane) -> Order {
        Order { first: 0, lane }
    }

    #[test]
    fn a_lane_is_preferred_over_a_better_worker_outside_it() {
        let (lane, stranger) = lane_and_stranger("mine");
        let ws = [worker(&stranger, "x", &[21]), worker("mine", "x", &[60])];
        let p = place_from(&ws, in_lane(lane), &req(20, 1), Policy::Binpack, &never()).unwrap();
        assert_eq!(p.worker_id(), "mine", "the tighter fit is outside the lane");
        let ws = [worker(&stranger, "x", &[80]), worker("mine", "x", &[30])];
        let p = place_from(&ws, in_lane(lane), &req(20, 1), Policy::Spread, &never()).unwrap();
        assert_eq!(
            p.worker_id(),
            "mine",
            "the emptier worker is outside the lane"
        );
        // Without a lane, the better worker wins.
        assert_eq!(
            place(&ws, &req(20, 1), Policy::Spread, &never())
                .unwrap()
                .worker_id(),
            stranger
        );
    }

    #[test]
    fn a_worker_outside_the_lane_is_taken_when_the_lane_cannot_do() {
        let (lane, stranger) = lane_and_stranger("mine");
        let ws = [worker("mine", "x", &[10]), worker(&stranger, "x", &[40])];
        let p = place_from(&ws, in_lane(lane), &req(20, 1), Policy::Binpack, &never()).unwrap();
        assert_eq!(p.worker_id(), stranger);
        // Spread: a worker without a replica of the group outweighs the lane…
        let mut mine = worker("mine", "x", &[80]);
        mine.replicas.set("llama", 1);
        let mut other = worker(&stranger, "x", &[40]);
        let mut r = req(20, 1);
        r.group = Some("llama".into());
        let ws = [mine.clone(), other.clone()];
        let p = place_from(&ws, in_lane(lane), &r, Policy::Spread, &never()).unwrap();
        assert_eq!(p.worker_id(), stranger);
        // … but once both hold one, the lane outweighs their counts.
        mine.replicas.set("llama", 3);
        other.replicas.set("llama", 1);
        let ws = [mine, other];
        let p = place_from(&ws, in_lane(lane), &r, Policy::Spread, &never()).unwrap();
        assert_eq!(p.worker_id(), "mine");
        assert_eq!(
            place(&ws, &r, Policy::Spread, &never())
                .unwrap()
                .worker_id(),
            stranger
        );
        // A lane never makes a later shape win: the first shape fits only outside it.
        let ws = [
            worker("mine", "x", &[30, 30]),
            worker(&stranger, "x", &[50]),
        ];
        let mut r = req(50, 1);
        r.shapes.push(Shape::new(25 * GIB, 2));
        let p = place_from(&ws, in_lane(lane), &r, Policy::Binpack, &never()).unwrap();
        assert_eq!((p.shape, p.worker_id()), (0, stranger.as_str()));
    }

    #[test]
    fn distributed_shapes_use_several_workers() {
        let ws = [
            worker("a", "x", &[30]),
            worker("b", "x", &[50, 50]),
            worker("c", "x", &[25, 40]),
        ];
        let mut r = req(60, 1);
        r.shapes.push(Shape {
            workers: 2,
            label: "pp=2".into(),
            ..Shape::new(25 * GIB, 2)
        });
        let p = place(&ws, &r, Policy::Binpack, &never()).unwrap();
        assert_eq!(p.shape, 1);
        let ids: Vec<_> = p.parts.iter().map(|x| x.worker_id.as_str()).collect();
        // c is the tighter fit, so it leads.
        assert_eq!(ids, ["c", "b"]);
        assert!(p.parts.iter().all(|x| x.gpus.len() == 2));
        let Err(FitError::NoFit(why)) = place(&ws[..2], &r, Policy::Binpack, &never()) else {
            panic!("only one worker can take a stage");
        };
        assert!(
            why.contains("pp=2 needs 2 × 25.0 GiB on each of 2 workers"),
            "{why}"
        );
    }

    #[test]
    fn cancellation_stops_the_search() {
        let ws = [worker("a", "x", &[80])];
        assert_eq!(
            place(&ws, &req(20, 1), Policy::Binpack, &|| true),
            Err(FitError::Cancelled)
        );
    }

    proptest! {
        /// Whatever the cluster and shapes, a placement only uses GPUs that have room for
        /// the shape that fitted, on distinct matching workers, as many as asked, and no
        /// earlier shape fitted; a no-fit means no shape had room anywhere.
        #[test]
        fn placements_are_feasible(
            frees in proptest::collection::vec(proptest::collection::vec(0u64..100, 0..6), 0..6),
            shapes in proptest::collection::vec((1u64..60, 1u32..4, 1u32..3), 1..4),
            spread in any::<bool>(),
            first in 0usize..8,
            lane in (1u32..4).prop_flat_map(|count| (0..count, Just(count))),
        ) {
            let lane = Lane::new(lane.0, lane.1).unwrap();
            let ws: Vec<_> = frees.iter().enumerate()
                .map(|(i, f)| worker(&format!("w{i}"), "x", f)).collect();
            let policy = if spread { Policy::Spread } else { Policy::Binpack };
            let r = Request {
                shapes: shapes.iter().map(|&(v, g, w)| Shape { workers: w, ..Shape::new(v * GIB, g) }).collect(),
                ..Request::default()
            };
            let can_take = |w: &Worker, s: &Shape| {
                w.gpus.iter().filter(|g| g.free_bytes >= s.vram_per_gpu).count()
                    >= s.gpus_per_worker as usize
            };
            let fits = |s: &Shape| ws.iter().filter(|w| can_take(w, s)).count() >= s.workers as usize;
            match place_from(&ws, Order { first, lane }, &r, policy, &never()) {
                Ok(p) => {
                    let s = &r.shapes[p.shape];
                    prop_assert!(r.shapes[..p.shape].iter().all(|e| !fits(e)));
                    prop_assert_eq!(p.parts.len(), s.workers as usize);
                    // Workers outside the lane only make up for those missing in it (no
                    // group here, so no replica counts).
                    let in_lane = ws.iter().filter(|w| lane.holds(&w.id) && can_take(w, s)).count();
                    let outside = p.parts.iter().filter(|x| !lane.holds(&x.worker_id)).count();
                    prop_assert_eq!(outside, (s.workers as usize).saturating_sub(in_lane));
                    let mut ids: Vec<_> = p.parts.iter().map(|x| x.worker_id.clone()).collect();
                    ids.sort();
                    ids.dedup();
                    prop_assert_eq!(ids.len(), p.parts.len());
                    for part in &p.parts {
                        let w = ws.iter().find(|w| w.id == part.worker_id).unwrap();
                        let mut idx = part.indexes();
                        idx.dedup();
                        prop_assert_eq!(idx.len(), s.gpus_per_worker as usize);
                        for slot in &part.gpus {
                            prop_assert!(w.gpus[slot.index as usize].free_bytes >= s.vram_per_gpu);
                            prop_assert_eq!(slot.bytes, s.vram_per_gpu);
                        }
                    }
                }
                Err(FitError::NoFit(_)) => {
                    prop_assert!(r.shapes.iter().all(|s| !fits(s)));
                }
                Err(FitError::Cancelled) => prop_assert!(false, "never cancelled"),
            }
        }
    }
}
