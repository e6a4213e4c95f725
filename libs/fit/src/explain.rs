//! Why nothing fits, in words a person can act on.

use crate::{Request, Worker, gib};
use std::fmt::Write;

/// Most workers named in one explanation; the rest are counted.
const MAX_NAMED: usize = 8;

/// One sentence per worker that was considered, saying what it lacked.
pub fn explain_no_fit(workers: &[Worker], request: &Request) -> String {
    let kind = request
        .gpu_name
        .as_deref()
        .map(|n| format!(" on GPUs named like {n:?}"))
        .unwrap_or_default();
    let need = format!(
        "needs {} × {} free{kind} on one worker",
        request.gpus,
        gib(request.vram_per_gpu)
    );
    if workers.is_empty() {
        return format!("{need}; no workers are registered");
    }
    let matching: Vec<&Worker> = workers
        .iter()
        .filter(|w| w.matches(&request.selector))
        .collect();
    if matching.is_empty() {
        let sel: Vec<String> = request
            .selector
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return format!(
            "{need}; no worker matches selector {} ({} workers registered)",
            sel.join(","),
            workers.len()
        );
    }
    let mut out = need;
    for w in matching.iter().take(MAX_NAMED) {
        out.push_str("; ");
        if !w.schedulable {
            let _ = write!(out, "{}: not schedulable", w.id);
            continue;
        }
        let kinds: Vec<_> = w.gpus.iter().filter(|g| request.accepts(g)).collect();
        let room = kinds
            .iter()
            .filter(|g| g.free_bytes >= request.vram_per_gpu)
            .count();
        let largest = kinds.iter().map(|g| g.free_bytes).max().unwrap_or(0);
        let _ = write!(
            out,
            "{}: {room} of {} GPUs have {} free (largest free {})",
            w.id,
            kinds.len(),
            gib(request.vram_per_gpu),
            gib(largest)
        );
    }
    if matching.len() > MAX_NAMED {
        let _ = write!(
            out,
            "; and {} more workers short too",
            matching.len() - MAX_NAMED
        );
    }
    out
}
