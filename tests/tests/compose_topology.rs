//! `docker-compose.yml` is real: the harness's description of its topology
//! (`berth_harness::compose`) is what the file says (checked without running anything), and
//! that topology runs end to end without Docker: 3 NATS nodes with berth's roles,
//! PostgreSQL, migrate, 2 analyzers, 2 simulated agents and the gateway, which place an
//! instance. The image builds with the workspace's pinned toolchain.

use berth_bus::{Access, Bus, CMD_STREAM, auth::AuthDir};
use berth_harness::compose::{
    AUTH_DIR, COMPOSE_FILE, CREDS_TARGET, ComposeFleet, Image, Service, topology,
};
use berth_harness::{AUTH_INCLUDE, workspace_root};
use berth_proto::{Command, InstanceState, StartSpec};
use berth_store::Store;
use berth_tests::{GIB, init_logs, wait_until};
use serde_norway::Value;
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

fn root() -> PathBuf {
    workspace_root().expect("the workspace root")
}

/// The compose file's services, with its `<<` merge keys applied.
fn compose_services() -> serde_norway::Mapping {
    let text = std::fs::read_to_string(root().join(COMPOSE_FILE)).expect("docker-compose.yml");
    let mut doc: Value = serde_norway::from_str(&text).expect("docker-compose.yml is YAML");
    doc.apply_merge().expect("its merge keys apply");
    let services = doc["services"]
        .as_mapping()
        .expect("a map of services")
        .clone();
    let mut merged = serde_norway::Mapping::new();
    for (name, mut service) in services {
        // Merge keys inside each service (`<<: *berth-image`).
        service
            .apply_merge()
            .expect("the service's merge keys apply");
        merged.insert(name, service);
    }
    merged
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .map(|x| x.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// One service of the compose file against its description.
fn assert_same(described: &Service, compose: &Value) {
    let name = described.name;
    let image = compose["image"].as_str().unwrap_or_default();
    match described.image {
        Image::Nats => assert!(image.starts_with("nats:"), "{name}: {image}"),
        Image::Postgres => assert!(image.starts_with("postgres:"), "{name}: {image}"),
        Image::Berth => {
            assert_eq!(image, "berth:local", "{name}");
            assert_eq!(
                compose["build"]["dockerfile"].as_str(),
                Some("ops/Dockerfile")
            );
        }
    }
    assert_eq!(
        strings(&compose["command"]),
        described.command,
        "{name}: command"
    );
    assert_eq!(
        sorted(strings(&compose["volumes"])),
        sorted(described.compose_volumes()),
        "{name}: volumes"
    );
    let env: BTreeMap<String, String> = compose["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let k = k.as_str().expect("a string key").to_owned();
                    (k, v.as_str().expect("a string value").to_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(env, described.compose_env(), "{name}: environment");
    assert_eq!(
        strings(&compose["ports"]),
        described.compose_ports(),
        "{name}: ports"
    );
    let replicas = compose["deploy"]["replicas"].as_u64().unwrap_or(1);
    assert_eq!(replicas, u64::from(described.replicas), "{name}: replicas");
    let runs_once = compose["restart"].as_str() == Some("no");
    assert_eq!(runs_once, described.one_shot, "{name}: restart");
}

#[test]
fn the_compose_file_and_the_harness_topology_agree() {
    let compose = compose_services();
    let described = topology();
    let names: BTreeSet<&str> = compose.keys().map(|k| k.as_str().unwrap()).collect();
    let described_names: BTreeSet<&str> = described.iter().map(|s| s.name).collect();
    assert_eq!(names, described_names);
    for service in &described {
        assert_same(service, &compose[service.name]);
    }

    // Every file mounted from the repository is there; the credentials are the files
    // `berth auth init --agent gpu-a --agent gpu-b` writes.
    let auth = AuthDir::new(AUTH_DIR);
    let mut written: BTreeSet<PathBuf> = ["analyzer", "publisher", "agent-gpu-a", "agent-gpu-b"]
        .iter()
        .map(|u| auth.creds(u))
        .collect();
    written.insert(auth.server_config());
    for service in &described {
        for m in &service.mounts {
            if m.source.starts_with(AUTH_DIR) {
                assert!(written.contains(Path::new(&m.source)), "{}", m.source);
            } else {
                assert!(root().join(&m.source).is_file(), "{}", m.source);
            }
        }
        if service.image == Image::Berth {
            assert!(
                service.mounts.iter().any(|m| m.target == CREDS_TARGET),
                "{} runs without NATS credentials",
                service.name
            );
        }
    }

    // Each node's configuration names it and includes the roles where they are mounted.
    for node in described.iter().filter(|s| s.image == Image::Nats) {
        let config = &node.mounts[0];
        let text = std::fs::read_to_string(root().join(&config.source)).unwrap();
        assert!(
            text.contains(&format!("server_name: {}", node.name)),
            "{text}"
        );
        assert!(
            text.contains(&format!("include \"{AUTH_INCLUDE}\"")),
            "{text}"
        );
        let dir = Path::new(config.target).parent().unwrap();
        assert!(
            node.mounts
                .iter()
                .any(|m| Path::new(m.target) == dir.join(AUTH_INCLUDE)),
            "{}: the roles file is not where the configuration includes it",
            node.name
        );
    }
}

#[test]
fn the_image_builds_every_binary_with_the_pinned_toolchain() {
    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.trim().strip_prefix("channel = "))
        .map(|c| c.trim_matches('"'))
        .expect("a channel in rust-toolchain.toml");
    let dockerfile = std::fs::read_to_string(root().join("ops/Dockerfile")).unwrap();
    let builder = dockerfile
        .lines()
        .find(|l| l.starts_with("FROM rust:"))
        .expect("a rust builder stage");
    assert!(
        builder.starts_with(&format!("FROM rust:{channel}-")),
        "{builder} is not the pinned {channel}"
    );
    for service in topology().iter().filter(|s| s.image == Image::Berth) {
        let bin = &service.command[0];
        assert!(
            dockerfile.contains(&format!("-p {bin} "))
                || dockerfile.contains(&format!("-p {bin}\n")),
            "{bin} is not built"
        );
        assert!(
            dockerfile.contains(&format!("/app/target/release/{bin} ")),
            "{bin} is not in the image"
        );
    }
}

fn berth(args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = std::process::Command::new(berth_tests::built_binary("berth"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run berth");
    assert!(
        out.status.success(),
        "berth {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_topology_runs_and_places_an_instance() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let auth_dir = tmp.path().join("compose-auth");
    // The one command the docs give before `docker compose up`.
    let dir = auth_dir.to_str().unwrap();
    berth(
        &[
            "auth", "init", "--dir", dir, "--agent", "gpu-a", "--agent", "gpu-b",
        ],
        &[],
    );
    let fleet = {
        let (bins, auth) = (berth_tests::binaries_dir(), auth_dir.clone());
        tokio::task::spawn_blocking(move || ComposeFleet::start(&bins, &auth))
            .await
            .unwrap()
            .expect("the compose topology starts")
    };
    let mut names = fleet.names().to_vec();
    names.sort();
    assert_eq!(
        names,
        ["agent-a", "agent-b", "analyzer-1", "analyzer-2", "gateway"]
    );

    // Anonymous clients are refused by every node: the roles are on.
    assert!(async_nats::connect(fleet.nats.url(1)).await.is_err());
    let auth = AuthDir::new(&auth_dir);
    let publisher = Bus::connect_as(
        &fleet.nats.urls(),
        "publisher",
        &Access::user(Some(auth.creds("publisher")), None),
    )
    .await
    .unwrap();
    let store = Store::connect(fleet.database_url(), 2).unwrap();
    wait_until(
        "both workers registered",
        Duration::from_secs(60),
        || async {
            let workers: BTreeSet<String> = store
                .gpus()
                .await
                .ok()?
                .into_iter()
                .map(|g| g.worker_id)
                .collect();
            (workers.len() == 2).then_some(())
        },
    )
    .await;
    let start = Command::Start(StartSpec {
        model: "demo".into(),
        ..StartSpec::claim(20 * GIB, 1)
    });
    publisher
        .publish_command("compose-demo", &start)
        .await
        .unwrap();
    let row = wait_until("compose-demo running", Duration::from_secs(60), || async {
        let row = store.instance("compose-demo").await.ok()??;
        (row.state == InstanceState::Running.as_str()).then_some(row)
    })
    .await;
    assert!(row.worker_id.is_some(), "{row:?}");

    // The analyzers set the streams up on all three nodes.
    let mut stream = publisher.jetstream().get_stream(CMD_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 3);

    // The gateway answers with a key made the way the compose file's comment says.
    let db = fleet.database_url().to_owned();
    let out = berth(
        &["keys", "create", "compose-test", "--scope", "admin"],
        &[("BERTH_DATABASE_URL", db.as_str())],
    );
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let gateway = fleet
        .published("gateway", 8080)
        .expect("the gateway's port");
    let url = format!("http://{gateway}/api/v1/instances");
    let body = wait_until(
        "the gateway lists compose-demo",
        Duration::from_secs(30),
        || {
            let (url, key) = (url.clone(), key.clone());
            async move {
                let r = reqwest::Client::new()
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .ok()?;
                let body = r.text().await.ok()?;
                body.contains("compose-demo").then_some(body)
            }
        },
    )
    .await;
    assert!(body.contains("running"), "{body}");
    let mut fleet = fleet;
    assert_eq!(fleet.exited(), Vec::<(String, String)>::new());
}
