//! `berth logs`: an instance's server log, from whichever worker runs it (asked of that
//! worker's agent over NATS: no shared disk needed).

use anyhow::{Context, Result, bail};
use berth_proto::{
    Version,
    logs::{LogsReply, LogsRequest},
    subjects::{logs_subject, validate_id},
};
use berth_store::Store;
use clap::Args;
use std::{io::Write, time::Duration};

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The instance.
    instance: String,
    /// Lines from the end.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    tail: u32,
    /// Keep printing what the server writes (Ctrl-C to leave).
    #[arg(long, short)]
    follow: bool,
    /// An earlier file: 1 is the one before the current log (the server before its last
    /// restart, or the earlier part of a log its agent cut at --log-max-bytes).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    previous: u32,
}

/// How long a worker's agent has to answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How often a follow asks for more.
const FOLLOW_EVERY: Duration = Duration::from_millis(500);

pub async fn run(database_url: &str, nats_url: &crate::Nats, args: LogsArgs) -> Result<()> {
    validate_id(&args.instance)?;
    let store = Store::connect(database_url, 1)?;
    let row = tokio::time::timeout(Duration::from_secs(10), store.instance(&args.instance))
        .await
        .context("PostgreSQL did not answer within 10 s")??
        .with_context(|| format!("no instance {:?}", args.instance))?;
    let Some(worker) = row.worker_id else {
        bail!(
            "{} runs on no worker (it is {}): there is no server log",
            args.instance,
            row.state
        );
    };
    let bus = nats_url.connect("berth-logs").await?;
    let ask = |offset: Option<u64>, version: Option<Version>| {
        let req = LogsRequest {
            instance_id: args.instance.clone(),
            version,
            previous: args.previous,
            offset,
            tail_lines: args.tail,
        };
        let bus = &bus;
        let worker = &worker;
        async move {
            let payload = berth_proto::encode(&req)?;
            let answer = tokio::time::timeout(
                ANSWER_WITHIN,
                bus.client().request(logs_subject(worker)?, payload.into()),
            )
            .await
            .with_context(|| format!("the agent of {worker} did not answer within 5 s"))?
            .with_context(|| {
                format!("no agent of {worker} answers logs requests (is it in process mode?)")
            })?;
            let reply: LogsReply = berth_proto::decode(&answer.payload)?;
            match reply.error {
                Some(e) => bail!("{worker}: {e}"),
                None => Ok(reply),
            }
        }
    };
    // The newest log the worker has of it: the current placement's, or for an instance that
    // stopped or failed there, its last one.
    let first = ask(None, None).await?;
    let mut out = std::io::stdout().lock();
    out.write_all(first.text.as_bytes())?;
    out.flush()?;
    if !args.follow {
        return Ok(());
    }
    drop(out);
    let mut offset = first.offset;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
        let more = ask(Some(offset), Some(first.version)).await?;
        offset = more.offset;
        let mut out = std::io::stdout().lock();
        out.write_all(more.text.as_bytes())?;
        out.flush()?;
    }
}
