//! Chaos: three analyzers and two agents as real processes, 1,000 random start/stop commands
//! over 100 instances from four concurrent publishers, and faults in the middle of it: on one
//! NATS server and one PostgreSQL, an analyzer SIGKILLed and restarted, then PostgreSQL
//! restarted; on a 3-node NATS cluster and a PostgreSQL primary with a synchronous standby, a
//! NATS node SIGKILLed (and started again later), then the primary SIGKILLed and the standby
//! promoted. At the end, within a bound, every instance is in the terminal state of its
//! newest command, every command JetStream accepted was applied or superseded, each
//! instance's newest event is its final state, and the books balance; no GPU is
//! overcommitted at any moment. How long placements paused at each fault
//! is printed (from the commit times of the `scheduled` events).
//!
//! The processes log at `warn` into files that a failure prints the end of; `CHAOS_LOG=info`
//! (any `RUST_LOG` filter) makes them say more, and `CHAOS_KEEP_LOGS=1` keeps the logs of a
//! run that passed.
//!
//! The analyzer and agent binaries must be built (`cargo build --workspace`; `cargo nextest
//! run --workspace` builds them).

use berth_proto::{CmdSeq, Command, InstanceState, StartSpec, StopSpec};
use berth_store::{InstanceRow, Store};
use berth_tests::{Fleet, GIB, Servers, wait_until};
use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ANALYZERS: usize = 3;
const WORKERS: [&str; 2] = ["c1", "c2"];
const GPUS_PER_WORKER: usize = 4;
const INSTANCES: usize = 100;
const COMMANDS: usize = 1000;
const PUBLISHERS: usize = 4;
/// When each fault strikes, in commands published.
const FIRST_FAULT_AT: usize = 300;
const SECOND_FAULT_AT: usize = 600;
const SEED: u64 = 0xbe47_c4a0_5eed_0001;
/// Bound for everything to settle once the last command is published.
const SETTLE: Duration = Duration::from_secs(90);
/// Bound for a process or a registration to come up.
const STARTUP: Duration = Duration::from_secs(30);

/// Timings shared by every analyzer: fast enough that the test waits seconds.
const ANALYZER_TIMINGS: [&str; 12] = [
    "--ack-wait",
    "2s",
    "--sweep-every",
    "250ms",
    "--stuck-after",
    "5s",
    "--unreachable-after",
    "3s",
    "--gone-after",
    "6s",
    "--fit-timeout",
    "10s",
];

/// A small seeded generator (SplitMix64): the command mix is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Start { vram_gib: i64, gpus: i64 },
    Stop,
}

/// One command as JetStream accepted it.
#[derive(Debug, Clone)]
struct Published {
    instance: String,
    seq: CmdSeq,
    op: Op,
}

fn instance_id(n: u64) -> String {
    format!("c-{n:03}")
}

/// A loopback address that was free a moment ago.
fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local address")
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    metrics: Option<SocketAddr>,
}

/// The child processes of the test and their logs. Dropping it kills every child, also when
/// the test panics; on a panic it prints the tail of each log and the last thing the test
/// saw unsettled.
struct Procs {
    dir: PathBuf,
    list: Vec<Proc>,
    /// Retired processes (the killed analyzer), kept for their logs.
    dead: Vec<Proc>,
    notes: Arc<Mutex<String>>,
}

impl Procs {
    fn new() -> Procs {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!("berth-chaos-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the log directory");
        Procs {
            dir,
            list: Vec::new(),
            dead: Vec::new(),
            notes: Arc::new(Mutex::new(String::new())),
        }
    }

    fn spawn(&mut self, name: &str, bin: &Path, args: &[String], metrics: Option<SocketAddr>) {
        let log = self.dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create a log file");
        let err = out.try_clone().expect("clone the log file");
        let child = std::process::Command::new(bin)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn a child process");
        self.list.push(Proc {
            name: name.into(),
            child,
            log,
            metrics,
        });
    }

