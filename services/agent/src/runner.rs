//! The agent loop: register, heartbeat, and apply assignments in the order they were sent.

use crate::{
    AgentStats, Usage, WorkerSpec,
    supervisor::{KeepServers, ProcessConfig, Supervisor, SupervisorError},
};
use async_nats::jetstream::AckKind;
use berth_bus::{Bus, BusError};
use berth_proto::{AgentMsg, StatusMsg, Version, status::ReportedState};
use berth_retry::{Interrupted, RetryPolicy, retry, retry_until};
use futures::StreamExt;
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::{sync::mpsc::UnboundedReceiver, task::JoinSet};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub nats_url: String,
    /// Credentials and TLS for NATS (this worker's agent role).
    pub nats_access: berth_bus::Access,
    pub worker: WorkerSpec,
    pub heartbeat: Duration,
    /// Counters, shared by the agents of a process.
    pub stats: Arc<AgentStats>,
}

/// How the agent runs what is placed on its worker.
#[derive(Debug, Clone)]
pub enum Runtime {
    /// Nothing runs: an instance is `running` as soon as it is assigned (benchmarks, fast
    /// tests, simulated inventories).
    Simulated,
    /// Model servers as processes, supervised ([`crate::supervisor`]).
    Process(Box<ProcessConfig>),
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Runtime(#[from] SupervisorError),
}

/// A running agent for one worker.
#[derive(Debug)]
pub struct Agent {
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    /// Set by [`Agent::abort`]: a crash leaves the servers to the next agent.
    keep_servers: Option<KeepServers>,
}

/// What runs on this worker. Backends are simulated: an instance is "running" once assigned.
#[derive(Debug, Default)]
struct Backends {
    /// Instance → version of the placement that runs.
    running: HashMap<String, Version>,
    /// Instance → highest version it was told to stop at: older assignments arriving late
    /// must not start.
    stopped_at: HashMap<String, Version>,
}

impl Agent {
    /// Connects, registers the worker, and starts the heartbeat and assignment loops, with
    /// simulated backends.
    pub async fn start(config: AgentConfig) -> Result<Agent, BusError> {
        Agent::start_inner(config, None).await
    }

    /// [`Agent::start`] with the given runtime.
    pub async fn start_with(config: AgentConfig, runtime: Runtime) -> Result<Agent, StartError> {
        let supervisor = match runtime {
            Runtime::Simulated => None,
            Runtime::Process(process) => {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                Some((Supervisor::new(*process, &config.worker, tx)?, rx))
            }
        };
        Ok(Agent::start_inner(config, supervisor).await?)
    }

