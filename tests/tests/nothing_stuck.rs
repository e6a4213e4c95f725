//! Nothing stuck: pending instances are placed when capacity appears (also when it appears in
//! the middle of their fit), instances of a worker that went away are placed elsewhere, a fit
//! that takes too long ends in `error`, and a fit lost with its analyzer is redone by another.

use berth_analyzer::Hooks;
use berth_proto::{InstanceState, Version};
use berth_tests::{
    Fleet, GIB,
    hold::{hold, hold_before_commit},
    wait_until, worker,
};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_instance_is_placed_when_a_stop_frees_room() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("a", 60 * GIB, 1).await;
    fleet.wait_state("a", InstanceState::Running, LIMIT).await;
    fleet.start_instance("b", 60 * GIB, 1).await;
    fleet.wait_state("b", InstanceState::Pending, LIMIT).await;

    fleet.stop_instance("a").await;
    fleet.wait_state("b", InstanceState::Running, LIMIT).await;
    fleet.wait_state("a", InstanceState::Stopped, LIMIT).await;
    assert!(stats.republished.get() >= 1);
    fleet.assert_books_balanced().await;
}

/// The race: capacity frees while the instance's fit (which saw no room) is on its way to
/// `pending`. The releaser's wake-up finds nothing pending yet; the instance must still be
/// placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_freed_during_the_fit_is_not_missed() {
    let mut fleet = Fleet::start().await;
    let (hook, mut held) = hold();
    let mut config = fleet.analyzer_config("racer");
    // No periodic sweep to the rescue: only the wake-ups may save the instance.
    config.sweep_every = Duration::from_secs(3600);
    let hooks = Hooks {
        before_pending: Some(hook),
        ..Default::default()
    };
    fleet.add_analyzer_with(config, hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("a", 60 * GIB, 1).await;
    fleet.wait_state("a", InstanceState::Running, LIMIT).await;

    fleet.start_instance("b", 60 * GIB, 1).await;
    let (id, _, go) = held.recv().await.expect("b found no room");
    assert_eq!(id, "b");
    fleet.stop_instance("a").await;
    fleet.wait_state("a", InstanceState::Stopped, LIMIT).await;
    go.send(()).expect("hook waiting");

    // b goes pending, then is placed: from here on the hook lets every fit through.
    tokio::spawn(async move {
        while let Some((_, _, go)) = held.recv().await {
            let _ = go.send(());
        }
    });
    fleet.wait_state("b", InstanceState::Running, LIMIT).await;
    fleet.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_of_a_silent_worker_are_placed_elsewhere() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet
        .add_agent(worker("doomed", 1, 80, &[("zone", "a")]))
        .await;
    fleet.start_instance("m", 40 * GIB, 1).await;
    let row = fleet.wait_state("m", InstanceState::Running, LIMIT).await;
    assert_eq!(row.worker_id.as_deref(), Some("doomed"));

    // The agent dies without a word; a new worker comes.
    fleet.agents.pop().expect("agent").abort();
    fleet.add_agent(worker("spare", 1, 80, &[])).await;

    let store = fleet.store.clone();
    let moved = berth_tests::wait_until("m to run on the spare", LIMIT, || {
        let store = store.clone();
        async move {
            let row = store.instance("m").await.ok()??;
            (row.state == "running" && row.worker_id.as_deref() == Some("spare")).then_some(row)
        }
    })
    .await;
    assert!(moved.version > row.version);
    let gpus = fleet.store.gpus().await.expect("gpus");
    let doomed = gpus
        .iter()
        .find(|g| g.worker_id == "doomed")
        .expect("doomed gpu");
    assert_eq!(
        doomed.reserved_bytes, 0,
        "the silent worker's reservation is released"
    );
    assert!(stats.workers_unreachable.get() >= 1 && stats.evictions.get() >= 1);
    fleet.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_on_a_silent_worker_still_ends_stopped() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("doomed", 1, 80, &[])).await;
    fleet.start_instance("m", 40 * GIB, 1).await;
    fleet.wait_state("m", InstanceState::Running, LIMIT).await;
    fleet.agents.pop().expect("agent").abort();
    fleet.stop_instance("m").await;
    let row = fleet.wait_state("m", InstanceState::Stopped, LIMIT).await;
    assert!(row.reason.unwrap_or_default().contains("doomed"));
    assert!(
        fleet
            .store
            .allocations()
            .await
            .expect("allocations")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fit_that_takes_too_long_ends_in_error() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let mut config = fleet.analyzer_config("slow");
    config.fit_timeout = Duration::from_millis(300);
    let stats = fleet.add_analyzer_with(config, hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("slow", 10 * GIB, 1).await;
    let (_, _, _never) = held.recv().await.expect("fit reached the commit");
    let row = fleet.wait_state("slow", InstanceState::Error, LIMIT).await;
    assert!(row.reason.unwrap_or_default().contains("did not finish"));
    assert_eq!(stats.fits_timed_out.get(), 1);
    assert!(
        fleet
            .store
            .allocations()
            .await
            .expect("allocations")
            .is_empty()
    );
}

/// An analyzer dies holding a command mid-fit: JetStream redelivers it to another analyzer,
/// which redoes the work under a new version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fit_lost_with_its_analyzer_is_redone_elsewhere() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    fleet.add_analyzer(hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("m", 10 * GIB, 1).await;
    let (_, version, _go) = held.recv().await.expect("fit reached the commit");

    fleet.analyzers.pop().expect("analyzer").abort();
    fleet.add_analyzer(Default::default()).await;
    let row = fleet.wait_state("m", InstanceState::Running, LIMIT).await;
    assert!(row.version > version, "redone under a new version");
    fleet.assert_books_balanced().await;
}

