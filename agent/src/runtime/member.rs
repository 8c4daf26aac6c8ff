//! Life as a member: keeping this node's record current, noticing that the cluster removed it
//! (then the run ends and the next one joins anew), and leaving on request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use super::ApiError;
use crate::adapters::peers::PeerError;
use crate::core::auth::{Sender, VouchedKeys};
use crate::core::membership;
use crate::core::state::{Command, NodeId, Response};
use crate::proto::{ErrorKind, HelloRequest, HelloResponse, LeaveRequest, paths};

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
        let members = node.member_underlay_addrs();
        let peers: Vec<String> = members.values().cloned().collect();
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
        // it. When no leader has replicated to it for a while, ask the members. (A learner keeps
        // the leader it last heard of in its metrics forever: it never holds an election. A
        // learner that came back just as the leader removed it got one heartbeat, then silence.)
        // Their answers also vouch for the keys of members admitted while it was away, one of
        // which may be the leader whose appends it refuses as a stranger's.
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
                && let Some(via) = node.ask_members(&members).await
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

    /// Asks the members this node knows (`members`: id -> address) what they applied, each
    /// answer signed by that member's own key. Returns addresses to rejoin through when a member
    /// proves that the cluster removed this node: it knows a leader and applied a membership later
    /// than this node's that leaves this node out. A member that is merely behind (a stale
    /// learner) proves nothing. A later membership's node keys of members this node does not
    /// know yet are taken as vouched for ([`crate::core::auth::VouchedKeys`]), so that such a
    /// member's Raft messages (a new leader's appends) reach this node's log, which then brings
    /// the membership that lists them.
    pub(super) async fn ask_members(&self, members: &BTreeMap<NodeId, String>) -> Option<Vec<String>> {
        let req = HelloRequest { from: self.candidate(true, None) };
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let mine = self.applied_membership();
        for (id, addr) in members.iter().filter(|(id, a)| **id != self.id() && **a != self.api_addr) {
            // The key the peer client checks the answer against (it reads the same membership;
            // an id's key never changes, so listed before and after the call means listed during).
            let key = self.client_key_of(*id);
            let (resp, vouches) = match self.client.call::<_, HelloResponse>(addr, *id, paths::HELLO, &req, t).await {
                Ok(resp) => (resp, true),
                // Another node answers at the member's address (its machine was reinstalled):
                // what it applied still tells a removal, as before answers were addressed; it
                // vouches for nobody.
                Err(e) if another_node_answered(&e) => {
                    match self.client.call_any::<_, HelloResponse>(addr, paths::HELLO, &req, t).await {
                        Ok(resp) => (resp, false),
                        Err(e) => {
                            debug!(node_id = %self.id(), peer = %addr, "cannot ask about the membership: {e}");
                            continue;
                        }
                    }
                }
                Err(e) => {
                    debug!(node_id = %self.id(), peer = %id, "cannot ask a member about the membership: {e}");
                    continue;
                }
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
            if vouches && let Some(key) = key {
                self.take_vouched_keys(*id, &key, &resp);
            }
        }
        None
    }

    /// The node key this node's Raft membership records for `id` (what the peer client checks
    /// an answer from `id` against), if it records one.
    fn client_key_of(&self, id: NodeId) -> Option<String> {
        match crate::core::auth::sender_in(self.metrics().membership_config.membership(), id) {
            Sender::Member { node_key } if !node_key.is_empty() => Some(node_key),
            _ => None,
        }
    }

    /// Takes the node keys member `voucher` vouches for in its answer (verified by `key`, the
    /// key this node's membership recorded for it before the call), if it is still a member with
    /// that key and its membership is later.
    fn take_vouched_keys(&self, voucher: NodeId, key: &str, resp: &HelloResponse) {
        let m = self.metrics();
        let mine = &m.membership_config;
        let Some(v) = VouchedKeys::from_answer(mine, voucher, key, resp.members_log_id, &resp.member_keys) else {
            return;
        };
        if self.vouch(v.clone()) {
            info!(
                node_id = %self.id(),
                voucher = %voucher,
                "member {voucher} vouches for the node keys of {} member(s) this node's membership ({:?}) does not \
                 list yet ({}; its membership is at {}): their Raft messages are taken until this node's log \
                 catches up",
                v.keys.len(),
                mine.log_id(),
                v.keys.keys().map(|id| id.to_string()).collect::<Vec<_>>().join(", "),
                v.log_id
            );
        }
    }
}

