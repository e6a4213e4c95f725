//! Settings of one analyzer process.

use berth_fit::Policy;

#[derive(Debug, Clone)]
pub struct AnalyzerConfig {
    pub nats_url: String,
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
}

impl AnalyzerConfig {
    pub fn new(nats_url: impl Into<String>, database_url: impl Into<String>) -> Self {
        AnalyzerConfig {
            nats_url: nats_url.into(),
            database_url: database_url.into(),
            name: "analyzer".into(),
            concurrency: 32,
            pool_size: 8,
            policy: Policy::Binpack,
            max_refits: 8,
        }
    }
}
