//! Every decision the leader makes in one tick, as a pure function of what it sees:
//! [`leader_tick`] takes a [`LeaderView`] (the applied state, the Raft membership and how long each
//! member has been silent) and returns the [`LeaderCommand`]s to carry out, in order. The runtime
//! executes them one by one and stops at the first that fails; the next tick decides again from
//! the state as it then is, so a command lost to a change of leader is simply decided again.
//!
//! Must not: read a clock, draw random numbers or touch Raft (the view carries the time; the
//! runtime draws the cluster id and secret values).

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::core::config::HealthTuning;
use crate::core::membership::{AutopilotView, MembershipAction, classify, plan_membership};
use crate::core::state::{ClusterState, Command, Health, NodeId};

/// What the leader sees at the start of a tick.
#[derive(Debug, Clone)]
pub struct LeaderView<'a> {
    /// The applied cluster state.
    pub state: &'a ClusterState,
    /// The Raft membership, the members' silence and replication progress (the leader is `me`).
    pub autopilot: AutopilotView,
    /// The mesh network members' addresses come from.
    pub mesh_cidr: (Ipv4Addr, u8),
    /// The leader's clock, for the timestamps of health changes.
    pub now_ms: u64,
    /// The fingerprint of the cluster secret the leader seals with.
    pub cluster_key: String,
    /// The managed secrets whose sealed values the leader opened only with an accepted cluster
    /// secret (sealed before the cluster secret was rotated).
    pub sealed_with_accepted: BTreeSet<String>,
}

/// One thing the leader does, in the order [`leader_tick`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderCommand {
    /// Name the cluster (the runtime draws the id): the first thing a new leader of a new cluster does.
    InitCluster,
    /// Generate the managed secret `name` (the runtime draws and seals the value) and commit it.
    CreateSecret { name: &'static str },
    /// Commit this command as it is.
    Commit(Command),
    /// The mesh network has no address left for `id` (nothing to commit; the operator must set a
    /// larger `mesh_cidr`).
    MeshFull { id: NodeId },
    /// Change the Raft membership, one change per tick.
    Membership(MembershipAction),
    /// Seal secret `name` again with the leader's cluster secret (the runtime opens and seals it)
    /// and commit it at its version.
    Reseal { name: String },
}

impl LeaderCommand {
    /// What the leader tells the journal when it carries the command out.
    pub fn describe(&self) -> String {
        match self {
            LeaderCommand::InitCluster => "naming the cluster".into(),
            LeaderCommand::CreateSecret { name } => format!("generating cluster secret {name}"),
            LeaderCommand::Commit(Command::AssignMeshIp { id, ip }) => format!("assigning mesh address {ip} to {id}"),
            LeaderCommand::Commit(Command::SetHealth { id, health, .. }) => format!("member {id} is now {health}"),
            LeaderCommand::Commit(Command::SetRoles { roles }) => format!(
                "role assignments changed: slurm controller {}, backup {}, k3s server {}",
                show(roles.slurm_controller),
                show(roles.slurm_backup),
                show(roles.k3s_server)
            ),
            LeaderCommand::Commit(c) => format!("committing {c:?}"),
            LeaderCommand::MeshFull { id } => format!("the mesh network is full: no address for {id}"),
            LeaderCommand::Membership(a) => format!("autopilot membership change: {a:?}"),
            LeaderCommand::Reseal { name } => format!("sealing secret {name} again with the new cluster secret"),
        }
    }
}

fn show(id: Option<NodeId>) -> String {
    id.map_or_else(|| "none".into(), |i| i.to_string())
}

