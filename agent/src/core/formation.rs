//! How a cluster forms (pure): with `bootstrap_expect = N`, the N smallest candidates that see
//! each other agree on one member set through pledges (a numbered proposal each member holds
//! durably) before the proposer initializes Raft; a node that finds a running cluster joins it.
//! No I/O and no clock: the runtime passes views in and carries the decision out.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::core::state::NodeId;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
