//! NATS roles enforced by the server (`berth auth`): a fleet runs with each part under its
//! own credentials, and a client without credentials, an agent speaking for another worker or
//! publishing commands, and a publisher speaking for an agent are refused by nats-server.

use berth_bus::{
    Access, Bus,
    auth::{AuthDir, Role},
};
use berth_proto::InstanceState;
use berth_tests::{Fleet, GIB, serving::process_runtime, worker};
use std::time::Duration;
use tokio::sync::mpsc;

const LIMIT: Duration = Duration::from_secs(30);

/// A fleet whose NATS knows an analyzer, a publisher and the agents of w1 and w2.
async fn secured() -> (Fleet, AuthDir, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let auth = AuthDir::new(dir.path().join("auth"));
    auth.init().expect("auth init");
    for w in ["w1", "w2"] {
        auth.add(Role::Agent { worker: w.into() }, "")
            .expect("agent user");
    }
    let mut fleet = Fleet::start_with(Some(auth.clone())).await;
    fleet.add_analyzer(Default::default()).await;
    // Real processes, so the agent also answers log requests.
    fleet
        .add_agent_with(
            worker("w1", 1, 80, &[]),
            process_runtime(&dir.path().join("w1"), 44600..=44699),
        )
        .await;
    (fleet, auth, dir)
}

/// A raw client as `user`, with the server's complaints about it on a channel.
async fn client_as(
    fleet: &Fleet,
    auth: &AuthDir,
    user: &str,
    inbox: Option<String>,
) -> (async_nats::Client, mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let access = Access {
        creds: Some(auth.creds(user)),
        inbox_prefix: inbox,
        ..Access::default()
    };
    let client = access
        .connect_options(user)
        .await
        .expect("connect options")
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event.to_string());
            }
        })
        .connect(fleet.servers.nats.url())
        .await
        .expect("connect");
    (client, rx)
}

