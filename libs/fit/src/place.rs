//! The placement search.

use crate::{FitError, Request, Worker, explain_no_fit};

/// How to choose among workers and GPUs that all fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// Fill the fullest GPUs first, keeping large holes free for large models.
    #[default]
    Binpack,
    /// Use the emptiest GPUs first, spreading load and blast radius.
    Spread,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub worker_id: String,
    /// GPU indexes on the worker, ascending.
    pub gpus: Vec<u32>,
}

/// Chooses a worker and `request.gpus` GPUs on it with at least `request.vram_per_gpu` free
/// each. `cancelled` is polled between workers so a superseded fit stops early.
///
/// Score: the free VRAM left on the chosen GPUs after placing. Binpack takes the lowest
/// score (tightest fit), spread the highest; ties go to the worker listed first.
pub fn place(
    workers: &[Worker],
    request: &Request,
    policy: Policy,
    cancelled: &dyn Fn() -> bool,
) -> Result<Placement, FitError> {
    let mut best: Option<(u128, &Worker, Vec<u32>)> = None;
    for worker in workers {
        if cancelled() {
            return Err(FitError::Cancelled);
        }
        if !worker.schedulable || !worker.matches(&request.selector) {
            continue;
        }
        let Some((leftover, gpus)) = choose_gpus(worker, request, policy) else {
            continue;
        };
        let better = match &best {
            None => true,
            Some((score, _, _)) => match policy {
                Policy::Binpack => leftover < *score,
                Policy::Spread => leftover > *score,
            },
        };
        if better {
            best = Some((leftover, worker, gpus));
        }
    }
    match best {
        Some((_, worker, mut gpus)) => {
            gpus.sort_unstable();
            Ok(Placement {
                worker_id: worker.id.clone(),
                gpus,
            })
        }
        None => Err(FitError::NoFit(explain_no_fit(workers, request))),
    }
}

/// The GPUs of one worker that fit, picked per policy, with the VRAM they would have left.
fn choose_gpus(worker: &Worker, request: &Request, policy: Policy) -> Option<(u128, Vec<u32>)> {
    if request.gpus == 0 {
        return None;
    }
    let mut fitting: Vec<_> = worker
        .gpus
        .iter()
        .filter(|g| g.free_bytes >= request.vram_per_gpu && request.accepts(g))
        .collect();
    if fitting.len() < request.gpus {
        return None;
    }
    match policy {
        Policy::Binpack => fitting.sort_by_key(|g| (g.free_bytes, g.index)),
        Policy::Spread => fitting.sort_by_key(|g| (std::cmp::Reverse(g.free_bytes), g.index)),
    }
    let chosen = &fitting[..request.gpus];
    let leftover = chosen
        .iter()
        .map(|g| u128::from(g.free_bytes - request.vram_per_gpu))
        .sum();
    Some((leftover, chosen.iter().map(|g| g.index).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Gpu;
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
                    free_bytes: f * GIB,
                })
                .collect(),
        }
    }

    fn req(vram_gib: u64, gpus: usize) -> Request {
        Request {
            vram_per_gpu: vram_gib * GIB,
            gpus,
            ..Default::default()
        }
    }

    fn never() -> impl Fn() -> bool {
        || false
    }

    #[test]
    fn binpack_takes_the_tightest_gpus() {
        let ws = [worker("a", "x", &[80, 30, 25]), worker("b", "x", &[21])];
        let p = place(&ws, &req(20, 1), Policy::Binpack, &never()).unwrap();
        assert_eq!((p.worker_id.as_str(), p.gpus), ("b", vec![0]));
        let p = place(&ws, &req(20, 2), Policy::Binpack, &never()).unwrap();
        assert_eq!((p.worker_id.as_str(), p.gpus), ("a", vec![1, 2]));
    }

    #[test]
    fn spread_takes_the_emptiest_gpus() {
        let ws = [worker("a", "x", &[80, 30, 25]), worker("b", "x", &[21])];
        let p = place(&ws, &req(20, 1), Policy::Spread, &never()).unwrap();
        assert_eq!((p.worker_id.as_str(), p.gpus), ("a", vec![0]));
    }

    #[test]
    fn honours_selector_and_schedulable() {
        let mut down = worker("a", "x", &[80]);
        down.schedulable = false;
        let ws = [down, worker("b", "y", &[80]), worker("c", "x", &[40])];
        let mut r = req(20, 1);
        r.selector.insert("zone".into(), "x".into());
        let p = place(&ws, &r, Policy::Spread, &never()).unwrap();
        assert_eq!(p.worker_id, "c");
    }

    #[test]
    fn no_fit_explains_each_worker() {
        let ws = [worker("a", "x", &[10, 30]), worker("b", "x", &[5])];
        let Err(FitError::NoFit(why)) = place(&ws, &req(20, 2), Policy::Binpack, &never()) else {
            panic!("should not fit");
        };
        assert!(why.contains("a: 1 of 2 GPUs"), "{why}");
        assert!(why.contains("b: 0 of 1 GPUs"), "{why}");
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
        assert_eq!(p.worker_id, "l4s");
        r.gpu_name = Some("A100".into());
        let Err(FitError::NoFit(why)) = place(&ws, &r, Policy::Binpack, &never()) else {
            panic!("no A100 anywhere");
        };
        assert!(why.contains("GPUs named like \"A100\""), "{why}");
        assert!(why.contains("h100s: 0 of 0 GPUs"), "{why}");
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
        /// Whatever the cluster, a placement only uses GPUs that have room, on one matching
        /// worker, distinct and as many as asked; and a no-fit means no worker had room.
        #[test]
        fn placements_are_feasible(
            frees in proptest::collection::vec(proptest::collection::vec(0u64..100, 0..6), 0..6),
            vram in 1u64..60,
            count in 1usize..4,
            spread in any::<bool>(),
        ) {
            let ws: Vec<_> = frees.iter().enumerate()
                .map(|(i, f)| worker(&format!("w{i}"), "x", f)).collect();
            let policy = if spread { Policy::Spread } else { Policy::Binpack };
            match place(&ws, &req(vram, count), policy, &never()) {
                Ok(p) => {
                    let w = ws.iter().find(|w| w.id == p.worker_id).unwrap();
                    prop_assert_eq!(p.gpus.len(), count);
                    let mut seen = p.gpus.clone();
                    seen.dedup();
                    prop_assert_eq!(seen.len(), count);
                    for i in &p.gpus {
                        prop_assert!(w.gpus[*i as usize].free_bytes >= vram * GIB);
                    }
                }
                Err(FitError::NoFit(_)) => {
                    for w in &ws {
                        let room = w.gpus.iter().filter(|g| g.free_bytes >= vram * GIB).count();
                        prop_assert!(room < count);
                    }
                }
                Err(FitError::Cancelled) => prop_assert!(false, "never cancelled"),
            }
        }
    }
}
