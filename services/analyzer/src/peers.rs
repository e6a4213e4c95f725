//! The other analyzers, from their heartbeats on core NATS, and this analyzer's lane: its
//! share of the workers (see [`berth_fit::Lane`]). Analyzers deciding at the same moment on
//! views that do not yet show each other's holds would otherwise reach for the same emptiest
//! (or tightest) GPUs and lose commits to each other; with lanes each prefers its own share.
//!
//! Each analyzer publishes its member id on [`ANALYZERS_ALIVE`] every `heartbeat_every` (and
//! at once when it hears a newcomer, so that joining takes one round trip), and on
//! [`ANALYZERS_GONE`] when it shuts down. The live ones, this one included, sorted by id,
//! make the lanes: this analyzer's lane is its position among them. A peer silent for
//! three heartbeats leaves. Lanes are a preference, never a rule: while two analyzers
//! disagree about who is alive (for a heartbeat or so), they only conflict more often.

use berth_fit::Lane;
use berth_proto::subjects::{ANALYZERS_ALIVE, ANALYZERS_GONE};
use futures::StreamExt;
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;

/// Both subjects at once.
const ANALYZERS_ANY: &str = "berth.analyzers.*";
/// Longest member id heard; longer payloads are ignored.
const MAX_ID_LEN: usize = 256;
/// Most peers remembered: stray publishers cannot grow the map without bound.
const MAX_PEERS: usize = 1024;

#[derive(Debug)]
struct Heard {
    /// When each other analyzer was last heard.
    peers: HashMap<String, Instant>,
    lane: Lane,
}

/// The analyzers this one hears and the lane that follows.
#[derive(Debug)]
pub struct Peers {
    me: String,
    /// A peer not heard for this long has left.
    alive_for: Duration,
    heard: Mutex<Heard>,
}

impl Peers {
    /// Alone at first: every worker is in this analyzer's lane until it hears others.
    pub fn new(me: impl Into<String>, alive_for: Duration) -> Self {
        Peers {
            me: me.into(),
            alive_for,
            heard: Mutex::new(Heard {
                peers: HashMap::new(),
                lane: Lane::ALL,
            }),
        }
    }

    /// A member id for an analyzer named `name`: the name and a random suffix, so that
    /// analyzers sharing a name stay apart.
    pub fn member_id(name: &str) -> String {
        format!("{name}-{:016x}", rand::random::<u64>())
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn lane(&self) -> Lane {
        self.heard.lock().map_or(Lane::ALL, |h| h.lane)
    }

    /// Analyzers alive, this one included.
    pub fn alive(&self) -> usize {
        self.heard.lock().map_or(1, |h| h.peers.len() + 1)
    }

    /// A heartbeat from `id` at `now`. Returns the new lane when it changed.
    pub fn heard(&self, id: &str, now: Instant) -> Option<Lane> {
        if id == self.me || id.is_empty() || id.len() > MAX_ID_LEN {
            return None;
        }
        let mut heard = self.heard.lock().ok()?;
        if let Some(at) = heard.peers.get_mut(id) {
            *at = now;
            return None;
        }
        if heard.peers.len() >= MAX_PEERS {
            return None;
        }
        heard.peers.insert(id.to_owned(), now);
        self.relane(&mut heard)
    }

    /// `id` said it is leaving. Returns the new lane when it changed.
    pub fn gone(&self, id: &str) -> Option<Lane> {
        let mut heard = self.heard.lock().ok()?;
        heard.peers.remove(id)?;
        self.relane(&mut heard)
    }

    /// Forgets the peers silent for too long at `now`. Returns the new lane when it changed.
    pub fn forget_silent(&self, now: Instant) -> Option<Lane> {
        let mut heard = self.heard.lock().ok()?;
        let before = heard.peers.len();
        heard
            .peers
            .retain(|_, at| now.saturating_duration_since(*at) <= self.alive_for);
        if heard.peers.len() == before {
            return None;
        }
        self.relane(&mut heard)
    }

    fn relane(&self, heard: &mut Heard) -> Option<Lane> {
        let index = heard
            .peers
            .keys()
            .filter(|id| id.as_str() < self.me.as_str())
            .count();
        let count = heard.peers.len() + 1;
        let lane = Lane::new(u32::try_from(index).ok()?, u32::try_from(count).ok()?)?;
        (lane != heard.lane).then(|| {
            heard.lane = lane;
            lane
        })
    }
}

/// This analyzer's subscription to the others' heartbeats.
pub struct Subscription(async_nats::Subscriber);

/// Subscribes to the heartbeats; call before [`run`].
pub async fn subscribe(
    client: &async_nats::Client,
) -> Result<Subscription, async_nats::SubscribeError> {
    let sub = client.subscribe(ANALYZERS_ANY).await?;
    Ok(Subscription(sub))
}

/// Publishes this analyzer's heartbeat every `every` and follows the others' until
/// `shutdown`, then says it is leaving.
pub async fn run(
    client: async_nats::Client,
    peers: std::sync::Arc<Peers>,
    mut sub: Subscription,
    every: Duration,
    shutdown: CancellationToken,
) {
    let beat = || async {
        if let Err(e) = client
            .publish(ANALYZERS_ALIVE, peers.me().to_owned().into())
            .await
        {
            tracing::warn!(%e, "cannot publish this analyzer's heartbeat");
        }
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {
                beat().await;
                peers.forget_silent(Instant::now())
            }
            msg = sub.0.next() => match msg {
                None => break,
                Some(msg) => {
                    let Ok(id) = std::str::from_utf8(&msg.payload) else { continue };
                    match msg.subject.as_str() {
                        ANALYZERS_GONE => peers.gone(id),
                        ANALYZERS_ALIVE => {
                            let joined = peers.heard(id, Instant::now());
                            // A newcomer hears the others at once, not at their next beat.
                            if joined.is_some() {
                                beat().await;
                            }
                            joined
                        }
                        // Another subject under the wildcard: not ours to read.
                        _ => None,
                    }
                }
            },
        };
        if let Some(lane) = changed {
            tracing::info!(
                lane = lane.index(),
                analyzers = lane.count(),
                "analyzers alive changed; workers dealt out again"
            );
        }
    }
    if let Err(e) = client
        .publish(ANALYZERS_GONE, peers.me().to_owned().into())
        .await
    {
        tracing::debug!(%e, "cannot say this analyzer is leaving");
    }
    let _ = client.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALIVE_FOR: Duration = Duration::from_millis(1500);

