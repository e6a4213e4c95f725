//! Points where a test can hold an analyzer to make an interleaving deterministic. With the
//! `testing` feature off (production), `Hooks` is empty and every point costs nothing.

use berth_proto::Version;
#[cfg(feature = "testing")]
use futures::future::BoxFuture;
#[cfg(feature = "testing")]
use std::sync::Arc;

/// Called with (instance id, version); the analyzer waits for the returned future.
#[cfg(feature = "testing")]
pub type Hook = Arc<dyn Fn(String, Version) -> BoxFuture<'static, ()> + Send + Sync>;

#[derive(Clone, Default)]
pub struct Hooks {
    /// After a fit found a placement, before the commit.
    #[cfg(feature = "testing")]
    pub before_commit: Option<Hook>,
    /// After a fit found nothing, before the instance is marked pending.
    #[cfg(feature = "testing")]
    pub before_pending: Option<Hook>,
}

impl Hooks {
    /// Runs the `before_commit` hook, if any.
    #[cfg_attr(not(feature = "testing"), expect(clippy::unused_async))]
    pub(crate) async fn before_commit(&self, _id: &str, _version: Version) {
        #[cfg(feature = "testing")]
        if let Some(hook) = &self.before_commit {
            hook(_id.to_owned(), _version).await;
        }
    }

    /// Runs the `before_pending` hook, if any.
    #[cfg_attr(not(feature = "testing"), expect(clippy::unused_async))]
    pub(crate) async fn before_pending(&self, _id: &str, _version: Version) {
        #[cfg(feature = "testing")]
        if let Some(hook) = &self.before_pending {
            hook(_id.to_owned(), _version).await;
        }
    }
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Hooks");
        #[cfg(feature = "testing")]
        d.field("before_commit", &self.before_commit.is_some())
            .field("before_pending", &self.before_pending.is_some());
        d.finish()
    }
}
