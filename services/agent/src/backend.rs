//! What to run for an assignment: the command line, environment and readiness probe of each
//! model server berth knows (llama.cpp's `llama-server`, vLLM, SGLang, a custom argv
//! template). Pure:
//! no process is started here (that is [`crate::supervisor`]), nothing is async.
//!
//! Which backend an assignment gets is [`plan`]'s decision:
//! - a start whose backend is `custom` with an `argv` template runs that template;
//! - a start with `model_ref = {"path": …}` runs llama.cpp (the default), vLLM or SGLang on
//!   that path;
//! - anything else — no `model_ref` (only `vram_bytes`), a model given as a profile or as
//!   numbers, a custom claim without `argv` — is a plain **reservation**: the GPUs are held
//!   and the instance reports `running` at once, with no process and no endpoint.
//!
//! An instance spread over several workers ([`Stage`]) runs only on llama.cpp: each follower
//! runs `ggml-rpc-server` ([`RpcServer`]) for its GPUs, and the leader runs `llama-server`
//! with `--rpc` naming the followers' servers. Any other backend over several workers is an
//! error (the analyzers do not choose such shapes).

use berth_options::{
    CustomClaim, EstimateOptions, KvCacheType, LlamaCppOptions, ModelRef, Placeholder,
    SglangOptions, TemplatePiece, VllmOptions, template_pieces,
};
use berth_proto::StartSpec;
use std::path::{Path, PathBuf};

/// Why an assignment cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
}

/// One GPU of an assignment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssignedGpu {
    pub index: u32,
    /// NVML UUID; empty for a simulated GPU.
    pub uuid: String,
    /// Bytes reserved for the instance on it.
    pub bytes: i64,
    /// The GPU's memory (0 when unknown).
    pub total_bytes: i64,
}

/// Where and on what one placement runs.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// Model name (for the server's alias), else the instance id.
    pub name: &'a str,
    pub host: &'a str,
    pub port: u16,
    pub gpus: &'a [AssignedGpu],
    /// The GPUs are real (CUDA); false for a simulated inventory: the server runs on CPUs.
    pub cuda: bool,
    /// The leader of an instance spread over several workers: the followers' RPC servers
    /// (`host:port`), in stage order. Empty otherwise.
    pub rpc: &'a [String],
}

/// A command line to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLine {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Added to the agent's environment (the supervisor adds `CUDA_VISIBLE_DEVICES`).
    pub env: Vec<(String, String)>,
}

/// How the supervisor tells a server is ready, and healthy while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// Paths that must each answer `200` to a GET, in order; the same while it runs.
    Http(Vec<String>),
    /// Ready once a TCP connection is accepted; while it runs, healthy as long as its group
    /// still listens on the port (seen in `/proc`, without connecting: llama.cpp's RPC server
    /// serves one client at a time and keeps only one more waiting).
    Listening,
}

/// A model server: how to start it for an assignment and how to tell it is ready.
pub trait Backend: std::fmt::Debug + Send + Sync {
    /// For logs and reasons: "llama.cpp", "vLLM", "custom".
    fn name(&self) -> &'static str;
    fn command(&self, launch: &Launch<'_>) -> Result<CommandLine, BackendError>;
    fn probe(&self) -> Probe;
}

/// Server binaries, as the agent's flags give them.
#[derive(Debug, Clone, Default)]
pub struct Binaries {
    pub llama_server: Option<PathBuf>,
    /// llama.cpp's `ggml-rpc-server`, for the followers of an instance over several workers.
    pub rpc_server: Option<PathBuf>,
    pub vllm: Option<PathBuf>,
    /// The Python that has SGLang installed (else `python3` on PATH).
    pub sglang_python: Option<PathBuf>,
}

/// Which part of an instance an assignment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// The instance runs on this worker alone.
    Alone,
    /// The first of several workers: runs the model server, with the followers' stages.
    Leader,
    /// One of the others: runs a stage for the leader (llama.cpp's RPC server).
    Follower,
}

impl Stage {
    /// This worker's stage among `workers` (the assignment's list, the first leads).
    pub fn of(worker_id: &str, workers: &[String]) -> Stage {
        match workers {
            [] | [_] => Stage::Alone,
            [first, ..] if first == worker_id => Stage::Leader,
            _ => Stage::Follower,
        }
    }
}

/// What an assignment asks of the runtime.
#[derive(Debug)]
pub enum Plan {
    /// Hold the GPUs; nothing to run.
    Reserve,
    Run(Box<dyn Backend>),
}

