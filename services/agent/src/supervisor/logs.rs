//! Server logs: `<logs>/<instance>/<version>.log`, appended by the server itself (its stdout
//! and stderr), the previous attempts' kept as `.log.1` … `.log.N`.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

/// Moves `path` to `path.1` (and `.1` to `.2` …), dropping what is past `keep`; then opens a
/// fresh `path` for appending.
pub fn rotate_and_open(path: &Path, keep: usize) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let numbered = |i: usize| -> PathBuf {
        let mut p = path.as_os_str().to_owned();
        p.push(format!(".{i}"));
        PathBuf::from(p)
    };
    if path.exists() {
        if keep == 0 {
            std::fs::remove_file(path)?;
        } else {
            let _ = std::fs::remove_file(numbered(keep));
            for i in (1..keep).rev() {
                let from = numbered(i);
                if from.exists() {
                    std::fs::rename(&from, numbered(i + 1))?;
                }
            }
            std::fs::rename(path, numbered(1))?;
        }
    }
    OpenOptions::new().create(true).append(true).open(path)
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
