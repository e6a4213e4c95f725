//! Bearer keys: who may call what. The live keys are read from PostgreSQL at start and again
//! every `reload_every`, so a revoked key stops working within that time on every gateway.

use crate::errors::ApiError;
use axum::http::{HeaderMap, header::AUTHORIZATION};
use berth_store::{
    Store,
    keys::{LiveKey, Scope, digest},
};
use std::{
    sync::{Arc, RwLock},
    time::Duration,
};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
pub struct Keys {
    /// None: every request is let in (`--no-auth`).
    live: Option<RwLock<Arc<Vec<LiveKey>>>>,
}

impl Keys {
    pub fn open() -> Keys {
        Keys { live: None }
    }

    pub async fn load(store: &Store) -> Result<Keys, berth_store::StoreError> {
        let live = store.live_keys().await?;
        Ok(Keys {
            live: Some(RwLock::new(Arc::new(live))),
        })
    }

    /// Keeps the live keys fresh until `shutdown`.
    pub async fn follow(
        self: Arc<Self>,
        store: Store,
        every: Duration,
        shutdown: CancellationToken,
    ) {
        let Some(live) = &self.live else { return };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match store.live_keys().await {
                Ok(keys) => *live.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys),
                // Keep the last known keys: a database hiccup must not lock everyone out.
                Err(e) => tracing::warn!(%e, "cannot reload API keys"),
            }
        }
    }

    /// Lets the request through when its bearer key allows `needed`.
    pub fn check(&self, headers: &HeaderMap, needed: Scope) -> Result<(), ApiError> {
        let Some(live) = &self.live else {
            return Ok(());
        };
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(ApiError::unauthorized)?;
        let presented = digest(token);
        let keys = live.read().unwrap_or_else(|p| p.into_inner()).clone();
        // Every key is compared, each in constant time, so the time taken says nothing about
        // how close a guess came.
        let mut scope = None;
        for k in keys.iter() {
            if bool::from(k.digest.ct_eq(&presented)) {
                scope = Some(k.scope);
            }
        }
        match scope {
            Some(s) if s.allows(needed) => Ok(()),
            _ => Err(ApiError::unauthorized()),
        }
    }
}