/// Chooses the backend for `spec` and this worker's `stage` of it (see the module doc); a
/// missing binary, a bad template or a backend that cannot run over several workers is an
/// error for the instance's report.
pub fn plan(spec: &StartSpec, bins: &Binaries, stage: Stage) -> Result<Plan, BackendError> {
    let plan = plan_alone(spec, bins)?;
    let Plan::Run(backend) = &plan else {
        // A reservation holds its GPUs on every worker alike.
        return Ok(plan);
    };
    match stage {
        Stage::Alone => Ok(plan),
        _ if backend.name() != LLAMA_CPP => Err(BackendError::Invalid(format!(
            "{} cannot run over several workers (only llama.cpp can, through its RPC server)",
            backend.name()
        ))),
        Stage::Leader => Ok(plan),
        Stage::Follower => Ok(Plan::Run(Box::new(RpcServer {
            binary: find_rpc_server(bins)?,
        }))),
    }
}

fn plan_alone(spec: &StartSpec, bins: &Binaries) -> Result<Plan, BackendError> {
    let options = spec.backend.as_deref();
    if let Some(EstimateOptions::Custom(claim)) = options {
        if claim.argv.is_empty() {
            return Ok(Plan::Reserve);
        }
        claim
            .validate()
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        return Ok(Plan::Run(Box::new(Custom {
            claim: claim.clone(),
            model: model_path(spec).map(Path::to_path_buf),
        })));
    }
    let Some(path) = model_path(spec) else {
        return Ok(Plan::Reserve);
    };
    let path = path.to_path_buf();
    match options {
        Some(EstimateOptions::Vllm(o)) => Ok(Plan::Run(Box::new(Vllm {
            binary: find_vllm(bins)?,
            options: o.clone(),
            model: path,
        }))),
        Some(EstimateOptions::Sglang(o)) => Ok(Plan::Run(Box::new(Sglang {
            python: find_sglang_python(bins)?,
            options: o.clone(),
            model: path,
        }))),
        Some(EstimateOptions::LlamaCpp(o)) => Ok(Plan::Run(Box::new(LlamaCpp {
            binary: find_llama_server(bins)?,
            options: o.clone(),
            model: path,
        }))),
        _ => Ok(Plan::Run(Box::new(LlamaCpp {
            binary: find_llama_server(bins)?,
            options: LlamaCppOptions::default(),
            model: path,
        }))),
    }
}

fn model_path(spec: &StartSpec) -> Option<&Path> {
    match spec.model_ref.as_deref() {
        Some(ModelRef::Path(p)) => Some(p),
        _ => None,
    }
}

/// `--llama-server` (or `BERTH_LLAMA_SERVER`), else `llama-server` on `PATH`, else the newest
/// build of `ops/build-llama.sh` under `~/.cache/berth/llama.cpp/*/bin/`.
pub fn find_llama_server(bins: &Binaries) -> Result<PathBuf, BackendError> {
    find(
        bins.llama_server.as_deref(),
        LLAMA_SERVER,
        "set --llama-server or run ops/build-llama.sh",
        || newest_build(&cache_root()?, LLAMA_SERVER),
    )
}

/// `--rpc-server` (or `BERTH_RPC_SERVER`), else `ggml-rpc-server` on `PATH`, else the one
/// next to the llama-server found (a build holds both), else the newest cached build.
pub fn find_rpc_server(bins: &Binaries) -> Result<PathBuf, BackendError> {
    find(
        bins.rpc_server.as_deref(),
        RPC_SERVER,
        "set --rpc-server or run ops/build-llama.sh",
        || {
            let beside = find_llama_server(bins)
                .ok()
                .and_then(|l| Some(l.parent()?.join(RPC_SERVER)))
                .filter(|p| is_executable(p));
            beside.or_else(|| newest_build(&cache_root()?, RPC_SERVER))
        },
    )
}

fn find_vllm(bins: &Binaries) -> Result<PathBuf, BackendError> {
    find(
        bins.vllm.as_deref(),
        "vllm",
        "set --vllm or install vLLM on PATH",
        || None,
    )
}

fn find_sglang_python(bins: &Binaries) -> Result<PathBuf, BackendError> {
    find(
        bins.sglang_python.as_deref(),
        "python3",
        "set --sglang-python to the Python that has SGLang installed",
        || None,
    )
}

/// The binary the flag names (which must be executable), else `name` on `PATH`, else what
/// `fallback` finds; the error says `hint`.
fn find(
    given: Option<&Path>,
    name: &str,
    hint: &str,
    fallback: impl FnOnce() -> Option<PathBuf>,
) -> Result<PathBuf, BackendError> {
    let not_found = format!("{name} not found: {hint}");
    match given {
        Some(p) if is_executable(p) => Ok(p.to_path_buf()),
        Some(p) => Err(BackendError::NotFound(format!(
            "{not_found} ({} is not an executable file)",
            p.display()
        ))),
        None => on_path(name)
            .or_else(fallback)
            .ok_or(BackendError::NotFound(not_found)),
    }
}

