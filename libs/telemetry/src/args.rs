//! Command-line values the services share, as clap value parsers.

use std::{net::SocketAddr, time::Duration};

/// "500ms", "30s", "2m": a positive duration.
pub fn duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like \"30s\": {e}"))?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

/// Where to serve `/metrics`, if anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsAddr(pub Option<SocketAddr>);

/// Where to serve `/metrics`: `host:port`, or `off` (none).
pub fn metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    match s {
        "off" => Ok(MetricsAddr(None)),
        addr => addr
            .parse()
            .map(|a| MetricsAddr(Some(a)))
            .map_err(|_| format!("{addr:?} is not host:port or \"off\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_metrics_addresses_parse_and_bad_ones_say_why() {
        assert_eq!(duration("30s"), Ok(Duration::from_secs(30)));
        assert!(duration("0s").is_err());
        assert!(duration("soon").unwrap_err().contains("not a duration"));
        assert_eq!(metrics_addr("off"), Ok(MetricsAddr(None)));
        assert_eq!(
            metrics_addr("127.0.0.1:9101"),
            Ok(MetricsAddr(Some(SocketAddr::from(([127, 0, 0, 1], 9101)))))
        );
        assert!(metrics_addr("localhost").unwrap_err().contains("host:port"));
    }
}
