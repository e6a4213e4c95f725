//! How often a failing server is restarted: exponential backoff (the delays of a
//! [`RetryPolicy`]), at most `max_restarts` within a sliding `window`.

use berth_retry::RetryPolicy;
use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy)]
pub struct RestartLimits {
    /// Restarts allowed within `window`; past them the placement is given up (`error`).
    pub max_restarts: u32,
    pub window: Duration,
    /// First and largest delay before a restart (`give_up_after` is not used).
    pub backoff: RetryPolicy,
}

impl Default for RestartLimits {
    fn default() -> Self {
        Self {
            max_restarts: 5,
            window: Duration::from_secs(600),
            backoff: RetryPolicy {
                first_delay: Duration::from_secs(1),
                max_delay: Duration::from_secs(60),
                give_up_after: None,
            },
        }
    }
}

/// The restarts of one placement.
#[derive(Debug)]
pub struct RestartBudget {
    limits: RestartLimits,
    recent: VecDeque<Instant>,
}

impl RestartBudget {
    pub fn new(limits: RestartLimits) -> RestartBudget {
        RestartBudget {
            limits,
            recent: VecDeque::new(),
        }
    }

    /// A failure at `now`: the delay before the restart, or `None` when the budget of the
    /// window is spent.
    pub fn on_failure(&mut self, now: Instant) -> Option<Duration> {
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= self.limits.window)
        {
            self.recent.pop_front();
        }
        let n = u32::try_from(self.recent.len()).unwrap_or(u32::MAX);
        if n >= self.limits.max_restarts {
            return None;
        }
        self.recent.push_back(now);
        Some(delay(&self.limits.backoff, n))
    }
}

/// `first_delay × 2ⁿ`, at most `max_delay`.
pub fn delay(policy: &RetryPolicy, n: u32) -> Duration {
    let factor = 1u32.checked_shl(n.min(31)).unwrap_or(u32::MAX);
    policy
        .first_delay
        .checked_mul(factor)
        .unwrap_or(policy.max_delay)
        .min(policy.max_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u32, window_s: u64) -> RestartLimits {
        RestartLimits {
            max_restarts: max,
            window: Duration::from_secs(window_s),
            backoff: RetryPolicy {
                first_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(350),
                give_up_after: None,
            },
        }
    }

    #[test]
    fn restarts_back_off_exponentially_up_to_the_cap() {
        let mut b = RestartBudget::new(limits(10, 60));
        let t = Instant::now();
        let delays: Vec<_> = (0..5)
            .map(|_| b.on_failure(t).unwrap().as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 350, 350, 350]);
        assert_eq!(
            delay(&limits(1, 1).backoff, 200),
            Duration::from_millis(350)
        );
    }

    #[test]
    fn the_budget_is_per_window() {
        let mut b = RestartBudget::new(limits(2, 60));
        let t = Instant::now();
        assert!(b.on_failure(t).is_some());
        assert!(b.on_failure(t + Duration::from_secs(10)).is_some());
        assert_eq!(
            b.on_failure(t + Duration::from_secs(20)),
            None,
            "3rd in 60 s"
        );
        // The first restart leaves the window: one more is allowed, after the second delay.
        assert_eq!(
            b.on_failure(t + Duration::from_secs(61)),
            Some(Duration::from_millis(200))
        );
        assert_eq!(b.on_failure(t + Duration::from_secs(62)), None);
        assert_eq!(RestartBudget::new(limits(0, 60)).on_failure(t), None);
    }
}
