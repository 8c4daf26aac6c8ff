//! Forwarding and the leader-only operations: a write, a linearizable read, a join or a leave
//! that reaches a follower is sent on to the leader (bounded, retried across a change of leader,
//! never applied twice: a write carries one request id); on the leader they run locally.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;
use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, RaftError};

use crate::core::raft_types::PeerNode;
use serde::Serialize;
use tracing::{debug, info, warn};

use super::ApiError;
use crate::adapters::peers::PeerError;
use crate::core::membership::{self};
use crate::core::state::{Command, Health, NodeId, RequestId, Response};
use crate::proto::{JoinRequest, JoinResponse, LeaveRequest, ReadRequest, ReadResponse, paths};

use super::Node;

/// The error for a request that a leader may still apply: a timeout that says so. (A write goes
/// under one request id, so it is applied at most once however often it was sent.)
fn may_be_applied(last: &ApiError) -> ApiError {
    ApiError::Timeout(format!(
        "{last}; a leader may still apply the request (a write at most once), so read the value back before you retry"
    ))
}

/// How one forwarding attempt ended.
enum Forwarded<Resp> {
    /// The leader's answer (or an error that retrying would not change).
    Answer(Result<Resp, ApiError>),
    /// This node follows a new leader now: send the request there.
    LeaderChanged,
    /// Try again (the leader was not there, or could not act in time).
    Retry { error: ApiError, maybe_delivered: bool },
}

impl Node {
    // -----------------------------------------------------------------------------------------
    // Leader-only operations (run locally on the leader, forwarded there by `on_leader`)
    // -----------------------------------------------------------------------------------------

    pub(super) fn forward_err(&self, e: ForwardToLeader<NodeId, PeerNode>) -> ApiError {
        match (e.leader_id.filter(|l| *l != self.id()), e.leader_node) {
            (Some(id), Some(node)) => ApiError::NotLeader { leader: Some((id, node.addr)) },
            _ => ApiError::NotLeader { leader: None },
        }
    }

