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

/// What a report about the instance's *current* placement does: the new state, or `None`
/// when it changes nothing (a late or repeated report). Only forward: `starting` after
/// `scheduled`, `running` after either, `error` from any placed state. `stopped` confirms a
/// stop and moves nothing by itself (see [`after_release`]).
pub fn after_report(state: InstanceState, report: ReportedState) -> Option<InstanceState> {
    match (report, state) {
        (ReportedState::Starting, S::Scheduled) => Some(S::Starting),
        (ReportedState::Running, S::Scheduled | S::Starting) => Some(S::Running),
        (ReportedState::Error, s) if is_placed(s) => Some(S::Error),
        _ => None,
    }
}

/// The states a `starting` or `running` report moves from (the grouped report statement's
/// condition).
pub fn report_moves_from(report: ReportedState) -> &'static [InstanceState] {
    match report {
        ReportedState::Starting => &[S::Scheduled],
        ReportedState::Running => &[S::Scheduled, S::Starting],
        ReportedState::Error => &PLACED,
        ReportedState::Stopped => &[],
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

    #[test]
    fn reports_move_placed_instances_forward_only() {
        for state in InstanceState::ALL {
            for report in REPORTS {
                let next = after_report(state, report);
                assert_eq!(
                    next.is_some(),
                    report_moves_from(report).contains(&state),
                    "{state} {report:?}: the table and the SQL set agree"
                );
                match next {
                    None => {}
                    Some(S::Error) => assert!(is_placed(state)),
                    Some(n) => assert!(progress(n) > progress(state), "{state} → {n}"),
                }
                if !is_placed(state) {
                    assert_eq!(next, None, "a report never moves an unplaced {state}");
                }
            }
        }
    }

    #[test]
    fn the_transition_table() {
        use ReportedState as R;
        let table = [
            (S::Scheduled, R::Starting, Some(S::Starting)),
            (S::Scheduled, R::Running, Some(S::Running)),
            (S::Starting, R::Running, Some(S::Running)),
            (S::Starting, R::Starting, None),
            (S::Running, R::Starting, None),
            (S::Running, R::Error, Some(S::Error)),
            (S::Stopping, R::Error, None),
            (S::Stopping, R::Running, None),
            (S::Analyzing, R::Running, None),
            (S::Pending, R::Error, None),
        ];
        for (state, report, want) in table {
            assert_eq!(after_report(state, report), want, "{state} {report:?}");
        }
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
