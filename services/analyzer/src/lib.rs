//! berth-analyzer: pulls commands, records intent, computes placements and commits them with a
//! compare-and-swap; also applies agents' reports. Stateless: run as many as you like.

mod agent_link;
mod commands;
mod config;
mod context;
mod events;
mod grouped;
mod hooks;
mod in_flight;
mod in_order;
mod intake;
mod intents;
mod metrics;
mod needs;
mod peers;
mod placing;
mod recent;
mod snapshot;
mod stats;
mod status;
mod store_health;
mod sweeper;
mod watch;

pub use config::AnalyzerConfig;
pub use context::Analyzer;
#[cfg(feature = "testing")]
pub use hooks::Hook;
pub use hooks::Hooks;
pub use peers::Peers;
pub use snapshot::Snapshot;
pub use stats::Stats;
#[cfg(feature = "testing")]
pub use stats::{FitRecord, Samples};
