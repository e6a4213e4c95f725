//! Analyzers hear each other's heartbeats and deal the workers out among themselves (lanes),
//! so that decisions made at the same moment rarely reach for the same GPUs.

use berth_analyzer::Peers;
use berth_tests::{Fleet, wait_until};
use std::{sync::Arc, time::Duration};

const LIMIT: Duration = Duration::from_secs(20);

/// Waits until every analyzer of `fleet` sees `count` analyzers and each holds its own lane.
async fn wait_lanes(fleet: &Fleet, count: u32) {
    let peers: Vec<Arc<Peers>> = fleet.analyzers.iter().map(|a| a.peers.clone()).collect();
    wait_until(&format!("{count} lanes"), LIMIT, || async {
        let mut lanes: Vec<(u32, u32)> = peers
            .iter()
            .map(|p| (p.lane().index(), p.lane().count()))
            .collect();
        lanes.sort_unstable();
        let expected: Vec<(u32, u32)> = (0..count).map(|i| (i, count)).collect();
        (lanes == expected).then_some(())
    })
    .await;
    assert!(peers.iter().all(|p| p.alive() == count as usize));
}

/// Starts `n` analyzers beating every `every`.
async fn add_analyzers(fleet: &mut Fleet, n: usize, every: Duration) {
    for i in 0..n {
        let mut config = fleet.analyzer_config(&format!("analyzer-{i}"));
        config.heartbeat_every = every;
        fleet.add_analyzer_with(config, Default::default()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyzers_deal_lanes_out_on_joining_and_on_leaving() {
    let mut fleet = Fleet::start().await;
    // Beats far apart: only a newcomer's beat and the replies it draws, or a departing
    // analyzer's word, can change the lanes within the test's deadline.
    add_analyzers(&mut fleet, 3, Duration::from_secs(600)).await;
    wait_lanes(&fleet, 3).await;
    fleet.analyzers.pop().expect("three").shutdown().await;
    wait_lanes(&fleet, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_analyzer_leaves_the_lanes_when_its_beats_stop() {
    let mut fleet = Fleet::start().await;
    add_analyzers(&mut fleet, 2, Duration::from_millis(200)).await;
    wait_lanes(&fleet, 2).await;
    // A crash says nothing: the other takes every worker after three missed beats.
    fleet.analyzers.pop().expect("two").abort();
    wait_lanes(&fleet, 1).await;
}
