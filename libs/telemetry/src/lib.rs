//! Logs and metrics plumbing shared by the berth processes.

pub mod args;

use axum::{Router, routing::get};
use std::{future::Future, net::SocketAddr};
use tokio_util::sync::CancellationToken;

/// Logs to stderr, as text or JSON lines; `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Resolves at the first Ctrl-C (SIGINT) or SIGTERM: what a terminal, `berth up`, systemd or
/// Kubernetes send to stop a process, each answered with a clean shutdown.
pub async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r,
        _ = term.recv() => Ok(()),
    }
}

/// Serves `GET /metrics` with whatever `render` returns (Prometheus text) until `shutdown`.
/// Binding errors are returned at once.
pub async fn serve_metrics<F, Fut>(
    addr: SocketAddr,
    shutdown: CancellationToken,
    render: F,
) -> std::io::Result<tokio::task::JoinHandle<()>>
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = String> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics at http://{addr}/metrics");
    let app = Router::new().route("/metrics", get(render));
    Ok(tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(%e, "metrics server stopped");
        }
    }))
}
