//! Messages a hostile or careless client can send never crash a consumer, never loop, and
//! never corrupt the books: each ends in a bounded number of deliveries, with exactly one
//! dead letter where it is a command.

use async_nats::jetstream::consumer::PullConsumer;
use berth_bus::{
    CMD_CONSUMER, CMD_STREAM, DLQ_ORIGINAL_BYTES, DLQ_REASON, DLQ_STREAM, STATUS_CONSUMER,
    STATUS_STREAM,
};
use berth_proto::{
    GpuInfo, InstanceEvent, InstanceState, StatusMsg, Version, status::ReportedState,
};
use berth_tests::{Fleet, GIB, wait_until, worker};
use bytes::Bytes;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

/// `levels` one-entry maps nested inside each other, as the value of `extra` in a start.
fn deeply_nested_start(levels: usize) -> Vec<u8> {
    let mut bytes = vec![0x83];
    for (key, value) in [
        ("op", &b"\xa5start"[..]),
        ("vram_bytes", &b"\xce\x40\x00\x00\x00"[..]),
    ] {
        bytes.push(0xa0 | u8::try_from(key.len()).expect("test setup"));
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(value);
    }
    bytes.extend_from_slice(b"\xa5extra");
    for _ in 0..levels {
        bytes.extend_from_slice(&[0x81, 0xa1, b'a']);
    }
    bytes.push(0x01);
    bytes
}

/// Dead letters kept for `id`.
async fn dead_letters(fleet: &Fleet, id: &str) -> usize {
    use futures::TryStreamExt;
    let subject = format!("berth.dlq.cmd.{id}");
    let dlq = fleet
        .bus
        .jetstream()
        .get_stream(DLQ_STREAM)
        .await
        .expect("test setup");
    let mut subjects = dlq.info_with_subjects(&subject).await.expect("test setup");
    let mut n = 0;
    while let Some((s, count)) = subjects.try_next().await.expect("test setup") {
        if s == subject {
            n += count;
        }
    }
    n
}

/// `levels` one-entry maps nested inside each other.
fn nested_maps(levels: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    for _ in 0..levels {
        bytes.extend_from_slice(&[0x81, 0xa1, b'a']);
    }
    bytes.push(0x01);
    bytes
}

