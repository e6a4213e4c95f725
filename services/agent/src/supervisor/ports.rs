//! Ports for model servers: from a configured range, never two placements on one port, and a
//! port something else listens on is skipped.

use std::{
    collections::BTreeSet,
    ops::RangeInclusive,
    sync::{Arc, Mutex},
};

/// The ports of one agent process, shared by its workers (they share the host).
#[derive(Debug)]
pub struct PortPool {
    range: RangeInclusive<u16>,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    taken: BTreeSet<u16>,
    /// Where the next search starts: a released port is not handed out again at once (its
    /// clients may still be talking to the old server).
    next: u16,
}

/// A port held for one server; released on drop.
#[derive(Debug)]
pub struct PortLease {
    pool: Arc<PortPool>,
    port: u16,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        if let Ok(mut s) = self.pool.state.lock() {
            s.taken.remove(&self.port);
        }
    }
}

impl PortPool {
    pub fn new(range: RangeInclusive<u16>) -> Arc<PortPool> {
        let next = *range.start();
        Arc::new(PortPool {
            range,
            state: Mutex::new(PoolState {
                taken: BTreeSet::new(),
                next,
            }),
        })
    }

    pub fn range(&self) -> &RangeInclusive<u16> {
        &self.range
    }

    /// A port of the range that no placement holds and that `host` can bind now (the bind
    /// is released at once: the server binds it next).
    pub fn allocate(self: &Arc<Self>, host: &str) -> Option<PortLease> {
        let mut s = self.state.lock().ok()?;
        let (lo, hi) = (*self.range.start(), *self.range.end());
        let start = s.next.clamp(lo, hi);
        let candidates = (start..=hi).chain(lo..start);
        for port in candidates {
            if s.taken.contains(&port) || std::net::TcpListener::bind((host, port)).is_err() {
                continue;
            }
            s.taken.insert(port);
            s.next = if port == hi { lo } else { port + 1 };
            return Some(PortLease {
                pool: self.clone(),
                port,
            });
        }
        None
    }

    /// Holds `port` for a server that already listens on it (one adopted from an earlier
    /// agent): no bind check, and it may lie outside the range. `None` if a placement of this
    /// pool holds it.
    pub fn claim(self: &Arc<Self>, port: u16) -> Option<PortLease> {
        let mut s = self.state.lock().ok()?;
        if !s.taken.insert(port) {
            return None;
        }
        Some(PortLease {
            pool: self.clone(),
            port,
        })
    }

    /// Ports held now.
    pub fn taken(&self) -> usize {
        self.state.lock().map(|s| s.taken.len()).unwrap_or(0)
    }
}

/// Parses `LOW-HIGH`.
pub fn parse_range(s: &str) -> Result<RangeInclusive<u16>, String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("port range {s:?} is not LOW-HIGH"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|e| format!("port range {s:?}: {p:?}: {e}"))
    };
    let (lo, hi) = (port(lo)?, port(hi)?);
    if lo == 0 || lo > hi {
        return Err(format!(
            "port range {s:?} must be LOW-HIGH with 0 < LOW <= HIGH"
        ));
    }
    Ok(lo..=hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A free range of `n` ports: one the kernel just gave out, and its successors that bind.
    fn free_range(n: u16) -> RangeInclusive<u16> {
        loop {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let lo = l.local_addr().unwrap().port();
            drop(l);
            if lo < u16::MAX - n
                && (lo..lo + n).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            {
                return lo..=lo + n - 1;
            }
        }
    }

    #[test]
    fn never_two_placements_on_one_port_and_a_busy_port_is_skipped() {
        let range = free_range(3);
        let lo = *range.start();
        let pool = PortPool::new(range);
        let busy = std::net::TcpListener::bind(("127.0.0.1", lo + 1)).unwrap();
        let a = pool.allocate("127.0.0.1").unwrap();
        let b = pool.allocate("127.0.0.1").unwrap();
        assert_eq!(
            (a.port(), b.port()),
            (lo, lo + 2),
            "lo+1 is in use by someone else"
        );
        assert!(pool.allocate("127.0.0.1").is_none(), "all held or busy");
        drop(busy);
        let c = pool.allocate("127.0.0.1").unwrap();
        assert_eq!(c.port(), lo + 1);
        drop(a);
        assert_eq!(pool.taken(), 2);
        assert_eq!(pool.allocate("127.0.0.1").unwrap().port(), lo);
    }

    #[test]
    fn a_claimed_port_is_held_until_dropped() {
        let range = free_range(2);
        let lo = *range.start();
        let pool = PortPool::new(range);
        let listening = std::net::TcpListener::bind(("127.0.0.1", lo)).unwrap();
        let claimed = pool.claim(lo).expect("claimed although something listens");
        assert!(pool.claim(lo).is_none(), "held once");
        assert_eq!(pool.allocate("127.0.0.1").unwrap().port(), lo + 1);
        drop((claimed, listening));
        assert!(pool.claim(lo).is_some());
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_range("40000-40999").unwrap(), 40000..=40999);
        assert_eq!(parse_range("5-5").unwrap(), 5..=5);
        for bad in ["40000", "2-1", "0-10", "a-b", "1-70000"] {
            assert!(parse_range(bad).is_err(), "{bad}");
        }
    }
}
