//! Analyzers as separate `berth-analyzer` processes, for figures that belong to one analyzer
//! (its peak memory) and for a fleet shaped like production.

use anyhow::{Context, Result, bail};
use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    process::Stdio,
    time::{Duration, Instant},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

/// How long an analyzer may take to connect, migrate and serve its metrics.
const STARTUP: Duration = Duration::from_secs(30);

/// What each analyzer process is started with.
#[derive(Debug, Clone)]
pub struct Settings {
    pub nats_url: String,
    pub database_url: String,
    pub concurrency: u32,
    pub pool: u32,
    pub policy: String,
}

/// One `berth-analyzer` child; killed when dropped.
#[derive(Debug)]
pub struct AnalyzerProc {
    child: Child,
    metrics: SocketAddr,
}

impl AnalyzerProc {
    /// Starts analyzer `name` and waits until its metrics endpoint answers (it binds it once
    /// connected to NATS and PostgreSQL).
    pub async fn start(name: &str, s: &Settings) -> Result<AnalyzerProc> {
        let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, berth_harness::free_port()?));
        let child = Command::new(berth_harness::sibling_binary("berth-analyzer")?)
            .args(["--nats-url", &s.nats_url])
            .args(["--database-url", &s.database_url])
            .args(["--name", name])
            .args(["--concurrency", &s.concurrency.to_string()])
            .args(["--pool-size", &s.pool.to_string()])
            .args(["--policy", &s.policy])
            .args(["--metrics-addr", &metrics.to_string()])
            // The simulated workers send no heartbeats: keep them schedulable for the run.
            .args(["--unreachable-after", "24h", "--gone-after", "48h"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let mut proc = AnalyzerProc { child, metrics };
        let deadline = Instant::now() + STARTUP;
        loop {
            if proc.scrape().await.is_ok() {
                return Ok(proc);
            }
            if let Some(status) = proc.child.try_wait()? {
                bail!("{name} exited with {status} before it was ready");
            }
            if Instant::now() > deadline {
                bail!("{name} not ready after {STARTUP:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its counters, from `/metrics`: `fits_computed` for `berth_analyzer_fits_computed_total`.
    pub async fn counters(&self) -> Result<HashMap<String, u64>> {
        let text = self.scrape().await?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let (name, value) = l.split_once(' ')?;
                let name = name
                    .strip_prefix("berth_analyzer_")?
                    .strip_suffix("_total")?;
                Some((name.to_owned(), value.trim().parse().ok()?))
            })
            .collect())
    }

    async fn scrape(&self) -> Result<String> {
        let mut conn = TcpStream::connect(self.metrics).await?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await?;
        if !body.starts_with("HTTP/1.1 200") && !body.starts_with("HTTP/1.0 200") {
            bail!("metrics endpoint answered {:?}", body.lines().next());
        }
        Ok(body)
    }

    /// The process id while it runs (the bench reads its CPU time).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Peak resident memory so far (Linux `VmHWM`), in MiB.
    pub fn peak_rss_mib(&self) -> Option<f64> {
        super::stats::peak_rss_mib(Some(self.child.id()?))
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