const LLAMA_CPP: &str = "llama.cpp";
const LLAMA_SERVER: &str = "llama-server";
const RPC_SERVER: &str = "ggml-rpc-server";

/// Where `ops/build-llama.sh` puts its builds.
fn cache_root() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    Some(home.join(".cache/berth/llama.cpp"))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// `<root>/<version>/bin/<name>` of the highest version (`11434.0.0` > `9000.1.0`).
fn newest_build(root: &Path, name: &str) -> Option<PathBuf> {
    let version = |name: &str| -> Vec<u64> {
        name.split('.')
            .map(|part| part.parse().unwrap_or(0))
            .collect()
    };
    std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let bin = e.path().join("bin").join(name);
            is_executable(&bin).then(|| (version(&e.file_name().to_string_lossy()), bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

/// llama.cpp's `llama-server`.
#[derive(Debug, Clone)]
pub struct LlamaCpp {
    pub binary: PathBuf,
    pub options: LlamaCppOptions,
    pub model: PathBuf,
}

/// Layers to offload when the options do not say: more than any model has, i.e. all.
const ALL_LAYERS: u32 = 999;

fn cache_type(t: KvCacheType) -> &'static str {
    match t {
        KvCacheType::F32 => "f32",
        KvCacheType::F16 => "f16",
        KvCacheType::Bf16 => "bf16",
        KvCacheType::Q8_0 => "q8_0",
        KvCacheType::Q4_0 => "q4_0",
        KvCacheType::Q4_1 => "q4_1",
        KvCacheType::Iq4Nl => "iq4_nl",
        KvCacheType::Q5_0 => "q5_0",
        KvCacheType::Q5_1 => "q5_1",
    }
}

impl Backend for LlamaCpp {
    fn name(&self) -> &'static str {
        LLAMA_CPP
    }

    fn command(&self, l: &Launch<'_>) -> Result<CommandLine, BackendError> {
        let o = &self.options;
        // With followers, layers go to their RPC servers even on simulated GPUs (their CPUs).
        let layers = if l.cuda || !l.rpc.is_empty() {
            o.gpu_layers.unwrap_or(ALL_LAYERS)
        } else {
            0
        };
        let mut args = vec![
            "-m".to_owned(),
            self.model.display().to_string(),
            "--host".to_owned(),
            l.host.to_owned(),
            "--port".to_owned(),
            l.port.to_string(),
            "-c".to_owned(),
            o.context.unwrap_or(0).to_string(),
            "-ngl".to_owned(),
            layers.to_string(),
        ];
        if !l.rpc.is_empty() {
            // No --tensor-split: the leader does not know what the followers' GPUs hold, and
            // llama.cpp splits by each device's free memory.
            args.extend(["--rpc".to_owned(), l.rpc.join(",")]);
        } else if l.cuda && l.gpus.len() > 1 {
            // Proportional to what each GPU holds for the instance (MiB keeps it short).
            let split: Vec<String> = l
                .gpus
                .iter()
                .map(|g| (g.bytes.max(0) >> 20).max(1).to_string())
                .collect();
            args.extend(["--tensor-split".to_owned(), split.join(",")]);
        }
        args.extend([
            "-ctk".to_owned(),
            cache_type(o.cache_type_k).to_owned(),
            "-ctv".to_owned(),
            cache_type(o.cache_type_v).to_owned(),
            "-fa".to_owned(),
            o.flash_attention.as_arg().to_owned(),
            "-np".to_owned(),
            o.parallel.to_string(),
            "-ub".to_owned(),
            o.ubatch.to_string(),
            "--alias".to_owned(),
            l.name.to_owned(),
        ]);
        Ok(CommandLine {
            program: self.binary.clone(),
            args,
            env: Vec::new(),
        })
    }

    fn probe(&self) -> Probe {
        Probe::Http(vec!["/health".into()])
    }
}

/// llama.cpp's `ggml-rpc-server`: a follower's stage of an instance spread over several
/// workers. It holds the layers the leader's `llama-server` sends it, on this worker's GPUs
/// (its CPU with simulated GPUs).
#[derive(Debug, Clone)]
pub struct RpcServer {
    pub binary: PathBuf,
}

impl Backend for RpcServer {
    fn name(&self) -> &'static str {
        "llama.cpp RPC server"
    }

    fn command(&self, l: &Launch<'_>) -> Result<CommandLine, BackendError> {
        let mut args = vec![
            "-H".to_owned(),
            l.host.to_owned(),
            "-p".to_owned(),
            l.port.to_string(),
        ];
        if !l.cuda {
            // Simulated GPUs: the CPU, even where a GPU build would find a real one.
            args.extend(["-d".to_owned(), "CPU".to_owned()]);
        }
        Ok(CommandLine {
            program: self.binary.clone(),
            args,
            env: Vec::new(),
        })
    }

    fn probe(&self) -> Probe {
        Probe::Listening
    }
}

