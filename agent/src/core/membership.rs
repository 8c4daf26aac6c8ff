//! Pure membership decisions of a running cluster: how health is classified, what the leader's
//! autopilot changes next (promote, replace, remove), which address a member is reached at, the
//! read floor of linearizable reads, and pre-votes. How a cluster forms is [`crate::core::formation`].
//! No I/O and no clock: callers pass durations and observations in, and carry the decision out.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::core::config::HealthTuning;
use crate::core::state::{Health, NodeId};

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
    /// The leader this node follows, stopping, handed its office to this node in the current
    /// term (see [`choose_successor`]).
    pub handed_to: Option<NodeId>,
    pub last_log_id: Option<crate::core::raft_types::LogId>,
}

/// Whether to grant a pre-vote to `candidate` with `candidate_last_log`: only when this node has
/// not heard from a leader for `lease` (the shortest election timeout), or the leader handed its
/// office to that candidate, and the candidate's log is at least as up to date as this node's,
/// exactly what the real vote will check.
pub fn grant_pre_vote(
    v: &PreVoteView,
    candidate: NodeId,
    candidate_last_log: Option<&crate::core::raft_types::LogId>,
    lease: Duration,
) -> Result<(), String> {
    if v.is_leader {
        return Err("this node is the leader".into());
    }
    if let Some(ago) = v.heard_leader_ago
        && ago < lease
        && v.handed_to != Some(candidate)
    {
        return Err(format!("this node heard from a leader {} ms ago", ago.as_millis()));
    }
    if candidate_last_log < v.last_log_id.as_ref() {
        return Err("the candidate's log is behind this node's".into());
    }
    Ok(())
}

/// The voter a stopping leader hands its office to: of the other voters, the one whose log
/// replication has matched furthest (the lowest id among equals); `None` when there is no other
/// voter or none has matched any entry in this term.
pub fn choose_successor(
    me: NodeId,
    voters: impl IntoIterator<Item = NodeId>,
    matched: &BTreeMap<NodeId, Option<u64>>,
) -> Option<NodeId> {
    voters
        .into_iter()
        .filter(|v| *v != me)
        .filter_map(|v| matched.get(&v).copied().flatten().map(|m| (m, v)))
        .max_by(|(ma, va), (mb, vb)| ma.cmp(mb).then(vb.cmp(va)))
        .map(|(_, v)| v)
}

/// Whether `granted` holds a majority of every configuration of a (possibly joint) membership.
pub fn is_quorum(configs: &[BTreeSet<NodeId>], granted: &BTreeSet<NodeId>) -> bool {
    !configs.is_empty() && configs.iter().all(|c| c.intersection(granted).count() * 2 > c.len())
}

// ---------------------------------------------------------------------------------------------
// Removal
// ---------------------------------------------------------------------------------------------

/// A Raft membership as a node last applied it: the log index of its entry, and its members.
/// Applied means committed, so two of them are points in the one history of the cluster, and the
/// higher index is the later one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedMembership {
    pub index: Option<u64>,
    pub members: BTreeSet<NodeId>,
}

