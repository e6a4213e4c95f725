//! Whether the database has been reachable long enough for silence to mean anything: while
//! PostgreSQL is down (or failing over), heartbeats cannot be recorded, and a worker's
//! `last_heartbeat` ages although its agent never stopped sending. Right after, every worker
//! would look silent.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct StoreHealth {
    /// The last time the store could not be reached; the analyzer's start counts as one
    /// (what happened before it is unknown).
    last_failure: Mutex<Instant>,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth {
            last_failure: Mutex::new(Instant::now()),
        }
    }
}

impl StoreHealth {
    /// A statement failed for want of the database (a transient error).
    pub(crate) fn failed(&self) {
        if let Ok(mut at) = self.last_failure.lock() {
            *at = Instant::now();
        }
    }

    /// Whether the database answered throughout the last `window`, so that heartbeats sent
    /// in it were recorded (or are about to be: their redeliveries are being applied).
    pub(crate) fn reachable_for(&self, window: Duration) -> bool {
        self.last_failure
            .lock()
            .map(|at| at.elapsed() >= window)
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_counts_only_once_the_database_answered_for_the_whole_window() {
        let health = StoreHealth::default();
        assert!(!health.reachable_for(Duration::from_secs(60)));
        assert!(health.reachable_for(Duration::ZERO));
        health.failed();
        assert!(!health.reachable_for(Duration::from_secs(1)));
    }
}