    /// Starts an analyzer process and waits until its metrics endpoint answers (it binds it
    /// once connected to NATS and PostgreSQL). A port taken in between is retried.
    async fn spawn_analyzer(&mut self, name: &str, nats: &str, pg: &str) {
        let bin = berth_tests::built_binary("berth-analyzer");
        for _attempt in 0..3 {
            let addr = free_addr();
            let mut args: Vec<String> = [
                "--nats-url",
                nats,
                "--database-url",
                pg,
                "--name",
                name,
                "--metrics-addr",
                &addr.to_string(),
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            args.extend(ANALYZER_TIMINGS.iter().map(|s| (*s).to_owned()));
            self.spawn(name, &bin, &args, Some(addr));
            let up = wait_until(&format!("{name} to come up"), STARTUP, || {
                let exited = self
                    .list
                    .last_mut()
                    .and_then(|p| p.child.try_wait().ok())
                    .flatten()
                    .is_some();
                async move {
                    if exited {
                        return Some(false);
                    }
                    tokio::net::TcpStream::connect(addr)
                        .await
                        .ok()
                        .map(|_| true)
                }
            })
            .await;
            if up {
                return;
            }
            let failed = self.list.pop().expect("the analyzer just spawned");
            eprintln!("{name} exited at start:\n{}", tail(&failed.log, 20));
            self.dead.push(failed);
        }
        panic!("{name} did not start (see its log above)");
    }

    fn spawn_agent(&mut self, worker: &str, nats: &str, inventory: &Path) {
        let bin = berth_tests::built_binary("berth-agent");
        let args: Vec<String> = [
            "--nats-url",
            nats,
            "--inventory",
            &inventory.display().to_string(),
            "--worker",
            worker,
            "--heartbeat-secs",
            "1",
            "--metrics-addr",
            "off",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        self.spawn(&format!("agent-{worker}"), &bin, &args, None);
    }

    /// SIGKILLs the process called `name` (std's `Child::kill` is SIGKILL on Unix).
    fn sigkill(&mut self, name: &str) {
        let at = self
            .list
            .iter()
            .position(|p| p.name == name)
            .expect("process to kill");
        let mut p = self.list.remove(at);
        p.child.kill().expect("SIGKILL");
        let status = p.child.wait().expect("reap the killed process");
        eprintln!("chaos: {name} SIGKILLed ({status})");
        self.dead.push(p);
    }

    /// Panics if any live process exited: berth's processes must ride out the chaos.
    fn assert_all_alive(&mut self) {
        for p in &mut self.list {
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!(
                    "{} exited ({status}) during the run; its log ends with:\n{}",
                    p.name,
                    tail(&p.log, 40)
                );
            }
        }
    }

    fn note(&self, text: String) {
        if let Ok(mut n) = self.notes.lock() {
            *n = text;
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for p in &mut self.list {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if std::thread::panicking() {
            if let Ok(n) = self.notes.lock()
                && !n.is_empty()
            {
                eprintln!("---- last unsettled view ----\n{n}");
            }
            for p in self.list.iter().chain(&self.dead) {
                eprintln!("---- {} ({}) ----", p.name, p.log.display());
                eprintln!("{}", tail(&p.log, 40));
            }
            eprintln!("logs kept in {}", self.dir.display());
        } else if std::env::var_os("CHAOS_KEEP_LOGS").is_some() {
            eprintln!("logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The last `lines` lines of a log, leaving out the (many, expected) retry warnings of the
/// PostgreSQL restart, which are counted instead.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (retries, rest): (Vec<&str>, Vec<&str>) =
        text.lines().partition(|l| l.contains("retrying"));
    let mut out = rest[rest.len().saturating_sub(lines)..].join("\n");
    if !retries.is_empty() {
        out.push_str(&format!("\n({} retry warnings left out)", retries.len()));
    }
    out
}

fn inventory_toml() -> String {
    WORKERS
        .iter()
        .map(|w| {
            format!(
                "[[workers]]\nid = \"{w}\"\nsystem_reserved = \"1GiB\"\n\n\
                 [[workers.gpus]]\nname = \"Simulated H100\"\nvram = \"80GiB\"\n\
                 count = {GPUS_PER_WORKER}\n\n"
            )
        })
        .collect()
}

/// One publisher: takes command numbers from `next` until `COMMANDS` are out, each a random
/// start or stop of a random instance; returns what JetStream accepted.
async fn publish(
    bus: berth_bus::Bus,
    publisher: u64,
    next: Arc<AtomicUsize>,
    done: Arc<AtomicUsize>,
    pace_ms: u64,
) -> Vec<Published> {
    let mut rng = Rng(SEED ^ publisher.wrapping_mul(0x1000_0000_01b3));
    let mut out = Vec::new();
    while next.fetch_add(1, Ordering::SeqCst) < COMMANDS {
        let instance = instance_id(rng.below(INSTANCES as u64));
        let op = if rng.below(100) < 55 {
            let vram_gib = [10, 10, 10, 20, 20, 40][usize::try_from(rng.below(6)).unwrap_or(0)];
            let gpus = if rng.below(10) < 3 { 2 } else { 1 };
            Op::Start { vram_gib, gpus }
        } else {
            Op::Stop
        };
        let cmd = match op {
            Op::Start { vram_gib, gpus } => Command::Start(StartSpec {
                model: "chaos-model".into(),
                ..StartSpec::claim(vram_gib * GIB, gpus)
            }),
            Op::Stop => Command::Stop(StopSpec::default()),
        };
        // While a NATS node or the stream's leader is lost, a publish may time out: a command
        // is sent again until JetStream acknowledges it. A copy stored without the
        // acknowledgement is older than the one acknowledged, so it is superseded.
        let mut tries = 0;
        let seq = loop {
            match bus.publish_command(&instance, &cmd).await {
                Ok(seq) => break seq,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 100, "JetStream never accepted a command: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        out.push(Published { instance, seq, op });
        done.fetch_add(1, Ordering::SeqCst);
        // Pace the publishers so the chaos lands in the middle of the traffic.
        tokio::time::sleep(Duration::from_millis(rng.below(pace_ms))).await;
    }
    out
}

/// Waits until `done` reaches `n`.
async fn wait_published(done: &AtomicUsize, n: usize) {
    wait_until(&format!("{n} commands published"), SETTLE, || async {
        (done.load(Ordering::SeqCst) >= n).then_some(())
    })
    .await;
}

/// Whether some schedulable worker has `gpus` GPUs with `vram` bytes free each.
fn fits(
    capacity: &[(berth_store::WorkerRow, Vec<berth_store::GpuRow>)],
    vram: i64,
    gpus: i64,
) -> bool {
    capacity.iter().any(|(w, list)| {
        w.schedulable && list.iter().filter(|g| g.free_bytes() >= vram).count() as i64 >= gpus
    })
}

/// One look at the cluster: `Ok(rows)` when every instance is in the terminal state of its
/// newest command, `Err(what is not)` otherwise.
async fn settled(
    store: &Store,
    bus: &berth_bus::Bus,
    newest: &BTreeMap<String, Published>,
) -> Result<Vec<InstanceRow>, String> {
    let err = |e: &dyn std::fmt::Display| format!("query failed: {e}");
    let rows = store.instances().await.map_err(|e| err(&e))?;
    let by_id: HashMap<&str, &InstanceRow> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    let capacity = store.capacity().await.map_err(|e| err(&e))?;
    let allocations = store.allocations().await.map_err(|e| err(&e))?;
    let mut problems = Vec::new();
    for (id, last) in newest {
        let Some(row) = by_id.get(id.as_str()) else {
            problems.push(format!("{id}: no row"));
            continue;
        };
        let seq = last.seq;
        if row.cmd_seq < seq {
            problems.push(format!(
                "{id}: cmd_seq {} behind its newest command {seq} ({:?}); state {}",
                row.cmd_seq, last.op, row.state
            ));
            continue;
        }
        match last.op {
            Op::Stop => {
                if row.state != "stopped" {
                    problems.push(format!("{id}: {} after a stop", row.state));
                }
            }
            Op::Start { vram_gib, gpus } => {
                let spec = row.start_spec();
                if spec.as_ref().map(|s| (s.vram_bytes, s.gpus)) != Some((vram_gib * GIB, gpus)) {
                    problems.push(format!(
                        "{id}: spec {spec:?}, newest start wants {vram_gib} GiB x {gpus}"
                    ));
                }
                match row.state.as_str() {
                    "running" => {
                        let held: Vec<_> = allocations
                            .iter()
                            .filter(|a| a.instance_id == *id && a.version == row.version)
                            .collect();
                        let right = held.len() as i64 == gpus
                            && held.iter().all(|a| {
                                a.bytes == vram_gib * GIB
                                    && Some(&a.worker_id) == row.worker_id.as_ref()
                            });
                        if !right {
                            problems.push(format!(
                                "{id}: running v{} on {:?} but holds {held:?}",
                                row.version, row.worker_id
                            ));
                        }
                    }
                    "pending" if row.reason.as_deref().is_some_and(|r| !r.is_empty()) => {
                        if fits(&capacity, vram_gib * GIB, gpus) {
                            problems.push(format!(
                                "{id}: pending ({:?}) although {vram_gib} GiB x {gpus} fits now",
                                row.reason
                            ));
                        }
                    }
                    other => problems.push(format!(
                        "{id}: {other} (reason {:?}) after a start",
                        row.reason
                    )),
                }
            }
        }
    }
    // Settled means nothing is held but by running instances at their current version.
    for a in &allocations {
        let current = by_id
            .get(a.instance_id.as_str())
            .is_some_and(|r| r.state == "running" && r.version == a.version);
        if !current {
            problems.push(format!("leftover allocation {a:?}"));
        }
    }
    if !problems.is_empty() {
        return Err(summarize(&problems));
    }
    // The database agrees; now the stream: the newest stored command of each instance is
    // ours (or a re-evaluation republish of it), and it is the one applied.
    for (id, last) in newest {
        let stream_seq = bus
            .last_command_seq(id)
            .await
            .map_err(|e| err(&e))?
            .unwrap_or_default();
        let applied = by_id
            .get(id.as_str())
            .map_or(CmdSeq::default(), |r| r.cmd_seq);
        if stream_seq < last.seq || stream_seq != applied {
            problems.push(format!(
                "{id}: stream's newest command {stream_seq}, we published {}, cmd_seq {applied}",
                last.seq
            ));
        }
    }
    if problems.is_empty() {
        Ok(rows)
    } else {
        Err(summarize(&problems))
    }
}

fn summarize(problems: &[String]) -> String {
    let mut s = format!("{} problem(s):\n", problems.len());
    for p in problems.iter().take(30) {
        s.push_str("  ");
        s.push_str(p);
        s.push('\n');
    }
    s
}

async fn scrape(addr: SocketAddr) -> Option<String> {
    let mut conn = tokio::net::TcpStream::connect(addr).await.ok()?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    conn.read_to_string(&mut body).await.ok()?;
    Some(body)
}

/// A fault the run inflicts while commands flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL an analyzer process and start another.
    KillAnalyzer,
    /// Stop PostgreSQL and start it again.
    RestartPostgres,
    /// SIGKILL the NATS node that leads JetStream; it is started again
    /// [`NATS_NODE_DOWN_FOR`] commands later.
    KillNatsNode,
    /// SIGKILL the PostgreSQL primary, then promote its standby.
    FailOverPostgres,
}

/// Commands published while the killed NATS node is down.
const NATS_NODE_DOWN_FOR: usize = 150;

/// Servers that can suffer the faults a run asks of them.
trait ChaosServers: Servers {
    /// Inflicts a server fault (blocking), and says what was done.
    fn inflict(&mut self, fault: Fault) -> String;
    /// Starts again what [`ChaosServers::inflict`] left down (a killed NATS node), without
    /// waiting for it to be taken back.
    fn recover(&mut self) -> Option<String> {
        None
    }
    /// Waits until what was started again is whole (blocking), and says how long that took.
    fn wait_whole(&mut self) -> Option<String> {
        None
    }
    /// Most milliseconds a publisher waits between two commands: the chaos must land while
    /// commands still flow, and recovering some servers takes seconds.
    fn pace_ms(&self) -> u64 {
        12
    }
}

impl ChaosServers for berth_harness::TestServers {
    fn inflict(&mut self, fault: Fault) -> String {
        assert_eq!(
            fault,
            Fault::RestartPostgres,
            "one server of each cannot do that"
        );
        let down = Instant::now();
        self.pg.restart().expect("restart PostgreSQL");
        format!("PostgreSQL restarted, down {:?}", down.elapsed())
    }
}

impl ChaosServers for berth_harness::ReplicatedServers {
    fn inflict(&mut self, fault: Fault) -> String {
        match fault {
            Fault::KillNatsNode => {
                let leader = self.nats.leader().expect("a JetStream leader");
                let node = (0..self.nats.size())
                    .find(|&i| self.nats.name(i) == leader)
                    .expect("the leader is a node of the cluster");
                self.nats.kill(node);
                format!("NATS node {leader} (the JetStream leader) SIGKILLed")
            }
            Fault::FailOverPostgres => {
                let down = Instant::now();
                self.pg.kill_primary();
                self.pg.promote_standby().expect("promote the standby");
                format!(
                    "PostgreSQL primary SIGKILLed, standby promoted and writable after {:?}",
                    down.elapsed()
                )
            }
            other => panic!("the replicated servers do not do {other:?}"),
        }
    }

    fn recover(&mut self) -> Option<String> {
        let node = (0..self.nats.size()).find(|&i| !self.nats.is_running(i))?;
        self.nats
            .start_again(node)
            .expect("start the NATS node again");
        Some(format!("NATS node {} started again", self.nats.name(node)))
    }

    fn wait_whole(&mut self) -> Option<String> {
        let began = Instant::now();
        self.nats
            .wait_ready()
            .expect("the NATS cluster whole again");
        Some(format!(
            "the NATS cluster was whole (one leader, every node current) {:?} after the \
             publishers ended",
            began.elapsed()
        ))
    }

    fn pace_ms(&self) -> u64 {
        60
    }
}

/// Milliseconds since the Unix epoch, the clock of the events' `at_ms` (same machine).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_commands_survive_a_killed_analyzer_and_a_postgres_restart() {
    let fleet = Fleet::start().await;
    run(fleet, [Fault::KillAnalyzer, Fault::RestartPostgres]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_commands_survive_a_lost_nats_node_and_a_postgres_failover() {
    let fleet = Fleet::start_replicated().await;
    run(fleet, [Fault::KillNatsNode, Fault::FailOverPostgres]).await;
}

async fn run<S: ChaosServers>(mut fleet: Fleet<S>, faults: [Fault; 2]) {
    let began = Instant::now();
    let nats = fleet.servers.nats_url();
    let pg = fleet.servers.database_url();
    let mut procs = Procs::new();

    for i in 0..ANALYZERS {
        procs
            .spawn_analyzer(&format!("analyzer-{i}"), &nats, &pg)
            .await;
    }
    let inventory = procs.dir.join("inventory.toml");
    std::fs::write(&inventory, inventory_toml()).expect("write the inventory");
    for w in WORKERS {
        procs.spawn_agent(w, &nats, &inventory);
    }
    let store = fleet.store.clone();
    wait_until("both workers registered", STARTUP, || {
        let store = store.clone();
        async move {
            let n = store.gpus().await.ok()?.len();
            (n == WORKERS.len() * GPUS_PER_WORKER).then_some(())
        }
    })
    .await;
    let ready = began.elapsed();

    // Watch the books during the whole run, not only at the end: one statement, so one
    // snapshot. Queries failing while PostgreSQL restarts are skipped.
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (store, watching) = (fleet.store.clone(), watching.clone());
        tokio::spawn(async move {
            let mut samples = 0_usize;
            while watching.load(Ordering::SeqCst) {
                if let Ok(v) = store.gpu_violations().await {
                    assert!(v.is_empty(), "overcommit observed during the run: {v:#?}");
                    samples += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            samples
        })
    };

    // Traffic.
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let publishers: Vec<_> = (0..PUBLISHERS as u64)
        .map(|p| {
            let pace = fleet.servers.pace_ms();
            tokio::spawn(publish(
                fleet.bus.clone(),
                p,
                next.clone(),
                done.clone(),
                pace,
            ))
        })
        .collect();
    let traffic = Instant::now();

    // Chaos, while the publishers go on.
    let mut struck = Vec::new();
    for (fault, at) in faults.into_iter().zip([FIRST_FAULT_AT, SECOND_FAULT_AT]) {
        wait_published(&done, at).await;
        let (when, published_then) = (now_ms(), done.load(Ordering::SeqCst));
        let what = match fault {
            Fault::KillAnalyzer => {
                procs.sigkill("analyzer-0");
                procs.spawn_analyzer("analyzer-0-again", &nats, &pg).await;
                "analyzer-0 SIGKILLed and another started".to_owned()
            }
            server_fault => tokio::task::block_in_place(|| fleet.servers.inflict(server_fault)),
        };
        eprintln!(
            "chaos: {what} at {published_then} commands; {} published meanwhile",
            done.load(Ordering::SeqCst) - published_then
        );
        struck.push((fault, when));
        if fault == Fault::KillNatsNode {
            wait_published(&done, at + NATS_NODE_DOWN_FOR).await;
            if let Some(what) = fleet.servers.recover() {
                eprintln!("chaos: {what} at {} commands", done.load(Ordering::SeqCst));
            }
        }
    }

    let mut published = Vec::new();
    for p in publishers {
        published.extend(p.await.expect("publisher task"));
    }
    let published_in = traffic.elapsed();
    assert_eq!(published.len(), COMMANDS);
    if let Some(what) = tokio::task::block_in_place(|| fleet.servers.wait_whole()) {
        eprintln!("chaos: {what}");
    }

    // The newest command of each instance, by stream sequence.
    let mut newest: BTreeMap<String, Published> = BTreeMap::new();
    for p in &published {
        if newest.get(&p.instance).is_none_or(|n| n.seq < p.seq) {
            newest.insert(p.instance.clone(), p.clone());
        }
    }

    let settle_began = Instant::now();
    let rows = {
        let store = fleet.store.clone();
        let bus = fleet.bus.clone();
        let newest = &newest;
        let notes = procs.notes.clone();
        wait_until(
            "every instance in the terminal state of its newest command",
            SETTLE,
            || {
                let store = store.clone();
                let bus = bus.clone();
                let notes = notes.clone();
                async move {
                    match settled(&store, &bus, newest).await {
                        Ok(rows) => Some(rows),
                        Err(why) => {
                            if let Ok(mut n) = notes.lock() {
                                *n = why;
                            }
                            None
                        }
                    }
                }
            },
        )
        .await
    };
    let settled_in = settle_began.elapsed();
    procs.note(String::new());
    watching.store(false, Ordering::SeqCst);
    let samples = watcher.await.expect("books watcher");

    let violations = fleet.store.gpu_violations().await.expect("gpu check");
    assert!(violations.is_empty(), "GPU books broken: {violations:#?}");
    fleet.assert_books_balanced().await;
    procs.assert_all_alive();

    // Automation follows the events: each instance's newest event is its final state. Then,
    // how long placements paused at each fault: from the fault to the next placement
    // committed (the `scheduled` events' commit times).
    let events_began = Instant::now();
    let mut placed_at = Vec::new();
    for id in newest.keys() {
        // A stream whose leader moved may answer a moment later, and the relay may still be
        // sending the last events. The row is read again each time: a pending instance may
        // still be placed, now that the stops have freed room.
        let history = wait_until(
            "an instance's newest event to be its state",
            SETTLE,
            || async {
                let history = fleet.bus.history(id, 1024).await.ok()?;
                let row = fleet.store.instance(id).await.ok()??;
                let last = history.last()?;
                if last.state.as_str() == row.state && last.version == row.version {
                    return Some(history);
                }
                let events: Vec<String> = history
                    .iter()
                    .map(|e| {
                        format!(
                            "  {} v{} cmd_seq {} worker {:?} at {} ({:?})",
                            e.state, e.version, e.cmd_seq, e.worker_id, e.at_ms, e.reason
                        )
                    })
                    .collect();
                procs.note(format!(
                    "{id}: row {} v{} cmd_seq {} ({:?}); its events:\n{}",
                    row.state,
                    row.version,
                    row.cmd_seq,
                    row.reason,
                    events.join("\n")
                ));
                None
            },
        )
        .await;
        placed_at.extend(
            history
                .iter()
                .filter(|e| e.state == InstanceState::Scheduled)
                .map(|e| e.at_ms),
        );
    }
    placed_at.sort_unstable();
    println!(
        "chaos: every instance's newest event matched its row {:?} after it settled",
        events_began.elapsed()
    );
    for (fault, when) in &struck {
        let before = placed_at.iter().rev().find(|&&t| t < *when);
        let after = placed_at.iter().find(|&&t| t >= *when);
        match after {
            Some(after) => println!(
                "chaos: {fault:?}: first placement {} ms after the fault ({} ms since the \
                 one before it)",
                after - when,
                before.map_or(0, |b| after - b)
            ),
            None => println!("chaos: {fault:?}: no placement after the fault"),
        }
    }

    // What happened, in numbers.
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for r in rows.iter().filter(|r| newest.contains_key(&r.id)) {
        *states.entry(r.state.as_str()).or_default() += 1;
    }
    let mut counters: BTreeMap<String, f64> = BTreeMap::new();
    let mut scraped = 0;
    for p in &procs.list {
        let Some(addr) = p.metrics else { continue };
        let Some(text) = scrape(addr).await else {
            eprintln!("cannot scrape {}", p.name);
            continue;
        };
        scraped += 1;
        for line in text.lines() {
            if let Some((name, value)) = line.split_once(' ')
                && name.starts_with("berth_analyzer_")
                && name.ends_with("_total")
                && let Ok(v) = value.trim().parse::<f64>()
            {
                *counters.entry(name.to_owned()).or_default() += v;
            }
        }
    }
    println!(
        "chaos: {COMMANDS} commands over {} instances by {PUBLISHERS} publishers; \
         fleet up in {ready:?}, published in {published_in:?}, settled {settled_in:?} later, \
         {:?} in all",
        newest.len(),
        began.elapsed()
    );
    println!("chaos: final states {states:?}; books sampled {samples} times during the run");
    println!(
        "chaos: counters summed over the {scraped} live analyzers \
         (the SIGKILLed analyzer's counters are lost with it):"
    );
    for (name, v) in &counters {
        println!("  {name} {v}");
    }
}
