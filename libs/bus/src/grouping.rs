//! Taking work in groups: whatever is queued when a worker is free goes out together, and
//! nothing waits for a group to fill. Shared by the grouped superseded checks here and the
//! analyzer's grouped start intents.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// Waits for a free slot among `slots` and for at least one item, then takes what else is
/// already queued, up to `max` in all. `None` once the channel or the slots are closed.
pub async fn next_group<T>(
    slots: &Arc<Semaphore>,
    rx: &mut mpsc::UnboundedReceiver<T>,
    max: usize,
) -> Option<(OwnedSemaphorePermit, Vec<T>)> {
    // The slot first: while all are busy, arrivals queue up and go out together.
    let slot = slots.clone().acquire_owned().await.ok()?;
    let first = rx.recv().await?;
    let mut group = vec![first];
    while group.len() < max {
        match rx.try_recv() {
            Ok(next) => group.push(next),
            Err(_) => break,
        }
    }
    Some((slot, group))
}
