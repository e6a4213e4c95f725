//! Stream and consumer definitions, created or updated idempotently.

use crate::{BusError, Replicas};
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    context::{CreateStreamError, CreateStreamErrorKind},
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

/// How long provisioning waits for a cluster that has no JetStream leader yet (just
/// started, or electing one after a server was lost).
const LEADER_WAIT: Duration = Duration::from_secs(30);
/// How long a create or update waits for its answer before the stream is looked for.
const FIRST_ANSWER: Duration = Duration::from_secs(2);
/// How long a stream whose request timed out is waited for before it is asked for again.
const IN_FLIGHT: Duration = Duration::from_secs(10);

/// berth's streams, each kept on `replicas` servers.
fn streams(replicas: usize) -> Vec<Config> {
    let mut configs = vec![
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
    ];
    for c in &mut configs {
        c.num_replicas = replicas;
    }
    configs
}

/// Creates berth's streams, or updates them to this configuration, each on `replicas`
/// servers. A stream that exists with another replica count is moved to `replicas` (NATS
/// copies it over, also to a node that is down for now once it is back). When the cluster
/// cannot place that many copies (fewer servers than that), an existing stream keeps the
/// count it has, and with [`Replicas::Auto`] a new one gets a single copy, with a warning
/// each time: a replica count out of reach never keeps a process from starting. Asked for
/// explicitly, it is an error for a new stream.
pub(crate) async fn provision(
    js: &jetstream::Context,
    wanted: Replicas,
    clustered: bool,
) -> Result<(), BusError> {
    let replicas = wanted.resolve(clustered);
    // All at once: two processes that start together then meet (see `create_or_update`)
    // once, not once per stream.
    futures::future::try_join_all(
        streams(replicas)
            .into_iter()
            .map(|config| provision_stream(js, config, wanted, replicas)),
    )
    .await?;
    Ok(())
}

/// One stream of [`provision`].
async fn provision_stream(
    js: &jetstream::Context,
    config: Config,
    wanted: Replicas,
    replicas: usize,
) -> Result<(), BusError> {
    let name = config.name.clone();
    let failed = |e: CreateStreamError| BusError::Provision {
        what: format!("stream {name} (R{replicas})"),
        source: e.into(),
    };
    let Err(e) = create_or_update(js, config.clone()).await else {
        return Ok(());
    };
    let existing = match js.get_stream(&name).await {
        Ok(mut stream) => stream.info().await.ok().map(|i| i.config.num_replicas),
        Err(_) => None,
    };
    let fallback = match existing {
        Some(kept) if kept != replicas => kept,
        None if wanted == Replicas::Auto && replicas > 1 => 1,
        _ => return Err(failed(e)),
    };
    tracing::warn!(
        stream = %name,
        replicas = fallback,
        wanted = replicas,
        error = %e,
        "the cluster cannot keep that many copies of the stream; the next start tries again"
    );
    create_or_update(
        js,
        Config {
            num_replicas: fallback,
            ..config
        },
    )
    .await
    .map_err(failed)
}

/// `create_or_update_stream`, waiting (up to [`LEADER_WAIT`]) while the cluster has no
/// JetStream leader to answer.
///
/// When two processes create the same stream on a cluster at the same moment (two analyzers
/// starting), neither request is answered: both time out, and the stream is there. So a
/// request gets a short answer time ([`FIRST_ANSWER`]); on a timeout the stream is waited
/// for (it may still be on its way) rather than asked for again at once, which would race
/// with the request still in flight.
async fn create_or_update(
    js: &jetstream::Context,
    config: Config,
) -> Result<(), CreateStreamError> {
    let mut quick = js.clone();
    quick.set_timeout(FIRST_ANSWER);
    let deadline = tokio::time::Instant::now() + LEADER_WAIT;
    loop {
        match quick.create_or_update_stream(config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) if e.kind() == CreateStreamErrorKind::TimedOut => {
                let _ = tokio::time::timeout(IN_FLIGHT, arrived(js, &config)).await;
            }
            Err(e) if e.kind() == CreateStreamErrorKind::JetStreamUnavailable => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Returns once `config`'s stream exists with its replica count (a request that timed out
/// went through after all).
async fn arrived(js: &jetstream::Context, config: &Config) {
    loop {
        if let Ok(mut stream) = js.get_stream(&config.name).await
            && let Ok(info) = stream.info().await
            && info.config.num_replicas == config.num_replicas
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn every_stream_gets_the_replica_count() {
        for n in [1, 3] {
            let configs = super::streams(n);
            assert_eq!(configs.len(), 5);
            assert!(configs.iter().all(|c| c.num_replicas == n));
        }
    }
}
