//! Errors of the bus, keeping async-nats' own errors as their sources and saying which are
//! worth retrying.

use async_nats::jetstream::{self, context::PublishErrorKind};

/// Any error a NATS request can end with, boxed to keep its type for `source()`.
pub type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    #[error("bad NATS URL list {urls:?}: {detail}")]
    Url { urls: String, detail: String },
    #[error("NATS credentials {path}: {detail}")]
    Credentials {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("cannot set up {what}: {source}")]
    Provision {
        what: String,
        #[source]
        source: Source,
    },
    #[error("publish to {subject} failed: {source}")]
    Publish {
        subject: String,
        #[source]
        source: jetstream::context::PublishError,
    },
    #[error("a newer command exists for this instance")]
    Superseded,
    #[error("JetStream request failed ({what}): {source}")]
    Request {
        what: &'static str,
        #[source]
        source: Source,
    },
    #[error(transparent)]
    InvalidId(#[from] berth_proto::InvalidId),
    #[error(transparent)]
    Codec(#[from] berth_proto::CodecError),
}

impl BusError {
    pub(crate) fn publish(
        subject: impl Into<String>,
        source: jetstream::context::PublishError,
    ) -> Self {
        BusError::Publish {
            subject: subject.into(),
            source,
        }
    }

    /// A failed request to the server, with what was asked.
    pub fn request(what: &'static str, source: impl Into<Source>) -> Self {
        BusError::Request {
            what,
            source: source.into(),
        }
    }

    /// Errors worth retrying: the server may be restarting, a leader moving, a stream not
    /// yet provisioned, or the client out of ack slots. Not worth it: a message the server
    /// will never take (too large, refused by a permission or a limit: JetStream's 4xx
    /// answers), a newer command, a bad id or an undecodable message.
    pub fn is_transient(&self) -> bool {
        match self {
            BusError::Connect { .. } | BusError::Provision { .. } | BusError::Request { .. } => {
                true
            }
            BusError::Publish { source, .. } => match source.kind() {
                PublishErrorKind::TimedOut
                | PublishErrorKind::BrokenPipe
                | PublishErrorKind::MaxAckPending
                | PublishErrorKind::StreamNotFound => true,
                PublishErrorKind::MaxPayloadExceeded
                | PublishErrorKind::WrongLastMessageId
                | PublishErrorKind::WrongLastSequence => false,
                PublishErrorKind::Other => !refused_by_server(source),
            },
            BusError::Superseded
            | BusError::InvalidId(_)
            | BusError::Codec(_)
            | BusError::Credentials { .. }
            | BusError::Url { .. } => false,
        }
    }
}

/// Whether JetStream answered with an error of the request itself (a 4xx status: a
/// permission, a limit, a message it will not store) rather than of its own availability.
fn refused_by_server(e: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<jetstream::Error>())
        .is_some_and(|api| (400..500).contains(&api.code()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetstream::context::PublishError;

    #[test]
    fn refusals_are_permanent_and_outages_transient() {
        let publish = |e: PublishError| BusError::publish("berth.status.w1", e);
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::MaxAckPending,
            PublishErrorKind::StreamNotFound,
            PublishErrorKind::Other,
        ] {
            assert!(publish(PublishError::new(kind)).is_transient(), "{kind:?}");
        }
        for kind in [
            PublishErrorKind::MaxPayloadExceeded,
            PublishErrorKind::WrongLastSequence,
        ] {
            assert!(!publish(PublishError::new(kind)).is_transient(), "{kind:?}");
        }
        let api = |code: u16| -> jetstream::Error {
            serde_json::from_value(serde_json::json!({"code": code, "err_code": 10054}))
                .expect("an API error")
        };
        let refused = PublishError::with_source(PublishErrorKind::Other, api(400));
        assert!(!publish(refused).is_transient());
        let unavailable = PublishError::with_source(PublishErrorKind::Other, api(503));
        assert!(publish(unavailable).is_transient());
        let e = publish(PublishError::new(PublishErrorKind::TimedOut));
        assert!(e.to_string().contains("berth.status.w1"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }
}
