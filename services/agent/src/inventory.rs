//! Simulated inventories: workers, labels and GPUs described in TOML.
//!
//! ```toml
//! [[workers]]
//! id = "gpu-a"
//! labels = { zone = "a" }
//! system_reserved = "1GiB"      # per GPU, optional
//! [[workers.gpus]]
//! name = "NVIDIA H100 80GB HBM3"
//! vram = "80GiB"
//! count = 4                     # optional, default 1
//! used_outside = "2GiB"         # optional: in use by processes outside berth, per GPU
//! ```

pub use berth_proto::size::parse_bytes;
use berth_proto::{GpuInfo, GpuUsage, subjects::validate_id};
use serde::Deserialize;
use std::{collections::BTreeMap, path::Path};

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("cannot read inventory {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("inventory {path} is not valid: {message}")]
    Parse { path: String, message: String },
    #[error("inventory {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    workers: Vec<WorkerEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkerEntry {
    id: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    system_reserved: Option<String>,
    #[serde(default)]
    gpus: Vec<GpuEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuEntry {
    name: String,
    vram: String,
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    used_outside: Option<String>,
}

fn one() -> u32 {
    1
}

/// One worker, ready to register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSpec {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub gpus: Vec<GpuInfo>,
    /// Where heartbeats get the memory in use outside berth.
    pub usage: Usage,
}

/// The source of the memory in use outside berth that heartbeats report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Usage {
    /// Fixed values (a simulated inventory's `used_outside`); empty reports nothing.
    Fixed(Vec<GpuUsage>),
    /// Read from NVML at every heartbeat.
    Nvml,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inventory {
    pub workers: Vec<WorkerSpec>,
}

/// Most GPUs one simulated worker may have.
const MAX_GPUS_PER_WORKER: u32 = 1024;