/// Whether a call addressed to a member failed because another node answers at its address.
fn another_node_answered(e: &PeerError) -> bool {
    matches!(e, PeerError::BadNodeSignature { .. } | PeerError::Remote { kind: ErrorKind::WrongNode, .. })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use crate::adapters::peers::{FakePeers, PeerError};
    use crate::core::auth::{NodeKey, Sender};
    use crate::core::raft_types::PeerNode;
    use crate::core::state::NodeId;
    use crate::proto::{Candidate, HelloRequest, HelloResponse, paths};

    const ME: &str = "127.0.0.1:17701";
    const PEER: &str = "127.0.0.1:17702";
    const OTHER: NodeId = NodeId(7);

    /// A single-node cluster of its own, with [`OTHER`] at [`PEER`] as a learner whose node key
    /// its membership records; the log index of the membership it applied.
    async fn node_with_a_learner(
        dir: &std::path::Path,
        fake: &FakePeers,
    ) -> (std::sync::Arc<crate::runtime::Node>, u64) {
        let n = crate::runtime::test_node(dir, fake, ME, &[PEER], None).await;
        n.raft.initialize(BTreeMap::from([(n.id(), PeerNode::new(ME, ""))])).await.unwrap();
        let key = NodeKey::from_seed(&[7; 32]).public();
        n.raft.wait(Some(Duration::from_secs(20))).current_leader(n.id(), "the node leads itself").await.unwrap();
        n.raft.add_learner(OTHER, PeerNode::new(PEER, &key), false).await.unwrap();
        n.raft
            .wait(Some(Duration::from_secs(20)))
            .metrics(
                |m| {
                    let membership = m.membership_config.log_id().map(|l| l.index);
                    m.membership_config.membership().get_node(&OTHER).is_some()
                        && m.last_applied.map(|l| l.index) >= membership
                },
                "the node applies the membership with its learner",
            )
            .await
            .unwrap();
        let mine = n.applied_membership().index.expect("an applied membership has a log index");
        (n, mine)
    }

    /// The log id at `index` in the term (and of the leader) of `n`'s membership.
    fn log_at(n: &crate::runtime::Node, index: u64) -> crate::core::raft_types::LogId {
        let at = n.metrics().membership_config.log_id().expect("a membership");
        crate::core::raft_types::LogId { index, ..at }
    }

    /// Node `answerer`'s hello answer to `req`, naming itself the leader, with a membership at
    /// `at` of `members` (id -> key), all at [`PEER`].
    fn hello_answer(
        req: HelloRequest,
        answerer: NodeId,
        at: crate::core::raft_types::LogId,
        members: &[(NodeId, String)],
    ) -> HelloResponse {
        HelloResponse {
            me: Candidate {
                id: answerer,
                name: format!("node-{answerer}"),
                api_addr: PEER.into(),
                initialized: true,
                bootstrap_expect: None,
                pledged: None,
            },
            known: vec![req.from],
            leader: Some(answerer),
            members: members.iter().map(|(id, _)| (*id, PEER.to_string())).collect(),
            members_index: Some(at.index),
            members_log_id: Some(at),
            member_keys: members.iter().cloned().collect(),
        }
    }

    /// Member [`OTHER`] at [`PEER`] answers hello with a membership at `at` of `members`.
    fn answer_hello(fake: &FakePeers, at: crate::core::raft_types::LogId, members: Vec<(NodeId, String)>) {
        fake.answer(PEER, paths::HELLO, move |req: HelloRequest| -> Result<HelloResponse, PeerError> {
            Ok(hello_answer(req, OTHER, at, &members))
        });
    }

    /// Issue 10, hole 4: a member that knows a leader and does not list this node makes it
    /// rejoin only when the membership it applied is later than this node's; a member that is
    /// behind (a stale learner) does not make a current member wipe itself.
    #[tokio::test]
    async fn only_a_member_with_a_later_membership_can_say_this_node_was_removed() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakePeers::default();
        let (n, mine) = node_with_a_learner(dir.path(), &fake).await;
        let members = BTreeMap::from([(OTHER, PEER.to_string())]);
        let without_me = || vec![(OTHER, NodeKey::from_seed(&[7; 32]).public())];
        answer_hello(&fake, log_at(&n, mine), without_me());
        assert_eq!(n.ask_members(&members).await, None, "a member as far as this node was believed");
        answer_hello(&fake, log_at(&n, mine.saturating_sub(1)), without_me());
        assert_eq!(n.ask_members(&members).await, None, "a member behind this node was believed");
        answer_hello(&fake, log_at(&n, mine + 5), without_me());
        assert_eq!(n.ask_members(&members).await, Some(vec![PEER.to_string()]));
        n.raft.shutdown().await.unwrap();
    }

    /// A member's machine was reinstalled: another node answers at its address (the addressed
    /// call fails on its signature). What that node applied still tells this node it was
    /// removed, as before answers were addressed; it vouches for nobody.
    #[tokio::test]
    async fn another_node_at_a_members_address_still_tells_a_removal_but_vouches_for_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakePeers::default();
        let (n, mine) = node_with_a_learner(dir.path(), &fake).await;
        let newcomer = (NodeId(9), NodeKey::from_seed(&[9; 32]).public());
        let first = std::sync::atomic::AtomicBool::new(true);
        let answered = newcomer.clone();
        let at = log_at(&n, mine + 5);
        fake.answer(PEER, paths::HELLO, move |req: HelloRequest| -> Result<HelloResponse, PeerError> {
            // The addressed call first: refused on the answer's node signature.
            if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(PeerError::BadNodeSignature { addr: PEER.into(), node: OTHER.to_string() });
            }
            Ok(hello_answer(req, answered.0, at, std::slice::from_ref(&answered)))
        });
        let members = BTreeMap::from([(OTHER, PEER.to_string())]);
        assert_eq!(n.ask_members(&members).await, Some(vec![PEER.to_string()]));
        assert_eq!(fake.calls_to(paths::HELLO).len(), 2, "the addressed call, then one to whoever answers there");
        let append = format!("{}/{}", paths::RAFT_APPEND, n.id());
        assert_eq!(n.sender(&n.metrics().membership_config, &append, newcomer.0), Sender::Stranger);
        n.raft.shutdown().await.unwrap();
    }

    /// A node that was away while node 9 was admitted, and that node 9 now leads, learns its key
    /// from a member it knows: its Raft messages are taken (and only they), until this node's
    /// own membership is as late as the vouched one. A member behind this node vouches for
    /// nobody.
    #[tokio::test]
    async fn a_member_vouches_for_the_key_of_a_node_admitted_while_this_one_was_away() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakePeers::default();
        let (n, mine) = node_with_a_learner(dir.path(), &fake).await;
        let members = BTreeMap::from([(OTHER, PEER.to_string())]);
        let (newcomer, key) = (NodeId(9), NodeKey::from_seed(&[9; 32]).public());
        let later =
            vec![(n.id(), String::new()), (OTHER, NodeKey::from_seed(&[7; 32]).public()), (newcomer, key.clone())];
        let sender = |path: &str| n.sender(&n.metrics().membership_config, path, newcomer);

        answer_hello(&fake, log_at(&n, mine), later.clone());
        assert_eq!(n.ask_members(&members).await, None);
        assert_eq!(
            sender(paths::RAFT_APPEND),
            Sender::Stranger,
            "a membership as far as this node's vouches for nobody"
        );

        answer_hello(&fake, log_at(&n, mine + 5), later);
        assert_eq!(n.ask_members(&members).await, None, "this node is listed: not removed");
        let append = format!("{}/{}", paths::RAFT_APPEND, n.id());
        assert_eq!(sender(&append), Sender::Member { node_key: key.clone() });
        assert_eq!(sender(paths::RAFT_VOTE), Sender::Member { node_key: key });
        assert_eq!(sender(paths::WRITE), Sender::Stranger, "a vouched key speaks only Raft");
        n.raft.shutdown().await.unwrap();
    }
}
