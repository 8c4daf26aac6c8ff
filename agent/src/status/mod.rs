//! What `clusteros status`, `members` and `raft` show: one report, built from the node's applied
//! state, Raft metrics and its loops' last reports, serialized for `--json`, and rendered as text
//! for people by [`text`] (checked against golden files in `testdata/`).
//!
//! Must not: change anything (a report is read-only), or be used by the runtime (status sits above
//! it).

mod text;
pub use text::{render_members, render_mesh, render_raft, render_roles, render_services, render_status};

use serde::{Deserialize, Serialize};

use crate::core::state::{Health, NodeId};
use crate::runtime::{Node, Phase};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct NodeReport {
    pub id: Option<String>,
    pub name: String,
    pub api_addr: Option<String>,
    pub version: String,
    /// The public node key that signs this node's peer requests.
    #[serde(default)]
    pub node_key: Option<String>,
    /// Fingerprints of the cluster secrets this node holds: the one it signs with first, then
    /// those it also accepts (while the cluster secret is rotated).
    #[serde(default)]
    pub cluster_keys: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReplicationReport {
    pub id: String,
    pub name: Option<String>,
    pub matched_index: Option<u64>,
    /// Entries the follower is behind the leader's log.
    pub lag: Option<u64>,
    /// Since the leader's last successful Raft RPC with it (ms); None: none in this term.
    #[serde(default)]
    pub last_contact_ms: Option<u64>,
    /// It answered within the shortest election timeout (see [`Node::unreachable_followers`]).
    #[serde(default = "yes")]
    pub reachable: bool,
}

fn yes() -> bool {
    true
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RaftReport {
    /// leader, follower, candidate, learner or shutdown.
    pub state: String,
    pub term: u64,
    pub leader_id: Option<String>,
    pub leader_name: Option<String>,
    pub last_log_index: Option<u64>,
    pub commit_index: Option<u64>,
    pub applied_index: Option<u64>,
    pub snapshot_index: Option<u64>,
    pub purged_index: Option<u64>,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    /// Only on the leader.
    pub replication: Vec<ReplicationReport>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    pub id: String,
    pub name: Option<String>,
    /// The node's own (underlay) address: where it joined from and its WireGuard endpoint.
    pub api_addr: String,
    /// The address Raft and the peer API use for it: its mesh address once it answers there.
    #[serde(default)]
    pub raft_addr: String,
    pub mesh_ip: Option<std::net::Ipv4Addr>,
    /// voter or learner.
    pub role: String,
    pub health: Option<Health>,
    pub health_since_ms: Option<u64>,
    pub cpus: Option<u32>,
    pub memory_mb: Option<u64>,
    pub is_leader: bool,
    pub is_self: bool,
    /// Its node key as the Raft membership records it.
    #[serde(default)]
    pub node_key: String,
    /// Fingerprints of the cluster secrets it holds, as its member record reports them.
    #[serde(default)]
    pub cluster_keys: Vec<String>,
}

impl MemberReport {
    /// "mesh" when Raft reaches the member over its mesh address, else "underlay".
    pub fn raft_via(&self) -> &'static str {
        match self.mesh_ip {
            Some(ip) if self.raft_addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip() == ip) => "mesh",
            _ => "underlay",
        }
    }
}

/// Role holders by name (id when a holder has no record yet).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct RolesReport {
    pub slurm_controller: Option<String>,
    pub slurm_backup: Option<String>,
    pub slurm_workers: Vec<String>,
    pub k3s_server: Option<String>,
    pub k3s_agents: Vec<String>,
}

