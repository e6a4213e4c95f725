//! Server logs: `<logs>/<instance>/<version>.log`, appended by the server itself (its stdout
//! and stderr, so that it keeps logging while no agent runs), the earlier files kept as
//! `.log.1` … `.log.N`: the previous attempts', and the earlier part of an attempt whose log
//! passed the size cap ([`keep_bounded`]). Only the newest few versions of an instance keep
//! their logs.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::Duration,
};

/// Versions of one instance whose logs are kept (the newest).
const VERSIONS_KEPT: usize = 3;

fn numbered(path: &Path, i: usize) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{i}"));
    PathBuf::from(p)
}

/// Shifts `.1` to `.2` … up to `keep`, dropping the last, so that `.1` is free.
fn shift(path: &Path, keep: usize) -> std::io::Result<()> {
    let _ = std::fs::remove_file(numbered(path, keep));
    for i in (1..keep).rev() {
        let from = numbered(path, i);
        if from.exists() {
            std::fs::rename(&from, numbered(path, i + 1))?;
        }
    }
    Ok(())
}

/// Moves `path` to `path.1` (and `.1` to `.2` …), dropping what is past `keep`, and the logs
/// of all but the newest versions of the instance; then opens a fresh `path` for appending.
pub fn rotate_and_open(path: &Path, keep: usize) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
        prune_versions(dir, path, VERSIONS_KEPT);
    }
    if path.exists() {
        if keep == 0 {
            std::fs::remove_file(path)?;
        } else {
            shift(path, keep)?;
            std::fs::rename(path, numbered(path, 1))?;
        }
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// Removes the logs (`<v>.log`, `<v>.log.N`) of the versions in `dir` older than the newest
/// `versions` ones, counting `current`'s version among them.
fn prune_versions(dir: &Path, current: &Path, versions: usize) {
    let version_of = |name: &str| -> Option<i64> { name.split('.').next()?.parse().ok() };
    let current = current
        .file_name()
        .and_then(|n| version_of(&n.to_string_lossy()));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let files: Vec<(i64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| Some((version_of(e.file_name().to_str()?)?, e.path())))
        .collect();
    let mut seen: Vec<i64> = files.iter().map(|(v, _)| *v).chain(current).collect();
    seen.sort_unstable_by(|a, b| b.cmp(a));
    seen.dedup();
    let Some(&oldest_kept) = seen.get(versions.saturating_sub(1)) else {
        return;
    };
    for (v, path) in files {
        if v < oldest_kept {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Keeps the log at `path` near `max_bytes` while its server writes to it: every `every`, a
/// log past the cap has its last `max_bytes` (from a line start) copied to `.1`, the older
/// files shifted as for a restart, and is truncated in place. The server appends (the file
/// is open with `O_APPEND`), so its next line goes to the start. Lines written during the
/// copy are lost; a log grows past the cap by what its server writes in `every` at most.
/// Runs until dropped.
pub async fn keep_bounded(path: PathBuf, max_bytes: u64, keep: usize, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let over = std::fs::metadata(&path).is_ok_and(|m| m.len() > max_bytes);
        if !over {
            continue;
        }
        let p = path.clone();
        match tokio::task::spawn_blocking(move || cut(&p, max_bytes, keep)).await {
            Ok(Ok(())) => tracing::debug!(path = %path.display(), "server log rotated at its cap"),
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), %e, "cannot rotate the server log")
            }
            Err(e) => tracing::warn!(%e, "log rotation task failed"),
        }
    }
}

/// One rotation of [`keep_bounded`].
fn cut(path: &Path, max_bytes: u64, keep: usize) -> std::io::Result<()> {
    if keep > 0 {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        let from = len.saturating_sub(max_bytes);
        f.seek(SeekFrom::Start(from))?;
        let mut tail = Vec::new();
        f.take(max_bytes).read_to_end(&mut tail)?;
        // From the first whole line, unless the tail is one line.
        let start = match tail.iter().position(|b| *b == b'\n') {
            Some(nl) if from > 0 && nl + 1 < tail.len() => nl + 1,
            _ => 0,
        };
        shift(path, keep)?;
        std::fs::write(numbered(path, 1), &tail[start..])?;
    }
    OpenOptions::new().write(true).open(path)?.set_len(0)
}

