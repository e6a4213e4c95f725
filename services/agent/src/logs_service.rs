//! Answers `berth logs`: requests on `berth.logs.<worker>` for a server's log, read from this
//! agent's state directory (`<logs>/<instance>/<version>.log`, earlier attempts `.log.N`).

use berth_bus::BusError;
use berth_proto::{
    Version,
    logs::{LogsReply, LogsRequest, MAX_LOG_CHUNK},
    subjects::{logs_subject, validate_id},
};
use std::{
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};
use tokio_util::sync::CancellationToken;

/// Subscribes for `worker_id` now (so no request sent after `start` returns is missed) and
/// answers until `shutdown`.
pub async fn serve(
    client: async_nats::Client,
    worker_id: &str,
    logs_dir: PathBuf,
    shutdown: CancellationToken,
) -> Result<impl Future<Output = ()> + use<>, BusError> {
    let answer = move |req: LogsRequest| {
        let dir = logs_dir.clone();
        async move {
            tokio::task::spawn_blocking(move || answer(&dir, &req))
                .await
                .unwrap_or_else(|e| failure(format!("reading the log failed: {e}")))
        }
    };
    crate::replier::serve(client, logs_subject(worker_id)?, shutdown, answer, failure).await
}

fn failure(why: String) -> LogsReply {
    LogsReply {
        version: Version::default(),
        offset: 0,
        text: String::new(),
        error: Some(why),
    }
}

/// Reads what `req` asks for. Ids are subject tokens, so a path built from one stays inside
/// the logs directory.
fn answer(logs_dir: &Path, req: &LogsRequest) -> LogsReply {
    if let Err(e) = validate_id(&req.instance_id) {
        return failure(format!("instance_id: {e}"));
    }
    let dir = logs_dir.join(&req.instance_id);
    let version = match req.version {
        Some(v) => v,
        None => match newest_version(&dir) {
            Some(v) => v,
            None => {
                return failure(format!("no log of {} on this worker", req.instance_id));
            }
        },
    };
    let mut path = dir.join(format!("{version}.log"));
    if req.previous > 0 {
        path = PathBuf::from(format!("{}.{}", path.display(), req.previous));
    }
    let Ok(mut file) = std::fs::File::open(&path) else {
        return LogsReply {
            error: Some(format!(
                "no log of {} version {version}{} on this worker",
                req.instance_id,
                if req.previous > 0 {
                    format!(" ({} attempts back)", req.previous)
                } else {
                    String::new()
                }
            )),
            ..failure(String::new())
        };
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let chunk = u64::from(MAX_LOG_CHUNK);
    let start = match req.offset {
        Some(o) if o <= len => o,
        // Shorter than where the follow was: the log was cut at its cap and starts again.
        Some(_) => 0,
        // The last lines: read the end of the file, then keep `tail_lines` of it.
        None => len.saturating_sub(chunk),
    };
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.take(chunk).read_to_end(&mut buf).is_err()
    {
        return failure(format!("cannot read {}", path.display()));
    }
    let end = start + buf.len() as u64;
    let text = String::from_utf8_lossy(&buf);
    let text = match req.offset {
        Some(_) => text.into_owned(),
        None => {
            let lines: Vec<&str> = text.lines().collect();
            let keep = usize::try_from(req.tail_lines).unwrap_or(usize::MAX);
            let mut tail = lines[lines.len().saturating_sub(keep)..].join("\n");
            if !tail.is_empty() {
                tail.push('\n');
            }
            tail
        }
    };
    LogsReply {
        version,
        offset: end,
        text,
        error: None,
    }
}

/// The highest version this worker has a current log of for the instance in `dir`.
fn newest_version(dir: &Path) -> Option<Version> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name();
            let v = name.to_str()?.strip_suffix(".log")?.parse::<i64>().ok()?;
            Some(Version::new(v))
        })
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str) -> LogsRequest {
        LogsRequest {
            instance_id: id.into(),
            version: None,
            previous: 0,
            offset: None,
            tail_lines: 2,
        }
    }

    #[test]
    fn the_newest_log_its_tail_a_follow_and_earlier_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("smol");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("2.log"), "a\nb\nc\n").unwrap();
        std::fs::write(logs.join("2.log.1"), "crashed\n").unwrap();
        std::fs::write(logs.join("10.log"), "x\ny\nz\n").unwrap();
        let r = answer(dir.path(), &request("smol"));
        assert_eq!(
            (r.version, r.text.as_str(), r.offset),
            (Version::new(10), "y\nz\n", 6)
        );
        let older = answer(
            dir.path(),
            &LogsRequest {
                version: Some(Version::new(2)),
                previous: 1,
                ..request("smol")
            },
        );
        assert_eq!(older.text, "crashed\n");
        let follow = answer(
            dir.path(),
            &LogsRequest {
                offset: Some(2),
                ..request("smol")
            },
        );
        assert_eq!((follow.text.as_str(), follow.offset), ("y\nz\n", 6));
        // Cut at its cap since: the follow goes on from its start.
        std::fs::write(logs.join("10.log"), "w\n").unwrap();
        let after_cut = answer(
            dir.path(),
            &LogsRequest {
                offset: Some(6),
                ..request("smol")
            },
        );
        assert_eq!((after_cut.text.as_str(), after_cut.offset), ("w\n", 2));
        assert!(answer(dir.path(), &request("other")).error.is_some());
        // A path cannot leave the logs directory.
        assert!(
            answer(dir.path(), &request("../../etc"))
                .error
                .unwrap()
                .contains("instance_id")
        );
    }
}
