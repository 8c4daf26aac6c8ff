//! The leader's loop: it gathers a view of the cluster, lets [`crate::core::leader::leader_tick`]
//! decide, and carries the commands out; then it moves members' Raft addresses onto the mesh and
//! back, probing them first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;
use tracing::{info, warn};

use super::ApiError;
use crate::adapters::raft::RaftMetrics;
use crate::core::membership::{AutopilotView, MembershipAction};
use crate::core::state::{Command, NodeId, Response};

use super::driver::{Action, LoopError, Reconciler, Triggers, Wake};
use super::{LeaderState, Node};
use crate::core::leader::{LeaderCommand, LeaderView, leader_tick};

/// The leader's loop, every 500 ms for the whole run (idle on followers): it notes who is
/// unreachable, lets [`leader_tick`] decide and carries the commands out, then moves members'
/// Raft addresses onto the mesh or back (see [`Node::ensure_transport`]).
#[derive(Default)]
pub(super) struct LeaderLoop {
    unreachable: BTreeSet<NodeId>,
}

impl Reconciler for LeaderLoop {
    const NAME: &'static str = "leader";
    const TRIGGERS: Triggers = Triggers { state: false, nudge: false, local: false };
    const BACKOFF: super::driver::Backoff = super::driver::Backoff { first: Self::TICK, max: Self::TICK };

    async fn reconcile(&mut self, node: &Arc<Node>, _wake: Wake) -> Result<Action, LoopError> {
        let m = node.metrics();
        if !Node::is_leader(&m) {
            *node.leader.lock().expect("leader lock") = None;
            self.unreachable.clear();
            return Ok(Action::After(Self::TICK));
        }
        {
            let mut l = node.leader.lock().expect("leader lock");
            if l.as_ref().is_none_or(|l| l.term != m.current_term) {
                info!(node_id = %node.id(), term = m.current_term, "became leader");
                *l = Some(LeaderState { term: m.current_term, since: Instant::now(), transport_probe: None });
            }
        }
        self.note_unreachable(node, &m);
        let ticked = node.leader_tick(&m).await;
        // Last: its probes may take a while when a member is down.
        let moved = node.ensure_transport(&m).await;
        ticked.and(moved).map_err(LoopError::debug)?;
        Ok(Action::After(Self::TICK))
    }
}

impl LeaderLoop {
    const TICK: Duration = Duration::from_millis(500);

    /// Logs each follower that becomes unreachable or answers again (once per change).
    fn note_unreachable(&mut self, node: &Node, m: &RaftMetrics) {
        let now = node.unreachable_followers(m);
        let name = |id: &NodeId| {
            node.state.read(|d| d.state.members.get(id).map(|r| r.spec.name.clone())).unwrap_or_else(|| id.to_string())
        };
        for id in now.difference(&self.unreachable) {
            let voters = m.membership_config.membership().voter_ids().count();
            warn!(node_id = %node.id(), peer = %id, "follower {} is unreachable: the leader goes on with the others while a quorum of the {voters} voters answers", name(id));
        }
        for id in self.unreachable.difference(&now) {
            info!(node_id = %node.id(), peer = %id, "follower {} answers again", name(id));
        }
        self.unreachable = now;
    }
}

impl Node {
    /// On the leader: since its last successful Raft RPC with `id` in its current term.
    pub fn leader_contact_age(&self, id: NodeId) -> Option<Duration> {
        let since = self.leader.lock().expect("leader lock").as_ref().map(|l| l.since)?;
        Some(self.contacts.last(id).map_or(since, |t| t.max(since)).elapsed())
    }

