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
pub(crate) fn free_port() -> Result<u16, HarnessError> {
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
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), signal);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}