/// Sending the same start again for a running instance changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeating_a_start_is_a_no_op() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("m", 10 * GIB, 1).await;
    let first = fleet.wait_state("m", InstanceState::Running, LIMIT).await;
    let fits = stats.fits_computed.get();
    let seq = fleet.start_instance("m", 10 * GIB, 1).await;
    let row = fleet.wait_applied("m", seq, LIMIT).await;
    assert_eq!(
        (row.state.as_str(), row.version),
        ("running", first.version)
    );
    assert_eq!(stats.fits_computed.get(), fits, "a repeat costs no fit");
}

/// NATS restarts under a running fleet: clients reconnect, the streams (on disk) come back,
/// and commands published after the restart are handled like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_nothing() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 4, 80, &[])).await;
    fleet.start_instance("before", 10 * GIB, 1).await;
    fleet
        .wait_state("before", InstanceState::Running, LIMIT)
        .await;

    tokio::task::block_in_place(|| fleet.servers.nats.restart()).expect("nats restart");

    // The test's own client reconnects too; publishing retries until it has.
    let mut published = false;
    for _ in 0..100 {
        if fleet
            .bus
            .publish_command(
                "after",
                &berth_proto::Command::Start(berth_proto::StartSpec::claim(10 * GIB, 1)),
            )
            .await
            .is_ok()
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "could not publish after the restart");
    fleet.stop_instance("before").await;
    fleet
        .wait_state("after", InstanceState::Running, LIMIT)
        .await;
    fleet
        .wait_state("before", InstanceState::Stopped, LIMIT)
        .await;
    fleet.assert_books_balanced().await;
}

/// A backend that reports a placement berth no longer wants on that worker (an agent that
/// restarted and forgot a stop) is told to stop it; the current placement is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_running_a_stale_placement_is_told_to_stop() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("x", 10 * GIB, 1).await;
    let row = fleet.wait_state("x", InstanceState::Running, LIMIT).await;
    let unassigned = || {
        fleet
            .agent_stats
            .unassigned
            .get_or_create(&berth_agent::AgentStats::worker("w1"))
            .get()
    };
    let report_running = |id: &str, version: Version| {
        let report = berth_proto::StatusMsg::Instance {
            worker_id: "w1".into(),
            instance_id: id.into(),
            version,
            state: berth_proto::status::ReportedState::Running,
            reason: None,
            shared: false,
            endpoint: None,
            restarts: 0,
        };
        let bus = fleet.bus.clone();
        async move { bus.publish_status("w1", &report).await.expect("report") }
    };
    let before = unassigned();
    report_running("x", Version::new(row.version.get() - 1)).await;
    report_running("ghost", Version::new(7)).await;
    wait_until("both stale backends told to stop", LIMIT, || {
        let n = unassigned();
        async move { (n >= before + 2).then_some(()) }
    })
    .await;
    assert_eq!(stats.stale_reports_fenced.get(), 2);
    // A duplicate report of the current placement is not stale.
    report_running("x", row.version).await;
    fleet.start_instance("y", 10 * GIB, 1).await;
    fleet.wait_state("y", InstanceState::Running, LIMIT).await;
    assert_eq!(stats.stale_reports_fenced.get(), 2);
    let x = fleet.wait_state("x", InstanceState::Running, LIMIT).await;
    assert_eq!(x.version, row.version);
    fleet.assert_books_balanced().await;
}

