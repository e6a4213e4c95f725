//! The fits in flight in this analyzer, and the commands its watch heard lately: one owner
//! for both, since a command heard cancels a fit and a fit asks what was heard. A fit is
//! registered by [`InFlight::begin`], and the [`FitGuard`] it returns ends it when dropped,
//! on every path out of the placement.

use crate::recent::Recent;
use berth_proto::{CmdSeq, Command, StartSpec};
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

/// One fit: its command's sequence and spec, and the token that cancels it.
#[derive(Debug)]
struct Fit {
    seq: CmdSeq,
    spec: StartSpec,
    token: CancellationToken,
}

#[derive(Debug)]
pub(crate) struct InFlight {
    fits: Mutex<HashMap<String, Fit>>,
    /// The last command the watch heard per instance, and when: a command published just
    /// before a fit begins may not be stored yet when the fit asks the stream.
    recent: Mutex<Recent>,
}

/// A fit registered in flight; the registration ends when the guard is dropped.
#[derive(Debug)]
pub(crate) struct FitGuard<'a> {
    owner: &'a InFlight,
    instance_id: String,
    seq: CmdSeq,
    token: CancellationToken,
}

impl FitGuard<'_> {
    /// Fires when a newer command for the instance is heard or handled here.
    pub(crate) fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl Drop for FitGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut fits) = self.owner.fits.lock()
            && fits
                .get(&self.instance_id)
                .is_some_and(|f| f.seq == self.seq)
        {
            fits.remove(&self.instance_id);
        }
    }
}

impl InFlight {
    /// Remembers heard commands for `recent_for`.
    pub(crate) fn new(recent_for: Duration) -> Self {
        InFlight {
            fits: Mutex::new(HashMap::new()),
            recent: Mutex::new(Recent::new(recent_for)),
        }
    }

    /// Registers a fit for `instance_id` at `seq`, cancelling an older one in flight here.
    /// A fit of a newer command in flight here is left alone, and the new guard is born
    /// cancelled: its command is stale (its intent will say so).
    pub(crate) fn begin(&self, instance_id: &str, seq: CmdSeq, spec: &StartSpec) -> FitGuard<'_> {
        self.supersede(instance_id, seq);
        let token = CancellationToken::new();
        let guard = |seq| FitGuard {
            owner: self,
            instance_id: instance_id.to_owned(),
            seq,
            token: token.clone(),
        };
        if let Ok(mut fits) = self.fits.lock() {
            if fits.get(instance_id).is_some_and(|f| f.seq > seq) {
                token.cancel();
                // Never matches the newer fit's sequence, so dropping it ends nothing.
                return guard(CmdSeq::new(u64::MAX));
            }
            let fit = Fit {
                seq,
                spec: spec.clone(),
                token: token.clone(),
            };
            fits.insert(instance_id.to_owned(), fit);
        }
        guard(seq)
    }

    /// A newer command (`seq`) for `instance_id` arrived: abandon any older fit in flight
    /// here. Returns whether one was cancelled.
    pub(crate) fn supersede(&self, instance_id: &str, seq: CmdSeq) -> bool {
        self.cancel_if(instance_id, |f| f.seq < seq)
    }

    /// The watch heard `command` for `instance_id` (its sequence not known): remember it a
    /// moment, and abandon a fit in flight here unless the command is the same start (most
    /// likely the fit's own command, heard late). The fit confirms with the stream before it
    /// gives up for good, so an old command heard late costs a redo, never a placement.
    pub(crate) fn heard(&self, instance_id: &str, command: Option<Command>) {
        self.cancel_if(
            instance_id,
            |f| !matches!(&command, Some(Command::Start(spec)) if *spec == f.spec),
        );
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(instance_id, command, Instant::now());
        }
    }

    /// Whether a command other than `spec`'s start was heard for `instance_id` lately (it
    /// may be newer than the fit about to run, and not stored yet).
    pub(crate) fn heard_other_lately(&self, instance_id: &str, spec: &StartSpec) -> bool {
        self.recent.lock().is_ok_and(|recent| {
            recent
                .get(instance_id, Instant::now())
                .is_some_and(|cmd| !matches!(cmd, Some(Command::Start(s)) if s == spec))
        })
    }

    fn cancel_if(&self, instance_id: &str, pred: impl Fn(&Fit) -> bool) -> bool {
        if let Ok(fits) = self.fits.lock()
            && let Some(fit) = fits.get(instance_id)
            && !fit.token.is_cancelled()
            && pred(fit)
        {
            fit.token.cancel();
            return true;
        }
        false
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.fits.lock().map(|f| f.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vram: i64) -> StartSpec {
        StartSpec::claim(vram, 1)
    }

    #[test]
    fn a_guard_ends_its_fit_when_dropped() {
        let fits = InFlight::new(Duration::from_secs(1));
        {
            let guard = fits.begin("a", CmdSeq::new(5), &spec(1));
            assert!(!guard.token().is_cancelled());
            assert_eq!(fits.len(), 1);
        }
        assert_eq!(fits.len(), 0);
    }

    #[test]
    fn a_newer_command_cancels_and_an_older_one_does_not_replace() {
        let fits = InFlight::new(Duration::from_secs(1));
        let old = fits.begin("a", CmdSeq::new(5), &spec(1));
        let new = fits.begin("a", CmdSeq::new(7), &spec(2));
        assert!(old.token().is_cancelled() && !new.token().is_cancelled());
        // The older guard ends nothing of the newer fit.
        drop(old);
        assert_eq!(fits.len(), 1);
        // An older command arriving late is born cancelled and leaves the newer fit alone.
        let late = fits.begin("a", CmdSeq::new(6), &spec(3));
        assert!(late.token().is_cancelled() && !new.token().is_cancelled());
        drop(late);
        assert_eq!(fits.len(), 1);
        assert!(fits.supersede("a", CmdSeq::new(8)));
        assert!(new.token().is_cancelled());
    }

    #[test]
    fn a_heard_command_cancels_unless_it_is_the_fits_own_start() {
        let fits = InFlight::new(Duration::from_secs(1));
        let guard = fits.begin("a", CmdSeq::new(5), &spec(1));
        fits.heard("a", Some(Command::Start(spec(1))));
        assert!(!guard.token().is_cancelled());
        assert!(!fits.heard_other_lately("a", &spec(1)));
        fits.heard("a", None);
        assert!(guard.token().is_cancelled());
        assert!(fits.heard_other_lately("a", &spec(1)));
    }
}
