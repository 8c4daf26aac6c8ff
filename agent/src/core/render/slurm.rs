//! `slurm.conf`, rendered from the role assignments and the members' facts.

use std::fmt;
use std::net::Ipv4Addr;

use super::RenderError;
use crate::core::state::{ClusterState, NodeId};

pub const PATH: &str = "/etc/slurm/slurm.conf";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmHost {
    pub name: String,
    pub addr: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmNode {
    pub name: String,
    pub addr: Ipv4Addr,
    pub cpus: u32,
    /// MiB given to SLURM: a little below the node's memory, so slurmd never finds less than
    /// configured and drains itself.
    pub real_memory_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmConf {
    pub cluster_name: String,
    /// The controller, then the backup. Never empty.
    pub controllers: Vec<SlurmHost>,
    pub nodes: Vec<SlurmNode>,
    pub partition: String,
}

fn valid_name(n: &str) -> bool {
    !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl SlurmConf {
    /// Builds the config from the cluster state: controllers and workers from the role
    /// assignments, addresses on the mesh, CPUs and memory as each node reported them.
    pub fn from_state(s: &ClusterState) -> Result<SlurmConf, RenderError> {
        let host = |id: NodeId| -> Result<(String, Ipv4Addr), RenderError> {
            let m = s.members.get(&id).ok_or_else(|| RenderError::UnknownMember(format!("{id}")))?;
            if !valid_name(&m.spec.name) {
                return Err(RenderError::BadNodeName(m.spec.name.clone()));
            }
            let ip = m.mesh_ip.ok_or_else(|| RenderError::NoMeshAddress(m.spec.name.clone()))?;
            Ok((m.spec.name.clone(), ip))
        };
        // The backup's standby slurmctld works from a copy of the controller's StateSaveLocation
        // that the agent replicates (see slurm_state); when the controller fails, the backup takes
        // over and the agent then names it first here.
        let primary = s.roles.slurm_controller.ok_or(RenderError::NoController)?;
        let mut controllers = Vec::new();
        for id in std::iter::once(primary).chain(s.roles.slurm_backup) {
            let (name, addr) = host(id)?;
            controllers.push(SlurmHost { name, addr });
        }
        let mut nodes = Vec::new();
        for id in &s.roles.slurm_workers {
            let (name, addr) = host(*id)?;
            let f = &s.members[id].spec.facts;
            nodes.push(SlurmNode {
                name,
                addr,
                cpus: f.cpus.max(1),
                real_memory_mb: (f.memory_mb - f.memory_mb / 20).max(1),
            });
        }
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(SlurmConf { cluster_name: "clusteros".into(), controllers, nodes, partition: "main".into() })
    }
}

impl fmt::Display for SlurmConf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# Managed by clusteros from the replicated cluster state; local changes are overwritten.")?;
        writeln!(f, "ClusterName={}", self.cluster_name)?;
        for c in &self.controllers {
            writeln!(f, "SlurmctldHost={}({})", c.name, c.addr)?;
        }
        for line in [
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "SlurmUser=slurm",
            "SlurmdUser=root",
            "StateSaveLocation=/var/lib/slurm/slurmctld",
            "SlurmdSpoolDir=/var/lib/slurm/slurmd",
            "SlurmctldPidFile=/run/slurmctld.pid",
            "SlurmdPidFile=/run/slurmd.pid",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmctldTimeout=20",
            "SlurmdTimeout=60",
            // Slow or emulated nodes: SLURM's defaults (10 s, 2 s) time out RPCs on busy VMs.
            "MessageTimeout=30",
            "TCPTimeout=10",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobCompType=jobcomp/none",
            "SlurmctldLogFile=/var/log/slurm/slurmctld.log",
            "SlurmdLogFile=/var/log/slurm/slurmd.log",
        ] {
            writeln!(f, "{line}")?;
        }
        for n in &self.nodes {
            writeln!(
                f,
                "NodeName={} NodeAddr={} CPUs={} RealMemory={} State=UNKNOWN",
                n.name, n.addr, n.cpus, n.real_memory_mb
            )?;
        }
        if !self.nodes.is_empty() {
            writeln!(f, "PartitionName={} Nodes=ALL Default=YES MaxTime=INFINITE State=UP", self.partition)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::core::render::check_golden;
    use crate::core::state::{Command, MemberSpec, NodeFacts, RoleAssignments};

    pub(crate) fn three_node_state() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply_membership([NodeId(1), NodeId(2), NodeId(3)].into(), BTreeSet::new());
        for id in 1..=3u64 {
            let spec = MemberSpec {
                id: NodeId(id),
                name: format!("node{}", id),
                api_addr: format!("10.77.0.{}:7600", 10 + id),
                wg_public_key: crate::core::state::test_wg_key(id),
                facts: NodeFacts {
                    cpus: id as u32,
                    memory_mb: 1000 * id,
                    kernel: "6.12".into(),
                    arch: "x86_64".into(),
                },
                labels: BTreeMap::new(),
                cluster_keys: Vec::new(),
            };
            s.apply(id, &Command::UpsertMember { spec, at_ms: 0 });
            s.apply(10 + id, &Command::AssignMeshIp { id: NodeId(id), ip: format!("10.90.0.{}", id).parse().unwrap() });
        }
        s
    }

    #[test]
    fn renders_controller_backup_and_nodes() {
        let mut s = three_node_state();
        s.apply(
            20,
            &Command::SetRoles {
                roles: RoleAssignments {
                    slurm_controller: Some(NodeId(2)),
                    slurm_backup: Some(NodeId(1)),
                    slurm_workers: [NodeId(1), NodeId(2), NodeId(3)].into(),
                    ..Default::default()
                },
            },
        );
        check_golden("slurm.conf.golden", &SlurmConf::from_state(&s).unwrap().to_string());
    }

    #[test]
    fn never_renders_an_empty_slurmctld_host() {
        let s = three_node_state();
        assert_eq!(SlurmConf::from_state(&s), Err(RenderError::NoController));
    }

    #[test]
    fn members_without_mesh_address_are_not_rendered() {
        let mut s = three_node_state();
        s.members.get_mut(&NodeId(3)).unwrap().mesh_ip = None;
        s.apply(
            20,
            &Command::SetRoles {
                roles: RoleAssignments {
                    slurm_controller: Some(NodeId(1)),
                    slurm_workers: [NodeId(1), NodeId(3)].into(),
                    ..Default::default()
                },
            },
        );
        assert_eq!(SlurmConf::from_state(&s), Err(RenderError::NoMeshAddress("node3".into())));
    }
}
