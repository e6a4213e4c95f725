//! The `berth` binary as a user runs it: bad input gets a clear error and a non-zero exit;
//! good input works against real servers.

use berth_harness::{Signal, TestServers};
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
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
            &[
                "start",
                "m",
                "--vram",
                "1GiB",
                "--nats-creds",
                "/nonexistent.nk",
            ],
            "/nonexistent.nk",
        ),
        (
            &[
                "start",
                "m",
                "--vram",
                "1GiB",
                "--nats-creds",
                "/etc/hostname",
            ],
            "neither a user nkey seed",
        ),
        (
            &["auth", "add-agent", "a.b", "--dir", "/tmp/berth-never"],
            "bad name",
        ),
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

/// A binary of the workspace next to `berth` (`cargo build --workspace --bins` puts it there;
/// only `berth` itself is built for this package's tests).
fn sibling(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_berth")).with_file_name(name);
    assert!(
        path.is_file(),
        "{} not found: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// The processes whose parent is `pid`, with their names (from `/proc`).
fn children_of(pid: u32) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
            let ppid: u32 = rest.split(' ').nth(1)?.parse().ok()?;
            (ppid == pid).then(|| (child, comm.to_owned()))
        })
        .collect()
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what} after {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn start_ps_stop_against_berth_up() {
    sibling("berth-analyzer");
    sibling("berth-agent");
    sibling("berth-gateway");
    let dir = tempfile::Builder::new()
        .prefix("berth-test-up-")
        .tempdir()
        .unwrap();
    // As root, PostgreSQL runs as `postgres`, which must reach the data under it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let port = |p: u16| p.to_string();
    // Free ports: borrow them from a harness server pair, then stop it.
    let (nats_port, pg_port) = {
        let probe = TestServers::start().expect("servers");
        (probe.nats.port(), probe.pg.port())
    };
    let gateway = format!("127.0.0.1:{}", berth_harness::free_port().unwrap());
    let log = dir.path().join("up.stderr");
    let mut up = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["up", "--dir"])
        .arg(dir.path())
        .args(["--nats-port", &port(nats_port), "--pg-port", &port(pg_port)])
        .args(["--gateway-listen", &gateway])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // One line per child with its pid, then the line that says the fleet is ready.
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut printed: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("berth up ended:\n{}", read(&log)))
            .unwrap();
        if line.contains("berth is up") {
            break;
        }
        let mut words = line.split_whitespace();
        let name = words.next().unwrap().to_owned();
        assert_eq!(words.next(), Some("pid"), "{line}");
        printed.insert(name, words.next().unwrap().parse().unwrap());
    }
    let names: Vec<&str> = printed.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "agent-gpu-a",
            "agent-gpu-b",
            "agent-gpu-c",
            "analyzer-0",
            "analyzer-1",
            "gateway"
        ]
    );
    // Its children: those processes, and the two servers.
    let children = children_of(up.id());
    let mut comms: Vec<&str> = children.iter().map(|(_, c)| c.as_str()).collect();
    comms.sort_unstable();
    assert_eq!(
        comms,
        [
            "berth-agent",
            "berth-agent",
            "berth-agent",
            "berth-analyzer",
            "berth-analyzer",
            "berth-gateway",
            "nats-server",
            "postgres"
        ],
        "{children:?}"
    );
    assert!(
        printed
            .values()
            .all(|p| children.iter().any(|(c, _)| c == p))
    );

    let nats = format!("nats://127.0.0.1:{nats_port}");
    // PostgreSQL asks for a password over TCP; berth up keeps its URL for the commands.
    let db_file = dir.path().join("database-url");
    let mode = std::fs::metadata(&db_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let db = std::fs::read_to_string(&db_file).unwrap().trim().to_owned();
    assert!(
        db.starts_with("postgres://postgres:"),
        "a password in {db:?}"
    );
    let no_password = format!("postgres://postgres@127.0.0.1:{pg_port}/postgres");
    let out = berth(&["ps"], &[("BERTH_DATABASE_URL", no_password.as_str())]);
    assert!(!out.status.success(), "connected without a password");
    assert!(
        stderr(&out).contains("password"),
        "the refusal says why: {}",
        stderr(&out)
    );
    assert!(!read(&log).contains(&db), "the password is not logged");
    let creds = dir.path().join("auth/publisher.nk");
    let env = [
        ("BERTH_NATS_URL", nats.as_str()),
        ("BERTH_DATABASE_URL", db.as_str()),
        ("BERTH_NATS_CREDS", creds.to_str().unwrap()),
    ];
    // NATS runs with roles: without credentials the CLI is refused.
    let out = berth(
        &["start", "nobody", "--vram", "1GiB"],
        &[("BERTH_NATS_URL", nats.as_str())],
    );
    assert!(!out.status.success(), "{}", stdout(&out));
    // What a script waits for before its first command.
    let out = berth(
        &["ready", "--analyzers", "2", "--workers", "3", "--json"],
        &env,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let ready: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (ready["analyzers"].as_u64(), ready["workers"].as_u64()),
        (Some(2), Some(3))
    );
    let out = berth(&["ready", "--workers", "4", "--timeout", "2"], &env);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("3 of 4 workers registered"),
        "{}",
        stderr(&out)
    );

    // The gateway, with the admin key berth up made for this fleet (its owner's alone).
    let key_file = dir.path().join("admin.key");
    let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let key = std::fs::read_to_string(&key_file).unwrap();
    let (status, body) = http_get(&gateway, "/api/v1/workers", Some(key.trim()));
    assert_eq!(status, 200, "{body}");
    let workers: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(workers.as_array().map(Vec::len), Some(3), "{body}");
    assert_eq!(http_get(&gateway, "/api/v1/workers", None).0, 401);

    // Keys: made once, listed without the secret, revoked by name; bad input refused.
    let out = berth(&["keys", "create", "ci", "--scope", "inference"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = stdout(&out).trim().to_owned();
    assert!(
        secret.starts_with("berth_") && secret.len() == 70,
        "{secret}"
    );
    // Gateways read the live keys every second.
    wait_for(
        "the new key does not open /v1",
        Duration::from_secs(10),
        || http_get(&gateway, "/v1/models", Some(&secret)).0 == 200,
    );
    assert_eq!(http_get(&gateway, "/api/v1/workers", Some(&secret)).0, 401);
    let out = berth(&["keys", "create", "ci", "--scope", "admin"], &env);
    assert!(
        !out.status.success() && stderr(&out).contains("exists already"),
        "{}",
        stderr(&out)
    );
    for bad in [
        &["keys", "create", "x", "--scope", "root"][..],
        &["keys", "create", "", "--scope", "admin"],
        &["keys", "revoke", "nobody"],
    ] {
        let out = berth(bad, &env);
        assert!(!out.status.success(), "{bad:?}");
        assert!(!stderr(&out).is_empty(), "{bad:?}");
    }
    let out = berth(&["keys", "list"], &env);
    let listed = stdout(&out);
    assert!(
        listed.contains("berth-up-admin") && listed.contains("ci"),
        "{listed}"
    );
    assert!(
        !listed.contains(&secret) && !listed.contains(key.trim()),
        "{listed}"
    );
    let out = berth(&["keys", "revoke", "ci"], &env);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_for(
        "the revoked key still opens /v1",
        Duration::from_secs(10),
        || http_get(&gateway, "/v1/models", Some(&secret)).0 == 401,
    );

    let out = berth(&["start", "demo", "--vram", "20GiB", "--wait"], &env);
    assert!(
        out.status.success(),
        "{}\n--- the fleet's logs, last lines ---\n{}",
        stderr(&out),
        tail_lines(&read(&log), 80)
    );
    assert!(
        stdout(&out).contains("demo running"),
        "{}\n--- the fleet's logs, last lines ---\n{}",
        stdout(&out),
        tail_lines(&read(&log), 120)
    );

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

    // A child that dies is reported; the rest keep running.
    let agent = printed["agent-gpu-b"];
    kill(agent, Signal::SIGKILL);
    let said = format!("agent-gpu-b (pid {agent}) exited");
    wait_for(
        "no report of the dead agent",
        Duration::from_secs(30),
        || read(&log).contains(&said),
    );
    assert!(up.try_wait().unwrap().is_none(), "berth up ended");

    // Ctrl-C stops the whole fleet cleanly, and every child with it.
    kill(up.id(), Signal::SIGINT);
    let mut status = None;
    wait_for("berth up did not stop", Duration::from_secs(60), || {
        status = up.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "{status:?}\n{}", read(&log));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l == "stopped"), "{rest:?}");
    let alive = || {
        children
            .iter()
            .filter(|(pid, _)| Path::new(&format!("/proc/{pid}")).exists())
            .collect::<Vec<_>>()
    };
    wait_for(
        "children outlived berth up",
        Duration::from_secs(10),
        || alive().is_empty(),
    );
    // The analyzers shut down on the SIGTERM rather than being killed.
    let logs = read(&log);
    assert_eq!(
        logs.lines()
            .filter(|l| l.starts_with("analyzer-") && l.contains("shutting down"))
            .count(),
        2,
        "{logs}"
    );
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn kill(pid: u32, signal: Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("a pid fits i32"));
    nix::sys::signal::kill(pid, signal).expect("send a signal");
}

