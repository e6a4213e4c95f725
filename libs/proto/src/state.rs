//! The lifecycle of an instance, as stored and as published in events.

use serde::{Deserialize, Serialize};
use std::{fmt, str::FromStr};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// A start was accepted; the fit runs.
    Analyzing,
    /// Nothing fits now; `reason` says what was short. Re-evaluated when capacity appears.
    Pending,
    /// GPUs reserved and the assignment sent to the worker's agent.
    Scheduled,
    /// The agent is starting the backend.
    Starting,
    Running,
    /// A stop was accepted; the agent is stopping the backend. GPUs stay reserved meanwhile.
    Stopping,
    Stopped,
    /// The latest command could not be applied (bad input, backend failure); see `reason`.
    Error,
}

impl InstanceState {
    pub const ALL: [InstanceState; 8] = [
        Self::Analyzing,
        Self::Pending,
        Self::Scheduled,
        Self::Starting,
        Self::Running,
        Self::Stopping,
        Self::Stopped,
        Self::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Analyzing => "analyzing",
            Self::Pending => "pending",
            Self::Scheduled => "scheduled",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Error => "error",
        }
    }

    /// True for the states an instance rests in until a new command arrives.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Running | Self::Pending | Self::Stopped | Self::Error
        )
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown instance state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for InstanceState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_strings() {
        for st in InstanceState::ALL {
            assert_eq!(st.as_str().parse::<InstanceState>().unwrap(), st);
        }
        assert!("Running".parse::<InstanceState>().is_err());
    }
}