/// Appends one line of the agent's own (a header before a start).
pub fn note(file: &mut File, line: &str) {
    let _ = writeln!(file, "# berth-agent: {line}");
}

/// The last `lines` lines of the log (at most `max_bytes` of them, the end kept), joined by
/// " | " for a one-line reason; empty when there is no log.
pub fn tail(path: &Path, lines: usize, max_bytes: usize) -> String {
    const READ: u64 = 16 * 1024;
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if f.seek(SeekFrom::Start(len.saturating_sub(READ))).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut last: Vec<&str> = text
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .rev()
        .take(lines)
        .collect();
    last.reverse();
    let joined = last.join(" | ");
    if joined.len() <= max_bytes {
        return joined;
    }
    let mut cut = joined.len() - max_bytes;
    while !joined.is_char_boundary(cut) {
        cut += 1;
    }
    format!("…{}", &joined[cut..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_the_last_lines_bounded_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.log");
        assert_eq!(tail(&path, 3, 100), "");
        let mut text: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        text.push_str("\n  \nerror: boom é\n");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(tail(&path, 3, 100), "line 4998 | line 4999 | error: boom é");
        let cut = tail(&path, 3, 12);
        assert_eq!(cut, "…ror: boom é");
        assert_eq!(tail(&path, 3, 11), "…or: boom é");
        assert_eq!(tail(&path, 1, 1), "…", "never inside a character");
    }

    #[test]
    fn a_log_past_its_cap_keeps_its_last_lines_and_starts_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i1/3.log");
        let mut f = rotate_and_open(&path, 2).unwrap();
        for round in 0..3 {
            for i in 0..100 {
                writeln!(f, "round {round} line {i:03}").unwrap();
            }
            cut(&path, 64, 2).unwrap();
            assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
            writeln!(f, "after {round}").unwrap();
            // The writer appends: its next line starts the truncated file.
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                format!("after {round}\n")
            );
        }
        let read = |name: &str| std::fs::read_to_string(dir.path().join("i1").join(name)).unwrap();
        // The last whole lines within 64 bytes.
        assert_eq!(
            read("3.log.1"),
            "round 2 line 097\nround 2 line 098\nround 2 line 099\n"
        );
        assert!(read("3.log.2").starts_with("round 1 line"));
        assert_eq!(std::fs::read_dir(dir.path().join("i1")).unwrap().count(), 3);
    }

    #[test]
    fn only_the_newest_versions_keep_their_logs() {
        let dir = tempfile::tempdir().unwrap();
        for v in 1..=5 {
            let path = dir.path().join(format!("i1/{v}.log"));
            rotate_and_open(&path, 2).unwrap();
            rotate_and_open(&path, 2).unwrap();
        }
        let mut names: Vec<String> = std::fs::read_dir(dir.path().join("i1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            ["3.log", "3.log.1", "4.log", "4.log.1", "5.log", "5.log.1"]
        );
    }

    #[test]
    fn logs_of_earlier_attempts_are_kept_up_to_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i1/3.log");
        for attempt in 0..5 {
            let mut f = rotate_and_open(&path, 2).unwrap();
            writeln!(f, "attempt {attempt}").unwrap();
        }
        let read = |name: &str| std::fs::read_to_string(dir.path().join("i1").join(name)).unwrap();
        assert_eq!(read("3.log"), "attempt 4\n");
        assert_eq!(read("3.log.1"), "attempt 3\n");
        assert_eq!(read("3.log.2"), "attempt 2\n");
        assert_eq!(std::fs::read_dir(dir.path().join("i1")).unwrap().count(), 3);
    }
}
