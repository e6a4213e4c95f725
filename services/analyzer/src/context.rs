//! One analyzer: its connections, counters and loops.

use crate::{
    AnalyzerConfig, Hooks, Stats, intake, metrics,
    recent::Recent,
    snapshot::{self, Snapshot},
    status, sweeper, watch,
};
use async_nats::jetstream::consumer::PullConsumer;
use berth_bus::Bus;
use berth_proto::{Command, StartSpec};
use berth_store::Store;
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};
use tokio::{sync::Notify, task::JoinSet};
use tokio_util::sync::CancellationToken;

/// How long a heard command is remembered: far longer than the stream takes to store it.
const RECENT_FOR: Duration = Duration::from_secs(1);

/// A fit in flight: its command's sequence and spec, and the token that cancels it.
#[derive(Debug)]
pub struct InFlight {
    seq: u64,
    spec: StartSpec,
    token: CancellationToken,
}

/// What every task of an analyzer shares.
#[derive(Debug)]
pub struct Ctx {
    pub config: AnalyzerConfig,
    pub store: Store,
    pub bus: Bus,
    pub stats: Arc<Stats>,
    pub hooks: Hooks,
    /// In-flight fits by instance.
    pub in_flight: Mutex<HashMap<String, InFlight>>,
    /// The last command the watch heard per instance, and when: a command published just
    /// before a fit begins may not be stored yet when the fit asks the stream.
    pub recent: Mutex<Recent>,
    /// Capacity may have appeared: pending instances should be looked at again.
    pub wake: Notify,
    /// Free VRAM as this analyzer sees it.
    pub snapshot: Snapshot,
    /// The other analyzers alive, and this one's lane.
    pub peers: Arc<crate::peers::Peers>,
    /// Model profiles read from files.
    pub profiles: crate::needs::ProfileCache,
    /// The shared command consumer, for backlog figures.
    pub commands: PullConsumer,
    /// Start intents, recorded in groups.
    pub intents: crate::intents::Intents,
    /// Placement commits, in groups.
    pub commits: crate::grouped::Grouped<
        berth_store::placement::PlacementCommit,
        Result<berth_store::placement::CommitOutcome, berth_store::StoreError>,
    >,
    /// `starting`/`running` reports, applied in groups.
    pub forwards: crate::grouped::Grouped<berth_store::reports::Forward, status::Forwarded>,
    /// Acks of published events, waited for in the background.
    /// A state change was committed: the event relay has something to publish.
    pub events_wake: Notify,
}

impl Ctx {
    /// Commands waiting for delivery, and delivered but unacknowledged, as JetStream counts
    /// them for the shared consumer.
    pub async fn backlog(&self) -> Option<(u64, usize)> {
        let info = self.commands.get_info().await.ok()?;
        Some((info.num_pending, info.num_ack_pending))
    }

    /// Registers a fit for `instance_id` at `seq`; cancels an older one in flight here.
    pub fn begin_fit(&self, instance_id: &str, seq: u64, spec: &StartSpec) -> CancellationToken {
        self.supersede(instance_id, seq);
        let token = CancellationToken::new();
        if let Ok(mut map) = self.in_flight.lock() {
            // A fit for a newer command is in flight here: this command is stale (its intent
            // will say so), and must not take that fit's place, which the watch cancels.
            if map.get(instance_id).is_some_and(|f| f.seq > seq) {
                token.cancel();
                return token;
            }
            let fit = InFlight {
                seq,
                spec: spec.clone(),
                token: token.clone(),
            };
            map.insert(instance_id.to_owned(), fit);
        }
        token
    }

    pub fn end_fit(&self, instance_id: &str, seq: u64) {
        if let Ok(mut map) = self.in_flight.lock()
            && map.get(instance_id).is_some_and(|f| f.seq == seq)
        {
            map.remove(instance_id);
        }
    }

    /// A newer command (`seq`) for `instance_id` arrived: abandon any older fit in flight
    /// here. Returns whether one was cancelled.
    pub fn supersede(&self, instance_id: &str, seq: u64) -> bool {
        self.cancel_if(instance_id, |f| f.seq < seq)
    }

    /// A command for `instance_id` was heard, its sequence not known: abandon a fit in
    /// flight here unless the command is the same start (most likely the fit's own command,
    /// heard late). The fit confirms with the stream before it gives up for good, so an old
    /// command heard late costs a redo, never a lost placement.
    pub fn suspect(&self, instance_id: &str, heard: Option<&Command>) -> bool {
        self.cancel_if(
            instance_id,
            |f| !matches!(heard, Some(Command::Start(spec)) if *spec == f.spec),
        )
    }

    /// The watch heard `command` for `instance_id`: remember it a moment, and cancel a fit in
    /// flight that it does not belong to.
    pub fn heard(&self, instance_id: &str, command: Option<Command>) {
        self.suspect(instance_id, command.as_ref());
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(instance_id, command, Instant::now());
        }
    }

    /// Whether a command other than `spec`'s start was heard for `instance_id` lately (it
    /// may be newer than the fit about to run, and not stored yet).
    pub fn heard_other_lately(&self, instance_id: &str, spec: &StartSpec) -> bool {
        self.recent.lock().is_ok_and(|recent| {
            recent
                .get(instance_id, Instant::now())
                .is_some_and(|cmd| !matches!(cmd, Some(Command::Start(s)) if s == spec))
        })
    }

    fn cancel_if(&self, instance_id: &str, pred: impl Fn(&InFlight) -> bool) -> bool {
        if let Ok(map) = self.in_flight.lock()
            && let Some(fit) = map.get(instance_id)
            && !fit.token.is_cancelled()
            && pred(fit)
        {
            fit.token.cancel();
            return true;
        }
        false
    }
}

/// A running analyzer.
#[derive(Debug)]
pub struct Analyzer {
    pub stats: Arc<Stats>,
    /// The analyzers this one hears, and its lane.
    pub peers: Arc<crate::peers::Peers>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
}

impl Analyzer {
    /// Connects, migrates the database, and starts the command and status loops.
    pub async fn start(config: AnalyzerConfig, hooks: Hooks) -> anyhow::Result<Analyzer> {
        berth_store::migrate(&config.database_url).await?;
        let store = Store::connect(&config.database_url, config.pool_size)?;
        store.warm().await?;
        let bus = Bus::connect(&config.nats_url, &config.name).await?;
        let commands = bus.command_consumer(config.ack_wait).await?;
        let reports = bus.status_consumer().await?;
        let stats = Arc::new(Stats::default());
        let snapshot = Snapshot::new(config.policy == berth_fit::Policy::Spread);
        let peers = Arc::new(crate::peers::Peers::new(
            crate::peers::Peers::member_id(&config.name),
            3 * config.heartbeat_every,
        ));
        let heartbeats = crate::peers::subscribe(bus.client()).await?;
        let intents = crate::intents::Intents::spawn(store.clone(), stats.clone());
        let forwards = status::spawn_forwards(store.clone());
        let commits = crate::placing::spawn_commits(store.clone());
        let ctx = Arc::new(Ctx {
            config,
            store,
            bus,
            stats: stats.clone(),
            hooks,
            in_flight: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::new(RECENT_FOR)),
            wake: Notify::new(),
            commands: commands.clone(),
            intents,
            forwards,
            commits,
            events_wake: Notify::new(),
            snapshot,
            peers,
            profiles: Default::default(),
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
