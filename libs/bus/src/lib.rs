//! berth's JetStream topology and the helpers every process uses to publish and consume.
//!
//! Streams (all created idempotently by [`Bus::connect`]):
//! - `BERTH_CMD`: `berth.cmd.instance.*`, one message per subject (the newest evicts the
//!   older), so it always holds each instance's latest intent; direct get enabled so an
//!   analyzer can ask "is there a newer command?" cheaply.
//! - `BERTH_DLQ`: `berth.dlq.cmd.>`, undecodable or invalid commands with the reason.
//! - `BERTH_AGENT`: `berth.agent.*`, assignments, one work-queue consumer per worker.
//! - `BERTH_STATUS`: `berth.status.*`, agent reports, one work-queue consumer shared by the
//!   analyzers.
//! - `BERTH_EVENTS`: `berth.events.instance.*`, state changes, kept for a day.

mod access;
pub mod auth;
mod error;
pub mod grouping;
mod newest;
pub mod settle;
mod topology;

pub use access::{Access, CLUSTER_REPLICAS, NatsArgs, Replicas, server_addrs};
pub use error::{BusError, Source};
pub use topology::{
    AGENT_STREAM, CMD_CONSUMER, CMD_STREAM, DEFAULT_ACK_WAIT, DLQ_STREAM, EVENTS_STREAM,
    STATUS_CONSUMER, STATUS_STREAM,
};

use async_nats::{
    ConnectErrorKind, HeaderMap,
    jetstream::{self, consumer::PullConsumer, stream::Stream},
};
use berth_proto::{AgentMsg, CmdSeq, Command, InstanceEvent, StatusMsg, subjects};
use bytes::Bytes;
use std::time::Duration;

/// Header of a dead letter: why it was rejected.
pub const DLQ_REASON: &str = "Berth-Reason";
/// Header of a dead letter: the subject it was published to.
pub const DLQ_SUBJECT: &str = "Berth-Subject";
/// Header of a dead letter: its sequence in `BERTH_CMD`.
pub const DLQ_SEQ: &str = "Berth-Seq";
/// Header of a dead letter whose body was cut to [`DLQ_MAX_BODY`]: the original length.
pub const DLQ_ORIGINAL_BYTES: &str = "Berth-Original-Bytes";
/// Most bytes of a rejected command kept in its dead letter: as large as a valid command may
/// be, so a copy of anything larger (up to the server's payload limit) still fits with its
/// headers, and the reason is never lost to a copy that cannot be stored.
pub const DLQ_MAX_BODY: usize = berth_proto::command::MAX_COMMAND_BYTES;

/// How often the server says a pull is alive while it has nothing to deliver. A pull whose
/// server went away (a lost NATS node, a stream leader that moved) is noticed after two
/// missed heartbeats and made again on another node: this bounds how long a consumer
/// stalls at a node loss.
pub const PULL_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long one pull request lives on the server before it is renewed.
pub const PULL_EXPIRES: std::time::Duration = std::time::Duration::from_secs(10);

/// A continuous pull from `consumer` of at most `batch` messages at a time, with
/// [`PULL_HEARTBEAT`] and [`PULL_EXPIRES`].
pub async fn pull(
    consumer: &jetstream::consumer::PullConsumer,
    batch: usize,
) -> Result<jetstream::consumer::pull::Stream, jetstream::consumer::StreamError> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .heartbeat(PULL_HEARTBEAT)
        .expires(PULL_EXPIRES)
        .messages()
        .await
}

/// JetStream's answer to an event sent with [`Bus::send_event`].
pub type EventAck = std::pin::Pin<Box<dyn Future<Output = Result<(), BusError>> + Send>>;

/// A connection to NATS with the berth streams provisioned.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    cmd_stream: Stream<()>,
    newest: newest::Newest,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

