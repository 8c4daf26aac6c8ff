//! Life as a member: keeping this node's record current, noticing that the cluster removed it
//! (then the run ends and the next one joins anew), and leaving on request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::ApiError;
use crate::core::membership;
use crate::core::state::{Command, Response};
use crate::proto::{HelloRequest, HelloResponse, LeaveRequest, paths};

use super::driver::{Action, LoopError, Reconciler, Triggers, Wake};
use super::{Node, Phase, RunEnd};

/// Keeps this node's member record current and notices removal; runs while a member, on every
/// applied change and every 2 s.
#[derive(Default)]
pub(super) struct MemberLoop {
    was_member: bool,
    leader_silent_since: Option<Instant>,
}

impl Reconciler for MemberLoop {
    const NAME: &'static str = "member";
    const TRIGGERS: Triggers = Triggers { state: true, nudge: false, local: false };

    async fn reconcile(&mut self, node: &Arc<Node>, _wake: Wake) -> Result<Action, LoopError> {
        const PERIOD: Duration = Duration::from_secs(2);
        let (in_raft, record) = node
            .state
            .read(|d| (d.state.is_raft_member(node.id()), d.state.members.get(&node.id()).map(|m| m.spec.clone())));
        let peers: Vec<String> = node.member_underlay_addrs().into_values().collect();
        if in_raft {
            self.was_member = true;
            let spec = node.my_spec();
            if let Err(reason) = crate::core::state::validate_member(&spec) {
                // Checked here too: a refused write still takes a log entry, every round.
                node.set_last_error(Some(format!("this node's member record is not valid: {reason}")));
            } else if record.as_ref() != Some(&spec) {
                match node.write(Command::UpsertMember { spec, at_ms: crate::now_ms() }).await {
                    Ok(Response::Rejected { reason }) => {
                        warn!(node_id = %node.id(), "registration refused: {reason}");
                        node.set_last_error(Some(reason));
                    }
                    Ok(_) => info!(node_id = %node.id(), name = %node.identity.name, "member record registered"),
                    Err(e) => debug!("registration not yet possible: {e}"),
                }
            }
        } else if self.was_member {
            warn!(node_id = %node.id(), "this node was removed from the cluster; joining again with a new identity");
            node.request_end(RunEnd::Rejoin { via: peers });
            return Ok(Action::Done);
        }
        // A node that was removed while it was away never hears about it: nobody replicates to
        // it. When no leader has replicated to it for a while, ask the peers. (A learner keeps the
        // leader it last heard of in its metrics forever: it never holds an election. A learner
        // that came back just as the leader removed it got one heartbeat, then silence.)
        let m = node.metrics();
        let window = Duration::from_millis(node.cfg.raft.election_timeout_max_ms * 5);
        let leader_heard = match m.current_leader {
            Some(l) if l == node.id() => true,
            Some(l) => node.heard_from_leader.last(l).is_some_and(|t| t.elapsed() < window),
            None => false,
        };
        if leader_heard {
            self.leader_silent_since = None;
        } else {
            let since = *self.leader_silent_since.get_or_insert_with(Instant::now);
            if since.elapsed() > window
                && let Some(via) = node.check_removed(&peers).await
            {
                warn!(node_id = %node.id(), "the cluster no longer lists this node; joining again with a new identity");
                node.request_end(RunEnd::Rejoin { via });
                return Ok(Action::Done);
            }
        }
        Ok(Action::After(PERIOD))
    }
}

impl Node {
    /// Leaves the cluster gracefully: the leader removes this node, then the run ends.
    pub async fn leave(&self) -> Result<(), ApiError> {
        if self.progress().phase != Phase::Member {
            return Err(ApiError::Refused("this node is not a member of a cluster".into()));
        }
        let req = LeaveRequest { id: self.id() };
        self.on_leader(paths::LEAVE, &req, || self.local_leave(req.clone())).await?;
        crate::adapters::files::write_atomic(&self.left_marker(), b"left\n", 0o600)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        self.request_end(RunEnd::Left);
        Ok(())
    }

