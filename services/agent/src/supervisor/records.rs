//! What runs, on disk: one small JSON file per instance under `<state-dir>/instances/`,
//! written atomically (temporary file, then rename) and removed when the server is gone.
//! It lets an operator (and, later, a restarted agent) find the processes berth started.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use super::*;

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
        };
        write(dir.path(), &r).unwrap();
        assert_eq!(read(dir.path(), "i1"), Some(r));
        remove(dir.path(), "i1");
        assert_eq!(read(dir.path(), "i1"), None);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
