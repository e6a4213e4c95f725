//! The process runtime driven directly (no NATS): real processes of the fake model server
//! (`ops/fake-model-server.py`) and, when available, the real llama-server. Every wait is on a
//! report or a state, with a deadline.

use berth_agent::{
    ProcessConfig, Supervisor, Usage, WorkerSpec,
    backend::Binaries,
    supervisor::{
        PortPool, RestartLimits, process, records,
        stages::{Peers, StageBoard},
    },
};
use berth_options::{CustomClaim, EstimateOptions, LlamaCppOptions, ModelRef};
use berth_proto::{
    AgentMsg, GpuInfo, StartSpec, StatusMsg, Version,
    rpc::{RpcPartState, RpcReply, RpcRequest},
    status::ReportedState,
};
use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};
use tokio::sync::mpsc::UnboundedReceiver;

const GIB: i64 = 1 << 30;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fake_server() -> String {
    repo()
        .join("ops/fake-model-server.py")
        .display()
        .to_string()
}

/// One pool for the whole test process. Tests run in processes of their own, in parallel:
/// each claims a block of ten ports for itself by holding a sentinel port of that block
/// (43000 + block) for as long as it lives, so two never reach for the same port.
fn ports() -> Arc<PortPool> {
    static POOL: OnceLock<(Arc<PortPool>, std::net::TcpListener)> = OnceLock::new();
    let (pool, _sentinel) = POOL.get_or_init(|| {
        (0..90u16)
            .find_map(|block| {
                let sentinel = std::net::TcpListener::bind(("127.0.0.1", 43_000 + block)).ok()?;
                let first = 41_000 + block * 10;
                Some((PortPool::new(first..=first + 9), sentinel))
            })
            .expect("a free block of test ports")
    });
    pool.clone()
}

struct Rig {
    sup: Supervisor,
    reports: UnboundedReceiver<StatusMsg>,
    config: ProcessConfig,
    dir: tempfile::TempDir,
}

fn worker(id: &str) -> WorkerSpec {
    WorkerSpec {
        id: id.into(),
        labels: Default::default(),
        gpus: vec![GpuInfo {
            index: 0,
            name: "Simulated".into(),
            uuid: "GPU-sim-0".into(),
            total_bytes: 80 * GIB,
            system_reserved_bytes: 0,
        }],
        usage: Usage::Fixed(Vec::new()),
    }
}

fn rig(tweak: impl FnOnce(&mut ProcessConfig)) -> Rig {
    rig_at(tempfile::tempdir().expect("temp dir"), tweak)
}

/// A supervisor on the state dir `dir` (an earlier one's, to adopt its servers).
fn rig_at(dir: tempfile::TempDir, tweak: impl FnOnce(&mut ProcessConfig)) -> Rig {
    rig_of("w1", dir, tweak)
}

/// A supervisor of worker `id`.
fn rig_of(id: &str, dir: tempfile::TempDir, tweak: impl FnOnce(&mut ProcessConfig)) -> Rig {
    let mut config = ProcessConfig::new(dir.path().to_path_buf());
    config.ports = ports();
    // Stand-in servers get made-up model paths: no model root to check them against.
    config.model_roots = berth_models::ModelRoots::Anywhere;
    config.startup_timeout = Duration::from_secs(20);
    config.startup_probe_every = Duration::from_millis(50);
    config.probe_every = Duration::from_millis(200);
    config.probe_timeout = Duration::from_millis(500);
    config.grace = Duration::from_secs(3);
    config.restarts = RestartLimits {
        max_restarts: 2,
        window: Duration::from_secs(60),
        backoff: berth_retry::RetryPolicy {
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(200),
            give_up_after: None,
        },
    };
    tweak(&mut config);
    let (tx, reports) = tokio::sync::mpsc::unbounded_channel();
    let sup = Supervisor::new(config.clone(), &worker(id), tx).expect("supervisor");
    Rig {
        sup,
        reports,
        config,
        dir,
    }
}