    /// On the leader: the followers (voters and learners) it has not reached for the shortest
    /// election timeout. Reported as state (status, metrics) and logged once per change, not per
    /// failed RPC.
    pub fn unreachable_followers(&self, m: &RaftMetrics) -> BTreeSet<NodeId> {
        if !Self::is_leader(m) {
            return BTreeSet::new();
        }
        let limit = Duration::from_millis(self.cfg.raft.election_timeout_min_ms);
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.id() && self.leader_contact_age(*id).is_some_and(|age| age >= limit))
            .collect()
    }

    pub(super) fn silent_for(&self, id: NodeId) -> Duration {
        let since = self.leader.lock().expect("leader lock").as_ref().map(|l| l.since);
        let last = match (self.contacts.last(id), since) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        last.map_or(Duration::MAX, |t| t.elapsed())
    }

    /// One tick of the leader's decisions: gathers the view, asks [`leader_tick`], carries the
    /// commands out in order and stops at the first that fails.
    pub(super) async fn leader_tick(&self, m: &RaftMetrics) -> Result<(), ApiError> {
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let silent_for: BTreeMap<NodeId, Duration> = voters
            .iter()
            .chain(&learners)
            .filter(|id| **id != self.id())
            .map(|id| (*id, self.silent_for(*id)))
            .collect();
        let autopilot = AutopilotView {
            leader: self.id(),
            voters: voters.clone(),
            learners,
            silent_for,
            matched: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
                .unwrap_or_default(),
            last_log_index: m.last_log_index.unwrap_or(0),
            max_voters: self.cfg.max_voters,
            max_lag: self.cfg.raft.snapshot_after_logs.max(50),
        };
        let state = self.state.read(|d| d.state.without_kv());
        let sealed_with_accepted = state
            .secrets
            .iter()
            .filter(|(name, e)| {
                matches!(
                    self.secret_box.open_with(name, &e.value),
                    Ok((_, crate::adapters::secrets::SealedWith::Accepted))
                )
            })
            .map(|(name, _)| name.clone())
            .collect();
        let view = LeaderView {
            state: &state,
            autopilot,
            mesh_cidr: self.cfg.mesh_cidr,
            now_ms: crate::now_ms(),
            cluster_key: self.gate.keys.primary().fingerprint(),
            sealed_with_accepted,
        };
        for cmd in leader_tick(&view, &self.cfg.health) {
            self.carry_out(cmd, m, &voters).await?;
        }
        Ok(())
    }

    async fn carry_out(&self, cmd: LeaderCommand, m: &RaftMetrics, voters: &BTreeSet<NodeId>) -> Result<(), ApiError> {
        let what = cmd.describe();
        match cmd {
            LeaderCommand::InitCluster => {
                let cluster_id = crate::adapters::identity::new_node_id().to_string();
                self.local_write(Command::InitCluster { cluster_id, at_ms: crate::now_ms() }).await?;
            }
            LeaderCommand::CreateSecret { name } => {
                self.set_secret(name).await?;
            }
            LeaderCommand::Commit(c) => {
                self.local_write(c).await?;
            }
            LeaderCommand::MeshFull { .. } => {
                let (net, prefix) = self.cfg.mesh_cidr;
                warn!(node_id = %self.id(), "{what}; set a larger mesh_cidr than {net}/{prefix}");
                return Ok(());
            }
            LeaderCommand::Reseal { name } => {
                let Some(entry) = self.state.read(|d| d.state.secrets.get(&name).cloned()) else { return Ok(()) };
                let plain = self.secret_box.open(&name, &entry.value).map_err(|e| ApiError::Internal(e.to_string()))?;
                let value = self.secret_box.seal(&name, &plain);
                let cmd = Command::ResealSecret { name, value, version: entry.version };
                if let Response::Rejected { reason } = self.local_write(cmd).await? {
                    return Err(ApiError::Refused(reason));
                }
            }
            LeaderCommand::Membership(action) => {
                info!(node_id = %self.id(), term = m.current_term, "{what}");
                return match action {
                    MembershipAction::Promote { learner } => {
                        self.change_membership(ChangeMembers::AddVoterIds([learner].into()), true).await
                    }
                    MembershipAction::Replace { failed, learner } => {
                        let mut next = voters.clone();
                        next.remove(&failed);
                        next.insert(learner);
                        self.change_membership(ChangeMembers::ReplaceAllVoters(next), true).await
                    }
                    MembershipAction::Remove { id } => self.remove_member(id).await,
                };
            }
        }
        info!(node_id = %self.id(), "{what}");
        Ok(())
    }

    /// Generates a new value for a managed secret, sealed on this node, and commits it. Returns
    /// the new version.
    pub async fn set_secret(&self, name: &str) -> Result<u64, ApiError> {
        let plain = crate::adapters::secrets::generate(name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let value = self.secret_box.seal(name, &plain);
        match self.write(Command::SetSecret { name: name.into(), value, at_ms: crate::now_ms() }).await? {
            Response::Secret { version } => Ok(version),
            Response::Rejected { reason } => Err(ApiError::Refused(reason)),
            other => Err(ApiError::Internal(format!("unexpected answer to a secret write: {other:?}"))),
        }
    }
}