    async fn start_inner(
        config: AgentConfig,
        supervisor: Option<(Supervisor, UnboundedReceiver<StatusMsg>)>,
    ) -> Result<Agent, BusError> {
        let id = config.worker.id.clone();
        let shutdown = CancellationToken::new();
        let mut tasks = JoinSet::new();
        // Replies come to an inbox of this worker's own, the only one its NATS role may read.
        let mut access = config.nats_access.clone();
        access.inbox_prefix = berth_bus::auth::Role::Agent { worker: id.clone() }.inbox_prefix();
        let bus = Bus::connect_as(&config.nats_url, &format!("agent-{id}"), &access).await?;
        let register = StatusMsg::Register {
            worker_id: id.clone(),
            labels: config.worker.labels.clone(),
            gpus: config.worker.gpus.clone(),
        };
        // Until the agent is started, dropping this future is how a caller gives up.
        retry(
            "register",
            RetryPolicy::PATIENT,
            BusError::is_transient,
            || bus.publish_status(&id, &register),
        )
        .await?;
        let consumer = bus.agent_consumer(&id).await?;
        // The servers' records: their processes' GPU memory is berth's, not outside use.
        let own_records = supervisor.as_ref().map(|(s, _)| s.records_dir());
        if let Some((supervisor, _)) = &supervisor {
            // `berth logs`: this worker's server logs, read from its state directory.
            let serve = crate::logs_service::serve(
                bus.client().clone(),
                &id,
                supervisor.logs_dir(),
                shutdown.clone(),
            )
            .await?;
            tasks.spawn(serve);
            // Instances over several workers: where this worker's stages are, and how a
            // leader here asks the other workers about theirs.
            let serve = crate::rpc_service::serve(
                bus.client().clone(),
                &id,
                supervisor.stage_board(),
                shutdown.clone(),
            )
            .await?;
            tasks.spawn(serve);
            supervisor.set_peers(Arc::new(crate::rpc_service::NatsPeers {
                client: bus.client().clone(),
            }));
        }
        let mut keep_servers = None;
        let supervisor = supervisor.map(|(mut supervisor, reports)| {
            // Before the first assignment: the servers an earlier agent left running.
            supervisor.adopt();
            keep_servers = Some(supervisor.keep_servers());
            tasks.spawn(forward_reports(
                bus.clone(),
                id.clone(),
                reports,
                shutdown.clone(),
            ));
            supervisor
        });
        tasks.spawn(heartbeats(
            bus.clone(),
            id.clone(),
            config.worker.usage.clone(),
            own_records,
            config.heartbeat,
            config.stats.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(assignments(
            bus,
            id,
            consumer,
            config.stats,
            supervisor,
            shutdown.clone(),
        ));
        Ok(Agent {
            shutdown,
            tasks,
            keep_servers,
        })
    }

    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
    }

    /// Stops at once, like a crash: model servers are left running, as a SIGKILL would.
    pub fn abort(mut self) {
        if let Some(keep) = &self.keep_servers {
            keep.set();
        }
        self.tasks.abort_all();
    }

    /// Resolves if the loops end by themselves.
    pub async fn stopped(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Sends a report, retrying while NATS is unavailable; stops at a permanent refusal and at
/// shutdown.
async fn report(
    bus: &Bus,
    worker_id: &str,
    msg: &StatusMsg,
    shutdown: &CancellationToken,
) -> Result<(), Interrupted<BusError>> {
    retry_until(
        "agent report",
        RetryPolicy::PATIENT,
        BusError::is_transient,
        shutdown,
        || bus.publish_status(worker_id, msg),
    )
    .await
}

/// Publishes the process runtime's reports in the order they were made.
async fn forward_reports(
    bus: Bus,
    worker_id: String,
    mut reports: UnboundedReceiver<StatusMsg>,
    shutdown: CancellationToken,
) {
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => return,
            msg = reports.recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
        };
        match report(&bus, &worker_id, &msg, &shutdown).await {
            Ok(()) => {}
            Err(Interrupted::Shutdown) => return,
            Err(Interrupted::Failed(e)) => {
                tracing::error!(%e, ?msg, "report refused for good; dropped");
            }
        }
    }
}

async fn heartbeats(
    bus: Bus,
    worker_id: String,
    usage: Usage,
    own_records: Option<std::path::PathBuf>,
    every: Duration,
    stats: Arc<AgentStats>,
    shutdown: CancellationToken,
) {
    let reader = match usage {
        Usage::Nvml => match crate::nvml::UsageReader::open() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(%e, "cannot read GPU memory in use; heartbeats will not report it");
                None
            }
        },
        Usage::Fixed(_) => None,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let usage = match (&usage, &reader) {
            (Usage::Fixed(fixed), _) => fixed.clone(),
            (Usage::Nvml, Some(r)) => {
                let ours = own_records
                    .as_deref()
                    .map(crate::supervisor::records::own_pids)
                    .unwrap_or_default();
                r.read(&ours).unwrap_or_else(|e| {
                    tracing::warn!(%e, "cannot read GPU memory in use");
                    Vec::new()
                })
            }
            (Usage::Nvml, None) => Vec::new(),
        };
        let beat = StatusMsg::Heartbeat {
            worker_id: worker_id.clone(),
            usage,
        };
        match bus.publish_status(&worker_id, &beat).await {
            Ok(()) => {
                stats
                    .heartbeats
                    .get_or_create(&AgentStats::worker(&worker_id))
                    .inc();
            }
            Err(e) => tracing::warn!(%e, "heartbeat not sent"),
        }
    }
}

