//! berth on a 3-node NATS JetStream cluster: its streams are kept on every node (R3, or as
//! configured), a replica count the cluster cannot reach now is no error, and commands keep
//! flowing when the node a client is connected to is SIGKILLed.

use berth_agent::{Agent, AgentConfig, Runtime};
use berth_analyzer::{Analyzer, AnalyzerConfig, Hooks};
use berth_bus::{Access, Bus, BusError, CMD_STREAM, EVENTS_STREAM, Replicas, STATUS_STREAM};
use berth_harness::{ClusterServers, TestServers};
use berth_proto::{CmdSeq, Command, InstanceState, StartSpec};
use berth_store::Store;
use berth_tests::{GIB, init_logs, wait_until, worker};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

async fn cluster(nodes: usize) -> ClusterServers {
    init_logs();
    tokio::task::spawn_blocking(move || ClusterServers::start(nodes, None))
        .await
        .expect("harness task")
        .expect("start a 3-node NATS cluster and PostgreSQL (run ops/setup.sh first)")
}

/// The replica count of `stream` and how many of its copies are on other nodes.
async fn replicas(bus: &Bus, stream: &str) -> (usize, usize) {
    let mut s = bus.jetstream().get_stream(stream).await.expect("stream");
    let info = s.info().await.expect("stream info");
    let peers = info.cluster.as_ref().map_or(0, |c| c.replicas.len());
    (info.config.num_replicas, peers)
}

