//! "Which is the newest command of these instances?" for many callers at once: the calls that
//! arrive together share one multi-subject direct get (`multi_last`, NATS 2.11+) instead of a
//! request each. The answer is read by the server after every call in the group was made, so
//! it is as fresh as a direct get of each one; any doubt about it (an error, a timeout, an
//! answer that looks incomplete) falls back to one direct get per subject.

use crate::{BusError, CMD_STREAM, Source};
use async_nats::{Client, StatusCode, jetstream::stream::Stream};
use futures::StreamExt;
use std::{collections::HashMap, sync::Arc, time::Duration};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Most subjects in one request.
const MAX_GROUP: usize = 256;
/// Requests in flight at once: the next group gathers while these are answered.
const GROUPS_IN_FLIGHT: usize = 2;
/// How long a grouped answer may take before falling back to single gets.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

type Reply = oneshot::Sender<Result<Option<u64>, BusError>>;

#[derive(Clone)]
pub(crate) struct Newest {
    tx: mpsc::UnboundedSender<(String, Reply)>,
}

impl Newest {
    pub(crate) fn spawn(client: Client, stream: Stream<()>) -> Newest {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(group(client, stream, rx));
        Newest { tx }
    }

    /// The newest stored sequence on `subject`, if any.
    pub(crate) async fn seq(&self, subject: String) -> Result<Option<u64>, BusError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((subject, reply))
            .map_err(|_| BusError::request("newest command", "the lookup task has stopped"))?;
        answer
            .await
            .map_err(|_| BusError::request("newest command", "the lookup task has stopped"))?
    }
}

async fn group(
    client: Client,
    stream: Stream<()>,
    mut rx: mpsc::UnboundedReceiver<(String, Reply)>,
) {
    let slots = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT));
    while let Some((slot, batch)) = crate::grouping::next_group(&slots, &mut rx, MAX_GROUP).await {
        let (client, stream) = (client.clone(), stream.clone());
        tokio::spawn(async move {
            let mut subjects: Vec<String> = batch.iter().map(|(s, _)| s.clone()).collect();
            subjects.sort();
            subjects.dedup();
            let found = if subjects.len() == 1 {
                None
            } else {
                match tokio::time::timeout(ANSWER_WITHIN, multi_last(&client, &subjects)).await {
                    Ok(Ok(found)) => Some(found),
                    Ok(Err(e)) => {
                        tracing::debug!(%e, "grouped direct get failed; asking one by one");
                        None
                    }
                    Err(_) => None,
                }
            };
            drop(slot);
            for (subject, reply) in batch {
                let answer = match &found {
                    Some(found) => Ok(found.get(&subject).copied()),
                    None => single(&stream, &subject).await,
                };
                let _ = reply.send(answer);
            }
        });
    }
}

/// One direct get of the newest message on `subject`.
pub(crate) async fn single(stream: &Stream<()>, subject: &str) -> Result<Option<u64>, BusError> {
    match stream.direct_get_last_for_subject(subject).await {
        Ok(msg) => Ok(Some(msg.sequence)),
        Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
            Ok(None)
        }
        Err(e) => Err(BusError::request("newest command", e)),
    }
}

/// The newest sequence of each of `subjects` that has a message, in one request: the server
/// sends one message per subject found, then an end-of-batch status (204), or 404 when none
/// has a message.
async fn multi_last(
    client: &Client,
    subjects: &[String],
) -> Result<HashMap<String, u64>, BusError> {
    let request = |e: Source| BusError::request("newest commands", e);
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| request(e.into()))?;
    let body = serde_json::json!({ "multi_last": subjects, "batch": subjects.len() });
    client
        .publish_with_reply(
            format!("$JS.API.DIRECT.GET.{CMD_STREAM}"),
            inbox,
            body.to_string().into(),
        )
        .await
        .map_err(|e| request(e.into()))?;
    let mut found = HashMap::new();
    while let Some(msg) = answers.next().await {
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        match msg.status {
            None => {
                let (Some(subject), Some(seq)) = (header("Nats-Subject"), header("Nats-Sequence"))
                else {
                    return Err(request("an answer without subject or sequence".into()));
                };
                let seq = seq.parse::<u64>().map_err(|e| request(e.into()))?;
                found.insert(subject, seq);
            }
            Some(StatusCode::NOT_FOUND) => return Ok(found),
            // End of batch: complete only when nothing was left unsent.
            Some(code) if code.as_u16() == 204 => {
                return match header("Nats-Num-Pending").as_deref() {
                    Some("0") | None => Ok(found),
                    Some(n) => Err(request(format!("{n} answers left unsent").into())),
                };
            }
            Some(code) => {
                return Err(request(
                    format!(
                        "status {code}: {}",
                        msg.description.as_deref().unwrap_or("")
                    )
                    .into(),
                ));
            }
        }
    }
    Err(request("the answer ended early".into()))
}