async fn assignments(
    bus: Bus,
    worker_id: String,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    stats: Arc<AgentStats>,
    mut supervisor: Option<Supervisor>,
    shutdown: CancellationToken,
) {
    let mut backends = Backends::default();
    'outer: while !shutdown.is_cancelled() {
        // Batches as async-nats' own default pull takes them (applied one by one, in order).
        let mut messages = match berth_bus::pull(&consumer, 200).await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%e, "cannot pull assignments; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => break 'outer,
                next = messages.next() => next,
            };
            let msg = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(%e, "assignment pull error");
                    continue;
                }
                None => break,
            };
            let result = match berth_proto::decode::<AgentMsg>(&msg.payload) {
                Ok(m) if supervisor.is_some() => {
                    let label = AgentStats::worker(&worker_id);
                    match &m {
                        AgentMsg::Assign { .. } => stats.assigned.get_or_create(&label).inc(),
                        AgentMsg::Unassign { .. } => stats.unassigned.get_or_create(&label).inc(),
                    };
                    let running = supervisor.as_mut().map_or(0, |s| {
                        s.apply(m);
                        s.active()
                    });
                    stats
                        .running
                        .get_or_create(&label)
                        .set(i64::try_from(running).unwrap_or(i64::MAX));
                    // What follows is reported by the placement's task.
                    Ok(())
                }
                Ok(m) => {
                    let done = apply(&bus, &worker_id, &mut backends, &stats, m, &shutdown).await;
                    let running = i64::try_from(backends.running.len()).unwrap_or(i64::MAX);
                    stats
                        .running
                        .get_or_create(&AgentStats::worker(&worker_id))
                        .set(running);
                    done
                }
                Err(e) => {
                    tracing::warn!(%e, "dropping undecodable assignment");
                    Ok(())
                }
            };
            let ack = match result {
                Ok(()) => msg.ack().await,
                // Shutting down: whoever runs this worker next gets it again.
                Err(Interrupted::Shutdown) => break 'outer,
                // NATS will never take the report: retrying the message cannot help.
                Err(Interrupted::Failed(e)) if !e.is_transient() => {
                    tracing::error!(%e, "report refused for good; assignment dropped");
                    msg.ack().await
                }
                Err(Interrupted::Failed(_)) => {
                    msg.ack_with(AckKind::Nak(Some(Duration::from_millis(500))))
                        .await
                }
            };
            if let Err(e) = ack {
                tracing::warn!(%e, "ack failed");
            }
        }
    }
    if let Some(supervisor) = supervisor {
        // No orphans: the servers of this worker stop with the agent, unless
        // --keep-servers-on-exit leaves them for the next one to adopt.
        supervisor.shutdown().await;
    }
}

async fn apply(
    bus: &Bus,
    worker_id: &str,
    backends: &mut Backends,
    stats: &AgentStats,
    msg: AgentMsg,
    shutdown: &CancellationToken,
) -> Result<(), Interrupted<BusError>> {
    let label = AgentStats::worker(worker_id);
    let instance_report =
        |instance_id: &str, version: Version, state: ReportedState, shared| StatusMsg::Instance {
            worker_id: worker_id.to_owned(),
            instance_id: instance_id.to_owned(),
            version,
            state,
            reason: None,
            shared,
            endpoint: None,
            restarts: 0,
        };
    match msg {
        AgentMsg::Assign {
            instance_id,
            version,
            gpus,
            workers,
            ..
        } => {
            // One part of an instance spread over several workers: it runs once all do.
            let shared = workers.len() > 1;
            stats.assigned.get_or_create(&label).inc();
            let span = tracing::info_span!("assign", instance_id, version = version.get());
            let _enter = span.enter();
            if backends
                .stopped_at
                .get(&instance_id)
                .is_some_and(|v| *v > version)
            {
                tracing::info!("assignment already stopped; ignored");
                return Ok(());
            }
            if backends
                .running
                .get(&instance_id)
                .is_some_and(|v| *v > version)
            {
                return Ok(());
            }
            report(
                bus,
                worker_id,
                &instance_report(&instance_id, version, ReportedState::Starting, shared),
                shutdown,
            )
            .await?;
            tracing::info!(?gpus, ?workers, "backend started (simulated)");
            backends.running.insert(instance_id.clone(), version);
            report(
                bus,
                worker_id,
                &instance_report(&instance_id, version, ReportedState::Running, shared),
                shutdown,
            )
            .await
        }
        AgentMsg::Unassign {
            instance_id,
            version,
        } => {
            stats.unassigned.get_or_create(&label).inc();
            let span = tracing::info_span!("unassign", instance_id, version = version.get());
            let _enter = span.enter();
            let at = backends
                .stopped_at
                .entry(instance_id.clone())
                .or_insert(version);
            *at = (*at).max(version);
            if backends
                .running
                .get(&instance_id)
                .is_some_and(|v| *v < version)
            {
                backends.running.remove(&instance_id);
                tracing::info!("backend stopped (simulated)");
            }
            // Confirm even when nothing ran, so a stop never waits on a lost assignment.
            report(
                bus,
                worker_id,
                &instance_report(&instance_id, version, ReportedState::Stopped, false),
                shutdown,
            )
            .await
        }
    }
}