/// `berth bench ...` is `berth-bench ...`: the same output and exit status.
#[test]
fn bench_runs_berth_bench_with_the_same_arguments() {
    let bench = sibling("berth-bench");
    let args = [
        "bench",
        "storm",
        "--instances",
        "20",
        "--survivors",
        "2",
        "--workers",
        "2",
    ];
    let out = berth(&args, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        doc["fits_for_commands_superseded_before_pickup"], 0,
        "{doc}"
    );
    for args in [
        &["place", "--fill", "1.5"][..],
        &["storm", "--instances", "10", "--survivors", "50"],
        &["--help"],
        &["place", "--help"],
        &["frobnicate"],
    ] {
        let direct = Command::new(&bench).args(args).output().unwrap();
        let via = berth(&[&["bench"], args].concat(), &[]);
        assert_eq!(via.status.code(), direct.status.code(), "{args:?}");
        assert_eq!(stdout(&via), stdout(&direct), "{args:?}");
        assert_eq!(stderr(&via), stderr(&direct), "{args:?}");
    }
    let help = stdout(&berth(&["bench", "--help"], &[]));
    assert!(help.contains("place") && help.contains("storm"), "{help}");
}

/// A GET on a fresh connection: status and body.
fn http_get(addr: &str, path: &str, key: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).expect("connect to the gateway");
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .expect("read the response");
    berth_harness::parse_response(&response)
}