/// Whether a peer's answer proves that the cluster removed this node `me`: the peer knows a
/// leader, and the membership it applied does not list this node and is later than the one
/// `mine` this node applied, or the same one when that does not list this node either (it applied
/// its own removal, then restarted). A peer that is behind this node (a stale, partitioned
/// learner) proves nothing, however it looks: acting on it would wipe a current voter.
pub fn removal_confirmed(me: NodeId, mine: &AppliedMembership, theirs: &AppliedMembership, leader_known: bool) -> bool {
    let removed_here = mine.index.is_some() && !mine.members.contains(&me);
    let proves = match (theirs.index, mine.index) {
        (Some(t), Some(m)) => t > m || (t == m && removed_here),
        (Some(_), None) => true,
        (None, _) => false,
    };
    leader_known && proves && !theirs.members.is_empty() && !theirs.members.contains(&me)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pre_vote_needs_silence_and_an_up_to_date_log() {
        use openraft::{CommittedLeaderId, LogId};
        let log = |term, index| Some(LogId::new(CommittedLeaderId::new(term, NodeId(1)), index));
        let lease = Duration::from_millis(800);
        let c = NodeId(7);
        let quiet = PreVoteView {
            is_leader: false,
            heard_leader_ago: Some(Duration::from_secs(2)),
            handed_to: None,
            last_log_id: log(3, 10),
        };
        assert_eq!(grant_pre_vote(&quiet, c, log(3, 10).as_ref(), lease), Ok(()));
        assert_eq!(grant_pre_vote(&quiet, c, log(4, 2).as_ref(), lease), Ok(()), "a later term wins over a longer log");
        assert!(grant_pre_vote(&quiet, c, log(3, 9).as_ref(), lease).unwrap_err().contains("behind"));
        assert!(grant_pre_vote(&quiet, c, None, lease).is_err());
        // A healed follower asking while the leader is alive is refused: it stays in its term.
        let live = PreVoteView { heard_leader_ago: Some(Duration::from_millis(120)), ..quiet.clone() };
        assert!(grant_pre_vote(&live, c, log(9, 99).as_ref(), lease).unwrap_err().contains("heard from a leader"));
        let leader = PreVoteView { is_leader: true, ..quiet.clone() };
        assert!(grant_pre_vote(&leader, c, log(9, 99).as_ref(), lease).is_err());
        let fresh = PreVoteView { heard_leader_ago: None, ..quiet.clone() };
        assert_eq!(grant_pre_vote(&fresh, c, log(3, 10).as_ref(), lease), Ok(()), "just started: no leader heard");
        // A stopping leader handed its office to c: c needs no silence, another candidate does,
        // and c's log must still be up to date.
        let handed = PreVoteView { handed_to: Some(c), ..live };
        assert_eq!(grant_pre_vote(&handed, c, log(3, 10).as_ref(), lease), Ok(()));
        assert!(grant_pre_vote(&handed, NodeId(8), log(3, 10).as_ref(), lease).unwrap_err().contains("heard from"));
        assert!(grant_pre_vote(&handed, c, log(3, 9).as_ref(), lease).unwrap_err().contains("behind"));
    }

    #[test]
    fn the_successor_is_the_voter_matched_furthest() {
        let (me, a, b, c) = (NodeId(1), NodeId(2), NodeId(3), NodeId(4));
        let matched = |v: &[(NodeId, Option<u64>)]| v.iter().copied().collect::<BTreeMap<_, _>>();
        let m = matched(&[(me, Some(50)), (a, Some(40)), (b, Some(49)), (c, None)]);
        assert_eq!(choose_successor(me, [me, a, b, c], &m), Some(b), "the furthest other voter, never itself");
        let tie = matched(&[(a, Some(49)), (b, Some(49))]);
        assert_eq!(choose_successor(me, [me, b, a], &tie), Some(a), "the lowest id among equals");
        // A learner far ahead is not a voter, so not a successor.
        assert_eq!(choose_successor(me, [me, a], &matched(&[(a, Some(1)), (b, Some(99))])), Some(a));
        assert_eq!(choose_successor(me, [me, c], &m), None, "nothing matched: no successor");
        assert_eq!(choose_successor(me, [me], &m), None, "alone: no successor");
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

    #[test]
    fn only_a_later_membership_without_this_node_proves_removal() {
        let me = NodeId(1);
        let m = |index: Option<u64>, ids: &[u64]| AppliedMembership {
            index,
            members: ids.iter().map(|i| NodeId(*i)).collect(),
        };
        let mine = m(Some(40), &[1, 2, 3]);
        // (theirs, leader known, removed?)
        let cases = [
            (m(Some(55), &[2, 3, 4]), true, true),
            // A stale learner that applied an older membership without this node (it was added
            // after): the false removal.
            (m(Some(12), &[2, 3]), true, false),
            (m(Some(40), &[2, 3]), true, false),
            (m(Some(55), &[1, 2, 3, 4]), true, false),
            (m(Some(55), &[2, 3, 4]), false, false),
            (m(None, &[2, 3]), true, false),
            (m(Some(55), &[]), true, false),
        ];
        for (theirs, leader, want) in cases {
            assert_eq!(removal_confirmed(me, &mine, &theirs, leader), want, "{theirs:?} leader={leader}");
        }
        assert!(removal_confirmed(me, &m(None, &[]), &m(Some(3), &[2]), true), "a node that applied nothing yet");
        // This node applied its own removal (index 40 without it) and restarted: a peer at the
        // same membership confirms it; one behind does not.
        let removed = m(Some(40), &[2, 3]);
        assert!(removal_confirmed(me, &removed, &m(Some(40), &[2, 3]), true));
        assert!(!removal_confirmed(me, &removed, &m(Some(39), &[2, 3]), true));
    }
}
