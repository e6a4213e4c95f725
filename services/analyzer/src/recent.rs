//! The commands the watch heard lately, per instance, forgotten after a while.
//!
//! Forgetting goes in the order things were heard, so each entry is looked at once. The
//! map used to be swept whole whenever it held 4,096 entries, and while all of them were
//! recent (any burst of more than 4,096 commands a second) that sweep ran on every command
//! heard: a clock read per entry, 15 % of an analyzer's CPU in `berth bench place`.

use berth_proto::Command;
use std::{
    collections::{HashMap, VecDeque},
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct Recent {
    keep_for: Duration,
    by_id: HashMap<String, (Instant, Option<Command>)>,
    /// When each entry was heard, oldest first (an instance heard again appears twice).
    order: VecDeque<(Instant, String)>,
}

impl Recent {
    pub fn new(keep_for: Duration) -> Self {
        Recent {
            keep_for,
            by_id: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers `command` for `instance_id`, heard at `now`.
    pub fn insert(&mut self, instance_id: &str, command: Option<Command>, now: Instant) {
        self.forget_before(now);
        self.by_id.insert(instance_id.to_owned(), (now, command));
        self.order.push_back((now, instance_id.to_owned()));
    }

    /// The command last heard for `instance_id`, if it was heard less than `keep_for` before
    /// `now`.
    pub fn get(&self, instance_id: &str, now: Instant) -> Option<&Option<Command>> {
        self.by_id
            .get(instance_id)
            .filter(|(at, _)| now.saturating_duration_since(*at) < self.keep_for)
            .map(|(_, command)| command)
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.keep_for {
                break;
            }
            if let Some((at, id)) = self.order.pop_front()
                && self.by_id.get(&id).is_some_and(|(last, _)| *last == at)
            {
                self.by_id.remove(&id);
            }
        }
    }

    /// Instances remembered now (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_forgotten_in_order_unless_heard_again() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut recent = Recent::new(ms(1000));
        recent.insert("a", None, t0);
        recent.insert("b", None, t0 + ms(500));
        recent.insert("a", None, t0 + ms(800)); // heard again: kept longer
        assert!(recent.get("a", t0 + ms(900)).is_some());
        assert!(recent.get("c", t0 + ms(900)).is_none());
        recent.insert("c", None, t0 + ms(1600));
        assert_eq!(recent.len(), 2, "b is forgotten, a and c are not");
        assert!(recent.get("b", t0 + ms(1600)).is_none());
        assert!(recent.get("a", t0 + ms(1700)).is_some());
        // Too old to count even before the next insert forgets it.
        assert!(recent.get("a", t0 + ms(1800)).is_none());
        recent.insert("d", None, t0 + ms(3000));
        assert_eq!(recent.len(), 1);
        assert!(!recent.is_empty());
    }
}
