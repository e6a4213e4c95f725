//! `/metrics` in Prometheus text format: the counters, the fit-duration histogram, instances
//! by state and the command consumer's backlog, the last two read at scrape time.

use crate::context::Ctx;
use berth_proto::InstanceState;
use std::{fmt::Write, net::SocketAddr, sync::Arc};
use tokio_util::sync::CancellationToken;

/// Serves `/metrics` until `shutdown`. Binding errors are returned at once.
pub async fn serve(
    ctx: Arc<Ctx>,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    berth_telemetry::serve_metrics(addr, shutdown, move || metrics(ctx.clone())).await
}

async fn metrics(ctx: Arc<Ctx>) -> String {
    let mut out = ctx.stats.render();
    // Drop the exposition's terminator; more families follow.
    if let Some(stripped) = out.strip_suffix("# EOF\n") {
        out = stripped.to_owned();
    }
    match ctx.store.count_by_state().await {
        Ok(counts) => {
            let _ = writeln!(
                out,
                "# HELP berth_instances Instances by state, from PostgreSQL."
            );
            let _ = writeln!(out, "# TYPE berth_instances gauge");
            for state in InstanceState::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == state.as_str())
                    .map_or(0, |(_, n)| *n);
                let _ = writeln!(out, "berth_instances{{state=\"{state}\"}} {n}");
            }
        }
        Err(e) => tracing::warn!(%e, "metrics: cannot count instances"),
    }
    if let Some((pending, in_flight)) = ctx.backlog().await {
        let _ = writeln!(
            out,
            "# HELP berth_commands_backlog Commands not yet delivered to any analyzer."
        );
        let _ = writeln!(out, "# TYPE berth_commands_backlog gauge");
        let _ = writeln!(out, "berth_commands_backlog {pending}");
        let _ = writeln!(
            out,
            "# HELP berth_commands_in_flight Commands delivered and not yet acknowledged."
        );
        let _ = writeln!(out, "# TYPE berth_commands_in_flight gauge");
        let _ = writeln!(out, "berth_commands_in_flight {in_flight}");
    }
    let _ = writeln!(
        out,
        "# HELP berth_analyzers_alive Analyzers this one hears, itself included: the workers are dealt out among them."
    );
    let _ = writeln!(out, "# TYPE berth_analyzers_alive gauge");
    let _ = writeln!(out, "berth_analyzers_alive {}", ctx.peers.alive());
    out.push_str("# EOF\n");
    out
}
