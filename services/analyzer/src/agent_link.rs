//! The analyzer's link to the agents: what runs where is told to each worker's agent on
//! `berth.agent.<worker>` (assign, unassign), and nothing else in the analyzer publishes
//! there.

use berth_bus::{Bus, BusError};
use berth_fit::{Part, Placement, Slot};
use berth_proto::{AgentMsg, StartSpec, Version};
use berth_store::placement::GpuClaim;

#[derive(Debug, Clone)]
pub(crate) struct AgentLink {
    bus: Bus,
}

/// The placement a commit recorded: one part per worker, `leader` first.
pub(crate) fn placement_of(leader: &str, claims: &[GpuClaim]) -> Placement {
    let mut parts: Vec<Part> = Vec::new();
    for c in claims {
        let slot = Slot {
            index: c.idx,
            bytes: c.bytes.unsigned_abs(),
        };
        match parts.iter_mut().find(|p| p.worker_id == c.worker_id) {
            Some(p) => p.gpus.push(slot),
            None => parts.push(Part {
                worker_id: c.worker_id.clone(),
                gpus: vec![slot],
            }),
        }
    }
    parts.sort_by_key(|p| p.worker_id != leader);
    Placement { shape: 0, parts }
}

impl AgentLink {
    pub(crate) fn new(bus: Bus) -> Self {
        AgentLink { bus }
    }

    /// One assignment per worker of the placement, each naming all of them when there are
    /// several.
    pub(crate) async fn assign(
        &self,
        id: &str,
        version: Version,
        spec: &StartSpec,
        placement: &Placement,
    ) -> Result<(), BusError> {
        let workers: Vec<String> = if placement.parts.len() > 1 {
            placement
                .parts
                .iter()
                .map(|p| p.worker_id.clone())
                .collect()
        } else {
            Vec::new()
        };
        for part in &placement.parts {
            let bytes: Vec<i64> = part.gpus.iter().map(|s| to_i64(s.bytes)).collect();
            let max = to_i64(part.max_bytes());
            let assign = AgentMsg::Assign {
                instance_id: id.to_owned(),
                version,
                gpus: part.indexes(),
                vram_bytes_per_gpu: max,
                spec: spec.clone(),
                gpu_bytes: if bytes.iter().all(|b| *b == max) {
                    Vec::new()
                } else {
                    bytes
                },
                workers: workers.clone(),
            };
            self.bus.publish_agent(&part.worker_id, &assign).await?;
        }
        Ok(())
    }

    /// Tells each of `workers` to stop `id`'s placements older than `version`.
    pub(crate) async fn unassign(
        &self,
        id: &str,
        version: Version,
        workers: &[String],
    ) -> Result<(), BusError> {
        for worker in workers {
            let msg = AgentMsg::Unassign {
                instance_id: id.to_owned(),
                version,
            };
            self.bus
                .publish_agent(worker, &msg)
                .await
                .inspect_err(|e| {
                    tracing::warn!(%e, worker, "cannot send unassign");
                })?;
        }
        Ok(())
    }
}

/// Bytes as the store and the wire count them.
pub(crate) fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
