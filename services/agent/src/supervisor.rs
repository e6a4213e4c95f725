//! The process runtime: one task per placement (instance, version) on this worker, which runs
//! its model server in a process group of its own and reports what becomes of it.
//!
//! - `starting` when the server is launched; `running` with `endpoint` (`advertise-host:port`)
//!   once every readiness path answers 200; while running, a probe every `probe_every`, and
//!   `unhealthy_after` failures in a row count as a crash.
//! - Not ready within `startup_timeout`: the group is stopped and the placement ends in
//!   `error`. A server that cannot be started at all (no binary, bad template) is an `error`.
//! - A crash (exit, signal, unhealthy): `starting` with `restarts: k` and the reason (exit
//!   code or signal, the last lines of its log), then a restart after a backoff; past the
//!   restart budget ([`RestartLimits`]) `error`, and the analyzer releases the GPUs.
//! - A stop (unassign; a newer version of the instance; the agent shutting down): SIGTERM to
//!   the group, `grace`, SIGKILL, and `stopped` only once the server is reaped and no process
//!   of its group is left. Never two servers for one instance: a newer version starts once
//!   the older one's group is gone.
//!
//! - An agent that starts adopts the servers its predecessor left running ([`Supervisor::adopt`],
//!   from the state records): same process, same port, `running` again once its readiness
//!   probe answers. An agent that exits stops its servers, unless told to leave them to the
//!   next one (`--keep-servers-on-exit`); one that is killed leaves them anyway.
//!
//! - An instance spread over several workers (llama.cpp): each follower runs an RPC server
//!   for its stage (`running` with that server's endpoint once it accepts connections), the
//!   leader waits for every stage within its startup deadline and runs `llama-server --rpc`
//!   with them ([`stages`]).
//!
//! Reports go, in order, to a channel: the agent publishes them on NATS; tests read them.

mod logs;
pub mod ports;
mod probe;
pub mod process;
pub mod records;
pub mod restart;
pub mod stages;

use crate::{
    Usage, WorkerSpec,
    backend::{self, AssignedGpu, Backend, Binaries, Launch, Plan, Probe, Stage},
};
use berth_proto::{AgentMsg, StartSpec, StatusMsg, Version, status::ReportedState};
pub use ports::{PortLease, PortPool};
use process::{GroupGuard, exit_reason, signal_group, wait_group_gone};
use records::Record;
pub use restart::{RestartBudget, RestartLimits};
use stages::{FollowerStage, Peers, StageBoard, StagesCheck};
use std::{
    collections::HashMap,
    path::PathBuf,
    process::Stdio,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How the process runtime runs servers.
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    /// Holds `instances/` (what runs) and `logs/<instance>/<version>.log`.
    pub state_dir: PathBuf,
    /// Shared by the workers of one agent process.
    pub ports: Arc<PortPool>,
    /// Host in the endpoints reported.
    pub advertise_host: String,
    /// Address servers listen on.
    pub listen_host: String,
    pub binaries: Binaries,
    pub startup_timeout: Duration,
    /// Probes while a server loads.
    pub startup_probe_every: Duration,
    /// Probes while it runs.
    pub probe_every: Duration,
    pub probe_timeout: Duration,
    /// Failed probes in a row that make a running server unhealthy.
    pub unhealthy_after: u32,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    pub restarts: RestartLimits,
    /// Logs of earlier attempts kept per placement (and earlier parts of a long one).
    pub logs_kept: usize,
    /// A server's log past this is cut ([`logs::keep_bounded`]): its last part goes to
    /// `.log.1`, like a previous attempt's.
    pub log_max_bytes: u64,
    /// How often the size of a running server's log is checked.
    pub log_check_every: Duration,
    /// [`Supervisor::shutdown`] leaves the servers running, with their records, for the next
    /// agent to adopt (a rolling upgrade of the agent) instead of stopping them.
    pub keep_servers_on_exit: bool,
    /// Where the model files of starts may be: a start naming a model outside them (or with
    /// no root at all, the default) ends in `error` before any server is spawned.
    /// [`ModelRoots::Anywhere`](berth_models::ModelRoots::Anywhere) checks nothing: the
    /// server gets the path as the start gives it.
    pub model_roots: berth_models::ModelRoots,
}

impl ProcessConfig {
    /// Production defaults with servers on `127.0.0.1` and ports 40000-40999.
    pub fn new(state_dir: PathBuf) -> ProcessConfig {
        ProcessConfig {
            state_dir,
            ports: PortPool::new(40000..=40999),
            advertise_host: "127.0.0.1".into(),
            listen_host: "127.0.0.1".into(),
            binaries: Binaries::default(),
            startup_timeout: Duration::from_secs(600),
            startup_probe_every: Duration::from_millis(250),
            probe_every: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(2),
            unhealthy_after: 3,
            grace: Duration::from_secs(10),
            restarts: RestartLimits::default(),
            logs_kept: 3,
            log_max_bytes: 16 << 20,
            log_check_every: Duration::from_secs(1),
            keep_servers_on_exit: false,
            model_roots: berth_models::ModelRoots::none(),
        }
    }

