//! Retries of transient failures (a dropped database connection, a NATS request timeout).
//!
//! The only place that uses the `backoff` crate: it is unmaintained (RUSTSEC-2025-0012), so
//! keeping it behind this one function makes it cheap to swap.

use std::{future::Future, time::Duration};

/// How long and how often to retry.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// Give up once this much time has passed since the first attempt; `None` retries forever.
    pub give_up_after: Option<Duration>,
}

impl RetryPolicy {
    /// For work on the hot path: a few quick tries.
    pub const QUICK: RetryPolicy = RetryPolicy {
        first_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(200),
        give_up_after: Some(Duration::from_secs(5)),
    };
    /// For loops that must outlive a server restart: keep trying, at most every 2 s.
    pub const PATIENT: RetryPolicy = RetryPolicy {
        first_delay: Duration::from_millis(50),
        max_delay: Duration::from_secs(2),
        give_up_after: None,
    };
}

/// Runs `op` until it succeeds, fails with an error `is_transient` rejects, or the policy
/// gives up (then the last error is returned).
pub async fn retry<T, E, Op, Fut>(
    what: &str,
    policy: RetryPolicy,
    is_transient: impl Fn(&E) -> bool,
    mut op: Op,
) -> Result<T, E>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let backoff = backoff::ExponentialBackoffBuilder::new()
        .with_initial_interval(policy.first_delay)
        .with_max_interval(policy.max_delay)
        .with_max_elapsed_time(policy.give_up_after)
        .build();
    backoff::future::retry_notify(
        backoff,
        || {
            let fut = op();
            let transient = &is_transient;
            async move {
                fut.await.map_err(|e| {
                    if transient(&e) {
                        backoff::Error::transient(e)
                    } else {
                        backoff::Error::permanent(e)
                    }
                })
            }
        },
        |e: E, wait: Duration| tracing::warn!(%e, ?wait, "{what} failed; retrying"),
    )
    .await
}

/// How [`retry_until`] ended without a result.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Interrupted<E> {
    /// A permanent error, or the last transient one when the policy gave up.
    #[error(transparent)]
    Failed(E),
    /// `shutdown` fired first.
    #[error("stopped: shutting down")]
    Shutdown,
}

/// [`retry`] that also stops when `shutdown` fires, for loops that retry a long time (the
/// [`RetryPolicy::PATIENT`] ones): a process shutting down does not wait on a server that
/// is gone, and a permanent error ends at once as with [`retry`].
pub async fn retry_until<T, E, Op, Fut>(
    what: &str,
    policy: RetryPolicy,
    is_transient: impl Fn(&E) -> bool,
    shutdown: &tokio_util::sync::CancellationToken,
    op: Op,
) -> Result<T, Interrupted<E>>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    tokio::select! {
        () = shutdown.cancelled() => Err(Interrupted::Shutdown),
        done = retry(what, policy, is_transient, op) => done.map_err(Interrupted::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn retries_transient_errors_until_success() {
        let tries = AtomicU32::new(0);
        let out: Result<u32, String> = retry(
            "op",
            RetryPolicy::QUICK,
            |_| true,
            || async {
                let n = tries.fetch_add(1, Ordering::SeqCst);
                if n < 2 {
                    Err(format!("fail {n}"))
                } else {
                    Ok(n)
                }
            },
        )
        .await;
        assert_eq!(out, Ok(2));
    }

    #[tokio::test]
    async fn stops_at_a_permanent_error() {
        let tries = AtomicU32::new(0);
        let out: Result<(), String> = retry(
            "op",
            RetryPolicy::QUICK,
            |_| false,
            || async {
                tries.fetch_add(1, Ordering::SeqCst);
                Err("bad input".to_owned())
            },
        )
        .await;
        assert_eq!(out, Err("bad input".to_owned()));
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_patient_retry_stops_at_shutdown_and_at_a_permanent_error() {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let tries = AtomicU32::new(0);
        let stopper = shutdown.clone();
        let out: Result<(), Interrupted<String>> = retry_until(
            "op",
            RetryPolicy::PATIENT,
            |_| true,
            &shutdown,
            || {
                // The server never answers; shutdown comes after a few tries.
                if tries.fetch_add(1, Ordering::SeqCst) == 2 {
                    stopper.cancel();
                }
                async { Err("unavailable".to_owned()) }
            },
        )
        .await;
        assert_eq!(out, Err(Interrupted::Shutdown));
        let refused: Result<(), Interrupted<String>> = retry_until(
            "op",
            RetryPolicy::PATIENT,
            |e: &String| e != "refused",
            &tokio_util::sync::CancellationToken::new(),
            || async { Err("refused".to_owned()) },
        )
        .await;
        assert_eq!(refused, Err(Interrupted::Failed("refused".to_owned())));
    }
}
