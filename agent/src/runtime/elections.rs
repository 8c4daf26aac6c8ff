//! The election timer (openraft's own is off; see `raft_config`): a voter that has heard from no
//! leader asks for pre-votes and starts an election only when a quorum would grant it. And the
//! hand-off of a stopping leader: it names a successor, which campaigns once openraft's lease has
//! passed instead of after an election timeout of silence.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tracing::{debug, info, warn};

use crate::adapters::raft::RaftMetrics;
use crate::core::membership::{self};
use crate::core::state::NodeId;
use crate::proto::paths;

use super::Node;
use super::driver::{Action, LoopError, Reconciler, Triggers, Wake};

/// The election timer: a voter that has heard from no leader for a random election timeout asks
/// the others for their pre-vote, and starts an election (openraft raises its term and asks for
/// real votes) only when a quorum would grant it. Runs for the whole agent run.
pub(super) struct ElectionLoop {
    timeout: Duration,
    last_try: Option<Instant>,
    /// The timer runs from when this node became a voter (not from before it formed or joined
    /// the cluster, which could start a second election right after the first).
    voter_since: Option<Instant>,
}

impl ElectionLoop {
    pub(super) fn new(node: &Node) -> ElectionLoop {
        ElectionLoop { timeout: node.election_timeout(), last_try: None, voter_since: None }
    }
}

impl Reconciler for ElectionLoop {
    const NAME: &'static str = "elections";
    const TRIGGERS: Triggers = Triggers { state: false, nudge: false, local: false };

    async fn reconcile(&mut self, node: &Arc<Node>, _wake: Wake) -> Result<Action, LoopError> {
        let m = node.metrics();
        let voter = m.membership_config.membership().voter_ids().any(|v| v == node.id());
        if !voter {
            self.voter_since = None;
        } else if self.voter_since.is_none() {
            self.voter_since = Some(Instant::now());
        }
        let since_try = self.last_try.map_or(Duration::MAX, |t| t.elapsed());
        let since_voter = self.voter_since.map_or(Duration::ZERO, |t| t.elapsed());
        let silence = node.leader_silence().min(since_try).min(since_voter);
        // Named by the stopping leader: campaign once the voters' lease has passed.
        let handed = node.handed_to(&m) == Some(node.id());
        let due = if handed { node.hand_off_wait() } else { self.timeout };
        if voter && !Node::is_leader(&m) && m.running_state.is_ok() && silence >= due {
            self.last_try = Some(Instant::now());
            self.timeout = node.election_timeout();
            if node.pre_vote(&m).await
                && (handed || node.leader_silence() >= Duration::from_millis(node.cfg.raft.election_timeout_min_ms))
            {
                let why = if handed { "the stopping leader handed over" } else { "no leader heard from" };
                info!(node_id = %node.id(), term = m.current_term + 1, "{why}: pre-vote granted, starting an election");
                if let Err(e) = node.raft.trigger().elect().await {
                    warn!(node_id = %node.id(), "cannot start an election: {e}");
                }
            }
            return Ok(Action::After(Duration::ZERO));
        }
        let wait = due.saturating_sub(silence).clamp(Duration::from_millis(20), Duration::from_millis(200));
        Ok(Action::After(wait))
    }
}

/// A hand-off this node took from the leader it follows (see [`crate::proto::HandOffRequest`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct HandOff {
    leader: NodeId,
    successor: NodeId,
    at: Instant,
}

impl Node {
    // -----------------------------------------------------------------------------------------
    // Elections (openraft's own election timer is off; see raft_config)
    // -----------------------------------------------------------------------------------------

    /// Since this node last heard from a leader (or granted a vote), or since the run started.
    pub(super) fn leader_silence(&self) -> Duration {
        self.heard_from_leader.latest().unwrap_or(self.started).max(self.started).elapsed()
    }

    pub(super) fn election_timeout(&self) -> Duration {
        let (lo, hi) = (self.cfg.raft.election_timeout_min_ms, self.cfg.raft.election_timeout_max_ms);
        Duration::from_millis(rand::thread_rng().gen_range(lo..=hi.max(lo)))
    }

