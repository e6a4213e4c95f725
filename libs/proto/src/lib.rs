//! Wire types shared by every berth process: commands, agent assignments, status reports
//! and events, their subjects, and the MessagePack encoding.
//!
//! Every message is a MessagePack map (field names included), so clients in any language can
//! publish with a plain map and fields can be added without breaking older readers: unknown
//! fields are ignored and optional ones default.

pub mod agent;
pub mod codec;
pub mod command;
pub mod event;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod ids;
pub mod lifecycle;
pub mod logs;
pub mod rpc;
pub mod size;
pub mod state;
pub mod status;
pub mod subjects;
pub mod text;

pub use agent::AgentMsg;
pub use codec::{CodecError, decode, encode};
pub use command::{Command, CommandError, StartSpec, StopSpec};
pub use event::InstanceEvent;
pub use ids::{CmdSeq, Version};
pub use state::InstanceState;
pub use status::{GpuInfo, GpuUsage, StatusMsg};
pub use subjects::InvalidId;
