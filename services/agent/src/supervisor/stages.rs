//! Instances spread over several workers (llama.cpp only): each follower runs an RPC server
//! for its stage and publishes where it is on its [`StageBoard`]; the leader asks every
//! follower through [`Peers`] (NATS request/reply on `berth.rpc.<follower>` in the agent)
//! until all stages are ready, launches `llama-server --rpc …` with them, and checks them
//! again at each health probe: a stage that restarted (another endpoint or restart count) or
//! went away makes the leader restart too, since llama-server does not reconnect.

use super::{Ended, Placement, Shared, Stop, stop_asked};
use berth_proto::{
    Version,
    rpc::{RpcPartState, RpcReply, RpcRequest},
};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};
use tokio::sync::watch;

/// How a leader asks another worker's agent about its stage.
pub trait Peers: Send + Sync + std::fmt::Debug {
    fn ask(
        &self,
        worker_id: &str,
        request: RpcRequest,
    ) -> BoxFuture<'static, Result<RpcReply, String>>;
}

/// The stages this worker runs for leaders elsewhere, by instance: what it answers on
/// `berth.rpc.<worker>`. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct StageBoard(Arc<Mutex<HashMap<String, (Version, RpcReply)>>>);

impl StageBoard {
    /// The answer to a leader's request: only for the placement asked about.
    pub fn answer(&self, req: &RpcRequest) -> RpcReply {
        self.0
            .lock()
            .ok()
            .and_then(|m| {
                m.get(&req.instance_id)
                    .filter(|(v, _)| *v == req.version)
                    .map(|(_, r)| r.clone())
            })
            .unwrap_or_else(RpcReply::not_assigned)
    }

    pub(super) fn set(&self, p: &Placement, reply: RpcReply) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(p.instance_id.clone(), (p.version, reply));
        }
    }

    /// Not ready (launching, restarting).
    pub(super) fn not_yet(&self, p: &Placement, restarts: u32) {
        self.set(
            p,
            RpcReply {
                state: RpcPartState::NotYet,
                endpoint: None,
                restarts,
            },
        );
    }

    /// Registers `p` as not ready until the guard is dropped, when it is removed (unless a
    /// newer version replaced it meanwhile).
    pub(super) fn enter(&self, p: &Placement) -> BoardEntry {
        self.not_yet(p, 0);
        BoardEntry {
            board: self.clone(),
            instance_id: p.instance_id.clone(),
            version: p.version,
        }
    }
}

/// Removes a placement from its board when its task ends.
#[derive(Debug)]
pub(super) struct BoardEntry {
    board: StageBoard,
    instance_id: String,
    version: Version,
}

impl Drop for BoardEntry {
    fn drop(&mut self) {
        if let Ok(mut m) = self.board.0.lock()
            && m.get(&self.instance_id)
                .is_some_and(|(v, _)| *v == self.version)
        {
            m.remove(&self.instance_id);
        }
    }
}

/// A follower's stage as the leader found it, kept in the leader's state record so that an
/// agent that adopts the leader's server checks the same stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowerStage {
    pub worker_id: String,
    pub endpoint: String,
    pub restarts: u32,
}

/// Why the followers' stages are not what the leader's server runs with.
pub(super) enum StagesCheck {
    /// A stage restarted or went away: the leader's server must restart.
    Changed(String),
    /// A follower did not answer (its agent restarting, NATS away): like a failed probe.
    Unanswered(String),
}

impl Shared {
    /// Each follower's answer about `p`, asked at once.
    async fn ask_followers(&self, p: &Placement) -> Vec<(String, Result<RpcReply, String>)> {
        let Some(peers) = self.peers.get() else {
            let why = "this agent cannot reach other workers (no NATS)".to_owned();
            return p
                .followers()
                .iter()
                .map(|w| (w.clone(), Err(why.clone())))
                .collect();
        };
        let timeout = self.config.probe_timeout;
        let asks = p.followers().iter().map(|w| {
            let ask = peers.ask(
                w,
                RpcRequest {
                    instance_id: p.instance_id.clone(),
                    version: p.version,
                },
            );
            async move {
                let reply = match tokio::time::timeout(timeout, ask).await {
                    Ok(r) => r,
                    Err(_) => Err(format!("no answer within {timeout:?}")),
                };
                (w.clone(), reply)
            }
        });
        futures::future::join_all(asks).await
    }

