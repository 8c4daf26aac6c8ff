//! Pure membership decisions: how a cluster forms (bootstrap), how health is classified, and what
//! the leader's autopilot changes next (promote, replace, remove). No I/O and no clock: callers pass
//! durations and observations in, and carry the decision out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::core::config::HealthTuning;
use crate::core::state::{Health, NodeId};

// ---------------------------------------------------------------------------------------------
// Formation
// ---------------------------------------------------------------------------------------------

/// A node's promise to form the first cluster with exactly `members` (id -> peer address), as
/// proposed by `proposer`, the smallest id among them. A node holds at most one pledge, keeps it
/// on disk, and gives it up only when its proposer is seen to have withdrawn it. Only the
/// proposer initializes Raft, and only once every member has pledged: two clusters cannot form
/// from nodes that share a member, however stale the views of discovery are.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Pledge {
    pub proposer: NodeId,
    /// The proposer numbers its proposals (it keeps the counter on disk): a late request for an
    /// older one never replaces a newer one.
    pub seq: u64,
    pub members: BTreeMap<NodeId, String>,
}

impl Pledge {
    pub fn ids(&self) -> BTreeSet<NodeId> {
        self.members.keys().copied().collect()
    }
}

/// What one discovered peer told us about itself and the candidates it has heard from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub addr: String,
    pub initialized: bool,
    /// Candidate ids the peer has heard from directly, itself included.
    pub known: BTreeSet<NodeId>,
    /// The pledge the peer holds.
    pub pledged: Option<Pledge>,
    /// The Raft members the peer has applied (empty before its first membership commits).
    pub members: BTreeSet<NodeId>,
    /// The discovery round whose hello this view answers (rounds count up from 1 per run).
    pub round: u64,
}

/// This node's own pledge, and the first discovery round whose views were asked after it was
/// made (older views of the proposer cannot show it, so they cannot release it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPledge {
    pub pledge: Pledge,
    pub views_from_round: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formation {
    /// Fewer than `expected` candidates are known.
    Wait { seen: usize, expected: usize },
    /// Enough candidates, but not all of the chosen set agree on it yet, or this node is not the
    /// one to propose it, or another proposal is under way.
    Settling { chosen: BTreeSet<NodeId> },
    /// A peer is already in a cluster: join it instead of forming one.
    Join { via: String },
    /// Propose forming the cluster with these members (id -> peer address): hold a new pledge
    /// for them, then ask every other member for theirs.
    Propose { members: BTreeMap<NodeId, String> },
    /// Ask the members of this node's own proposal again.
    AskAgain { pledge: Pledge },
    /// This node has pledged to another node's proposal: wait for its Raft contact.
    Pledged { proposer: NodeId },
    /// Give this node's pledge up: its proposer withdrew it, or (as proposer) a cluster formed
    /// elsewhere.
    Release,
}

fn smallest(ids: impl IntoIterator<Item = NodeId>, n: usize) -> BTreeSet<NodeId> {
    let all: BTreeSet<NodeId> = ids.into_iter().collect();
    all.into_iter().take(n).collect()
}

/// Decides this node's next formation step under `bootstrap_expect = expect`.
///
/// The chosen set is the `expect` smallest ids among the candidates this node heard from directly
/// (itself included). Its smallest member proposes it once every other member reports the same
/// set from its own view; the others wait for its pledge request. Views may be stale, so the
/// decision only picks what to propose: the pledges (see [`answer_pledge`] and
/// [`pledge_outcome`]) make the choice safe. A peer that is already initialized turns formation
/// into a join; a proposal under way elsewhere makes this node wait for it.
pub fn decide_formation(
    me: NodeId,
    my_addr: &str,
    expect: usize,
    held: Option<&HeldPledge>,
    peers: &BTreeMap<NodeId, PeerView>,
) -> Formation {
    if let Some(h) = held {
        let proposer = h.pledge.proposer;
        if proposer == me {
            // A cluster formed without this proposal (its members were taken): give it up and
            // join. A member gone silent (absent from `peers`, which holds recent views only)
            // would hold it up for ever: give it up and choose again without that member.
            let silent = h.pledge.members.keys().any(|m| *m != me && !peers.contains_key(m));
            if silent || peers.values().any(|p| p.initialized) {
                return Formation::Release;
            }
            return Formation::AskAgain { pledge: h.pledge.clone() };
        }
        // Released only by a view of the proposer asked after the pledge, that shows it withdrew
        // the proposal: not initialized and not holding it, or in a cluster without this node
        // (it withdrew and joined another; a cluster it formed from the pledge has this node in
        // the membership it applies first).
        let withdrawn = |v: &PeerView| {
            if v.initialized {
                !v.members.is_empty() && !v.members.contains(&me)
            } else {
                v.pledged.as_ref() != Some(&h.pledge)
            }
        };
        return match peers.get(&proposer).filter(|v| v.round >= h.views_from_round) {
            Some(v) if withdrawn(v) => Formation::Release,
            _ => Formation::Pledged { proposer },
        };
    }
    if let Some(p) = peers.values().find(|p| p.initialized) {
        return Formation::Join { via: p.addr.clone() };
    }
    // Another proposal is under way: it forms the cluster (or is withdrawn); join it later. A
    // peer's pledge that its proposer was seen to withdraw since does not count.
    let withdrawn = |held_by: &PeerView, p: &Pledge| {
        let gone = |v: &PeerView| !v.initialized && v.pledged.as_ref().is_none_or(|q| q.proposer != p.proposer);
        peers.get(&p.proposer).is_some_and(|v| v.round > held_by.round && gone(v))
    };
    if let Some(p) = peers.values().find_map(|v| v.pledged.as_ref().filter(|p| !withdrawn(v, p))) {
        return Formation::Settling { chosen: p.ids() };
    }
    let mut known: BTreeSet<NodeId> = peers.keys().copied().collect();
    known.insert(me);
    if known.len() < expect {
        return Formation::Wait { seen: known.len(), expected: expect };
    }
    let chosen = smallest(known.iter().copied(), expect);
    if chosen.first() != Some(&me) {
        return Formation::Settling { chosen };
    }
    let agreed = chosen
        .iter()
        .filter(|id| **id != me)
        .all(|id| peers.get(id).is_some_and(|p| smallest(p.known.iter().copied(), expect) == chosen));
    if !agreed {
        return Formation::Settling { chosen };
    }
    let members =
        chosen.iter().map(|id| (*id, if *id == me { my_addr.to_string() } else { peers[id].addr.clone() })).collect();
    Formation::Propose { members }
}