/// A secret's name and version; never its value.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SecretReport {
    pub name: String,
    pub version: u64,
    pub changed_at_ms: u64,
    /// Which of this node's cluster secrets opens it: "current", "accepted" (sealed with the
    /// other secret of a rotation; the leader seals it again once every member holds its
    /// secret) or "none" (this node cannot open it: give it the cluster secret the others use).
    #[serde(default)]
    pub sealed_with: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StatusReport {
    pub node: NodeReport,
    /// False when the agent cannot form or join a cluster (see `problems`).
    pub configured: bool,
    pub phase: Option<Phase>,
    pub phase_detail: Option<String>,
    /// Things a person must fix, each with what to do.
    pub problems: Vec<String>,
    pub last_error: Option<String>,
    pub cluster_id: Option<String>,
    pub raft: Option<RaftReport>,
    pub members: Vec<MemberReport>,
    pub roles: Option<RolesReport>,
    pub secrets: Vec<SecretReport>,
    /// This node's services; `None` when the agent does not manage services here.
    pub services: Option<crate::adapters::services::ServiceReport>,
    /// This node's WireGuard interface; `None` when the agent does not manage the mesh here.
    pub mesh: Option<crate::runtime::MeshReport>,
    /// SLURM state replication on this node (the controller publishes, the backup installs).
    #[serde(default)]
    pub slurm_state: Option<crate::runtime::SlurmStateReport>,
    /// LAN beacons: what this node sent and heard, and the nodes of other clusters it heard
    /// (neighbours); `None` with beacons off.
    #[serde(default)]
    pub beacons: Option<crate::runtime::beacon::BeaconReport>,
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The report of an agent that has no cluster secret (or another blocking problem).
pub fn unconfigured(name: &str, problems: Vec<String>) -> StatusReport {
    StatusReport {
        node: NodeReport {
            id: None,
            name: name.into(),
            api_addr: None,
            version: VERSION.into(),
            node_key: None,
            cluster_keys: Vec::new(),
        },
        configured: false,
        phase: None,
        phase_detail: None,
        problems,
        last_error: None,
        cluster_id: None,
        raft: None,
        members: Vec::new(),
        roles: None,
        secrets: Vec::new(),
        services: None,
        mesh: None,
        slurm_state: None,
        beacons: None,
    }
}

/// What a report is made of, read from a node at one moment (see [`report`]); [`build`] turns
/// it into the report without looking at anything else.
#[derive(Debug, Clone)]
pub struct ReportInputs {
    pub me: NodeId,
    pub name: String,
    /// This node's public node key and its cluster key fingerprints (see [`NodeReport`]).
    pub node_key: String,
    pub cluster_keys: Vec<String>,
    pub api_addr: String,
    pub metrics: crate::core::raft_types::RaftMetrics,
    /// The log's commit index (openraft's metrics do not carry it).
    pub commit_index: Option<u64>,
    pub progress: crate::runtime::Progress,
    pub cluster_id: Option<String>,
    pub records: std::collections::BTreeMap<NodeId, crate::core::state::Member>,
    pub roles: crate::core::state::RoleAssignments,
    pub secrets: Vec<SecretReport>,
    /// Followers the leader has not heard from within the shortest election timeout.
    pub unreachable: std::collections::BTreeSet<NodeId>,
    /// Since the leader's last successful Raft RPC with each follower, in ms.
    pub contact_ms: std::collections::BTreeMap<NodeId, u64>,
    pub services: Option<crate::adapters::services::ServiceReport>,
    pub mesh: Option<crate::runtime::MeshReport>,
    pub slurm_state: Option<crate::runtime::SlurmStateReport>,
    pub beacons: Option<crate::runtime::beacon::BeaconReport>,
}

/// The report of a running node.
pub fn report(agent: &Node) -> StatusReport {
    let metrics = agent.metrics();
    let (cluster_id, records, roles, secrets) = agent.state.read(|d| {
        let secrets = d
            .state
            .secrets
            .iter()
            .map(|(n, s)| SecretReport {
                name: n.clone(),
                version: s.version,
                changed_at_ms: s.changed_at_ms,
                sealed_with: Some(
                    match agent.secret_box.open_with(n, &s.value) {
                        Ok((_, crate::adapters::secrets::SealedWith::Current)) => "current",
                        Ok((_, crate::adapters::secrets::SealedWith::Accepted)) => "accepted",
                        Err(_) => "none",
                    }
                    .into(),
                ),
            })
            .collect::<Vec<_>>();
        (d.state.cluster_id.clone(), d.state.members.clone(), d.state.roles.clone(), secrets)
    });
    let followers = metrics.replication.as_ref().map(|r| r.keys().copied().collect::<Vec<_>>()).unwrap_or_default();
    build(ReportInputs {
        me: agent.id(),
        name: agent.identity.name.clone(),
        node_key: agent.identity.node_key().public(),
        cluster_keys: agent.gate.keys.fingerprints(),
        api_addr: agent.api_addr.clone(),
        commit_index: agent.log.committed_index(),
        progress: agent.progress(),
        cluster_id,
        records,
        roles,
        secrets,
        unreachable: agent.unreachable_followers(&metrics),
        contact_ms: followers
            .into_iter()
            .filter_map(|id| agent.leader_contact_age(id).map(|d| (id, d.as_millis() as u64)))
            .collect(),
        services: agent.services.lock().expect("services lock").clone(),
        mesh: agent.mesh.lock().expect("mesh lock").clone(),
        slurm_state: agent.slurm_state.lock().expect("slurm state lock").clone(),
        beacons: agent.beacon_report(),
        metrics,
    })
}

/// The report made of `inputs`: pure (golden-tested in `testdata/leader-report.json`).
pub fn build(inputs: ReportInputs) -> StatusReport {
    let ReportInputs {
        me,
        name,
        node_key,
        cluster_keys,
        api_addr,
        metrics: m,
        commit_index,
        progress,
        cluster_id,
        records,
        roles,
        secrets,
        unreachable,
        contact_ms,
        services,
        mesh,
        slurm_state,
        beacons,
    } = inputs;
    let membership = m.membership_config.membership().clone();
    let name_of = |id: NodeId| records.get(&id).map(|r| r.spec.name.clone());
    let display_name = |id: NodeId| name_of(id).unwrap_or_else(|| id.to_string());
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let learners: Vec<NodeId> = membership.learner_ids().collect();
    let last = m.last_log_index;
    let replication = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != me)
                .map(|(id, l)| ReplicationReport {
                    id: id.to_string(),
                    name: name_of(*id),
                    matched_index: l.map(|l| l.index),
                    lag: last.map(|last| last.saturating_sub(l.map_or(0, |l| l.index))),
                    last_contact_ms: contact_ms.get(id).copied(),
                    reachable: !unreachable.contains(id),
                })
                .collect()
        })
        .unwrap_or_default();
    let state = match m.state {
        openraft::ServerState::Leader => "leader",
        openraft::ServerState::Follower => "follower",
        openraft::ServerState::Candidate => "candidate",
        openraft::ServerState::Learner => "learner",
        openraft::ServerState::Shutdown => "shutdown",
    };
    let raft = RaftReport {
        state: state.into(),
        term: m.current_term,
        leader_id: m.current_leader.map(|i| i.to_string()),
        leader_name: m.current_leader.and_then(name_of),
        last_log_index: last,
        commit_index,
        applied_index: m.last_applied.map(|l| l.index),
        snapshot_index: m.snapshot.map(|l| l.index),
        purged_index: m.purged.map(|l| l.index),
        voters: voters.iter().map(|i| i.to_string()).collect(),
        learners: learners.iter().map(|i| i.to_string()).collect(),
        replication,
    };
    let members = membership
        .nodes()
        .map(|(id, node)| {
            let rec = records.get(id);
            MemberReport {
                id: id.to_string(),
                name: rec.map(|r| r.spec.name.clone()),
                api_addr: rec.map_or_else(|| node.addr.clone(), |r| r.spec.api_addr.clone()),
                raft_addr: node.addr.clone(),
                mesh_ip: rec.and_then(|r| r.mesh_ip),
                role: if voters.contains(id) { "voter" } else { "learner" }.into(),
                health: rec.map(|r| r.health),
                health_since_ms: rec.map(|r| r.health_since_ms),
                cpus: rec.map(|r| r.spec.facts.cpus),
                memory_mb: rec.map(|r| r.spec.facts.memory_mb),
                is_leader: m.current_leader == Some(*id),
                is_self: *id == me,
                node_key: node.node_key.clone(),
                cluster_keys: rec.map(|r| r.spec.cluster_keys.clone()).unwrap_or_default(),
            }
        })
        .collect();
    StatusReport {
        node: NodeReport {
            id: Some(me.to_string()),
            name,
            api_addr: Some(api_addr),
            version: VERSION.into(),
            node_key: Some(node_key),
            cluster_keys,
        },
        configured: true,
        phase: Some(progress.phase),
        phase_detail: Some(progress.detail),
        problems: Vec::new(),
        last_error: progress.last_error,
        cluster_id,
        raft: Some(raft),
        members,
        roles: Some(RolesReport {
            slurm_controller: roles.slurm_controller.map(display_name),
            slurm_backup: roles.slurm_backup.map(display_name),
            slurm_workers: roles.slurm_workers.iter().map(|i| display_name(*i)).collect(),
            k3s_server: roles.k3s_server.map(display_name),
            k3s_agents: roles.k3s_agents.iter().map(|i| display_name(*i)).collect(),
        }),
        secrets,
        services,
        mesh,
        slurm_state,
        beacons,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Arc;

    use crate::core::raft_types::PeerNode;
    use openraft::{CommittedLeaderId, LogId, Membership, StoredMembership};

    use super::*;
    use crate::core::state::{Member, MemberSpec, NodeFacts, RoleAssignments};
    use crate::runtime::Progress;

    fn log(index: u64) -> Option<LogId<NodeId>> {
        Some(LogId::new(CommittedLeaderId::new(4, NodeId(0xa001)), index))
    }

    fn member(id: u64, name: &str, mesh: Option<[u8; 4]>, health: Health) -> (NodeId, Member) {
        let id = NodeId(id);
        let spec = MemberSpec {
            id,
            name: name.into(),
            api_addr: format!("192.168.50.{}:7600", 10 + (id.0 & 0xf)),
            wg_public_key: crate::core::state::test_wg_key(id.0),
            facts: NodeFacts { cpus: 2, memory_mb: 1984, kernel: "6.12.48".into(), arch: "x86_64".into() },
            labels: BTreeMap::new(),
            cluster_keys: Vec::new(),
        };
        let mesh_ip = mesh.map(std::net::Ipv4Addr::from);
        (id, Member { spec, mesh_ip, health, health_since_ms: 1_700_000_000_000, registered_at_ms: 1_699_999_990_000 })
    }

    /// The leader of three voters and a learner: node2 replicates over the mesh and is current,
    /// node3 is behind and unreachable, node4 is a learner that has not registered yet.
    fn leader_inputs() -> ReportInputs {
        let (n1, n2, n3, n4) = (NodeId(0xa001), NodeId(0xa002), NodeId(0xa003), NodeId(0xa004));
        let nodes = BTreeMap::from([
            (n1, PeerNode::new("10.90.0.1:7600", crate::core::auth::NodeKey::from_seed(&[1; 32]).public())),
            (n2, PeerNode::new("10.90.0.2:7600", crate::core::auth::NodeKey::from_seed(&[2; 32]).public())),
            (n3, PeerNode::new("192.168.50.13:7600", crate::core::auth::NodeKey::from_seed(&[3; 32]).public())),
            (n4, PeerNode::new("192.168.50.14:7600", crate::core::auth::NodeKey::from_seed(&[4; 32]).public())),
        ]);
        let membership = Membership::new(vec![BTreeSet::from([n1, n2, n3])], nodes);
        let mut metrics = crate::core::raft_types::RaftMetrics::new_initial(n1);
        metrics.state = openraft::ServerState::Leader;
        metrics.current_term = 4;
        metrics.current_leader = Some(n1);
        metrics.last_log_index = Some(120);
        metrics.last_applied = log(118);
        metrics.snapshot = log(100);
        metrics.purged = log(90);
        metrics.membership_config = Arc::new(StoredMembership::new(log(7), membership));
        metrics.replication = Some(BTreeMap::from([(n1, log(120)), (n2, log(120)), (n3, log(96)), (n4, None)]));
        ReportInputs {
            me: n1,
            name: "node1".into(),
            node_key: crate::core::auth::NodeKey::from_seed(&[1; 32]).public(),
            cluster_keys: vec!["1c2d3e4f".into(), "5a6b7c8d".into()],
            api_addr: "192.168.50.11:7600".into(),
            metrics,
            commit_index: Some(119),
            progress: Progress { phase: Phase::Member, detail: "leader of 3 voters".into(), last_error: None },
            cluster_id: Some("c0ffee".into()),
            records: BTreeMap::from([
                member(0xa001, "node1", Some([10, 90, 0, 1]), Health::Alive),
                member(0xa002, "node2", Some([10, 90, 0, 2]), Health::Alive),
                member(0xa003, "node3", Some([10, 90, 0, 3]), Health::Suspect),
            ]),
            roles: RoleAssignments {
                slurm_controller: Some(n1),
                slurm_backup: Some(n2),
                slurm_workers: BTreeSet::from([n1, n2, n3, n4]),
                k3s_server: None,
                k3s_agents: BTreeSet::new(),
            },
            secrets: vec![SecretReport {
                name: "munge.key".into(),
                version: 2,
                changed_at_ms: 1_700_000_100_000,
                sealed_with: Some("current".into()),
            }],
            unreachable: BTreeSet::from([n3]),
            contact_ms: BTreeMap::from([(n2, 40), (n3, 9_500)]),
            services: None,
            mesh: None,
            slurm_state: None,
            beacons: None,
        }
    }

    #[test]
    fn the_report_is_built_as_in_the_golden_file() {
        let report = build(leader_inputs());
        let json = serde_json::to_string_pretty(&report).unwrap() + "\n";
        crate::core::render::check_golden_in("src/status/testdata", "leader-report.json", &json);
    }

    #[test]
    fn the_builder_names_members_by_record_and_falls_back_to_ids() {
        let r = build(leader_inputs());
        let raft = r.raft.as_ref().unwrap();
        assert_eq!((raft.voters.len(), raft.learners.len()), (3, 1));
        let n3 = raft.replication.iter().find(|f| f.name.as_deref() == Some("node3")).unwrap();
        assert_eq!((n3.lag, n3.reachable, n3.last_contact_ms), (Some(24), false, Some(9_500)));
        assert!(
            raft.replication.iter().all(|f| f.id != NodeId(0xa001).to_string()),
            "the leader is not its own follower"
        );
        let n4 = r.members.iter().find(|m| m.id == NodeId(0xa004).to_string()).unwrap();
        assert_eq!(
            (n4.name.as_deref(), n4.role.as_str(), n4.api_addr.as_str()),
            (None, "learner", "192.168.50.14:7600")
        );
        let vias: Vec<_> = r.members.iter().map(|m| m.raft_via()).collect();
        assert_eq!(vias, ["mesh", "mesh", "underlay", "underlay"]);
        let roles = r.roles.unwrap();
        assert_eq!(roles.slurm_workers, ["node1", "node2", "node3", NodeId(0xa004).to_string().as_str()]);
        assert!(r.members.iter().filter(|m| m.is_self).all(|m| m.is_leader && m.name.as_deref() == Some("node1")));
    }
}
