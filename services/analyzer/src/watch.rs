//! The cancellation watch: every analyzer sees every new command (headers only) and cancels
//! its own in-flight fit for that instance, whichever analyzer handles the command.

use crate::context::Ctx;
use berth_proto::subjects::instance_of_cmd_subject;
use futures::StreamExt;
use std::{sync::Arc, time::Duration};
use tokio_util::sync::CancellationToken;

pub async fn run(ctx: Arc<Ctx>, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let mut messages = match ctx.bus.command_watch().await {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(%e, "command watch unavailable; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    let Ok(info) = msg.info() else { continue };
                    if let Some(id) = instance_of_cmd_subject(&msg.subject) {
                        ctx.stats.commands_watched.inc();
                        ctx.supersede(id, info.stream_sequence);
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(%e, "command watch error; resubscribing");
                    break;
                }
                None => break,
            }
        }
    }
}