    pub fn log_path(&self, instance_id: &str, version: Version) -> PathBuf {
        self.state_dir
            .join("logs")
            .join(instance_id)
            .join(format!("{}.log", version.get()))
    }

    pub fn records_dir(&self) -> PathBuf {
        self.state_dir.join("instances")
    }

    /// Where the agent itself probes: the listen address, or loopback for a wildcard one.
    fn probe_host(&self) -> &str {
        match self.listen_host.as_str() {
            "0.0.0.0" => "127.0.0.1",
            "::" => "::1",
            h => h,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("state dir {path}: {source}")]
    StateDir {
        path: String,
        source: std::io::Error,
    },
}

/// Why a placement is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// An unassign: confirm with `stopped` at this version.
    Unassigned(Version),
    /// A newer version of the instance replaces it: no report.
    Replaced,
    /// The agent shuts down: no report.
    Shutdown,
}

struct Handle {
    version: Version,
    stop: watch::Sender<Option<Stop>>,
    /// Cancelled when the placement's task ended and its process group is gone.
    done: CancellationToken,
}

/// What the tasks share.
struct Shared {
    config: ProcessConfig,
    worker_id: String,
    gpus: Vec<berth_proto::GpuInfo>,
    cuda: bool,
    reports: mpsc::UnboundedSender<StatusMsg>,
    /// Set, the servers outlive their tasks ([`KeepServers`]).
    keep: Arc<AtomicBool>,
    /// The stages this worker runs for leaders on other workers.
    stages: StageBoard,
    /// How a leader reaches its followers' agents; set once the agent is connected.
    peers: OnceLock<Arc<dyn Peers>>,
}

/// Leaves a supervisor's servers running when it is dropped or its tasks are aborted, as a
/// SIGKILLed agent would: the next agent adopts them. Without it, a server whose task is
/// aborted is killed with its group.
#[derive(Debug, Clone)]
pub struct KeepServers(Arc<AtomicBool>);

impl KeepServers {
    pub fn set(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// What [`Supervisor::adopt`] found in the state records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Adoption {
    /// Instances whose server still runs: watched again, without a second process.
    pub adopted: Vec<String>,
    /// Instances whose record was removed: the server is gone, or its pid is another
    /// process's now (left alone), or the record cannot be read.
    pub removed: Vec<String>,
}

/// A server an earlier agent started, found alive.
struct Adopted {
    pid: i32,
    start_time: u64,
    port: u16,
    lease: Option<PortLease>,
    restarts: u32,
    /// A leader's: the stages its server runs with.
    followers: Vec<FollowerStage>,
}

/// The placements of one worker. Owned by the agent's assignment loop, which calls
/// [`Supervisor::apply`] in the order assignments were sent.
pub struct Supervisor {
    shared: Arc<Shared>,
    placements: HashMap<String, Handle>,
    /// Instance → highest version it was told to stop at: older assignments arriving late
    /// must not start.
    stopped_at: HashMap<String, Version>,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("worker", &self.shared.worker_id)
            .field("placements", &self.placements.len())
            .finish()
    }
}

impl Supervisor {
    /// Where the servers' logs are (`<instance>/<version>.log`).
    pub fn logs_dir(&self) -> PathBuf {
        self.shared.config.state_dir.join("logs")
    }

    /// Where what runs is recorded ([`records::own_pids`] reads it).
    pub fn records_dir(&self) -> PathBuf {
        self.shared.config.records_dir()
    }

    /// A supervisor for `worker`'s placements; reports go to `reports`.
    pub fn new(
        config: ProcessConfig,
        worker: &WorkerSpec,
        reports: mpsc::UnboundedSender<StatusMsg>,
    ) -> Result<Supervisor, SupervisorError> {
        for dir in [config.records_dir(), config.state_dir.join("logs")] {
            std::fs::create_dir_all(&dir).map_err(|source| SupervisorError::StateDir {
                path: dir.display().to_string(),
                source,
            })?;
        }
        Ok(Supervisor {
            shared: Arc::new(Shared {
                config,
                worker_id: worker.id.clone(),
                gpus: worker.gpus.clone(),
                cuda: matches!(worker.usage, Usage::Nvml),
                reports,
                keep: Arc::new(AtomicBool::new(false)),
                stages: StageBoard::default(),
                peers: OnceLock::new(),
            }),
            placements: HashMap::new(),
            stopped_at: HashMap::new(),
            tasks: JoinSet::new(),
        })
    }

    /// The stages this worker runs for leaders on other workers: what the agent answers on
    /// `berth.rpc.<worker>`.
    pub fn stage_board(&self) -> StageBoard {
        self.shared.stages.clone()
    }

    /// How leaders here reach their followers' agents (once; later calls change nothing).
    pub fn set_peers(&self, peers: Arc<dyn Peers>) {
        let _ = self.shared.peers.set(peers);
    }

    /// Placements whose task has not ended.
    pub fn active(&self) -> usize {
        self.placements
            .values()
            .filter(|h| !h.done.is_cancelled())
            .count()
    }

