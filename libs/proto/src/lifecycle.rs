//! The instance lifecycle in one place: which command, analysis outcome or agent report moves
//! an instance from which state to which. Pure functions and constants; the store applies
//! them (its SQL literals are pinned to these sets by a test in `berth-store`), so a new state
//! or rule is a change here first.
//!
//! ```text
//!            start                 fit found            agent                 agent
//!   (none) ───────▶ analyzing ─────────────▶ scheduled ──────▶ starting ──────▶ running
//!                      │  │  nothing fits        │ error report    │               │
//!                      │  └────────▶ pending     ▼                 ▼               ▼
//!                      └─ bad model ─────▶ error ◀─────────────────┴───────────────┘
//!   stop: stopping while GPUs are held (until every agent confirms), then stopped
//! ```

use crate::{InstanceState, status::ReportedState};

use InstanceState as S;

/// Placed on GPUs and not being stopped: the states a worker's report speaks about, and in
/// which a start with the same spec changes nothing.
pub const PLACED: [InstanceState; 3] = [S::Scheduled, S::Starting, S::Running];

/// Where an analysis runs; a placement, `pending` or an analysis `error` is committed only
/// from here (and only at the version the analysis began with).
pub const ANALYZING: InstanceState = S::Analyzing;

/// States in which a redelivered command (same sequence) is worked on again, because the
/// analyzer that applied it may have died before finishing.
pub const REDO: [InstanceState; 1] = [S::Analyzing];

/// At rest without a placement: an instance here that still holds GPUs at its current
/// version is a stage stranded by a failed or silent sibling.
pub const UNPLACED_AT_REST: [InstanceState; 3] = [S::Pending, S::Error, S::Stopped];

/// Whether an instance in `state` is placed ([`PLACED`]).
pub fn is_placed(state: InstanceState) -> bool {
    PLACED.contains(&state)
}

/// How a report's restart count compares with the one the instance has recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restarts {
    /// Fewer: the report was sent before a restart the instance already saw.
    Older,
    Same,
    /// More: the agent restarted the server since (a crash, a failed health check).
    Newer,
}

impl Restarts {
    pub fn of(reported: u32, recorded: u32) -> Restarts {
        match reported.cmp(&recorded) {
            std::cmp::Ordering::Less => Restarts::Older,
            std::cmp::Ordering::Equal => Restarts::Same,
            std::cmp::Ordering::Greater => Restarts::Newer,
        }
    }
}

/// What a report about the instance's *current* placement does: the new state, or `None`
/// when it changes nothing (a late or repeated report). Forward only — `starting` after
/// `scheduled`, `running` after either, `error` from any placed state — except a restart:
/// `starting` with more restarts than recorded takes a `starting` or `running` instance back
/// to `starting`, and a report from before a restart the instance already saw changes
/// nothing. `stopped` confirms a stop and moves nothing by itself (see [`after_release`]).
pub fn after_report(
    state: InstanceState,
    report: ReportedState,
    restarts: Restarts,
) -> Option<InstanceState> {
    match (report, state, restarts) {
        (ReportedState::Starting | ReportedState::Running, _, Restarts::Older) => None,
        (ReportedState::Starting, S::Scheduled, _) => Some(S::Starting),
        (ReportedState::Starting, S::Starting | S::Running, Restarts::Newer) => Some(S::Starting),
        (ReportedState::Running, S::Scheduled | S::Starting, _) => Some(S::Running),
        (ReportedState::Error, s, _) if is_placed(s) => Some(S::Error),
        _ => None,
    }
}

/// The states a `starting` or `running` report moves from, without and with a newer restart
/// count (the grouped report statement's condition).
pub fn report_moves_from(report: ReportedState, restarts: Restarts) -> &'static [InstanceState] {
    match (report, restarts) {
        (ReportedState::Starting | ReportedState::Running, Restarts::Older) => &[],
        (ReportedState::Starting, Restarts::Same) => &[S::Scheduled],
        (ReportedState::Starting, Restarts::Newer) => &PLACED,
        (ReportedState::Running, _) => &[S::Scheduled, S::Starting],
        (ReportedState::Error, _) => &PLACED,
        (ReportedState::Stopped, _) => &[],
    }
}

/// After GPUs were released: a `stopping` instance that holds nothing more is `stopped`.
pub fn after_release(state: InstanceState, holds_more: bool) -> Option<InstanceState> {
    (state == S::Stopping && !holds_more).then_some(S::Stopped)
}

/// An accepted stop: `stopped` at once when nothing is held, else `stopping` until every
/// holding agent confirms.
pub fn after_stop(holds_gpus: bool) -> InstanceState {
    if holds_gpus { S::Stopping } else { S::Stopped }
}

