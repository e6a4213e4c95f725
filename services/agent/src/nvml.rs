//! The real inventory: GPUs as NVML reports them.
//!
//! NVML is loaded at run time (libnvidia-ml.so), so the agent builds and runs without a
//! driver; asking for NVML on a machine without one is a clear error.

use berth_proto::{GpuInfo, GpuUsage};
use nvml_wrapper::Nvml;

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

    /// Memory in use on each GPU. Backends are simulated (berth starts no processes on the
    /// GPU), so all of it is outside berth.
    pub fn read(&self) -> Result<Vec<GpuUsage>, NvmlError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| NvmlError(e.to_string()))?;
        (0..count)
            .map(|index| {
                let mem = self
                    .nvml
                    .device_by_index(index)
                    .and_then(|d| d.memory_info())
                    .map_err(|e| NvmlError(format!("device {index} memory: {e}")))?;
                Ok(GpuUsage {
                    index,
                    used_outside_bytes: i64::try_from(mem.used).unwrap_or(i64::MAX),
                })
            })
            .collect()
    }
}
