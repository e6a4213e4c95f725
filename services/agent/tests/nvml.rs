//! The NVML path against a real driver: registration and heartbeats of a host's GPUs.
//!
//! Ignored by default (CI has no GPU). On a GPU host with the driver:
//! `cargo test -p berth-agent --test nvml -- --ignored` (set `BERTH_NVML_HELD_BYTES` while
//! another process holds that much on GPU 0 to check it is counted).

use berth_agent::{Agent, AgentConfig, AgentStats, Usage, WorkerSpec, nvml};
use berth_proto::{StatusMsg, codec, subjects};
use futures::StreamExt;
use std::{sync::Arc, time::Duration};

#[tokio::test]
#[ignore = "needs an NVIDIA GPU and driver"]
async fn an_nvml_worker_registers_its_gpus_and_reports_memory_in_use() {
    let gpus = nvml::gpus(1 << 30).expect("NVML sees the GPUs");
    assert!(!gpus.is_empty(), "NVML sees no GPU");
    for g in &gpus {
        assert!(g.total_bytes > 1 << 30, "{g:?}");
        assert!(g.uuid.starts_with("GPU-"), "{g:?}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = berth_harness::NatsServer::start(dir.path()).expect("nats-server");
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let worker = "nvml-host";
    let mut status = client
        .subscribe(subjects::status_subject(worker).expect("subject"))
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");

    let agent = Agent::start(AgentConfig {
        nats_url: nats.url(),
        nats_access: Default::default(),
        worker: WorkerSpec {
            id: worker.into(),
            labels: Default::default(),
            gpus: gpus.clone(),
            usage: Usage::Nvml,
        },
        heartbeat: Duration::from_secs(1),
        stats: Arc::new(AgentStats::default()),
    })
    .await
    .expect("agent");

    let (mut registered, mut usage) = (None, None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while registered.is_none() || usage.is_none() {
        let msg = tokio::time::timeout_at(deadline, status.next())
            .await
            .expect("a registration and a heartbeat with usage within 20 s")
            .expect("subscription open");
        match codec::decode::<StatusMsg>(&msg.payload).expect("decodes") {
            StatusMsg::Register { gpus, .. } => registered = Some(gpus),
            StatusMsg::Heartbeat { usage: u, .. } if !u.is_empty() => usage = Some(u),
            _ => {}
        }
    }
    assert_eq!(registered, Some(gpus.clone()));
    let usage = usage.unwrap_or_default();
    assert_eq!(usage.len(), gpus.len(), "{usage:?}");
    for (u, g) in usage.iter().zip(&gpus) {
        assert_eq!(u.index, g.index);
        assert!((0..=g.total_bytes).contains(&u.used_outside_bytes), "{u:?}");
    }
    // Where another process holds memory on GPU 0 (the device check does, with PyTorch),
    // the heartbeat must count it.
    if let Ok(held) = std::env::var("BERTH_NVML_HELD_BYTES") {
        let held: i64 = held.parse().expect("BERTH_NVML_HELD_BYTES is a byte count");
        assert!(usage[0].used_outside_bytes >= held, "{usage:?} < {held}");
    }
    println!("registered {gpus:?}\nheartbeat usage {usage:?}");
    agent.shutdown().await;
}