/// Waits until a consumer holds nothing: every message handled and acknowledged.
async fn wait_drained(fleet: &Fleet, stream: &str, consumer: &str) {
    let stream = fleet
        .bus
        .jetstream()
        .get_stream(stream)
        .await
        .expect("test setup");
    wait_until(&format!("{consumer} drained"), LIMIT, || {
        let stream = stream.clone();
        async move {
            let mut c: PullConsumer = stream.get_consumer(consumer).await.ok()?;
            let info = c.info().await.ok()?;
            (info.num_ack_pending == 0 && info.num_pending == 0).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_messages_are_refused_and_the_analyzer_stays_up() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    // ~3 KB each: a recursive decoder without a depth limit overflows its stack on these.
    let deep = deeply_nested_start(1_000);
    fleet
        .bus
        .publish_raw_command("deep", Bytes::from(deep.clone()), None)
        .await
        .unwrap();
    fleet
        .bus
        .jetstream()
        .publish("berth.status.w1", nested_maps(1_000).into())
        .await
        .unwrap()
        .await
        .unwrap();

    let row = fleet.wait_state("deep", InstanceState::Error, LIMIT).await;
    assert!(row.reason.unwrap_or_default().contains("depth"));
    wait_drained(&fleet, STATUS_STREAM, STATUS_CONSUMER).await;
    assert!(stats.reports_rejected.get() >= 1);
    assert_eq!(dead_letters(&fleet, "deep").await, 1);

    // Still serving.
    fleet.start_instance("good", 10 * GIB, 1).await;
    fleet
        .wait_state("good", InstanceState::Running, LIMIT)
        .await;
    wait_drained(&fleet, CMD_STREAM, CMD_CONSUMER).await;
    assert_eq!(dead_letters(&fleet, "deep").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_that_used_to_loop_end_in_error_with_one_dead_letter() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    // Just under the server's 1 MiB payload limit: a copy with headers would not fit.
    let mut huge = Vec::with_capacity(1 << 20);
    huge.extend_from_slice(b"\x82\xa2op\xa5start\xa7padding\xdb");
    let pad = (1 << 20) - 1024 - huge.len() - 4;
    huge.extend_from_slice(&u32::try_from(pad).unwrap().to_be_bytes());
    huge.resize(huge.len() + pad, b'x');
    // Text PostgreSQL cannot store (a NUL), in the spec and in a stop's reason.
    let nul_model = berth_proto::encode(&serde_json::json!({
        "op": "start", "vram_bytes": GIB, "model": "a\u{0}b"
    }))
    .unwrap();
    let nul_selector = berth_proto::encode(&serde_json::json!({
        "op": "start", "vram_bytes": GIB, "selector": {"zone\u{0}": "a"}
    }))
    .unwrap();
    let nul_stop =
        berth_proto::encode(&serde_json::json!({"op": "stop", "reason": "bye\u{0}"})).unwrap();
    let cases = [
        ("huge", huge.clone(), "limited to 65536 bytes"),
        ("nul-model", nul_model, "control character"),
        ("nul-selector", nul_selector, "control character"),
        ("nul-stop", nul_stop, "control character"),
    ];
    for (id, payload, _) in &cases {
        fleet
            .bus
            .publish_raw_command(id, Bytes::from(payload.clone()), None)
            .await
            .unwrap();
    }
    for (id, _, expected) in &cases {
        let row = fleet.wait_state(id, InstanceState::Error, LIMIT).await;
        let reason = row.reason.unwrap_or_default();
        assert!(reason.contains(expected), "{id}: {reason}");
    }
    wait_drained(&fleet, CMD_STREAM, CMD_CONSUMER).await;
    for (id, _, _) in &cases {
        assert_eq!(dead_letters(&fleet, id).await, 1, "{id}");
    }
    let dlq = fleet.bus.jetstream().get_stream(DLQ_STREAM).await.unwrap();
    let copy = dlq
        .get_last_raw_message_by_subject("berth.dlq.cmd.huge")
        .await
        .unwrap();
    assert_eq!(
        copy.headers
            .get(DLQ_ORIGINAL_BYTES)
            .map(|v| v.as_str().to_owned()),
        Some(huge.len().to_string())
    );
    assert!(copy.headers.get(DLQ_REASON).is_some());
    assert_eq!(&copy.payload[..], &huge[..copy.payload.len()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reports_leave_the_books_balanced() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 2, 80, &[])).await;
    fleet.add_agent(worker("w2", 1, 80, &[])).await;
    fleet.start_instance("m", 60 * GIB, 2).await;
    let running = fleet.wait_state("m", InstanceState::Running, LIMIT).await;
    let on = running.worker_id.clone().expect("placed");
    let other = if on == "w1" { "w2" } else { "w1" };

    let report = |worker: &str, version: i64, state: ReportedState| StatusMsg::Instance {
        worker_id: worker.into(),
        instance_id: "m".into(),
        version: Version::new(version),
        state,
        reason: Some("forged".into()),
        shared: false,
        endpoint: None,
        restarts: 0,
    };
    let forged = [
        // Far-future versions from the worker that runs it.
        (on.as_str(), report(&on, i64::MAX, ReportedState::Stopped)),
        (
            on.as_str(),
            report(&on, running.version.get() + 5, ReportedState::Error),
        ),
        // Another worker's subject speaking for the one that runs it.
        (
            other,
            report(&on, running.version.get(), ReportedState::Error),
        ),
    ];
    for (subject_worker, msg) in &forged {
        fleet
            .bus
            .jetstream()
            .publish(
                format!("berth.status.{subject_worker}"),
                berth_proto::encode(msg).unwrap().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_drained(&fleet, STATUS_STREAM, STATUS_CONSUMER).await;
    assert_eq!(stats.reports_rejected.get(), 1);
    let row = fleet.store.instance("m").await.unwrap().expect("row");
    assert_eq!(
        (row.state.as_str(), row.version),
        ("running", running.version)
    );
    let allocations = fleet.store.allocations().await.unwrap();
    assert_eq!(allocations.len(), 2, "{allocations:?}");
    fleet.assert_books_balanced().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_reason_is_cut_and_the_event_relay_keeps_going() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 2, 80, &[])).await;
    fleet.start_instance("m", 10 * GIB, 1).await;
    let running = fleet.wait_state("m", InstanceState::Running, LIMIT).await;

    let failed = StatusMsg::Instance {
        worker_id: "w1".into(),
        instance_id: "m".into(),
        version: running.version,
        state: ReportedState::Error,
        reason: Some(format!("line one\n{}", "x".repeat(60_000))),
        shared: false,
        endpoint: None,
        restarts: 0,
    };
    fleet.bus.publish_status("w1", &failed).await.unwrap();
    let row = fleet.wait_state("m", InstanceState::Error, LIMIT).await;
    let reason = row.reason.unwrap_or_default();
    assert!(
        reason.len() <= berth_proto::text::MAX_REASON_BYTES,
        "{}",
        reason.len()
    );
    assert!(reason.starts_with("line one x"), "{reason:.40}");

    // The error's event went out with the cut reason, and later ones still do.
    fleet.start_instance("after", 10 * GIB, 1).await;
    fleet
        .wait_state("after", InstanceState::Running, LIMIT)
        .await;
    let events = |id: &'static str| {
        let bus = fleet.bus.clone();
        async move { bus.history(id, 64).await.unwrap_or_default() }
    };
    let error_event: InstanceEvent = wait_until("the error event", LIMIT, || async {
        events("m")
            .await
            .into_iter()
            .find(|e| e.state == InstanceState::Error)
    })
    .await;
    assert_eq!(error_event.reason.as_deref(), Some(reason.as_str()));
    wait_until("the later instance's running event", LIMIT, || async {
        events("after")
            .await
            .into_iter()
            .any(|e| e.state == InstanceState::Running)
            .then_some(())
    })
    .await;
}

fn register(worker_id: &str, gpus: Vec<GpuInfo>) -> StatusMsg {
    StatusMsg::Register {
        worker_id: worker_id.into(),
        labels: Default::default(),
        gpus,
    }
}

fn gpu(index: u32, uuid: &str, gib: i64) -> GpuInfo {
    GpuInfo {
        index,
        name: "Simulated H100".into(),
        uuid: uuid.into(),
        total_bytes: gib * GIB,
        system_reserved_bytes: 0,
    }
}

/// A worker that registers again with less memory than berth reserved on it gives up the
/// instances that no longer fit (largest first, only as many as needed): they are placed
/// again elsewhere with an event that says why, the smaller size is what the books hold, and
/// no GPU is over capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_shrinks_gives_up_what_no_longer_fits() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("big", 50 * GIB, 1).await;
    fleet.start_instance("small", 20 * GIB, 1).await;
    let big = fleet.wait_state("big", InstanceState::Running, LIMIT).await;
    let small = fleet
        .wait_state("small", InstanceState::Running, LIMIT)
        .await;
    fleet.add_agent(worker("w2", 1, 80, &[])).await;

    // w1 comes back with 40 GiB: the 20 GiB instance fits there, the 50 GiB one does not.
    fleet
        .bus
        .publish_status("w1", &register("w1", vec![gpu(0, "GPU-w1-0", 40)]))
        .await
        .unwrap();
    let moved = wait_until("big placed again on w2", LIMIT, || async {
        let row = fleet.store.instance("big").await.unwrap()?;
        (row.state == "running" && row.worker_id.as_deref() == Some("w2")).then_some(row)
    })
    .await;
    assert!(moved.version > big.version, "{moved:?}");
    let pending = fleet
        .bus
        .history("big", 64)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.state == InstanceState::Pending)
        .expect("a pending event");
    let reason = pending.reason.unwrap_or_default();
    assert!(
        reason.contains("w1 registered again with 40.0 GiB"),
        "{reason}"
    );
    let kept = fleet.store.instance("small").await.unwrap().expect("row");
    assert_eq!(
        (kept.state.as_str(), kept.version, kept.worker_id.as_deref()),
        ("running", small.version, Some("w1"))
    );
    let w1 = fleet
        .store
        .gpus()
        .await
        .unwrap()
        .into_iter()
        .find(|g| g.worker_id == "w1")
        .expect("w1's GPU");
    assert_eq!((w1.total_bytes, w1.reserved_bytes), (40 * GIB, 20 * GIB));
    assert_eq!(stats.evictions.get(), 1);
    fleet.assert_books_balanced().await;
}

/// A GPU is counted once: a registration that claims a UUID another live worker registered
/// is refused whole (the worker is not recorded), and counted as a rejected report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_claimed_by_two_workers_is_refused() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet
        .bus
        .publish_status(
            "w3",
            &register("w3", vec![gpu(0, "GPU-w3-0", 80), gpu(1, "GPU-w1-0", 80)]),
        )
        .await
        .unwrap();
    wait_drained(&fleet, STATUS_STREAM, STATUS_CONSUMER).await;
    assert_eq!(stats.reports_rejected.get(), 1);
    let workers: Vec<String> = fleet
        .store
        .gpus()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.worker_id)
        .collect();
    assert_eq!(workers, ["w1"]);
}
