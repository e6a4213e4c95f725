//! The cancellation watch: every analyzer hears every new command (a plain NATS subscription
//! on the command subjects, so it arrives as soon as it is published) and, when it has a fit
//! in flight for that instance, asks the stream for the instance's newest sequence and
//! cancels the fit if it is older — whichever analyzer ends up handling the new command.

use crate::context::Ctx;
use berth_proto::subjects::{CMD_PREFIX, instance_of_cmd_subject};
use futures::StreamExt;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Subscribes to the command subjects; call before the command intake starts so that no
/// command is missed.
pub async fn subscribe(ctx: &Ctx) -> anyhow::Result<async_nats::Subscriber> {
    let sub = ctx
        .bus
        .client()
        .subscribe(format!("{CMD_PREFIX}.*"))
        .await?;
    // Make sure the server has the subscription before the first command is handled.
    ctx.bus.client().flush().await?;
    Ok(sub)
}

pub async fn run(ctx: Arc<Ctx>, mut commands: async_nats::Subscriber, shutdown: CancellationToken) {
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => return,
            msg = commands.next() => match msg {
                Some(msg) => msg,
                None => return,
            },
        };
        let Some(id) = instance_of_cmd_subject(&msg.subject) else {
            continue;
        };
        ctx.stats.commands_watched.inc();
        if !ctx.has_fit_in_flight(id) {
            continue;
        }
        // The plain message carries no stream sequence: ask for it (a direct get), off this
        // loop so the next command is not delayed.
        let (ctx, id) = (ctx.clone(), id.to_owned());
        tokio::spawn(async move {
            // The plain copy can arrive a moment before the stream has stored the command:
            // if the stream shows nothing newer yet, look again shortly.
            for pause_ms in [0, 2, 20] {
                tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
                match ctx.bus.last_command_seq_alone(&id).await {
                    Ok(Some(last)) if ctx.supersede(&id, last) => return,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%e, instance_id = id, "cannot read the newest command");
                        return;
                    }
                }
                if !ctx.has_fit_in_flight(&id) {
                    return;
                }
            }
        });
    }
}
