//! berth-gateway: the fleet's front door. An OpenAI-compatible API routed by model name to
//! running instances, the management API (`/api/v1`) and the dashboard (`/`).
//!
//! Stateless like the analyzers: its route table comes from PostgreSQL and follows the
//! instance events, so any number of gateways can run behind a load balancer.

mod api;
mod auth;
mod dashboard;
mod errors;
mod follow;
mod metrics;
mod openapi;
mod proxy;
mod routes;

pub use openapi::json as openapi_json;
pub use proxy::INSTANCE_HEADER;

use axum::{
    Router,
    extract::{Request, State},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use berth_bus::Bus;
use berth_store::{Store, keys::Scope};
use std::{net::SocketAddr, sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub nats_url: String,
    /// Credentials and TLS for NATS (a publisher role).
    pub nats_access: berth_bus::Access,
    pub database_url: String,
    pub listen: SocketAddr,
    /// Name in logs and NATS connection lists.
    pub name: String,
    /// Require bearer keys (`false` only with `--no-auth`).
    pub auth: bool,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// How long to wait for a model server to accept a connection.
    pub connect_timeout: Duration,
    /// How long to wait for a model server's response to begin.
    pub response_timeout: Duration,
    /// Database connections.
    pub pool_size: usize,
    /// How often the whole route table is read again (events keep it fresh in between).
    pub full_reload_every: Duration,
    /// How often API keys are read again (a revoked key stops working within this).
    pub keys_reload_every: Duration,
    /// Serve Prometheus metrics here.
    pub metrics_addr: Option<SocketAddr>,
}

impl GatewayConfig {
    pub fn new(nats_url: String, database_url: String) -> GatewayConfig {
        GatewayConfig {
            nats_url,
            nats_access: berth_bus::Access::default(),
            database_url,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            name: "gateway".into(),
            auth: true,
            max_body_bytes: 16 << 20,
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(600),
            pool_size: 8,
            full_reload_every: Duration::from_secs(10),
            keys_reload_every: Duration::from_secs(1),
            metrics_addr: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Store(#[from] berth_store::StoreError),
    #[error(transparent)]
    Bus(#[from] berth_bus::BusError),
    #[error("cannot subscribe to instance events: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct App {
    config: GatewayConfig,
    routes: Arc<routes::Routes>,
    keys: Arc<auth::Keys>,
    store: Store,
    bus: Bus,
    upstream: proxy::Upstream,
    metrics: metrics::Metrics,
    /// Cancelled when the gateway stops: endless responses (event streams) end with it.
    shutdown: CancellationToken,
}

/// A running gateway; dropping it stops it.
#[derive(Debug)]
pub struct Gateway {
    /// Where it listens (the real port when the configuration asked for port 0).
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Gateway {
    /// Connects, reads the routes and the keys, and serves until stopped.
    pub async fn start(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        let store = Store::connect(&config.database_url, config.pool_size)?;
        let bus = Bus::connect_as(&config.nats_url, &config.name, &config.nats_access).await?;
        // Subscribed before the first read: no change can fall between the two.
        let events = bus
            .client()
            .subscribe(berth_proto::subjects::ALL_EVENTS)
            .await?;
        let routes = Arc::new(routes::Routes::default());
        routes.apply(&store.routes(None).await?, true);
        let keys = Arc::new(if config.auth {
            auth::Keys::load(&store).await?
        } else {
            tracing::warn!(
                "--no-auth: anyone who reaches this gateway may use and manage the fleet"
            );
            auth::Keys::open()
        });
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| GatewayError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener
            .local_addr()
            .map_err(|source| GatewayError::Listen {
                addr: config.listen,
                source,
            })?;
        let shutdown = CancellationToken::new();
        let mut tasks = vec![
            tokio::spawn(follow::follow(
                events,
                store.clone(),
                routes.clone(),
                config.full_reload_every,
                shutdown.clone(),
            )),
            tokio::spawn(keys.clone().follow(
                store.clone(),
                config.keys_reload_every,
                shutdown.clone(),
            )),
        ];
        let app = Arc::new(App {
            upstream: proxy::upstream(config.connect_timeout),
            config,
            routes,
            keys,
            store,
            bus,
            metrics: metrics::Metrics::default(),
            shutdown: shutdown.clone(),
        });
        if let Some(maddr) = app.config.metrics_addr {
            let a = app.clone();
            let served = berth_telemetry::serve_metrics(maddr, shutdown.clone(), move || {
                let a = a.clone();
                async move { a.metrics.render(&a.routes) }
            })
            .await
            .map_err(|source| GatewayError::Listen {
                addr: maddr,
                source,
            })?;
            tasks.push(served);
        }
        let router = router(app);
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(%e, "gateway stopped serving");
            }
        }));
        tracing::info!(%addr, "gateway listening");
        Ok(Gateway {
            addr,
            shutdown,
            tasks,
        })
    }

    /// Stops serving: requests in flight finish, event streams in flight end.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn router(app: Arc<App>) -> Router {
    let inference = Router::new()
        .route("/v1/models", get(proxy::models))
        .route("/v1/chat/completions", post(proxy::forward))
        .route("/v1/completions", post(proxy::forward))
        .route("/v1/embeddings", post(proxy::forward))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            require_inference,
        ));
    let admin =
        api::router().route_layer(middleware::from_fn_with_state(app.clone(), require_admin));
    Router::new()
        .merge(inference)
        .merge(admin)
        .merge(dashboard::router())
        .route("/api/v1/openapi.json", get(openapi::document))
        // Bodies are limited where they are read (the proxy, with its own error).
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(app)
}

/// A request body of at most `limit` bytes, or the error that says why not.
pub(crate) async fn read_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, errors::ApiError> {
    use http_body_util::{BodyExt, LengthLimitError, Limited};
    Limited::new(body, limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                errors::ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    "request_too_large",
                    format!("the request body is larger than {limit} bytes"),
                )
            } else {
                errors::ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })
}

async fn require_inference(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    authorized(&app, req, next, Scope::Inference).await
}

async fn require_admin(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    authorized(&app, req, next, Scope::Admin).await
}

async fn authorized(app: &App, req: Request, next: Next, needed: Scope) -> Response {
    match app.keys.check(req.headers(), needed) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}
