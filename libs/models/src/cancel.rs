//! Reads that end when asked to, or at a deadline: a profile is read on a blocking thread,
//! and the caller that stops waiting for it (a timeout, a newer command) must not leave that
//! thread reading a huge or slow file on its own.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Stops the reads of one profile: when [`ReadCancel::cancel`] is called (from any thread)
/// or its deadline passes, the next read of a file opened through it fails.
#[derive(Debug, Clone, Default)]
pub struct ReadCancel {
    flag: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

impl ReadCancel {
    /// Never cancelled unless asked to.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled at `deadline` at the latest.
    pub fn until(deadline: Instant) -> Self {
        ReadCancel {
            flag: Arc::default(),
            deadline: Some(deadline),
        }
    }

    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// An error once cancelled, for the reader to return instead of reading.
    pub fn check(&self) -> io::Result<()> {
        if self.is_cancelled() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the read was cancelled",
            ));
        }
        Ok(())
    }

    /// A guard that cancels these reads when dropped: the waiting side holds it, so giving
    /// up on the read (or being dropped itself) stops the reading thread.
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

/// Cancels its [`ReadCancel`] when dropped.
#[derive(Debug)]
pub struct CancelOnDrop(ReadCancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A reader that looks at its [`ReadCancel`] before every read of the inner reader.
#[derive(Debug)]
pub struct Guarded<R> {
    inner: R,
    cancel: ReadCancel,
}

impl<R> Guarded<R> {
    pub fn new(inner: R, cancel: ReadCancel) -> Self {
        Guarded { inner, cancel }
    }
}

impl<R: Read> Read for Guarded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.cancel.check()?;
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_read_fails_at_its_next_read() {
        let cancel = ReadCancel::new();
        let mut r = Guarded::new(&b"abcdef"[..], cancel.clone());
        let mut buf = [0u8; 3];
        assert_eq!(r.read(&mut buf).unwrap(), 3);
        drop(cancel.cancel_on_drop());
        assert!(cancel.is_cancelled());
        assert_eq!(
            r.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::TimedOut
        );
    }

    #[test]
    fn a_passed_deadline_cancels() {
        let cancel = ReadCancel::until(Instant::now());
        assert!(cancel.is_cancelled());
        assert!(!ReadCancel::new().is_cancelled());
    }
}
