//! Waiting for a command's outcome: the first resting state (running, pending, stopped,
//! error) an instance reaches under that command or a newer one.

use berth_proto::{CmdSeq, InstanceEvent};
use futures::StreamExt;

/// Reads `events` (a subscription to the instance's event subject, made before the command
/// was published) until a resting state of command `seq` or newer, passing every event of it
/// to `each`. `None`: `deadline` came first, or the subscription ended.
pub async fn settled(
    events: &mut async_nats::Subscriber,
    seq: CmdSeq,
    deadline: tokio::time::Instant,
    mut each: impl FnMut(&InstanceEvent),
) -> Option<InstanceEvent> {
    loop {
        let msg = tokio::time::timeout_at(deadline, events.next())
            .await
            .ok()??;
        let Ok(ev) = berth_proto::decode::<InstanceEvent>(&msg.payload) else {
            continue;
        };
        if ev.cmd_seq < seq {
            continue;
        }
        each(&ev);
        if ev.state.is_terminal() {
            return Some(ev);
        }
    }
}
