//! `berth start` and `berth stop`: validate locally, publish, optionally wait for the result.

use anyhow::{Context, Result, bail};
use berth_bus::Bus;
use berth_proto::{Command, StartSpec, StopSpec, size::parse_bytes, subjects};
use clap::Args;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct StartArgs {
    /// Instance id (letters, digits, '-' and '_').
    #[arg(value_parser = parse_id)]
    instance: String,
    /// VRAM to reserve on each GPU, e.g. 20GiB (required unless --model-file is given).
    #[arg(long, value_parser = parse_vram, allow_hyphen_values = true, required_unless_present = "model_file")]
    vram: Option<i64>,
    /// Work out the VRAM from this model instead: a GGUF file or a Hugging Face directory,
    /// at a path the analyzers can read.
    #[arg(long, value_name = "PATH")]
    model_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    estimate: crate::estimate::BackendArgs,
    /// Number of GPUs, all on one worker.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..=berth_proto::command::MAX_GPUS))]
    gpus: i64,
    /// Model name.
    #[arg(long, default_value = "")]
    model: String,
    /// Only GPUs whose name contains this, ignoring case (e.g. H100).
    #[arg(long)]
    gpu_name: Option<String>,
    /// Worker label that must match, key=value; repeat for several.
    #[arg(long = "selector", value_parser = parse_label)]
    selector: Vec<(String, String)>,
    /// Only this GPU, as worker:index or a GPU UUID; repeat for several.
    #[arg(long = "gpu-id", value_name = "ID")]
    gpu_ids: Vec<String>,
    #[command(flatten)]
    scaling: crate::estimate::ScalingArgs,
    /// Replicas of one group are kept on different workers under the spread policy
    /// (default: --model).
    #[arg(long)]
    replica_group: Option<String>,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    #[arg(value_parser = parse_id)]
    instance: String,
    /// Why, kept with the instance.
    #[arg(long)]
    reason: Option<String>,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Debug, Args)]
pub struct WaitArgs {
    /// Wait until the instance reaches a resting state (running, pending, stopped, error) and
    /// print each state it goes through.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    timeout: u64,
}

fn parse_id(s: &str) -> Result<String, String> {
    subjects::validate_id(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

fn parse_vram(s: &str) -> Result<i64, String> {
    let bytes = parse_bytes(s)?;
    if bytes == 0 {
        return Err("VRAM must be positive".into());
    }
    StartSpec::claim(bytes, 1).validate()?;
    Ok(bytes)
}

pub fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

pub async fn start(nats_url: &str, args: StartArgs) -> Result<()> {
    let model_ref = match &args.model_file {
        Some(path) => {
            let path = std::path::absolute(path)?;
            if !path.exists() {
                eprintln!(
                    "warning: {} does not exist here; the analyzers must be able to read it",
                    path.display()
                );
            }
            Some(Box::new(berth_models::ModelRef::Path(path)))
        }
        None => None,
    };
    let backend = model_ref
        .as_ref()
        .map(|_| {
            args.estimate
                .options(u32::try_from(args.gpus).unwrap_or(1))
                .map(Box::new)
        })
        .transpose()?;
    let spec = StartSpec {
        model: args.model,
        vram_bytes: args.vram.unwrap_or(0),
        gpus: args.gpus,
        selector: args.selector.into_iter().collect(),
        gpu_name: args.gpu_name,
        model_ref,
        backend,
        gpu_ids: args.gpu_ids,
        scaling: args.scaling.scaling(),
        replica_group: args.replica_group,
    };
    if let Err(e) = spec.validate() {
        bail!("invalid start: {e}");
    }
    publish(nats_url, &args.instance, &Command::Start(spec), &args.wait).await
}

pub async fn stop(nats_url: &str, args: StopArgs) -> Result<()> {
    let cmd = Command::Stop(StopSpec {
        reason: args.reason,
    });
    publish(nats_url, &args.instance, &cmd, &args.wait).await
}

async fn publish(nats_url: &str, id: &str, cmd: &Command, wait: &WaitArgs) -> Result<()> {
    let bus = tokio::time::timeout(Duration::from_secs(10), Bus::connect(nats_url, "berth-cli"))
        .await
        .with_context(|| {
            format!("no NATS server answered at {nats_url} within 10 s (is `berth up` running?)")
        })??;
    // Subscribe before publishing so no event is missed.
    let mut events = if wait.wait {
        Some(bus.client().subscribe(subjects::event_subject(id)?).await?)
    } else {
        None
    };
    let seq = bus.publish_command(id, cmd).await?;
    println!("{id}: accepted as command {seq}");
    let Some(events) = events.as_mut() else {
        return Ok(());
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.timeout);
    let settled = berth_bus::settle::settled(events, seq, deadline, |ev| {
        println!("{}", crate::watch::line(ev));
    })
    .await;
    match settled {
        None => bail!("{id}: no resting state within {} s", wait.timeout),
        Some(ev) if ev.state == berth_proto::InstanceState::Error => {
            bail!("{id}: {}", ev.reason.unwrap_or_default())
        }
        Some(_) => Ok(()),
    }
}
