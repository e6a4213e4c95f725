//! `berth-bench` as `berth bench` runs it: each scenario at a tiny size prints its JSON, and
//! bad input gets a clear error and a non-zero exit.

use std::process::{Command, Output};

fn berth_bench(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_berth-bench"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run berth-bench")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `berth-bench place` on 4 workers × 2 GPUs with 24 starts, plus `extra` flags: its JSON.
fn tiny_place(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
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
    let out = berth_bench(&args, &[]);
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
    // berth-bench by `cargo build --workspace`), which reports its peak memory.
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

    let out = berth_bench(
        &[
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
        (&["place", "--fill", "1.5"], "not between 0 and 0.99"),
        (
            &["place", "--latency-log", "/nonexistent/dir/l.csv"],
            "cannot write the latency log /nonexistent/dir/l.csv",
        ),
        (&["place", "--analyzers", "0"], "--analyzers"),
        (&["place", "--policy", "random"], "--policy"),
        (
            &["storm", "--instances", "10", "--survivors", "50"],
            "more than --instances",
        ),
    ];
    for (args, expected) in cases {
        let out = berth_bench(args, &[]);
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

/// Both paths are measured, with the CPUs shared and split (the machines that run this have
/// at least two), with each party's CPU time per request and a backend that takes the time
/// asked for; the first route after a `running` event is timed.
#[test]
fn the_gateway_benchmark_compares_both_paths_and_times_the_first_route() {
    let out = berth_bench(
        &[
            "gateway",
            "--concurrency",
            "2",
            "--duration",
            "300ms",
            "--route-trials",
            "1",
            "--backend-delay",
            "1ms",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let runs = doc["runs"].as_array().expect("runs");
    let cpus: Vec<&str> = runs.iter().filter_map(|r| r["cpus"].as_str()).collect();
    assert_eq!(cpus, ["shared", "split"], "{doc}");
    for run in runs {
        assert_eq!(run["concurrency"], 2, "{doc}");
        for path in ["direct", "gateway"] {
            assert!(run[path]["requests_per_s"].as_f64().unwrap() > 0.0, "{doc}");
            assert_eq!(run[path]["errors"], 0, "{doc}");
            // Every answer waited for the backend's delay.
            assert!(
                run[path]["latency_ms"]["p50"].as_f64().unwrap() >= 1.0,
                "{doc}"
            );
            let cpu = &run[path]["cpu_us_per_request"];
            assert!(cpu["clients"].as_f64().unwrap() > 0.0, "{doc}");
            assert!(cpu["backend"].as_f64().unwrap() > 0.0, "{doc}");
        }
        assert!(
            run["gateway"]["cpu_us_per_request"]["gateway"]
                .as_f64()
                .unwrap()
                > 0.0,
            "{doc}"
        );
        assert_eq!(run["direct"]["cpu_us_per_request"]["gateway"], 0.0, "{doc}");
        assert!(run["throughput_ratio"].as_f64().unwrap() > 0.0, "{doc}");
    }
    assert_eq!(doc["backend_delay_ms"], 1.0, "{doc}");
    assert_eq!(doc["running_event_to_first_routed_ms"]["n"], 1, "{doc}");
    for (bad, why) in [
        (&["gateway", "--concurrency", "0"][..], "1..=4096"),
        (
            &["gateway", "--backend-delay", "0s"][..],
            "longer than zero",
        ),
        (
            &["gateway", "--backend-delay", "soon"][..],
            "not a duration",
        ),
    ] {
        let out = berth_bench(bad, &[]);
        assert!(!out.status.success(), "{bad:?}");
        assert!(stderr(&out).contains(why), "{bad:?}: {}", stderr(&out));
    }
}

/// A server setting PostgreSQL does not know, passed through `BERTH_PG_SETTINGS`, stops the
/// bench before it starts, with the server's own complaint.
#[test]
fn a_bad_server_setting_is_refused_with_the_servers_reason() {
    let out = berth_bench(
        &["place", "--workers", "1", "--instances", "1"],
        &[("BERTH_PG_SETTINGS", "no_such_setting=1")],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("no_such_setting"), "{}", stderr(&out));
}