impl Inventory {
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses inventory TOML; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Inventory, InventoryError> {
        let file: File = toml::from_str(text).map_err(|e| InventoryError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| InventoryError::Invalid {
            path: origin.to_owned(),
            message,
        };
        if file.workers.is_empty() {
            return Err(invalid("no [[workers]] defined".into()));
        }
        let mut workers = Vec::new();
        for w in file.workers {
            validate_id(&w.id).map_err(|e| invalid(format!("worker id: {e}")))?;
            if workers.iter().any(|x: &WorkerSpec| x.id == w.id) {
                return Err(invalid(format!("worker {:?} is defined twice", w.id)));
            }
            let reserved = match &w.system_reserved {
                Some(s) => parse_bytes(s)
                    .map_err(|e| invalid(format!("worker {}: system_reserved: {e}", w.id)))?,
                None => 0,
            };
            let mut gpus = Vec::new();
            let mut usage = Vec::new();
            for g in &w.gpus {
                let total = parse_bytes(&g.vram).map_err(|e| {
                    invalid(format!("worker {}: GPU {:?}: vram: {e}", w.id, g.name))
                })?;
                if reserved >= total {
                    return Err(invalid(format!(
                        "worker {}: system_reserved {} leaves nothing of GPU {:?} ({})",
                        w.id,
                        w.system_reserved.as_deref().unwrap_or("0"),
                        g.name,
                        g.vram
                    )));
                }
                if g.count == 0
                    || gpus.len() as u64 + u64::from(g.count) > u64::from(MAX_GPUS_PER_WORKER)
                {
                    return Err(invalid(format!(
                        "worker {}: GPU count must be 1..={MAX_GPUS_PER_WORKER} in all, got {}",
                        w.id, g.count
                    )));
                }
                let outside = match &g.used_outside {
                    Some(u) => parse_bytes(u).map_err(|e| {
                        invalid(format!(
                            "worker {}: GPU {:?}: used_outside: {e}",
                            w.id, g.name
                        ))
                    })?,
                    None => 0,
                };
                if outside > total {
                    return Err(invalid(format!(
                        "worker {}: GPU {:?}: used_outside {} is more than its vram {}",
                        w.id,
                        g.name,
                        g.used_outside.as_deref().unwrap_or("0"),
                        g.vram
                    )));
                }
                for _ in 0..g.count {
                    let index = u32::try_from(gpus.len()).unwrap_or(u32::MAX);
                    if outside > 0 {
                        usage.push(GpuUsage {
                            index,
                            used_outside_bytes: outside,
                        });
                    }
                    gpus.push(GpuInfo {
                        index,
                        name: g.name.clone(),
                        uuid: format!("GPU-sim-{}-{index}", w.id),
                        total_bytes: total,
                        system_reserved_bytes: reserved,
                    });
                }
            }
            if gpus.is_empty() {
                return Err(invalid(format!("worker {} has no GPUs", w.id)));
            }
            workers.push(WorkerSpec {
                id: w.id,
                labels: w.labels,
                gpus,
                usage: Usage::Fixed(usage),
            });
        }
        Ok(Inventory { workers })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [[workers]]
        id = "w1"
        labels = { zone = "a" }
        system_reserved = "1GiB"
        [[workers.gpus]]
        name = "H100"
        vram = "80GiB"
        count = 2
    "#;

    #[test]
    fn parses_workers_and_expands_counts() {
        let inv = Inventory::parse(GOOD, "t").unwrap();
        let w = &inv.workers[0];
        assert_eq!(w.gpus.len(), 2);
        assert_eq!(w.gpus[1].index, 1);
        assert_eq!(w.gpus[0].total_bytes, 80 << 30);
        assert_eq!(w.gpus[0].system_reserved_bytes, 1 << 30);
        assert_eq!(w.labels["zone"], "a");
        assert_eq!(w.usage, Usage::Fixed(Vec::new()));
    }

    #[test]
    fn used_outside_is_reported_per_gpu() {
        let text = GOOD.replace("count = 2", "count = 2\nused_outside = \"3GiB\"");
        let inv = Inventory::parse(&text, "t").unwrap();
        assert_eq!(
            inv.workers[0].usage,
            Usage::Fixed(vec![
                GpuUsage {
                    index: 0,
                    used_outside_bytes: 3 << 30
                },
                GpuUsage {
                    index: 1,
                    used_outside_bytes: 3 << 30
                },
            ])
        );
    }

    #[test]
    fn the_demo_inventory_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../ops/inventory/demo.toml");
        let inv = Inventory::load(&path).unwrap();
        assert!(inv.workers.len() >= 2);
    }

    #[test]
    fn rejects_bad_inventories_with_a_clear_error() {
        let cases = [
            ("not toml [", "not valid"),
            ("", "no [[workers]]"),
            (
                "[[workers]]\nid = \"a.b\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"1GiB\"",
                "worker id",
            ),
            ("[[workers]]\nid = \"a\"", "has no GPUs"),
            (
                "[[workers]]\nid = \"a\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"1GiB\"\nused_outside=\"2GiB\"",
                "used_outside 2GiB is more than its vram 1GiB",
            ),
            (
                "[[workers]]\nid = \"a\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"1GiB\"\nused_outside=\"some\"",
                "used_outside",
            ),
            (
                "[[workers]]\nid = \"a\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"lots\"",
                "not a size",
            ),
            (
                "[[workers]]\nid = \"a\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"1GiB\"\ncount=0",
                "GPU count",
            ),
            (
                "[[workers]]\nid = \"a\"\nsystem_reserved=\"2GiB\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"1GiB\"",
                "leaves nothing",
            ),
            (
                "[[workers]]\nid = \"a\"\ncolour=\"red\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"1GiB\"",
                "unknown field",
            ),
            (
                "[[workers]]\nid = \"a\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"1GiB\"\n[[workers]]\nid = \"a\"\n[[workers.gpus]]\nname=\"x\"\nvram=\"1GiB\"",
                "defined twice",
            ),
        ];
        for (text, expected) in cases {
            let err = Inventory::parse(text, "inv.toml").unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
            assert!(
                err.contains("inv.toml"),
                "error should name the file: {err}"
            );
        }
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Inventory::load(Path::new("/nonexistent/inv.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/inv.toml"));
    }
}
