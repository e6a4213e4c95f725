//! `berth estimate --cluster` asks the live cluster: workers registered in a real
//! PostgreSQL, the `berth` binary run against it, the shape and GPUs it chooses checked
//! against the estimate, and its "does not fit" reason against the analyzers' own.

use berth_models::{EstimateOptions, VllmOptions, estimate, profile_from_path};
use berth_proto::GpuInfo;
use berth_store::Store;
use berth_tests::{GIB, write_llama_8b_config};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

fn gpus(name: &str, total: i64, count: u32) -> Vec<GpuInfo> {
    (0..count)
        .map(|index| GpuInfo {
            index,
            name: name.into(),
            uuid: String::new(),
            total_bytes: total,
            system_reserved_bytes: GIB,
        })
        .collect()
}

/// Runs `berth estimate MODEL --cluster --json ARGS` against `url`, within a deadline.
fn estimate_on_cluster(model: &Path, url: &str, args: &[&str]) -> serde_json::Value {
    let child = std::process::Command::new(berth_tests::built_binary("berth"))
        .arg("estimate")
        .arg(model)
        .args(["--cluster", "--json", "--database-url", url])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn berth estimate");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("berth estimate ran past its deadline")
        .expect("berth estimate's output");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_answers_with_the_shape_berth_would_choose_or_why_not() {
    berth_tests::init_logs();
    let dir = tempfile::tempdir().expect("dir");
    let pg =
        berth_harness::PgServer::start(&dir.path().join("pg"), berth_harness::Durability::Fast)
            .expect("PostgreSQL");
    let url = pg.url();
    berth_store::migrate(&url).await.expect("migrations");
    let store = Store::connect(&url, 1).expect("store");
    store
        .register_worker("w-big", &BTreeMap::new(), &gpus("H100", 80 * GIB, 2))
        .await
        .expect("register w-big");
    store
        .register_worker("w-small", &BTreeMap::new(), &gpus("L4", 24 * GIB, 1))
        .await
        .expect("register w-small");
    let model = dir.path().join("llama");
    std::fs::create_dir_all(&model).expect("model dir");
    write_llama_8b_config(&model);

    // Llama-3-8B on vLLM reserving its estimate only: about 20 GiB on one GPU, which the
    // 24 GiB card holds (23 GiB free) and binpack prefers to an 80 GiB one.
    let flags = ["--backend", "vllm", "--gpu-memory-utilization", "none"];
    let doc = estimate_on_cluster(&model, &url, &flags);
    let p = &doc["placement"];
    assert_eq!(p["fits"], serde_json::json!(true), "{doc}");
    assert_eq!(p["placement"][0]["worker"], serde_json::json!("w-small"));
    let profile = profile_from_path(&model).expect("profile");
    let need = estimate(
        &profile,
        &EstimateOptions::Vllm(VllmOptions {
            gpu_memory_utilization: None,
            ..VllmOptions::default()
        }),
    )
    .expect("estimate")
    .max_per_gpu();
    assert!(need < 23 << 30, "{need}");
    assert_eq!(
        p["placement"][0]["gpus"][0]["bytes"],
        serde_json::json!(need)
    );

    // 512k tokens of KV (64 GiB) at up to tp=2 fit no single GPU, but two 80 GiB GPUs on
    // w-big.
    let mut long = flags.to_vec();
    long.extend(["--ctx", "524288", "--max-gpus", "2"]);
    let doc = estimate_on_cluster(&model, &url, &long);
    let p = &doc["placement"];
    assert_eq!(p["fits"], serde_json::json!(true), "{doc}");
    assert_eq!(p["shape"], serde_json::json!("tp=2"));
    assert_eq!(p["placement"][0]["worker"], serde_json::json!("w-big"));
    assert_eq!(p["placement"][0]["gpus"].as_array().map(Vec::len), Some(2));

    // Four million tokens fit nowhere: the reason names each worker and what it lacked, as
    // a pending instance's would.
    let mut huge = flags.to_vec();
    huge.extend(["--ctx", "4194304", "--max-gpus", "2"]);
    let doc = estimate_on_cluster(&model, &url, &huge);
    let p = &doc["placement"];
    assert_eq!(p["fits"], serde_json::json!(false), "{doc}");
    let reason = p["reason"].as_str().expect("a reason");
    for says in [
        "on one worker at tp=1",
        "w-big: 2 × H100, largest free 79.0 GiB",
        "w-small: 1 × L4, largest free 23.0 GiB",
        "tp=2 needs 2 × ",
    ] {
        assert!(reason.contains(says), "{says:?} not in {reason}");
    }
}
