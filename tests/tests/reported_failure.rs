//! The failure berth exists for: users batch-start and batch-stop 20 models twice, then start
//! one. That one must run, every other must be stopped with nothing held, and no fit may be
//! computed for a command that was already superseded when an analyzer picked it up.

use berth_proto::InstanceState;
use berth_tests::{Fleet, GIB, worker};
use futures::future::join_all;
use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

const N: usize = 20;
const SURVIVOR: &str = "model-07";
const LIMIT: Duration = Duration::from_secs(60);

fn ids() -> Vec<String> {
    (0..N).map(|i| format!("model-{i:02}")).collect()
}

/// Every command published: instance → (sequence, when JetStream acknowledged it).
type Published = HashMap<String, Vec<(u64, SystemTime)>>;

async fn batch(fleet: &Fleet, start: bool, published: &mut Published) {
    let acks = join_all(ids().into_iter().map(|id| async move {
        let seq = if start {
            fleet.start_instance(&id, 30 * GIB, 1).await
        } else {
            fleet.stop_instance(&id).await
        };
        (id, seq, SystemTime::now())
    }))
    .await;
    for (id, seq, at) in acks {
        published.entry(id).or_default().push((seq.get(), at));
    }
}

async fn run_scenario(fleet: &Fleet, published: &mut Published) {
    for _ in 0..2 {
        batch(fleet, true, published).await;
        batch(fleet, false, published).await;
    }
    let seq = fleet.start_instance(SURVIVOR, 30 * GIB, 1).await;
    published
        .entry(SURVIVOR.into())
        .or_default()
        .push((seq.get(), SystemTime::now()));
}

async fn assert_final_state(fleet: &Fleet) {
    fleet
        .wait_states(LIMIT, &ids(), |id| {
            if id == SURVIVOR {
                InstanceState::Running
            } else {
                InstanceState::Stopped
            }
        })
        .await;
    let instances = fleet.store.instances().await.expect("instances");
    assert_eq!(instances.len(), N);
    let allocs = fleet.store.allocations().await.expect("allocations");
    assert!(
        allocs.iter().all(|a| a.instance_id == SURVIVOR),
        "stopped instances still hold GPUs: {allocs:?}"
    );
    assert_eq!(allocs.len(), 1);
    fleet.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_start_stop_twice_then_one_start_while_analyzers_run() {
    let mut fleet = Fleet::start().await;
    // Production's ack wait: with the tests' 2 s, a machine stalled by its neighbours can
    // redeliver a command mid-fit, and the redelivery's own fit is not what this counts.
    let analyzer = |name: &str| {
        let mut c = fleet.analyzer_config(name);
        c.ack_wait = std::time::Duration::from_secs(30);
        c
    };
    let (ca, cb) = (analyzer("analyzer-a"), analyzer("analyzer-b"));
    let a = fleet.add_analyzer_with(ca, Default::default()).await;
    let b = fleet.add_analyzer_with(cb, Default::default()).await;
    fleet.add_agent(worker("w1", 4, 80, &[])).await;
    fleet.add_agent(worker("w2", 4, 80, &[])).await;

    let began = Instant::now();
    let mut published = Published::new();
    run_scenario(&fleet, &mut published).await;
    assert_final_state(&fleet).await;
    let wall = began.elapsed();

    // No fit for a command that a newer, already stored command had superseded when the
    // analyzer picked it up.
    let mut fits = a.fit_log();
    fits.extend(b.fit_log());
    for fit in &fits {
        let newer_before_pickup = published[&fit.instance_id]
            .iter()
            .find(|(seq, acked)| *seq > fit.cmd_seq.get() && *acked < fit.picked_at);
        assert!(
            newer_before_pickup.is_none(),
            "fit computed for {} seq {} although seq {:?} was stored before pickup",
            fit.instance_id,
            fit.cmd_seq,
            newer_before_pickup
        );
    }
    let starts = 2 * N + 1;
    assert!(
        fits.len() <= starts,
        "{} fits for {starts} starts",
        fits.len()
    );
    println!(
        "reported failure: settled in {wall:?}; fits computed {} (of {starts} starts), skipped as superseded {}, cancelled {}, stale {}, CAS conflicts {}",
        fits.len(),
        a.fits_skipped_superseded.get() + b.fits_skipped_superseded.get(),
        a.fits_cancelled.get() + b.fits_cancelled.get(),
        a.commands_stale.get() + b.commands_stale.get(),
        a.cas_conflicts.get() + b.cas_conflicts.get(),
    );
}

/// The same commands arrive while no analyzer runs (a backlog after an outage): the stream
/// keeps only each instance's newest command, so exactly one fit is computed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_of_superseded_commands_costs_one_fit() {
    let mut fleet = Fleet::start().await;
    // An analyzer registers the worker, then goes away: the commands pile up.
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 4, 80, &[])).await;
    fleet
        .analyzers
        .pop()
        .expect("one analyzer")
        .shutdown()
        .await;
    let mut published = Published::new();
    run_scenario(&fleet, &mut published).await;

    let stats = fleet.add_analyzer(Default::default()).await;
    assert_final_state(&fleet).await;
    assert_eq!(
        stats.fits_computed.get(),
        1,
        "only the survivor's start needs a fit"
    );
    assert_eq!(stats.commands_applied.get(), N as u64);
}

/// The superseded check asks for many instances at once when many ask together: each caller
/// still gets its own instance's newest sequence, or none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_sequences_asked_together_are_each_right() {
    let fleet = Fleet::start().await;
    let mut expected = HashMap::new();
    for round in 0..3 {
        for i in 0..50 {
            let id = format!("n{i:02}");
            let seq = if (i + round) % 2 == 0 {
                fleet.start_instance(&id, GIB, 1).await
            } else {
                fleet.stop_instance(&id).await
            };
            expected.insert(id, Some(seq));
        }
    }
    for i in 50..60 {
        expected.insert(format!("n{i:02}"), None);
    }
    for _ in 0..3 {
        let bus = &fleet.bus;
        let answers = join_all(expected.keys().map(|id| async move {
            (id.clone(), bus.last_command_seq(id).await.expect("lookup"))
        }))
        .await;
        for (id, seq) in answers {
            assert_eq!(Some(&seq), expected.get(&id), "{id}");
        }
    }
}
