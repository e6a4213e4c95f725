//! One analyzer: its connections, counters and loops.

use crate::{
    AnalyzerConfig, Hooks, Stats,
    agent_link::AgentLink,
    events::Events,
    in_flight::InFlight,
    intake, metrics,
    peers::Peers,
    snapshot::{self, Snapshot},
    status, sweeper, watch,
};
use async_nats::jetstream::consumer::PullConsumer;
use berth_bus::Bus;
use berth_store::Store;
use std::{sync::Arc, time::Duration};
use tokio::{sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// How long a heard command is remembered: far longer than the stream takes to store it.
const RECENT_FOR: Duration = Duration::from_secs(1);

/// What every task of an analyzer shares: the connections and one owner per concern, each
/// keeping its state private behind its methods.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) config: AnalyzerConfig,
    pub(crate) store: Store,
    pub(crate) bus: Bus,
    pub(crate) stats: Arc<Stats>,
    pub(crate) hooks: Hooks,
    /// Fits in flight and commands heard lately.
    pub(crate) fits: InFlight,
    /// Assignments and stops sent to the agents.
    pub(crate) agents: AgentLink,
    /// The event relay's doorbell.
    pub(crate) events: Events,
    /// Capacity may have appeared: pending instances should be looked at again.
    pub(crate) wake: Notify,
    /// Free VRAM as this analyzer sees it.
    pub(crate) snapshot: Snapshot,
    /// The other analyzers alive, and this one's lane.
    pub(crate) peers: Arc<Peers>,
    /// Model profiles read from files.
    pub(crate) profiles: crate::needs::ProfileCache,
    /// The shared command consumer, for backlog figures.
    pub(crate) commands: PullConsumer,
    /// Start intents, recorded in groups.
    pub(crate) intents: crate::intents::Intents,
    /// Placement commits, in groups.
    pub(crate) commits: crate::grouped::Grouped<
        berth_store::placement::PlacementCommit,
        Result<berth_store::placement::CommitOutcome, berth_store::StoreError>,
    >,
    /// `starting`/`running` reports, applied in groups.
    pub(crate) forwards: crate::grouped::Grouped<berth_store::reports::Forward, status::Forwarded>,
    /// Reports about one instance, applied in arrival order.
    pub(crate) report_order: Arc<crate::in_order::InOrder>,
    /// When the database last failed us: silence before that proves nothing.
    pub(crate) store_health: crate::store_health::StoreHealth,
}

impl Ctx {
    /// Commands waiting for delivery, and delivered but unacknowledged, as JetStream counts
    /// them for the shared consumer.
    pub(crate) async fn backlog(&self) -> Option<(u64, usize)> {
        let info = self.commands.get_info().await.ok()?;
        Some((info.num_pending, info.num_ack_pending))
    }
}

/// A running analyzer.
#[derive(Debug)]
pub struct Analyzer {
    pub stats: Arc<Stats>,
    /// The analyzers this one hears, and its lane.
    pub peers: Arc<Peers>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Analyzer {
    /// Connects, migrates the database, and starts the command and status loops.
    pub async fn start(config: AnalyzerConfig, hooks: Hooks) -> anyhow::Result<Analyzer> {
        // Boxed: starting holds every component's setup at once, too large for a caller's
        // own future.
        Box::pin(Analyzer::start_inner(config, hooks)).await
    }

    async fn start_inner(config: AnalyzerConfig, hooks: Hooks) -> anyhow::Result<Analyzer> {
        berth_store::migrate(&config.database_url).await?;
        let store = Store::connect(&config.database_url, config.pool_size)?;
        store.warm().await?;
        let bus = Bus::connect_as(&config.nats_url, &config.name, &config.nats_access).await?;
        let commands = bus.command_consumer(config.ack_wait).await?;
        let reports = bus.status_consumer().await?;
        let stats = Arc::new(Stats::default());
        let snapshot = Snapshot::new(config.policy == berth_fit::Policy::Spread);
        let peers = Arc::new(Peers::new(
            Peers::member_id(&config.name),
            3 * config.heartbeat_every,
        ));
        let heartbeats = crate::peers::subscribe(bus.client()).await?;
        let intents = crate::intents::Intents::spawn(store.clone(), stats.clone());
        let forwards = status::spawn_forwards(store.clone());
        let commits = crate::placing::spawn_commits(store.clone());
        let profiles =
            crate::needs::ProfileCache::new(config.model_roots.clone(), config.model_read_timeout);
        let ctx = Arc::new(Ctx {
            config,
            store,
            agents: AgentLink::new(bus.clone()),
            bus,
            stats: stats.clone(),
            hooks,
            fits: InFlight::new(RECENT_FOR),
            events: Events::default(),
            wake: Notify::new(),
            commands: commands.clone(),
            intents,
            forwards,
            report_order: Arc::default(),
            store_health: Default::default(),
            commits,
            snapshot,
            peers,
            profiles,
        });
        ctx.snapshot.refresh(&ctx.store).await?;
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let heard = watch::subscribe(&ctx).await?;
        tasks.spawn(intake::run(ctx.clone(), commands, shutdown.clone()));
        tasks.spawn(status::run(ctx.clone(), reports, shutdown.clone()));
        tasks.spawn(watch::run(ctx.clone(), heard, shutdown.clone()));
        tasks.spawn(crate::events::run(ctx.clone(), shutdown.clone()));
        if let Some(addr) = ctx.config.metrics_addr {
            metrics::serve(ctx.clone(), addr, shutdown.clone()).await?;
        }
        tasks.spawn(snapshot::keep_fresh(
            ctx.clone(),
            ctx.config.refresh_every,
            ctx.config.full_refresh_every,
            shutdown.clone(),
        ));
        tasks.spawn(crate::peers::run(
            ctx.bus.client().clone(),
            ctx.peers.clone(),
            heartbeats,
            ctx.config.heartbeat_every,
            shutdown.clone(),
        ));
        let peers = ctx.peers.clone();
        tasks.spawn(sweeper::run(ctx, shutdown.clone()));
        Ok(Analyzer {
            stats,
            peers,
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
