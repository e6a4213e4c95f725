//! Splitting the machine's CPUs between the benchmark's parties: what a gateway costs when it
//! runs on a host (or cores) of its own, as deployed, rather than competing with its clients
//! and the model server for the same cores.
//!
//! Affinity is per thread on Linux, and a thread or process inherits the mask of the thread
//! that creates it: every thread of this process is moved to one set, and the gateway is
//! spawned from a thread that moved itself to the other set first.

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The CPUs this process may use, in order.
pub fn usable() -> Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("reading the CPU affinity")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

fn set_of(cpus: &[usize]) -> Result<CpuSet> {
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c).with_context(|| format!("CPU {c}"))?;
    }
    Ok(set)
}

/// Moves every thread of this process and of its descendants (the servers and the model
/// server it started) onto `cpus`; threads and processes started later inherit that.
pub fn pin_process(cpus: &[usize]) -> Result<()> {
    let set = set_of(cpus)?;
    for pid in descendants_and_self()? {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue; // the process ended meanwhile
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<i32>().ok())
            else {
                continue;
            };
            match sched_setaffinity(Pid::from_raw(tid), &set) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => bail!("pinning thread {tid} to CPUs {cpus:?}: {e}"),
            }
        }
    }
    Ok(())
}

/// This process and every process below it, from each process's parent in `/proc/PID/stat`.
fn descendants_and_self() -> Result<Vec<u32>> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc")
        .context("listing processes")?
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid …": the name may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut found = vec![std::process::id()];
    let mut at = 0;
    while let Some(&pid) = found.get(at) {
        found.extend(parent_of.iter().filter(|(_, p)| *p == pid).map(|(c, _)| *c));
        at += 1;
    }
    Ok(found)
}

/// The first process below this one whose command line has `arg` as one of its arguments.
pub fn descendant_with_arg(arg: &str) -> Result<Option<u32>> {
    Ok(descendants_and_self()?.into_iter().skip(1).find(|pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
    }))
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Killed(Child);

impl Killed {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `program args` on `cpus` only, its output discarded.
pub fn spawn_on(cpus: &[usize], program: &Path, args: &[String]) -> Result<Killed> {
    let set = set_of(cpus)?;
    let (program, args) = (program.to_owned(), args.to_vec());
    std::thread::spawn(move || {
        sched_setaffinity(Pid::from_raw(0), &set)?;
        let child = Command::new(&program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok::<_, anyhow::Error>(Killed(child))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the spawning thread panicked"))?
}
