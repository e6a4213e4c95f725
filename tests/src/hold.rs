//! A test hook that holds an analyzer at a point until the test lets it go.

use berth_analyzer::{Hook, Hooks};
use berth_proto::Version;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc, oneshot};

pub type Held = mpsc::UnboundedReceiver<(String, Version, oneshot::Sender<()>)>;

/// A hook that sends (instance, version, go-ahead) each time it is reached and waits for the
/// go-ahead.
pub fn hold() -> (Hook, Held) {
    let (tx, rx) = mpsc::unbounded_channel();
    let tx = Arc::new(Mutex::new(tx));
    let hook: Hook = Arc::new(move |id: String, version: Version| {
        let tx = tx.clone();
        Box::pin(async move {
            let (go, wait) = oneshot::channel();
            let _ = tx.lock().await.send((id, version, go));
            let _ = wait.await;
        })
    });
    (hook, rx)
}

/// Hooks that hold the analyzer after a fit found a placement, before its commit.
pub fn hold_before_commit() -> (Hooks, Held) {
    let (hook, held) = hold();
    let hooks = Hooks {
        before_commit: Some(hook),
        ..Default::default()
    };
    (hooks, held)
}