/// Why a node refuses to pledge.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PledgeRefusal {
    #[error("this node is already in a cluster")]
    InCluster,
    #[error("this node has pledged to the proposal of {0}")]
    PledgedTo(NodeId),
    #[error("this node is joining an existing cluster")]
    Joining,
    #[error("this node holds a newer proposal of the same proposer")]
    Superseded,
    #[error("{0}")]
    Invalid(String),
}

/// Whether this node (`me`, with `bootstrap_expect = expect`) pledges to `req`, holding `current`.
/// It pledges to one proposal at a time; its proposer may replace its own proposal.
pub fn answer_pledge(
    me: NodeId,
    expect: Option<usize>,
    initialized: bool,
    current: Option<&Pledge>,
    req: &Pledge,
) -> Result<(), PledgeRefusal> {
    if initialized {
        return Err(PledgeRefusal::InCluster);
    }
    if !req.members.contains_key(&me) {
        return Err(PledgeRefusal::Invalid("the proposal does not name this node".into()));
    }
    if req.members.keys().next() != Some(&req.proposer) {
        return Err(PledgeRefusal::Invalid("the proposer must be the smallest id of the proposal".into()));
    }
    match expect {
        Some(n) if n == req.members.len() => {}
        other => {
            let mine = other.map_or_else(|| "unset".to_string(), |n| n.to_string());
            return Err(PledgeRefusal::Invalid(format!(
                "the proposal has {} members, this node has bootstrap_expect {mine}: give every node the same value",
                req.members.len()
            )));
        }
    }
    match current {
        Some(c) if c.proposer != req.proposer => Err(PledgeRefusal::PledgedTo(c.proposer)),
        Some(c) if req.seq < c.seq => Err(PledgeRefusal::Superseded),
        _ => Ok(()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PledgeOutcome {
    /// Every member holds the pledge: initialize Raft with them.
    Initialize,
    /// Withdraw the proposal: a member is in a cluster, or pledged to a smaller proposer (which
    /// wins, so that competing proposals cannot wait on each other in a cycle).
    Withdraw { why: String },
    /// Ask again: a member did not answer, or is pledged to a larger proposer (which withdraws).
    Retry { why: String },
}

/// What the proposer `me` does after asking the other members: `answers` holds one entry per
/// member asked (`Err(None)`: no answer).
pub fn pledge_outcome(me: NodeId, answers: &BTreeMap<NodeId, Result<(), Option<PledgeRefusal>>>) -> PledgeOutcome {
    let mut retry = Vec::new();
    for (id, a) in answers {
        let who = id.to_string();
        match a {
            Ok(()) => {}
            Err(Some(PledgeRefusal::PledgedTo(p))) if *p > me => retry.push(format!("{who}: pledged to {}", p)),
            Err(Some(r)) => return PledgeOutcome::Withdraw { why: format!("{who}: {r}") },
            Err(None) => retry.push(format!("{who}: no answer")),
        }
    }
    if retry.is_empty() { PledgeOutcome::Initialize } else { PledgeOutcome::Retry { why: retry.join("; ") } }
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

/// Health from the time since the last successful contact.
pub fn classify(silent_for: Duration, t: &HealthTuning) -> Health {
    if silent_for >= t.failed_after() {
        Health::Failed
    } else if silent_for >= t.suspect_after() {
        Health::Suspect
    } else {
        Health::Alive
    }
}

// ---------------------------------------------------------------------------------------------
// Autopilot
// ---------------------------------------------------------------------------------------------

/// What the leader sees when it plans the next membership change.
#[derive(Debug, Clone)]
pub struct AutopilotView {
    pub leader: NodeId,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    /// Time since the last contact, for every member except the leader.
    pub silent_for: BTreeMap<NodeId, Duration>,
    /// Highest log index known to be replicated to each member (leader's replication metrics).
    pub matched: BTreeMap<NodeId, Option<u64>>,
    pub last_log_index: u64,
    pub max_voters: usize,
    /// A learner is caught up when it is at most this many entries behind.
    pub max_lag: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipAction {
    /// Make a caught-up, healthy learner a voter.
    Promote { learner: NodeId },
    /// Swap a failed voter for a caught-up, healthy learner; the failed node stays a learner.
    Replace { failed: NodeId, learner: NodeId },
    /// Remove a node that has been silent for longer than the grace period.
    Remove { id: NodeId },
}

/// The next membership change, if any. One change at a time: Raft serializes them anyway.
pub fn plan_membership(v: &AutopilotView, t: &HealthTuning) -> Option<MembershipAction> {
    let health = |id: NodeId| -> Health {
        if id == v.leader { Health::Alive } else { v.silent_for.get(&id).map_or(Health::Failed, |d| classify(*d, t)) }
    };
    let caught_up =
        |id: NodeId| v.matched.get(&id).copied().flatten().is_some_and(|m| m + v.max_lag >= v.last_log_index);
    let ready_learner = v.learners.iter().copied().find(|id| health(*id) == Health::Alive && caught_up(*id));

    if let Some(learner) = ready_learner {
        if let Some(failed) = v.voters.iter().copied().find(|id| health(*id) == Health::Failed) {
            return Some(MembershipAction::Replace { failed, learner });
        }
        if v.voters.len() < v.max_voters {
            return Some(MembershipAction::Promote { learner });
        }
    }
    // Grace period over: remove, but never the leader and never the last voter.
    let expired = |id: &NodeId| *id != v.leader && v.silent_for.get(id).is_some_and(|d| *d >= t.remove_after());
    if let Some(id) = v.learners.iter().find(|id| expired(id)) {
        return Some(MembershipAction::Remove { id: *id });
    }
    if let Some(id) = v.voters.iter().find(|id| expired(id))
        && v.voters.len() > 1
    {
        return Some(MembershipAction::Remove { id: *id });
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Transport: which address Raft and the peer API use for a member
// ---------------------------------------------------------------------------------------------

/// What the leader knows about how a member can be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportView {
    /// The address in the Raft membership now.
    pub current: String,
    /// The member's own (underlay) address: where it joined from, its WireGuard endpoint.
    pub underlay: String,
    /// Its peer API on the mesh, once it has a mesh address.
    pub mesh: Option<String>,
    /// A signed hello over the mesh address was answered by this member.
    pub mesh_answers: bool,
    /// A signed hello over the underlay address was answered by this member.
    pub underlay_answers: bool,
    pub silent_for: Duration,
}

/// The address Raft should switch a member to, if any. A member moves to its mesh address once it
/// answers there (its WireGuard tunnel to the leader works), and back to its underlay address only
/// when it has gone silent on the mesh but still answers on the underlay (its tunnel broke).
pub fn choose_transport(v: &TransportView, t: &HealthTuning) -> Option<String> {
    match &v.mesh {
        Some(mesh) if *mesh != v.current && v.mesh_answers => Some(mesh.clone()),
        Some(mesh)
            if *mesh == v.current
                && !v.mesh_answers
                && v.underlay_answers
                && v.silent_for >= t.suspect_after()
                && v.underlay != v.current =>
        {
            Some(v.underlay.clone())
        }
        _ => None,
    }
}

/// Whether the leader should probe a member this round: it is not on its mesh address yet, or it
/// is but has gone quiet there.
pub fn needs_transport_probe(current: &str, mesh: Option<&str>, silent_for: Duration, t: &HealthTuning) -> bool {
    match mesh {
        None => false,
        Some(m) => m != current || silent_for >= t.suspect_after(),
    }
}

/// The lowest log index a leader may serve linearizable reads at, in the term it leads.
///
/// openraft's read index is `max(commit index, first entry of the leader's term)`. That is
/// enough for a freshly elected leader (its blank entry comes after everything before), but not
/// for a leader that openraft restores at startup in the same term: its term's first entry is
/// old, and its commit index comes from disk, where it is not synced (it may be older than
/// writes the leader acknowledged before the crash). Every acknowledged write is in the
/// leader's log, though (it is acknowledged after it was applied, and applied after it was
/// synced there). So the floor is the last log index the leader held when this process first
/// saw itself lead the term: reads wait until that is committed and applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadFloor {
    pub term: u64,
    pub index: u64,
}

impl ReadFloor {
    /// The floor for `term`: the one already recorded for it, or a new one at
    /// `last_log_index` (taking it later than the term began only raises it, which is safe).
    pub fn observe(prev: Option<ReadFloor>, term: u64, last_log_index: Option<u64>) -> ReadFloor {
        match prev {
            Some(f) if f.term == term => f,
            _ => ReadFloor { term, index: last_log_index.unwrap_or(0) },
        }
    }

    /// The index a read must wait for: openraft's read index or the floor, whichever is later.
    pub fn read_index(&self, raft_read_index: Option<u64>) -> u64 {
        raft_read_index.unwrap_or(0).max(self.index)
    }
}

/// What a node knows when a candidate asks for its pre-vote.
#[derive(Clone, Debug)]
pub struct PreVoteView {
    /// This node leads (a leader never helps unseat itself).
    pub is_leader: bool,
    /// Since this node last heard from a leader (or granted a vote); None: never in this run.
    pub heard_leader_ago: Option<Duration>,
    pub last_log_id: Option<crate::adapters::raft::LogId>,
}

/// Whether to grant a pre-vote to a candidate with `candidate_last_log`: only when this node has
/// not heard from a leader for `lease` (the shortest election timeout) and the candidate's log
/// is at least as up to date as this node's, exactly what the real vote will check.
pub fn grant_pre_vote(
    v: &PreVoteView,
    candidate_last_log: Option<&crate::adapters::raft::LogId>,
    lease: Duration,
) -> Result<(), String> {
    if v.is_leader {
        return Err("this node is the leader".into());
    }
    if let Some(ago) = v.heard_leader_ago
        && ago < lease
    {
        return Err(format!("this node heard from a leader {} ms ago", ago.as_millis()));
    }
    if candidate_last_log < v.last_log_id.as_ref() {
        return Err("the candidate's log is behind this node's".into());
    }
    Ok(())
}

/// Whether `granted` holds a majority of every configuration of a (possibly joint) membership.
pub fn is_quorum(configs: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !configs.is_empty() && configs.iter().all(|c| c.intersection(granted).count() * 2 > c.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_vote_needs_silence_and_an_up_to_date_log() {
        use openraft::{CommittedLeaderId, LogId};
        let log = |term, index| Some(LogId::new(CommittedLeaderId::new(term, NodeId(1)), index));
        let lease = Duration::from_millis(800);
        let quiet =
            PreVoteView { is_leader: false, heard_leader_ago: Some(Duration::from_secs(2)), last_log_id: log(3, 10) };
        assert_eq!(grant_pre_vote(&quiet, log(3, 10).as_ref(), lease), Ok(()));
        assert_eq!(grant_pre_vote(&quiet, log(4, 2).as_ref(), lease), Ok(()), "a later term wins over a longer log");
        assert!(grant_pre_vote(&quiet, log(3, 9).as_ref(), lease).unwrap_err().contains("behind"));
        assert!(grant_pre_vote(&quiet, None, lease).is_err());
        // A healed follower asking while the leader is alive is refused: it stays in its term.
        let live = PreVoteView { heard_leader_ago: Some(Duration::from_millis(120)), ..quiet.clone() };
        assert!(grant_pre_vote(&live, log(9, 99).as_ref(), lease).unwrap_err().contains("heard from a leader"));
        let leader = PreVoteView { is_leader: true, ..quiet.clone() };
        assert!(grant_pre_vote(&leader, log(9, 99).as_ref(), lease).is_err());
        let fresh = PreVoteView { heard_leader_ago: None, ..quiet };
        assert_eq!(grant_pre_vote(&fresh, log(3, 10).as_ref(), lease), Ok(()), "just started: no leader heard");
    }

    #[test]
    fn quorum_is_a_majority_of_every_joint_configuration() {
        let set = |v: &[NodeId]| v.iter().copied().collect::<BTreeSet<_>>();
        assert!(is_quorum(&[set(&[NodeId(1), NodeId(2), NodeId(3)])], &set(&[NodeId(1), NodeId(2)])));
        assert!(!is_quorum(&[set(&[NodeId(1), NodeId(2), NodeId(3)])], &set(&[NodeId(1)])));
        assert!(
            !is_quorum(&[set(&[NodeId(1), NodeId(2), NodeId(3), NodeId(4)])], &set(&[NodeId(1), NodeId(2)])),
            "half is not a majority"
        );
        assert!(is_quorum(&[set(&[NodeId(1)])], &set(&[NodeId(1)])));
        assert!(!is_quorum(
            &[set(&[NodeId(1), NodeId(2), NodeId(3)]), set(&[NodeId(3), NodeId(4), NodeId(5)])],
            &set(&[NodeId(1), NodeId(2), NodeId(3)])
        ));
        assert!(is_quorum(
            &[set(&[NodeId(1), NodeId(2), NodeId(3)]), set(&[NodeId(3), NodeId(4), NodeId(5)])],
            &set(&[NodeId(2), NodeId(3), NodeId(4)])
        ));
        assert!(!is_quorum(&[], &set(&[NodeId(1)])));
    }

    #[test]
    fn read_floor_is_fixed_per_term_and_covers_the_restored_leaders_log() {
        // Restored leader of term 4: log up to 120, commit index from disk 90, term began at 80.
        let f = ReadFloor::observe(None, 4, Some(120));
        assert_eq!(f.read_index(Some(90)), 120, "reads wait for everything the leader held");
        // Later in the same term the floor stays; openraft's index takes over once it is higher.
        let f = ReadFloor::observe(Some(f), 4, Some(500));
        assert_eq!(f.index, 120);
        assert_eq!(f.read_index(Some(480)), 480);
        // A new term gets a new floor.
        assert_eq!(ReadFloor::observe(Some(f), 5, Some(501)), ReadFloor { term: 5, index: 501 });
        assert_eq!(ReadFloor::observe(None, 1, None).read_index(None), 0);
    }

    fn peer(addr: &str, known: &[NodeId]) -> PeerView {
        let known = known.iter().copied().collect();
        PeerView { addr: addr.into(), initialized: false, known, pledged: None, members: BTreeSet::new(), round: 1 }
    }

    fn pledge(proposer: NodeId, ids: &[NodeId]) -> Pledge {
        Pledge { proposer, seq: 1, members: members(ids) }
    }

    fn members(ids: &[NodeId]) -> BTreeMap<NodeId, String> {
        ids.iter().map(|i| (*i, format!("n{}", i.0))).collect()
    }

    #[test]
    fn formation_waits_until_expected_candidates_are_seen() {
        let peers = BTreeMap::from([(NodeId(2), peer("b", &[NodeId(1), NodeId(2)]))]);
        assert_eq!(decide_formation(NodeId(1), "a", 3, None, &peers), Formation::Wait { seen: 2, expected: 3 });
    }

    #[test]
    fn only_the_smallest_chosen_node_proposes() {
        let full = [NodeId(1), NodeId(2), NodeId(3)];
        let views = |me: NodeId| -> BTreeMap<NodeId, PeerView> {
            full.iter().filter(|id| **id != me).map(|id| (*id, peer(&format!("n{}", id.0), &full))).collect()
        };
        assert_eq!(
            decide_formation(NodeId(1), "n1", 3, None, &views(NodeId(1))),
            Formation::Propose { members: members(&full) }
        );
        for me in [NodeId(2), NodeId(3)] {
            assert_eq!(
                decide_formation(me, &format!("n{}", me.0), 3, None, &views(me)),
                Formation::Settling { chosen: full.into() }
            );
        }
    }

    #[test]
    fn formation_waits_while_a_chosen_peer_has_a_different_view() {
        // Node 3 has not heard from node 1 yet.
        let peers = BTreeMap::from([
            (NodeId(2), peer("b", &[NodeId(1), NodeId(2), NodeId(3)])),
            (NodeId(3), peer("c", &[NodeId(2), NodeId(3)])),
        ]);
        assert!(matches!(decide_formation(NodeId(1), "a", 3, None, &peers), Formation::Settling { .. }));
    }

    #[test]
    fn formation_with_more_candidates_than_expected_picks_smallest_ids() {
        let all = [NodeId(1), NodeId(5), NodeId(7), NodeId(9)];
        let peers: BTreeMap<NodeId, PeerView> =
            all.iter().filter(|i| **i != NodeId(9)).map(|i| (*i, peer(&format!("n{}", i.0), &all))).collect();
        // Node 9 is not among the 3 smallest: it waits and joins later.
        assert_eq!(
            decide_formation(NodeId(9), "n9", 3, None, &peers),
            Formation::Settling { chosen: [NodeId(1), NodeId(5), NodeId(7)].into() }
        );
        let peers: BTreeMap<NodeId, PeerView> =
            all.iter().filter(|i| **i != NodeId(1)).map(|i| (*i, peer(&format!("n{}", i.0), &all))).collect();
        assert_eq!(
            decide_formation(NodeId(1), "n1", 3, None, &peers),
            Formation::Propose { members: members(&[NodeId(1), NodeId(5), NodeId(7)]) }
        );
    }

    #[test]
    fn a_proposal_under_way_elsewhere_makes_others_wait() {
        // Node 4 knows 1..5 and would choose {1,2,4}, but node 2 holds node 1's pledge for {1,2,3}.
        let mut p2 = peer("n2", &[NodeId(1), NodeId(2), NodeId(3), NodeId(4), NodeId(5)]);
        p2.pledged = Some(pledge(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3)]));
        let peers = BTreeMap::from([
            (NodeId(2), p2),
            (NodeId(5), peer("n5", &[NodeId(1), NodeId(2), NodeId(3), NodeId(4), NodeId(5)])),
        ]);
        assert_eq!(
            decide_formation(NodeId(4), "n4", 3, None, &peers),
            Formation::Settling { chosen: [NodeId(1), NodeId(2), NodeId(3)].into() }
        );
    }

    #[test]
    fn a_pledge_its_proposer_withdrew_since_does_not_hold_others_up() {
        let all = [NodeId(1), NodeId(2), NodeId(3), NodeId(4), NodeId(5)];
        let mut p5 = PeerView { round: 3, ..peer("n5", &all) };
        p5.pledged = Some(pledge(NodeId(3), &[NodeId(3), NodeId(4), NodeId(5)]));
        let p3 = PeerView { round: 4, ..peer("n3", &all) };
        let mut peers: BTreeMap<NodeId, PeerView> =
            [NodeId(2), NodeId(4)].iter().map(|i| (*i, peer(&format!("n{}", i.0), &all))).collect();
        peers.insert(NodeId(5), p5);
        peers.insert(NodeId(3), p3.clone());
        assert_eq!(
            decide_formation(NodeId(1), "n1", 3, None, &peers),
            Formation::Propose { members: members(&[NodeId(1), NodeId(2), NodeId(3)]) }
        );
        // Seen before node 5's view (or still holding it): it counts.
        peers.insert(NodeId(3), PeerView { round: 3, ..p3 });
        assert_eq!(
            decide_formation(NodeId(1), "n1", 3, None, &peers),
            Formation::Settling { chosen: [NodeId(3), NodeId(4), NodeId(5)].into() }
        );
    }

    #[test]
    fn a_proposer_gives_up_a_proposal_with_a_silent_member() {
        let held = HeldPledge { pledge: pledge(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3)]), views_from_round: 1 };
        let peers = BTreeMap::from([(NodeId(2), peer("n2", &[NodeId(1), NodeId(2), NodeId(3)]))]);
        assert_eq!(decide_formation(NodeId(1), "n1", 3, Some(&held), &peers), Formation::Release);
    }

    #[test]
    fn formation_joins_an_existing_cluster() {
        let mut p = peer("b", &[NodeId(2)]);
        p.initialized = true;
        let peers = BTreeMap::from([(NodeId(2), p), (NodeId(3), peer("c", &[NodeId(1), NodeId(2), NodeId(3)]))]);
        assert_eq!(decide_formation(NodeId(1), "a", 3, None, &peers), Formation::Join { via: "b".into() });
    }

    #[test]
    fn single_node_bootstrap() {
        let me = BTreeMap::from([(NodeId(4), "a".to_string())]);
        assert_eq!(decide_formation(NodeId(4), "a", 1, None, &BTreeMap::new()), Formation::Propose { members: me });
        assert_eq!(pledge_outcome(NodeId(4), &BTreeMap::new()), PledgeOutcome::Initialize);
    }

    #[test]
    fn a_pledged_member_waits_and_releases_only_on_a_fresh_view_of_its_proposer() {
        let held = HeldPledge { pledge: pledge(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3)]), views_from_round: 5 };
        let view = |round: u64, pledged: Option<Pledge>, initialized: bool| {
            BTreeMap::from([(
                NodeId(1),
                PeerView { round, pledged, initialized, ..peer("n1", &[NodeId(1), NodeId(2), NodeId(3)]) },
            )])
        };
        let wait = Formation::Pledged { proposer: NodeId(1) };
        // Another cluster elsewhere does not release it: only its proposer does.
        let mut others = view(5, held.pledge.clone().into(), false);
        others.insert(NodeId(9), PeerView { initialized: true, ..peer("n9", &[NodeId(9)]) });
        assert_eq!(decide_formation(NodeId(2), "n2", 3, Some(&held), &others), wait);
        assert_eq!(decide_formation(NodeId(2), "n2", 3, Some(&held), &BTreeMap::new()), wait, "proposer not seen");
        assert_eq!(
            decide_formation(NodeId(2), "n2", 3, Some(&held), &view(4, None, false)),
            wait,
            "view from before the pledge"
        );
        assert_eq!(
            decide_formation(NodeId(2), "n2", 3, Some(&held), &view(5, None, true)),
            wait,
            "it formed, not applied yet"
        );
        let mut formed = view(5, None, true);
        formed.get_mut(&NodeId(1)).unwrap().members = [NodeId(1), NodeId(2), NodeId(3)].into();
        assert_eq!(decide_formation(NodeId(2), "n2", 3, Some(&held), &formed), wait, "the proposer formed it");
        formed.get_mut(&NodeId(1)).unwrap().members = [NodeId(1), NodeId(7), NodeId(8)].into();
        assert_eq!(decide_formation(NodeId(2), "n2", 3, Some(&held), &formed), Formation::Release, "it joined another");
        assert_eq!(decide_formation(NodeId(2), "n2", 3, Some(&held), &view(5, None, false)), Formation::Release);
        let other = Some(pledge(NodeId(1), &[NodeId(1), NodeId(2), NodeId(4)]));
        assert_eq!(decide_formation(NodeId(2), "n2", 3, Some(&held), &view(6, other, false)), Formation::Release);
    }

    #[test]
    fn a_proposer_goes_on_proposing_until_a_cluster_forms_elsewhere() {
        let held = HeldPledge { pledge: pledge(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3)]), views_from_round: 1 };
        let mut peers = BTreeMap::from([
            (NodeId(2), peer("n2", &[NodeId(1), NodeId(2)])),
            (NodeId(3), peer("n3", &[NodeId(1), NodeId(3)])),
        ]);
        assert_eq!(
            decide_formation(NodeId(1), "n1", 3, Some(&held), &peers),
            Formation::AskAgain { pledge: held.pledge.clone() }
        );
        peers.insert(NodeId(7), PeerView { initialized: true, ..peer("n7", &[NodeId(7)]) });
        assert_eq!(decide_formation(NodeId(1), "n1", 3, Some(&held), &peers), Formation::Release);
    }

    #[test]
    fn a_node_pledges_to_one_proposer_at_a_time() {
        let p1 = pledge(NodeId(1), &[NodeId(1), NodeId(2), NodeId(3)]);
        assert_eq!(answer_pledge(NodeId(2), Some(3), false, None, &p1), Ok(()));
        assert_eq!(answer_pledge(NodeId(2), Some(3), false, Some(&p1), &p1), Ok(()), "asked again");
        let newer = Pledge { seq: 2, ..pledge(NodeId(1), &[NodeId(1), NodeId(2), NodeId(4)]) };
        assert_eq!(answer_pledge(NodeId(2), Some(3), false, Some(&p1), &newer), Ok(()), "its proposer's new set");
        assert_eq!(
            answer_pledge(NodeId(2), Some(3), false, Some(&newer), &p1),
            Err(PledgeRefusal::Superseded),
            "a late request"
        );
        assert_eq!(
            answer_pledge(NodeId(2), Some(3), false, Some(&p1), &pledge(NodeId(2), &[NodeId(2), NodeId(3), NodeId(4)])),
            Err(PledgeRefusal::PledgedTo(NodeId(1)))
        );
        assert_eq!(answer_pledge(NodeId(2), Some(3), true, None, &p1), Err(PledgeRefusal::InCluster));
        for bad in [
            pledge(NodeId(1), &[NodeId(1), NodeId(3), NodeId(4)]),
            pledge(NodeId(3), &[NodeId(1), NodeId(2), NodeId(3)]),
            pledge(NodeId(1), &[NodeId(1), NodeId(2)]),
        ] {
            assert!(
                matches!(answer_pledge(NodeId(2), Some(3), false, None, &bad), Err(PledgeRefusal::Invalid(_))),
                "{bad:?}"
            );
        }
        let Err(PledgeRefusal::Invalid(why)) = answer_pledge(NodeId(2), None, false, None, &p1) else { panic!() };
        assert!(why.contains("bootstrap_expect"), "{why}");
    }

    #[test]
    fn the_smaller_proposer_wins_a_contested_member() {
        let ok = |ids: &[NodeId]| ids.iter().map(|i| (*i, Ok(()))).collect::<BTreeMap<_, _>>();
        assert_eq!(pledge_outcome(NodeId(3), &ok(&[NodeId(5), NodeId(7)])), PledgeOutcome::Initialize);
        let mut a = ok(&[NodeId(5)]);
        a.insert(NodeId(7), Err(Some(PledgeRefusal::PledgedTo(NodeId(2)))));
        assert!(
            matches!(pledge_outcome(NodeId(3), &a), PledgeOutcome::Withdraw { .. }),
            "pledged to a smaller proposer"
        );
        a.insert(NodeId(7), Err(Some(PledgeRefusal::PledgedTo(NodeId(4)))));
        assert!(matches!(pledge_outcome(NodeId(3), &a), PledgeOutcome::Retry { .. }), "the larger one withdraws");
        a.insert(NodeId(7), Err(None));
        assert!(matches!(pledge_outcome(NodeId(3), &a), PledgeOutcome::Retry { .. }), "no answer");
        a.insert(NodeId(7), Err(Some(PledgeRefusal::InCluster)));
        assert!(matches!(pledge_outcome(NodeId(3), &a), PledgeOutcome::Withdraw { .. }));
    }

    fn tuning() -> HealthTuning {
        HealthTuning { suspect_after_ms: 1000, failed_after_ms: 3000, remove_after_ms: 10_000 }
    }

    #[test]
    fn classify_thresholds() {
        let t = tuning();
        assert_eq!(classify(Duration::from_millis(999), &t), Health::Alive);
        assert_eq!(classify(Duration::from_millis(1000), &t), Health::Suspect);
        assert_eq!(classify(Duration::from_millis(3000), &t), Health::Failed);
    }

    fn view(voters: &[NodeId], learners: &[NodeId]) -> AutopilotView {
        let all: Vec<NodeId> = voters.iter().chain(learners).copied().collect();
        AutopilotView {
            leader: voters[0],
            voters: voters.iter().copied().collect(),
            learners: learners.iter().copied().collect(),
            silent_for: all.iter().filter(|i| **i != voters[0]).map(|i| (*i, Duration::from_millis(10))).collect(),
            matched: all.iter().map(|i| (*i, Some(100))).collect(),
            last_log_index: 100,
            max_voters: 3,
            max_lag: 10,
        }
    }

    #[test]
    fn promotes_learners_up_to_max_voters_only() {
        let t = tuning();
        assert_eq!(
            plan_membership(&view(&[NodeId(1)], &[NodeId(2), NodeId(3)]), &t),
            Some(MembershipAction::Promote { learner: NodeId(2) })
        );
        assert_eq!(
            plan_membership(&view(&[NodeId(1), NodeId(2)], &[NodeId(3)]), &t),
            Some(MembershipAction::Promote { learner: NodeId(3) })
        );
        assert_eq!(plan_membership(&view(&[NodeId(1), NodeId(2), NodeId(3)], &[NodeId(4), NodeId(5)]), &t), None);
        let mut v = view(&[NodeId(1), NodeId(2), NodeId(3)], &[NodeId(4), NodeId(5)]);
        v.max_voters = 5;
        assert_eq!(plan_membership(&v, &t), Some(MembershipAction::Promote { learner: NodeId(4) }));
    }

    #[test]
    fn lagging_or_unhealthy_learners_are_not_promoted() {
        let t = tuning();
        let mut v = view(&[NodeId(1)], &[NodeId(2)]);
        v.matched.insert(NodeId(2), Some(50));
        assert_eq!(plan_membership(&v, &t), None);
        v.matched.insert(NodeId(2), None);
        assert_eq!(plan_membership(&v, &t), None);
        let mut v = view(&[NodeId(1)], &[NodeId(2)]);
        v.silent_for.insert(NodeId(2), Duration::from_millis(1500));
        assert_eq!(plan_membership(&v, &t), None);
    }

    #[test]
    fn failed_voter_is_replaced_by_a_healthy_learner() {
        let t = tuning();
        let mut v = view(&[NodeId(1), NodeId(2), NodeId(3)], &[NodeId(4)]);
        v.silent_for.insert(NodeId(3), Duration::from_millis(3500));
        assert_eq!(plan_membership(&v, &t), Some(MembershipAction::Replace { failed: NodeId(3), learner: NodeId(4) }));
        // A suspect voter is not replaced yet.
        v.silent_for.insert(NodeId(3), Duration::from_millis(1500));
        assert_eq!(plan_membership(&v, &t), None);
    }

    #[test]
    fn nodes_silent_past_the_grace_period_are_removed() {
        let t = tuning();
        let mut v = view(&[NodeId(1), NodeId(2), NodeId(3)], &[NodeId(4)]);
        v.silent_for.insert(NodeId(4), Duration::from_secs(11));
        assert_eq!(plan_membership(&v, &t), Some(MembershipAction::Remove { id: NodeId(4) }));
        let mut v = view(&[NodeId(1), NodeId(2), NodeId(3)], &[]);
        v.silent_for.insert(NodeId(2), Duration::from_secs(11));
        assert_eq!(plan_membership(&v, &t), Some(MembershipAction::Remove { id: NodeId(2) }));
    }

    #[test]
    fn replacement_comes_before_removal_and_leader_is_never_removed() {
        let t = tuning();
        let mut v = view(&[NodeId(1), NodeId(2), NodeId(3)], &[NodeId(4)]);
        v.silent_for.insert(NodeId(2), Duration::from_secs(11));
        assert_eq!(plan_membership(&v, &t), Some(MembershipAction::Replace { failed: NodeId(2), learner: NodeId(4) }));
        let mut v = view(&[NodeId(1)], &[]);
        v.silent_for.insert(NodeId(1), Duration::from_secs(11));
        assert_eq!(plan_membership(&v, &t), None);
    }

    #[test]
    fn stable_cluster_needs_no_change() {
        assert_eq!(plan_membership(&view(&[NodeId(1), NodeId(2), NodeId(3)], &[]), &tuning()), None);
    }

    fn transport(current: &str, mesh_answers: bool, underlay_answers: bool, silent_ms: u64) -> TransportView {
        TransportView {
            current: current.into(),
            underlay: "192.168.1.5:7600".into(),
            mesh: Some("10.90.0.5:7600".into()),
            mesh_answers,
            underlay_answers,
            silent_for: Duration::from_millis(silent_ms),
        }
    }

    #[test]
    fn transport_moves_to_the_mesh_only_when_the_member_answers_there() {
        let t = HealthTuning::default();
        let under = "192.168.1.5:7600";
        let mesh = "10.90.0.5:7600";
        // (current, mesh answers, underlay answers, silent ms) -> new address
        let table: &[(&str, bool, bool, u64, Option<&str>)] = &[
            (under, true, true, 0, Some(mesh)),
            (under, false, true, 0, None),
            (under, false, false, 60_000, None),
            (mesh, true, true, 0, None),
            // Quiet on the mesh but fine on the underlay: the tunnel broke, fall back.
            (mesh, false, true, 60_000, Some(under)),
            // Not yet quiet long enough: a lost probe is not a broken tunnel.
            (mesh, false, true, 100, None),
            // Down on both: the node is down; the autopilot deals with it, the address stays.
            (mesh, false, false, 60_000, None),
        ];
        for (current, m, u, silent, want) in table {
            let got = choose_transport(&transport(current, *m, *u, *silent), &t);
            assert_eq!(got.as_deref(), *want, "current={current} mesh={m} underlay={u} silent={silent}");
        }
        let no_mesh = TransportView { mesh: None, ..transport(under, true, true, 0) };
        assert_eq!(choose_transport(&no_mesh, &t), None);
    }

    #[test]
    fn transport_probes_only_members_off_the_mesh_or_quiet_on_it() {
        let t = HealthTuning::default();
        let quiet = t.suspect_after();
        assert!(!needs_transport_probe("a:1", None, quiet, &t));
        assert!(needs_transport_probe("a:1", Some("m:1"), Duration::ZERO, &t));
        assert!(!needs_transport_probe("m:1", Some("m:1"), Duration::ZERO, &t));
        assert!(needs_transport_probe("m:1", Some("m:1"), quiet, &t));
    }
}
