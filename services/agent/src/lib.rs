//! berth-agent: reports a worker's GPUs (NVML, or simulated from a TOML inventory), sends
//! heartbeats, and runs the instances placed on its worker.

pub mod inventory;
pub mod metrics;
pub mod nvml;
pub mod runner;

pub use inventory::{Inventory, InventoryError, Usage, WorkerSpec};
pub use metrics::AgentStats;
pub use runner::{Agent, AgentConfig};
