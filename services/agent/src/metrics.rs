//! The agent's `/metrics`: per worker, assignments and unassignments handled, heartbeats
//! sent, and instances running.

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use std::{net::SocketAddr, sync::Arc};
use tokio_util::sync::CancellationToken;

type ByWorker<M> = Family<Vec<(String, String)>, M>;

/// Counters shared by every agent of a process (one label per worker).
#[derive(Debug, Default)]
pub struct AgentStats {
    pub assigned: ByWorker<Counter>,
    pub unassigned: ByWorker<Counter>,
    pub heartbeats: ByWorker<Counter>,
    pub running: ByWorker<Gauge>,
}

impl AgentStats {
    pub fn worker(id: &str) -> Vec<(String, String)> {
        vec![("worker".to_owned(), id.to_owned())]
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut registry = Registry::default();
        let sub = registry.sub_registry_with_prefix("berth_agent");
        sub.register("assignments", "Assignments handled", self.assigned.clone());
        sub.register(
            "unassignments",
            "Unassignments handled",
            self.unassigned.clone(),
        );
        sub.register("heartbeats", "Heartbeats sent", self.heartbeats.clone());
        sub.register(
            "instances_running",
            "Instances running",
            self.running.clone(),
        );
        let mut out = String::new();
        let _ = encode(&mut out, &registry);
        out
    }
}

/// Serves `/metrics` until `shutdown`; binding errors are returned at once.
pub async fn serve(
    stats: Arc<AgentStats>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    berth_telemetry::serve_metrics(addr, shutdown, move || {
        let stats = stats.clone();
        async move { stats.render() }
    })
    .await
}