    fn lane(p: &Peers) -> (u32, u32) {
        let l = p.lane();
        (l.index(), l.count())
    }

    #[test]
    fn the_lane_is_the_position_among_the_live_ids() {
        let now = Instant::now();
        let p = Peers::new("b", ALIVE_FOR);
        assert_eq!(lane(&p), (0, 1));
        assert_eq!(p.heard("c", now).map(|l| l.count()), Some(2));
        assert_eq!(lane(&p), (0, 2));
        assert!(p.heard("a", now).is_some());
        assert_eq!(lane(&p), (1, 3));
        assert_eq!(p.alive(), 3);
        // Heard again: nothing changes.
        assert_eq!(p.heard("a", now), None);
        // Its own heartbeat, empty or overlong ids are not peers.
        assert_eq!(p.heard("b", now), None);
        assert_eq!(p.heard("", now), None);
        assert_eq!(p.heard(&"x".repeat(MAX_ID_LEN + 1), now), None);
        assert_eq!(lane(&p), (1, 3));
    }

    #[test]
    fn silent_and_departed_peers_leave() {
        let start = Instant::now();
        let p = Peers::new("b", ALIVE_FOR);
        p.heard("a", start);
        p.heard("c", start);
        p.heard("a", start + Duration::from_secs(1));
        assert_eq!(
            p.forget_silent(start + ALIVE_FOR),
            None,
            "not silent long enough"
        );
        let after = start + ALIVE_FOR + Duration::from_millis(1);
        assert!(p.forget_silent(after).is_some(), "c was silent");
        assert_eq!(lane(&p), (1, 2));
        assert!(p.gone("a").is_some());
        assert_eq!(lane(&p), (0, 1));
        assert_eq!(p.gone("a"), None, "gone twice");
    }

    #[test]
    fn strays_cannot_grow_the_peers_without_bound() {
        let now = Instant::now();
        let p = Peers::new("me", ALIVE_FOR);
        for i in 0..MAX_PEERS + 10 {
            p.heard(&format!("stray-{i}"), now);
        }
        assert_eq!(p.alive(), MAX_PEERS + 1);
    }

    #[test]
    fn one_subscription_hears_both_subjects() {
        for subject in [ANALYZERS_ALIVE, ANALYZERS_GONE] {
            let head = ANALYZERS_ANY.trim_end_matches('*');
            let token = subject.strip_prefix(head);
            assert!(
                token.is_some_and(|t| !t.is_empty() && !t.contains('.')),
                "{subject}"
            );
        }
    }

    #[test]
    fn member_ids_differ_for_one_name() {
        assert_ne!(Peers::member_id("analyzer"), Peers::member_id("analyzer"));
        assert!(Peers::member_id("analyzer").starts_with("analyzer-"));
    }
}