    /// Asks the followers until every stage is ready; their stages in order. Gives up at a
    /// stop or at `deadline` (an `error` naming the stages that were not ready, and why).
    pub(super) async fn await_followers(
        &self,
        p: &Placement,
        stop: &mut watch::Receiver<Option<Stop>>,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<FollowerStage>, Ended> {
        loop {
            let mut ready = Vec::new();
            let mut waiting = Vec::new();
            for (worker_id, reply) in self.ask_followers(p).await {
                match reply {
                    Ok(RpcReply {
                        state: RpcPartState::Ready,
                        endpoint: Some(endpoint),
                        restarts,
                    }) => ready.push(FollowerStage {
                        worker_id,
                        endpoint,
                        restarts,
                    }),
                    Ok(r) => waiting.push(format!("{worker_id}: {:?}", r.state)),
                    Err(e) => waiting.push(format!("{worker_id}: {e}")),
                }
            }
            if waiting.is_empty() {
                tracing::info!(
                    instance_id = p.instance_id, version = %p.version, stages = ?ready,
                    "every follower's stage is ready"
                );
                return Ok(ready);
            }
            tokio::select! {
                s = stop_asked(stop) => return Err(Ended::Stopped(s)),
                () = tokio::time::sleep_until(deadline) => {
                    return Err(Ended::Fatal(format!(
                        "stages on other workers not ready after {}s ({})",
                        self.config.startup_timeout.as_secs_f32(),
                        waiting.join("; ")
                    )));
                }
                () = tokio::time::sleep(self.config.startup_probe_every) => {}
            }
        }
    }

    /// Whether the followers still run the stages the leader's server was started with.
    pub(super) async fn check_followers(
        &self,
        p: &Placement,
        known: &[FollowerStage],
    ) -> Result<(), StagesCheck> {
        for (worker_id, reply) in self.ask_followers(p).await {
            let reply = reply.map_err(|e| StagesCheck::Unanswered(format!("{worker_id}: {e}")))?;
            let same = known.iter().any(|k| {
                k.worker_id == worker_id
                    && reply.state == RpcPartState::Ready
                    && reply.endpoint.as_deref() == Some(k.endpoint.as_str())
                    && reply.restarts == k.restarts
            });
            if !same {
                return Err(StagesCheck::Changed(format!(
                    "the stage on {worker_id} changed ({:?} at {}, restarts {})",
                    reply.state,
                    reply.endpoint.as_deref().unwrap_or("no endpoint"),
                    reply.restarts
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Stage;
    use berth_proto::StartSpec;

    fn placement(version: i64) -> Placement {
        Placement {
            instance_id: "big".into(),
            version: Version::new(version),
            gpus: Vec::new(),
            spec: StartSpec::claim(1, 1),
            workers: vec!["w1".into(), "w2".into()],
            stage: Stage::Follower,
        }
    }

    #[test]
    fn the_board_answers_for_the_placement_asked_about_only() {
        let board = StageBoard::default();
        let ask = |v: i64| {
            board.answer(&RpcRequest {
                instance_id: "big".into(),
                version: Version::new(v),
            })
        };
        assert_eq!(ask(2), RpcReply::not_assigned());
        let entry = board.enter(&placement(2));
        assert_eq!(ask(2).state, RpcPartState::NotYet);
        board.set(
            &placement(2),
            RpcReply {
                state: RpcPartState::Ready,
                endpoint: Some("h:1".into()),
                restarts: 0,
            },
        );
        assert_eq!(ask(2).endpoint.as_deref(), Some("h:1"));
        assert_eq!(ask(1), RpcReply::not_assigned(), "another version");
        // A newer version registered before the older one's task ended stays.
        let newer = board.enter(&placement(3));
        drop(entry);
        assert_eq!(ask(3).state, RpcPartState::NotYet);
        drop(newer);
        assert_eq!(ask(3), RpcReply::not_assigned());
    }
}