/// `vllm serve`.
#[derive(Debug, Clone)]
pub struct Vllm {
    pub binary: PathBuf,
    pub options: VllmOptions,
    pub model: PathBuf,
}

impl Backend for Vllm {
    fn name(&self) -> &'static str {
        "vLLM"
    }

    fn command(&self, l: &Launch<'_>) -> Result<CommandLine, BackendError> {
        let o = &self.options;
        let mut args = vec![
            "serve".to_owned(),
            self.model.display().to_string(),
            "--host".to_owned(),
            l.host.to_owned(),
            "--port".to_owned(),
            l.port.to_string(),
            "--served-model-name".to_owned(),
            l.name.to_owned(),
            "--tensor-parallel-size".to_owned(),
            o.tensor_parallel.to_string(),
        ];
        let mut opt = |flag: &str, value: String| args.extend([flag.to_owned(), value]);
        if o.pipeline_parallel > 1 {
            opt("--pipeline-parallel-size", o.pipeline_parallel.to_string());
        }
        // With no share (berth reserved only the estimate), vLLM must not take its default
        // 0.9 of each GPU: it gets the share berth reserved, less what vLLM allocates
        // outside its share (the CUDA context), so that its whole footprint stays within.
        if let Some(u) = o
            .gpu_memory_utilization
            .or_else(|| reserved_share(l.gpus, o.outside_share_bytes()))
        {
            opt("--gpu-memory-utilization", u.to_string());
        }
        if let Some(len) = o.max_model_len {
            opt("--max-model-len", len.to_string());
        }
        // Unset: vLLM's own defaults (GPU-dependent); the estimate allows for the larger.
        if let Some(n) = o.max_num_seqs {
            opt("--max-num-seqs", n.to_string());
        }
        if let Some(n) = o.max_num_batched_tokens {
            opt("--max-num-batched-tokens", n.to_string());
        }
        opt("--block-size", o.block_size.to_string());
        let dtype = match o.kv_cache_dtype {
            berth_options::VllmKvDtype::Auto => None,
            berth_options::VllmKvDtype::Fp8 => Some("fp8"),
            berth_options::VllmKvDtype::Fp8E4m3 => Some("fp8_e4m3"),
            berth_options::VllmKvDtype::Fp8E5m2 => Some("fp8_e5m2"),
        };
        if let Some(d) = dtype {
            opt("--kv-cache-dtype", d.to_owned());
        }
        if o.enforce_eager {
            args.push("--enforce-eager".to_owned());
        }
        Ok(CommandLine {
            program: self.binary.clone(),
            args,
            env: Vec::new(),
        })
    }

    fn probe(&self) -> Probe {
        Probe::Http(vec!["/health".into(), "/v1/models".into()])
    }
}

/// SGLang's server, `python -m sglang.launch_server`.
#[derive(Debug, Clone)]
pub struct Sglang {
    pub python: PathBuf,
    pub options: SglangOptions,
    pub model: PathBuf,
}

impl Backend for Sglang {
    fn name(&self) -> &'static str {
        "SGLang"
    }

    fn command(&self, l: &Launch<'_>) -> Result<CommandLine, BackendError> {
        let o = &self.options;
        let mut args = vec![
            "-m".to_owned(),
            "sglang.launch_server".to_owned(),
            "--model-path".to_owned(),
            self.model.display().to_string(),
            "--host".to_owned(),
            l.host.to_owned(),
            "--port".to_owned(),
            l.port.to_string(),
            "--served-model-name".to_owned(),
            l.name.to_owned(),
            "--tp-size".to_owned(),
            o.tensor_parallel.to_string(),
        ];
        let mut opt = |flag: &str, value: String| args.extend([flag.to_owned(), value]);
        // Unset: SGLang's own defaults for the GPU it finds, which berth's claim follows.
        if let Some(f) = o.mem_fraction_static {
            opt("--mem-fraction-static", f.to_string());
        }
        if let Some(len) = o.context_length {
            opt("--context-length", len.to_string());
        }
        if let Some(n) = o.chunked_prefill_size {
            opt("--chunked-prefill-size", n.to_string());
        }
        if let Some(n) = o.cuda_graph_max_bs {
            opt("--cuda-graph-max-bs", n.to_string());
        }
        if o.kv_cache_dtype != berth_options::SglangKvDtype::Auto {
            opt("--kv-cache-dtype", o.kv_cache_dtype.as_arg().to_owned());
        }
        if o.disable_cuda_graph {
            args.push("--disable-cuda-graph".to_owned());
        }
        Ok(CommandLine {
            program: self.python.clone(),
            args,
            env: Vec::new(),
        })
    }

    fn probe(&self) -> Probe {
        Probe::Http(vec!["/health".into(), "/v1/models".into()])
    }
}

