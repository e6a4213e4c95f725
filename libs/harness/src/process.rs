//! Child processes that stop when dropped, and waiting for them to be ready.

use crate::HarnessError;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use std::{
    net::{TcpListener, TcpStream},
    process::Child,
    time::{Duration, Instant},
};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> Result<u16, HarnessError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| HarnessError::io("127.0.0.1:0", e))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| HarnessError::io("127.0.0.1:0", e))
}

/// Polls `ready` every few milliseconds until it is true, the child exits, or `limit` passes.
pub(crate) fn wait_until(
    what: &str,
    child: &mut Child,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), HarnessError> {
    let deadline = Instant::now() + limit;
    loop {
        if ready() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HarnessError::Failed {
                what: what.into(),
                detail: format!("exited with {status} before it was ready"),
            });
        }
        if Instant::now() > deadline {
            return Err(HarnessError::Failed {
                what: what.into(),
                detail: format!("not ready after {limit:?}"),
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub(crate) fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Asks the child to stop with `signal`, then kills it if it has not exited within `grace`.
pub(crate) fn stop_child(child: &mut Child, signal: Signal, grace: Duration) {
    stop_children(std::slice::from_mut(child), signal, grace);
}

/// Asks every child to stop with `signal` at once, then kills those that have not exited
/// within `grace` (one grace for all of them) and reaps them all.
pub fn stop_children(children: &mut [Child], signal: Signal, grace: Duration) {
    for child in children.iter_mut() {
        if let Ok(None) = child.try_wait()
            && let Ok(pid) = i32::try_from(child.id())
        {
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }
    let deadline = Instant::now() + grace;
    let exited = |c: &mut Child| matches!(c.try_wait(), Ok(Some(_)));
    while Instant::now() < deadline && !children.iter_mut().all(exited) {
        std::thread::sleep(Duration::from_millis(10));
    }
    for child in children.iter_mut() {
        if !exited(child) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
