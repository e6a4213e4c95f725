//! Start intents recorded in groups: the commands being handled at the same moment share one
//! multi-row statement instead of one round trip each (a group commit). A group is whatever
//! is queued when the previous statement returns; nothing waits for a group to fill, so a
//! lone command goes out at once.

use crate::stats::Stats;
use berth_retry::{RetryPolicy, retry};
use berth_store::{
    Store, StoreError,
    commands::{StartApplied, StartIntent},
};
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Most intents in one statement.
const MAX_GROUP: usize = 256;
/// Statements in flight at once: one more group gathers while one is in the database.
const GROUPS_IN_FLIGHT: usize = 2;

/// The database could not record the intent (already logged); the command is redelivered.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("start intent not recorded")]
pub struct NotRecorded;

type Reply = oneshot::Sender<Result<StartApplied, NotRecorded>>;

/// The sending side; the grouping task ends when this is dropped.
#[derive(Debug, Clone)]
pub struct Intents {
    tx: mpsc::UnboundedSender<(StartIntent, Reply)>,
}

impl Intents {
    /// Starts the grouping task on the current runtime.
    pub fn spawn(store: Store, stats: Arc<Stats>) -> Intents {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(group(store, stats, rx));
        Intents { tx }
    }

    /// Records `intent` (in a group with whatever else is waiting) and says what it did.
    pub async fn apply(&self, intent: StartIntent) -> Result<StartApplied, NotRecorded> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((intent, reply)).map_err(|_| NotRecorded)?;
        answer.await.map_err(|_| NotRecorded)?
    }
}

async fn group(
    store: Store,
    stats: Arc<Stats>,
    mut rx: mpsc::UnboundedReceiver<(StartIntent, Reply)>,
) {
    let slots = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT));
    while let Some((slot, batch)) =
        berth_bus::grouping::next_group(&slots, &mut rx, MAX_GROUP).await
    {
        let (store, stats) = (store.clone(), stats.clone());
        tokio::spawn(async move {
            let (intents, replies): (Vec<StartIntent>, Vec<Reply>) = batch.into_iter().unzip();
            stats.start_groups.inc();
            stats.starts_grouped.inc_by(intents.len() as u64);
            let applied = retry(
                "record start intents",
                RetryPolicy::QUICK,
                StoreError::is_transient,
                || store.apply_starts(&intents),
            )
            .await;
            drop(slot);
            match applied {
                Ok(results) => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                // One intent the database refuses must not hold back the others: alone, each
                // gets its own answer.
                Err(e) if intents.len() > 1 && !e.is_transient() => {
                    tracing::warn!(%e, n = intents.len(), "a group of start intents failed; recording them one by one");
                    for (intent, reply) in intents.into_iter().zip(replies) {
                        let one = std::slice::from_ref(&intent);
                        let result = match store.apply_starts(one).await {
                            Ok(mut r) => r.pop().ok_or(NotRecorded),
                            Err(e) => {
                                tracing::warn!(%e, instance_id = intent.id, "cannot record the start intent; it will be redelivered");
                                Err(NotRecorded)
                            }
                        };
                        let _ = reply.send(result);
                    }
                }
                Err(e) => {
                    tracing::warn!(%e, n = intents.len(), "cannot record start intents; the commands will be redelivered");
                    for reply in replies {
                        let _ = reply.send(Err(NotRecorded));
                    }
                }
            }
        });
    }
}
