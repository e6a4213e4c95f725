//! Stream and consumer definitions, created or updated idempotently.

use crate::BusError;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    stream::{Config, DiscardPolicy, RetentionPolicy, StorageType},
};
use berth_proto::subjects;
use std::time::Duration;

pub const CMD_STREAM: &str = "BERTH_CMD";
pub const DLQ_STREAM: &str = "BERTH_DLQ";
pub const AGENT_STREAM: &str = "BERTH_AGENT";
pub const STATUS_STREAM: &str = "BERTH_STATUS";
pub const EVENTS_STREAM: &str = "BERTH_EVENTS";

pub const CMD_CONSUMER: &str = "analyzers";
pub const STATUS_CONSUMER: &str = "status-intake";

/// How long a delivered message may go unacknowledged before it is redelivered, unless the
/// caller says otherwise. Long fits keep their message alive with progress acks.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

fn streams() -> Vec<Config> {
    vec![
        Config {
            name: CMD_STREAM.into(),
            subjects: vec![format!("{}.*", subjects::CMD_PREFIX)],
            max_messages_per_subject: 1,
            discard: DiscardPolicy::Old,
            retention: RetentionPolicy::Limits,
            allow_direct: true,
            storage: StorageType::File,
            // Bigger than the analyzer accepts, so oversized commands reach the DLQ with a
            // reason instead of failing at publish with a server error.
            max_message_size: 1 << 20,
            ..Default::default()
        },
        Config {
            name: DLQ_STREAM.into(),
            subjects: vec![format!("{}.>", subjects::DLQ_PREFIX)],
            retention: RetentionPolicy::Limits,
            max_age: Duration::from_secs(7 * 24 * 3600),
            storage: StorageType::File,
            ..Default::default()
        },
        Config {
            name: AGENT_STREAM.into(),
            subjects: vec![format!("{}.*", subjects::AGENT_PREFIX)],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            ..Default::default()
        },
        Config {
            name: STATUS_STREAM.into(),
            subjects: vec![format!("{}.*", subjects::STATUS_PREFIX)],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            ..Default::default()
        },
        Config {
            name: EVENTS_STREAM.into(),
            subjects: vec![format!("{}.*", subjects::EVENTS_PREFIX)],
            retention: RetentionPolicy::Limits,
            max_age: Duration::from_secs(24 * 3600),
            storage: StorageType::File,
            ..Default::default()
        },
    ]
}

pub(crate) async fn provision(js: &jetstream::Context) -> Result<(), BusError> {
    for config in streams() {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| BusError::Provision {
                what: format!("stream {name}"),
                source: e.into(),
            })?;
    }
    Ok(())
}

fn shared_pull(durable: &str, ack_wait: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(durable.into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait,
        deliver_policy: DeliverPolicy::All,
        max_ack_pending: 20_000,
        ..Default::default()
    }
}

async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    config: pull::Config,
) -> Result<PullConsumer, BusError> {
    let name = config.durable_name.clone().unwrap_or_default();
    js.create_consumer_on_stream(config, stream)
        .await
        .map_err(|e| BusError::Provision {
            what: format!("consumer {name} on {stream}"),
            source: e.into(),
        })
}

pub(crate) async fn command_consumer(
    js: &jetstream::Context,
    ack_wait: Duration,
) -> Result<PullConsumer, BusError> {
    consumer(js, CMD_STREAM, shared_pull(CMD_CONSUMER, ack_wait)).await
}

pub(crate) async fn status_consumer(js: &jetstream::Context) -> Result<PullConsumer, BusError> {
    consumer(
        js,
        STATUS_STREAM,
        shared_pull(STATUS_CONSUMER, DEFAULT_ACK_WAIT),
    )
    .await
}

pub(crate) async fn agent_consumer(
    js: &jetstream::Context,
    worker_id: &str,
) -> Result<PullConsumer, BusError> {
    let mut config = shared_pull(&format!("agent-{worker_id}"), DEFAULT_ACK_WAIT);
    config.filter_subject = subjects::agent_subject(worker_id)?;
    consumer(js, AGENT_STREAM, config).await
}
