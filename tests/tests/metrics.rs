//! The analyzer's `/metrics` endpoint, scraped over HTTP like Prometheus would.

use berth_proto::InstanceState;
use berth_tests::{Fleet, GIB, worker};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut body = String::new();
    conn.read_to_string(&mut body).await.expect("response");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_counters_states_and_backlog() {
    let mut fleet = Fleet::start().await;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let mut config = fleet.analyzer_config("metered");
    config.metrics_addr = Some(addr);
    fleet.add_analyzer_with(config, Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("a", 10 * GIB, 1).await;
    fleet.start_instance("b", 100 * GIB, 1).await;
    fleet
        .wait_state("a", InstanceState::Running, Duration::from_secs(30))
        .await;
    fleet
        .wait_state("b", InstanceState::Pending, Duration::from_secs(30))
        .await;

    let text = scrape(addr).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for expected in [
        "berth_analyzer_placements_committed_total 1",
        "berth_instances{state=\"running\"} 1",
        "berth_instances{state=\"pending\"} 1",
        "berth_instances{state=\"stopped\"} 0",
        "berth_commands_backlog 0",
        "berth_analyzers_alive 1",
        "# EOF",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    // Every fit is timed; b took at least two (a "nothing fits" is checked again on a fresh
    // view of the database before it is believed).
    let value = |name: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .expect(name);
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("a number")
    };
    let fits = value("berth_analyzer_fits_computed_total");
    assert!(fits >= 3, "{fits}");
    assert_eq!(value("berth_analyzer_fit_seconds_count"), fits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_metrics_count_assignments_per_worker() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    berth_agent::metrics::serve(fleet.agent_stats.clone(), addr, shutdown.clone())
        .await
        .expect("serve");
    fleet.start_instance("a", 10 * GIB, 1).await;
    fleet
        .wait_state("a", InstanceState::Running, Duration::from_secs(30))
        .await;
    fleet.stop_instance("a").await;
    fleet
        .wait_state("a", InstanceState::Stopped, Duration::from_secs(30))
        .await;

    let text = scrape(addr).await;
    for expected in [
        "berth_agent_assignments_total{worker=\"w1\"} 1",
        "berth_agent_unassignments_total{worker=\"w1\"} 1",
        "berth_agent_instances_running{worker=\"w1\"} 0",
        "berth_agent_heartbeats_total{worker=\"w1\"}",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    shutdown.cancel();
}
