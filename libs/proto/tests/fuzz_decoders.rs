//! Fuzzing the decoders of what crosses the bus: `Command::decode` (what any publisher may
//! send the analyzers) and `StatusMsg::decode` (what agents send). Arbitrary bytes and
//! mutations of valid encodings (bytes flipped, set, inserted, removed, cut, a stretch
//! repeated) must never panic, and a message is accepted only if it passes validation, and
//! stays accepted, to the same bytes, once encoded again.
//!
//! A few seconds by default; `BERTH_FUZZ_CASES=1000000 cargo test --release -p berth-proto
//! --test fuzz_decoders` runs as long as you like. (The GGUF reader's fuzz test is
//! `libs/models/tests/fuzz_gguf.rs`, run the same way.)

use berth_proto::fuzzing::{apply, mutation};
use berth_proto::status::ReportedState;
use berth_proto::{Command, GpuInfo, GpuUsage, StartSpec, StatusMsg, StopSpec, Version};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// Text with now and then a control character or a long run, which validation refuses.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9._-]{0,24}",
        1 => "[a-z\\x00\\n\\x1b]{1,8}",
        1 => "x{250,300}",
    ]
}

fn start() -> impl Strategy<Value = Command> {
    (
        text(),
        prop_oneof![Just(0i64), 1i64..(1 << 40), any::<i64>()],
        prop_oneof![1i64..8, any::<i64>()],
        proptest::collection::btree_map(text(), text(), 0..3),
        proptest::option::of(text()),
        proptest::option::of("/[a-z/]{1,30}\\.gguf"),
        proptest::collection::vec(text(), 0..3),
    )
        .prop_map(|(model, vram, gpus, selector, gpu_name, path, gpu_ids)| {
            Command::Start(StartSpec {
                model,
                vram_bytes: vram,
                gpus,
                selector,
                gpu_name,
                model_ref: path.map(|p| Box::new(berth_options::ModelRef::Path(p.into()))),
                gpu_ids,
                ..StartSpec::claim(0, 1)
            })
        })
}

fn stop() -> impl Strategy<Value = Command> {
    proptest::option::of(text()).prop_map(|reason| Command::Stop(StopSpec { reason }))
}

fn status() -> impl Strategy<Value = StatusMsg> {
    let gpu = (0u32..80, text(), text(), any::<i64>(), 0i64..(1 << 30)).prop_map(
        |(index, name, uuid, total_bytes, system_reserved_bytes)| GpuInfo {
            index,
            name,
            uuid,
            total_bytes,
            system_reserved_bytes,
        },
    );
    let usage = (0u32..80, any::<i64>()).prop_map(|(index, used_outside_bytes)| GpuUsage {
        index,
        used_outside_bytes,
    });
    let state = prop_oneof![
        Just(ReportedState::Starting),
        Just(ReportedState::Running),
        Just(ReportedState::Stopped),
        Just(ReportedState::Error),
    ];
    prop_oneof![
        (
            text(),
            proptest::collection::btree_map(text(), text(), 0..3),
            proptest::collection::vec(gpu, 0..4)
        )
            .prop_map(|(worker_id, labels, gpus)| StatusMsg::Register {
                worker_id,
                labels: labels.into_iter().collect::<BTreeMap<_, _>>(),
                gpus,
            }),
        (text(), proptest::collection::vec(usage, 0..4))
            .prop_map(|(worker_id, usage)| StatusMsg::Heartbeat { worker_id, usage }),
        (
            text(),
            text(),
            1i64..1000,
            state,
            proptest::option::of(text()),
            any::<bool>(),
            proptest::option::of(text()),
            0u32..5
        )
            .prop_map(
                |(worker_id, instance_id, v, state, reason, shared, endpoint, restarts)| {
                    StatusMsg::Instance {
                        worker_id,
                        instance_id,
                        version: Version::new(v),
                        state,
                        reason,
                        shared,
                        endpoint,
                        restarts,
                    }
                },
            ),
    ]
}

/// The contract of `Command::decode` on any input.
fn check_command(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(cmd) = Command::decode(bytes) {
        match &cmd {
            Command::Start(s) => prop_assert!(s.validate().is_ok()),
            Command::Stop(s) => prop_assert!(s.validate().is_ok()),
        }
        let again = cmd
            .encode()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back = Command::decode(&again);
        prop_assert!(back.is_ok(), "re-encoded command refused: {back:?}");
        let twice = back.ok().and_then(|c| c.encode().ok()).unwrap_or_default();
        prop_assert_eq!(twice, again);
    }
    Ok(())
}

/// The contract of `StatusMsg::decode` on any input.
fn check_status(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(msg) = StatusMsg::decode(bytes) {
        prop_assert!(msg.validate().is_ok());
        let again = berth_proto::encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(StatusMsg::decode(&again), Ok(msg));
    }
    Ok(())
}

proptest! {
    #![proptest_config(berth_proto::fuzzing::config(8000))]

    #[test]
    fn commands_from_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_command(&bytes)?;
    }

    #[test]
    fn commands_from_mutated_encodings(
        cmd in prop_oneof![3 => start(), 1 => stop()],
        mutations in proptest::collection::vec(mutation(), 0..6),
    ) {
        let mut bytes = cmd.encode().map_err(|e| TestCaseError::fail(e.to_string()))?;
        // The valid encoding itself first: accepted exactly when the command validates.
        let valid = match &cmd {
            Command::Start(s) => s.validate().is_ok(),
            Command::Stop(s) => s.validate().is_ok(),
        };
        prop_assert_eq!(Command::decode(&bytes).is_ok(), valid);
        for m in &mutations {
            apply(&mut bytes, m);
            check_command(&bytes)?;
        }
    }

    #[test]
    fn reports_from_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        check_status(&bytes)?;
    }

    #[test]
    fn reports_from_mutated_encodings(
        msg in status(),
        mutations in proptest::collection::vec(mutation(), 0..6),
    ) {
        let mut bytes = berth_proto::encode(&msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(StatusMsg::decode(&bytes).is_ok(), msg.validate().is_ok());
        for m in &mutations {
            apply(&mut bytes, m);
            check_status(&bytes)?;
        }
    }
}
