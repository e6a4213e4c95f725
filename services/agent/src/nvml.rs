//! The real inventory: GPUs as NVML reports them.
//!
//! NVML is loaded at run time (libnvidia-ml.so), so the agent builds and runs without a
//! driver; asking for NVML on a machine without one is a clear error.

use berth_proto::GpuInfo;
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
