//! "Does it fit here?": the GPUs `berth estimate --on` describes (or a live cluster, read
//! from PostgreSQL with `--cluster`) as the placement search's worker views, and what the
//! search answers for the estimate's request: the shape and GPUs berth would choose, or the
//! same "nothing fits" reason an analyzer would store for a pending instance.
//!
//! `--on` takes one worker's GPUs per value, repeated for several workers: groups separated
//! by commas, each `COUNTxSIZE` (`2x80GiB`) or a GPU name with an optional count (`H100:4`,
//! `L4`). Names come from `--inventory FILE` (an agent inventory, `ops/inventory/*.toml`) or
//! else from [`KNOWN_GPUS`].

use anyhow::{Context, Result, bail};
use berth_fit::{FitError, Gpu, Placement, Policy, Request, Worker, gib, place};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Common GPUs and their memory as NVML reports it (MiB), with the short names `--on`
/// accepts for them.
pub const KNOWN_GPUS: &[(&str, &[&str], u64)] = &[
    ("NVIDIA H200", &["H200"], 143_771),
    ("NVIDIA H100 80GB HBM3", &["H100"], 81_559),
    ("NVIDIA A100-SXM4-80GB", &["A100-80GB"], 81_920),
    ("NVIDIA A100-SXM4-40GB", &["A100-40GB"], 40_960),
    ("NVIDIA L40S", &["L40S"], 46_068),
    ("NVIDIA L4", &["L4"], 23_034),
    ("NVIDIA A10G", &["A10G"], 23_028),
    ("Tesla T4", &["T4"], 15_360),
    ("NVIDIA GeForce RTX 4090", &["RTX4090", "4090"], 24_564),
    ("NVIDIA GeForce RTX 3090", &["RTX3090", "3090"], 24_576),
];

/// Most GPUs one `--on` worker may have.
const MAX_GPUS_PER_WORKER: u32 = 1024;

/// A GPU kind the names resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuKind {
    pub name: String,
    pub total_bytes: u64,
}

/// Where GPU names are looked up.
#[derive(Debug, Clone, Default)]
pub struct GpuNames {
    /// From an inventory file; empty: [`KNOWN_GPUS`].
    inventory: Vec<GpuKind>,
}

#[derive(Deserialize)]
struct InventoryFile {
    #[serde(default)]
    workers: Vec<InventoryWorker>,
}

#[derive(Deserialize)]
struct InventoryWorker {
    #[serde(default)]
    gpus: Vec<InventoryGpu>,
}

#[derive(Deserialize)]
struct InventoryGpu {
    name: String,
    vram: String,
}