/// Waits until every copy of `stream` is current (copied over after a change of replicas).
async fn wait_current(bus: &Bus, stream: &str, copies: usize) {
    wait_until(&format!("{stream} on {copies} nodes"), LIMIT, || async {
        let mut s = bus.jetstream().get_stream(stream).await.ok()?;
        let info = s.info().await.ok()?;
        let cluster = info.cluster.as_ref()?;
        let current = cluster.replicas.iter().filter(|p| p.current).count();
        (info.config.num_replicas == copies && current + 1 == copies).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_kept_on_three_nodes_of_a_cluster_and_one_alone() {
    let servers = cluster(3).await;
    let bus = Bus::connect(&servers.nats.urls(), "test").await.unwrap();
    for stream in [CMD_STREAM, STATUS_STREAM, EVENTS_STREAM] {
        assert_eq!(replicas(&bus, stream).await, (3, 2), "{stream}");
    }

    let single = tokio::task::spawn_blocking(TestServers::start)
        .await
        .unwrap()
        .unwrap();
    let alone = Bus::connect(&single.nats.url(), "test").await.unwrap();
    assert_eq!(replicas(&alone, CMD_STREAM).await, (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_move_from_one_copy_to_three_even_with_a_node_down() {
    let mut servers = cluster(3).await;
    let urls = servers.nats.urls();
    let one = Access {
        replicas: Replicas::Fixed(1),
        ..Access::default()
    };
    let bus = Bus::connect_as(&urls, "r1", &one).await.unwrap();
    assert_eq!(replicas(&bus, CMD_STREAM).await, (1, 0));
    bus.publish_command("kept", &start_spec()).await.unwrap();

    let down = 2;
    servers.nats.kill(down);
    let bus = tokio::time::timeout(LIMIT, Bus::connect(&urls, "auto"))
        .await
        .expect("connect in time")
        .expect("connect with a node down");
    assert_eq!(replicas(&bus, CMD_STREAM).await.0, 3);

    // The node that was down gets its copy once it is back.
    tokio::task::block_in_place(|| servers.nats.restart(down)).unwrap();
    wait_current(&bus, CMD_STREAM, 3).await;
    assert!(bus.last_command("kept").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_count_the_cluster_cannot_place_keeps_no_process_from_starting() {
    let servers = cluster(2).await;
    let urls = servers.nats.urls();
    // Auto on two nodes: three copies cannot be placed, so one.
    let bus = Bus::connect(&urls, "auto").await.expect("auto connects");
    assert_eq!(replicas(&bus, CMD_STREAM).await.0, 1);
    // Three asked for explicitly: the streams that exist keep their count.
    let three = Access {
        replicas: Replicas::Fixed(3),
        ..Access::default()
    };
    let bus = Bus::connect_as(&urls, "r3", &three)
        .await
        .expect("existing streams keep their count");
    assert_eq!(replicas(&bus, EVENTS_STREAM).await.0, 1);
}

fn start_spec() -> Command {
    Command::Start(StartSpec {
        model: "m".into(),
        ..StartSpec::claim(GIB, 1)
    })
}

/// Publishes, trying again while the cluster moves a stream's leader (a node just died).
async fn publish(bus: &Bus, id: &str) -> CmdSeq {
    let deadline = Instant::now() + LIMIT;
    loop {
        match bus.publish_command(id, &start_spec()).await {
            Ok(seq) => return seq,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tracing::info!("publish {id}: {e}; again");
            }
            Err(e) => panic!("publish {id}: {e}"),
        }
    }
}

async fn wait_running(store: &Store, ids: &[String]) {
    wait_until("every instance running", LIMIT, || async {
        let rows = store.instances().await.ok()?;
        ids.iter()
            .all(|id| {
                rows.iter()
                    .any(|r| &r.id == id && r.state == InstanceState::Running.as_str())
            })
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_keep_flowing_when_the_node_a_client_is_on_dies() {
    let mut servers = cluster(3).await;
    let urls = servers.nats.urls();
    let db = servers.pg.url();
    berth_store::migrate(&db).await.unwrap();
    let store = Store::connect(&db, 4).unwrap();
    let mut config = AnalyzerConfig::new(urls.clone(), db.clone());
    config.ack_wait = Duration::from_secs(2);
    config.sweep_every = Duration::from_millis(250);
    // An assignment lost while a stream had no leader is sent again after this, not after the
    // default minute (one run under the full suite's load took 76 s, about that long).
    config.stuck_after = Duration::from_secs(5);
    let analyzer = Analyzer::start(config, Hooks::default()).await.unwrap();
    let agent = Agent::start_with(
        AgentConfig {
            nats_url: urls.clone(),
            nats_access: Access::default(),
            worker: worker("w1", 4, 80, &[]),
            heartbeat: Duration::from_millis(300),
            stats: Default::default(),
        },
        Runtime::Simulated,
    )
    .await
    .unwrap();
    let publisher = Bus::connect(&urls, "publisher").await.unwrap();

    let first: Vec<String> = (0..5).map(|i| format!("before-{i}")).collect();
    for id in &first {
        publish(&publisher, id).await;
    }
    wait_running(&store, &first).await;

    // SIGKILL the node the publisher is connected to: it moves to another, and the
    // analyzer and agent (wherever they were) carry on.
    let port = publisher.client().server_info().port;
    let node = servers
        .nats
        .node_on_port(port)
        .expect("the publisher's node");
    servers.nats.kill(node);
    let after: Vec<String> = (0..5).map(|i| format!("after-{i}")).collect();
    for id in &after {
        publish(&publisher, id).await;
    }
    wait_running(&store, &after).await;
    let moved_to = publisher.client().server_info().port;
    assert_ne!(moved_to, port, "the publisher is on another node now");

    // The node comes back and catches up; the cluster takes commands as before.
    tokio::task::block_in_place(|| servers.nats.restart(node)).unwrap();
    let last: Vec<String> = (0..5).map(|i| format!("back-{i}")).collect();
    for id in &last {
        publish(&publisher, id).await;
    }
    wait_running(&store, &last).await;
    let rows = store.instances().await.unwrap();
    assert_eq!(rows.len(), 15, "{rows:#?}");
    agent.shutdown().await;
    analyzer.shutdown().await;
    drop(servers);
}

#[test]
fn a_bad_url_in_the_list_is_refused_before_connecting() {
    let e = berth_bus::server_addrs("nats://127.0.0.1:4222,http://x").unwrap_err();
    assert!(matches!(e, BusError::Url { .. }), "{e}");
    assert!(!e.is_transient());
}

/// Three consecutive loopback ports that were free a moment ago, the first returned.
fn three_free_ports() -> u16 {
    for _ in 0..50 {
        let first = berth_harness::free_port().expect("a free port");
        let held: Vec<_> = (0..3u16)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", first.checked_add(i)?)).ok())
            .collect();
        if held.len() == 3 {
            return first;
        }
    }
    panic!("no three consecutive free ports");
}

/// `berth up` as a child, stopped (SIGTERM, then waited for) when dropped.
struct Up(std::process::Child);

impl Drop for Up {
    fn drop(&mut self) {
        berth_harness::stop_children(
            std::slice::from_mut(&mut self.0),
            berth_harness::Signal::SIGTERM,
            Duration::from_secs(30),
        );
    }
}

#[test]
fn berth_up_runs_a_three_node_cluster_that_takes_commands_on_any_node() {
    use std::io::BufRead;
    let berth = berth_tests::built_binary("berth");
    let dir = tempfile::Builder::new()
        .prefix("berth-test-up-")
        .tempdir()
        .unwrap();
    // As root, PostgreSQL runs as `postgres`, which must reach the data under it.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // One worker and one analyzer: the cluster is what is under test.
    let inventory = dir.path().join("inventory.toml");
    std::fs::write(
        &inventory,
        "[[workers]]\nid = \"solo\"\n\n[[workers.gpus]]\nname = \"Simulated\"\nvram = \"80GiB\"\n",
    )
    .unwrap();
    let nats = three_free_ports();
    let pg = berth_harness::free_port().unwrap();
    let gateway = format!("127.0.0.1:{}", berth_harness::free_port().unwrap());
    let mut child = std::process::Command::new(&berth)
        .args(["up", "--nats-cluster", "3", "--analyzers", "1", "--dir"])
        .arg(dir.path())
        .arg("--inventory")
        .arg(&inventory)
        .args([
            "--nats-port",
            &nats.to_string(),
            "--pg-port",
            &pg.to_string(),
        ])
        .args(["--gateway-listen", &gateway])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("up.stderr")).unwrap())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let up = Up(child);
    let ready = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("berth is up"))
        .unwrap_or_else(|| {
            panic!(
                "berth up ended:\n{}",
                std::fs::read_to_string(dir.path().join("up.stderr")).unwrap_or_default()
            )
        });
    let urls: Vec<String> = (0..3)
        .map(|i| format!("nats://127.0.0.1:{}", nats + i))
        .collect();
    assert!(ready.contains(&urls.join(",")), "{ready}");

    // A command through the third node, as the publisher, runs.
    let db = std::fs::read_to_string(dir.path().join("database-url")).unwrap();
    let creds = dir.path().join("auth/publisher.nk");
    let start = std::process::Command::new(&berth)
        .args([
            "start",
            "on-three",
            "--vram",
            "1GiB",
            "--wait",
            "--timeout",
            "60",
        ])
        .env("BERTH_NATS_URL", &urls[2])
        .env("BERTH_NATS_CREDS", &creds)
        .env("BERTH_DATABASE_URL", db.trim())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&start.stdout);
    assert!(
        start.status.success() && said.contains("running"),
        "{said}{}",
        String::from_utf8_lossy(&start.stderr)
    );
    drop(up);
}
