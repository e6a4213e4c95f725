//! Model reads are confined and bounded, where a user meets them: a `berth-analyzer` process
//! started with `--model-root` refuses a FIFO, a file outside its roots and a symlink out of
//! them at once, in words that do not tell whether the outside file exists, leaves no thread
//! on the FIFO and goes on placing; `berth estimate` reads a 100 MB safetensors header in
//! bounded memory and refuses a FIFO at once.

use berth_models::{EstimateOptions, LlamaCppOptions, ModelRef, NOT_UNDER_A_ROOT};
use berth_proto::{Command, InstanceState, StartSpec};
use berth_tests::{Fleet, wait_until, worker, write_llama_8b_config};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// How long a refusal may take, from the command's publication to the instance's `error`.
const REFUSED_WITHIN: Duration = Duration::from_secs(1);
const LIMIT: Duration = Duration::from_secs(30);
/// Peak resident memory `berth estimate` may reach on a 100 MB safetensors header.
const PEAK_RSS_LIMIT: u64 = 300 << 20;

/// A child process, killed and reaped when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a `berth-analyzer` process against the fleet's servers with `roots`, and waits
/// until its metrics endpoint answers (it binds it once connected).
async fn spawn_analyzer(fleet: &Fleet, roots: &[&Path], log: &Path) -> Running {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let out = std::fs::File::create(log).expect("analyzer log");
    let err = out.try_clone().expect("analyzer log");
    let mut cmd = std::process::Command::new(berth_tests::built_binary("berth-analyzer"));
    cmd.args(["--nats-url", &fleet.servers.nats.url()])
        .args(["--name", "confined", "--metrics-addr", &addr.to_string()])
        .args(["--sweep-every", "250ms", "--ack-wait", "2s"])
        .env("BERTH_DATABASE_URL", fleet.servers.pg.url())
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for r in roots {
        cmd.arg("--model-root").arg(r);
    }
    let mut child = Running(cmd.spawn().expect("spawn berth-analyzer"));
    wait_until("the analyzer to listen", LIMIT, || {
        let exited = child.0.try_wait().ok().flatten();
        async move {
            assert!(
                exited.is_none(),
                "berth-analyzer exited: {exited:?}\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            tokio::net::TcpStream::connect(addr).await.ok()
        }
    })
    .await;
    child
}

fn start_from(path: &Path) -> Command {
    Command::Start(StartSpec {
        model: "confined".into(),
        model_ref: Some(Box::new(ModelRef::Path(path.to_path_buf()))),
        backend: Some(Box::new(EstimateOptions::LlamaCpp(LlamaCppOptions {
            context: Some(2048),
            gpus: 1,
            ..Default::default()
        }))),
        ..StartSpec::claim(0, 1)
    })
}

/// Publishes a start of `path` as `id` and waits for its `error`; returns the reason and how
/// long the refusal took.
async fn refused(fleet: &Fleet, id: &str, path: &Path) -> (String, Duration) {
    let began = Instant::now();
    fleet
        .bus
        .publish_command(id, &start_from(path))
        .await
        .expect("publish");
    let row = fleet.wait_state(id, InstanceState::Error, LIMIT).await;
    (row.reason.unwrap_or_default(), began.elapsed())
}

fn mkfifo(path: &Path) {
    nix::unistd::mkfifo(path, Mode::S_IRUSR | Mode::S_IWUSR).expect("mkfifo");
}

/// Whether some process holds `fifo` open for reading (or waits in an open to read it): a
/// writer's non-blocking open fails with ENXIO only when there is no reader.
fn fifo_has_a_reader(fifo: &Path) -> bool {
    match nix::fcntl::open(fifo, OFlag::O_WRONLY | OFlag::O_NONBLOCK, Mode::empty()) {
        Ok(_) => true,
        Err(Errno::ENXIO) => false,
        Err(e) => panic!("opening {} to write: {e}", fifo.display()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyzer_refuses_fifos_and_paths_outside_its_roots_at_once() {
    let mut fleet = Fleet::start().await;
    let root = tempfile::tempdir().expect("root");
    let outside = tempfile::tempdir().expect("outside");
    let log = outside.path().join("analyzer.log");
    let _analyzer = spawn_analyzer(&fleet, &[root.path()], &log).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    let fifo_inside = root.path().join("blocks.gguf");
    mkfifo(&fifo_inside);
    let fifo_outside = outside.path().join("blocks.gguf");
    mkfifo(&fifo_outside);
    let secret = outside.path().join("secret.gguf");
    std::fs::write(&secret, b"GGUF").expect("write");
    let escape = root.path().join("escape.gguf");
    std::os::unix::fs::symlink(&secret, &escape).expect("symlink");
    let dangling = root.path().join("dangling.gguf");
    std::os::unix::fs::symlink(outside.path().join("missing.gguf"), &dangling).expect("symlink");

    // A FIFO under the root: refused for what it is, without waiting for a writer.
    let (reason, took) = refused(&fleet, "fifo-inside", &fifo_inside).await;
    assert!(reason.contains("a FIFO, not a regular file"), "{reason}");
    assert!(took < REFUSED_WITHIN, "refusing the FIFO took {took:?}");

    // Outside the roots, existing or not, reached directly or through a symlink: the same
    // words, which say nothing of what is there.
    let outside_cases = [
        ("fifo-outside", fifo_outside.clone()),
        ("passwd", PathBuf::from("/etc/passwd")),
        ("no-such", PathBuf::from("/etc/berth-no-such-file")),
        ("escape", escape),
        ("dangling", dangling),
        (
            "dotdot",
            root.path()
                .join("..")
                .join(outside.path().file_name().expect("a name"))
                .join("secret.gguf"),
        ),
    ];
    for (id, path) in &outside_cases {
        let (reason, took) = refused(&fleet, id, path).await;
        assert!(took < REFUSED_WITHIN, "refusing {id} took {took:?}");
        let shown = path.display().to_string();
        assert_eq!(
            reason.replace(&shown, "PATH"),
            format!("model PATH: PATH: {NOT_UNDER_A_ROOT}"),
            "{id}"
        );
    }

    // No thread of the analyzer holds either FIFO, or waits to open it.
    assert!(
        !fifo_has_a_reader(&fifo_inside),
        "a reader is left on the FIFO"
    );
    assert!(
        !fifo_has_a_reader(&fifo_outside),
        "a reader is left on the FIFO"
    );

    // The analyzer goes on placing: a claim, and a model under its root.
    fleet.start_instance("after", 10 << 30, 1).await;
    fleet
        .wait_state("after", InstanceState::Running, LIMIT)
        .await;
    let model = root.path().join("llama");
    std::fs::create_dir(&model).expect("mkdir");
    write_llama_8b_config(&model);
    fleet
        .bus
        .publish_command("from-root", &start_from(&model))
        .await
        .expect("publish");
    fleet
        .wait_state("from-root", InstanceState::Running, LIMIT)
        .await;
    fleet.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_analyzer_without_roots_refuses_model_paths_naming_the_flag() {
    let mut fleet = Fleet::start().await;
    let dir = tempfile::tempdir().expect("dir");
    let _analyzer = spawn_analyzer(&fleet, &[], &dir.path().join("analyzer.log")).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    write_llama_8b_config(dir.path());
    let (reason, _) = refused(&fleet, "rootless", dir.path()).await;
    assert!(reason.contains("--model-root"), "{reason}");
}

/// A Hugging Face directory whose one safetensors file has a header of about 100 MB: over a
/// million small tensors, every one in a layer the config names. Written as a stream: this
/// process's own memory at the child's start counts in the child's peak (Linux keeps the
/// larger of the two across `exec`).
fn write_big_header_model(dir: &Path) {
    write_llama_8b_config(dir);
    let target = berth_models::hf::MAX_SAFETENSORS_HEADER;
    let file = std::fs::File::create(dir.join("model.safetensors")).expect("create");
    let mut f = std::io::BufWriter::new(file);
    f.write_all(&target.to_le_bytes()).expect("write");
    f.write_all(b"{").expect("write");
    let mut written = 1u64;
    for i in 0usize.. {
        let entry = format!(
            r#"{}"model.layers.{}.mlp.w{i}.weight":{{"dtype":"BF16","shape":[4,4],"data_offsets":[0,32]}}"#,
            if i > 0 { "," } else { "" },
            i % 32
        );
        // Room for this entry and the closing brace.
        if written + entry.len() as u64 + 1 > target {
            break;
        }
        f.write_all(entry.as_bytes()).expect("write");
        written += entry.len() as u64;
    }
    f.write_all(b"}").expect("write");
    written += 1;
    // safetensors pads its header with spaces.
    for _ in written..target {
        f.write_all(b" ").expect("write");
    }
    f.write_all(&[0u8; 32]).expect("write");
    f.flush().expect("flush");
}

/// Waits for `child` with a deadline; returns its output.
fn wait_output(child: Child, limit: Duration) -> std::process::Output {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(limit)
        .expect("berth estimate ran past its deadline")
        .expect("berth estimate's output")
}

#[test]
fn estimate_of_a_100_mb_safetensors_header_stays_under_300_mb() {
    let dir = tempfile::tempdir().expect("dir");
    write_big_header_model(dir.path());
    let child = std::process::Command::new(berth_tests::built_binary("berth"))
        .arg("estimate")
        .arg(dir.path())
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth estimate");
    let out = wait_output(child, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(doc["profile"]["weights"]["total"].as_u64().unwrap_or(0) > 1 << 25);
    // The largest resident set of any child this test process has waited for: berth
    // estimate's, unless another test's child was larger (which could only fail the check).
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    let peak = u64::try_from(usage.max_rss()).unwrap_or(u64::MAX) * 1024;
    println!("berth estimate peak RSS: {} MiB", peak >> 20);
    assert!(
        peak < PEAK_RSS_LIMIT,
        "peak RSS {} MiB, limit {} MiB",
        peak >> 20,
        PEAK_RSS_LIMIT >> 20
    );
}

#[test]
fn estimate_refuses_a_fifo_at_once() {
    let dir = tempfile::tempdir().expect("dir");
    let fifo = dir.path().join("model.gguf");
    mkfifo(&fifo);
    let began = Instant::now();
    let child = std::process::Command::new(berth_tests::built_binary("berth"))
        .arg("estimate")
        .arg(&fifo)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth estimate");
    let out = wait_output(child, Duration::from_secs(10));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("a FIFO, not a regular file"), "{err}");
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert!(!fifo_has_a_reader(&fifo));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_refuses_a_model_outside_its_roots_before_spawning() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    let state = tempfile::tempdir().expect("state");
    let agent_root = tempfile::tempdir().expect("agent root");
    let mut config = berth_tests::serving::process_config(state.path(), 47100..=47199);
    config.model_roots = berth_models::ModelRoots::new([agent_root.path()]).expect("roots");
    fleet
        .add_agent_with(
            worker("w1", 1, 80, &[]),
            berth_agent::Runtime::Process(Box::new(config)),
        )
        .await;
    // Readable by the analyzers (under the tests' roots), outside the agent's.
    let model = tempfile::tempdir().expect("model");
    write_llama_8b_config(model.path());
    let (reason, _) = refused(&fleet, "outside-agent", model.path()).await;
    let shown = model.path().display().to_string();
    assert_eq!(
        reason.replace(&shown, "PATH"),
        format!("model PATH: PATH: {NOT_UNDER_A_ROOT}")
    );
    // Nothing was started for it: no log of a server attempt.
    assert!(
        !state.path().join("logs/outside-agent").exists(),
        "a server was started"
    );
    fleet.assert_books_balanced().await;
}
