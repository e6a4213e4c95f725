//! berth's state in PostgreSQL: the schema, the embedded migrations, and every query, including
//! the compare-and-swap commit of a placement.
//!
//! Concurrency rules, relied on by every transaction here:
//! - A command or report for an instance first locks the instance row (`FOR UPDATE`), then
//!   touches allocations and GPUs. A placement commit does the same (its CAS update comes
//!   first). One lock order, so these never deadlock each other.
//! - Under READ COMMITTED each statement sees what committed before it started, so a
//!   statement that runs after taking the row lock sees every placement that held it before.

pub mod commands;
pub mod connect;
pub mod error;
mod eviction;
pub mod keys;
pub mod models;
pub mod outbox;
pub mod placement;
pub mod pool;
mod prepared;
pub mod queries;
pub mod reports;
pub mod routes;
pub mod schema;
pub mod sweep;
pub mod workers;

pub use error::StoreError;
pub use models::{AllocationRow, GpuRow, InstanceRow, Transition, WorkerRow};
pub use pool::{Store, create_database, migrate};

/// The SQL statements' state literals are the lifecycle's sets (`berth_proto::lifecycle`):
/// a change of a rule there fails here until the statement follows.
#[cfg(test)]
mod sql_follows_the_lifecycle {
    use berth_proto::{
        InstanceState as S,
        lifecycle::{self, sql_list},
        status::ReportedState as R,
    };
    use std::collections::BTreeSet;

    /// Every quoted word of `sql` that names a state.
    fn state_literals(sql: &str) -> BTreeSet<S> {
        sql.split('\'')
            .skip(1)
            .step_by(2)
            .filter_map(|word| word.parse().ok())
            .collect()
    }

    #[test]
    fn every_state_literal_of_the_statements_is_a_lifecycle_rule() {
        // A start: analyzing, unless it would change nothing on a placed instance.
        let start = crate::commands::START_UPSERT_MANY;
        assert!(start.contains(&format!("state = '{}'", lifecycle::ANALYZING)));
        assert!(start.contains(&format!(
            "instances.state IN ({})",
            sql_list(&lifecycle::PLACED)
        )));
        let mut want: BTreeSet<S> = lifecycle::PLACED.into();
        want.insert(lifecycle::ANALYZING);
        assert_eq!(state_literals(start), want);

        // A commit: from analyzing (at the analysis's version) to scheduled.
        for commit in [crate::placement::COMMIT, crate::placement::COMMIT_MANY] {
            assert!(commit.contains(&format!("state = '{}'", lifecycle::ANALYZING)));
            assert!(commit.contains("SET state = 'scheduled'"));
            assert_eq!(
                state_literals(commit),
                BTreeSet::from([lifecycle::ANALYZING, S::Scheduled])
            );
        }

        // Forward reports: starting from scheduled (or from starting and running for a newer
        // restart), running from scheduled or starting; nothing from an older restart.
        use lifecycle::Restarts::{Newer, Older, Same};
        assert_eq!(
            lifecycle::report_moves_from(R::Starting, Same),
            [S::Scheduled]
        );
        assert_eq!(
            lifecycle::report_moves_from(R::Starting, Newer),
            lifecycle::PLACED
        );
        for restarts in [Same, Newer] {
            assert_eq!(
                lifecycle::report_moves_from(R::Running, restarts),
                [S::Scheduled, S::Starting]
            );
        }
        assert!(lifecycle::report_moves_from(R::Running, Older).is_empty());
        assert!(lifecycle::report_moves_from(R::Starting, Older).is_empty());
        let forward = crate::reports::FORWARD_MANY;
        for alias in ["s", "f"] {
            let rule = format!(
                "{alias}.restarts >= i.restarts AND (i.state = 'scheduled' \
                OR (i.state = 'starting' AND {alias}.to_state = 'running') \
                OR ({alias}.to_state = 'starting' AND {alias}.restarts > i.restarts \
                    AND i.state IN ({})))",
                sql_list(&[S::Starting, S::Running])
            );
            assert!(forward.contains(&rule), "{rule}");
        }
        assert_eq!(
            state_literals(forward),
            BTreeSet::from([S::Scheduled, S::Starting, S::Running])
        );
    }
}
