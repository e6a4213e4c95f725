//! berth-agent refuses bad inventories and flags with a message that names the problem.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .args(args)
        .env("BERTH_NATS_URL", "nats://127.0.0.1:1")
        .output()
        .expect("run berth-agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_inventories_and_flags_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[workers]]\nid = \"w\"\n[[workers.gpus]]\nname = \"x\"\nvram = \"lots\"\n",
    )
    .expect("write");
    let bad = bad.to_str().expect("utf-8 path");
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ops/inventory/demo.toml");
    let cases: &[(&[&str], &str)] = &[
        (&["--inventory", bad], "not a size"),
        (&["--inventory", "/nonexistent.toml"], "/nonexistent.toml"),
        (
            &["--inventory", demo, "--worker", "nope"],
            "worker \"nope\" is not in",
        ),
        (&["--label", "novalue", "--worker", "w"], "not key=value"),
        (
            &["--heartbeat-secs", "0", "--inventory", demo],
            "--heartbeat-secs",
        ),
        (&["--worker", "a.b", "--system-reserved", "1GiB"], "a.b"),
    ];
    for (args, expected) in cases {
        let (ok, err) = run(args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}

/// `berth-agent --print-inventory` for one worker of the demo inventory, parsed.
fn print_inventory(worker: &str) -> serde_json::Value {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ops/inventory/demo.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_berth-agent"))
        .args(["--inventory", demo, "--worker", worker, "--print-inventory"])
        .output()
        .expect("run berth-agent");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn print_inventory_shows_what_would_be_registered() {
    let doc = print_inventory("gpu-b");
    assert_eq!(doc[0]["worker"], "gpu-b");
    assert_eq!(doc[0]["gpus"].as_array().map(Vec::len), Some(2));
    assert_eq!(doc[0]["gpus"][0]["total_bytes"], 40_i64 << 30);
    assert_eq!(
        doc[0]["usage"],
        serde_json::json!([]),
        "gpu-b has nothing in use"
    );
}

#[test]
fn print_inventory_shows_the_memory_the_first_heartbeat_reports() {
    let doc = print_inventory("gpu-c");
    let used: Vec<i64> = doc[0]["usage"]
        .as_array()
        .expect("usage is a list")
        .iter()
        .filter_map(|u| u["used_outside_bytes"].as_i64())
        .collect();
    assert!(used.contains(&(6_i64 << 30)), "{doc}");
}
