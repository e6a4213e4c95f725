//! The core NATS services of an agent (`berth.logs.<worker>`, `berth.rpc.<worker>`): one
//! subscription, each request decoded, answered and replied to in MessagePack.

use berth_bus::BusError;
use futures::StreamExt;
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::sync::CancellationToken;

/// Subscribes to `subject` now (so no request sent after this returns is missed) and, until
/// `shutdown`, answers each request with `answer` (or `refused` with why, for a request that
/// does not decode).
pub async fn serve<Req, Rep, Fut, Answer, Refused>(
    client: async_nats::Client,
    subject: String,
    shutdown: CancellationToken,
    answer: Answer,
    refused: Refused,
) -> Result<impl Future<Output = ()> + use<Req, Rep, Fut, Answer, Refused>, BusError>
where
    Req: DeserializeOwned + Send,
    Rep: Serialize + Send,
    Fut: Future<Output = Rep> + Send,
    Answer: Fn(Req) -> Fut + Send + 'static,
    Refused: Fn(String) -> Rep + Send + 'static,
{
    let mut requests = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| BusError::request("agent service subscription", e))?;
    Ok(async move {
        loop {
            let msg = tokio::select! {
                () = shutdown.cancelled() => return,
                msg = requests.next() => match msg {
                    Some(msg) => msg,
                    None => return,
                },
            };
            let Some(reply_to) = msg.reply else {
                continue;
            };
            let reply = match berth_proto::decode::<Req>(&msg.payload) {
                Ok(req) => answer(req).await,
                Err(e) => refused(format!("bad request: {e}")),
            };
            let Ok(bytes) = berth_proto::encode(&reply) else {
                continue;
            };
            if let Err(e) = client.publish(reply_to, bytes.into()).await {
                tracing::warn!(%e, subject, "cannot answer a request");
            }
        }
    })
}