/// A server given as an argv template (see [`CustomClaim::argv`]).
#[derive(Debug, Clone)]
pub struct Custom {
    pub claim: CustomClaim,
    pub model: Option<PathBuf>,
}

impl Backend for Custom {
    fn name(&self) -> &'static str {
        "custom"
    }

    fn command(&self, l: &Launch<'_>) -> Result<CommandLine, BackendError> {
        let mut argv = self
            .claim
            .argv
            .iter()
            .map(|arg| self.expand(arg, l))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let Some(program) = argv.next() else {
            return Err(BackendError::Invalid("custom argv is empty".into()));
        };
        Ok(CommandLine {
            program: PathBuf::from(program),
            args: argv.collect(),
            env: Vec::new(),
        })
    }

    fn probe(&self) -> Probe {
        Probe::Http(vec![
            self.claim
                .ready_path
                .clone()
                .unwrap_or_else(|| "/health".into()),
        ])
    }
}

impl Custom {
    fn expand(&self, arg: &str, l: &Launch<'_>) -> Result<String, BackendError> {
        let invalid = |e: String| BackendError::Invalid(e);
        let mut out = String::with_capacity(arg.len());
        for piece in template_pieces(arg).map_err(|e| invalid(e.to_string()))? {
            match piece {
                TemplatePiece::Text(t) => out.push_str(t),
                TemplatePiece::Placeholder(p) => match p {
                    Placeholder::Model => match &self.model {
                        Some(path) => out.push_str(&path.display().to_string()),
                        None => out.push_str(l.name),
                    },
                    Placeholder::Port => out.push_str(&l.port.to_string()),
                    Placeholder::Host => out.push_str(l.host),
                    Placeholder::Gpus => out.push_str(&l.gpus.len().to_string()),
                    Placeholder::Ctx => match self.claim.context {
                        Some(c) => out.push_str(&c.to_string()),
                        None => {
                            return Err(invalid("argv uses {ctx} but context is not set".into()));
                        }
                    },
                },
            }
        }
        Ok(out)
    }
}

