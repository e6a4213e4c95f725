//! Where model files may be read from. A start command names its model by path, and the
//! analyzers and agents that read it run with their own rights: so every model file they
//! open (a GGUF file and its shards, `config.json`, safetensors files, the index) is opened
//! here, only under the configured model roots, and only if it is a regular file (or a
//! directory, for a Hugging Face model).
//!
//! The path is made canonical first (symlinks and `..` resolved), checked against the roots,
//! opened with `O_NOFOLLOW | O_NONBLOCK` (a FIFO cannot block the open), and then what was
//! really opened is checked: on Linux its path again (`/proc/self/fd`, so a directory
//! swapped for a symlink in between is caught), and its type from the open descriptor, not
//! from the path. A path outside every root, missing or unreadable gets one fixed text
//! ([`NOT_UNDER_A_ROOT`]), whatever the cause: an error says nothing about what exists
//! outside the roots. Inside them, errors are precise.

use crate::cancel::{Guarded, ReadCancel};
use nix::fcntl::OFlag;
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The words for a path outside every root, missing or unreadable.
pub const NOT_UNDER_A_ROOT: &str = "not a readable model file under a model root";

/// Where model files may be read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelRoots {
    /// Wherever the process can read (regular files and directories only): for a user's
    /// own `berth estimate`, which reads what that user names.
    Anywhere,
    /// Under these directories (canonical paths); none at all refuses every model path.
    Under(Vec<PathBuf>),
}

/// A model root that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RootError {
    #[error("model root {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model root {}: not a directory", .0.display())]
    NotADirectory(PathBuf),
}

/// Why a model path was not opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "model paths are refused: no model root is configured (--model-root or BERTH_MODEL_ROOTS)"
    )]
    NoRoots,
    /// Outside every root, missing, or not readable: the path as named, and fixed words.
    #[error("{}: {NOT_UNDER_A_ROOT}", .0.display())]
    NotUnderRoot(PathBuf),
    #[error("{}: a {kind}, not a regular file", path.display())]
    NotAFile { path: PathBuf, kind: &'static str },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A model file or directory, opened and checked.
#[derive(Debug)]
pub struct Opened {
    /// Its canonical path.
    pub path: PathBuf,
    pub file: File,
    /// From the open descriptor.
    pub meta: Metadata,
}

impl ModelRoots {
    /// The given directories, made canonical; each must exist and be a directory.
    pub fn new<P: AsRef<Path>>(roots: impl IntoIterator<Item = P>) -> Result<Self, RootError> {
        let mut out = Vec::new();
        for root in roots {
            let root = root.as_ref();
            let canonical = std::fs::canonicalize(root).map_err(|source| RootError::Io {
                path: root.to_owned(),
                source,
            })?;
            if !canonical.is_dir() {
                return Err(RootError::NotADirectory(root.to_owned()));
            }
            if !out.contains(&canonical) {
                out.push(canonical);
            }
        }
        Ok(ModelRoots::Under(out))
    }

    /// No root: every model path is refused.
    pub fn none() -> Self {
        ModelRoots::Under(Vec::new())
    }

    /// The roots, or `None` for [`ModelRoots::Anywhere`].
    pub fn roots(&self) -> Option<&[PathBuf]> {
        match self {
            ModelRoots::Anywhere => None,
            ModelRoots::Under(r) => Some(r),
        }
    }

    /// Opens a regular file.
    pub fn open_file(&self, path: &Path) -> Result<Opened, OpenError> {
        self.open_as(path, false)
    }

    /// Opens a regular file or a directory.
    pub fn open(&self, path: &Path) -> Result<Opened, OpenError> {
        self.open_as(path, true)
    }

    fn open_as(&self, path: &Path, dir_ok: bool) -> Result<Opened, OpenError> {
        let roots = match self {
            ModelRoots::Under(r) if r.is_empty() => return Err(OpenError::NoRoots),
            ModelRoots::Under(r) => Some(r.as_slice()),
            ModelRoots::Anywhere => None,
        };
        let refused = || OpenError::NotUnderRoot(path.to_owned());
        let io = |source| OpenError::Io {
            path: path.to_owned(),
            source,
        };
        let canonical = match std::fs::canonicalize(path) {
            Ok(c) => c,
            Err(_) if roots.is_some() => return Err(refused()),
            Err(e) => return Err(io(e)),
        };
        if roots.is_some_and(|r| !under(&canonical, r)) {
            return Err(refused());
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK).bits())
            .open(&canonical)
            .map_err(io)?;
        if let Some(r) = roots
            && !opened_path(&file).is_none_or(|real| under(&real, r))
        {
            return Err(refused());
        }
        let meta = file.metadata().map_err(io)?;
        let ty = meta.file_type();
        if ty.is_file() || (dir_ok && ty.is_dir()) {
            return Ok(Opened {
                path: canonical,
                file,
                meta,
            });
        }
        let kind = if ty.is_dir() {
            "directory"
        } else if ty.is_fifo() {
            "FIFO"
        } else if ty.is_char_device() {
            "character device"
        } else if ty.is_block_device() {
            "block device"
        } else if ty.is_socket() {
            "socket"
        } else {
            "special file"
        };
        Err(OpenError::NotAFile {
            path: path.to_owned(),
            kind,
        })
    }
}