/// A rejected command: an instance that holds GPUs keeps its state (the rejection goes in its
/// reason, so a bad command never hides a running backend); any other goes to `error`.
pub fn after_invalid(state: InstanceState, holds_gpus: bool) -> InstanceState {
    if holds_gpus { state } else { S::Error }
}

/// A worker gone silent for good, for an instance with a part on it: a placed instance is
/// placed again (`pending` until the analyzers do), a stopping one whose GPUs are all gone is
/// `stopped`, anything else keeps its state.
pub fn after_worker_lost(
    state: InstanceState,
    placed_there: bool,
    holds_more: bool,
) -> Option<InstanceState> {
    if placed_there && is_placed(state) {
        Some(S::Pending)
    } else {
        after_release(state, holds_more)
    }
}

/// `'a', 'b'` for an SQL `IN (…)` list of states.
pub fn sql_list(states: &[InstanceState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORTS: [ReportedState; 4] = [
        ReportedState::Starting,
        ReportedState::Running,
        ReportedState::Stopped,
        ReportedState::Error,
    ];

    /// The position of a state along the way to `running`; reports only move forward.
    fn progress(s: InstanceState) -> Option<u8> {
        match s {
            S::Scheduled => Some(0),
            S::Starting => Some(1),
            S::Running => Some(2),
            _ => None,
        }
    }

    const COUNTS: [Restarts; 3] = [Restarts::Older, Restarts::Same, Restarts::Newer];

    #[test]
    fn reports_move_placed_instances_forward_only_but_for_a_restart() {
        for state in InstanceState::ALL {
            for report in REPORTS {
                for restarts in COUNTS {
                    let next = after_report(state, report, restarts);
                    assert_eq!(
                        next.is_some(),
                        report_moves_from(report, restarts).contains(&state),
                        "{state} {report:?} {restarts:?}: the table and the SQL set agree"
                    );
                    match next {
                        None => {}
                        Some(S::Error) => assert!(is_placed(state)),
                        // Back to starting only for a newer restart.
                        Some(n) if progress(n) <= progress(state) => {
                            assert_eq!((n, restarts), (S::Starting, Restarts::Newer));
                        }
                        Some(_) => {}
                    }
                    if !is_placed(state) {
                        assert_eq!(next, None, "a report never moves an unplaced {state}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_transition_table() {
        use ReportedState as R;
        use Restarts::{Newer, Older, Same};
        let table = [
            (S::Scheduled, R::Starting, Same, Some(S::Starting)),
            (S::Scheduled, R::Running, Same, Some(S::Running)),
            (S::Starting, R::Running, Same, Some(S::Running)),
            (S::Starting, R::Starting, Same, None),
            (S::Running, R::Starting, Same, None),
            (S::Running, R::Starting, Newer, Some(S::Starting)),
            (S::Starting, R::Starting, Newer, Some(S::Starting)),
            (S::Starting, R::Running, Older, None),
            (S::Running, R::Error, Same, Some(S::Error)),
            (S::Stopping, R::Error, Same, None),
            (S::Stopping, R::Running, Same, None),
            (S::Stopping, R::Starting, Newer, None),
            (S::Analyzing, R::Running, Same, None),
            (S::Pending, R::Error, Same, None),
        ];
        for (state, report, restarts, want) in table {
            assert_eq!(
                after_report(state, report, restarts),
                want,
                "{state} {report:?} {restarts:?}"
            );
        }
        assert_eq!(Restarts::of(1, 0), Newer);
        assert_eq!(Restarts::of(0, 1), Older);
        assert_eq!(after_stop(true), S::Stopping);
        assert_eq!(after_stop(false), S::Stopped);
        assert_eq!(after_release(S::Stopping, false), Some(S::Stopped));
        assert_eq!(after_release(S::Stopping, true), None);
        assert_eq!(after_release(S::Running, false), None);
        for state in InstanceState::ALL {
            assert_eq!(after_invalid(state, true), state);
            assert_eq!(after_invalid(state, false), S::Error);
        }
        assert_eq!(after_worker_lost(S::Running, true, false), Some(S::Pending));
        assert_eq!(
            after_worker_lost(S::Stopping, true, false),
            Some(S::Stopped)
        );
        assert_eq!(after_worker_lost(S::Stopping, false, true), None);
        assert_eq!(after_worker_lost(S::Pending, true, false), None);
    }

    #[test]
    fn state_sets_do_not_overlap_where_they_must_not() {
        for s in PLACED {
            assert!(!UNPLACED_AT_REST.contains(&s) && !REDO.contains(&s));
        }
        assert!(UNPLACED_AT_REST.iter().all(|s| s.is_terminal()));
        assert_eq!(sql_list(&PLACED), "'scheduled', 'starting', 'running'");
    }
}