/// Whether a failed first connection will fail the same way every time: credentials the
/// server refuses, a TLS setup or a server certificate that cannot be trusted, a bad URL.
fn refused_for_good(e: &async_nats::ConnectError) -> bool {
    let tls = {
        let text = format!("{e} {:?}", std::error::Error::source(e)).to_lowercase();
        text.contains("certificate") || text.contains("tls")
    };
    tls || matches!(
        e.kind(),
        ConnectErrorKind::AuthorizationViolation
            | ConnectErrorKind::Authentication
            | ConnectErrorKind::Tls
            | ConnectErrorKind::ServerParse
    )
}

impl Bus {
    /// Connects without credentials (retrying until the server answers, and reconnecting
    /// forever after) and makes sure every stream exists with berth's configuration.
    pub async fn connect(url: &str, name: &str) -> Result<Bus, BusError> {
        Bus::connect_as(url, name, &Access::default()).await
    }

    /// Connects with `access`'s credentials and TLS; sets the streams up if it says so.
    /// `url` may list several servers of a cluster, comma separated: the client connects to
    /// one of them and, when that one goes away, to another (also to those the cluster
    /// advertises).
    pub async fn connect_as(url: &str, name: &str, access: &Access) -> Result<Bus, BusError> {
        // Boxed: connecting holds several option sets and handshakes, which would otherwise
        // make every caller's future that much larger.
        Box::pin(Bus::connect_inner(url, name, access)).await
    }