fn under(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

/// The path of what `file` really is, where the system tells it.
fn opened_path(file: &File) -> Option<PathBuf> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        None
    }
}

/// Where model files may be read from, and the reads' cancellation: what every reader of
/// model files is given.
#[derive(Debug, Clone)]
pub struct ModelAccess {
    pub roots: ModelRoots,
    pub cancel: ReadCancel,
}

impl ModelAccess {
    pub fn new(roots: ModelRoots, cancel: ReadCancel) -> Self {
        ModelAccess { roots, cancel }
    }

    /// Anything the process can read, never cancelled: the CLI's own reads.
    pub fn anywhere() -> Self {
        ModelAccess::new(ModelRoots::Anywhere, ReadCancel::new())
    }

    /// A regular file opened for reading: its canonical path, length, and a reader that stops
    /// when the reads are cancelled.
    pub(crate) fn open_file(
        &self,
        path: &Path,
    ) -> Result<(PathBuf, u64, Guarded<File>), OpenError> {
        let o = self.roots.open_file(path)?;
        Ok((
            o.path,
            o.meta.len(),
            Guarded::new(o.file, self.cancel.clone()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outside_missing_and_escaping_read_alike() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("models");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("ok.gguf"), b"GGUF").unwrap();
        std::fs::write(dir.path().join("secret"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nothing"), root.join("dangling")).unwrap();
        let roots = ModelRoots::new([&root]).unwrap();
        assert!(roots.open_file(&root.join("ok.gguf")).is_ok());
        let texts: Vec<String> = [
            dir.path().join("secret"),
            dir.path().join("nothing"),
            root.join("escape"),
            root.join("dangling"),
            root.join("../secret"),
            PathBuf::from("/etc/passwd"),
        ]
        .iter()
        .map(|p| {
            let e = roots.open_file(p).unwrap_err();
            assert!(matches!(e, OpenError::NotUnderRoot(_)), "{p:?}: {e:?}");
            e.to_string().replace(&p.display().to_string(), "P")
        })
        .collect();
        assert!(
            texts.iter().all(|t| t == &format!("P: {NOT_UNDER_A_ROOT}")),
            "{texts:?}"
        );
    }

    #[test]
    fn only_regular_files_and_directories_open() {
        let dir = tempfile::tempdir().unwrap();
        let roots = ModelRoots::new([dir.path()]).unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Refused at once: the open does not wait for a writer.
        let e = roots.open(&fifo).unwrap_err();
        assert!(e.to_string().contains("a FIFO, not a regular file"), "{e}");
        let e = roots.open_file(dir.path()).unwrap_err();
        assert!(e.to_string().contains("a directory"), "{e}");
        assert!(roots.open(dir.path()).unwrap().meta.is_dir());
        let e = ModelRoots::Anywhere
            .open_file(Path::new("/dev/null"))
            .unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
    }

    #[test]
    fn no_root_refuses_every_path_and_names_the_flag() {
        let e = ModelRoots::none().open(Path::new("/tmp")).unwrap_err();
        assert!(e.to_string().contains("--model-root"), "{e}");
        assert!(ModelRoots::new(["/nonexistent-root"]).is_err());
    }

    #[test]
    fn a_root_is_a_whole_directory_name() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ab) = (dir.path().join("m"), dir.path().join("m2"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&ab).unwrap();
        std::fs::write(ab.join("x.gguf"), b"GGUF").unwrap();
        let roots = ModelRoots::new([&a]).unwrap();
        assert!(matches!(
            roots.open_file(&ab.join("x.gguf")),
            Err(OpenError::NotUnderRoot(_))
        ));
    }
}
