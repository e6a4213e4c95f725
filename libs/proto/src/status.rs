//! What agents report, on `berth.status.<worker_id>`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Index on the worker (NVML index, or position in the simulated inventory).
    pub index: u32,
    pub name: String,
    /// NVML UUID where known; simulated GPUs get a stable made-up one.
    #[serde(default)]
    pub uuid: String,
    pub total_bytes: i64,
    /// VRAM berth must leave alone on this GPU (driver, display, other tenants).
    #[serde(default)]
    pub system_reserved_bytes: i64,
}

/// What a GPU has in use outside berth, as its agent sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuUsage {
    pub index: u32,
    pub used_outside_bytes: i64,
}

/// States an agent may report for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportedState {
    Starting,
    Running,
    Stopped,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StatusMsg {
    /// Sent at agent start: the worker and its GPUs (replaces what was known).
    Register {
        worker_id: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        gpus: Vec<GpuInfo>,
    },
    Heartbeat {
        worker_id: String,
        /// Memory in use on each GPU by processes berth did not start, when the agent can
        /// see it (NVML); placements leave it alone. Absent: unchanged.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        usage: Vec<GpuUsage>,
    },
    /// The state of an instance's backend; applied only if `version` is the instance's.
    Instance {
        worker_id: String,
        instance_id: String,
        version: crate::Version,
        state: ReportedState,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// This worker runs one part of an instance spread over several workers.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        shared: bool,
        /// Where the model server answers (`host:port`), with `running`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        /// Times the agent restarted the server of this placement after it failed.
        #[serde(default, skip_serializing_if = "is_zero")]
        restarts: u32,
    },
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Largest report the analyzers accept (a registration of 64 GPUs with labels is a few KiB).
pub const MAX_STATUS_BYTES: usize = 64 * 1024;
/// Most GPUs one worker may register, and most usage entries in a heartbeat.
pub const MAX_GPUS_PER_WORKER: usize = 64;
/// Most labels of one worker.
pub const MAX_LABELS: usize = 32;
/// Longest GPU name, UUID, label key or value.
pub const MAX_NAME_BYTES: usize = 256;

impl StatusMsg {
    /// The worker the report is about.
    pub fn worker_id(&self) -> &str {
        match self {
            StatusMsg::Register { worker_id, .. }
            | StatusMsg::Heartbeat { worker_id, .. }
            | StatusMsg::Instance { worker_id, .. } => worker_id,
        }
    }

    /// Decodes and checks a report: bounded in size and depth, ids that are subject tokens,
    /// sizes no GPU has refused. Reasons are not checked here: they are cleaned and cut when
    /// stored (`text::reason`), since agents copy them from server logs.
    pub fn decode(bytes: &[u8]) -> Result<StatusMsg, String> {
        if bytes.len() > MAX_STATUS_BYTES {
            return Err(format!(
                "report is {} bytes; at most {MAX_STATUS_BYTES}",
                bytes.len()
            ));
        }
        let msg: StatusMsg = crate::decode(bytes).map_err(|e| e.to_string())?;
        msg.validate()?;
        Ok(msg)
    }

    /// The checks of [`StatusMsg::decode`] on a decoded report.
    pub fn validate(&self) -> Result<(), String> {
        use crate::{command::MAX_VRAM_PER_GPU, subjects::validate_id, text::check};
        let bytes_ok = |what: &str, v: i64, max: i64| {
            if (0..=max).contains(&v) {
                Ok(())
            } else {
                Err(format!("{what} must be between 0 and {max}, got {v}"))
            }
        };
        validate_id(self.worker_id()).map_err(|e| format!("worker_id: {e}"))?;
        match self {
            StatusMsg::Register { labels, gpus, .. } => {
                if gpus.len() > MAX_GPUS_PER_WORKER || labels.len() > MAX_LABELS {
                    return Err(format!(
                        "a worker registers at most {MAX_GPUS_PER_WORKER} GPUs and \
                         {MAX_LABELS} labels, got {} and {}",
                        gpus.len(),
                        labels.len()
                    ));
                }
                for (k, v) in labels {
                    check("label key", k, MAX_NAME_BYTES).map_err(|e| e.to_string())?;
                    check("label value", v, MAX_NAME_BYTES).map_err(|e| e.to_string())?;
                }
                let mut seen = std::collections::BTreeSet::new();
                for g in gpus {
                    if !seen.insert(g.index) {
                        return Err(format!("GPU index {} is registered twice", g.index));
                    }
                    check("GPU name", &g.name, MAX_NAME_BYTES).map_err(|e| e.to_string())?;
                    check("GPU uuid", &g.uuid, MAX_NAME_BYTES).map_err(|e| e.to_string())?;
                    if g.total_bytes <= 0 {
                        return Err(format!("GPU {} has no memory", g.index));
                    }
                    bytes_ok("total_bytes", g.total_bytes, MAX_VRAM_PER_GPU)?;
                    bytes_ok(
                        "system_reserved_bytes",
                        g.system_reserved_bytes,
                        g.total_bytes,
                    )?;
                }
                let uuids = gpus.iter().filter(|g| !g.uuid.is_empty());
                if uuids.clone().count()
                    != uuids
                        .map(|g| &g.uuid)
                        .collect::<std::collections::BTreeSet<_>>()
                        .len()
                {
                    return Err("two GPUs share one uuid".into());
                }
                Ok(())
            }
            StatusMsg::Heartbeat { usage, .. } => {
                if usage.len() > MAX_GPUS_PER_WORKER {
                    return Err(format!(
                        "a heartbeat reports at most {MAX_GPUS_PER_WORKER} GPUs, got {}",
                        usage.len()
                    ));
                }
                usage.iter().try_for_each(|u| {
                    bytes_ok("used_outside_bytes", u.used_outside_bytes, MAX_VRAM_PER_GPU)
                })
            }
            StatusMsg::Instance {
                instance_id,
                version,
                endpoint,
                ..
            } => {
                validate_id(instance_id).map_err(|e| format!("instance_id: {e}"))?;
                if let Some(endpoint) = endpoint {
                    check("endpoint", endpoint, MAX_NAME_BYTES).map_err(|e| e.to_string())?;
                }
                if version.get() < 0 {
                    return Err(format!("version must not be negative, got {version}"));
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(gpus: Vec<GpuInfo>) -> StatusMsg {
        StatusMsg::Register {
            worker_id: "w1".into(),
            labels: BTreeMap::new(),
            gpus,
        }
    }

    fn gpu(index: u32, total: i64) -> GpuInfo {
        GpuInfo {
            index,
            name: "H100".into(),
            uuid: format!("GPU-{index}"),
            total_bytes: total,
            system_reserved_bytes: 0,
        }
    }

    #[test]
    fn reports_round_trip() {
        let msgs = [
            register(vec![gpu(0, 80 << 30), gpu(1, 80 << 30)]),
            StatusMsg::Heartbeat {
                worker_id: "w1".into(),
                usage: vec![GpuUsage {
                    index: 0,
                    used_outside_bytes: 1 << 30,
                }],
            },
            StatusMsg::Instance {
                worker_id: "w1".into(),
                instance_id: "i1".into(),
                version: crate::Version::new(3),
                state: ReportedState::Error,
                reason: Some("exit 1".into()),
                shared: false,
                endpoint: None,
                restarts: 0,
            },
        ];
        for msg in msgs {
            let bytes = crate::encode(&msg).unwrap();
            assert_eq!(StatusMsg::decode(&bytes).unwrap(), msg);
        }
    }

    #[test]
    fn implausible_reports_are_refused() {
        let too_big = gpu(0, crate::command::MAX_VRAM_PER_GPU + 1);
        let mut reserved_past_total = gpu(0, 1 << 30);
        reserved_past_total.system_reserved_bytes = 2 << 30;
        let mut same_uuid = gpu(1, 1 << 30);
        same_uuid.uuid = "GPU-0".into();
        let cases = [
            register(vec![too_big]),
            register(vec![gpu(0, 0)]),
            register(vec![reserved_past_total]),
            register(vec![gpu(0, 1 << 30), gpu(0, 1 << 30)]),
            register(vec![gpu(0, 1 << 30), same_uuid]),
            register((0..65).map(|i| gpu(i, 1 << 30)).collect()),
            StatusMsg::Register {
                worker_id: "w.1".into(),
                labels: BTreeMap::new(),
                gpus: vec![],
            },
            StatusMsg::Register {
                worker_id: "w1".into(),
                labels: BTreeMap::from([("zone".into(), "a\0".into())]),
                gpus: vec![],
            },
            StatusMsg::Heartbeat {
                worker_id: "w1".into(),
                usage: vec![GpuUsage {
                    index: 0,
                    used_outside_bytes: i64::MAX,
                }],
            },
            StatusMsg::Instance {
                worker_id: "w1".into(),
                instance_id: "i>".into(),
                version: crate::Version::FIRST,
                state: ReportedState::Running,
                reason: None,
                shared: false,
                endpoint: None,
                restarts: 0,
            },
        ];
        for msg in cases {
            let bytes = crate::encode(&msg).unwrap();
            assert!(StatusMsg::decode(&bytes).is_err(), "{msg:?}");
        }
        assert!(StatusMsg::decode(&vec![0x80; MAX_STATUS_BYTES + 1]).is_err());
        assert!(
            StatusMsg::decode(&crate::codec::tests::nested_maps(10_000))
                .unwrap_err()
                .contains("depth")
        );
    }
}