    /// Applies one assignment; what follows is reported through the channel.
    pub fn apply(&mut self, msg: AgentMsg) {
        while self.tasks.try_join_next().is_some() {}
        match msg {
            AgentMsg::Assign {
                instance_id,
                version,
                gpus,
                vram_bytes_per_gpu,
                spec,
                gpu_bytes,
                workers,
            } => {
                if self
                    .stopped_at
                    .get(&instance_id)
                    .is_some_and(|v| *v > version)
                {
                    tracing::info!(instance_id, %version, "assignment already stopped; ignored");
                    return;
                }
                let prev = match self.placements.get(&instance_id) {
                    Some(h) if h.version >= version => {
                        tracing::info!(instance_id, %version, "assignment not newer; ignored");
                        return;
                    }
                    Some(h) => {
                        h.stop.send_if_modified(|s| {
                            let first = s.is_none();
                            if first {
                                *s = Some(Stop::Replaced);
                            }
                            first
                        });
                        Some(h.done.clone())
                    }
                    None => None,
                };
                let assigned = gpus
                    .iter()
                    .enumerate()
                    .map(|(i, index)| {
                        let gpu = self.shared.gpus.iter().find(|g| g.index == *index);
                        AssignedGpu {
                            index: *index,
                            uuid: gpu.map(|g| g.uuid.clone()).unwrap_or_default(),
                            bytes: gpu_bytes.get(i).copied().unwrap_or(vram_bytes_per_gpu),
                            total_bytes: gpu.map_or(0, |g| g.total_bytes),
                        }
                    })
                    .collect();
                let stage = Stage::of(&self.shared.worker_id, &workers);
                let placement = Placement {
                    instance_id,
                    version,
                    gpus: assigned,
                    spec,
                    workers,
                    stage,
                };
                self.spawn(placement, prev, None);
            }
            AgentMsg::Unassign {
                instance_id,
                version,
            } => {
                let at = self
                    .stopped_at
                    .entry(instance_id.clone())
                    .or_insert(version);
                *at = (*at).max(version);
                match self.placements.get(&instance_id) {
                    Some(h) if h.version < version && !h.done.is_cancelled() => {
                        // Its task confirms once the group is gone.
                        h.stop.send_replace(Some(Stop::Unassigned(version)));
                    }
                    // Confirm even when nothing runs, so a stop never waits on a lost
                    // assignment.
                    _ => self.shared.report(
                        &instance_id,
                        version,
                        ReportedState::Stopped,
                        Report::default(),
                    ),
                }
            }
        }
    }

    /// Starts the task of one placement; with `adopted`, it watches that server first.
    fn spawn(
        &mut self,
        placement: Placement,
        prev: Option<CancellationToken>,
        adopted: Option<Adopted>,
    ) {
        let (stop, stop_rx) = watch::channel(None);
        let done = CancellationToken::new();
        let instance_id = placement.instance_id.clone();
        let version = placement.version;
        let task = self.shared.clone().run(placement, prev, stop_rx, adopted);
        let guard = done.clone().drop_guard();
        self.tasks.spawn(async move {
            let _done = guard;
            task.await;
        });
        self.placements.insert(
            instance_id,
            Handle {
                version,
                stop,
                done,
            },
        );
    }

    /// Adopts the servers an earlier agent of this worker left running: called once, before
    /// the first assignment. A record is adopted when its process is alive, started when the
    /// record says (a pid may have been reused) and still leads its process group: it is
    /// registered as the placement of its (instance, version) with no second process, keeps
    /// its port, is probed again and reported `running` with its endpoint once its readiness
    /// probe answers (not within `startup_timeout`: a crash, restarted). Its exit is found
    /// by polling `/proc` (it is not this process's child). Any other record is removed,
    /// with no report, and its pid left alone.
    pub fn adopt(&mut self) -> Adoption {
        let dir = self.shared.config.records_dir();
        let mut found = Adoption::default();
        for entry in records::all(&dir) {
            let record = match entry {
                Ok(r) => r,
                Err(path) => {
                    tracing::warn!(path = %path.display(), "unreadable state record; removed");
                    let _ = std::fs::remove_file(&path);
                    found.removed.push(path.display().to_string());
                    continue;
                }
            };
            if record.worker_id != self.shared.worker_id {
                // Another worker of this agent process shares the state dir.
                continue;
            }
            let id = record.instance_id.clone();
            if self.placements.contains_key(&id) {
                continue;
            }
            if let Err(why) = adoptable(&record) {
                tracing::info!(
                    instance_id = id,
                    version = record.version,
                    pid = record.pid,
                    why,
                    "state record of a server that is gone; removed"
                );
                records::remove(&dir, &id);
                found.removed.push(id);
                continue;
            }
            let lease = self.shared.config.ports.claim(record.port);
            if lease.is_none() {
                tracing::warn!(
                    instance_id = id,
                    port = record.port,
                    "adopted server's port already held here"
                );
            }
            tracing::info!(
                instance_id = id,
                version = record.version,
                pid = record.pid,
                port = record.port,
                "adopting a server left by an earlier agent"
            );
            let placement = Placement {
                instance_id: id.clone(),
                version: Version::new(record.version),
                gpus: record.gpus.clone(),
                spec: record
                    .spec
                    .as_deref()
                    .cloned()
                    .unwrap_or_else(|| StartSpec::claim(0, 0)),
                stage: Stage::of(&record.worker_id, &record.workers),
                workers: record.workers.clone(),
            };
            let adopted = Adopted {
                pid: record.pid,
                start_time: record.start_time,
                port: record.port,
                lease,
                restarts: record.restarts,
                followers: record.followers.clone(),
            };
            if record.spec.is_none() {
                // An older agent's record: what runs, and how to probe it, is unknown.
                self.spawn_discard(placement, adopted);
            } else {
                self.spawn(placement, None, Some(adopted));
            }
            found.adopted.push(id);
        }
        found
    }