/// A database outage longer than `--gone-after` evicts nothing: heartbeats could not be
/// recorded while it lasted, so the silence it leaves proves nothing. Workers are judged
/// again only once the database has answered for a whole `--unreachable-after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_evicts_nothing() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("m", 40 * GIB, 1).await;
    let running = fleet.wait_state("m", InstanceState::Running, LIMIT).await;

    // The fault: PostgreSQL away for longer than gone_after (2 s in the test fleet).
    tokio::task::block_in_place(|| fleet.servers.pg.stop());
    tokio::time::sleep(Duration::from_secs(3)).await;
    tokio::task::block_in_place(|| fleet.servers.pg.restart()).expect("start PostgreSQL");
    let back = stats.sweeps_without_silence.get();

    // Sweeps after the outage first leave workers alone, then judge them on heartbeats
    // recorded since: two sweeps that judged workers, after the window.
    let judged = stats.sweeps.get() - stats.sweeps_without_silence.get();
    berth_tests::wait_until("two sweeps that judged workers", LIMIT, || async {
        (stats.sweeps.get() - stats.sweeps_without_silence.get() >= judged + 2).then_some(())
    })
    .await;
    assert_eq!(
        (stats.workers_unreachable.get(), stats.evictions.get()),
        (0, 0)
    );
    assert!(
        stats.sweeps_without_silence.get() > back,
        "the sweeps right after the outage must not judge silence"
    );
    let row = fleet.store.instance("m").await.unwrap().expect("row");
    assert_eq!(
        (row.state.as_str(), row.version),
        ("running", running.version)
    );
    fleet.assert_books_balanced().await;
}

/// An assignment its agent never acted on (lost with a NATS node, or never sent because the
/// command ran out of deliveries first) is sent again while the instance stays `scheduled`,
/// with the same version, until the agent answers; of two analyzers, only the one whose lane
/// holds the worker sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assignment_no_agent_answered_is_sent_again() {
    use berth_proto::{AgentMsg, GpuInfo, StatusMsg, status::ReportedState};
    use futures::StreamExt;

    let mut fleet = Fleet::start().await;
    let both = [
        fleet.add_analyzer(Default::default()).await,
        fleet.add_analyzer(Default::default()).await,
    ];
    let peers: Vec<_> = fleet.analyzers.iter().map(|a| a.peers.clone()).collect();
    wait_until("two lanes", LIMIT, || async {
        peers.iter().all(|p| p.lane().count() == 2).then_some(())
    })
    .await;
    let mine = peers
        .iter()
        .position(|p| p.lane().holds("mute"))
        .expect("one lane holds the worker");
    let stats = both[mine].clone();
    let resent_by_other = || both[1 - mine].assignments_resent.get();
    // A worker with no agent behind it: the test registers it, keeps it alive and reads
    // what is sent to it.
    let bus = fleet.bus.clone();
    bus.publish_status(
        "mute",
        &StatusMsg::Register {
            worker_id: "mute".into(),
            labels: Default::default(),
            gpus: vec![GpuInfo {
                index: 0,
                name: "Simulated H100".into(),
                uuid: "GPU-mute-0".into(),
                total_bytes: 80 * GIB,
                system_reserved_bytes: 0,
            }],
        },
    )
    .await
    .expect("register");
    let beats = tokio::spawn(async move {
        loop {
            let beat = StatusMsg::Heartbeat {
                worker_id: "mute".into(),
                usage: Vec::new(),
            };
            let _ = bus.publish_status("mute", &beat).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let consumer = fleet.bus.agent_consumer("mute").await.expect("consumer");
    let mut assignments = consumer.messages().await.expect("pull");
    let mut next_assign = async || {
        let msg = tokio::time::timeout(LIMIT, assignments.next())
            .await
            .expect("an assignment within the limit")
            .expect("stream open")
            .expect("message");
        msg.ack().await.expect("ack");
        match berth_proto::decode::<AgentMsg>(&msg.payload).expect("decodes") {
            AgentMsg::Assign {
                instance_id,
                version,
                gpus,
                ..
            } => (instance_id, version, gpus),
            other => panic!("expected an assignment, got {other:?}"),
        }
    };

    fleet.start_instance("x", 10 * GIB, 1).await;
    let first = next_assign().await;
    let row = fleet.wait_state("x", InstanceState::Scheduled, LIMIT).await;
    assert_eq!(first, ("x".to_owned(), row.version, vec![0]));
    assert_eq!(stats.assignments_resent.get(), 0);

    // The agent "lost" it: after `stuck_after`, the same assignment comes again.
    let again = next_assign().await;
    assert_eq!(again, first);
    assert!(stats.assignments_resent.get() >= 1);
    let still = fleet.wait_state("x", InstanceState::Scheduled, LIMIT).await;
    assert_eq!(still.version, row.version);
    // Sent on every sweep while nobody answers, and by one analyzer only: the other has
    // swept several times meanwhile.
    wait_until("three resends", LIMIT, || async {
        (stats.assignments_resent.get() >= 3).then_some(())
    })
    .await;
    assert_eq!(resent_by_other(), 0);

    fleet
        .bus
        .publish_status(
            "mute",
            &StatusMsg::Instance {
                worker_id: "mute".into(),
                instance_id: "x".into(),
                version: row.version,
                state: ReportedState::Running,
                reason: None,
                shared: false,
                endpoint: None,
                restarts: 0,
            },
        )
        .await
        .expect("report");
    fleet.wait_state("x", InstanceState::Running, LIMIT).await;
    beats.abort();
    assert_eq!(resent_by_other(), 0);
    fleet.assert_books_balanced().await;
}
