//! Work done in groups (a group commit): the requests made at the same moment share one
//! database statement instead of one round trip each. A group is whatever is queued when a
//! statement slot frees up; nothing waits for a group to fill, so a lone request goes out at
//! once.

use std::{future::Future, sync::Arc};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// The grouping task went away (the analyzer is stopping) or dropped the request.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("grouped request not answered")]
pub struct Unanswered;

type Queued<Req, Resp> = (Req, oneshot::Sender<Resp>);

/// The sending side; the grouping task ends when every clone is dropped.
#[derive(Debug)]
pub struct Grouped<Req, Resp> {
    tx: mpsc::UnboundedSender<Queued<Req, Resp>>,
}

impl<Req, Resp> Clone for Grouped<Req, Resp> {
    fn clone(&self) -> Self {
        Grouped {
            tx: self.tx.clone(),
        }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Grouped<Req, Resp> {
    /// Starts the grouping task on the current runtime: up to `in_flight` groups of at most
    /// `max` requests run at once, each through `run`, which answers every request of its
    /// group, in order.
    pub fn spawn<F, Fut>(max: usize, in_flight: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Resp>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::unbounded_channel::<Queued<Req, Resp>>();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(in_flight.max(1)));
            while let Some((slot, batch)) =
                berth_bus::grouping::next_group(&slots, &mut rx, max.max(1)).await
            {
                let (requests, replies): (Vec<Req>, Vec<oneshot::Sender<Resp>>) =
                    batch.into_iter().unzip();
                let answers = run(requests);
                tokio::spawn(async move {
                    let answers = answers.await;
                    drop(slot);
                    for (reply, answer) in replies.into_iter().zip(answers) {
                        let _ = reply.send(answer);
                    }
                });
            }
        });
        Grouped { tx }
    }

    /// Queues `req` with whatever else is waiting, and returns its answer.
    pub async fn call(&self, req: Req) -> Result<Resp, Unanswered> {
        let (reply, answer) = oneshot::channel();
        self.tx.send((req, reply)).map_err(|_| Unanswered)?;
        answer.await.map_err(|_| Unanswered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn each_request_gets_its_own_answer_and_concurrent_ones_share_a_group() {
        let groups = Arc::new(AtomicUsize::new(0));
        let counted = groups.clone();
        let doubler = Grouped::spawn(64, 1, move |xs: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                // Long enough for the others to queue behind the first group.
                tokio::task::yield_now().await;
                xs.into_iter().map(|x| x * 2).collect::<Vec<_>>()
            }
        });
        let answers = futures::future::join_all((0..100u32).map(|x| doubler.call(x))).await;
        for (x, a) in (0..100u32).zip(answers) {
            assert_eq!(a.expect("answered"), x * 2);
        }
        let n = groups.load(Ordering::SeqCst);
        assert!(
            (2..100).contains(&n),
            "{n} groups for 100 concurrent requests"
        );
    }
}
