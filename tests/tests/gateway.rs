//! The gateway in front of real model servers: the official `openai` Python package as the
//! client (tests/python/gateway_client.py), routes that follow the instances' states, retries
//! on another instance, API keys, the management API and its OpenAPI document.
//!
//! Model servers are the fake OpenAI-compatible server (ops/fake-model-server.py) run by a
//! process agent, and SmolLM2 on the real llama-server where BERTH_LLAMA_SERVER is set.

use berth_gateway::{Gateway, GatewayConfig, INSTANCE_HEADER};
use berth_proto::InstanceState;
use berth_store::keys::{NewKey, Scope};
use berth_tests::{Fleet, GIB, serving::*, wait_until, worker};
use futures::StreamExt;
use std::{net::SocketAddr, time::Duration};

const LIMIT: Duration = Duration::from_secs(60);
const PY: Duration = Duration::from_secs(120);
/// The request body limit these gateways run with.
const MAX_BODY: usize = 64 * 1024;

/// A fleet, process agents for `workers`, a gateway with an admin and an inference key.
struct Served {
    fleet: Fleet,
    gateway: Gateway,
    metrics: SocketAddr,
    admin: String,
    inference: String,
    state: tempfile::TempDir,
}

impl Served {
    async fn start(workers: &[&str], ports: u16) -> Served {
        let mut fleet = Fleet::start().await;
        // Workers stay placed while their agent is silent: the retry test silences one.
        let mut config = fleet.analyzer_config("analyzer-0");
        config.unreachable_after = Duration::from_secs(60);
        config.gone_after = Duration::from_secs(120);
        fleet.add_analyzer_with(config, Default::default()).await;
        let state = tempfile::tempdir().expect("state dir");
        for (i, w) in workers.iter().enumerate() {
            let first = ports + 100 * i as u16;
            fleet
                .add_agent_with(
                    worker(w, 1, 80, &[]),
                    process_runtime(&state.path().join(w), first..=first + 99),
                )
                .await;
        }
        let admin = NewKey::generate();
        let inference = NewKey::generate();
        fleet
            .store
            .create_key("admin", Scope::Admin, &admin)
            .await
            .expect("admin key");
        fleet
            .store
            .create_key("app", Scope::Inference, &inference)
            .await
            .expect("inference key");
        let metrics = SocketAddr::from((
            [127, 0, 0, 1],
            berth_harness::free_port().expect("a free port"),
        ));
        let mut config = GatewayConfig::new(fleet.servers.nats.url(), fleet.servers.pg.url());
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.max_body_bytes = MAX_BODY;
        config.metrics_addr = Some(metrics);
        config.keys_reload_every = Duration::from_millis(200);
        let gateway = Gateway::start(config).await.expect("gateway");
        Served {
            fleet,
            gateway,
            metrics,
            admin: admin.secret,
            inference: inference.secret,
            state,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.addr)
    }

    fn env(&self, model: &str) -> Vec<(&'static str, String)> {
        vec![
            ("BASE_URL", self.url("/v1")),
            ("API_KEY", self.inference.clone()),
            ("MODEL", model.to_owned()),
        ]
    }

    async fn run(&self, id: &str, cmd: &berth_proto::Command) -> berth_store::InstanceRow {
        self.fleet
            .bus
            .publish_command(id, cmd)
            .await
            .expect("publish");
        self.fleet
            .wait_state(id, InstanceState::Running, LIMIT)
            .await
    }

