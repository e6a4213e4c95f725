//! One analyzer: its connections, counters and loops.

use crate::{
    AnalyzerConfig, Hooks, Stats, intake, metrics,
    snapshot::{self, Snapshot},
    status, sweeper, watch,
};
use async_nats::jetstream::consumer::PullConsumer;
use berth_bus::Bus;
use berth_store::Store;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};
use tokio::{sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// What every task of an analyzer shares.
#[derive(Debug)]
pub struct Ctx {
    pub config: AnalyzerConfig,
    pub store: Store,
    pub bus: Bus,
    pub stats: Arc<Stats>,
    pub hooks: Hooks,
    /// In-flight fits by instance: the command sequence and the token that cancels the fit.
    pub in_flight: Mutex<HashMap<String, (u64, CancellationToken)>>,
    /// Capacity may have appeared: pending instances should be looked at again.
    pub wake: Notify,
    /// Free VRAM as this analyzer sees it.
    pub snapshot: Snapshot,
    /// Model profiles read from files.
    pub profiles: crate::needs::ProfileCache,
    /// The shared command consumer, for backlog figures.
    pub commands: PullConsumer,
    /// Start intents, recorded in groups.
    pub intents: crate::intents::Intents,
    /// Acks of published events, waited for in the background.
    pub event_acks: crate::events::EventAcks,
}

impl Ctx {
    /// Commands waiting for delivery, and delivered but unacknowledged, as JetStream counts
    /// them for the shared consumer.
    pub async fn backlog(&self) -> Option<(u64, usize)> {
        let info = self.commands.get_info().await.ok()?;
        Some((info.num_pending, info.num_ack_pending))
    }

    /// Registers a fit for `instance_id` at `seq`; cancels an older one in flight here.
    pub fn begin_fit(&self, instance_id: &str, seq: u64) -> CancellationToken {
        self.supersede(instance_id, seq);
        let token = CancellationToken::new();
        if let Ok(mut map) = self.in_flight.lock() {
            map.insert(instance_id.to_owned(), (seq, token.clone()));
        }
        token
    }

    pub fn end_fit(&self, instance_id: &str, seq: u64) {
        if let Ok(mut map) = self.in_flight.lock()
            && map.get(instance_id).is_some_and(|(s, _)| *s == seq)
        {
            map.remove(instance_id);
        }
    }

    pub fn has_fit_in_flight(&self, instance_id: &str) -> bool {
        self.in_flight
            .lock()
            .is_ok_and(|m| m.contains_key(instance_id))
    }

    /// A newer command (`seq`) for `instance_id` arrived: abandon any older fit in flight
    /// here. Returns whether one was cancelled.
    pub fn supersede(&self, instance_id: &str, seq: u64) -> bool {
        if let Ok(map) = self.in_flight.lock()
            && let Some((old_seq, token)) = map.get(instance_id)
            && *old_seq < seq
        {
            token.cancel();
            return true;
        }
        false
    }
}

/// A running analyzer.
#[derive(Debug)]
pub struct Analyzer {
    pub stats: Arc<Stats>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Analyzer {
    /// Connects, migrates the database, and starts the command and status loops.
    pub async fn start(config: AnalyzerConfig, hooks: Hooks) -> anyhow::Result<Analyzer> {
        berth_store::migrate(&config.database_url).await?;
        let store = Store::connect(&config.database_url, config.pool_size)?;
        let bus = Bus::connect(&config.nats_url, &config.name).await?;
        let commands = bus.command_consumer(config.ack_wait).await?;
        let reports = bus.status_consumer().await?;
        let stats = Arc::new(Stats::default());
        let intents = crate::intents::Intents::spawn(store.clone(), stats.clone());
        let event_acks = crate::events::EventAcks::spawn(stats.clone());
        let ctx = Arc::new(Ctx {
            config,
            store,
            bus,
            stats: stats.clone(),
            hooks,
            in_flight: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            commands: commands.clone(),
            intents,
            event_acks,
            snapshot: Snapshot::default(),
            profiles: Default::default(),
        });
        ctx.snapshot.refresh(&ctx.store).await?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let heard = watch::subscribe(&ctx).await?;
        tasks.spawn(intake::run(ctx.clone(), commands, shutdown.clone()));
        tasks.spawn(status::run(ctx.clone(), reports, shutdown.clone()));
        tasks.spawn(watch::run(ctx.clone(), heard, shutdown.clone()));
        if let Some(addr) = ctx.config.metrics_addr {
            metrics::serve(ctx.clone(), addr, shutdown.clone()).await?;
        }
        tasks.spawn(snapshot::keep_fresh(
            ctx.clone(),
            ctx.config.refresh_every,
            shutdown.clone(),
        ));
        tasks.spawn(sweeper::run(ctx, shutdown.clone()));
        Ok(Analyzer {
            stats,
            shutdown,
            tasks,
        })
    }

    /// Stops taking messages, lets the ones in hand finish, and returns.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops at once, like a crash: messages in hand are not acknowledged and will be
    /// redelivered to another analyzer.
    pub fn abort(mut self) {
        self.tasks.abort_all();
    }

    /// Resolves when the analyzer stops by itself (a loop failed for good).
    pub async fn stopped(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}
