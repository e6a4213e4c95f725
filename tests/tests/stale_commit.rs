//! A placement computed for version V never lands once the instance moved past V. The fit is
//! held between compute and commit by a test hook, so the interleaving is exact.

use berth_proto::{CmdSeq, InstanceState};
use berth_tests::hold::hold_before_commit;
use berth_tests::{Fleet, GIB, worker};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

async fn assert_nothing_landed(fleet: &Fleet) {
    assert!(
        fleet
            .store
            .allocations()
            .await
            .expect("store read")
            .is_empty()
    );
    assert!(
        fleet
            .store
            .gpus()
            .await
            .expect("store read")
            .iter()
            .all(|g| g.reserved_bytes == 0)
    );
    fleet.assert_books_balanced().await;
}

/// Another analyzer applies a stop while this one holds a finished fit: the CAS refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_after_a_concurrent_stop_is_refused_by_the_version_check() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let stats = fleet.add_analyzer(hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    let start_seq = fleet.start_instance("x", 20 * GIB, 1).await;
    let (id, version, go) = held.recv().await.expect("fit reached the commit");
    assert_eq!(id, "x");
    // What another analyzer does with a newer stop: applied straight in the store, so this
    // analyzer's own cancellation cannot see it and only the version check stands in the way.
    let stop_seq = CmdSeq::new(start_seq.get() + 1);
    let applied = fleet.store.apply_stop("x", stop_seq, None).await.unwrap();
    assert!(
        matches!(applied, berth_store::commands::StopApplied::Stopped(_)),
        "{applied:?}"
    );
    let _ = go.send(()); // the fit may already have been abandoned

    let store = fleet.store.clone();
    berth_tests::wait_until("the CAS miss", LIMIT, || {
        let stats = stats.clone();
        async move { (stats.cas_conflicts.get() == 1).then_some(()) }
    })
    .await;
    let row = store.instance("x").await.unwrap().unwrap();
    assert_eq!(row.state, "stopped");
    assert!(row.version > version);
    assert_eq!(stats.placements_committed.get(), 0);
    assert_nothing_landed(&fleet).await;
}

/// The stop goes through the bus to the same analyzer: it cancels the held fit, which then
/// never commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_published_while_the_fit_is_held_cancels_it() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let stats = fleet.add_analyzer(hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    fleet.start_instance("x", 20 * GIB, 1).await;
    let (_, _, go) = held.recv().await.expect("fit reached the commit");
    fleet.stop_instance("x").await;
    fleet.wait_state("x", InstanceState::Stopped, LIMIT).await;
    let _ = go.send(()); // the fit may already have been abandoned

    berth_tests::wait_until("the held fit to be dropped", LIMIT, || {
        let stats = stats.clone();
        async move { (stats.fits_cancelled.get() + stats.cas_conflicts.get() == 1).then_some(()) }
    })
    .await;
    assert_eq!(stats.placements_committed.get(), 0);
    assert_eq!(
        fleet.store.instance("x").await.unwrap().unwrap().state,
        "stopped"
    );
    assert_nothing_landed(&fleet).await;

    // The analyzer still places what comes next.
    fleet.start_instance("y", 20 * GIB, 1).await;
    let (_, _, go) = held.recv().await.expect("second fit reached the commit");
    let _ = go.send(()); // the fit may already have been abandoned
    fleet.wait_state("y", InstanceState::Running, LIMIT).await;
}

/// The stop reaches another analyzer: the cancellation watch still stops this one's fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_handled_by_another_analyzer_cancels_the_held_fit() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let holder = fleet.add_analyzer(hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    fleet.start_instance("x", 20 * GIB, 1).await;
    let (_, _, go) = held.recv().await.expect("fit reached the commit");
    // Only now a second analyzer: the holder keeps its one message, the other takes the stop
    // (or the holder does; either way the holder's watch sees it).
    let other = fleet.add_analyzer(Default::default()).await;
    fleet.stop_instance("x").await;
    fleet.wait_state("x", InstanceState::Stopped, LIMIT).await;
    berth_tests::wait_until("the holder's watch to see the stop", LIMIT, || {
        let holder = holder.clone();
        async move { (holder.commands_watched.get() >= 2).then_some(()) }
    })
    .await;
    let _ = go.send(()); // the fit may already have been abandoned
    berth_tests::wait_until("the held fit to be cancelled", LIMIT, || {
        let holder = holder.clone();
        async move { (holder.fits_cancelled.get() == 1).then_some(()) }
    })
    .await;
    assert_eq!(
        holder.cas_conflicts.get() + other.cas_conflicts.get(),
        0,
        "cancelled before any commit"
    );
    assert_eq!(holder.placements_committed.get(), 0);
    assert_nothing_landed(&fleet).await;
}

/// A command heard on the watch but never stored (here: refused by the stream's
/// expected-sequence check, as a late copy of an older command would be) cancels the fit at
/// once; the fit asks the stream, finds nothing newer, and places again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_heard_but_not_newer_costs_a_redo_not_the_placement() {
    let mut fleet = Fleet::start().await;
    let (hooks, mut held) = hold_before_commit();
    let stats = fleet.add_analyzer(hooks).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    fleet.start_instance("x", 20 * GIB, 1).await;
    let (_, _, first) = held.recv().await.expect("fit reached the commit");
    // A plain publish: every subscriber hears it, the stream refuses to store it.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
    let stop = berth_proto::Command::Stop(Default::default())
        .encode()
        .expect("encode");
    fleet
        .bus
        .client()
        .publish_with_headers("berth.cmd.instance.x", headers, stop.into())
        .await
        .expect("publish");
    fleet.bus.client().flush().await.expect("flush");
    // The held fit is abandoned (its go-ahead is dropped unanswered) and redone.
    let (_, _, second) = held.recv().await.expect("the fit is redone");
    drop(first);
    second.send(()).expect("go ahead");
    fleet.wait_state("x", InstanceState::Running, LIMIT).await;
    assert_eq!(stats.false_cancels.get(), 1);
    assert_eq!(stats.fits_cancelled.get(), 1);
    fleet.assert_books_balanced().await;
}
