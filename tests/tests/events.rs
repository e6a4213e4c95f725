//! Events come from the outbox: every state change is recorded by the transaction that made
//! it and relayed to NATS later, so a change committed while no analyzer could publish is
//! still announced, and a batch re-sent after a crash is stored once.

use berth_bus::EVENTS_STREAM;
use berth_proto::{CmdSeq, InstanceEvent, InstanceState, Version, subjects};
use berth_store::outbox::Relayed;
use berth_tests::{Fleet, GIB, wait_until, worker};
use futures::StreamExt;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

async fn stored_events(fleet: &Fleet) -> u64 {
    fleet
        .bus
        .jetstream()
        .get_stream(EVENTS_STREAM)
        .await
        .expect("events stream")
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_committed_while_nobody_publishes_are_announced_later() {
    let mut fleet = Fleet::start().await;
    // No analyzer yet: these changes are committed and only recorded.
    let spec = serde_json::json!({"model": "m", "vram_bytes": 10 * GIB, "gpus": 1});
    fleet
        .store
        .apply_start("x", CmdSeq::new(1), spec)
        .await
        .expect("start");
    fleet
        .store
        .apply_stop("x", CmdSeq::new(2), None)
        .await
        .expect("stop");
    assert_eq!(fleet.store.outbox_len().await.expect("outbox"), 2);
    assert_eq!(stored_events(&fleet).await, 0);

    let mut events = fleet
        .bus
        .client()
        .subscribe(subjects::event_subject("x").expect("subject"))
        .await
        .expect("subscribe");
    fleet.add_analyzer(Default::default()).await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let msg = tokio::time::timeout(LIMIT, events.next())
            .await
            .expect("events within the limit")
            .expect("subscription open");
        let ev: InstanceEvent = berth_proto::decode(&msg.payload).expect("event");
        seen.push((ev.state, ev.version));
    }
    assert_eq!(
        seen,
        [
            (InstanceState::Analyzing, Version::new(1)),
            (InstanceState::Stopped, Version::new(2))
        ]
    );
    let store = fleet.store.clone();
    wait_until("the outbox to empty", LIMIT, || {
        let store = store.clone();
        async move { (store.outbox_len().await.ok()? == 0).then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_resent_after_a_crash_is_stored_once() {
    let fleet = Fleet::start().await;
    let spec = serde_json::json!({"model": "m", "vram_bytes": 10 * GIB, "gpus": 1});
    fleet
        .store
        .apply_start("x", CmdSeq::new(1), spec)
        .await
        .expect("start");
    fleet
        .store
        .apply_stop("x", CmdSeq::new(2), None)
        .await
        .expect("stop");
    let publish = |fail: bool| {
        let bus = fleet.bus.clone();
        move |events: Vec<berth_store::outbox::OutboxEvent>| async move {
            for e in &events {
                let ack = bus
                    .send_event(&e.event, &e.msg_id)
                    .await
                    .map_err(|e| e.to_string())?;
                ack.await.map_err(|e| e.to_string())?;
            }
            // Published, then the relay dies before it could remove the rows.
            if fail {
                Err("crashed".to_owned())
            } else {
                Ok(())
            }
        }
    };
    let crashed = fleet.store.relay_events(100, publish(true)).await;
    assert!(
        matches!(crashed, Err(berth_store::outbox::RelayError::Publish(ref e)) if e == "crashed"),
        "{crashed:?}"
    );
    assert_eq!(fleet.store.outbox_len().await.expect("outbox"), 2);
    assert_eq!(stored_events(&fleet).await, 2);
    // The next relay sends the same batch again: NATS drops the copies.
    let again = fleet.store.relay_events(100, publish(false)).await;
    assert_eq!(again.expect("relayed"), Relayed::Sent(2));
    assert_eq!(fleet.store.outbox_len().await.expect("outbox"), 0);
    assert_eq!(stored_events(&fleet).await, 2);

    // A full lifecycle through the fleet: every state once, in order.
    let mut fleet = fleet;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("y", 10 * GIB, 1).await;
    fleet.wait_state("y", InstanceState::Running, LIMIT).await;
    let store = fleet.store.clone();
    wait_until("the outbox to empty", LIMIT, || {
        let store = store.clone();
        async move { (store.outbox_len().await.ok()? == 0).then_some(()) }
    })
    .await;
    let history = fleet.bus.history("y", 100).await.expect("history");
    let states: Vec<_> = history.iter().map(|e| e.state).collect();
    assert!(
        states
            == [
                InstanceState::Analyzing,
                InstanceState::Scheduled,
                InstanceState::Starting,
                InstanceState::Running
            ]
            || states
                == [
                    InstanceState::Analyzing,
                    InstanceState::Scheduled,
                    InstanceState::Running
                ],
        "{states:?}"
    );
}
