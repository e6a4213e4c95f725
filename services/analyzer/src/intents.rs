//! Start intents recorded in groups: the commands being handled at the same moment share one
//! multi-row statement (see `grouped.rs`).

use crate::{grouped::Grouped, stats::Stats};
use berth_retry::{RetryPolicy, retry};
use berth_store::{
    Store, StoreError,
    commands::{StartApplied, StartIntent},
};
use std::sync::Arc;

/// Most intents in one statement.
const MAX_GROUP: usize = 256;
/// Statements in flight at once: the next group gathers while one is in the database (see
/// `placing::COMMIT_GROUPS_IN_FLIGHT`).
const GROUPS_IN_FLIGHT: usize = 1;

/// Why an intent was not recorded (already logged).
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotRecorded {
    /// The database is unavailable: the command is redelivered.
    #[error("start intent not recorded")]
    Unavailable,
    /// The database refused the intent for good (its data, or an error retrying cannot
    /// mend): the command is dead-lettered rather than retried forever.
    #[error("the database refused the start: {0}")]
    Refused(String),
}

type Recorded = Result<StartApplied, NotRecorded>;

/// Records start intents in groups.
#[derive(Debug, Clone)]
pub struct Intents(Grouped<StartIntent, Recorded>);

impl Intents {
    /// Starts the grouping task on the current runtime.
    pub fn spawn(store: Store, stats: Arc<Stats>) -> Intents {
        Intents(Grouped::spawn(
            MAX_GROUP,
            GROUPS_IN_FLIGHT,
            move |intents| record(store.clone(), stats.clone(), intents),
        ))
    }

    /// Records `intent` (in a group with whatever else is waiting) and says what it did.
    pub async fn apply(&self, intent: StartIntent) -> Recorded {
        self.0
            .call(intent)
            .await
            .map_err(|_| NotRecorded::Unavailable)?
    }
}

async fn record(store: Store, stats: Arc<Stats>, intents: Vec<StartIntent>) -> Vec<Recorded> {
    stats.start_groups.inc();
    stats.starts_grouped.inc_by(intents.len() as u64);
    let applied = retry(
        "record start intents",
        RetryPolicy::QUICK,
        StoreError::is_transient,
        || store.apply_starts(&intents),
    )
    .await;
    match applied {
        Ok(results) => results.into_iter().map(Ok).collect(),
        // One intent the database refuses must not hold back the others: alone, each gets
        // its own answer.
        Err(e) if intents.len() > 1 && !e.is_transient() => {
            tracing::warn!(%e, n = intents.len(), "a group of start intents failed; recording them one by one");
            let mut out = Vec::with_capacity(intents.len());
            for intent in &intents {
                out.push(match store.apply_starts(std::slice::from_ref(intent)).await {
                    Ok(mut r) => r.pop().ok_or(NotRecorded::Unavailable),
                    Err(e) if !e.is_transient() => Err(NotRecorded::Refused(e.to_string())),
                    Err(e) => {
                        tracing::warn!(%e, instance_id = intent.id, "cannot record the start intent; it will be redelivered");
                        Err(NotRecorded::Unavailable)
                    }
                });
            }
            out
        }
        Err(e) if !e.is_transient() => {
            vec![Err(NotRecorded::Refused(e.to_string())); intents.len()]
        }
        Err(e) => {
            tracing::warn!(%e, n = intents.len(), "cannot record start intents; the commands will be redelivered");
            vec![Err(NotRecorded::Unavailable); intents.len()]
        }
    }
}
