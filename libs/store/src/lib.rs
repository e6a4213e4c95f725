//! berth's state in PostgreSQL: the schema, the embedded migrations, and every query, including
//! the compare-and-swap commit of a placement.
//!
//! Concurrency rules, relied on by every transaction here:
//! - A command or report for an instance first locks the instance row (`FOR UPDATE`), then
//!   touches allocations and GPUs. A placement commit does the same (its CAS update comes
//!   first). One lock order, so these never deadlock each other.
//! - Under READ COMMITTED each statement sees what committed before it started, so a
//!   statement that runs after taking the row lock sees every placement that held it before.

pub mod commands;
pub mod error;
pub mod models;
pub mod outbox;
pub mod placement;
pub mod pool;
mod prepared;
pub mod queries;
pub mod reports;
pub mod schema;
pub mod sweep;

pub use error::StoreError;
pub use models::{AllocationRow, GpuRow, InstanceRow, Transition, WorkerRow};
pub use pool::{Store, create_database, migrate};