/// A start that runs the fake server with `flags`.
fn fake(flags: &[&str]) -> StartSpec {
    let mut argv: Vec<String> = [
        "python3",
        &fake_server(),
        "--host",
        "{host}",
        "--port",
        "{port}",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    argv.extend(flags.iter().map(|s| (*s).to_owned()));
    StartSpec {
        model: "fake".into(),
        backend: Some(Box::new(EstimateOptions::Custom(CustomClaim {
            bytes_per_gpu: GIB.unsigned_abs(),
            argv,
            ..CustomClaim::default()
        }))),
        ..StartSpec::claim(GIB, 1)
    }
}

fn assign(id: &str, version: i64, spec: StartSpec) -> AgentMsg {
    assign_over(id, version, spec, &[])
}

/// An assignment of a placement over `workers` (none: this worker alone).
fn assign_over(id: &str, version: i64, spec: StartSpec, workers: &[&str]) -> AgentMsg {
    AgentMsg::Assign {
        instance_id: id.into(),
        version: Version::new(version),
        gpus: vec![0],
        vram_bytes_per_gpu: GIB,
        spec,
        gpu_bytes: Vec::new(),
        workers: workers.iter().map(|w| (*w).to_owned()).collect(),
    }
}

fn unassign(id: &str, version: i64) -> AgentMsg {
    AgentMsg::Unassign {
        instance_id: id.into(),
        version: Version::new(version),
    }
}

/// An instance report, flattened.
#[derive(Debug, Clone)]
struct Seen {
    state: ReportedState,
    version: i64,
    reason: String,
    endpoint: Option<String>,
    restarts: u32,
}

impl Rig {
    async fn next(&mut self, limit: Duration) -> Seen {
        let msg = tokio::time::timeout(limit, self.reports.recv())
            .await
            .unwrap_or_else(|_| panic!("no report within {limit:?}"))
            .expect("report channel open");
        match msg {
            StatusMsg::Instance {
                state,
                version,
                reason,
                endpoint,
                restarts,
                ..
            } => Seen {
                state,
                version: version.get(),
                reason: reason.unwrap_or_default(),
                endpoint,
                restarts,
            },
            other => panic!("not an instance report: {other:?}"),
        }
    }

    async fn expect(&mut self, state: ReportedState, limit: Duration) -> Seen {
        let seen = self.next(limit).await;
        assert_eq!(seen.state, state, "{seen:?}");
        seen
    }

    fn record(&self, id: &str) -> Option<records::Record> {
        records::read(&self.config.records_dir(), id)
    }

    /// The server's process group, from its state record.
    fn pgid(&self, id: &str) -> i32 {
        self.record(id).expect("a state record while it runs").pid
    }

    fn no_report_pending(&mut self) {
        assert!(self.reports.try_recv().is_err(), "unexpected report");
    }
}

const SOON: Duration = Duration::from_secs(15);

fn port_of(endpoint: &str) -> u16 {
    endpoint
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("host:port")
}

fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A one-shot HTTP/1.1 request; the status code and body.
async fn http(endpoint: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    berth_harness::http(endpoint, method, path, body)
        .await
        .expect("an HTTP answer")
}

#[tokio::test]
async fn a_ready_server_runs_with_its_endpoint_and_stops_with_its_group() {
    let mut rig = rig(|_| {});
    let t0 = Instant::now();
    rig.sup.apply(assign("i1", 1, fake(&[])));
    let starting = rig.expect(ReportedState::Starting, SOON).await;
    assert_eq!((starting.version, starting.restarts), (1, 0));
    assert_eq!(starting.endpoint, None);
    let running = rig.expect(ReportedState::Running, SOON).await;
    let to_running = t0.elapsed();
    let endpoint = running.endpoint.clone().expect("an endpoint with running");
    let port = port_of(&endpoint);
    assert_eq!(endpoint, format!("127.0.0.1:{port}"));
    assert!(rig.config.ports.range().contains(&port));
    let (status, body) = http(&endpoint, "GET", "/v1/models", "").await;
    assert_eq!(status, 200, "{body}");
    let record = rig.record("i1").unwrap();
    assert_eq!((record.version, record.port), (1, port));
    assert_eq!(
        process::stat(record.pid).map(|s| s.start_time),
        Some(record.start_time)
    );
    let log = std::fs::read_to_string(rig.config.log_path("i1", Version::new(1))).unwrap();
    assert!(log.contains("fake-model-server: listening"), "{log}");
    assert!(log.contains("CUDA_VISIBLE_DEVICES=0"), "{log}");

    let t1 = Instant::now();
    rig.sup.apply(unassign("i1", 2));
    let stopped = rig.expect(ReportedState::Stopped, SOON).await;
    let to_stopped = t1.elapsed();
    assert_eq!(stopped.version, 2);
    assert!(process::group_members(record.pid).is_empty());
    assert!(
        rig.record("i1").is_none(),
        "the record goes with the server"
    );
    assert!(port_free(port));
    assert_eq!(rig.sup.active(), 0);
    eprintln!("fake server: assign → running {to_running:?}, unassign → stopped {to_stopped:?}");
}

/// A server that logs about 1 MB/s: its log is cut at the cap, the earlier parts kept as
/// `.log.1`, `.log.2` (each within the cap), never more files, however long it writes.
#[tokio::test]
async fn a_server_log_stays_bounded_however_much_it_writes() {
    const CAP: u64 = 64 << 10;
    let mut rig = rig(|c| {
        c.log_max_bytes = CAP;
        c.logs_kept = 2;
        c.log_check_every = Duration::from_millis(100);
    });
    rig.sup
        .apply(assign("i1", 1, fake(&["--log-bytes-per-sec", "1000000"])));
    rig.expect(ReportedState::Starting, SOON).await;
    rig.expect(ReportedState::Running, SOON).await;
    let log = rig.config.log_path("i1", Version::new(1));
    let earlier = |n: usize| PathBuf::from(format!("{}.{n}", log.display()));
    // Lines are numbered: wait until the server wrote 2 MB (30 times the cap) and the
    // oldest part kept comes from that late.
    let first_line_no = |path: &Path| -> Option<u64> {
        let text = std::fs::read_to_string(path).ok()?;
        text.lines()
            .find(|l| l.contains(" chatter "))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while first_line_no(&earlier(2)).is_none_or(|n| n < 20_000) {
        assert!(Instant::now() < deadline, "the log was not cut in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let files = std::fs::read_dir(log.parent().unwrap()).unwrap().count();
    assert_eq!(files, 3, "the log and two earlier parts");
    for n in [1, 2] {
        let len = std::fs::metadata(earlier(n)).unwrap().len();
        assert!(len <= CAP, ".log.{n} is {len} bytes");
    }
    // The current one passes the cap by what the server writes between two checks.
    let len = std::fs::metadata(&log).unwrap().len();
    assert!(len < 1 << 20, "the current log is {len} bytes");
    rig.sup.apply(unassign("i1", 2));
    rig.expect(ReportedState::Stopped, SOON).await;
}

#[tokio::test]
async fn a_server_never_ready_is_an_error_after_the_startup_deadline_and_its_group_is_killed() {
    let mut rig = rig(|c| c.startup_timeout = Duration::from_secs(1));
    let t0 = Instant::now();
    rig.sup.apply(assign("i1", 1, fake(&["--never-ready"])));
    rig.expect(ReportedState::Starting, SOON).await;
    let pgid = rig.pgid("i1");
    let error = rig.expect(ReportedState::Error, SOON).await;
    assert!(t0.elapsed() >= Duration::from_secs(1));
    assert!(error.reason.contains("not ready after 1s"), "{error:?}");
    assert!(
        error.reason.contains("503"),
        "the last probe's answer: {error:?}"
    );
    assert!(process::group_members(pgid).is_empty());
    assert!(rig.record("i1").is_none());
    rig.no_report_pending();
}

#[tokio::test]
async fn a_crashing_server_is_restarted_with_backoff_then_given_up() {
    let mut rig = rig(|_| {});
    rig.sup.apply(assign("i1", 1, fake(&["--crash-on-start"])));
    rig.expect(ReportedState::Starting, SOON).await;
    for k in 1..=2 {
        let restart = rig.expect(ReportedState::Starting, SOON).await;
        assert_eq!(restart.restarts, k);
        assert!(
            restart.reason.contains("exited with code 1 while loading"),
            "{restart:?}"
        );
        assert!(
            restart.reason.contains("simulated crash on start"),
            "the log's last lines: {restart:?}"
        );
    }
    let error = rig.expect(ReportedState::Error, SOON).await;
    assert_eq!(error.restarts, 2);
    assert!(
        error
            .reason
            .starts_with("gave up after 2 restarts (2 allowed in 60s)"),
        "{error:?}"
    );
    // The log of each attempt is kept, up to the bound.
    let log = rig.config.log_path("i1", Version::new(1));
    assert!(log.exists() && log.with_extension("log.1").exists());
    // An unassign after the error is confirmed at once.
    rig.sup.apply(unassign("i1", 2));
    assert_eq!(rig.expect(ReportedState::Stopped, SOON).await.version, 2);
}

#[tokio::test]
async fn a_server_that_dies_while_running_is_restarted_and_runs_again() {
    let mut rig = rig(|_| {});
    rig.sup.apply(assign("i1", 1, fake(&["--exit-after", "1"])));
    rig.expect(ReportedState::Starting, SOON).await;
    rig.expect(ReportedState::Running, SOON).await;
    let restart = rig.expect(ReportedState::Starting, SOON).await;
    assert_eq!(restart.restarts, 1);
    assert!(
        restart.reason.starts_with("exited with code 3"),
        "{restart:?}"
    );
    let again = rig.expect(ReportedState::Running, SOON).await;
    assert_eq!(again.restarts, 1);
    assert!(again.endpoint.is_some());
    rig.sup.apply(unassign("i1", 2));
    // It may die once more before the stop; whatever it reports, stopped comes last.
    loop {
        let seen = rig.next(SOON).await;
        if seen.state == ReportedState::Stopped {
            break;
        }
    }
}

#[tokio::test]
async fn an_unhealthy_server_is_killed_and_restarted() {
    let mut rig = rig(|c| c.unhealthy_after = 2);
    rig.sup.apply(assign("i1", 1, fake(&[])));
    rig.expect(ReportedState::Starting, SOON).await;
    rig.expect(ReportedState::Running, SOON).await;
    let pgid = rig.pgid("i1");
    // Frozen: it neither answers nor exits.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pgid),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    let restart = rig.expect(ReportedState::Starting, SOON).await;
    assert_eq!(restart.restarts, 1);
    assert!(
        restart
            .reason
            .starts_with("unhealthy: 2 probes failed in a row"),
        "{restart:?}"
    );
    assert!(
        process::group_members(pgid).is_empty(),
        "the frozen one is gone"
    );
    rig.expect(ReportedState::Running, SOON).await;
    assert_ne!(rig.pgid("i1"), pgid);
    rig.sup.apply(unassign("i1", 2));
    rig.expect(ReportedState::Stopped, SOON).await;
}

#[tokio::test]
async fn a_server_ignoring_sigterm_is_killed_after_the_grace_and_stopped_only_once_reaped() {
    let grace = Duration::from_millis(1500);
    let mut rig = rig(|c| c.grace = grace);
    rig.sup.apply(assign("i1", 1, fake(&["--ignore-sigterm"])));
    rig.expect(ReportedState::Starting, SOON).await;
    rig.expect(ReportedState::Running, SOON).await;
    let pgid = rig.pgid("i1");
    let t0 = Instant::now();
    rig.sup.apply(unassign("i1", 2));
    rig.expect(ReportedState::Stopped, SOON).await;
    let took = t0.elapsed();
    assert!(took >= grace, "stopped after {took:?}, before the grace");
    assert!(process::group_members(pgid).is_empty());
    assert!(process::stat(pgid).is_none(), "reaped, not a zombie");
    let log = std::fs::read_to_string(rig.config.log_path("i1", Version::new(1))).unwrap();
    assert!(!log.contains("exiting"), "it ignored SIGTERM: {log}");
    eprintln!("ignore SIGTERM: unassign → stopped {took:?} (grace {grace:?})");
}

#[tokio::test]
async fn a_stop_while_loading_stops_the_group_without_running() {
    let mut rig = rig(|_| {});
    rig.sup
        .apply(assign("i1", 1, fake(&["--ready-after", "60"])));
    rig.expect(ReportedState::Starting, SOON).await;
    let pgid = rig.pgid("i1");
    rig.sup.apply(unassign("i1", 2));
    let stopped = rig.expect(ReportedState::Stopped, SOON).await;
    assert_eq!(stopped.version, 2);
    assert!(process::group_members(pgid).is_empty());
    rig.no_report_pending();
}

#[tokio::test]
async fn a_stop_ends_every_process_of_the_group_children_included() {
    let mut rig = rig(|_| {});
    rig.sup.apply(assign("i1", 1, fake(&["--child"])));
    rig.expect(ReportedState::Starting, SOON).await;
    rig.expect(ReportedState::Running, SOON).await;
    let pgid = rig.pgid("i1");
    // The server starts its child itself; wait for both to show in /proc, with a deadline.
    let deadline = Instant::now() + SOON;
    let members = loop {
        let members = process::group_members(pgid);
        if members.len() >= 2 || Instant::now() > deadline {
            break members;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(members.len() >= 2, "server and child: {members:?}");
    let t0 = Instant::now();
    rig.sup.apply(unassign("i1", 2));
    rig.expect(ReportedState::Stopped, SOON).await;
    let took = t0.elapsed();
    for pid in members {
        let left = process::stat(pid).filter(|s| s.pgrp == pgid && s.state != 'Z');
        assert!(left.is_none(), "{pid} of group {pgid} still runs");
    }
    eprintln!("--child: unassign → group gone {took:?}");
}

#[tokio::test]
async fn a_newer_version_starts_only_once_the_older_server_is_gone() {
    let mut rig = rig(|_| {});
    rig.sup.apply(assign("i1", 1, fake(&[])));
    rig.expect(ReportedState::Starting, SOON).await;
    rig.expect(ReportedState::Running, SOON).await;
    let old = rig.pgid("i1");
    rig.sup.apply(assign("i1", 2, fake(&[])));
    let starting = rig.expect(ReportedState::Starting, SOON).await;
    assert_eq!(starting.version, 2, "no report for the replaced version");
    assert!(process::group_members(old).is_empty(), "never two servers");
    let running = rig.expect(ReportedState::Running, SOON).await;
    assert_eq!(running.version, 2);
    assert_ne!(rig.pgid("i1"), old);
    // A late assignment of the old version is ignored.
    rig.sup.apply(assign("i1", 1, fake(&[])));
    rig.sup.apply(unassign("i1", 3));
    assert_eq!(rig.expect(ReportedState::Stopped, SOON).await.version, 3);
    rig.no_report_pending();
}

#[tokio::test]
async fn a_missing_server_binary_is_an_error_not_a_hang() {
    let mut rig = rig(|c| {
        c.binaries = Binaries {
            llama_server: Some("/nonexistent/llama-server".into()),
            rpc_server: None,
            vllm: None,
            sglang_python: None,
        }
    });
    let spec = StartSpec {
        model_ref: Some(Box::new(ModelRef::Path("/models/x.gguf".into()))),
        ..StartSpec::claim(GIB, 1)
    };
    rig.sup.apply(assign("i1", 1, spec));
    let error = rig.expect(ReportedState::Error, SOON).await;
    assert!(
        error
            .reason
            .contains("llama-server not found: set --llama-server or run ops/build-llama.sh"),
        "{error:?}"
    );
    let bad_program = StartSpec {
        backend: Some(Box::new(EstimateOptions::Custom(CustomClaim {
            argv: vec!["/nonexistent/server".into()],
            ..CustomClaim::default()
        }))),
        ..StartSpec::claim(GIB, 1)
    };
    rig.sup.apply(assign("i2", 1, bad_program));
    let error = rig.expect(ReportedState::Error, SOON).await;
    assert!(
        error.reason.starts_with("cannot start /nonexistent/server"),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_start_without_a_model_is_a_reservation_running_at_once() {
    let mut rig = rig(|_| {});
    rig.sup.apply(assign("i1", 1, StartSpec::claim(GIB, 1)));
    rig.expect(ReportedState::Starting, SOON).await;
    let running = rig.expect(ReportedState::Running, SOON).await;
    assert_eq!(running.endpoint, None);
    assert!(rig.record("i1").is_none(), "no process");
    rig.sup.apply(unassign("i1", 2));
    rig.expect(ReportedState::Stopped, SOON).await;
}

#[tokio::test]
async fn shutting_down_stops_every_server() {
    let mut rig = rig(|_| {});
    rig.sup.apply(assign("i1", 1, fake(&["--child"])));
    rig.expect(ReportedState::Starting, SOON).await;
    rig.expect(ReportedState::Running, SOON).await;
    let pgid = rig.pgid("i1");
    rig.sup.shutdown().await;
    assert!(process::group_members(pgid).is_empty());
}

/// The real llama-server on SmolLM2 (CPU: the worker's GPUs are simulated).
#[tokio::test]
async fn llama_server_serves_smollm2_and_stops() {
    let Some(bin) = berth_harness::test_llama_server().unwrap() else {
        return;
    };
    let model = repo().join(".berth/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} (run ops/fetch-models.sh)",
        model.display()
    );
    let mut rig = rig(|c| {
        c.binaries.llama_server = Some(bin);
        c.startup_timeout = Duration::from_secs(120);
        c.probe_every = Duration::from_secs(1);
        c.probe_timeout = Duration::from_secs(2);
    });
    let spec = StartSpec {
        model: "smollm2".into(),
        model_ref: Some(Box::new(ModelRef::Path(model))),
        backend: Some(Box::new(EstimateOptions::LlamaCpp(LlamaCppOptions {
            context: Some(2048),
            ..LlamaCppOptions::default()
        }))),
        ..StartSpec::claim(GIB, 1)
    };
    let t0 = Instant::now();
    rig.sup.apply(assign("smol", 1, spec));
    rig.expect(ReportedState::Starting, SOON).await;
    let running = rig
        .expect(ReportedState::Running, Duration::from_secs(120))
        .await;
    let to_running = t0.elapsed();
    let endpoint = running.endpoint.unwrap();
    let pgid = rig.pgid("smol");
    let (status, body) = http(
        &endpoint,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tokens = reply["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert!(tokens > 0, "{body}");
    let t1 = Instant::now();
    rig.sup.apply(unassign("smol", 2));
    rig.expect(ReportedState::Stopped, Duration::from_secs(30))
        .await;
    let to_stopped = t1.elapsed();
    assert!(process::group_members(pgid).is_empty());
    assert!(port_free(port_of(&endpoint)));
    eprintln!(
        "llama-server SmolLM2: assign → running {to_running:?}, {tokens} tokens, \
         unassign → stopped {to_stopped:?}"
    );
}

/// Runs the fake server with `flags` as i1 v1 until it is `running`; its endpoint and record.
async fn running(rig: &mut Rig, flags: &[&str]) -> (String, records::Record) {
    rig.sup.apply(assign("i1", 1, fake(flags)));
    rig.expect(ReportedState::Starting, SOON).await;
    let running = rig.expect(ReportedState::Running, SOON).await;
    let endpoint = running.endpoint.expect("an endpoint with running");
    (endpoint, rig.record("i1").expect("a record while it runs"))
}

/// The next supervisor on `old`'s state dir, once `old` went away as a SIGKILLed agent
/// does (its tasks gone, its servers and records left).
async fn after_crash(old: Rig, tweak: impl FnOnce(&mut ProcessConfig)) -> Rig {
    let Rig { sup, dir, .. } = old;
    sup.abandon().await;
    rig_at(dir, tweak)
}

#[tokio::test]
async fn a_server_left_by_a_killed_agent_is_adopted_without_a_second_process() {
    let mut old = rig(|_| {});
    let (endpoint, record) = running(&mut old, &[]).await;
    let pgid = record.pid;
    let mut rig = after_crash(old, |_| {}).await;
    assert_eq!(process::group_members(pgid), [pgid], "left running");
    assert_eq!(rig.record("i1").as_ref(), Some(&record), "and its record");

    let t0 = Instant::now();
    let adoption = rig.sup.adopt();
    assert_eq!(adoption.adopted, ["i1"]);
    assert!(adoption.removed.is_empty(), "{adoption:?}");
    let running = rig.expect(ReportedState::Running, SOON).await;
    let to_running = t0.elapsed();
    assert_eq!((running.version, running.restarts), (1, 0));
    assert_eq!(running.endpoint.as_deref(), Some(endpoint.as_str()));
    assert_eq!(http(&endpoint, "GET", "/v1/models", "").await.0, 200);
    assert_eq!(process::group_members(pgid), [pgid], "no second process");
    assert_eq!(rig.record("i1").as_ref(), Some(&record));
    assert!(
        rig.config.ports.claim(port_of(&endpoint)).is_none(),
        "its port stays leased"
    );
    assert_eq!(rig.sup.active(), 1);

    // The assignment, delivered again: the adopted server is that placement.
    rig.sup.apply(assign("i1", 1, fake(&[])));
    assert_eq!(rig.sup.adopt(), Default::default(), "adopted once");
    rig.sup.apply(unassign("i1", 2));
    let stopped = rig.expect(ReportedState::Stopped, SOON).await;
    assert_eq!(stopped.version, 2, "stopped, nothing started: {stopped:?}");
    assert!(process::group_members(pgid).is_empty());
    assert!(rig.record("i1").is_none());
    assert!(port_free(port_of(&endpoint)));
    rig.no_report_pending();
    eprintln!("adoption: adopt → running {to_running:?}");
}

#[tokio::test]
async fn keep_servers_on_exit_leaves_them_to_the_next_agent() {
    let mut old = rig(|c| c.keep_servers_on_exit = true);
    let (endpoint, record) = running(&mut old, &["--child"]).await;
    let Rig { sup, dir, .. } = old;
    sup.shutdown().await;
    assert!(process::group_alive(record.pid), "left running");
    let mut rig = rig_at(dir, |_| {});
    assert_eq!(rig.sup.adopt().adopted, ["i1"]);
    let running = rig.expect(ReportedState::Running, SOON).await;
    assert_eq!(running.endpoint, Some(endpoint));
    // Stopped like a server of its own: the whole group, then `stopped`.
    let members = process::group_members(record.pid);
    rig.sup.shutdown().await;
    for pid in members {
        let left = process::stat(pid).filter(|s| s.pgrp == record.pid && s.state != 'Z');
        assert!(left.is_none(), "{pid} still runs");
    }
    assert!(records::read(&rig.config.records_dir(), "i1").is_none());
}

#[tokio::test]
async fn a_server_still_loading_is_adopted_and_running_once_ready() {
    let mut old = rig(|_| {});
    old.sup
        .apply(assign("i1", 1, fake(&["--ready-after", "2"])));
    old.expect(ReportedState::Starting, SOON).await;
    let pgid = old.pgid("i1");
    let mut rig = after_crash(old, |_| {}).await;
    assert_eq!(rig.sup.adopt().adopted, ["i1"]);
    let running = rig.expect(ReportedState::Running, SOON).await;
    assert!(running.endpoint.is_some());
    assert_eq!(rig.pgid("i1"), pgid);
    rig.sup.apply(unassign("i1", 2));
    rig.expect(ReportedState::Stopped, SOON).await;
    assert!(process::group_members(pgid).is_empty());
}

#[tokio::test]
async fn an_adopted_server_that_dies_is_restarted_like_a_crash() {
    let mut old = rig(|_| {});
    let (_, record) = running(&mut old, &[]).await;
    let mut rig = after_crash(old, |_| {}).await;
    assert_eq!(rig.sup.adopt().adopted, ["i1"]);
    rig.expect(ReportedState::Running, SOON).await;
    let t0 = Instant::now();
    process::signal_group(record.pid, nix::sys::signal::Signal::SIGKILL);
    let restart = rig.expect(ReportedState::Starting, SOON).await;
    let detected = t0.elapsed();
    assert_eq!(restart.restarts, 1);
    assert!(
        restart
            .reason
            .starts_with("exited (adopted from an earlier agent"),
        "{restart:?}"
    );
    let again = rig.expect(ReportedState::Running, SOON).await;
    assert_eq!((again.version, again.restarts), (1, 1));
    let new = rig.record("i1").expect("the new server's record");
    assert_ne!(new.pid, record.pid);
    assert_eq!(new.restarts, 1);
    rig.sup.apply(unassign("i1", 2));
    rig.expect(ReportedState::Stopped, SOON).await;
    assert!(process::group_members(new.pid).is_empty());
    eprintln!("adopted server killed → restart reported {detected:?}");
}

#[tokio::test]
async fn an_adopted_server_past_the_restart_budget_is_an_error() {
    let mut old = rig(|_| {});
    let (_, record) = running(&mut old, &[]).await;
    let mut rig = after_crash(old, |c| c.restarts.max_restarts = 0).await;
    assert_eq!(rig.sup.adopt().adopted, ["i1"]);
    rig.expect(ReportedState::Running, SOON).await;
    process::signal_group(record.pid, nix::sys::signal::Signal::SIGKILL);
    let error = rig.expect(ReportedState::Error, SOON).await;
    assert!(
        error.reason.starts_with("gave up after 0 restarts"),
        "{error:?}"
    );
    assert!(rig.record("i1").is_none());
    assert_eq!(rig.sup.active(), 0);
}

#[tokio::test]
async fn an_adopted_server_that_never_answers_is_a_crash_after_the_startup_deadline() {
    let mut old = rig(|_| {});
    old.sup.apply(assign("i1", 1, fake(&["--never-ready"])));
    old.expect(ReportedState::Starting, SOON).await;
    let pgid = old.pgid("i1");
    let mut rig = after_crash(old, |c| {
        c.startup_timeout = Duration::from_secs(1);
        c.restarts.max_restarts = 0;
    })
    .await;
    assert_eq!(rig.sup.adopt().adopted, ["i1"]);
    let error = rig.expect(ReportedState::Error, SOON).await;
    assert!(
        error.reason.contains("adopted server not ready after 1s"),
        "{error:?}"
    );
    assert!(process::group_members(pgid).is_empty());
}

/// A record as the supervisor writes it, for a process the test started.
fn record_of(pid: i32, start_time: u64) -> records::Record {
    records::Record {
        worker_id: "w1".into(),
        instance_id: "i1".into(),
        version: 1,
        pid,
        start_time,
        port: 41_999,
        program: "sleep".into(),
        restarts: 0,
        spec: Some(Box::new(fake(&[]))),
        gpus: Vec::new(),
        workers: Vec::new(),
        followers: Vec::new(),
    }
}

#[tokio::test]
async fn a_record_whose_pid_is_another_process_now_is_removed_and_the_process_left_alone() {
    use std::os::unix::process::CommandExt;
    let mut rig = rig(|_| {});
    let mut other = std::process::Command::new("sleep")
        .arg("60")
        .process_group(0)
        .spawn()
        .unwrap();
    let pid = i32::try_from(other.id()).unwrap();
    let started = process::stat(pid).unwrap().start_time;
    // The same pid, but not the process the record speaks of.
    records::write(&rig.config.records_dir(), &record_of(pid, started + 1)).unwrap();
    // And the right process, but no longer leading its group.
    let mut stray = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let stray_pid = i32::try_from(stray.id()).unwrap();
    let stray_start = process::stat(stray_pid).unwrap().start_time;
    let stray_record = records::Record {
        instance_id: "i2".into(),
        ..record_of(stray_pid, stray_start)
    };
    records::write(&rig.config.records_dir(), &stray_record).unwrap();
    // Another worker's record is not this supervisor's business.
    let elsewhere = records::Record {
        worker_id: "w2".into(),
        instance_id: "i3".into(),
        ..record_of(pid, started + 1)
    };
    records::write(&rig.config.records_dir(), &elsewhere).unwrap();

    let adoption = rig.sup.adopt();
    assert!(adoption.adopted.is_empty(), "{adoption:?}");
    assert_eq!(adoption.removed, ["i1", "i2"]);
    assert!(rig.record("i1").is_none() && rig.record("i2").is_none());
    assert!(rig.record("i3").is_some());
    assert!(process::is_same_process(pid, started), "left alone");
    assert!(
        process::is_same_process(stray_pid, stray_start),
        "left alone"
    );
    assert_eq!(rig.sup.active(), 0);
    rig.no_report_pending();
    for child in [&mut other, &mut stray] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

#[tokio::test]
async fn a_record_of_a_process_that_is_gone_is_removed_and_nothing_reported() {
    let mut rig = rig(|_| {});
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    let pid = i32::try_from(gone.id()).unwrap();
    gone.wait().unwrap();
    records::write(&rig.config.records_dir(), &record_of(pid, 1)).unwrap();
    std::fs::write(rig.config.records_dir().join("junk.json"), "{").unwrap();
    let adoption = rig.sup.adopt();
    assert!(adoption.adopted.is_empty());
    assert_eq!(adoption.removed.len(), 2, "{adoption:?}");
    assert_eq!(
        std::fs::read_dir(rig.config.records_dir()).unwrap().count(),
        0
    );
    assert_eq!(rig.sup.active(), 0);
    rig.no_report_pending();
}

/// Each worker's stage board, as the agents' `berth.rpc.<worker>` answer it, without NATS.
#[derive(Debug, Default)]
struct Boards(std::sync::Mutex<std::collections::HashMap<String, StageBoard>>);

impl Peers for Boards {
    fn ask(
        &self,
        worker_id: &str,
        request: RpcRequest,
    ) -> futures::future::BoxFuture<'static, Result<RpcReply, String>> {
        let board = self.0.lock().expect("boards").get(worker_id).cloned();
        let worker_id = worker_id.to_owned();
        Box::pin(async move {
            match board {
                Some(b) => Ok(b.answer(&request)),
                None => Err(format!("no responders for {worker_id}")),
            }
        })
    }
}

/// Stand-ins for llama-server and ggml-rpc-server in `dir`: the fake server on the host and
/// port each is given (llama-server's `--rpc` is echoed to its log). The RPC server of the
/// first launch exits after `crash_after` seconds when given.
fn fake_llama_binaries(dir: &Path, crash_after: Option<u32>) -> Binaries {
    let fake = fake_server();
    let marker = dir.join("crashed-once");
    let crash = match crash_after {
        Some(s) => format!(
            "if [ ! -e {m} ]; then : > {m}; set -- --exit-after {s}; else set --; fi",
            m = marker.display()
        ),
        None => "set --".to_owned(),
    };
    let script = |host: &str, port: &str, extra: &str| {
        format!(
            "#!/bin/sh\nhost=127.0.0.1; port=0\n\
             while [ $# -gt 0 ]; do case \"$1\" in {host}) host=$2; shift;; {port}) port=$2; shift;; \
             --rpc) echo \"rpc $2\" >&2; shift;; esac; shift; done\n{extra}\n\
             exec python3 {fake} --host \"$host\" --port \"$port\" \"$@\"\n"
        )
    };
    let write = |name: &str, text: String| {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a stand-in");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make it executable");
        path
    };
    Binaries {
        llama_server: Some(write("llama-server", script("--host", "--port", "set --"))),
        rpc_server: Some(write("ggml-rpc-server", script("-H", "-p", &crash))),
        vllm: None,
        sglang_python: None,
    }
}

/// A llama.cpp start placed on w1 (leading) and w2.
fn over_two(id: &str, version: i64) -> AgentMsg {
    let spec = StartSpec {
        model_ref: Some(Box::new(ModelRef::Path("/models/x.gguf".into()))),
        ..StartSpec::claim(GIB, 1)
    };
    assign_over(id, version, spec, &["w1", "w2"])
}

/// A leader on w1 and a follower on w2 running the stand-ins from `bins`, the leader
/// reaching the follower's board.
fn leader_and_follower(bins: &Binaries, tweak: impl Fn(&mut ProcessConfig) + Copy) -> (Rig, Rig) {
    let leader = rig_of("w1", tempfile::tempdir().expect("temp dir"), |c| {
        c.binaries = bins.clone();
        tweak(c);
    });
    let follower = rig_of("w2", tempfile::tempdir().expect("temp dir"), |c| {
        c.binaries = bins.clone();
        tweak(c);
    });
    let boards = Boards::default();
    boards
        .0
        .lock()
        .expect("boards")
        .insert("w2".into(), follower.sup.stage_board());
    leader.sup.set_peers(Arc::new(boards));
    (leader, follower)
}

/// The leader waits for its follower's stage, runs with `--rpc` naming it, and restarts
/// once that stage restarted elsewhere (llama-server does not reconnect); a stop ends both.
#[tokio::test]
async fn a_leader_runs_with_its_followers_stage_and_follows_its_restart() {
    let bins_dir = tempfile::tempdir().unwrap();
    let bins = fake_llama_binaries(bins_dir.path(), Some(3));
    let (mut leader, mut follower) = leader_and_follower(&bins, |_| {});
    leader.sup.apply(over_two("big", 1));
    assert_eq!(
        leader.expect(ReportedState::Starting, SOON).await.restarts,
        0
    );
    // The follower is assigned after the leader: the leader waits for it.
    follower.sup.apply(over_two("big", 1));
    follower.expect(ReportedState::Starting, SOON).await;
    let stage = follower.expect(ReportedState::Running, SOON).await;
    let stage_at = stage.endpoint.expect("the stage's endpoint");
    assert_eq!(
        follower.record("big").unwrap().program,
        bins.rpc_server.clone().unwrap().display().to_string()
    );
    let running = leader.expect(ReportedState::Running, SOON).await;
    assert!(running.endpoint.is_some());
    let record = leader.record("big").unwrap();
    assert_eq!(record.workers, ["w1", "w2"]);
    assert_eq!(record.followers.len(), 1);
    assert_eq!(record.followers[0].endpoint, stage_at);
    let log = std::fs::read_to_string(leader.config.log_path("big", Version::new(1))).unwrap();
    assert!(log.contains(&format!("--rpc {stage_at}")), "{log}");

    // The stage's server exits: the follower restarts it, and the leader follows.
    let restart = follower.expect(ReportedState::Starting, SOON).await;
    assert_eq!(restart.restarts, 1);
    let again = follower.expect(ReportedState::Running, SOON).await;
    let moved_to = again.endpoint.expect("the restarted stage's endpoint");
    let follows = leader.expect(ReportedState::Starting, SOON).await;
    assert_eq!(follows.restarts, 1);
    assert!(
        follows.reason.contains("the stage on w2 changed"),
        "{follows:?}"
    );
    leader.expect(ReportedState::Running, SOON).await;
    assert_eq!(
        leader.record("big").unwrap().followers[0].endpoint,
        moved_to
    );

    let pgids = [leader.pgid("big"), follower.pgid("big")];
    leader.sup.apply(unassign("big", 2));
    follower.sup.apply(unassign("big", 2));
    leader.expect(ReportedState::Stopped, SOON).await;
    follower.expect(ReportedState::Stopped, SOON).await;
    for pgid in pgids {
        assert!(process::group_members(pgid).is_empty());
    }
    let gone = follower.sup.stage_board().answer(&RpcRequest {
        instance_id: "big".into(),
        version: Version::new(1),
    });
    assert_eq!(gone.state, RpcPartState::NotAssigned);
}

#[tokio::test]
async fn a_leader_whose_follower_never_comes_is_an_error_at_the_deadline() {
    let bins_dir = tempfile::tempdir().unwrap();
    let bins = fake_llama_binaries(bins_dir.path(), None);
    let (mut leader, _follower) =
        leader_and_follower(&bins, |c| c.startup_timeout = Duration::from_secs(1));
    leader.sup.apply(over_two("big", 1));
    leader.expect(ReportedState::Starting, SOON).await;
    let error = leader.expect(ReportedState::Error, SOON).await;
    assert!(
        error
            .reason
            .starts_with("stages on other workers not ready after 1s (w2: NotAssigned)"),
        "{error:?}"
    );
    assert!(leader.record("big").is_none(), "nothing was launched");

    // Without a way to the other workers the reason says so.
    let mut alone = rig(|c| {
        c.binaries = bins.clone();
        c.startup_timeout = Duration::from_millis(300);
    });
    alone.sup.apply(over_two("big", 1));
    alone.expect(ReportedState::Starting, SOON).await;
    let error = alone.expect(ReportedState::Error, SOON).await;
    assert!(
        error
            .reason
            .contains("w2: this agent cannot reach other workers"),
        "{error:?}"
    );
}
