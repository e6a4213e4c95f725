//! Lanes: the workers dealt out among deciders working at the same time, so that they rarely
//! reach for the same GPUs at the same moment.

use std::hash::Hasher;

/// One decider's share of the workers, out of `count` shares. A search prefers the workers
/// of its lane and takes others only where its lane cannot do as well (see
/// [`place_from`](crate::place_from)).
///
/// A worker's lane is a hash of its id (FNV-1a, fixed by its definition rather than by a
/// library version), so every process deals the workers out the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lane {
    index: u32,
    count: u32,
}

impl Default for Lane {
    fn default() -> Self {
        Lane::ALL
    }
}

impl Lane {
    /// Every worker: a decider alone.
    pub const ALL: Lane = Lane { index: 0, count: 1 };

    /// Share `index` of `count`; `None` unless `index < count`.
    pub fn new(index: u32, count: u32) -> Option<Lane> {
        (index < count).then_some(Lane { index, count })
    }

    pub fn index(self) -> u32 {
        self.index
    }

    pub fn count(self) -> u32 {
        self.count
    }

    /// Whether the worker `worker_id` belongs to this lane.
    pub fn holds(self, worker_id: &str) -> bool {
        if self.count <= 1 {
            return true;
        }
        let mut h = fnv::FnvHasher::default();
        h.write(worker_id.as_bytes());
        h.finish() % u64::from(self.count) == u64::from(self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_refuses_an_index_outside_the_count() {
        assert_eq!(Lane::new(2, 2), None);
        assert_eq!(Lane::new(0, 0), None);
        assert_eq!(
            Lane::new(1, 2).map(|l| (l.index(), l.count())),
            Some((1, 2))
        );
    }

    #[test]
    fn every_worker_is_in_exactly_one_lane_and_lanes_are_even() {
        for count in [1u32, 2, 3, 4, 7] {
            let mut sizes = vec![0usize; count as usize];
            for w in 0..3000 {
                let id = format!("worker-{w:04}");
                let lanes: Vec<u32> = (0..count)
                    .filter(|&i| Lane::new(i, count).is_some_and(|l| l.holds(&id)))
                    .collect();
                assert_eq!(lanes.len(), 1, "{id} in lanes {lanes:?} of {count}");
                sizes[lanes[0] as usize] += 1;
            }
            let fair = 3000 / count as usize;
            for size in sizes {
                assert!(
                    size.abs_diff(fair) < fair / 5,
                    "lane of {size} of {count}: {fair} expected"
                );
            }
        }
    }

    #[test]
    fn the_deal_is_fixed() {
        // FNV-1a 64 of "worker-0001" is 0x593d_daab_3b5a_fc41 (1 modulo 2 and 4, 0 modulo 3):
        // every process, build and version must agree on it.
        assert!(Lane::new(1, 2).is_some_and(|l| l.holds("worker-0001")));
        assert!(Lane::new(1, 4).is_some_and(|l| l.holds("worker-0001")));
        assert!(Lane::new(0, 3).is_some_and(|l| l.holds("worker-0001")));
        assert!(Lane::ALL.holds("anything"));
    }
}