    /// An adopted server that cannot be supervised: stopped, then `error`.
    fn spawn_discard(&mut self, p: Placement, a: Adopted) {
        let shared = self.shared.clone();
        self.tasks.spawn(async move {
            shared.discard(&p, a).await;
            shared.error(
                &p,
                "adopted a server from a record without its start spec (an older agent): stopped"
                    .into(),
                0,
            );
        });
    }

    /// The switch that leaves this supervisor's servers running when it is dropped (see
    /// [`KeepServers`]); `Agent::abort` sets it.
    pub fn keep_servers(&self) -> KeepServers {
        KeepServers(self.shared.keep.clone())
    }

    /// Stops every server (SIGTERM, grace, SIGKILL) and waits for their groups to be gone;
    /// with `keep_servers_on_exit`, leaves them to the next agent instead ([`Self::abandon`]).
    pub async fn shutdown(mut self) {
        if self.shared.config.keep_servers_on_exit {
            tracing::info!(
                servers = self.active(),
                "leaving the servers running for the next agent"
            );
            return self.abandon().await;
        }
        for h in self.placements.values() {
            h.stop.send_replace(Some(Stop::Shutdown));
        }
        while self.tasks.join_next().await.is_some() {}
    }

    /// Ends every task at once and leaves the servers running, with their state records and
    /// no report, exactly as a SIGKILLed agent leaves them; returns once the tasks are gone
    /// (their ports are free in the pool).
    pub async fn abandon(mut self) {
        self.keep_servers().set();
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Whether the server of `r` still runs and can be adopted; else why not.
fn adoptable(r: &Record) -> Result<(), String> {
    let Some(s) = process::stat(r.pid) else {
        return Err("no such process".into());
    };
    if matches!(s.state, 'Z' | 'X') {
        return Err("it exited".into());
    }
    if s.start_time != r.start_time {
        return Err(format!(
            "pid {} is another process now (started at {}, not {})",
            r.pid, s.start_time, r.start_time
        ));
    }
    if s.pgrp != r.pid {
        return Err(format!(
            "it left its process group (now in {}): not adopted, left alone",
            s.pgrp
        ));
    }
    Ok(())
}

/// One placement to run.
struct Placement {
    instance_id: String,
    version: Version,
    gpus: Vec<AssignedGpu>,
    spec: StartSpec,
    /// For an instance spread over several workers: all of them, the leader first.
    workers: Vec<String>,
    stage: Stage,
}

impl Placement {
    /// One part of an instance spread over several workers.
    fn shared(&self) -> bool {
        self.stage != Stage::Alone
    }

    fn followers(&self) -> &[String] {
        match self.stage {
            Stage::Leader => self.workers.get(1..).unwrap_or_default(),
            _ => &[],
        }
    }
}

/// The optional parts of an instance report.
#[derive(Debug, Default)]
struct Report {
    reason: Option<String>,
    endpoint: Option<String>,
    restarts: u32,
    shared: bool,
}

/// What one attempt runs with.
struct Run {
    port: u16,
    restarts: u32,
    log_path: PathBuf,
    /// Ready by then, or the attempt fails.
    deadline: tokio::time::Instant,
    /// A leader's: the followers' stages its server was started with.
    followers: Vec<FollowerStage>,
}

/// How one run of a server ended.
enum Ended {
    Stopped(Stop),
    /// It failed; a restart may help.
    Failed(String),
    /// It cannot run, or did not become ready in time: no restart.
    Fatal(String),
}

/// A stop, once one is asked for.
async fn stop_asked(stop: &mut watch::Receiver<Option<Stop>>) -> Stop {
    match stop.wait_for(Option::is_some).await {
        Ok(s) => s.unwrap_or(Stop::Shutdown),
        // The supervisor is gone: the agent is going away.
        Err(_) => Stop::Shutdown,
    }
}

/// A server being supervised: one this agent started, or one adopted from an earlier agent
/// (not this process's child: no `wait`, its exit is polled).
enum Server {
    Spawned(tokio::process::Child),
    Adopted { pid: i32, start_time: u64 },
}

/// How often an adopted server is checked for exit.
const ADOPTED_POLL: Duration = Duration::from_millis(100);

impl Server {
    /// Resolves when the server's leader ends, with why. Cancel-safe.
    async fn exited(&mut self) -> String {
        match self {
            Server::Spawned(child) => child
                .wait()
                .await
                .map_or_else(|e| format!("wait failed: {e}"), exit_reason),
            Server::Adopted { pid, start_time } => loop {
                if !process::is_same_process(*pid, *start_time) {
                    return "exited (adopted from an earlier agent: status unknown)".into();
                }
                tokio::time::sleep(ADOPTED_POLL).await;
            },
        }
    }

    fn adopted(&self) -> bool {
        matches!(self, Server::Adopted { .. })
    }
}

/// The stop asked for last: a second unassign while the first one's stop is under way is
/// the version to confirm.
fn latest(stop: &watch::Receiver<Option<Stop>>, seen: Stop) -> Stop {
    stop.borrow().unwrap_or(seen)
}

/// Lines of the server's log a failure reason carries, and their bytes at most.
const TAIL_LINES: usize = 6;
const TAIL_BYTES: usize = 640;

impl Shared {
    fn report(&self, instance_id: &str, version: Version, state: ReportedState, r: Report) {
        let msg = StatusMsg::Instance {
            worker_id: self.worker_id.clone(),
            instance_id: instance_id.to_owned(),
            version,
            state,
            reason: r.reason.map(|r| berth_proto::text::reason(&r)),
            shared: r.shared,
            endpoint: r.endpoint,
            restarts: r.restarts,
        };
        if self.reports.send(msg).is_err() {
            tracing::debug!(instance_id, ?state, "report dropped: the agent is stopping");
        }
    }

    fn stopped(&self, p: &Placement, stop: Stop) {
        tracing::info!(instance_id = p.instance_id, version = %p.version, ?stop, "stopped");
        if let Stop::Unassigned(version) = stop {
            self.report(
                &p.instance_id,
                version,
                ReportedState::Stopped,
                Report::default(),
            );
        }
    }

    /// Whether the model file `spec` names (if any) is a file or directory under the model
    /// roots: checked before a server is spawned on it, which would read it with the agent's
    /// rights.
    async fn model_allowed(&self, spec: &StartSpec) -> Result<(), String> {
        let Some(berth_options::ModelRef::Path(path)) = spec.model_ref.as_deref() else {
            return Ok(());
        };
        if self.config.model_roots == berth_models::ModelRoots::Anywhere {
            return Ok(());
        }
        let roots = self.config.model_roots.clone();
        let path = path.clone();
        // Canonicalizing touches the file system: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            roots
                .open(&path)
                .map(drop)
                .map_err(|e| format!("model {}: {e}", path.display()))
        })
        .await
        .map_err(|e| format!("model check failed: {e}"))?
    }

