#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {0}")]
    Connect(String),
    #[error("cannot set up JetStream streams: {0}")]
    Provision(String),
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("a newer command exists for this instance")]
    Superseded,
    #[error("JetStream request failed: {0}")]
    Request(String),
    #[error(transparent)]
    InvalidId(#[from] berth_proto::InvalidId),
    #[error(transparent)]
    Codec(#[from] berth_proto::CodecError),
}

impl BusError {
    /// Errors worth retrying: the server may be restarting or a leader moving.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            BusError::Publish(_) | BusError::Request(_) | BusError::Provision(_)
        )
    }
}
