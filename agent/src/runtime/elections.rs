//! The election timer (openraft's own is off; see `raft_config`): a voter that has heard from no
//! leader asks for pre-votes and starts an election only when a quorum would grant it.

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
        if voter && !Node::is_leader(&m) && m.running_state.is_ok() && silence >= self.timeout {
            self.last_try = Some(Instant::now());
            self.timeout = node.election_timeout();
            if node.pre_vote(&m).await
                && node.leader_silence() >= Duration::from_millis(node.cfg.raft.election_timeout_min_ms)
            {
                info!(node_id = %node.id(), term = m.current_term + 1, "no leader heard from: pre-vote granted, starting an election");
                if let Err(e) = node.raft.trigger().elect().await {
                    warn!(node_id = %node.id(), "cannot start an election: {e}");
                }
            }
            return Ok(Action::After(Duration::ZERO));
        }
        let wait = self.timeout.saturating_sub(silence).clamp(Duration::from_millis(20), Duration::from_millis(200));
        Ok(Action::After(wait))
    }
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
                    last_log_id,
                };
                membership::grant_pre_vote(&view, req.last_log_id.as_ref(), lease)
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
