//! The `berth` binary as a user runs it: bad input gets a clear error and a non-zero exit;
//! good input works against real servers.

use berth_harness::TestServers;
use std::{
    io::{BufRead, BufReader},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

fn berth(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("BERTH_NATS_URL")
        .env_remove("BERTH_DATABASE_URL")
        .envs(env.iter().copied())
        .output()
        .expect("run berth")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn bad_arguments_are_refused_with_a_clear_error() {
    // Nothing listens on port 1: if an argument slipped through, the command would fail on
    // the connection instead, and the message check below would catch it.
    let env = [("BERTH_NATS_URL", "nats://127.0.0.1:1")];
    let cases: &[(&[&str], &str)] = &[
        (&["start", "m", "--vram", "lots"], "not a size"),
        (&["start", "m", "--vram", "-5GiB"], "negative"),
        (&["start", "m", "--vram", "0"], "must be positive"),
        (&["start", "m", "--vram", "9PiB"], "more than any GPU has"),
        (&["start", "m", "--vram", "1GiB", "--gpus", "0"], "--gpus"),
        (&["start", "m", "--vram", "1GiB", "--gpus", "65"], "--gpus"),
        (
            &["start", "m", "--vram", "1GiB", "--selector", "zone"],
            "not key=value",
        ),
        (&["start", "a.b", "--vram", "1GiB"], "contains '.'"),
        (
            &["start", "m", "--vram", "1GiB", "--gpu-name", ""],
            "gpu_name must be",
        ),
        (&["start", "m"], "--vram"),
        (
            &["start", "m", "--vram", "1GiB", "--max-gpus", "2"],
            "scaling needs model_ref",
        ),
        (
            &["start", "m", "--model-file", "/m.gguf", "--max-gpus", "0"],
            "--max-gpus",
        ),
        (
            &[
                "start",
                "m",
                "--model-file",
                "/m.gguf",
                "--max-workers",
                "17",
            ],
            "--max-workers",
        ),
        (
            &["start", "m", "--vram", "1GiB", "--gpu-id", ""],
            "gpu_ids takes",
        ),
        (
            &["start", "m", "--vram", "1GiB", "--replica-group", ""],
            "replica_group must be",
        ),
        (&["stop", "has space"], "contains ' '"),
        (&["frobnicate"], "unrecognized subcommand"),
        (
            &["up", "--inventory", "/nonexistent/inv.toml"],
            "/nonexistent/inv.toml",
        ),
    ];
    for (args, expected) in cases {
        let out = berth(args, &env);
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        assert!(
            err.contains(expected),
            "{args:?}: stderr lacks {expected:?}:\n{err}"
        );
    }
}

#[test]
fn unreachable_servers_give_a_clear_error() {
    let out = berth(
        &["ps"],
        &[(
            "BERTH_DATABASE_URL",
            "postgres://postgres@127.0.0.1:1/postgres",
        )],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("127.0.0.1:1"), "{}", stderr(&out));
}

#[test]
fn start_ps_stop_against_berth_up() {
    let dir = tempfile::Builder::new()
        .prefix("berth-test-up-")
        .tempdir()
        .unwrap();
    let port = |p: u16| p.to_string();
    // Free ports: borrow them from a harness server pair, then stop it.
    let (nats_port, pg_port) = {
        let probe = TestServers::start().expect("servers");
        (probe.nats.port(), probe.pg.port())
    };
    let mut up = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["up", "--dir"])
        .arg(dir.path())
        .args(["--nats-port", &port(nats_port), "--pg-port", &port(pg_port)])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    assert!(ready.contains("berth is up"), "{ready}");

    let nats = format!("nats://127.0.0.1:{nats_port}");
    let db = format!("postgres://postgres@127.0.0.1:{pg_port}/postgres");
    let env = [
        ("BERTH_NATS_URL", nats.as_str()),
        ("BERTH_DATABASE_URL", db.as_str()),
    ];
    let out = berth(&["start", "demo", "--vram", "20GiB", "--wait"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("demo running"), "{}", stdout(&out));

    let out = berth(&["ps"], &env);
    let table = stdout(&out);
    let row = table
        .lines()
        .find(|l| l.trim_start().starts_with("demo"))
        .unwrap();
    assert!(
        row.contains("running") && row.contains("20.0 GiB"),
        "{table}"
    );

    let out = berth(&["start", "huge", "--vram", "500GiB", "--wait"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("huge pending"), "{}", stdout(&out));

    let out = berth(&["stop", "demo", "--wait"], &env);
    assert!(stdout(&out).contains("demo stopped"), "{}", stdout(&out));
    let out = berth(&["ps", "--explain", "demo"], &env);
    let text = stdout(&out);
    assert!(out.status.success(), "{}", stderr(&out));
    for expected in [
        "state      stopped",
        "history",
        "demo running v1 on",
        "demo stopped v2",
    ] {
        assert!(
            text.contains(expected),
            "explain lacks {expected:?}:\n{text}"
        );
    }
    let out = berth(&["ps", "--explain", "nope"], &env);
    assert!(!out.status.success() && stderr(&out).contains("no instance \"nope\""));
    let out = berth(&["migrate"], &env);
    assert!(
        stdout(&out).contains("migrations applied: 0"),
        "{}",
        stdout(&out)
    );

    // Ctrl-C stops the whole fleet cleanly.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(up.id()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "berth up did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
}

#[test]
fn estimate_reads_model_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 4096, "vocab_size": 32000, "torch_dtype": "float16",
    });
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let path = dir.path().to_str().unwrap();

    let out = berth(&["estimate", path], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    for column in ["weights", "KV cache", "compute", "overhead", "total"] {
        assert!(table.contains(column), "{table}");
    }
    let out = berth(
        &["estimate", path, "--backend", "vllm", "--tp", "2", "--json"],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        doc["estimate"]["gpus"].as_array().map(Vec::len),
        Some(2),
        "{doc}"
    );
    assert_eq!(doc["profile"]["layers"], 16);

    // With scaling flags it lists the shapes the search would try: 32 heads and 8 KV heads
    // allow tensor-parallel sizes 1, 2 and 4 up to --max-gpus 4, then two workers.
    let out = berth(
        &[
            "estimate",
            path,
            "--backend",
            "vllm",
            "--max-gpus",
            "4",
            "--max-workers",
            "2",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let order: Vec<usize> = ["tp=1 ", "tp=2 ", "tp=4 ", "pp=2 × tp=1 "]
        .iter()
        .map(|l| {
            table
                .find(l)
                .unwrap_or_else(|| panic!("no {l:?} in\n{table}"))
        })
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{table}");
    assert!(!table.contains("tp=3"), "{table}");
    let out = berth(&["estimate", path, "--max-gpus", "2", "--json"], &[]);
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(doc["shapes"].as_array().map(Vec::len), Some(2), "{doc}");

    // The real GGUF, when ops/fetch-models.sh has fetched it.
    let models = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.berth/models");
    if let Some(gguf) = std::fs::read_dir(&models)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "gguf"))
    {
        let out = berth(
            &[
                "estimate",
                gguf.to_str().unwrap(),
                "--ctx",
                "2048",
                "--json",
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        assert_eq!(doc["profile"]["layers"], 30);
    } else {
        // ops/test.sh fetches it: under CI its absence is a failure, not a skip.
        assert!(std::env::var_os("CI").is_none(), "no GGUF under CI");
    }

    let cases: &[(&[&str], &str)] = &[
        (
            &["estimate", "/nonexistent/model.gguf"],
            "/nonexistent/model.gguf",
        ),
        (&["estimate", path, "--tp", "2"], "add --backend vllm"),
        (
            &[
                "estimate",
                path,
                "--backend",
                "vllm",
                "--gpu-memory-utilization",
                "1.5",
            ],
            "not in (0, 1]",
        ),
        (&["estimate", path, "--cache-type", "q3"], "--cache-type"),
    ];
    for (args, expected) in cases {
        let out = berth(args, &[]);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// `berth bench place` on 4 workers × 2 GPUs with 24 starts, plus `extra` flags: its JSON.
fn tiny_place(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "place",
        "--workers",
        "4",
        "--gpus-per-worker",
        "2",
        "--instances",
        "24",
        "--timeout",
        "60",
    ];
    args.extend_from_slice(extra);
    let out = berth(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    serde_json::from_str(&stdout(&out)).expect("bench prints JSON")
}

#[test]
fn bench_scenarios_run_at_a_tiny_size() {
    let doc = tiny_place(&["--analyzers", "1,2"]);
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    for run in runs {
        let placed = run["placed"].as_u64().unwrap();
        let pending = run["pending"].as_u64().unwrap();
        assert_eq!(placed + pending, 24, "{run}");
        assert!(
            placed > 0 && run["ceiling_commits_per_s"].as_f64().unwrap() > 0.0,
            "{run}"
        );
        assert!(run["ratio_to_ceiling"].as_f64().unwrap() > 0.0, "{run}");
        let rounds: Vec<f64> = run["ceiling_rounds_per_s"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .collect();
        assert_eq!(rounds.len(), 3, "{run}");
        assert_eq!(
            Some(rounds[0]),
            run["ceiling_commits_per_s"].as_f64(),
            "the ceiling is the best round: {run}"
        );
        // Commit first, then the event that reports it.
        let (commit, event) = (
            run["publish_to_commit_ms"]["p50"].as_f64().unwrap(),
            run["publish_to_event_ms"]["p50"].as_f64().unwrap(),
        );
        assert!(commit <= event + 1.0, "{run}");
        // The window ends at the last commit: it holds every command's publish to commit.
        let window_ms = run["first_publish_to_last_commit_s"].as_f64().unwrap() * 1000.0;
        let slowest = run["publish_to_commit_ms"]["max"].as_f64().unwrap();
        assert!(window_ms + 1.0 >= slowest && window_ms > 0.0, "{run}");
        // The database did work during the run, and the figures say so.
        assert!(
            run["cpu_s_during_run"]["postgres"].as_f64().is_some()
                && run["cpu_ms_per_placement"].as_f64().unwrap() > 0.0,
            "{run}"
        );
    }

    // The same with the analyzer as a process of its own (berth-analyzer is built next to
    // berth by `cargo build --workspace`), which reports its peak memory.
    let doc = tiny_place(&["--analyzers", "1", "--processes"]);
    let run = &doc["runs"][0];
    assert_eq!(
        run["placed"].as_u64().unwrap() + run["pending"].as_u64().unwrap(),
        24,
        "{run}"
    );
    let rss = run["peak_rss_mib_analyzer_processes"].as_array().unwrap();
    assert!(rss.len() == 1 && rss[0].as_f64().unwrap() > 1.0, "{run}");
    assert!(
        run["cpu_s_during_run"]["analyzer_processes"]
            .as_f64()
            .is_some(),
        "{run}"
    );

    let out = berth(
        &[
            "bench",
            "storm",
            "--instances",
            "40",
            "--survivors",
            "3",
            "--workers",
            "4",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        doc["fits_for_commands_superseded_before_pickup"], 0,
        "{doc}"
    );
    assert!(doc["survivors_running_after_s"].as_f64().is_some(), "{doc}");

    // Every decided command gets a line, in publish order.
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("latencies.csv");
    tiny_place(&["--latency-log", log.to_str().unwrap()]);
    let text = std::fs::read_to_string(&log).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("publish_unix_ms,publish_to_commit_ms,publish_to_event_ms")
    );
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|x| x.parse().unwrap()).collect())
        .collect();
    assert_eq!(rows.len(), 24, "{text}");
    assert!(rows.windows(2).all(|w| w[0][0] <= w[1][0]), "{text}");
    assert!(rows.iter().all(|r| r.len() == 3 && r[1] >= 0.0), "{text}");

    let cases: &[(&[&str], &str)] = &[
        (
            &["bench", "place", "--fill", "1.5"],
            "not between 0 and 0.99",
        ),
        (
            &["bench", "place", "--latency-log", "/nonexistent/dir/l.csv"],
            "cannot write the latency log /nonexistent/dir/l.csv",
        ),
        (&["bench", "place", "--analyzers", "0"], "--analyzers"),
        (&["bench", "place", "--policy", "random"], "--policy"),
        (
            &["bench", "storm", "--instances", "10", "--survivors", "50"],
            "more than --instances",
        ),
    ];
    for (args, expected) in cases {
        let out = berth(args, &[]);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// A server setting PostgreSQL does not know, passed through `BERTH_PG_SETTINGS`, stops the
/// bench before it starts, with the server's own complaint.
#[test]
fn a_bad_server_setting_is_refused_with_the_servers_reason() {
    let out = berth(
        &["bench", "place", "--workers", "1", "--instances", "1"],
        &[("BERTH_PG_SETTINGS", "no_such_setting=1")],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("no_such_setting"), "{}", stderr(&out));
}
