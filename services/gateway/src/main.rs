//! berth-gateway: the OpenAI-compatible front door, the management API and the dashboard.
//! Stateless: run as many as you like behind a load balancer.

use anyhow::Context;
use berth_gateway::{Gateway, GatewayConfig};
use clap::Parser;
use std::{net::SocketAddr, time::Duration};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "berth gateway: OpenAI-compatible API, management API, dashboard"
)]
struct Args {
    /// NATS server URL(s), comma separated.
    #[arg(long, env = "BERTH_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// PostgreSQL URL.
    #[arg(long, env = "BERTH_DATABASE_URL", required_unless_present = "openapi")]
    database_url: Option<String>,
    /// Address to serve on.
    #[arg(long, env = "BERTH_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Name in logs and NATS connection lists.
    #[arg(long, env = "BERTH_GATEWAY_NAME", default_value = "gateway")]
    name: String,
    /// Serve without API keys: anyone who can reach the gateway may use and manage the fleet.
    #[arg(long)]
    no_auth: bool,
    /// Largest request body accepted on /v1, in bytes.
    #[arg(long, env = "BERTH_GATEWAY_MAX_BODY", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(1024..=1 << 30))]
    max_body_bytes: u64,
    /// How long to wait for a model server to accept a connection.
    #[arg(long, env = "BERTH_GATEWAY_CONNECT_TIMEOUT", default_value = "5s", value_parser = berth_telemetry::args::duration)]
    connect_timeout: Duration,
    /// How long to wait for a model server's response to begin.
    #[arg(long, env = "BERTH_GATEWAY_RESPONSE_TIMEOUT", default_value = "10m", value_parser = berth_telemetry::args::duration)]
    response_timeout: Duration,
    /// Database connections.
    #[arg(long, env = "BERTH_GATEWAY_POOL", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pool_size: u32,
    /// Serve Prometheus metrics at http://ADDR/metrics ("off" to disable).
    #[arg(long, env = "BERTH_METRICS_ADDR", default_value = "127.0.0.1:9103", value_parser = berth_telemetry::args::metrics_addr)]
    metrics_addr: berth_telemetry::args::MetricsAddr,
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    openapi: bool,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "BERTH_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.openapi {
        println!("{}", berth_gateway::openapi_json());
        return Ok(());
    }
    berth_telemetry::init_tracing(args.log_json, "info");
    let database_url = args
        .database_url
        .context("--database-url (or BERTH_DATABASE_URL) is required")?;
    let mut config = GatewayConfig::new(args.nats_url, database_url);
    config.listen = args.listen;
    config.name = args.name;
    config.auth = !args.no_auth;
    config.max_body_bytes = usize::try_from(args.max_body_bytes).unwrap_or(usize::MAX);
    config.connect_timeout = args.connect_timeout;
    config.response_timeout = args.response_timeout;
    config.pool_size = args.pool_size as usize;
    config.metrics_addr = args.metrics_addr.0;
    let gateway = Gateway::start(config)
        .await
        .context("starting the gateway")?;
    println!("berth-gateway listening on http://{}", gateway.addr);
    berth_telemetry::shutdown_signal().await?;
    tracing::info!("stopping");
    gateway.stop().await;
    Ok(())
}
