//! The real inventory: GPUs as NVML reports them.
//!
//! NVML is loaded at run time (libnvidia-ml.so), so the agent builds and runs without a
//! driver; asking for NVML on a machine without one is a clear error.

use berth_proto::{GpuInfo, GpuUsage};
use nvml_wrapper::{Nvml, enums::device::UsedGpuMemory};
use std::collections::HashSet;

#[derive(Debug, thiserror::Error)]
#[error("NVML: {0}")]
pub struct NvmlError(String);

/// Every GPU NVML sees, with `system_reserved` bytes set aside on each.
pub fn gpus(system_reserved: i64) -> Result<Vec<GpuInfo>, NvmlError> {
    let nvml = Nvml::init().map_err(|e| {
        NvmlError(format!(
            "cannot initialise (is the NVIDIA driver installed?): {e}"
        ))
    })?;
    let count = nvml.device_count().map_err(|e| NvmlError(e.to_string()))?;
    (0..count)
        .map(|index| {
            let dev = nvml
                .device_by_index(index)
                .map_err(|e| NvmlError(format!("device {index}: {e}")))?;
            let mem = dev
                .memory_info()
                .map_err(|e| NvmlError(format!("device {index} memory: {e}")))?;
            Ok(GpuInfo {
                index,
                name: dev.name().unwrap_or_else(|_| "unknown NVIDIA GPU".into()),
                uuid: dev.uuid().unwrap_or_default(),
                total_bytes: i64::try_from(mem.total).unwrap_or(i64::MAX),
                system_reserved_bytes: system_reserved,
            })
        })
        .collect()
}

/// A handle kept open to read memory in use at each heartbeat.
pub struct UsageReader {
    nvml: Nvml,
}

impl std::fmt::Debug for UsageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UsageReader")
    }
}

impl UsageReader {
    pub fn open() -> Result<UsageReader, NvmlError> {
        Nvml::init()
            .map(|nvml| UsageReader { nvml })
            .map_err(|e| NvmlError(format!("cannot initialise: {e}")))
    }

    /// Memory in use on each GPU by processes berth did not start: NVML's `used` less what
    /// the processes in `ours` (the agent's servers' groups) hold there ([`used_outside`]).
    /// Where NVML cannot list a GPU's processes, all of its use counts as outside.
    pub fn read(&self, ours: &HashSet<u32>) -> Result<Vec<GpuUsage>, NvmlError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| NvmlError(e.to_string()))?;
        (0..count)
            .map(|index| {
                let device = self
                    .nvml
                    .device_by_index(index)
                    .map_err(|e| NvmlError(format!("device {index}: {e}")))?;
                let mem = device
                    .memory_info()
                    .map_err(|e| NvmlError(format!("device {index} memory: {e}")))?;
                let processes: Vec<GpuProcess> = match device.running_compute_processes() {
                    Ok(list) => list
                        .into_iter()
                        .map(|p| GpuProcess {
                            pid: p.pid,
                            bytes: match p.used_gpu_memory {
                                UsedGpuMemory::Used(b) => Some(b),
                                UsedGpuMemory::Unavailable => None,
                            },
                        })
                        .collect(),
                    Err(e) => {
                        tracing::debug!(index, %e, "cannot list the GPU's processes");
                        Vec::new()
                    }
                };
                let outside = used_outside(mem.used, &processes, ours);
                Ok(GpuUsage {
                    index,
                    used_outside_bytes: i64::try_from(outside).unwrap_or(i64::MAX),
                })
            })
            .collect()
    }
}

/// A process on a GPU, as NVML lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    /// Memory it holds there; `None` where NVML cannot say (some containers, MIG, WDDM).
    pub bytes: Option<u64>,
}

/// Memory in use on a GPU outside berth: `used` (everything, driver contexts included) less
/// what the processes of `ours` hold there, each pid counted once. A process of ours whose
/// use NVML cannot tell stays counted as outside: the figure errs towards less free memory.
pub fn used_outside(used: u64, processes: &[GpuProcess], ours: &HashSet<u32>) -> u64 {
    let mut seen = HashSet::new();
    let mine: u64 = processes
        .iter()
        .filter(|p| ours.contains(&p.pid) && seen.insert(p.pid))
        .filter_map(|p| p.bytes)
        .fold(0, u64::saturating_add);
    used.saturating_sub(mine)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn p(pid: u32, mib: Option<u64>) -> GpuProcess {
        GpuProcess {
            pid,
            bytes: mib.map(|m| m * MIB),
        }
    }

    #[test]
    fn berth_s_own_processes_are_not_outside() {
        let ours: HashSet<u32> = [10, 11].into();
        // A server (10) and its worker process (11) of ours, and someone's PyTorch (20).
        let procs = [p(10, Some(4000)), p(11, Some(500)), p(20, Some(2000))];
        assert_eq!(used_outside(7000 * MIB, &procs, &ours), 2500 * MIB);
        // Nothing of ours: all of it is outside.
        assert_eq!(
            used_outside(7000 * MIB, &procs, &HashSet::new()),
            7000 * MIB
        );
        // A pid listed twice counts once; an unknown use is not subtracted.
        let twice = [p(10, Some(4000)), p(10, Some(4000)), p(11, None)];
        assert_eq!(used_outside(5000 * MIB, &twice, &ours), 1000 * MIB);
        // Never below zero (NVML's figures are read at slightly different moments).
        assert_eq!(used_outside(100 * MIB, &procs, &ours), 0);
        assert_eq!(used_outside(0, &[], &ours), 0);
    }
}
