//! berth-analyzer refuses bad flags with a message that names the flag.

use std::process::Command;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_berth-analyzer"))
        .args(args)
        .env_remove("BERTH_DATABASE_URL")
        .output()
        .expect("run berth-analyzer");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_flags_are_refused() {
    let db = ["--database-url", "postgres://postgres@127.0.0.1:1/postgres"];
    let cases: &[(&[&str], &str)] = &[
        (
            &["--metrics-addr", "nonsense"],
            "\"nonsense\" is not host:port",
        ),
        (&["--policy", "random"], "--policy"),
        (&["--concurrency", "0"], "--concurrency"),
        (&["--pool-size", "100000"], "--pool-size"),
        (&["--ack-wait", "soon"], "not a duration"),
        (&["--sweep-every", "0s"], "longer than zero"),
    ];
    for (extra, expected) in cases {
        let args: Vec<&str> = db.iter().chain(extra.iter()).copied().collect();
        let (ok, err) = run(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let (ok, err) = run(&[]);
    assert!(!ok && err.contains("--database-url"), "{err}");
}