/// Waits for the server's permissions violation naming `subject`.
async fn refused(complaints: &mut mpsc::UnboundedReceiver<String>, subject: &str) {
    let seen = tokio::time::timeout(LIMIT, async {
        while let Some(c) = complaints.recv().await {
            if c.to_lowercase().contains("permissions violation") && c.contains(subject) {
                return c;
            }
        }
        String::new()
    })
    .await
    .unwrap_or_else(|_| panic!("no permissions violation for {subject}"));
    assert!(
        !seen.is_empty(),
        "the client closed before {subject} was refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_part_runs_under_its_own_role_and_nothing_more() {
    let (fleet, auth, _dir) = secured().await;

    // Without credentials, nobody gets in.
    let anonymous = async_nats::connect(fleet.servers.nats.url()).await;
    assert!(anonymous.is_err(), "an anonymous client was let in");
    // A seed the server does not know neither.
    let stranger = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(stranger.path(), nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let access = Access {
        creds: Some(stranger.path().to_path_buf()),
        ..Access::default()
    };
    let unknown = access
        .connect_options("stranger")
        .await
        .unwrap()
        .connect(fleet.servers.nats.url())
        .await;
    assert!(unknown.is_err(), "an unknown key was let in");

    // The publisher role starts and stops an instance, and reads its events and history.
    let publisher = Bus::connect_as(
        &fleet.servers.nats.url(),
        "publisher",
        &Access::user(Some(auth.creds("publisher")), None),
    )
    .await
    .unwrap();
    let mut events = publisher
        .client()
        .subscribe(berth_proto::subjects::ALL_EVENTS)
        .await
        .unwrap();
    let seq = publisher
        .publish_command(
            "job",
            &berth_proto::Command::Start(berth_proto::StartSpec::claim(10 * GIB, 1)),
        )
        .await
        .unwrap();
    fleet.wait_state("job", InstanceState::Running, LIMIT).await;
    let running = tokio::time::timeout(LIMIT, async {
        use futures::StreamExt;
        while let Some(m) = events.next().await {
            let ev: berth_proto::InstanceEvent = berth_proto::decode(&m.payload).unwrap();
            if ev.state == InstanceState::Running {
                return ev;
            }
        }
        panic!("events ended")
    })
    .await
    .expect("the running event reaches the publisher");
    assert_eq!(running.cmd_seq, seq);
    assert_eq!(publisher.last_command_seq("job").await.unwrap(), Some(seq));
    let history = publisher.history("job", 100).await.unwrap();
    assert!(history.iter().any(|e| e.state == InstanceState::Running));

    // The publisher asks w1's agent for a log, and the agent may answer it (and only it).
    let request = berth_proto::logs::LogsRequest {
        instance_id: "job".into(),
        version: None,
        previous: 0,
        offset: None,
        tail_lines: 10,
    };
    let reply = tokio::time::timeout(
        LIMIT,
        publisher.client().request(
            berth_proto::subjects::logs_subject("w1").unwrap(),
            berth_proto::encode(&request).unwrap().into(),
        ),
    )
    .await
    .expect("w1's agent answers in time")
    .expect("w1's agent answers");
    let reply: berth_proto::logs::LogsReply = berth_proto::decode(&reply.payload).unwrap();
    // A reservation runs no server, so there is no log: the answer says so.
    assert!(reply.error.is_some(), "{reply:?}");

    // An agent cannot speak for another worker, command instances, or read others' work.
    let (agent, mut complaints) = client_as(
        &fleet,
        &auth,
        "agent-w1",
        Role::Agent {
            worker: "w1".into(),
        }
        .inbox_prefix(),
    )
    .await;
    agent
        .publish("berth.status.w2", "forged".into())
        .await
        .unwrap();
    refused(&mut complaints, "berth.status.w2").await;
    agent
        .publish("berth.cmd.instance.job", "forged".into())
        .await
        .unwrap();
    refused(&mut complaints, "berth.cmd.instance.job").await;
    let _sub = agent.subscribe("berth.logs.w2").await.unwrap();
    refused(&mut complaints, "berth.logs.w2").await;
    let _sub = agent.subscribe("berth.events.instance.*").await.unwrap();
    refused(&mut complaints, "berth.events.instance.*").await;

    // A publisher cannot speak for an agent or delete a stream.
    let (user, mut complaints) = client_as(&fleet, &auth, "publisher", None).await;
    user.publish("berth.status.w1", "forged".into())
        .await
        .unwrap();
    refused(&mut complaints, "berth.status.w1").await;
    user.publish("$JS.API.STREAM.DELETE.BERTH_CMD", "".into())
        .await
        .unwrap();
    refused(&mut complaints, "$JS.API.STREAM.DELETE.BERTH_CMD").await;

    // None of it changed the books; the stop still works.
    publisher
        .publish_command(
            "job",
            &berth_proto::Command::Stop(berth_proto::StopSpec::default()),
        )
        .await
        .unwrap();
    fleet.wait_state("job", InstanceState::Stopped, LIMIT).await;
    fleet.assert_books_balanced().await;
    let gpus = fleet.store.gpus().await.unwrap();
    assert!(gpus.iter().all(|g| g.worker_id == "w1"), "{gpus:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_carries_every_role_end_to_end_and_nothing_else_gets_in() {
    let dir = tempfile::tempdir().unwrap();
    let auth = AuthDir::new(dir.path().join("auth"));
    auth.init().unwrap();
    auth.add(
        Role::Agent {
            worker: "w1".into(),
        },
        "",
    )
    .unwrap();
    auth.enable_tls(&["127.0.0.1".into(), "localhost".into()])
        .unwrap();
    let ca = auth.ca().expect("a CA");
    let mut fleet = Fleet::start_with(Some(auth.clone())).await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    let url = fleet.servers.nats.url();
    let publisher = Bus::connect_as(
        &url,
        "publisher",
        &Access::user(Some(auth.creds("publisher")), Some(ca.clone())),
    )
    .await
    .unwrap();
    publisher
        .publish_command(
            "tls-job",
            &berth_proto::Command::Start(berth_proto::StartSpec::claim(GIB, 1)),
        )
        .await
        .unwrap();
    fleet
        .wait_state("tls-job", InstanceState::Running, LIMIT)
        .await;

    // The right key without TLS, and TLS without trusting berth's CA, are both refused.
    let plain = Access::user(Some(auth.creds("publisher")), None)
        .connect_options("plain")
        .await
        .unwrap()
        .connect(&url)
        .await;
    assert!(plain.is_err(), "a plaintext client was let in");
    let other_ca = tempfile::NamedTempFile::new().unwrap();
    let stranger = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    std::fs::write(other_ca.path(), stranger.cert.pem()).unwrap();
    let untrusted = Access::user(
        Some(auth.creds("publisher")),
        Some(other_ca.path().to_path_buf()),
    )
    .connect_options("untrusted")
    .await
    .unwrap()
    .connect(&url)
    .await;
    assert!(
        untrusted.is_err(),
        "a server the client cannot verify was trusted"
    );
    fleet.assert_books_balanced().await;
}