    /// Asks known peers whether the cluster still lists this node. Returns addresses to rejoin
    /// through when a peer proves that it does not: it knows a leader and applied a membership
    /// later than this node's that leaves this node out. A peer that is merely behind (a stale
    /// learner) proves nothing.
    pub(super) async fn check_removed(&self, peers: &[String]) -> Option<Vec<String>> {
        let req = HelloRequest { from: self.candidate(true, None) };
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let mine = self.applied_membership();
        for addr in peers.iter().filter(|a| **a != self.api_addr) {
            let Ok(resp) = self.client.call_any::<_, HelloResponse>(addr, paths::HELLO, &req, t).await else {
                continue;
            };
            let theirs = membership::AppliedMembership {
                index: resp.members_index,
                members: resp.members.keys().copied().collect(),
            };
            if membership::removal_confirmed(self.id(), &mine, &theirs, resp.leader.is_some()) {
                return Some(resp.members.values().cloned().collect());
            }
            if resp.leader.is_some() && !theirs.members.is_empty() && !theirs.members.contains(&self.id()) {
                debug!(
                    node_id = %self.id(),
                    peer = %addr,
                    "a peer does not list this node, but its membership (index {:?}) is not later than this node's \
                     ({:?}): not taken as a removal",
                    theirs.index,
                    mine.index
                );
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use crate::adapters::peers::{FakePeers, PeerError};
    use crate::core::state::NodeId;
    use crate::proto::{Candidate, HelloRequest, HelloResponse, paths};

    const ME: &str = "127.0.0.1:17701";
    const PEER: &str = "127.0.0.1:17702";

    /// Issue 10, hole 4: a peer that knows a leader and does not list this node makes it rejoin
    /// only when the membership it applied is later than this node's; a peer that is behind (a
    /// stale learner) does not make a current member wipe itself.
    #[tokio::test]
    async fn only_a_peer_with_a_later_membership_can_say_this_node_was_removed() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakePeers::default();
        let n = crate::runtime::test_node(dir.path(), &fake, ME, &[PEER], None).await;
        let members = BTreeMap::from([(n.id(), crate::core::raft_types::PeerNode::new(ME, ""))]);
        n.raft.initialize(members).await.unwrap();
        n.raft
            .wait(Some(Duration::from_secs(20)))
            .metrics(
                |m| {
                    let membership = m.membership_config.log_id().map(|l| l.index);
                    membership.is_some() && m.last_applied.map(|l| l.index) >= membership
                },
                "the single-node cluster applies its membership",
            )
            .await
            .unwrap();
        let mine = n.applied_membership().index.expect("an applied membership has a log index");
        let answer_with = |index: u64| {
            fake.answer(PEER, paths::HELLO, move |req: HelloRequest| -> Result<HelloResponse, PeerError> {
                let other = NodeId(7);
                Ok(HelloResponse {
                    me: Candidate {
                        id: other,
                        name: "stale".into(),
                        api_addr: PEER.into(),
                        initialized: true,
                        bootstrap_expect: None,
                        pledged: None,
                    },
                    known: vec![req.from],
                    leader: Some(other),
                    members: BTreeMap::from([(other, PEER.to_string())]),
                    members_index: Some(index),
                })
            });
        };
        answer_with(mine);
        assert_eq!(n.check_removed(&[PEER.to_string()]).await, None, "a peer as far as this node was believed");
        answer_with(mine.saturating_sub(1));
        assert_eq!(n.check_removed(&[PEER.to_string()]).await, None, "a peer behind this node was believed");
        answer_with(mine + 5);
        assert_eq!(n.check_removed(&[PEER.to_string()]).await, Some(vec![PEER.to_string()]));
        n.raft.shutdown().await.unwrap();
    }
}