    /// The successor named by the stopping leader this node follows: while this node has seen
    /// no other leader since, and for one shortest election timeout at most (after that, the
    /// ordinary silence grants a pre-vote anyway).
    pub(super) fn handed_to(&self, m: &RaftMetrics) -> Option<NodeId> {
        let h = (*self.hand_off.lock().unwrap())?;
        let fresh = h.at.elapsed() < Duration::from_millis(self.cfg.raft.election_timeout_min_ms);
        (fresh && m.current_leader.is_none_or(|l| l == h.leader)).then_some(h.successor)
    }

    /// How long a named successor waits from the last heartbeat before it campaigns: openraft's
    /// lease, which every voter heard begin at about the same time, and half a heartbeat more.
    fn hand_off_wait(&self) -> Duration {
        crate::adapters::raft::vote_lease(&self.cfg.raft) + Duration::from_millis(self.cfg.raft.heartbeat_ms / 2)
    }

    /// Takes the hand-off of the leader this node follows in that leader's term (the peer API
    /// checked that the leader itself sent it).
    pub fn take_hand_off(&self, req: &crate::proto::HandOffRequest) -> crate::proto::HandOffResponse {
        let m = self.metrics();
        let refusal = if m.current_leader != Some(req.leader) || m.current_term != req.term {
            Some(format!(
                "this node follows {} in term {}, not {} in term {}",
                m.current_leader.map_or_else(|| "no leader".to_string(), |l| l.to_string()),
                m.current_term,
                req.leader,
                req.term
            ))
        } else if !m.membership_config.membership().voter_ids().any(|v| v == req.successor) {
            Some(format!("{} is not a voter here", req.successor))
        } else {
            None
        };
        if let Some(why) = &refusal {
            info!(node_id = %self.id(), leader = %req.leader, "hand-off refused: {why}");
        } else {
            info!(node_id = %self.id(), leader = %req.leader, successor = %req.successor, term = req.term, "the stopping leader hands over");
            *self.hand_off.lock().unwrap() =
                Some(HandOff { leader: req.leader, successor: req.successor, at: Instant::now() });
        }
        crate::proto::HandOffResponse { taken: refusal.is_none(), reason: refusal }
    }

    /// On a graceful stop of the leader: waits (one RPC timeout at most) until a voter has matched
    /// the whole log, stops this node's Raft (no more heartbeats), and names that voter the
    /// successor to every other voter. Returns the successor, if there was one to name. The
    /// next leader is then elected after openraft's lease rather than an election timeout.
    pub async fn hand_off(&self) -> Option<NodeId> {
        let m = self.metrics();
        if !Self::is_leader(&m) {
            return None;
        }
        let membership = m.membership_config.membership().clone();
        let last = m.last_log_index;
        let deadline = Instant::now() + Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let mut rx = self.raft.metrics();
        let successor = loop {
            let matched: std::collections::BTreeMap<NodeId, Option<u64>> =
                rx.borrow().replication.iter().flatten().map(|(id, log)| (*id, log.map(|l| l.index))).collect();
            let successor = membership::choose_successor(self.id(), membership.voter_ids(), &matched);
            let caught_up = successor.and_then(|s| matched.get(&s).copied().flatten()) >= last;
            let left = deadline.saturating_duration_since(Instant::now());
            if caught_up || left.is_zero() {
                break successor;
            }
            let _ = tokio::time::timeout(left, rx.changed()).await;
        }?;
        if let Err(e) = self.raft.shutdown().await {
            warn!(node_id = %self.id(), "Raft shutdown before the hand-off: {e}");
        }
        let req = crate::proto::HandOffRequest { leader: self.id(), term: m.current_term, successor };
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let calls = membership.voter_ids().filter(|v| *v != self.id()).filter_map(|v| {
            let addr = membership.get_node(&v)?.addr.clone();
            let req = req.clone();
            Some(async move {
                let routed = self.route(v, &addr);
                let path = format!("{}/{}", paths::RAFT_HANDOFF, v);
                (v, self.client.call::<_, crate::proto::HandOffResponse>(&routed, v, &path, &req, t).await)
            })
        });
        let answers = futures::future::join_all(calls).await;
        let taken = answers.iter().filter(|(_, r)| r.as_ref().is_ok_and(|r| r.taken)).count();
        for (v, r) in &answers {
            match r {
                Ok(r) if !r.taken => warn!(peer = %v, "hand-off refused: {}", r.reason.as_deref().unwrap_or("-")),
                Err(e) => warn!(peer = %v, "hand-off not delivered: {e}"),
                Ok(_) => {}
            }
        }
        info!(node_id = %self.id(), term = m.current_term, "leadership handed over to {successor}: {taken} of {} voters took it", answers.len());
        Some(successor)
    }

