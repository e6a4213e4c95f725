//! Keeps the route table true: every instance event makes the gateway read that instance's
//! row again, and the whole table is read again every `full_every` (and after an error).
//!
//! Events only say *which* instance changed; the row is the truth. So the order in which
//! events arrive, and a gap between the first read and the subscription, cannot leave a
//! stale route: the subscription is made before the first read, and every change after it
//! triggers a read that sees it.

use crate::routes::Routes;
use berth_proto::subjects;
use berth_store::Store;
use futures::{FutureExt, StreamExt};
use std::{collections::BTreeSet, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

/// Events taken in one read: a burst of changes costs one query.
const MAX_BATCH: usize = 512;

pub async fn follow(
    mut events: async_nats::Subscriber,
    store: Store,
    routes: Arc<Routes>,
    full_every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(full_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => None,
            m = events.next() => match m {
                Some(m) => Some(m),
                None => {
                    tracing::warn!("event subscription ended; the route table follows the database only");
                    shutdown.cancelled().await;
                    return;
                }
            },
        };
        let read = match first {
            None => store.routes(None).await.map(|rows| (rows, true)),
            Some(first) => {
                let mut ids = BTreeSet::new();
                ids.extend(subjects::instance_of_event_subject(&first.subject).map(str::to_owned));
                while ids.len() < MAX_BATCH {
                    match events.next().now_or_never() {
                        Some(Some(m)) => {
                            ids.extend(
                                subjects::instance_of_event_subject(&m.subject).map(str::to_owned),
                            );
                        }
                        _ => break,
                    }
                }
                let ids: Vec<String> = ids.into_iter().collect();
                store.routes(Some(&ids)).await.map(|rows| {
                    // An id with no row: the instance is gone.
                    let mut rows = rows;
                    let gone: Vec<&String> = ids
                        .iter()
                        .filter(|id| !rows.iter().any(|r| &r.id == *id))
                        .collect();
                    for id in gone {
                        rows.push(berth_store::routes::RouteRow {
                            id: id.clone(),
                            model: String::new(),
                            state: String::new(),
                            endpoint: None,
                            reason: None,
                        });
                    }
                    (rows, false)
                })
            }
        };
        match read {
            Ok((rows, complete)) => routes.apply(&rows, complete),
            Err(e) => {
                tracing::warn!(%e, "cannot read routes; reading all of them again shortly");
                tick.reset_after(Duration::from_millis(500));
            }
        }
    }
}
