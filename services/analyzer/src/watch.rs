//! The cancellation watch: every analyzer hears every new command (a plain NATS subscription
//! on the command subjects, so it arrives as soon as it is published) and, when it has a fit
//! in flight for that instance and the command is not that fit's own start, cancels the fit
//! at once — whichever analyzer ends up handling the new command. The fit then confirms with
//! the stream before giving up (a command heard late may be older than the fit's own).

use crate::context::Ctx;
use berth_proto::{
    Command,
    subjects::{CMD_PREFIX, instance_of_cmd_subject},
};
use futures::StreamExt;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The watch's own connection and subscription: commands reach it without queueing behind
/// the JetStream traffic of the analyzer's main connection.
pub struct Watch {
    _client: async_nats::Client,
    commands: async_nats::Subscriber,
}

/// Subscribes to the command subjects; call before the command intake starts so that no
/// command is missed.
pub async fn subscribe(ctx: &Ctx) -> anyhow::Result<Watch> {
    let client = ctx
        .config
        .nats_access
        .connect_options(&format!("{}-watch", ctx.config.name))
        .await?
        .retry_on_initial_connect()
        .connect(berth_bus::server_addrs(&ctx.config.nats_url)?)
        .await?;
    let commands = client.subscribe(format!("{CMD_PREFIX}.*")).await?;
    // Make sure the server has the subscription before the first command is handled.
    client.flush().await?;
    Ok(Watch {
        _client: client,
        commands,
    })
}

pub async fn run(ctx: Arc<Ctx>, mut watch: Watch, shutdown: CancellationToken) {
    loop {
        let msg = tokio::select! {
            () = shutdown.cancelled() => return,
            msg = watch.commands.next() => match msg {
                Some(msg) => msg,
                None => return,
            },
        };
        let Some(id) = instance_of_cmd_subject(&msg.subject) else {
            continue;
        };
        ctx.stats.commands_watched.inc();
        // No stream sequence on the plain copy, and no round trip to ask for it: a command
        // that is not a fit's own start cancels that fit now, and one heard just before a fit
        // begins makes the fit look twice; either way the fit confirms with the stream that
        // it really was superseded (see `placing::place`). An undecodable command is a newer
        // command too (it will put the instance in error).
        ctx.fits.heard(id, Command::decode(&msg.payload).ok());
    }
}