/// The leader's commands for one tick: name the cluster, create missing secrets, seal secrets
/// again after a rotation of the cluster secret, give every member a mesh address, reassign roles,
/// commit health transitions, then at most one membership change from the autopilot.
pub fn leader_tick(v: &LeaderView, health: &HealthTuning) -> Vec<LeaderCommand> {
    let s = v.state;
    let me = v.autopilot.leader;
    let mut out = Vec::new();
    if s.cluster_id.is_none() {
        out.push(LeaderCommand::InitCluster);
    }
    for name in crate::core::secrets::MANAGED {
        if !s.secrets.contains_key(*name) {
            out.push(LeaderCommand::CreateSecret { name });
        }
    }
    // Sealed with an older (or newer) cluster secret than the leader's own: sealed again only once
    // every Raft member reports that it holds the leader's, so that no member is left with a value
    // it cannot open.
    let members = v.autopilot.voters.iter().chain(&v.autopilot.learners);
    let all_hold =
        members.into_iter().all(|id| s.members.get(id).is_some_and(|m| m.spec.cluster_keys.contains(&v.cluster_key)));
    if all_hold {
        for name in &v.sealed_with_accepted {
            out.push(LeaderCommand::Reseal { name: name.clone() });
        }
    }

    let (net, prefix) = v.mesh_cidr;
    let mut used: BTreeSet<Ipv4Addr> = s.members.values().filter_map(|m| m.mesh_ip).collect();
    for m in s.members.values().filter(|m| m.mesh_ip.is_none()) {
        let id = m.spec.id;
        match crate::core::mesh::allocate_mesh_ip(net, prefix, &used) {
            Some(ip) => {
                used.insert(ip);
                out.push(LeaderCommand::Commit(Command::AssignMeshIp { id, ip }));
            }
            None => {
                out.push(LeaderCommand::MeshFull { id });
                break;
            }
        }
    }

    let roles = crate::core::roles::schedule(&s.members, &s.roles);
    if roles != s.roles {
        out.push(LeaderCommand::Commit(Command::SetRoles { roles }));
    }

    // Health transitions, committed so that every node shows them.
    for m in s.members.values().filter(|m| m.health != Health::Left) {
        let id = m.spec.id;
        let new = if id == me {
            Health::Alive
        } else {
            classify(v.autopilot.silent_for.get(&id).copied().unwrap_or(std::time::Duration::MAX), health)
        };
        if new != m.health {
            out.push(LeaderCommand::Commit(Command::SetHealth { id, health: new, at_ms: v.now_ms }));
        }
    }

    if let Some(action) = plan_membership(&v.autopilot, health) {
        out.push(LeaderCommand::Membership(action));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::core::state::{Member, MemberSpec, NodeFacts, RoleAssignments, SecretEntry};

    const ME: NodeId = NodeId(1);

    fn member(id: u64, health: Health, mesh: Option<[u8; 4]>) -> Member {
        Member {
            spec: MemberSpec {
                id: NodeId(id),
                name: format!("n{id}"),
                api_addr: format!("10.0.0.{id}:7600"),
                wg_public_key: crate::core::state::test_wg_key(id),
                facts: NodeFacts::default(),
                labels: BTreeMap::new(),
                cluster_keys: Vec::new(),
            },
            health,
            health_since_ms: 0,
            registered_at_ms: id * 10,
            mesh_ip: mesh.map(Ipv4Addr::from),
        }
    }

    /// A named cluster with both secrets, members 1..=3 alive with mesh addresses, roles as the
    /// scheduler would set them: a tick on it decides nothing.
    fn settled() -> ClusterState {
        let mut s = ClusterState { cluster_id: Some("c".into()), ..Default::default() };
        for name in crate::core::secrets::MANAGED {
            s.secrets.insert((*name).into(), SecretEntry { value: "sealed".into(), version: 1, changed_at_ms: 0 });
        }
        for id in 1..=3 {
            s.members.insert(NodeId(id), member(id, Health::Alive, Some([10, 90, 0, id as u8])));
        }
        s.roles = crate::core::roles::schedule(&s.members, &RoleAssignments::default());
        s
    }

    fn autopilot(voters: &[u64], learners: &[u64], silent: &[(u64, u64)]) -> AutopilotView {
        let ids = |v: &[u64]| v.iter().map(|i| NodeId(*i)).collect::<BTreeSet<_>>();
        let voters = ids(voters);
        let learners = ids(learners);
        let mut silent_for: BTreeMap<NodeId, Duration> =
            voters.iter().chain(&learners).filter(|i| **i != ME).map(|i| (*i, Duration::from_millis(10))).collect();
        for (id, ms) in silent {
            silent_for.insert(NodeId(*id), Duration::from_millis(*ms));
        }
        let matched = voters.iter().chain(&learners).map(|i| (*i, Some(100))).collect();
        AutopilotView {
            leader: ME,
            voters,
            learners,
            silent_for,
            matched,
            last_log_index: 100,
            max_voters: 3,
            max_lag: 50,
        }
    }

    fn tick(state: &ClusterState, ap: AutopilotView, cidr: (Ipv4Addr, u8)) -> Vec<LeaderCommand> {
        let view = LeaderView {
            state,
            autopilot: ap,
            mesh_cidr: cidr,
            now_ms: 5_000,
            cluster_key: "0000000a".into(),
            sealed_with_accepted: BTreeSet::new(),
        };
        leader_tick(&view, &HealthTuning::default())
    }

    const CIDR: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 90, 0, 0), 24);

    /// After the cluster secret was rotated, the leader seals the secrets it opened with an old
    /// one again with its own, but only once every Raft member (learners too) holds its secret.
    #[test]
    fn secrets_are_sealed_again_once_every_member_holds_the_new_cluster_secret() {
        let mut state = settled();
        let holds = |s: &mut ClusterState, id: u64, keys: &[&str]| {
            s.members.get_mut(&NodeId(id)).unwrap().spec.cluster_keys = keys.iter().map(|k| k.to_string()).collect();
        };
        let reseals = |s: &ClusterState, learners: &[u64]| -> Vec<LeaderCommand> {
            let view = LeaderView {
                state: s,
                autopilot: autopilot(&[1, 2, 3], learners, &[]),
                mesh_cidr: CIDR,
                now_ms: 5_000,
                cluster_key: "0000000b".into(),
                sealed_with_accepted: ["munge-key".to_string()].into(),
            };
            leader_tick(&view, &HealthTuning::default())
                .into_iter()
                .filter(|c| matches!(c, LeaderCommand::Reseal { .. }))
                .collect()
        };
        for id in 1..=3 {
            holds(&mut state, id, &["0000000a", "0000000b"]);
        }
        holds(&mut state, 3, &["0000000a"]);
        assert_eq!(reseals(&state, &[]), [], "node 3 does not hold the new secret yet");
        holds(&mut state, 3, &["0000000a", "0000000b"]);
        assert_eq!(reseals(&state, &[]), [LeaderCommand::Reseal { name: "munge-key".into() }]);
        assert_eq!(reseals(&state, &[4]), [], "learner 4 has not even registered");
        holds(&mut state, 1, &["0000000b"]);
        holds(&mut state, 2, &["0000000b"]);
        assert_eq!(reseals(&state, &[]).len(), 1, "the old secret dropped already: still sealed again");
    }

    #[test]
    fn leader_decisions_as_a_table() {
        let t = HealthTuning::default();
        let suspect = t.suspect_after().as_millis() as u64;
        let failed = t.failed_after().as_millis() as u64;
        let gone = t.remove_after().as_millis() as u64;
        type Case = (&'static str, fn(&mut ClusterState), AutopilotView, (Ipv4Addr, u8), Vec<LeaderCommand>);
        let cases: Vec<Case> = vec![
            ("a settled cluster: nothing to do", |_| {}, autopilot(&[1, 2, 3], &[], &[]), CIDR, vec![]),
            (
                "a new cluster: named first, then its secrets",
                |s| {
                    s.cluster_id = None;
                    s.secrets.clear();
                },
                autopilot(&[1, 2, 3], &[], &[]),
                CIDR,
                vec![
                    LeaderCommand::InitCluster,
                    LeaderCommand::CreateSecret { name: crate::core::secrets::MUNGE_KEY },
                    LeaderCommand::CreateSecret { name: crate::core::secrets::K3S_TOKEN },
                ],
            ),
            (
                "a member without a mesh address gets the lowest free one",
                |s| {
                    s.members.insert(NodeId(4), member(4, Health::Alive, None));
                    s.members.get_mut(&NodeId(2)).unwrap().mesh_ip = Some(Ipv4Addr::new(10, 90, 0, 5));
                },
                autopilot(&[1, 2, 3], &[4], &[]),
                CIDR,
                vec![
                    LeaderCommand::Commit(Command::AssignMeshIp { id: NodeId(4), ip: Ipv4Addr::new(10, 90, 0, 2) }),
                    LeaderCommand::Commit(Command::SetRoles {
                        roles: RoleAssignments {
                            slurm_workers: [1, 2, 3, 4].map(NodeId).into(),
                            k3s_agents: [2, 3, 4].map(NodeId).into(),
                            ..settled().roles
                        },
                    }),
                ],
            ),
            (
                "a full mesh network: said once, nothing committed for it",
                |s| {
                    s.members.insert(NodeId(4), member(4, Health::Alive, None));
                    s.members.insert(NodeId(5), member(5, Health::Alive, None));
                    s.roles = crate::core::roles::schedule(&s.members, &s.roles);
                },
                autopilot(&[1, 2, 3], &[4, 5], &[]),
                (Ipv4Addr::new(10, 90, 0, 0), 30),
                vec![LeaderCommand::MeshFull { id: NodeId(4) }],
            ),
            (
                "a silent member turns suspect; the leader itself is always alive",
                |s| s.members.get_mut(&ME).unwrap().health = Health::Suspect,
                autopilot(&[1, 2, 3], &[], &[(3, suspect)]),
                CIDR,
                vec![
                    LeaderCommand::Commit(Command::SetHealth { id: ME, health: Health::Alive, at_ms: 5_000 }),
                    LeaderCommand::Commit(Command::SetHealth { id: NodeId(3), health: Health::Suspect, at_ms: 5_000 }),
                ],
            ),
            (
                "a failed controller: the backup takes the role, the health is committed, a learner replaces it",
                |s| {
                    s.members.insert(NodeId(4), member(4, Health::Alive, Some([10, 90, 0, 4])));
                    s.roles = crate::core::roles::schedule(&s.members, &s.roles);
                    s.members.get_mut(&ME).unwrap().health = Health::Failed;
                },
                autopilot(&[1, 2, 3], &[4], &[]),
                CIDR,
                vec![
                    LeaderCommand::Commit(Command::SetRoles {
                        roles: RoleAssignments {
                            slurm_controller: Some(NodeId(2)),
                            slurm_backup: Some(NodeId(3)),
                            slurm_workers: [2, 3, 4].map(NodeId).into(),
                            k3s_server: Some(NodeId(2)),
                            k3s_agents: [3, 4].map(NodeId).into(),
                        },
                    }),
                    LeaderCommand::Commit(Command::SetHealth { id: ME, health: Health::Alive, at_ms: 5_000 }),
                ],
            ),
            (
                "a failed voter and a caught-up learner: replaced",
                |s| {
                    s.members.insert(NodeId(4), member(4, Health::Alive, Some([10, 90, 0, 4])));
                    s.members.get_mut(&NodeId(3)).unwrap().health = Health::Failed;
                    s.roles = crate::core::roles::schedule(&s.members, &s.roles);
                },
                autopilot(&[1, 2, 3], &[4], &[(3, failed)]),
                CIDR,
                vec![LeaderCommand::Membership(MembershipAction::Replace { failed: NodeId(3), learner: NodeId(4) })],
            ),
            (
                "a member silent past the grace period: removed",
                |s| {
                    s.members.get_mut(&NodeId(3)).unwrap().health = Health::Failed;
                    s.roles = crate::core::roles::schedule(&s.members, &s.roles);
                },
                autopilot(&[1, 2, 3], &[], &[(3, gone)]),
                CIDR,
                vec![LeaderCommand::Membership(MembershipAction::Remove { id: NodeId(3) })],
            ),
            (
                "a member that left keeps its health",
                |s| {
                    s.members.get_mut(&NodeId(3)).unwrap().health = Health::Left;
                    s.roles = crate::core::roles::schedule(&s.members, &s.roles);
                },
                autopilot(&[1, 2], &[], &[(3, gone)]),
                CIDR,
                vec![],
            ),
        ];
        for (name, edit, ap, cidr, want) in cases {
            let mut s = settled();
            edit(&mut s);
            assert_eq!(tick(&s, ap, cidr), want, "{name}");
        }
    }

    #[test]
    fn every_command_is_described_for_the_journal() {
        let all = [
            LeaderCommand::InitCluster,
            LeaderCommand::CreateSecret { name: "munge-key" },
            LeaderCommand::Commit(Command::AssignMeshIp { id: NodeId(4), ip: Ipv4Addr::new(10, 90, 0, 2) }),
            LeaderCommand::Commit(Command::SetHealth { id: NodeId(3), health: Health::Failed, at_ms: 0 }),
            LeaderCommand::Commit(Command::SetRoles { roles: settled().roles }),
            LeaderCommand::MeshFull { id: NodeId(4) },
            LeaderCommand::Membership(MembershipAction::Remove { id: NodeId(3) }),
        ];
        let lines: Vec<String> = all.iter().map(LeaderCommand::describe).collect();
        assert_eq!(
            lines,
            [
                "naming the cluster",
                "generating cluster secret munge-key",
                "assigning mesh address 10.90.0.2 to 0000000000000004",
                "member 0000000000000003 is now failed",
                "role assignments changed: slurm controller 0000000000000001, backup 0000000000000002, k3s server 0000000000000001",
                "the mesh network is full: no address for 0000000000000004",
                "autopilot membership change: Remove { id: 0000000000000003 }",
            ]
        );
    }
}
