//! Why nothing fits, in words a person can act on: per worker, what it has and what each
//! way of running the instance would have needed there.

use crate::{Request, Shape, Worker, gib};
use std::{collections::BTreeMap, fmt::Write};

/// Most workers named in one explanation; the rest are counted.
const MAX_NAMED: usize = 8;
/// Most shapes described per worker.
const MAX_SHAPES: usize = 4;

/// One clause per worker that was considered, saying what it has and what was short.
pub fn explain_no_fit(workers: &[Worker], request: &Request) -> String {
    let mut need = format!("needs {}", alternatives(request));
    if let Some(n) = &request.gpu_name {
        let _ = write!(need, " on GPUs named like {n:?}");
    }
    if !request.gpu_ids.is_empty() {
        let _ = write!(need, " (only GPUs {})", request.gpu_ids.join(", "));
    }
    if let Some(note) = &request.note {
        let _ = write!(need, " ({note})");
    }
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
        out.push_str(" | ");
        worker_clause(&mut out, w, request);
    }
    if matching.len() > MAX_NAMED {
        let _ = write!(
            out,
            " | and {} more workers short too",
            matching.len() - MAX_NAMED
        );
    }
    out
}

/// "2 × 30 GiB on one worker at tp=2, or …".
fn alternatives(request: &Request) -> String {
    if request.shapes.is_empty() {
        return "nothing it can run on (no shapes)".into();
    }
    let mut parts: Vec<String> = request
        .shapes
        .iter()
        .take(MAX_SHAPES)
        .map(|s| {
            let mut t = format!("{} × {}", s.gpus_per_worker, amount(s, None));
            if s.workers > 1 {
                let _ = write!(t, " on each of {} workers", s.workers);
            } else {
                t.push_str(" on one worker");
            }
            if !s.label.is_empty() {
                let _ = write!(t, " at {}", s.label);
            }
            t
        })
        .collect();
    if request.shapes.len() > MAX_SHAPES {
        parts.push(format!("{} more shapes", request.shapes.len() - MAX_SHAPES));
    }
    parts.join(", or ")
}

/// What one GPU must have free: the need, or for a claiming shape the share of a GPU of
/// `total` (when known).
fn amount(s: &Shape, total: Option<u64>) -> String {
    match (s.claim, total) {
        (None, _) => gib(s.vram_per_gpu),
        (Some(_), Some(t)) => match s.need_on(t) {
            Some(n) => gib(n),
            None => format!("{} inside its share", gib(s.vram_per_gpu)),
        },
        (Some(c), None) if !c.leave.is_empty() => format!(
            "a share by the GPU's size (holding {})",
            gib(s.vram_per_gpu)
        ),
        (Some(c), None) => format!(
            "{:.0}% of the GPU (holding {})",
            c.fraction * 100.0,
            gib(s.vram_per_gpu)
        ),
    }
}

fn worker_clause(out: &mut String, w: &Worker, request: &Request) {
    if !w.schedulable {
        let _ = write!(out, "{}: not schedulable", w.id);
        return;
    }
    let usable: Vec<_> = w
        .gpus
        .iter()
        .filter(|g| request.accepts(&w.id, g))
        .collect();
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for g in if usable.is_empty() {
        w.gpus.iter().collect()
    } else {
        usable.clone()
    } {
        *kinds.entry(g.name.as_str()).or_default() += 1;
    }
    let kinds: Vec<String> = kinds.iter().map(|(n, c)| format!("{c} × {n}")).collect();
    if usable.is_empty() {
        let _ = write!(out, "{}: no usable GPUs (has {})", w.id, kinds.join(", "));
        return;
    }
    let largest = usable.iter().map(|g| g.free_bytes).max().unwrap_or(0);
    let biggest_card = usable.iter().map(|g| g.total_bytes).max();
    let _ = write!(
        out,
        "{}: {}, largest free {}: ",
        w.id,
        kinds.join(", "),
        gib(largest)
    );
    let clauses: Vec<String> = request
        .shapes
        .iter()
        .take(MAX_SHAPES)
        .map(|s| {
            let room = usable
                .iter()
                .filter(|g| s.need_on(g.total_bytes).is_some_and(|n| n <= g.free_bytes))
                .count();
            let mut t = if s.label.is_empty() {
                String::from("needs ")
            } else {
                format!("{} needs ", s.label)
            };
            let each = amount(s, biggest_card);
            if s.gpus_per_worker == 1 && s.workers <= 1 {
                let _ = write!(t, "{each} per GPU");
            } else {
                let _ = write!(t, "{} × {each}", s.gpus_per_worker);
            }
            if s.workers > 1 {
                let _ = write!(t, " on each of {} workers", s.workers);
            }
            let _ = write!(t, " ({room} of {} GPUs have it)", usable.len());
            t
        })
        .collect();
    out.push_str(&clauses.join("; "));
}
