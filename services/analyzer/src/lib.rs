//! berth-analyzer: pulls commands, records intent, computes placements and commits them with a
//! compare-and-swap; also applies agents' reports. Stateless: run as many as you like.

pub mod commands;
pub mod config;
pub mod context;
pub mod events;
pub mod grouped;
pub mod hooks;
pub mod intake;
pub mod intents;
pub mod metrics;
pub mod needs;
pub mod peers;
pub mod placing;
pub mod recent;
pub mod snapshot;
pub mod stats;
pub mod status;
pub mod sweeper;
pub mod watch;

pub use config::AnalyzerConfig;
pub use context::Analyzer;
pub use hooks::{Hook, Hooks};
pub use stats::{FitRecord, Stats};
