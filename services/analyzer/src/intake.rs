//! The pull loop shared by the command and status intakes: bounded concurrency, ack after
//! handling, a delayed redelivery when handling failed for a transient reason.

use async_nats::jetstream::{AckKind, Message, consumer::PullConsumer};
use futures::StreamExt;
use std::{future::Future, sync::Arc, time::Duration};
use tokio::{sync::Semaphore, task::JoinSet};
use tokio_util::sync::CancellationToken;

use crate::{commands, context::Ctx};

/// How a handler finished with a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Done (applied, stale, or dead-lettered): acknowledge.
    Done,
    /// A dependency is down: redeliver after a while.
    Retry,
    /// The message itself is at fault (the database refused its data for good): the command
    /// handler dead-letters it; acknowledged like `Done` if it reaches the pull loop.
    Refused(String),
}

/// Redelivery delay after a transient failure.
const RETRY_DELAY: Duration = Duration::from_millis(500);

pub async fn run(ctx: Arc<Ctx>, consumer: PullConsumer, shutdown: CancellationToken) {
    let concurrency = ctx.config.concurrency;
    pull_loop("commands", consumer, concurrency, shutdown, move |msg| {
        let ctx = ctx.clone();
        async move { commands::handle(&ctx, &msg).await }
    })
    .await;
}

/// How often a message still being worked on tells JetStream not to redeliver it.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// Runs `work`, sending in-progress acks while it lasts, so a long fit keeps its message.
async fn keep_alive<Fut: Future<Output = Handled>>(msg: &Message, work: Fut) -> Handled {
    let mut work = std::pin::pin!(work);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tokio::select! {
            outcome = &mut work => return outcome,
            _ = tick.tick() => {
                if let Err(e) = msg.ack_with(AckKind::Progress).await {
                    tracing::warn!(%e, "progress ack failed");
                }
            }
        }
    }
}

/// Pulls messages until `shutdown`, handling up to `concurrency` at once.
pub async fn pull_loop<H, Fut>(
    what: &'static str,
    consumer: PullConsumer,
    concurrency: usize,
    shutdown: CancellationToken,
    handler: H,
) where
    H: Fn(Arc<Message>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Handled> + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut running = JoinSet::new();
    'outer: while !shutdown.is_cancelled() {
        let mut messages = match berth_bus::pull(&consumer, concurrency.clamp(1, 256)).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%e, "{what}: cannot pull; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(RETRY_DELAY) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => break 'outer,
                next = messages.next() => next,
            };
            let msg = match next {
                Some(Ok(msg)) => Arc::new(msg),
                Some(Err(e)) => {
                    tracing::warn!(%e, "{what}: pull error");
                    continue;
                }
                None => break,
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break 'outer;
            };
            let fut = handler(msg.clone());
            running.spawn(async move {
                let outcome = keep_alive(&msg, fut).await;
                let ack = match outcome {
                    Handled::Done => msg.ack().await,
                    Handled::Refused(why) => {
                        tracing::warn!(why, "{what}: message refused");
                        msg.ack().await
                    }
                    Handled::Retry => msg.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await,
                };
                if let Err(e) = ack {
                    tracing::warn!(%e, "ack failed; the message will be redelivered");
                }
                drop(permit);
            });
            while running.try_join_next().is_some() {}
        }
    }
    while running.join_next().await.is_some() {}
}