    fn error(&self, p: &Placement, reason: String, restarts: u32) {
        tracing::warn!(instance_id = p.instance_id, version = %p.version, reason, "placement failed");
        self.report(
            &p.instance_id,
            p.version,
            ReportedState::Error,
            Report {
                reason: Some(reason),
                restarts,
                shared: p.shared(),
                ..Report::default()
            },
        );
    }

    async fn run(
        self: Arc<Self>,
        p: Placement,
        prev: Option<CancellationToken>,
        mut stop: watch::Receiver<Option<Stop>>,
        adopted: Option<Adopted>,
    ) {
        if let Some(a) = adopted {
            // Planned again from the record: the server runs already.
            let backend = match backend::plan(&p.spec, &self.config.binaries, p.stage) {
                Ok(Plan::Run(b)) => b,
                Ok(Plan::Reserve) => {
                    self.discard(&p, a).await;
                    return self.error(&p, "adopted a server for a reservation".into(), 0);
                }
                Err(e) => {
                    let restarts = a.restarts;
                    self.discard(&p, a).await;
                    return self.error(&p, format!("cannot adopt: {e}"), restarts);
                }
            };
            let restarts = a.restarts;
            return self
                .supervise_restarts(&p, backend.as_ref(), restarts, Some(a), &mut stop)
                .await;
        }
        if let Some(prev) = prev {
            // The older version's server must be gone first (or the stop comes first).
            tokio::select! {
                () = prev.cancelled() => {}
                s = stop_asked(&mut stop) => {
                    prev.cancelled().await;
                    return self.stopped(&p, s);
                }
            }
        }
        if let Some(s) = *stop.borrow() {
            return self.stopped(&p, s);
        }
        let shared = Report {
            shared: p.shared(),
            ..Report::default()
        };
        if let Err(reason) = self.model_allowed(&p.spec).await {
            return self.error(&p, reason, 0);
        }
        let backend = match backend::plan(&p.spec, &self.config.binaries, p.stage) {
            Ok(Plan::Run(b)) => b,
            Ok(Plan::Reserve) => {
                // A reservation: the GPUs are held, nothing runs.
                self.report(&p.instance_id, p.version, ReportedState::Starting, shared);
                let shared = Report {
                    shared: p.shared(),
                    ..Report::default()
                };
                self.report(&p.instance_id, p.version, ReportedState::Running, shared);
                let s = stop_asked(&mut stop).await;
                return self.stopped(&p, s);
            }
            Err(e) => return self.error(&p, e.to_string(), 0),
        };
        self.supervise_restarts(&p, backend.as_ref(), 0, None, &mut stop)
            .await;
    }

