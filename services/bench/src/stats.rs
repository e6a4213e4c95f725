//! Percentiles and process figures.

use serde_json::{Value, json};
use std::time::Duration;

/// p50/p90/p99/max of `values` (any unit), rounded to 3 decimals.
pub fn summary(values: &mut [f64]) -> Value {
    if values.is_empty() {
        return Value::Null;
    }
    values.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let idx = ((values.len() as f64 - 1.0) * p).round() as usize;
        (values[idx.min(values.len() - 1)] * 1000.0).round() / 1000.0
    };
    json!({ "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": at(1.0), "n": values.len() })
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Microsecond samples as milliseconds.
pub fn micros_to_ms(samples: Vec<u32>) -> Vec<f64> {
    samples
        .into_iter()
        .map(|us| f64::from(us) / 1000.0)
        .collect()
}

/// Peak resident memory of a process, in MiB (Linux `VmHWM`).
pub fn peak_rss_mib(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".to_owned(),
    };
    let text = std::fs::read_to_string(path).ok()?;
    let kib: f64 = text
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((kib / 1024.0 * 10.0).round() / 10.0)
}

/// CPU seconds (user + system) used so far by the processes `roots`, and with `descendants`
/// everything started under them, read from `/proc`: what a benchmark's parts cost, per
/// part. Processes that already exited are not counted. `None` where `/proc` cannot be read.
pub fn cpu_seconds(roots: &[u32], descendants: bool) -> Option<f64> {
    let ticks = 100.0; // USER_HZ: 100 on every Linux target that berth builds for
    let mut procs: Vec<(u32, u32, f64)> = Vec::new(); // (pid, parent, seconds)
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name, which may hold spaces, in parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (Some(ppid), Some(utime), Some(stime)) = (
            f.get(1).and_then(|v| v.parse::<u32>().ok()),
            f.get(11).and_then(|v| v.parse::<f64>().ok()),
            f.get(12).and_then(|v| v.parse::<f64>().ok()),
        ) else {
            continue;
        };
        procs.push((pid, ppid, (utime + stime) / ticks));
    }
    let mut inside: std::collections::HashSet<u32> = roots.iter().copied().collect();
    // Parents come before children in no particular order: repeat until nothing is added.
    if descendants {
        loop {
            let before = inside.len();
            for (pid, ppid, _) in &procs {
                if inside.contains(ppid) {
                    inside.insert(*pid);
                }
            }
            if inside.len() == before {
                break;
            }
        }
    }
    Some(
        procs
            .iter()
            .filter(|(pid, _, _)| inside.contains(pid))
            .map(|(_, _, s)| s)
            .sum(),
    )
}

/// Wall-clock milliseconds since the Unix epoch, with sub-millisecond precision.
pub fn unix_ms_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or(0.0)
}
