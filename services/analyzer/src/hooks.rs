//! Points where a test can hold an analyzer to make an interleaving deterministic.

use futures::future::BoxFuture;
use std::sync::Arc;

/// Called with (instance id, version) after the fit and before the commit.
pub type BeforeCommit = Arc<dyn Fn(String, i64) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Hooks {
    pub before_commit: Option<BeforeCommit>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("before_commit", &self.before_commit.is_some())
            .finish()
    }
}
