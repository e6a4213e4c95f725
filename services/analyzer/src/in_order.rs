//! Reports about one instance are applied in the order they arrived, while reports about
//! different instances are applied concurrently. Without it, an agent's `running` (grouped
//! with others) and the `error` right after it could commit the other way round, and the
//! `running` would be lost with its event.

use futures::future::{FutureExt, Shared};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};
use tokio::sync::oneshot;

type Done = Shared<oneshot::Receiver<()>>;

#[derive(Debug, Default)]
pub struct InOrder {
    /// Per key, the completion of the latest message taken in.
    last: Mutex<HashMap<String, Done>>,
}

/// One message's place in its key's line; dropping it lets the next one go.
#[derive(Debug)]
pub struct Turn {
    owner: Arc<InOrder>,
    key: String,
    before: Option<Done>,
    mine: Done,
    done: Option<oneshot::Sender<()>>,
}

impl InOrder {
    /// Takes the next place in `key`'s line. Call in arrival order (synchronously, as the
    /// messages come in); then await [`Turn::wait`] before handling.
    pub fn take(self: &Arc<Self>, key: &str) -> Turn {
        let (tx, rx) = oneshot::channel();
        let mine = rx.shared();
        let before = self
            .last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), mine.clone());
        Turn {
            owner: self.clone(),
            key: key.to_owned(),
            before,
            mine,
            done: Some(tx),
        }
    }

    #[cfg(test)]
    pub fn waiting_keys(&self) -> usize {
        self.last.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Turn {
    /// Resolves once every earlier message of the key is done.
    pub async fn wait(&mut self) {
        if let Some(before) = self.before.take() {
            // An error only means the earlier one was dropped: it is done either way.
            let _ = before.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
        let mut last = self.owner.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.get(&self.key).is_some_and(|d| d.ptr_eq(&self.mine)) {
            last.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_later_message_of_a_key_waits_for_the_earlier_and_other_keys_do_not() {
        let order = Arc::new(InOrder::default());
        let first = order.take("a");
        let mut second = order.take("a");
        let mut other = order.take("b");
        other
            .wait()
            .now_or_never()
            .expect("another key does not wait");
        assert!(
            second.wait().now_or_never().is_none(),
            "waits for the first"
        );
        drop(first);
        second
            .wait()
            .now_or_never()
            .expect("goes once the first is done");
        drop(second);
        drop(other);
        assert_eq!(order.waiting_keys(), 0, "nothing kept once all are done");
    }
}
