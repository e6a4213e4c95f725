//! Process groups on Linux: what `/proc` says about a process, signalling and waiting for a
//! whole group, and why a process ended.

use nix::{
    errno::Errno,
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use std::{
    collections::HashSet,
    process::ExitStatus,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

/// The fields of `/proc/<pid>/stat` the supervisor reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub state: char,
    pub pgrp: i32,
    /// Clock ticks after boot: with the pid, tells a process from a later one with its pid.
    pub start_time: u64,
}

pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let rest = text.get(text.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        pgrp: f.get(2)?.parse().ok()?,
        start_time: f.get(19)?.parse().ok()?,
    })
}

/// Whether `pid` is still the live (not zombie) process that started at `start_time`: a pid
/// alone may have been reused by a later process.
pub fn is_same_process(pid: i32, start_time: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_time == start_time && !matches!(s.state, 'Z' | 'X'))
}

/// Live (not zombie) processes of process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    members_of(&HashSet::from([pgid]))
}

/// Live (not zombie) processes of any of the groups `pgids`, in one pass over `/proc`.
pub fn members_of(pgids: &HashSet<i32>) -> Vec<i32> {
    if pgids.is_empty() {
        return Vec::new();
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            stat(*pid).is_some_and(|s| pgids.contains(&s.pgrp) && !matches!(s.state, 'Z' | 'X'))
        })
        .collect()
}

/// Whether a process of group `pgid` holds the listening TCP socket on `port` (IPv4 or
/// IPv6): before the agent says "running at host:port", it makes sure the answer came from
/// its own server and not from whatever else took the port meanwhile.
pub fn group_listens_on(pgid: i32, port: u16) -> bool {
    let wanted = listening_inodes(port);
    if wanted.is_empty() {
        return false;
    }
    group_members(pgid).into_iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .filter_map(|target| {
                let target = target
                    .to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?;
                target.parse::<u64>().ok()
            })
            .any(|inode| wanted.contains(&inode))
    })
}

/// Inodes of the sockets listening on `port`, from /proc/net/tcp and tcp6.
fn listening_inodes(port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    let mut out = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port)
                && f.get(3) == Some(&LISTEN)
                && let Some(inode) = f.get(9).and_then(|i| i.parse().ok())
            {
                out.push(inode);
            }
        }
    }
    out
}

/// Whether any live process is left in group `pgid`. A zombie does not count: an orphan is
/// reaped by init, which in a container may never do it.
pub fn group_alive(pgid: i32) -> bool {
    match killpg(Pid::from_raw(pgid), None) {
        Err(Errno::ESRCH) => false,
        _ => !group_members(pgid).is_empty(),
    }
}

pub fn signal_group(pgid: i32, signal: Signal) {
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, %e, ?signal, "cannot signal process group"),
    }
}

/// Waits until group `pgid` has no live process, sending SIGKILL to what is left once
/// `kill_at` passes; `false` if processes are still there `give_up_after` later (stuck in
/// the kernel).
pub async fn wait_group_gone(pgid: i32, kill_at: Instant, give_up_after: Duration) -> bool {
    const POLL: Duration = Duration::from_millis(20);
    let mut killed = false;
    let deadline = kill_at + give_up_after;
    loop {
        if !group_alive(pgid) {
            return true;
        }
        let now = Instant::now();
        if now >= kill_at && !killed {
            signal_group(pgid, Signal::SIGKILL);
            killed = true;
        }
        if now >= deadline {
            tracing::error!(pgid, "process group still alive after SIGKILL");
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// SIGKILL to a whole group when dropped while armed: the last resort if the task that
/// supervises it is aborted. Unless `spare` is set by then: an agent that goes away on
/// purpose without its servers (`--keep-servers-on-exit`, or a simulated crash) leaves them
/// to the next agent, as a SIGKILLed one would.
#[derive(Debug)]
pub struct GroupGuard {
    pgid: i32,
    armed: bool,
    spare: Option<Arc<AtomicBool>>,
}

impl GroupGuard {
    pub fn new(pgid: i32) -> GroupGuard {
        GroupGuard {
            pgid,
            armed: true,
            spare: None,
        }
    }

    /// A guard that does nothing when dropped once `spare` is set.
    pub fn spared_by(pgid: i32, spare: Arc<AtomicBool>) -> GroupGuard {
        GroupGuard {
            pgid,
            armed: true,
            spare: Some(spare),
        }
    }

    pub fn pgid(&self) -> i32 {
        self.pgid
    }

    /// The group is gone: nothing to kill.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let spared = self
            .spare
            .as_ref()
            .is_some_and(|s| s.load(Ordering::SeqCst));
        if self.armed && !spared {
            let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        }
    }
}

/// "exited with code 3", "killed by SIGKILL".
pub fn exit_reason(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {sig}"),
        },
        (None, None) => format!("ended ({status})"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_listening_socket_is_found_in_its_own_group_only() {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let me = super::stat(i32::try_from(std::process::id()).unwrap()).unwrap();
        assert!(super::group_listens_on(me.pgrp, port));
        assert!(!super::group_listens_on(me.pgrp, port.wrapping_add(1)) || port == u16::MAX);
        drop(listener);
        assert!(!super::group_listens_on(me.pgrp, port));
    }

    use super::*;

    #[test]
    fn reads_its_own_stat() {
        let me = i32::try_from(std::process::id()).unwrap();
        let s = stat(me).unwrap();
        assert!(!matches!(s.state, 'Z' | 'X'));
        assert!(s.start_time > 0);
        assert_eq!(stat(me).unwrap().start_time, s.start_time);
        assert!(group_members(s.pgrp).contains(&me));
    }
}
