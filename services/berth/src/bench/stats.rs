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