    /// The model names `/v1/models` lists now.
    async fn models(&self) -> Vec<String> {
        let body: serde_json::Value = http()
            .get(self.url("/v1/models"))
            .bearer_auth(&self.inference)
            .send()
            .await
            .expect("GET /v1/models")
            .json()
            .await
            .expect("a JSON model list");
        body["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Some(m["id"].as_str()?.to_owned()))
            .collect()
    }

    /// The gateway's metric `name` with `label`, if it has it.
    async fn metric(&self, line_start: &str) -> Option<f64> {
        let text = http()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(line_start))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::new()
}

async fn skip_without_openai() -> bool {
    if let Some(why) = python_missing("openai").await {
        eprintln!("skipped: {why}");
        return true;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_client_is_served_by_model_name_with_streams_passed_through_as_they_come() {
    if skip_without_openai().await {
        return;
    }
    let s = Served::start(&["w1", "w2"], 43000).await;
    let hold = s.state.path().join("released");
    let hold_arg = hold.display().to_string();
    let flags = ["--hold-file", hold_arg.as_str()];
    s.run("chat-a", &fake_start("chat", &flags)).await;
    s.run("chat-b", &fake_start("chat", &flags)).await;
    wait_until("both instances routed", LIMIT, || async {
        (s.models().await == ["chat"]).then_some(())
    })
    .await;
    let mut env = s.env("chat");
    env.push(("INSTANCES", "chat-a,chat-b".into()));
    env.push(("HOLD_FILE", hold_arg.clone()));
    env.push(("FAKE", "1".into()));
    run_python(
        "tests/python/gateway_client.py",
        &["serves", "missing", "unauthorized"],
        &env,
        PY,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_instance_leaves_the_routes_and_a_model_without_one_is_503_with_the_reason() {
    if skip_without_openai().await {
        return;
    }
    let s = Served::start(&["w1"], 43200).await;
    s.run("solo", &fake_start("solo-model", &[])).await;
    wait_until("solo routed", LIMIT, || async {
        (s.models().await == ["solo-model"]).then_some(())
    })
    .await;
    s.fleet.stop_instance("solo").await;
    // Gone from the routes as soon as the stop is applied, before the server is down.
    wait_until("solo unrouted", LIMIT, || async {
        s.models().await.is_empty().then_some(())
    })
    .await;
    let row = s
        .fleet
        .wait_state("solo", InstanceState::Stopped, LIMIT)
        .await;
    let mut env = s.env("solo-model");
    env.push(("REASON", format!("solo is {}", row.state)));
    run_python("tests/python/gateway_client.py", &["unready"], &env, PY).await;

    // One that cannot be placed: 503 says what the worker lacked.
    s.fleet
        .bus
        .publish_command(
            "huge",
            &berth_proto::Command::Start(berth_proto::StartSpec {
                model: "huge-model".into(),
                ..berth_proto::StartSpec::claim(500 * GIB, 1)
            }),
        )
        .await
        .unwrap();
    let row = s
        .fleet
        .wait_state("huge", InstanceState::Pending, LIMIT)
        .await;
    let reason = row.reason.expect("a pending instance says why");
    let mut env = s.env("huge-model");
    env.push(("REASON", reason.chars().take(40).collect()));
    run_python("tests/python/gateway_client.py", &["unready"], &env, PY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_a_dead_instance_is_answered_by_another() {
    if skip_without_openai().await {
        return;
    }
    let mut s = Served::start(&["w1", "w2"], 43400).await;
    s.run("dead", &fake_start("pair", &[])).await;
    s.run("alive", &fake_start("pair", &[])).await;
    let dead_worker = s
        .fleet
        .store
        .instance("dead")
        .await
        .unwrap()
        .unwrap()
        .worker_id
        .unwrap();
    // Silence the dead instance's agent (like a SIGKILL), then kill its server: nobody tells
    // berth, so the route stays and requests meet a refused connection.
    // (Both may run on one worker: its agent goes, and the other server runs on.)
    let idx = if dead_worker == "w1" { 0 } else { 1 };
    s.fleet.agents.remove(idx).abort();
    let record = berth_agent::supervisor::records::read(
        &s.state.path().join(&dead_worker).join("instances"),
        "dead",
    )
    .expect("the dead instance's record");
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(record.pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the server's group");
    wait_until("the dead server gone", LIMIT, || async {
        berth_agent::supervisor::process::group_members(record.pid)
            .is_empty()
            .then_some(())
    })
    .await;
    let mut env = s.env("pair");
    env.push(("EXPECT", "alive".into()));
    env.push(("COUNT", "8".into()));
    run_python("tests/python/gateway_client.py", &["retried"], &env, PY).await;
    let retries = s.metric("berth_gateway_upstream_retries_total").await;
    assert!(retries.is_some_and(|n| n >= 1.0), "retries: {retries:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_admin_for_everything_inference_for_v1_and_a_revoked_key_stops_working() {
    let s = Served::start(&["w1"], 43600).await;
    let get = |path: &str, key: Option<&str>| {
        let mut r = http().get(s.url(path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        async move { r.send().await.unwrap() }
    };
    for (path, key, want) in [
        ("/v1/models", None, 401),
        ("/v1/models", Some("berth_not-a-key"), 401),
        ("/v1/models", Some(s.inference.as_str()), 200),
        ("/v1/models", Some(s.admin.as_str()), 200),
        ("/api/v1/instances", None, 401),
        ("/api/v1/instances", Some(s.inference.as_str()), 401),
        ("/api/v1/instances", Some(s.admin.as_str()), 200),
        ("/api/v1/openapi.json", None, 200),
    ] {
        let r = get(path, key).await;
        assert_eq!(r.status().as_u16(), want, "{path} with {key:?}");
        if want == 401 {
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"]["message"], "unauthorized", "{body}");
            assert_eq!(body["error"]["type"], "authentication_error", "{body}");
        }
    }
    assert!(s.fleet.store.revoke_key("app").await.unwrap());
    wait_until("the revoked key refused", LIMIT, || async {
        (get("/v1/models", Some(&s.inference)).await.status() == 401).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_shaped_errors_and_change_nothing() {
    let s = Served::start(&["w1"], 43800).await;
    let post = |path: &str, body: Vec<u8>| {
        let r = http()
            .post(s.url(path))
            .bearer_auth(&s.admin)
            .header("content-type", "application/json")
            .body(body);
        async move { r.send().await.unwrap() }
    };
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            b"not json".to_vec(),
            400,
            "not a JSON object",
        ),
        (
            "/v1/chat/completions",
            br#"{"messages":[]}"#.to_vec(),
            400,
            "names no model",
        ),
        (
            "/v1/chat/completions",
            br#"{"model":["x"]}"#.to_vec(),
            400,
            "must be a string",
        ),
        (
            "/v1/embeddings",
            vec![b' '; MAX_BODY + 1],
            413,
            "larger than",
        ),
        (
            "/v1/completions",
            br#"{"model":"nobody"}"#.to_vec(),
            404,
            "does not exist",
        ),
        (
            "/api/v1/instances/x/start",
            b"{".to_vec(),
            400,
            "start spec is not valid",
        ),
        (
            "/api/v1/instances/x/start",
            br#"{"vram_bytes":-1}"#.to_vec(),
            400,
            "vram",
        ),
        (
            "/api/v1/instances/x/start",
            br#"{"model":"a\u0000b","vram_bytes":1}"#.to_vec(),
            400,
            "control",
        ),
        (
            "/api/v1/instances/x/start",
            vec![b' '; 70_000],
            413,
            "larger than",
        ),
        (
            "/api/v1/instances/bad.id/start",
            br#"{"vram_bytes":1}"#.to_vec(),
            400,
            "bad instance id",
        ),
        (
            "/api/v1/instances/x/stop",
            br#"{"reason":5}"#.to_vec(),
            400,
            "stop is not valid",
        ),
    ];
    for (path, body, status, says) in cases {
        let r = post(path, body).await;
        assert_eq!(r.status().as_u16(), status, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.to_lowercase().contains(&says.to_lowercase()),
            "{path}: {body}"
        );
        assert!(body["error"]["type"].is_string(), "{body}");
    }
    // Nothing of it reached NATS or the database.
    assert!(s.fleet.store.instances().await.unwrap().is_empty());
    assert_eq!(
        s.fleet.bus.last_command_seq("x").await.unwrap(),
        None,
        "no command was published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_starts_lists_follows_and_stops_and_matches_its_openapi_document() {
    let s = Served::start(&["w1"], 44000).await;
    let doc: serde_json::Value = http()
        .get(s.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let check = |schema: &str, value: &serde_json::Value| {
        let wrapper = serde_json::json!({
            "$ref": format!("#/components/schemas/{schema}"),
            "components": doc["components"],
        });
        let validator =
            jsonschema::validator_for(&wrapper).unwrap_or_else(|e| panic!("schema {schema}: {e}"));
        let errors: Vec<String> = validator
            .iter_errors(value)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{schema}: {errors:?}\n{value:#}");
    };
    let as_admin = |r: reqwest::RequestBuilder| r.bearer_auth(&s.admin);
    let get_json = |path: &str| {
        let r = as_admin(http().get(s.url(path)));
        async move {
            let r = r.send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()
        }
    };

    // The events, followed from before the start.
    let mut events = as_admin(http().get(s.url("/api/v1/events?instance=api-1")))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );

    let spec = match fake_start("api-model", &[]) {
        berth_proto::Command::Start(spec) => serde_json::to_value(spec).unwrap(),
        other => panic!("{other:?}"),
    };
    let r = as_admin(http().post(s.url("/api/v1/instances/api-1/start?wait=true&timeout=60")))
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let accepted: serde_json::Value = r.json().await.unwrap();
    check("Accepted", &accepted);
    assert_eq!(accepted["settled"]["state"], "running", "{accepted}");
    assert!(accepted["settled"]["endpoint"].is_string(), "{accepted}");

    // The SSE stream carried the same states, as JSON events named `instance`.
    let mut seen = String::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !seen.contains("\"state\":\"running\"") {
        let chunk = tokio::time::timeout_at(deadline, events.chunk())
            .await
            .expect("the running event on the SSE stream")
            .unwrap()
            .expect("the stream goes on");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let running = seen
        .split("\n\n")
        .find(|e| e.contains("\"state\":\"running\""))
        .unwrap();
    assert!(running.contains("event: instance"), "{running}");
    let data = running
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap();
    check("InstanceEvent", &serde_json::from_str(data).unwrap());

    let list: serde_json::Value = get_json("/api/v1/instances").await;
    let one = &list.as_array().unwrap()[0];
    check("Instance", one);
    assert_eq!(one["id"], "api-1");
    assert_eq!(one["model"], "api-model");
    assert_eq!(one["state"], "running");
    assert_eq!(one["placement"][0]["bytes"], GIB);

    let detail: serde_json::Value = get_json("/api/v1/instances/api-1").await;
    check("InstanceDetail", &detail);
    let states: Vec<&str> = detail["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.first(), Some(&"analyzing"), "{states:?}");
    assert_eq!(states.last(), Some(&"running"), "{states:?}");
    assert_eq!(detail["spec"]["model"], "api-model");

    let missing = as_admin(http().get(s.url("/api/v1/instances/nobody")))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    check("ErrorBody", &missing.json().await.unwrap());

    let workers: serde_json::Value = get_json("/api/v1/workers").await;
    for w in workers.as_array().unwrap() {
        check("Worker", w);
    }
    let gpu = &workers[0]["gpus"][0];
    assert_eq!(gpu["reserved_bytes"], GIB);
    assert_eq!(gpu["total_bytes"], 80 * GIB);
    assert_eq!(
        gpu["free_bytes"].as_i64().unwrap(),
        gpu["total_bytes"].as_i64().unwrap()
            - gpu["system_reserved_bytes"].as_i64().unwrap()
            - gpu["reserved_bytes"].as_i64().unwrap()
            - gpu["used_outside_bytes"].as_i64().unwrap()
    );

    // A stop without waiting answers at once with its sequence; the instance follows.
    let r = as_admin(http().post(s.url("/api/v1/instances/api-1/stop")))
        .json(&serde_json::json!({"reason": "done with it"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let accepted: serde_json::Value = r.json().await.unwrap();
    check("Accepted", &accepted);
    assert!(accepted["cmd_seq"].as_u64().unwrap() > 0);
    assert!(accepted.get("settled").is_none());
    let row = s
        .fleet
        .wait_state("api-1", InstanceState::Stopped, LIMIT)
        .await;
    assert_eq!(row.reason.as_deref(), Some("done with it"));
    // The route table follows the event stream, which may trail the database by a moment.
    wait_until("api-1 unrouted", LIMIT, || async {
        s.models().await.is_empty().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_ends_the_upstream_request() {
    let s = Served::start(&["w1"], 44200).await;
    let hold = s.state.path().join("released");
    let hold_arg = hold.display().to_string();
    let row = s
        .run(
            "held",
            &fake_start("held-model", &["--hold-file", &hold_arg]),
        )
        .await;
    wait_until("held routed", LIMIT, || async {
        (s.models().await == ["held-model"]).then_some(())
    })
    .await;
    let in_flight = "berth_gateway_in_flight{instance=\"held\"}";
    let r = http()
        .post(s.url("/v1/chat/completions"))
        .bearer_auth(&s.inference)
        .json(&serde_json::json!({
            "model": "held-model", "stream": true,
            "messages": [{"role": "user", "content": "hi"}]
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()[INSTANCE_HEADER], "held");
    let mut body = r.bytes_stream();
    let first = tokio::time::timeout(LIMIT, body.next())
        .await
        .expect("the first chunk, while the server holds the rest")
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    assert_eq!(s.metric(in_flight).await, Some(1.0));
    drop(body);
    wait_until("the request no longer in flight", LIMIT, || async {
        (s.metric(in_flight).await == Some(0.0)).then_some(())
    })
    .await;
    // The server, released, finds its client gone: the gateway closed the connection.
    std::fs::write(&hold, b"").unwrap();
    let log = s
        .state
        .path()
        .join("w1/logs/held")
        .join(format!("{}.log", row.version));
    wait_until("the server saw its client go", LIMIT, || async {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("client went away")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_on_llama_server_answers_the_openai_client_through_the_gateway() {
    let cmd = match llama_start("smollm2") {
        Ok(c) => c,
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    if skip_without_openai().await {
        return;
    }
    let s = Served::start(&["w1"], 44400).await;
    s.fleet.bus.publish_command("smol", &cmd).await.unwrap();
    s.fleet
        .wait_state("smol", InstanceState::Running, Duration::from_secs(150))
        .await;
    wait_until("smol routed", LIMIT, || async {
        (s.models().await == ["smollm2"]).then_some(())
    })
    .await;
    run_python(
        "tests/python/gateway_client.py",
        &["serves"],
        &s.env("smollm2"),
        PY,
    )
    .await;
    s.fleet.stop_instance("smol").await;
    s.fleet
        .wait_state("smol", InstanceState::Stopped, LIMIT)
        .await;
    wait_until("smol unrouted", LIMIT, || async {
        s.models().await.is_empty().then_some(())
    })
    .await;
}