    /// Runs the server (the adopted one first) until it is stopped or given up, restarting
    /// it after failures within the budget.
    async fn supervise_restarts(
        &self,
        p: &Placement,
        backend: &dyn Backend,
        mut restarts: u32,
        mut adopted: Option<Adopted>,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) {
        let mut budget = RestartBudget::new(self.config.restarts);
        // A follower's stage is on the board (not ready yet) for as long as it is supervised.
        let _board = (p.stage == Stage::Follower).then(|| self.stages.enter(p));
        loop {
            match self
                .attempt(p, backend, restarts, stop, adopted.take())
                .await
            {
                Ended::Stopped(s) => return self.stopped(p, latest(stop, s)),
                Ended::Fatal(reason) => return self.error(p, reason, restarts),
                Ended::Failed(reason) => {
                    let Some(delay) = budget.on_failure(Instant::now()) else {
                        let limits = self.config.restarts;
                        return self.error(
                            p,
                            format!(
                                "gave up after {restarts} restarts ({} allowed in {}s): {reason}",
                                limits.max_restarts,
                                limits.window.as_secs()
                            ),
                            restarts,
                        );
                    };
                    restarts += 1;
                    tracing::warn!(
                        instance_id = p.instance_id,
                        restarts,
                        ?delay,
                        reason,
                        "server failed; restarting"
                    );
                    self.report(
                        &p.instance_id,
                        p.version,
                        ReportedState::Starting,
                        Report {
                            reason: Some(reason),
                            restarts,
                            shared: p.shared(),
                            ..Report::default()
                        },
                    );
                    tokio::select! {
                        s = stop_asked(stop) => return self.stopped(p, latest(stop, s)),
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Runs the server once (the adopted one, else a new one), until it fails or is
    /// stopped; its group is gone on return.
    async fn attempt(
        &self,
        p: &Placement,
        backend: &dyn Backend,
        restarts: u32,
        stop: &mut watch::Receiver<Option<Stop>>,
        adopted: Option<Adopted>,
    ) -> Ended {
        // One deadline for the followers' stages and the server's own loading.
        let deadline = tokio::time::Instant::now() + self.config.startup_timeout;
        let (mut server, pid, port, lease, followers) = match adopted {
            Some(a) => (
                Server::Adopted {
                    pid: a.pid,
                    start_time: a.start_time,
                },
                a.pid,
                a.port,
                a.lease,
                a.followers,
            ),
            None => {
                // `starting` once launched (a restart was reported as one); a leader says it
                // before it waits for the followers' stages.
                let starting = || {
                    let r = Report {
                        shared: p.shared(),
                        ..Report::default()
                    };
                    self.report(&p.instance_id, p.version, ReportedState::Starting, r);
                };
                let followers = match p.stage {
                    Stage::Leader => {
                        if restarts == 0 {
                            starting();
                        }
                        match self.await_followers(p, stop, deadline).await {
                            Ok(f) => f,
                            Err(ended) => return ended,
                        }
                    }
                    Stage::Alone | Stage::Follower => Vec::new(),
                };
                let (child, pid, lease) = match self.launch(p, backend, restarts, &followers) {
                    Ok(launched) => launched,
                    Err(ended) => return ended,
                };
                if restarts == 0 && p.stage != Stage::Leader {
                    starting();
                }
                let port = lease.port();
                (Server::Spawned(child), pid, port, Some(lease), followers)
            }
        };
        // No await since the launch: the group is guarded from the start.
        let group = GroupGuard::spared_by(pid, self.keep.clone());
        let run = Run {
            port,
            restarts,
            log_path: self.config.log_path(&p.instance_id, p.version),
            deadline,
            followers,
        };
        // Ends with the attempt (a dropped set aborts its task).
        let mut log_keeper = JoinSet::new();
        log_keeper.spawn(
            logs::keep_bounded(
                run.log_path.clone(),
                self.config.log_max_bytes,
                self.config.logs_kept,
                self.config.log_check_every,
            )
            .instrument(tracing::info_span!(
                "server_log",
                instance_id = p.instance_id,
                version = p.version.get()
            )),
        );
        let ended = self.supervise(p, backend, &mut server, &run, stop).await;
        if p.stage == Stage::Follower {
            // The leader must not connect to a server that is going away.
            self.stages.not_yet(p, restarts);
        }
        // Whatever happened, nothing of the group may outlive the attempt.
        match ended {
            Ended::Stopped(_) | Ended::Fatal(_) => self.terminate(&mut server, pid).await,
            Ended::Failed(_) => self.kill(&mut server, pid).await,
        }
        group.disarm();
        records::remove(&self.config.records_dir(), &p.instance_id);
        drop(lease);
        ended
    }

    /// Stops an adopted server that cannot be supervised (SIGTERM, grace, SIGKILL).
    async fn discard(&self, p: &Placement, a: Adopted) {
        let group = GroupGuard::spared_by(a.pid, self.keep.clone());
        let mut server = Server::Adopted {
            pid: a.pid,
            start_time: a.start_time,
        };
        self.terminate(&mut server, a.pid).await;
        group.disarm();
        records::remove(&self.config.records_dir(), &p.instance_id);
        drop(a.lease);
    }

    /// Starts the server in a process group of its own and writes its state record; the
    /// child, its pid (and pgid) and its port.
    fn launch(
        &self,
        p: &Placement,
        backend: &dyn Backend,
        restarts: u32,
        followers: &[FollowerStage],
    ) -> Result<(tokio::process::Child, i32, PortLease), Ended> {
        let c = &self.config;
        let Some(port) = c.ports.allocate(&c.listen_host) else {
            return Err(Ended::Fatal(format!(
                "no free port in {}-{} on {}",
                c.ports.range().start(),
                c.ports.range().end(),
                c.listen_host
            )));
        };
        let name = if p.spec.model.is_empty() {
            p.instance_id.as_str()
        } else {
            p.spec.model.as_str()
        };
        let rpc: Vec<String> = followers.iter().map(|f| f.endpoint.clone()).collect();
        let cmd = match backend.command(&Launch {
            name,
            host: &c.listen_host,
            port: port.port(),
            gpus: &p.gpus,
            cuda: self.cuda,
            rpc: &rpc,
        }) {
            Ok(cmd) => cmd,
            Err(e) => return Err(Ended::Fatal(e.to_string())),
        };
        let log_path = c.log_path(&p.instance_id, p.version);
        let mut log = match logs::rotate_and_open(&log_path, c.logs_kept) {
            Ok(f) => f,
            Err(e) => return Err(Ended::Fatal(format!("log {}: {e}", log_path.display()))),
        };
        let devices: Vec<String> = p
            .gpus
            .iter()
            .map(|g| {
                if self.cuda && !g.uuid.is_empty() {
                    g.uuid.clone()
                } else {
                    g.index.to_string()
                }
            })
            .collect();
        logs::note(
            &mut log,
            &format!(
                "start {} {} (restart {restarts}, CUDA_VISIBLE_DEVICES={})",
                cmd.program.display(),
                cmd.args.join(" "),
                devices.join(",")
            ),
        );
        let stdout = match log.try_clone() {
            Ok(f) => f,
            Err(e) => return Err(Ended::Fatal(format!("log {}: {e}", log_path.display()))),
        };
        let mut command = tokio::process::Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .envs(cmd.env.iter().map(|(k, v)| (k, v)))
            .env("CUDA_VISIBLE_DEVICES", devices.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log))
            // Not `kill_on_drop`: the group guard kills the whole group, unless the servers
            // are left to the next agent.
            .process_group(0);
        let child = match command.spawn() {
            Ok(child) => child,
            Err(e) => {
                return Err(Ended::Fatal(format!(
                    "cannot start {} ({}): {e}",
                    cmd.program.display(),
                    backend.name()
                )));
            }
        };
        let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
            return Err(Ended::Failed("the server exited at once".into()));
        };
        let records = c.records_dir();
        let record = records::Record {
            worker_id: self.worker_id.clone(),
            instance_id: p.instance_id.clone(),
            version: p.version.get(),
            pid,
            start_time: process::stat(pid).map_or(0, |s| s.start_time),
            port: port.port(),
            program: cmd.program.display().to_string(),
            restarts,
            spec: Some(Box::new(p.spec.clone())),
            gpus: p.gpus.clone(),
            workers: p.workers.clone(),
            followers: followers.to_vec(),
        };
        if let Err(e) = records::write(&records, &record) {
            tracing::warn!(%e, "cannot write the state record");
        }
        tracing::info!(
            instance_id = p.instance_id, version = %p.version, pid, port = port.port(),
            backend = backend.name(), "server started"
        );
        Ok((child, pid, port))
    }

    /// Watches a started (or adopted) server: readiness, health, exit, stop.
    async fn supervise(
        &self,
        p: &Placement,
        backend: &dyn Backend,
        server: &mut Server,
        run: &Run,
        stop: &mut watch::Receiver<Option<Stop>>,
    ) -> Ended {
        let c = &self.config;
        let port = run.port;
        let report = |reason: Option<String>, endpoint: Option<String>| Report {
            reason,
            endpoint,
            restarts: run.restarts,
            shared: p.shared(),
        };
        let failed = |what: String| {
            let tail = logs::tail(&run.log_path, TAIL_LINES, TAIL_BYTES);
            if tail.is_empty() {
                what
            } else {
                format!("{what}; log: {tail}")
            }
        };
        let check = backend.probe();
        let host = c.probe_host();
        // The server leads its own process group.
        let pgid = match server {
            Server::Spawned(child) => child
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .unwrap_or(0),
            Server::Adopted { pid, .. } => *pid,
        };
        let mut last = String::from("not probed yet");
        loop {
            tokio::select! {
                s = stop_asked(stop) => return Ended::Stopped(s),
                why = server.exited() => {
                    return Ended::Failed(failed(format!("{why} while loading")));
                }
                () = tokio::time::sleep_until(run.deadline) => {
                    let why = format!("not ready after {}s ({last})", c.startup_timeout.as_secs_f32());
                    // An adopted server that does not answer is a crash: a restart may help.
                    return if server.adopted() {
                        Ended::Failed(failed(format!("adopted server {why}")))
                    } else {
                        Ended::Fatal(failed(why))
                    };
                }
                () = tokio::time::sleep(c.startup_probe_every) => {
                    match probe::ready(host, port, &check, c.probe_timeout).await {
                        // The answer must come from this server, not from another process
                        // that holds the port (this one then fails to bind and exits).
                        Ok(()) if process::group_listens_on(pgid, port) => break,
                        Ok(()) => {
                            last = format!("port {port} answered by a process outside the server's group");
                        }
                        Err(e) => last = e,
                    }
                }
            }
        }
        let endpoint = format!("{}:{port}", c.advertise_host);
        tracing::info!(
            instance_id = p.instance_id,
            version = %p.version,
            endpoint,
            adopted = server.adopted(),
            "server ready"
        );
        if p.stage == Stage::Follower {
            self.stages.set(
                p,
                berth_proto::rpc::RpcReply {
                    state: berth_proto::rpc::RpcPartState::Ready,
                    endpoint: Some(endpoint.clone()),
                    restarts: run.restarts,
                },
            );
        }
        self.report(
            &p.instance_id,
            p.version,
            ReportedState::Running,
            report(None, Some(endpoint)),
        );
        let mut failures = 0;
        let mut tick = tokio::time::interval(c.probe_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        loop {
            tokio::select! {
                s = stop_asked(stop) => return Ended::Stopped(s),
                why = server.exited() => return Ended::Failed(failed(why)),
                _ = tick.tick() => match self.healthy(p, &check, pgid, run).await {
                    Ok(()) => failures = 0,
                    Err(StagesCheck::Changed(why)) => {
                        tracing::warn!(instance_id = p.instance_id, version = %p.version, why, "restarting with the new stages");
                        return Ended::Failed(why);
                    }
                    Err(StagesCheck::Unanswered(e)) => {
                        failures += 1;
                        tracing::warn!(instance_id = p.instance_id, version = %p.version, failures, e, "health probe failed");
                        if failures >= c.unhealthy_after {
                            return Ended::Failed(failed(format!(
                                "unhealthy: {failures} probes failed in a row ({e})"
                            )));
                        }
                    }
                },
            }
        }
    }

    /// One health probe of a running server: its own probe, and for a leader its followers'
    /// stages. A failure to answer is `Unanswered`; a stage that changed is `Changed`.
    async fn healthy(
        &self,
        p: &Placement,
        check: &Probe,
        pgid: i32,
        run: &Run,
    ) -> Result<(), StagesCheck> {
        let c = &self.config;
        match check {
            Probe::Http(paths) => probe::all(c.probe_host(), run.port, paths, c.probe_timeout)
                .await
                .map_err(StagesCheck::Unanswered)?,
            // No connection: the one the leader holds would keep a probe waiting.
            Probe::Listening if process::group_listens_on(pgid, run.port) => {}
            Probe::Listening => {
                return Err(StagesCheck::Unanswered(format!(
                    "no longer listens on port {}",
                    run.port
                )));
            }
        }
        if p.stage == Stage::Leader {
            self.check_followers(p, &run.followers).await?;
        }
        Ok(())
    }

    /// SIGTERM to the group, `grace`, SIGKILL; returns once the leader is reaped (when it is
    /// this process's child) and no process of the group is left.
    async fn terminate(&self, server: &mut Server, pgid: i32) {
        let grace = self.config.grace;
        let kill_at = Instant::now() + grace;
        signal_group(pgid, nix::sys::signal::Signal::SIGTERM);
        if let Server::Spawned(child) = server
            && tokio::time::timeout(grace, child.wait()).await.is_err()
        {
            tracing::warn!(pgid, ?grace, "server ignored SIGTERM; sending SIGKILL");
            signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait().await;
        }
        // An adopted group gets its SIGKILL here at `kill_at`.
        wait_group_gone(pgid, kill_at, Duration::from_secs(10)).await;
    }

    /// SIGKILL to the group (a crashed or unhealthy server); returns once it is gone.
    async fn kill(&self, server: &mut Server, pgid: i32) {
        signal_group(pgid, nix::sys::signal::Signal::SIGKILL);
        if let Server::Spawned(child) = server {
            let _ = child.wait().await;
        }
        wait_group_gone(pgid, Instant::now(), Duration::from_secs(10)).await;
    }
}
