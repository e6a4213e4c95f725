//! What runs, on disk: one small JSON file per instance under `<state-dir>/instances/`,
//! written atomically (temporary file, then rename) and removed when the server is gone.
//! It lets an operator, and the next agent, find the processes berth started: an agent that
//! starts adopts the servers of its records that still run (see `Supervisor::adopt`).

use super::stages::FollowerStage;
use crate::backend::AssignedGpu;
use berth_proto::StartSpec;
use serde::{Deserialize, Serialize};
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub worker_id: String,
    pub instance_id: String,
    pub version: i64,
    /// Leader of the server's process group (its pgid too).
    pub pid: i32,
    /// From `/proc/<pid>/stat`: tells this process from a later one that reuses the pid.
    pub start_time: u64,
    pub port: u16,
    pub program: String,
    /// Restarts of the placement before this server: an adopted server reports with them
    /// (berth ignores a report with fewer restarts than it knows of).
    #[serde(default)]
    pub restarts: u32,
    /// What the placement runs, so that an adopted server can be restarted; absent in the
    /// records of older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<Box<StartSpec>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<AssignedGpu>,
    /// For an instance spread over several workers: all of them, the leader first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workers: Vec<String>,
    /// A leader's: the followers' stages its server was started with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub followers: Vec<FollowerStage>,
}

/// The pids of every process in the groups of the servers recorded in `dir` that still run
/// (berth's own on this host, whichever agent started them): what NVML shows of them is not
/// memory used outside berth.
pub fn own_pids(dir: &Path) -> HashSet<u32> {
    let pgids: HashSet<i32> = all(dir)
        .into_iter()
        .filter_map(Result::ok)
        // A record whose pid is another process's now is not ours.
        .filter(|r| super::process::is_same_process(r.pid, r.start_time))
        .map(|r| r.pid)
        .collect();
    super::process::members_of(&pgids)
        .into_iter()
        .filter_map(|pid| u32::try_from(pid).ok())
        .collect()
}

pub fn path(dir: &Path, instance_id: &str) -> PathBuf {
    dir.join(format!("{instance_id}.json"))
}

pub fn write(dir: &Path, record: &Record) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let target = path(dir, &record.instance_id);
    let tmp = dir.join(format!(".{}.json.tmp", record.instance_id));
    let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, &target)
}

pub fn remove(dir: &Path, instance_id: &str) {
    match std::fs::remove_file(path(dir, instance_id)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(%e, instance_id, "cannot remove the state record"),
    }
}

pub fn read(dir: &Path, instance_id: &str) -> Option<Record> {
    let bytes = std::fs::read(path(dir, instance_id)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Every record of `dir`, by instance id; a file that is not a record is reported as `Err`
/// with its path. Temporary files of an interrupted write are removed.
pub fn all(dir: &Path) -> Vec<Result<Record, PathBuf>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') && name.ends_with(".json.tmp") {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let record = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
            .filter(|r| path == self::path(dir, &r.instance_id));
        out.push(record.ok_or(path));
    }
    out.sort_by(|a, b| match (a, b) {
        (Ok(a), Ok(b)) => a.instance_id.cmp(&b.instance_id),
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(a), Err(b)) => a.cmp(b),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_pids_are_the_live_recorded_groups() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        // A server: the leader of a process group of its own.
        let mut server = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = i32::try_from(server.id()).unwrap();
        let mut r: Record = serde_json::from_str(
            r#"{"worker_id":"w1","instance_id":"i1","version":1,"pid":0,
                "start_time":0,"port":40000,"program":"sleep"}"#,
        )
        .unwrap();
        r.pid = pid;
        r.start_time = crate::supervisor::process::stat(pid).unwrap().start_time;
        write(dir.path(), &r).unwrap();
        assert_eq!(own_pids(dir.path()), HashSet::from([server.id()]));
        // Another start time: the pid was reused, nothing of it is ours.
        r.start_time += 1;
        write(dir.path(), &r).unwrap();
        assert!(own_pids(dir.path()).is_empty());
        assert!(own_pids(&dir.path().join("none")).is_empty());
        server.kill().unwrap();
        server.wait().unwrap();
    }

    #[test]
    fn records_of_older_agents_still_read() {
        let old = r#"{"worker_id":"w1","instance_id":"i1","version":3,"pid":42,
            "start_time":1234,"port":40000,"program":"llama-server"}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert_eq!((r.restarts, r.spec.is_none(), r.gpus.len()), (0, true, 0));
    }

    #[test]
    fn records_round_trip_and_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let r = Record {
            worker_id: "w1".into(),
            instance_id: "i1".into(),
            version: 3,
            pid: 42,
            start_time: 1234,
            port: 40000,
            program: "llama-server".into(),
            restarts: 1,
            spec: Some(Box::new(StartSpec::claim(1 << 30, 1))),
            gpus: Vec::new(),
            workers: vec!["w1".into(), "w2".into()],
            followers: vec![FollowerStage {
                worker_id: "w2".into(),
                endpoint: "10.0.0.2:40000".into(),
                restarts: 0,
            }],
        };
        write(dir.path(), &r).unwrap();
        assert_eq!(read(dir.path(), "i1"), Some(r.clone()));
        std::fs::write(dir.path().join("junk.json"), "{").unwrap();
        std::fs::write(dir.path().join(".i2.json.tmp"), "{").unwrap();
        let all = all(dir.path());
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all[0].as_ref().ok(), Some(&r));
        assert_eq!(all[1].as_ref().err(), Some(&dir.path().join("junk.json")));
        assert!(!dir.path().join(".i2.json.tmp").exists());
        std::fs::remove_file(dir.path().join("junk.json")).unwrap();
        remove(dir.path(), "i1");
        assert_eq!(read(dir.path(), "i1"), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
