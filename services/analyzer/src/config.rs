//! Settings of one analyzer process.

use berth_fit::Policy;
use std::{net::SocketAddr, time::Duration};

#[derive(Debug, Clone)]
pub struct AnalyzerConfig {
    pub nats_url: String,
    /// Credentials and TLS for NATS (the analyzer role).
    pub nats_access: berth_bus::Access,
    pub database_url: String,
    /// Appears in logs and in the NATS connection name.
    pub name: String,
    /// Commands handled at once by this analyzer.
    pub concurrency: usize,
    /// Database connections in the pool.
    pub pool_size: usize,
    pub policy: Policy,
    /// Fits retried after losing a GPU to another analyzer before giving up as `pending`.
    pub max_refits: u32,
    /// A placement still unsettled after this long is abandoned and the instance marked
    /// `error` with the reason.
    pub fit_timeout: Duration,
    /// How long a command may sit unacknowledged with an analyzer (that may have died)
    /// before JetStream hands it to another. All analyzers must agree.
    pub ack_wait: Duration,
    /// How often the in-memory view of free VRAM reads what changed in the database.
    pub refresh_every: Duration,
    /// How often it reloads every worker and GPU instead, with the replica counts: the
    /// replicas other analyzers placed or released show only then (spread's preference).
    pub full_refresh_every: Duration,
    /// How often the sweeper looks for pending, stuck and orphaned instances.
    pub sweep_every: Duration,
    /// An instance `analyzing`, `scheduled` or `stopping` longer than this is handled again.
    pub stuck_after: Duration,
    /// A worker without heartbeats this long is no longer chosen.
    pub unreachable_after: Duration,
    /// How often this analyzer tells the others it is alive (for the lanes, see `peers`);
    /// one silent for three times this long is taken for gone. All analyzers must agree.
    pub heartbeat_every: Duration,
    /// Where to serve `/metrics`; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// A worker without heartbeats this long loses its instances: they are placed elsewhere.
    pub gone_after: Duration,
    /// Where the model files a start names may be read from. None (the default) refuses
    /// every model path, with a reason that names `--model-root`.
    pub model_roots: berth_models::ModelRoots,
    /// A model's headers not read within this long end the start in `error`.
    pub model_read_timeout: Duration,
}

impl AnalyzerConfig {
    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        AnalyzerConfig {
            nats_url: nats_url.into(),
            nats_access: berth_bus::Access::default(),
            database_url: database_url.into(),
            name: "analyzer".into(),
            concurrency: 32,
            pool_size: 8,
            policy: Policy::Binpack,
            max_refits: 8,
            fit_timeout: Duration::from_secs(20),
            ack_wait: berth_bus::DEFAULT_ACK_WAIT,
            metrics_addr: None,
            sweep_every: Duration::from_secs(5),
            refresh_every: Duration::from_secs(1),
            full_refresh_every: Duration::from_secs(30),
            stuck_after: Duration::from_secs(60),
            unreachable_after: Duration::from_secs(15),
            gone_after: Duration::from_secs(60),
            heartbeat_every: Duration::from_millis(500),
            model_roots: berth_models::ModelRoots::none(),
            model_read_timeout: Duration::from_secs(10),
        }
    }
}