/// `berth` copied away from its siblings says which one is missing and how to build it,
/// before it starts anything.
#[test]
fn a_missing_sibling_binary_is_named_with_the_build_command() {
    let dir = tempfile::tempdir().unwrap();
    let lone = dir.path().join("berth");
    std::fs::copy(env!("CARGO_BIN_EXE_berth"), &lone).unwrap();
    let data = dir.path().join("data");
    let cases: &[(&[&str], &str)] = &[
        (
            &["up", "--dir", data.to_str().unwrap()],
            "berth-analyzer not found",
        ),
        (
            &["bench", "place", "--workers", "1"],
            "berth-bench not found",
        ),
        (&["bench", "--help"], "berth-bench not found"),
    ];
    for (args, expected) in cases {
        let out = Command::new(&lone).args(*args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        let package = expected.split(' ').next().unwrap();
        assert!(
            err.contains(expected)
                && err.contains(&format!("cargo build -p {package}"))
                && err.contains(&lone.with_file_name(package).display().to_string()),
            "{args:?}: {err}"
        );
    }
    assert!(!data.exists(), "berth up started something");
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
    // allow tensor-parallel sizes 1, 2 and 4 up to --max-gpus 4; vLLM gets no shape over two
    // workers, and says so.
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
    let order: Vec<usize> = [
        "tp=1 ",
        "tp=2 ",
        "tp=4 ",
        "vLLM cannot run over several workers",
    ]
    .iter()
    .map(|l| {
        table
            .find(l)
            .unwrap_or_else(|| panic!("no {l:?} in\n{table}"))
    })
    .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{table}");
    assert!(
        !table.contains("tp=3") && !table.contains("pp=2"),
        "{table}"
    );
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

/// Without `--gpu-memory-utilization`, a vLLM estimate claims what vLLM itself takes without
/// the flag (0.9 of each GPU), not just the estimate: a model that fits berth's figure but
/// not vLLM's share must not be placed where vLLM then refuses to start. `none` keeps only
/// the estimate.
#[test]
fn a_vllm_start_without_a_share_claims_vllms_default() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
            "max_position_embeddings": 8192, "torch_dtype": "bfloat16",
        })
        .to_string(),
    )
    .unwrap();
    let path = dir.path().to_str().unwrap();
    let claim = |extra: &[&str]| {
        let mut args = vec!["estimate", path, "--backend", "vllm", "--json"];
        args.extend_from_slice(extra);
        let out = berth(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let doc: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        doc["estimate"]["claim"]["fraction"].as_f64()
    };
    assert_eq!(claim(&[]), Some(0.9));
    assert_eq!(claim(&["--gpu-memory-utilization", "0.5"]), Some(0.5));
    assert_eq!(claim(&["--gpu-memory-utilization", "none"]), None);
    let bad = berth(
        &[
            "estimate",
            path,
            "--backend",
            "vllm",
            "--gpu-memory-utilization",
            "most",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).contains("a fraction, or none"),
        "{}",
        stderr(&bad)
    );
}

/// With no fleet to ask, `berth ready` gives up at its deadline and says what it missed.
#[test]
fn ready_without_a_fleet_fails_with_a_clear_message() {
    let out = berth(
        &["ready", "--timeout", "1"],
        &[
            ("BERTH_NATS_URL", "nats://127.0.0.1:1"),
            (
                "BERTH_DATABASE_URL",
                "postgres://postgres@127.0.0.1:1/postgres",
            ),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no NATS server answered at nats://127.0.0.1:1 within 1s"),
        "{}",
        stderr(&out)
    );
}

/// The last `n` lines of `text`.
fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
