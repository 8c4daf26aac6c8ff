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
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The report of an agent that has no cluster secret (or another blocking problem).
pub fn unconfigured(name: &str, problems: Vec<String>) -> StatusReport {
    StatusReport {
        node: NodeReport { id: None, name: name.into(), api_addr: None, version: VERSION.into() },
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
    }
}

pub fn report(agent: &Node) -> StatusReport {
    let m = agent.metrics();
    let progress = agent.progress();
    let membership = m.membership_config.membership().clone();
    let (cluster_id, records, roles, secrets) = agent.state.read(|d| {
        let secrets = d
            .state
            .secrets
            .iter()
            .map(|(n, s)| SecretReport { name: n.clone(), version: s.version, changed_at_ms: s.changed_at_ms })
            .collect::<Vec<_>>();
        (d.state.cluster_id.clone(), d.state.members.clone(), d.state.roles.clone(), secrets)
    });
    let name_of = |id: NodeId| records.get(&id).map(|r| r.spec.name.clone());
    let display_name = |id: NodeId| name_of(id).unwrap_or_else(|| id.to_string());
    let voters: Vec<NodeId> = membership.voter_ids().collect();
    let learners: Vec<NodeId> = membership.learner_ids().collect();
    let last = m.last_log_index;
    let unreachable = agent.unreachable_followers(&m);
    let replication = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .filter(|(id, _)| **id != agent.id())
                .map(|(id, l)| ReplicationReport {
                    id: id.to_string(),
                    name: name_of(*id),
                    matched_index: l.map(|l| l.index),
                    lag: last.map(|last| last.saturating_sub(l.map_or(0, |l| l.index))),
                    last_contact_ms: agent.leader_contact_age(*id).map(|d| d.as_millis() as u64),
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
        commit_index: agent.log.committed_index(),
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
                is_self: *id == agent.id(),
            }
        })
        .collect();
    StatusReport {
        node: NodeReport {
            id: Some(agent.id().to_string()),
            name: agent.identity.name.clone(),
            api_addr: Some(agent.api_addr.clone()),
            version: VERSION.into(),
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
        services: agent.services.lock().expect("services lock").clone(),
        mesh: agent.mesh.lock().expect("mesh lock").clone(),
        slurm_state: agent.slurm_state.lock().expect("slurm state lock").clone(),
    }
}