impl GpuNames {
    /// The GPU kinds of an agent inventory file (its `[[workers.gpus]]` names and sizes).
    pub fn from_inventory(path: &Path) -> Result<GpuNames> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading inventory {}", path.display()))?;
        let file: InventoryFile = toml::from_str(&text)
            .with_context(|| format!("inventory {} is not valid", path.display()))?;
        let mut inventory: Vec<GpuKind> = Vec::new();
        for g in file.workers.iter().flat_map(|w| &w.gpus) {
            let total = berth_proto::size::parse_bytes(&g.vram)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("inventory {}: GPU {:?}", path.display(), g.name))?;
            let kind = GpuKind {
                name: g.name.clone(),
                total_bytes: u64::try_from(total).unwrap_or(0),
            };
            if !inventory.contains(&kind) {
                inventory.push(kind);
            }
        }
        if inventory.is_empty() {
            bail!("inventory {} names no GPUs", path.display());
        }
        Ok(GpuNames { inventory })
    }

    fn kinds(&self) -> Vec<(GpuKind, Vec<String>)> {
        if self.inventory.is_empty() {
            KNOWN_GPUS
                .iter()
                .map(|(name, short, mib)| {
                    (
                        GpuKind {
                            name: (*name).to_owned(),
                            total_bytes: mib << 20,
                        },
                        short.iter().map(|s| (*s).to_owned()).collect(),
                    )
                })
                .collect()
        } else {
            self.inventory
                .iter()
                .map(|k| (k.clone(), Vec::new()))
                .collect()
        }
    }

    /// The GPU `name` names: a short name exactly, else the one full name containing it
    /// (ignoring case); several of different sizes are ambiguous.
    pub fn lookup(&self, name: &str) -> Result<GpuKind, String> {
        let kinds = self.kinds();
        let want = name.to_ascii_lowercase();
        if let Some((k, _)) = kinds.iter().find(|(k, short)| {
            short.iter().any(|s| s.eq_ignore_ascii_case(name)) || k.name.eq_ignore_ascii_case(name)
        }) {
            return Ok(k.clone());
        }
        let mut found: Vec<&GpuKind> = kinds
            .iter()
            .map(|(k, _)| k)
            .filter(|k| k.name.to_ascii_lowercase().contains(&want))
            .collect();
        found.dedup_by(|a, b| a.total_bytes == b.total_bytes);
        match found.as_slice() {
            [one] => Ok((*one).clone()),
            [] => {
                let known: Vec<String> = kinds
                    .iter()
                    .map(|(k, short)| short.first().cloned().unwrap_or_else(|| k.name.clone()))
                    .collect();
                Err(format!(
                    "unknown GPU {name:?} (known: {}; or give COUNTxSIZE such as 2x80GiB)",
                    known.join(", ")
                ))
            }
            many => Err(format!(
                "GPU {name:?} is ambiguous: {}",
                many.iter()
                    .map(|k| format!("{} ({})", k.name, gib(k.total_bytes)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// One `--on` value: the GPUs of one worker.
pub fn parse_worker(spec: &str, names: &GpuNames) -> Result<Vec<GpuKind>, String> {
    let mut gpus = Vec::new();
    for group in spec.split(',').map(str::trim) {
        if group.is_empty() {
            return Err(format!("{spec:?}: an empty GPU group"));
        }
        let (count, kind) = parse_group(group, names)?;
        if count == 0 {
            return Err(format!("{group:?}: the GPU count must be at least 1"));
        }
        let total = u32::try_from(gpus.len())
            .unwrap_or(u32::MAX)
            .saturating_add(count);
        if total > MAX_GPUS_PER_WORKER {
            return Err(format!(
                "{spec:?}: at most {MAX_GPUS_PER_WORKER} GPUs on one worker"
            ));
        }
        gpus.extend(std::iter::repeat_n(kind, count as usize));
    }
    Ok(gpus)
}

/// `COUNTxSIZE`, or `NAME[:COUNT]`.
fn parse_group(group: &str, names: &GpuNames) -> Result<(u32, GpuKind), String> {
    let count = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{group:?}: {s:?} is not a GPU count"))
    };
    if let Some((n, size)) = group.split_once(['x', 'X'])
        && !n.is_empty()
        && n.bytes().all(|b| b.is_ascii_digit())
    {
        if size.trim().is_empty() {
            return Err(format!(
                "{group:?}: a size must follow the 'x' (such as 2x80GiB)"
            ));
        }
        let bytes = berth_proto::size::parse_bytes(size).map_err(|e| format!("{group:?}: {e}"))?;
        let bytes = u64::try_from(bytes).unwrap_or(0);
        if bytes == 0 {
            return Err(format!("{group:?}: the GPU size must be positive"));
        }
        let kind = GpuKind {
            name: format!("GPU {}", gib(bytes)),
            total_bytes: bytes,
        };
        return Ok((count(n)?, kind));
    }
    let (name, n) = match group.rsplit_once(':') {
        Some((name, n)) => (name, count(n)?),
        None => (group, 1),
    };
    Ok((n, names.lookup(name.trim())?))
}

/// Worker views of the `--on` values, named `on-1`, `on-2`, …, every GPU free.
pub fn workers_on(specs: &[Vec<GpuKind>]) -> Vec<Worker> {
    specs
        .iter()
        .enumerate()
        .map(|(w, gpus)| Worker {
            id: format!("on-{}", w + 1),
            schedulable: true,
            gpus: gpus
                .iter()
                .enumerate()
                .map(|(i, k)| Gpu {
                    index: u32::try_from(i).unwrap_or(u32::MAX),
                    name: k.name.clone(),
                    uuid: String::new(),
                    total_bytes: k.total_bytes,
                    free_bytes: k.total_bytes,
                })
                .collect(),
            ..Worker::default()
        })
        .collect()
}

/// The live cluster's workers and GPUs, with what berth may still reserve on each, as the
/// analyzers see them.
pub async fn workers_in_cluster(database_url: &str) -> Result<Vec<Worker>> {
    let shown = berth_store::connect::redacted(database_url);
    let store = berth_store::Store::connect(database_url, 1)?;
    let capacity = tokio::time::timeout(std::time::Duration::from_secs(10), store.capacity())
        .await
        .with_context(|| format!("PostgreSQL at {shown} did not answer within 10 s"))?
        .with_context(|| format!("reading workers from {shown}"))?;
    Ok(capacity
        .into_iter()
        .map(|(w, gpus)| Worker {
            labels: serde_json::from_value(w.labels).unwrap_or_default(),
            schedulable: w.schedulable,
            gpus: gpus
                .iter()
                .map(|g| Gpu {
                    index: g.idx.unsigned_abs(),
                    name: g.name.clone(),
                    uuid: g.uuid.clone(),
                    total_bytes: u64::try_from(g.total_bytes).unwrap_or(0),
                    free_bytes: u64::try_from(g.free_bytes()).unwrap_or(0),
                })
                .collect(),
            id: w.id,
            ..Worker::default()
        })
        .collect())
}

/// The placement search's answer, as `berth estimate` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Answer {
    pub fits: bool,
    /// The shape chosen ("tp=2", "split over 2 GPUs"); empty for a single plain shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<PartAnswer>,
    /// Why nothing fits: the reason an analyzer stores for a pending instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartAnswer {
    pub worker: String,
    pub gpus: Vec<GpuAnswer>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuAnswer {
    pub index: u32,
    pub name: String,
    pub total_bytes: u64,
    /// What berth reserves on it.
    pub bytes: u64,
}

/// Runs the placement search (binpack, the analyzers' default policy) on `workers`.
pub fn answer(workers: &[Worker], request: &Request) -> Answer {
    match place(workers, request, Policy::Binpack, &|| false) {
        Ok(p) => found(workers, request, &p),
        Err(FitError::NoFit(reason)) => Answer {
            fits: false,
            shape: None,
            placement: Vec::new(),
            reason: Some(reason),
        },
        Err(FitError::Cancelled) => Answer {
            fits: false,
            shape: None,
            placement: Vec::new(),
            reason: Some("cancelled".into()),
        },
    }
}

fn found(workers: &[Worker], request: &Request, p: &Placement) -> Answer {
    let placement = p
        .parts
        .iter()
        .map(|part| {
            let w = workers.iter().find(|w| w.id == part.worker_id);
            PartAnswer {
                worker: part.worker_id.clone(),
                gpus: part
                    .gpus
                    .iter()
                    .map(|slot| {
                        let g = w.and_then(|w| w.gpus.iter().find(|g| g.index == slot.index));
                        GpuAnswer {
                            index: slot.index,
                            name: g.map(|g| g.name.clone()).unwrap_or_default(),
                            total_bytes: g.map_or(0, |g| g.total_bytes),
                            bytes: slot.bytes,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    Answer {
        fits: true,
        shape: request
            .shapes
            .get(p.shape)
            .map(|s| s.label.clone())
            .filter(|l| !l.is_empty()),
        placement,
        reason: None,
    }
}

impl Answer {
    /// The answer in words and a table.
    pub fn to_text(&self) -> String {
        if !self.fits {
            return format!(
                "does not fit: {}\n",
                self.reason.as_deref().unwrap_or("nothing fits")
            );
        }
        let mut out = match &self.shape {
            Some(s) => format!("fits, at {s}:\n"),
            None => "fits:\n".to_owned(),
        };
        let mut table = comfy_table::Table::new();
        table
            .load_style(comfy_table::presets::NOTHING)
            .set_header(["WORKER", "GPU", "NAME", "MEMORY", "RESERVED"]);
        for part in &self.placement {
            for g in &part.gpus {
                table.add_row([
                    part.worker.clone(),
                    g.index.to_string(),
                    g.name.clone(),
                    gib(g.total_bytes),
                    gib(g.bytes),
                ]);
            }
        }
        out.push_str(&format!("{table}\n"));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn parse(spec: &str) -> Result<Vec<GpuKind>, String> {
        parse_worker(spec, &GpuNames::default())
    }

    #[test]
    fn counts_and_sizes_make_one_workers_gpus() {
        let g = parse("2x80GiB").unwrap();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].total_bytes, 80 * GIB);
        let mixed = parse("4x80GiB, 2x24GiB").unwrap();
        assert_eq!(mixed.len(), 6);
        assert_eq!(mixed[5].total_bytes, 24 * GIB);
        let named = parse("H100:4,L4").unwrap();
        assert_eq!(named.len(), 5);
        assert_eq!(named[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(named[0].total_bytes, 81_559 << 20);
        // "L4" is a short name of its own, not the L40S that contains it.
        assert_eq!(named[4].name, "NVIDIA L4");
        assert_eq!(parse("rtx4090").unwrap()[0].total_bytes, 24_564 << 20);
        // A full name's part names it when only one GPU has it.
        assert_eq!(parse("l40s:2").unwrap().len(), 2);
    }

    #[test]
    fn bad_gpu_specs_say_what_is_wrong() {
        for (spec, says) in [
            ("0x80GiB", "count must be at least 1"),
            ("2x", "a size must follow the 'x'"),
            ("2xlots", "2xlots"),
            ("H100:0", "count must be at least 1"),
            ("H100:many", "is not a GPU count"),
            ("H999", "unknown GPU \"H999\""),
            ("A100", "ambiguous"),
            ("2x0GiB", "must be positive"),
            ("4x80GiB,", "an empty GPU group"),
            ("2000x1GiB", "at most 1024 GPUs"),
        ] {
            let err = parse(spec).unwrap_err();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }

    #[test]
    fn an_inventory_names_its_own_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inv.toml");
        std::fs::write(
            &path,
            r#"
[[workers]]
id = "a"
system_reserved = "1GiB"
[[workers.gpus]]
name = "NVIDIA H100 80GB HBM3"
vram = "80GiB"
count = 4
[[workers]]
id = "b"
[[workers.gpus]]
name = "NVIDIA A100-SXM4-40GB"
vram = "40GiB"
"#,
        )
        .unwrap();
        let names = GpuNames::from_inventory(&path).unwrap();
        let g = parse_worker("H100:2,a100", &names).unwrap();
        assert_eq!(
            (g.len(), g[0].total_bytes, g[2].total_bytes),
            (3, 80 * GIB, 40 * GIB)
        );
        assert!(
            parse_worker("L4", &names)
                .unwrap_err()
                .contains("unknown GPU")
        );
    }

    #[test]
    fn the_search_answers_with_gpus_or_the_analyzers_reason() {
        let workers = workers_on(&[parse("2x24GiB").unwrap(), parse("1x80GiB").unwrap()]);
        let fits = answer(&workers, &Request::simple(30 * GIB, 1));
        assert!(fits.fits);
        assert_eq!(fits.placement[0].worker, "on-2");
        assert_eq!(fits.placement[0].gpus[0].bytes, 30 * GIB);
        let two = answer(&workers, &Request::simple(20 * GIB, 2));
        assert_eq!(two.placement[0].worker, "on-1");
        assert_eq!(two.placement[0].gpus.len(), 2);
        let no = answer(&workers, &Request::simple(90 * GIB, 1));
        assert!(!no.fits);
        let reason = no.reason.unwrap();
        assert_eq!(
            reason,
            berth_fit::explain_no_fit(&workers, &Request::simple(90 * GIB, 1))
        );
        assert!(reason.contains("on-2"), "{reason}");
    }
}
