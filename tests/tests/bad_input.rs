//! Bad input never crashes a worker: every malformed command is dead-lettered with its
//! original bytes and a reason, the instance shows the error, and the analyzer keeps serving.

use berth_bus::{DLQ_MAX_BODY, DLQ_REASON, DLQ_SEQ, DLQ_STREAM};
use berth_proto::InstanceState;
use berth_tests::{Fleet, GIB, wait_until, worker};
use bytes::Bytes;
use serde::Serialize;
use std::{collections::BTreeMap, time::Duration};

const LIMIT: Duration = Duration::from_secs(30);

#[derive(Serialize)]
struct Start {
    op: &'static str,
    vram_bytes: i64,
    gpus: i64,
    #[serde(skip_serializing_if = "String::is_empty")]
    padding: String,
}

fn start(vram_bytes: i64, gpus: i64) -> Vec<u8> {
    rmp_serde::to_vec_named(&Start {
        op: "start",
        vram_bytes,
        gpus,
        padding: String::new(),
    })
    .expect("encode")
}

fn map(entries: &[(&str, &str)]) -> Vec<u8> {
    let m: BTreeMap<&str, &str> = entries.iter().copied().collect();
    rmp_serde::to_vec_named(&m).expect("encode")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_commands_are_dead_lettered_and_marked() {
    let mut fleet = Fleet::start().await;
    let stats = fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;

    let oversized = rmp_serde::to_vec_named(&Start {
        op: "start",
        vram_bytes: GIB,
        gpus: 1,
        padding: "x".repeat(100 * 1024),
    })
    .unwrap();
    // (instance, payload, words the reason must contain)
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"\xc1\xff\x00not msgpack".to_vec(),
            "not a MessagePack map",
        ),
        ("no-op", map(&[("model", "m")]), "no \"op\" field"),
        (
            "unknown-op",
            map(&[("op", "explode")]),
            "unknown op \"explode\"",
        ),
        ("missing-field", map(&[("op", "start")]), "vram_bytes"),
        ("oversized", oversized, "limited to 65536 bytes"),
        ("negative", start(-5 * GIB, 1), "must be positive"),
        ("absurd", start(1 << 52, 1), "more than any GPU has"),
        ("zero-gpus", start(GIB, 0), "gpus must be between 1 and 64"),
    ];
    let mut seqs = Vec::new();
    for (id, payload, _) in &cases {
        let seq = fleet
            .bus
            .publish_raw_command(id, Bytes::from(payload.clone()), None)
            .await
            .unwrap();
        seqs.push(seq);
    }
    // A subject whose id berth cannot accept: dead-lettered under "unknown".
    fleet
        .bus
        .jetstream()
        .publish("berth.cmd.instance.bad:id", start(GIB, 1).into())
        .await
        .unwrap()
        .await
        .unwrap();

    // The analyzer keeps serving.
    fleet.start_instance("good", 10 * GIB, 1).await;
    fleet
        .wait_state("good", InstanceState::Running, LIMIT)
        .await;

    let dlq = fleet.bus.jetstream().get_stream(DLQ_STREAM).await.unwrap();
    for ((id, payload, expected), seq) in cases.iter().zip(&seqs) {
        let row = fleet.wait_state(id, InstanceState::Error, LIMIT).await;
        let reason = row.reason.unwrap_or_default();
        assert!(
            reason.contains(expected),
            "{id}: reason {reason:?} lacks {expected:?}"
        );
        let dead = dlq
            .get_last_raw_message_by_subject(&format!("berth.dlq.cmd.{id}"))
            .await
            .unwrap();
        // The original bytes, up to the size of the largest valid command.
        let kept = payload.len().min(DLQ_MAX_BODY);
        assert_eq!(
            &dead.payload[..],
            &payload[..kept],
            "{id}: original bytes kept"
        );
        let header = |name: &str| dead.headers.get(name).map(|v| v.as_str().to_owned());
        assert!(header(DLQ_REASON).unwrap().contains(expected), "{id}");
        assert_eq!(header(DLQ_SEQ).unwrap(), seq.to_string());
    }
    let unknown = dlq
        .get_last_raw_message_by_subject("berth.dlq.cmd.unknown")
        .await
        .unwrap();
    assert!(
        unknown
            .headers
            .get(DLQ_REASON)
            .unwrap()
            .as_str()
            .contains("bad:id"),
        "{unknown:?}"
    );
    assert_eq!(stats.commands_dead_lettered.get(), cases.len() as u64 + 1);
    assert_eq!(
        dlq.get_info().await.unwrap().state.messages,
        cases.len() as u64 + 1
    );

    // A valid command after a bad one recovers the instance.
    fleet.start_instance("negative", 10 * GIB, 1).await;
    fleet
        .wait_state("negative", InstanceState::Running, LIMIT)
        .await;
    fleet.assert_books_balanced().await;
}

/// A bad command for an instance that runs is dead-lettered and noted, but does not hide the
/// backend that still holds its GPUs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_command_does_not_hide_a_running_instance() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    fleet.add_agent(worker("w1", 1, 80, &[])).await;
    fleet.start_instance("m", 10 * GIB, 1).await;
    let before = fleet.wait_state("m", InstanceState::Running, LIMIT).await;

    let seq = fleet
        .bus
        .publish_raw_command("m", Bytes::from(map(&[("op", "explode")])), None)
        .await
        .expect("publish");
    let row = fleet.wait_applied("m", seq, LIMIT).await;
    assert_eq!(
        (row.state.as_str(), row.version),
        ("running", before.version)
    );
    let reason = row.reason.unwrap_or_default();
    assert!(
        reason.contains(&format!("command {seq} rejected")) && reason.contains("explode"),
        "{reason}"
    );
    assert_eq!(
        fleet.store.allocations().await.expect("allocations").len(),
        1
    );
    // Automation hears of the rejection: an event with the note, the state unchanged.
    let noted = wait_until("the rejection's event", LIMIT, || async {
        let history = fleet.bus.history("m", 64).await.ok()?;
        history.into_iter().find(|e| e.cmd_seq == seq)
    })
    .await;
    assert_eq!(
        (noted.state, noted.version, noted.reason.as_deref()),
        (
            InstanceState::Running,
            before.version,
            Some(reason.as_str())
        )
    );
    // And it still stops normally.
    fleet.stop_instance("m").await;
    fleet.wait_state("m", InstanceState::Stopped, LIMIT).await;
}

/// The first event of an instance that a stop or a bad command creates carries the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_instances_created_by_a_stop_or_a_bad_command_carry_the_reason() {
    let mut fleet = Fleet::start().await;
    fleet.add_analyzer(Default::default()).await;
    let stop = berth_proto::Command::Stop(berth_proto::StopSpec {
        reason: Some("decommissioned".into()),
    });
    fleet
        .bus
        .publish_command("fresh", &stop)
        .await
        .expect("stop");
    fleet
        .bus
        .publish_raw_command("bad", Bytes::from(map(&[("op", "explode")])), None)
        .await
        .expect("publish");
    for (id, state, words) in [
        ("fresh", InstanceState::Stopped, "decommissioned"),
        ("bad", InstanceState::Error, "explode"),
    ] {
        let event = wait_until(&format!("{id}'s event"), LIMIT, || async {
            let history = fleet.bus.history(id, 8).await.ok()?;
            history.into_iter().find(|e| e.state == state)
        })
        .await;
        let reason = event.reason.unwrap_or_default();
        assert!(reason.contains(words), "{id}: {reason:?}");
    }
}
