//! Stages of instances spread over several workers, between agents: a follower answers on
//! `berth.rpc.<worker>` where its RPC server for a placement is (its [`StageBoard`]), and a
//! leader asks through [`NatsPeers`].

use crate::supervisor::stages::{Peers, StageBoard};
use berth_bus::BusError;
use berth_proto::{
    rpc::{RpcReply, RpcRequest},
    subjects::rpc_subject,
};
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// Subscribes for `worker_id` now and answers from `board` until `shutdown`.
pub async fn serve(
    client: async_nats::Client,
    worker_id: &str,
    board: StageBoard,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()> + use<>, BusError> {
    let answer = move |req: RpcRequest| std::future::ready(board.answer(&req));
    let refused = |why: String| {
        tracing::warn!(why, "bad stage request");
        RpcReply::not_assigned()
    };
    crate::replier::serve(client, rpc_subject(worker_id)?, shutdown, answer, refused).await
}

/// A leader's way to its followers' agents: core NATS requests.
#[derive(Debug, Clone)]
pub struct NatsPeers {
    pub client: async_nats::Client,
}

impl Peers for NatsPeers {
    fn ask(
        &self,
        worker_id: &str,
        request: RpcRequest,
    ) -> BoxFuture<'static, Result<RpcReply, String>> {
        let client = self.client.clone();
        let subject = rpc_subject(worker_id).map_err(|e| format!("worker id: {e}"));
        Box::pin(async move {
            let payload = berth_proto::encode(&request).map_err(|e| e.to_string())?;
            let answer = client
                .request(subject?, payload.into())
                .await
                .map_err(|e| format!("no answer from its agent: {e}"))?;
            berth_proto::decode::<RpcReply>(&answer.payload).map_err(|e| format!("bad answer: {e}"))
        })
    }
}