    pub(super) fn write_err(&self, e: RaftError<NodeId, ClientWriteError<NodeId, PeerNode>>) -> ApiError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => self.forward_err(f),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => ApiError::Refused(c.to_string()),
            RaftError::Fatal(f) => ApiError::Internal(format!("Raft stopped: {f}")),
        }
    }

    /// Proposes a command on this node, which must be the leader.
    pub async fn local_write(&self, cmd: Command) -> Result<Response, ApiError> {
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 5);
        match tokio::time::timeout(t, self.raft.client_write(cmd)).await {
            Ok(Ok(r)) => Ok(r.data),
            Ok(Err(e)) => Err(self.write_err(e)),
            Err(_) => Err(ApiError::Timeout(format!(
                "the write was not committed within {t:?}: a quorum of voters may be down"
            ))),
        }
    }

    /// Serves a linearizable read on this node, which must be the leader: leadership confirmed
    /// by a quorum after the read arrived, then the state applied up to the read index, which
    /// covers every write this leader acknowledged (see [`membership::ReadFloor`]).
    pub async fn local_read(&self, key: &str) -> Result<ReadResponse, ApiError> {
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 5);
        let deadline = tokio::time::Instant::now() + t;
        let m = self.metrics();
        if !Self::is_leader(&m) {
            return Err(self.not_leader(&m));
        }
        let floor = {
            let mut f = self.read_floor.lock().expect("read floor lock");
            *f = Some(membership::ReadFloor::observe(*f, m.current_term, m.last_log_index));
            f.expect("just set")
        };
        let read = match tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await {
            Ok(Ok(log_id)) => log_id,
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => return Err(self.forward_err(f)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                return Err(ApiError::NoLeader(format!("the leader cannot reach a quorum of voters: {q}")));
            }
            Ok(Err(RaftError::Fatal(f))) => return Err(ApiError::Internal(format!("Raft stopped: {f}"))),
            Err(_) => {
                return Err(ApiError::Timeout(format!("the read could not be confirmed by a quorum within {t:?}")));
            }
        };
        // The leadership just confirmed must be the one whose floor applies.
        let m = self.metrics();
        if m.current_term != floor.term || !Self::is_leader(&m) {
            return Err(self.not_leader(&m));
        }
        let index = floor.read_index(read.map(|l| l.index));
        let mut rx = self.raft.metrics();
        let applied =
            tokio::time::timeout_at(deadline, rx.wait_for(|m| m.last_applied.is_some_and(|l| l.index >= index)));
        match applied.await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(ApiError::Internal("Raft stopped".into())),
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "the read index {index} was not applied within {t:?}: a quorum of voters may be down"
                )));
            }
        }
        let entry = self.state.read(|d| d.state.kv.get(key).cloned());
        Ok(ReadResponse { key: key.to_string(), entry, read_index: Some(index) })
    }

    pub(super) async fn change_membership(
        &self,
        changes: ChangeMembers<NodeId, PeerNode>,
        retain: bool,
    ) -> Result<(), ApiError> {
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 10);
        match tokio::time::timeout(t, self.raft.change_membership(changes, retain)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.write_err(e)),
            Err(_) => Err(ApiError::Timeout(format!("the membership change was not committed within {t:?}"))),
        }
    }

    pub(super) async fn remove_member(&self, id: NodeId) -> Result<(), ApiError> {
        let voters: BTreeSet<NodeId> = self.metrics().membership_config.membership().voter_ids().collect();
        if voters.contains(&id) {
            self.change_membership(ChangeMembers::RemoveVoters([id].into()), false).await
        } else {
            self.change_membership(ChangeMembers::RemoveNodes([id].into()), false).await
        }
    }

    /// Admits a node as a learner (the autopilot promotes it once it has caught up).
    /// A join under the id of a node that is a member already may change that member's address,
    /// so it must come from that member (signed with its node key), or be forwarded by a member,
    /// which checked this on the way. A new node's join comes on the cluster secret.
    pub fn check_join_origin(&self, req: &JoinRequest, origin: &crate::core::auth::Origin) -> Result<(), ApiError> {
        let is_member = self.metrics().membership_config.membership().get_node(&req.id).is_some();
        if is_member && origin.member().is_none() {
            return Err(ApiError::Refused(format!(
                "node {} is a member already: its join must be signed with its own node key, and this one is not",
                req.id
            )));
        }
        Ok(())
    }

    pub async fn local_join(&self, req: JoinRequest) -> Result<JoinResponse, ApiError> {
        crate::core::config::validate_node_name(&req.name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if !crate::core::auth::is_node_key(&req.node_key) {
            return Err(ApiError::BadRequest(format!(
                "node_key {:?} is not a base64 Ed25519 public key: the joining agent is too old or broken; upgrade it",
                crate::core::text::printable(&req.node_key, 64)
            )));
        }
        req.api_addr
            .parse::<SocketAddr>()
            .map_err(|e| ApiError::BadRequest(format!("api_addr {:?} is not IP:PORT: {e}", req.api_addr)))?;
        let m = self.metrics();
        if !Self::is_leader(&m) {
            return Err(self.not_leader(&m));
        }
        let membership = m.membership_config.membership();
        if let Some(node) = membership.get_node(&req.id) {
            let mesh = self.state.read(|d| d.state.members.get(&req.id).and_then(|m| m.mesh_addr()));
            if node.addr != req.api_addr && Some(&node.addr) != mesh.as_ref() {
                info!(node_id = %self.id(), peer = %req.id, addr = %req.api_addr, "member changed its address");
                // The key stays the one its admission committed.
                let nodes = BTreeMap::from([(req.id, PeerNode::new(&req.api_addr, node.node_key.clone()))]);
                self.change_membership(ChangeMembers::SetNodes(nodes), true).await?;
            }
            return Ok(JoinResponse { leader: self.id(), replaced: None });
        }
        let stale = self.state.read(|d| {
            d.state.members.values().find(|mm| mm.spec.name == req.name && mm.spec.id != req.id).map(|mm| mm.spec.id)
        });
        let mut replaced = None;
        if let Some(old) = stale {
            let silent = self.silent_for(old);
            if old == self.id() || silent < self.cfg.health.suspect_after() {
                return Err(ApiError::Refused(format!(
                    "the name {:?} belongs to live member {}; give the new node another name (node_name or the clusteros.node-name credential) or stop the other one",
                    req.name, old
                )));
            }
            warn!(node_id = %self.id(), peer = %old, name = %req.name, "replacing stale member with the same name");
            self.remove_member(old).await?;
            replaced = Some(old);
        }
        // The join is this node's first word from the new member: its silence (which the
        // autopilot removes a member for) counts from here, not from when this leader took
        // office, or a learner whose first append is slow would be removed at once.
        self.contacts.record(req.id);
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 10);
        match tokio::time::timeout(t, self.raft.add_learner(req.id, PeerNode::new(&req.api_addr, &req.node_key), false))
            .await
        {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(self.write_err(e)),
            Err(_) => return Err(ApiError::Timeout(format!("adding the learner was not committed within {t:?}"))),
        }
        info!(node_id = %self.id(), peer = %req.id, name = %req.name, addr = %req.api_addr, "admitted node as learner");
        Ok(JoinResponse { leader: self.id(), replaced })
    }

    /// Removes a member on request (graceful leave).
    pub async fn local_leave(&self, req: LeaveRequest) -> Result<crate::proto::Empty, ApiError> {
        let m = self.metrics();
        if !Self::is_leader(&m) {
            return Err(self.not_leader(&m));
        }
        if m.membership_config.membership().get_node(&req.id).is_none() {
            return Ok(crate::proto::Empty {});
        }
        if self.state.read(|d| d.state.members.contains_key(&req.id)) {
            self.local_write(Command::SetHealth { id: req.id, health: Health::Left, at_ms: crate::now_ms() }).await?;
        }
        self.remove_member(req.id).await?;
        info!(node_id = %self.id(), peer = %req.id, "member left the cluster");
        Ok(crate::proto::Empty {})
    }

    /// Runs `local` here if this node leads, else forwards `req` to the leader's peer API at `path`,
    /// until one answers or the forwarding deadline passes. Waits for a leader (bounded) when
    /// there is none, and moves on to a new leader as soon as this node learns of one, even while
    /// a request to the old one is still in flight (an isolated leader never answers).
    ///
    /// Every request sent through here must be safe to repeat: reads, joins, leaves, and writes
    /// under a [`RequestId`](crate::core::state::RequestId) (see [`Node::write`]), which the state
    /// machine applies once however often they commit. When the deadline passes after an attempt
    /// that may have reached a leader, the error is a timeout that says the write may have been
    /// applied; otherwise it says why nothing was done.
    pub async fn on_leader<Req, Resp, F, Fut>(&self, path: &str, req: &Req, local: F) -> Result<Resp, ApiError>
    where
        Req: Serialize,
        Resp: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Resp, ApiError>>,
    {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.raft.election_timeout_max_ms * 4 + 2000);
        // Whether some attempt may have been acted on by a leader.
        let mut maybe_acted = false;
        let mut last: ApiError;
        loop {
            let mut moved_on = false;
            last = match local().await {
                Err(ApiError::NotLeader { leader: Some((leader, addr)) }) => {
                    match self.forward::<Req, Resp>(leader, &addr, path, req).await {
                        Forwarded::Answer(Ok(r)) => return Ok(r),
                        // A refusal now does not undo an earlier attempt that may have been applied.
                        Forwarded::Answer(Err(e)) if maybe_acted => return Err(may_be_applied(&e)),
                        Forwarded::Answer(Err(e)) => return Err(e),
                        Forwarded::LeaderChanged => {
                            debug!(old = %leader, path, "the leader changed while a request was in flight; sending it to the new one");
                            maybe_acted = true;
                            moved_on = true;
                            ApiError::NoLeader(format!("leader {} was replaced", leader))
                        }
                        Forwarded::Retry { error, maybe_delivered } => {
                            maybe_acted |= maybe_delivered;
                            error
                        }
                    }
                }
                Err(ApiError::NotLeader { leader: None }) => ApiError::NoLeader(self.no_leader_message()),
                Err(ApiError::NoLeader(m)) => ApiError::NoLeader(m),
                // This node leads but could not commit in time: the entry may still commit.
                Err(ApiError::Timeout(m)) => {
                    maybe_acted = true;
                    ApiError::Timeout(m)
                }
                other => return other,
            };
            if Instant::now() >= deadline {
                return Err(if maybe_acted { may_be_applied(&last) } else { last });
            }
            if !moved_on {
                // Wait for the leader to change (or a short while), then try again.
                let mut rx = self.raft.metrics();
                let _ = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
            }
        }
    }

    /// Sends `req` to `leader` (over the mesh when this node is on it, the underlay once more if
    /// that fails), giving up as soon as this node follows another leader.
    async fn forward<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        leader: NodeId,
        addr: &str,
        path: &str,
        req: &Req,
    ) -> Forwarded<Resp> {
        let call = async {
            let routed = self.route(leader, addr);
            let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 6);
            let mut r = self.client.call::<_, Resp>(&routed, leader, path, req, t).await;
            // The mesh path may be broken while wg0 looks fine: try the underlay once.
            let underlay = self.underlay_addr(leader, addr);
            let mut maybe_delivered = false;
            if let Err(e @ (PeerError::Unreachable { .. } | PeerError::Timeout { .. })) = &r
                && routed != underlay
            {
                maybe_delivered = e.maybe_delivered();
                debug!(leader = %leader, via = %routed, "leader unreachable over the mesh; trying its underlay address");
                r = self.client.call::<_, Resp>(&underlay, leader, path, req, t).await;
            }
            (r, maybe_delivered)
        };
        let moved = async {
            let mut rx = self.raft.metrics();
            if rx.wait_for(|m| m.current_leader.is_some_and(|l| l != leader)).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let (r, earlier_maybe) = tokio::select! {
            r = call => r,
            _ = moved => return Forwarded::LeaderChanged,
        };
        match r {
            Ok(r) => Forwarded::Answer(Ok(r)),
            Err(PeerError::Remote { kind, message, .. }) => match ApiError::from_remote(kind, message) {
                // The leader refused before acting (it is not the leader any more).
                e @ ApiError::NoLeader(_) => Forwarded::Retry { error: e, maybe_delivered: earlier_maybe },
                // Its write may commit later; the retry carries the same request id.
                e @ ApiError::Timeout(_) => Forwarded::Retry { error: e, maybe_delivered: true },
                e => Forwarded::Answer(Err(e)),
            },
            Err(e) if e.is_auth() => Forwarded::Answer(Err(ApiError::Peer(e))),
            Err(e) => {
                let maybe_delivered = earlier_maybe || e.maybe_delivered();
                Forwarded::Retry { error: ApiError::Peer(e), maybe_delivered }
            }
        }
    }

    /// Proposes `cmd` through the leader under a new request id, so that resending it (to a new
    /// leader, after a timeout) never applies it twice.
    pub async fn write(&self, cmd: Command) -> Result<Response, ApiError> {
        let id = RequestId { origin: self.request_origin, seq: self.request_seq.fetch_add(1, Ordering::Relaxed) };
        let cmd = Command::Request { id, at_ms: crate::now_ms(), cmd: Box::new(cmd) };
        self.on_leader(paths::WRITE, &crate::proto::WriteRequest { cmd: cmd.clone() }, || self.local_write(cmd.clone()))
            .await
    }

    pub async fn read(&self, key: &str) -> Result<ReadResponse, ApiError> {
        self.on_leader(paths::READ, &ReadRequest { key: key.into() }, || self.local_read(key)).await
    }

    // -----------------------------------------------------------------------------------------
    // Discovery (answered by the peer API)
    // -----------------------------------------------------------------------------------------
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// A learner's silence, which the autopilot removes members for, counts from its join: a
    /// node the leader admits but has not reached yet is not silent "forever" (nor since the
    /// leader took office), so it is not removed before its first append arrives.
    #[tokio::test]
    async fn a_learner_is_heard_from_at_its_join() {
        let dir = tempfile::tempdir().unwrap();
        let fake = crate::adapters::peers::FakePeers::default();
        let node = crate::runtime::test_node(dir.path(), &fake, "127.0.0.1:17741", &[], None).await;
        let me = PeerNode::new("127.0.0.1:17741", node.identity.node_key().public());
        node.raft.initialize(BTreeMap::from([(node.id(), me)])).await.unwrap();
        let mut m = node.raft.metrics();
        tokio::time::timeout(Duration::from_secs(30), m.wait_for(|m| m.current_leader == Some(node.id())))
            .await
            .expect("a single node leads")
            .unwrap();
        let joiner = NodeId(0x77);
        assert_eq!(node.silent_for(joiner), Duration::MAX, "never heard from");
        let key = crate::core::auth::NodeKey::from_seed(&[9; 32]).public();
        // Nothing answers at its address: its first append will not arrive soon.
        let req = JoinRequest { id: joiner, name: "n2".into(), api_addr: "127.0.0.1:9".into(), node_key: key };
        node.local_join(req).await.unwrap();
        let silent = node.silent_for(joiner);
        assert!(silent < Duration::from_secs(5), "a learner just admitted counts as silent for {silent:?}");
        node.raft.shutdown().await.unwrap();
    }
}
