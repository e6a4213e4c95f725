//! berth-agent: reports a worker's GPUs (NVML, or simulated from a TOML inventory), sends
//! heartbeats, and runs the instances placed on its worker: simulated (an instance is
//! `running` once assigned), or as model server processes ([`supervisor`], [`backend`]).

pub mod backend;
pub mod inventory;
pub mod logs_service;
pub mod metrics;
pub mod nvml;
mod replier;
pub mod rpc_service;
pub mod runner;
pub mod supervisor;

pub use inventory::{Inventory, InventoryError, Usage, WorkerSpec};
pub use metrics::AgentStats;
pub use runner::{Agent, AgentConfig, Runtime, StartError};
pub use supervisor::{ProcessConfig, Supervisor};
