//! The process runtime end to end: a start command through NATS and an analyzer to an agent
//! that runs a real server (`ops/fake-model-server.py` through the custom backend), reports it
//! running with its endpoint, restarts it when it crashes and stops its whole process group;
//! and SmolLM2 over two workers with the real llama-server and ggml-rpc-server.

use berth_agent::{
    Runtime,
    supervisor::{process, records},
};
use berth_models::{
    EstimateOptions, LlamaCppOptions, ModelRef, Scaling, profile_from_path, shapes,
};
use berth_proto::{
    Command, InstanceState, StartSpec, StatusMsg, Version,
    logs::{LogsReply, LogsRequest},
    status::ReportedState,
};
use berth_tests::{
    Fleet,
    serving::{fake_start, process_config, process_runtime},
    wait_until, worker,
};
use futures::StreamExt;
use std::{
    path::Path,
    time::{Duration, Instant},
};

const LIMIT: Duration = Duration::from_secs(30);

fn fake(flags: &[&str]) -> Command {
    fake_start("fake", flags)
}

/// A fleet with an analyzer and a process agent for worker w1, and the reports of w1.
async fn process_fleet(
    state: &Path,
    ports: std::ops::RangeInclusive<u16>,
) -> (Fleet, async_nats::Subscriber) {
    let mut fleet = Fleet::start().await;
    let reports = fleet
        .bus
        .client()
        .subscribe("berth.status.w1")
        .await
        .expect("subscribe to w1's reports");
    fleet.add_analyzer(Default::default()).await;
    fleet
        .add_agent_with(worker("w1", 1, 80, &[]), process_runtime(state, ports))
        .await;
    (fleet, reports)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_server_runs_with_its_endpoint_and_a_stop_ends_its_group() {
    let state = tempfile::tempdir().unwrap();
    let (fleet, mut reports) = process_fleet(state.path(), 42000..=42099).await;

    let t0 = Instant::now();
    fleet.bus.publish_command("srv", &fake(&[])).await.unwrap();
    let row = fleet.wait_state("srv", InstanceState::Running, LIMIT).await;
    let to_running = t0.elapsed();
    let (version, endpoint) = next_running(&mut reports).await;
    assert_eq!(version, row.version);
    let record = records::read(&state.path().join("instances"), "srv").unwrap();
    assert_eq!(endpoint, format!("127.0.0.1:{}", record.port));
    let probe = tokio::net::TcpStream::connect(&endpoint).await;
    assert!(probe.is_ok(), "the server answers at {endpoint}");
    // The books have the endpoint too.
    let row = fleet.store.instance("srv").await.unwrap().unwrap();
    assert_eq!(row.endpoint.as_deref(), Some(endpoint.as_str()));
    fleet.assert_books_balanced().await;

    // Its log, from the agent over NATS (what `berth logs` asks): the server's startup line.
    let ask = |req: LogsRequest| {
        let client = fleet.bus.client().clone();
        async move {
            let answer = client
                .request(
                    berth_proto::subjects::logs_subject("w1").unwrap(),
                    berth_proto::encode(&req).unwrap().into(),
                )
                .await
                .unwrap();
            berth_proto::decode::<LogsReply>(&answer.payload).unwrap()
        }
    };
    let log = wait_until("the server's startup line in its log", LIMIT, || async {
        let reply = ask(LogsRequest {
            instance_id: "srv".into(),
            version: None,
            previous: 0,
            offset: None,
            tail_lines: 50,
        })
        .await;
        reply.text.contains("listening on").then_some(reply)
    })
    .await;
    assert_eq!((log.version, log.error), (row.version, None));
    let missing = ask(LogsRequest {
        instance_id: "nothing-here".into(),
        version: None,
        previous: 0,
        offset: None,
        tail_lines: 50,
    })
    .await;
    assert!(missing.error.unwrap().contains("no log"));

    let t1 = Instant::now();
    fleet.stop_instance("srv").await;
    fleet.wait_state("srv", InstanceState::Stopped, LIMIT).await;
    let to_stopped = t1.elapsed();
    assert!(process::group_members(record.pid).is_empty());
    assert!(records::read(&state.path().join("instances"), "srv").is_none());
    assert!(std::net::TcpListener::bind(("127.0.0.1", record.port)).is_ok());
    assert!(fleet.store.allocations().await.unwrap().is_empty());
    fleet.assert_books_balanced().await;
    eprintln!("through NATS: start → running {to_running:?}, stop → stopped {to_stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_keeps_crashing_ends_in_error_and_frees_its_gpus() {
    let mut fleet = Fleet::start().await;
    let state = tempfile::tempdir().unwrap();
    fleet.add_analyzer(Default::default()).await;
    fleet
        .add_agent_with(
            worker("w1", 1, 80, &[]),
            process_runtime(state.path(), 42100..=42199),
        )
        .await;
    fleet
        .bus
        .publish_command("crash", &fake(&["--crash-on-start"]))
        .await
        .unwrap();
    let row = fleet.wait_state("crash", InstanceState::Error, LIMIT).await;
    let reason = row.reason.unwrap_or_default();
    assert!(reason.contains("gave up after 1 restarts"), "{reason}");
    assert!(reason.contains("simulated crash on start"), "{reason}");
    assert!(row.version >= Version::FIRST);
    assert!(fleet.store.allocations().await.unwrap().is_empty());
    fleet.assert_books_balanced().await;
}

/// The next `running` report with an endpoint on `reports`: its version and endpoint.
async fn next_running(reports: &mut async_nats::Subscriber) -> (Version, String) {
    loop {
        let msg = tokio::time::timeout(LIMIT, reports.next())
            .await
            .expect("a running report")
            .expect("subscription open");
        if let Ok(StatusMsg::Instance {
            state: ReportedState::Running,
            endpoint: Some(endpoint),
            version,
            ..
        }) = StatusMsg::decode(&msg.payload)
        {
            return (version, endpoint);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_the_server_its_killed_predecessor_left() {
    let state = tempfile::tempdir().unwrap();
    let ports = 42200..=42299;
    let (mut fleet, mut reports) = process_fleet(state.path(), ports.clone()).await;
    fleet.bus.publish_command("srv", &fake(&[])).await.unwrap();
    let row = fleet.wait_state("srv", InstanceState::Running, LIMIT).await;
    let (version, endpoint) = next_running(&mut reports).await;
    assert_eq!(version, row.version);
    let record = records::read(&state.path().join("instances"), "srv").unwrap();

    // Like a SIGKILL: the agent's tasks end at once, its server runs on.
    fleet.agents.pop().expect("agent").abort();
    assert_eq!(process::group_members(record.pid), [record.pid]);
    let t0 = Instant::now();
    fleet
        .add_agent_with(
            worker("w1", 1, 80, &[]),
            process_runtime(state.path(), ports),
        )
        .await;
    let (again, adopted_at) = next_running(&mut reports).await;
    let to_adopted = t0.elapsed();
    assert_eq!((again, adopted_at.as_str()), (version, endpoint.as_str()));
    assert_eq!(
        process::group_members(record.pid),
        [record.pid],
        "exactly one server process"
    );
    let row = fleet.wait_state("srv", InstanceState::Running, LIMIT).await;
    assert_eq!(row.version, version);
    assert_eq!(row.endpoint.as_deref(), Some(endpoint.as_str()));
    assert_eq!(
        records::read(&state.path().join("instances"), "srv").map(|r| r.pid),
        Some(record.pid)
    );
    fleet.assert_books_balanced().await;

    fleet.stop_instance("srv").await;
    fleet.wait_state("srv", InstanceState::Stopped, LIMIT).await;
    assert!(process::group_members(record.pid).is_empty());
    assert!(records::read(&state.path().join("instances"), "srv").is_none());
    assert!(fleet.store.allocations().await.unwrap().is_empty());
    eprintln!("agent killed and started again → adopted running reported {to_adopted:?}");
}

/// A server that dies is restarted through the whole path: the agent reports `starting` with
/// the restart count and why, the store takes the instance back from `running` to `starting`
/// (the one backward move), the restarted server is `running` again at an endpoint of its
/// own, and past the restart budget the instance ends in `error` with its GPUs freed. The
/// events tell each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_server_is_restarted_and_the_books_and_events_follow() {
    let state = tempfile::tempdir().unwrap();
    // Ports of its own: a test running beside it must not take the port its server binds
    // (the server would die at start, and the first `running` never come).
    let (fleet, _reports) = process_fleet(state.path(), 42400..=42499).await;
    // It exits 3 s after its first healthy answer: the agent has reported `running` by then.
    fleet
        .bus
        .publish_command("flaky", &fake(&["--exit-after-healthy", "3"]))
        .await
        .unwrap();
    // One restart allowed (see `process_runtime`): running, crash, running again, crash, error.
    let row = fleet.wait_state("flaky", InstanceState::Error, LIMIT).await;
    let reason = row.reason.unwrap_or_default();
    assert!(reason.contains("gave up after 1 restarts"), "{reason}");
    assert!(fleet.store.allocations().await.unwrap().is_empty());
    fleet.assert_books_balanced().await;

    let steps = wait_until("the restart's events", LIMIT, || async {
        let history = fleet.bus.history("flaky", 64).await.ok()?;
        let steps: Vec<(InstanceState, u32, bool, Option<String>)> = history
            .into_iter()
            .filter(|e| e.version == row.version)
            .map(|e| (e.state, e.restarts, e.endpoint.is_some(), e.reason))
            .collect();
        steps
            .iter()
            .any(|s| s.0 == InstanceState::Error)
            .then_some(steps)
    })
    .await;
    let states: Vec<(InstanceState, u32, bool)> =
        steps.iter().map(|(s, r, e, _)| (*s, *r, *e)).collect();
    assert_eq!(
        states,
        [
            (InstanceState::Analyzing, 0, false),
            (InstanceState::Scheduled, 0, false),
            (InstanceState::Starting, 0, false),
            (InstanceState::Running, 0, true),
            (InstanceState::Starting, 1, false),
            (InstanceState::Running, 1, true),
            (InstanceState::Error, 1, false),
        ]
    );
    let why = steps[4].3.clone().unwrap_or_default();
    assert!(why.contains("code 3") || why.contains("exit"), "{why}");
}

/// SmolLM2 on two workers whose (simulated) GPUs hold it only as two stages: the analyzer
/// places it over both, the follower runs ggml-rpc-server, the leader llama-server with
/// `--rpc`; a chat completion at the instance's endpoint answers, and a stop ends both
/// process groups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_over_two_workers_serves_through_the_followers_rpc_server() {
    let Some(llama) = berth_harness::test_llama_server().unwrap() else {
        return;
    };
    let model = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../.berth/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        model.exists(),
        "{} (run ops/fetch-models.sh)",
        model.display()
    );
    let options = EstimateOptions::LlamaCpp(LlamaCppOptions {
        context: Some(2048),
        ..LlamaCppOptions::default()
    });
    let scaling = Scaling {
        max_gpus: Some(1),
        max_workers: Some(2),
        ..Scaling::default()
    };
    // A card between the two shapes' needs: one worker cannot hold it, two stages can.
    let all = shapes(&profile_from_path(&model).unwrap(), &options, &scaling).unwrap();
    let need = |label: &str| {
        let s = all.iter().find(|s| s.label == label).unwrap();
        i64::try_from(s.vram_per_gpu).unwrap()
    };
    let card = (need("1 GPU") + need("split over 2 workers × 1 GPUs")) / 2;

    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    let states = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    for ((id, ports), state) in [("w1", 42300..=42349), ("w2", 42350..=42399)]
        .into_iter()
        .zip(&states)
    {
        let mut w = worker(id, 1, 1, &[]);
        w.gpus[0].total_bytes = card;
        let mut c = process_config(state.path(), ports);
        c.binaries.llama_server = Some(llama.clone());
        c.startup_timeout = Duration::from_secs(120);
        c.probe_every = Duration::from_secs(1);
        c.probe_timeout = Duration::from_secs(2);
        fleet.add_agent_with(w, Runtime::Process(Box::new(c))).await;
    }
    let start = Command::Start(StartSpec {
        model: "smollm2".into(),
        model_ref: Some(Box::new(ModelRef::Path(model))),
        backend: Some(Box::new(options)),
        scaling: Some(scaling),
        ..StartSpec::default()
    });
    let t0 = Instant::now();
    fleet.bus.publish_command("smol", &start).await.unwrap();
    let row = fleet
        .wait_state("smol", InstanceState::Running, Duration::from_secs(120))
        .await;
    let to_running = t0.elapsed();
    let mut on: Vec<String> = fleet
        .store
        .allocations()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.worker_id)
        .collect();
    on.sort();
    assert_eq!(on, ["w1", "w2"], "one stage on each worker");
    let lead = row.worker_id.clone().unwrap();
    let (leader_state, follower_state) = if lead == "w1" {
        (&states[0], &states[1])
    } else {
        (&states[1], &states[0])
    };
    let leader = records::read(&leader_state.path().join("instances"), "smol").unwrap();
    let follower = records::read(&follower_state.path().join("instances"), "smol").unwrap();
    assert!(
        follower.program.ends_with("ggml-rpc-server"),
        "{follower:?}"
    );
    assert!(leader.program.ends_with("llama-server"), "{leader:?}");
    assert_eq!(
        leader
            .followers
            .iter()
            .map(|f| f.endpoint.as_str())
            .collect::<Vec<_>>(),
        [format!("127.0.0.1:{}", follower.port)]
    );
    let endpoint = row.endpoint.clone().expect("the leader's endpoint");
    assert_eq!(endpoint, format!("127.0.0.1:{}", leader.port));
    fleet.assert_books_balanced().await;

    let (status, body) = berth_harness::http(
        &endpoint,
        "POST",
        "/v1/chat/completions",
        r#"{"model":"smollm2","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    let tokens = reply["usage"]["completion_tokens"].as_u64().unwrap_or(0);
    assert!(tokens > 0, "{body}");
    let rpc_log = std::fs::read_to_string(
        follower_state
            .path()
            .join("logs/smol")
            .join(format!("{}.log", row.version.get())),
    )
    .unwrap();
    assert!(
        rpc_log.contains("Accepted client connection"),
        "the leader connected to the stage: {rpc_log}"
    );

    let t1 = Instant::now();
    fleet.stop_instance("smol").await;
    fleet
        .wait_state("smol", InstanceState::Stopped, LIMIT)
        .await;
    let to_stopped = t1.elapsed();
    for r in [&leader, &follower] {
        assert!(process::group_members(r.pid).is_empty(), "{r:?}");
        assert!(std::net::TcpListener::bind(("127.0.0.1", r.port)).is_ok());
    }
    assert!(fleet.store.allocations().await.unwrap().is_empty());
    fleet.assert_books_balanced().await;
    eprintln!(
        "SmolLM2 over two workers: publish → running {to_running:?}, {tokens} tokens, \
         stop → stopped {to_stopped:?}"
    );
}
