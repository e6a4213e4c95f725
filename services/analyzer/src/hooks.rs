//! Points where a test can hold an analyzer to make an interleaving deterministic.

use futures::future::BoxFuture;
use std::sync::Arc;

/// Called with (instance id, version); the analyzer waits for the returned future.
pub type Hook = Arc<dyn Fn(String, i64) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Hooks {
    /// After a fit found a placement, before the commit.
    pub before_commit: Option<Hook>,
    /// After a fit found nothing, before the instance is marked pending.
    pub before_pending: Option<Hook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("before_commit", &self.before_commit.is_some())
            .field("before_pending", &self.before_pending.is_some())
            .finish()
    }
}