/// The share of its GPU to give vLLM so that its whole footprint stays within what the
/// placement reserved on each of `gpus`: vLLM sizes everything to `total ×
/// gpu_memory_utilization` and allocates `outside` bytes (its CUDA context) besides, so the
/// share is `(reserved − outside) / total`, the least over the GPUs, rounded down to a
/// millionth (at most a few hundred KiB under the reservation). `None` when no GPU's total
/// is known.
fn reserved_share(gpus: &[AssignedGpu], outside: u64) -> Option<f64> {
    gpus.iter()
        .filter(|g| g.total_bytes > 0 && g.bytes > 0)
        .map(|g| {
            let inside = u64::try_from(g.bytes)
                .unwrap_or(0)
                .saturating_sub(outside)
                .max(1);
            // Byte counts are far below 2^53: exact as f64.
            #[expect(
                clippy::cast_precision_loss,
                reason = "GPU byte counts stay below 2^53"
            )]
            let share = inside as f64 / g.total_bytes as f64;
            ((share * 1e6).floor() / 1e6).clamp(1e-6, 1.0)
        })
        .fold(None, |least: Option<f64>, s| {
            Some(least.map_or(s, |m| m.min(s)))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_options::VllmKvDtype;

    fn gpus(bytes: &[i64]) -> Vec<AssignedGpu> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, b)| AssignedGpu {
                index: u32::try_from(i).unwrap(),
                uuid: format!("GPU-{i}"),
                bytes: *b,
                total_bytes: 80 << 30,
            })
            .collect()
    }

    #[test]
    fn vllm_without_a_share_stays_within_what_berth_reserved() {
        let g = gpus(&[30 << 30, 41 << 30]);
        let ctx = berth_options::VLLM_CUDA_CONTEXT;
        // vLLM takes total × share inside its accounting and its CUDA context besides, so
        // the share leaves the context out of the smaller reservation.
        let share = reserved_share(&g, ctx).unwrap();
        assert_eq!(share, 0.368_75);
        let total = 80u64 << 30;
        let used = (total as f64 * share).ceil() as u64 + ctx;
        assert!(used <= 30 << 30, "{used}");
        assert!(
            (30u64 << 30) - used < 100 << 10,
            "within 100 KiB of the reservation"
        );
        assert_eq!(reserved_share(&[], ctx), None);
        let b = Vllm {
            options: VllmOptions {
                gpu_memory_utilization: None,
                ..VllmOptions::default()
            },
            model: "/m/llama".into(),
            binary: "vllm".into(),
        };
        let c = b.command(&launch(&g, true)).unwrap();
        let at = c
            .args
            .iter()
            .position(|a| a == "--gpu-memory-utilization")
            .unwrap();
        assert_eq!(c.args[at + 1], "0.36875");
    }

    fn launch<'a>(gpus: &'a [AssignedGpu], cuda: bool) -> Launch<'a> {
        Launch {
            name: "smol",
            host: "127.0.0.1",
            port: 40001,
            gpus,
            cuda,
            rpc: &[],
        }
    }

    fn args(c: &CommandLine) -> String {
        c.args.join(" ")
    }

    #[test]
    fn llama_server_offloads_everything_and_splits_by_reserved_bytes() {
        let b = LlamaCpp {
            binary: "/opt/llama-server".into(),
            options: LlamaCppOptions {
                context: Some(8192),
                cache_type_k: KvCacheType::Q8_0,
                cache_type_v: KvCacheType::Iq4Nl,
                flash_attention: berth_options::FlashAttention::Off,
                parallel: 4,
                ubatch: 256,
                ..LlamaCppOptions::default()
            },
            model: "/m/x.gguf".into(),
        };
        let two = gpus(&[30 << 30, 10 << 30]);
        let c = b.command(&launch(&two, true)).unwrap();
        assert_eq!(c.program, PathBuf::from("/opt/llama-server"));
        assert_eq!(
            args(&c),
            "-m /m/x.gguf --host 127.0.0.1 --port 40001 -c 8192 -ngl 999 \
             --tensor-split 30720,10240 -ctk q8_0 -ctv iq4_nl -fa off -np 4 -ub 256 --alias smol"
        );
        assert_eq!(b.probe(), Probe::Http(vec!["/health".into()]));
    }

    #[test]
    fn llama_server_runs_on_cpus_for_simulated_gpus_and_keeps_partial_offload() {
        let mut b = LlamaCpp {
            binary: "llama-server".into(),
            options: LlamaCppOptions::default(),
            model: "/m/x.gguf".into(),
        };
        let one = gpus(&[1 << 30]);
        let sim = args(&b.command(&launch(&one, false)).unwrap());
        assert!(
            sim.contains("-c 0 -ngl 0 -ctk f16 -ctv f16 -fa auto -np 1 -ub 512"),
            "{sim}"
        );
        assert!(!sim.contains("--tensor-split"));
        b.options.gpu_layers = Some(20);
        let real = args(&b.command(&launch(&one, true)).unwrap());
        assert!(real.contains("-ngl 20 "), "{real}");
        assert!(!real.contains("--tensor-split"), "one GPU: no split");
    }

    #[test]
    fn vllm_serves_with_the_engine_options_set() {
        let b = Vllm {
            binary: "/usr/bin/vllm".into(),
            options: VllmOptions {
                tensor_parallel: 2,
                max_model_len: Some(32768),
                gpu_memory_utilization: Some(0.85),
                max_num_seqs: Some(64),
                kv_cache_dtype: VllmKvDtype::Fp8,
                enforce_eager: true,
                ..VllmOptions::default()
            },
            model: "/m/llama".into(),
        };
        let two = gpus(&[70 << 30, 70 << 30]);
        let c = b.command(&launch(&two, true)).unwrap();
        assert_eq!(
            args(&c),
            "serve /m/llama --host 127.0.0.1 --port 40001 --served-model-name smol \
             --tensor-parallel-size 2 --gpu-memory-utilization 0.85 --max-model-len 32768 \
             --max-num-seqs 64 --block-size 16 \
             --kv-cache-dtype fp8 --enforce-eager"
        );
        assert_eq!(
            b.probe(),
            Probe::Http(vec!["/health".into(), "/v1/models".into()])
        );
    }

    #[test]
    fn sglang_launches_with_the_options_set_and_its_own_defaults_otherwise() {
        let b = Sglang {
            python: "/opt/venv/bin/python".into(),
            options: SglangOptions {
                tensor_parallel: 2,
                context_length: Some(32768),
                mem_fraction_static: Some(0.8),
                cuda_graph_max_bs: Some(64),
                kv_cache_dtype: berth_options::SglangKvDtype::Fp8E4m3,
                ..SglangOptions::default()
            },
            model: "/m/llama".into(),
        };
        let two = gpus(&[70 << 30, 70 << 30]);
        let c = b.command(&launch(&two, true)).unwrap();
        assert_eq!(c.program, PathBuf::from("/opt/venv/bin/python"));
        assert_eq!(
            args(&c),
            "-m sglang.launch_server --model-path /m/llama --host 127.0.0.1 --port 40001 \
             --served-model-name smol --tp-size 2 --mem-fraction-static 0.8 \
             --context-length 32768 --cuda-graph-max-bs 64 --kv-cache-dtype fp8_e4m3"
        );
        let plain = Sglang {
            options: SglangOptions::default(),
            ..b
        };
        assert_eq!(
            args(&plain.command(&launch(&two, true)).unwrap()),
            "-m sglang.launch_server --model-path /m/llama --host 127.0.0.1 --port 40001 \
             --served-model-name smol --tp-size 1"
        );
        assert_eq!(
            plain.probe(),
            Probe::Http(vec!["/health".into(), "/v1/models".into()])
        );
    }

    fn custom(argv: &[&str]) -> Custom {
        Custom {
            claim: CustomClaim {
                bytes_per_gpu: 1 << 30,
                argv: argv.iter().map(|a| (*a).to_owned()).collect(),
                context: Some(4096),
                ..CustomClaim::default()
            },
            model: Some("/m/x.gguf".into()),
        }
    }

    #[test]
    fn a_custom_template_expands_its_placeholders() {
        let b = custom(&[
            "python3",
            "srv.py",
            "--model={model}",
            "--listen",
            "{host}:{port}",
            "--gpus",
            "{gpus}",
            "-c",
            "{ctx}",
            "{{literal}}",
        ]);
        let two = gpus(&[1, 1]);
        let c = b.command(&launch(&two, false)).unwrap();
        assert_eq!(c.program, PathBuf::from("python3"));
        assert_eq!(
            args(&c),
            "srv.py --model=/m/x.gguf --listen 127.0.0.1:40001 --gpus 2 -c 4096 {literal}"
        );
        assert_eq!(b.probe(), Probe::Http(vec!["/health".into()]));
        let named = Custom {
            model: None,
            ..custom(&["srv", "{model}"])
        };
        assert_eq!(args(&named.command(&launch(&two, false)).unwrap()), "smol");
    }

    #[test]
    fn unknown_placeholders_are_refused() {
        let two = gpus(&[1, 1]);
        for bad in ["{modle}", "{port", "x}"] {
            assert!(
                custom(&["srv", bad]).command(&launch(&two, false)).is_err(),
                "{bad}"
            );
        }
        let spec = StartSpec {
            backend: Some(Box::new(EstimateOptions::Custom(CustomClaim {
                argv: vec!["srv".into(), "{nope}".into()],
                ..CustomClaim::default()
            }))),
            ..StartSpec::claim(1 << 30, 1)
        };
        assert!(matches!(
            plan(&spec, &Binaries::default(), Stage::Alone),
            Err(BackendError::Invalid(_))
        ));
    }

    #[test]
    fn a_start_without_a_model_path_is_a_reservation() {
        let bins = Binaries::default();
        assert!(matches!(
            plan(&StartSpec::claim(1 << 30, 1), &bins, Stage::Alone),
            Ok(Plan::Reserve)
        ));
        let claim_only = StartSpec {
            backend: Some(Box::new(EstimateOptions::Custom(CustomClaim::default()))),
            ..StartSpec::claim(1 << 30, 1)
        };
        assert!(matches!(
            plan(&claim_only, &bins, Stage::Follower),
            Ok(Plan::Reserve)
        ));
    }

    #[test]
    fn a_missing_server_binary_is_named_in_the_error() {
        let bins = Binaries {
            llama_server: Some("/nonexistent/llama-server".into()),
            rpc_server: Some("/nonexistent/ggml-rpc-server".into()),
            vllm: Some("/nonexistent/vllm".into()),
            sglang_python: Some("/nonexistent/python3".into()),
        };
        let spec = StartSpec {
            model_ref: Some(Box::new(ModelRef::Path("/m/x.gguf".into()))),
            ..StartSpec::claim(1 << 30, 1)
        };
        let err = plan(&spec, &bins, Stage::Alone).unwrap_err().to_string();
        assert!(
            err.contains("llama-server not found: set --llama-server or run ops/build-llama.sh"),
            "{err}"
        );
        let vllm = StartSpec {
            backend: Some(Box::new(EstimateOptions::Vllm(VllmOptions::default()))),
            ..spec
        };
        assert!(
            plan(&vllm, &bins, Stage::Alone)
                .unwrap_err()
                .to_string()
                .contains("vllm not found")
        );
    }

    fn executable(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn the_newest_llama_build_is_found() {
        let root = tempfile::tempdir().unwrap();
        for v in ["9000.1.0", "11434.0.0", "10000.0.0"] {
            executable(&root.path().join(v).join("bin/llama-server"));
        }
        assert_eq!(
            newest_build(root.path(), LLAMA_SERVER).unwrap(),
            root.path().join("11434.0.0/bin/llama-server")
        );
        assert_eq!(newest_build(root.path(), RPC_SERVER), None);
    }

    #[test]
    fn the_rpc_server_is_found_next_to_the_llama_server() {
        let dir = tempfile::tempdir().unwrap();
        let llama = dir.path().join("bin/llama-server");
        executable(&llama);
        executable(&dir.path().join("bin/ggml-rpc-server"));
        let bins = Binaries {
            llama_server: Some(llama),
            ..Binaries::default()
        };
        let rpc = find_rpc_server(&bins).unwrap();
        assert!(
            rpc == dir.path().join("bin/ggml-rpc-server") || on_path(RPC_SERVER) == Some(rpc),
            "the one on PATH comes first"
        );
    }

    fn smol(backend: Option<EstimateOptions>) -> StartSpec {
        StartSpec {
            model_ref: Some(Box::new(ModelRef::Path("/m/x.gguf".into()))),
            backend: backend.map(Box::new),
            ..StartSpec::claim(1 << 30, 1)
        }
    }

    #[test]
    fn stages_over_several_workers_run_llama_cpp_only() {
        let dir = tempfile::tempdir().unwrap();
        let bins = Binaries {
            llama_server: Some(dir.path().join("llama-server")),
            rpc_server: Some(dir.path().join("ggml-rpc-server")),
            vllm: Some(dir.path().join("vllm")),
            sglang_python: None,
        };
        for exe in ["llama-server", "ggml-rpc-server", "vllm"] {
            executable(&dir.path().join(exe));
        }
        let Ok(Plan::Run(follower)) = plan(&smol(None), &bins, Stage::Follower) else {
            panic!("a follower runs the RPC server");
        };
        assert_eq!(follower.probe(), Probe::Listening);
        let g = gpus(&[1 << 30]);
        let sim = follower.command(&launch(&g, false)).unwrap();
        assert_eq!(sim.program, dir.path().join("ggml-rpc-server"));
        assert_eq!(args(&sim), "-H 127.0.0.1 -p 40001 -d CPU");
        assert_eq!(
            args(&follower.command(&launch(&g, true)).unwrap()),
            "-H 127.0.0.1 -p 40001"
        );
        let Ok(Plan::Run(leader)) = plan(&smol(None), &bins, Stage::Leader) else {
            panic!("a leader runs llama-server");
        };
        let rpc = ["10.0.0.2:40000".to_owned(), "10.0.0.3:40000".to_owned()];
        let two = gpus(&[1 << 30, 1 << 30]);
        let led = args(
            &leader
                .command(&Launch {
                    rpc: &rpc,
                    ..launch(&two, false)
                })
                .unwrap(),
        );
        assert!(
            led.contains("-ngl 999 --rpc 10.0.0.2:40000,10.0.0.3:40000 -ctk"),
            "{led}"
        );
        for other in [
            EstimateOptions::Vllm(VllmOptions::default()),
            EstimateOptions::Sglang(SglangOptions::default()),
            EstimateOptions::Custom(CustomClaim {
                argv: vec!["srv".into()],
                ..CustomClaim::default()
            }),
        ] {
            for stage in [Stage::Leader, Stage::Follower] {
                let err = plan(&smol(Some(other.clone())), &bins, stage).unwrap_err();
                assert!(
                    err.to_string().contains("cannot run over several workers"),
                    "{err}"
                );
            }
        }
        // A reservation over several workers holds its GPUs as today.
        assert!(matches!(
            plan(&StartSpec::claim(1 << 30, 1), &bins, Stage::Follower),
            Ok(Plan::Reserve)
        ));
        assert_eq!(
            Stage::of("w2", &["w1".into(), "w2".into()]),
            Stage::Follower
        );
        assert_eq!(Stage::of("w1", &["w1".into(), "w2".into()]), Stage::Leader);
        assert_eq!(Stage::of("w1", &["w1".into()]), Stage::Alone);
        assert_eq!(Stage::of("w1", &[]), Stage::Alone);
    }
}