    /// Answers a candidate's pre-vote (changes nothing here).
    pub fn answer_pre_vote(&self, req: &crate::proto::PreVoteRequest) -> crate::proto::PreVoteResponse {
        let m = self.metrics();
        let lease = Duration::from_millis(self.cfg.raft.election_timeout_min_ms);
        let verdict = match self.last_log_id() {
            Err(e) => Err(format!("this node cannot read its own log: {e}")),
            Ok(last_log_id) => {
                // Silence counts from this run's start, as openraft's lease does (it refuses votes
                // for a lease after startup): a node that just started grants nothing it would
                // then refuse.
                let view = membership::PreVoteView {
                    is_leader: Self::is_leader(&m),
                    heard_leader_ago: Some(self.leader_silence()),
                    handed_to: self.handed_to(&m),
                    last_log_id,
                };
                membership::grant_pre_vote(&view, req.candidate, req.last_log_id.as_ref(), lease)
            }
        };
        if let Err(why) = &verdict {
            debug!(candidate = %req.candidate, "pre-vote refused: {why}");
        }
        crate::proto::PreVoteResponse { granted: verdict.is_ok(), term: m.current_term, reason: verdict.err() }
    }

    /// The id of the last entry in this node's log.
    pub(super) fn last_log_id(&self) -> Result<Option<crate::adapters::raft::LogId>, String> {
        let m = self.metrics();
        let Some(index) = m.last_log_index else { return Ok(None) };
        // The metrics carry the index only; the term is the one of the entry at that index, which
        // the log holds unless it was purged into the snapshot.
        match self.log.log_id_at(index) {
            Ok(Some(id)) => Ok(Some(id)),
            Ok(None) => m
                .snapshot
                .filter(|s| s.index == index)
                .map(Some)
                .ok_or_else(|| format!("log entry {index} is neither in the log nor the snapshot")),
            Err(e) => Err(e),
        }
    }

    /// Asks the voters for their pre-vote; true when a quorum (this node included) grants it.
    pub(super) async fn pre_vote(&self, m: &RaftMetrics) -> bool {
        let membership = m.membership_config.membership().clone();
        let configs = membership.get_joint_config().clone();
        let last_log_id = match self.last_log_id() {
            Ok(l) => l,
            Err(e) => {
                warn!(node_id = %self.id(), "no election: {e}");
                return false;
            }
        };
        let req = crate::proto::PreVoteRequest { candidate: self.id(), term: m.current_term, last_log_id };
        let mut granted: BTreeSet<NodeId> = [self.id()].into();
        if membership::is_quorum(&configs, &granted) {
            return true;
        }
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != self.id()).collect();
        let mut calls: futures::stream::FuturesUnordered<_> = voters
            .iter()
            .filter_map(|v| membership.get_node(v).map(|n| (*v, n.addr.clone())))
            .map(|(v, addr)| {
                let req = req.clone();
                async move {
                    let routed = self.route(v, &addr);
                    let path = format!("{}/{}", paths::RAFT_PREVOTE, v);
                    (v, self.client.call::<_, crate::proto::PreVoteResponse>(&routed, v, &path, &req, t).await)
                }
            })
            .collect();
        use futures::StreamExt;
        let mut refusals = Vec::new();
        while let Some((v, r)) = calls.next().await {
            match r {
                Ok(resp) if resp.granted => {
                    granted.insert(v);
                    if membership::is_quorum(&configs, &granted) {
                        return true;
                    }
                }
                Ok(resp) => refusals.push(format!("{}: {}", v, resp.reason.unwrap_or_default())),
                Err(e) => refusals.push(format!("{}: {e}", v)),
            }
        }
        debug!(node_id = %self.id(), "pre-vote lost: {}", refusals.join("; "));
        false
    }
}