    async fn connect_inner(url: &str, name: &str, access: &Access) -> Result<Bus, BusError> {
        let refused = |source| BusError::Connect {
            url: url.to_owned(),
            source,
        };
        let servers = server_addrs(url)?;
        // One attempt first: credentials or TLS the server refuses are an error at once,
        // not a retry forever. A server not up yet is waited for.
        let client = match access
            .connect_options(name)
            .await?
            .connect(servers.clone())
            .await
        {
            Ok(client) => client,
            Err(e) if refused_for_good(&e) => return Err(refused(e)),
            Err(_) => access
                .connect_options(name)
                .await?
                .retry_on_initial_connect()
                .connect(servers)
                .await
                .map_err(refused)?,
        };
        let js = jetstream::new(client.clone());
        if access.provision {
            let clustered = client.server_info().cluster.is_some();
            topology::provision(&js, access.replicas, clustered).await?;
        }
        let cmd_stream =
            js.get_stream_no_info(CMD_STREAM)
                .await
                .map_err(|e| BusError::Provision {
                    what: format!("stream {CMD_STREAM}"),
                    source: e.into(),
                })?;
        let newest = newest::Newest::spawn(client.clone(), cmd_stream.clone());
        Ok(Bus {
            client,
            js,
            cmd_stream,
            newest,
        })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// The analyzers' shared durable consumer of commands.
    /// `ack_wait` is how soon a command held by a dead analyzer goes to another one; every
    /// analyzer must use the same value (the last one to start sets it).
    pub async fn command_consumer(&self, ack_wait: Duration) -> Result<PullConsumer, BusError> {
        topology::command_consumer(&self.js, ack_wait).await
    }

    /// The analyzers' shared durable consumer of agent reports.
    pub async fn status_consumer(&self) -> Result<PullConsumer, BusError> {
        topology::status_consumer(&self.js).await
    }

    /// One worker's durable consumer of assignments.
    pub async fn agent_consumer(&self, worker_id: &str) -> Result<PullConsumer, BusError> {
        topology::agent_consumer(&self.js, worker_id).await
    }

    /// The newest stored command for `instance_id`: its sequence and payload.
    pub async fn last_command(
        &self,
        instance_id: &str,
    ) -> Result<Option<(CmdSeq, Bytes)>, BusError> {
        let subject = subjects::cmd_subject(instance_id)?;
        match self.cmd_stream.direct_get_last_for_subject(subject).await {
            Ok(msg) => Ok(Some((CmdSeq::new(msg.sequence), msg.payload))),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(BusError::request("newest command", e)),
        }
    }

    /// The state changes of `instance_id` still kept in `BERTH_EVENTS` (a day), oldest first,
    /// at most `limit`.
    pub async fn history(
        &self,
        instance_id: &str,
        limit: usize,
    ) -> Result<Vec<InstanceEvent>, BusError> {
        use futures::StreamExt;
        let request = |e: Source| BusError::request("instance history", e);
        let stream = self
            .js
            .get_stream(EVENTS_STREAM)
            .await
            .map_err(|e| request(e.into()))?;
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                filter_subject: subjects::event_subject(instance_id)?,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|e| request(e.into()))?;
        let mut batch = consumer
            .fetch()
            .max_messages(limit)
            .messages()
            .await
            .map_err(|e| request(e.into()))?;
        let mut out = Vec::new();
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(&request)?;
            if let Ok(ev) = berth_proto::decode::<InstanceEvent>(&msg.payload) {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// The newest dead letter of `instance_id`, with its reason, if any is kept.
    pub async fn last_dead_letter(
        &self,
        instance_id: &str,
    ) -> Result<Option<(CmdSeq, String)>, BusError> {
        let stream = self
            .js
            .get_stream(DLQ_STREAM)
            .await
            .map_err(|e| BusError::request("dead letters", e))?;
        match stream
            .get_last_raw_message_by_subject(&subjects::dlq_subject(Some(instance_id)))
            .await
        {
            Ok(msg) => {
                let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_owned());
                let seq = CmdSeq::new(header(DLQ_SEQ).and_then(|s| s.parse().ok()).unwrap_or(0));
                Ok(Some((seq, header(DLQ_REASON).unwrap_or_default())))
            }
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(BusError::request("last dead letter", e)),
        }
    }

    /// Publishes a command and waits for JetStream to store it; returns its sequence.
    pub async fn publish_command(
        &self,
        instance_id: &str,
        cmd: &Command,
    ) -> Result<CmdSeq, BusError> {
        let payload = cmd.encode()?;
        self.publish_raw_command(instance_id, payload.into(), None)
            .await
    }

    /// Publishes raw command bytes (any client could); `expected_last` makes JetStream refuse
    /// the message if the subject's newest sequence is not that one, so a republish can never
    /// override a newer user command (that refusal is [`BusError::Superseded`]).
    pub async fn publish_raw_command(
        &self,
        instance_id: &str,
        payload: Bytes,
        expected_last: Option<CmdSeq>,
    ) -> Result<CmdSeq, BusError> {
        let subject = subjects::cmd_subject(instance_id)?;
        let mut headers = HeaderMap::new();
        if let Some(seq) = expected_last {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                seq.to_string().as_str(),
            );
        }
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| BusError::publish(&subject, e))?
            .await;
        match ack {
            Ok(ack) => Ok(CmdSeq::new(ack.sequence)),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Err(BusError::Superseded)
            }
            Err(e) => Err(BusError::publish(subject, e)),
        }
    }

    /// Publishes the instance's newest command again, as a new message, if it is still the
    /// newest (`seq`). Used to re-evaluate pending instances; returns the new sequence, or
    /// `None` when a newer command exists (which will be handled anyway).
    pub async fn republish_command(
        &self,
        instance_id: &str,
        seq: CmdSeq,
    ) -> Result<Option<CmdSeq>, BusError> {
        let Some((last, payload)) = self.last_command(instance_id).await? else {
            return Ok(None);
        };
        if last != seq {
            return Ok(None);
        }
        match self
            .publish_raw_command(instance_id, payload, Some(seq))
            .await
        {
            Ok(new_seq) => Ok(Some(new_seq)),
            Err(BusError::Superseded) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The sequence of the newest command for `instance_id`, if any, as stored when the
    /// call was made or later. Calls made at the same moment share one multi-subject direct
    /// get.
    pub async fn last_command_seq(&self, instance_id: &str) -> Result<Option<CmdSeq>, BusError> {
        let seq = self.newest.seq(subjects::cmd_subject(instance_id)?).await?;
        Ok(seq.map(CmdSeq::new))
    }

    /// The same as [`Bus::last_command_seq`] in a request of its own, for the rare lookup
    /// that must not wait behind a group (the cancellation watch).
    pub async fn last_command_seq_alone(
        &self,
        instance_id: &str,
    ) -> Result<Option<CmdSeq>, BusError> {
        let seq = newest::single(&self.cmd_stream, &subjects::cmd_subject(instance_id)?).await?;
        Ok(seq.map(CmdSeq::new))
    }

    /// Stores a rejected command with its reason, original subject and sequence.
    pub async fn dead_letter(
        &self,
        instance_id: Option<&str>,
        original_subject: &str,
        seq: CmdSeq,
        payload: Bytes,
        reason: &str,
    ) -> Result<(), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(DLQ_REASON, sanitize_header(reason).as_str());
        headers.insert(DLQ_SUBJECT, sanitize_header(original_subject).as_str());
        headers.insert(DLQ_SEQ, seq.to_string().as_str());
        let payload = if payload.len() > DLQ_MAX_BODY {
            headers.insert(DLQ_ORIGINAL_BYTES, payload.len().to_string().as_str());
            payload.slice(..DLQ_MAX_BODY)
        } else {
            payload
        };
        let subject = subjects::dlq_subject(instance_id);
        self.js
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| BusError::publish(&subject, e))?
            .await
            .map_err(|e| BusError::publish(subject, e))?;
        Ok(())
    }

    /// Sends an assignment to a worker's agent and waits until JetStream stored it.
    pub async fn publish_agent(&self, worker_id: &str, msg: &AgentMsg) -> Result<(), BusError> {
        self.publish_durable(
            subjects::agent_subject(worker_id)?,
            berth_proto::encode(msg)?,
        )
        .await
    }

    /// Sends an agent report and waits until JetStream stored it.
    pub async fn publish_status(&self, worker_id: &str, msg: &StatusMsg) -> Result<(), BusError> {
        self.publish_durable(
            subjects::status_subject(worker_id)?,
            berth_proto::encode(msg)?,
        )
        .await
    }

    /// Sends a state-change event with its deduplication id and returns without waiting for
    /// JetStream to store it; the returned future resolves with the store's answer. Events
    /// of one connection are stored in the order they were sent; a second copy with the same
    /// `msg_id` within the stream's duplicate window (2 minutes) is dropped by the server.
    pub async fn send_event(
        &self,
        event: &InstanceEvent,
        msg_id: &str,
    ) -> Result<EventAck, BusError> {
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(berth_proto::encode(event)?.into())
            .message_id(msg_id);
        let subject = subjects::event_subject(&event.instance_id)?;
        let ack = self
            .js
            .send_publish(subject.clone(), message)
            .await
            .map_err(|e| BusError::publish(&subject, e))?;
        Ok(Box::pin(async move {
            ack.await
                .map(drop)
                .map_err(|e| BusError::publish(subject, e))
        }))
    }

    async fn publish_durable(&self, subject: String, payload: Vec<u8>) -> Result<(), BusError> {
        self.js
            .publish(subject.clone(), payload.into())
            .await
            .map_err(|e| BusError::publish(&subject, e))?
            .await
            .map_err(|e| BusError::publish(subject, e))?;
        Ok(())
    }
}

/// Header values cannot hold line breaks; keep reasons on one line and bounded.
fn sanitize_header(value: &str) -> String {
    let one_line: String = value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    one_line.chars().take(1024).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_values_stay_on_one_line() {
        assert_eq!(super::sanitize_header("a\r\nb"), "a  b");
        assert_eq!(super::sanitize_header(&"x".repeat(5000)).len(), 1024);
    }
}
