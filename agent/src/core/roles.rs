//! The role scheduler (pure, run by the leader): who runs the SLURM controller and its backup, the
//! SLURM workers, the k3s server and the k3s agents. Assignments are stable: a holder keeps its
//! role while it is alive or merely suspect, and a role moves only when its holder has failed,
//! left, or is no longer eligible.
//!
//! Labels steer it: `role.<role>=never` excludes a node from a role, `role.<role>=prefer` puts it
//! first; roles are `slurm-controller`, `slurm-worker`, `k3s-server`, `k3s-agent`.

use std::collections::{BTreeMap, BTreeSet};

use crate::core::state::{Health, Member, NodeId, RoleAssignments};

pub const SLURM_CONTROLLER: &str = "slurm-controller";
pub const SLURM_WORKER: &str = "slurm-worker";
pub const K3S_SERVER: &str = "k3s-server";
pub const K3S_AGENT: &str = "k3s-agent";

fn label<'a>(m: &'a Member, role: &str) -> Option<&'a str> {
    m.spec.labels.get(&format!("role.{role}")).map(String::as_str)
}

fn usable(m: &Member) -> bool {
    matches!(m.health, Health::Alive | Health::Suspect)
}

fn eligible(m: &Member, role: &str) -> bool {
    usable(m) && label(m, role) != Some("never")
}

/// Candidates for a single-holder role, best first: preferred, then healthy over suspect, then
/// longest registered, then lowest id (deterministic).
fn ranked<'a>(members: &'a BTreeMap<NodeId, Member>, role: &str, exclude: &[Option<NodeId>]) -> Vec<&'a Member> {
    let mut v: Vec<&Member> =
        members.values().filter(|m| eligible(m, role) && !exclude.contains(&Some(m.spec.id))).collect();
    v.sort_by_key(|m| (label(m, role) != Some("prefer"), m.health != Health::Alive, m.registered_at_ms, m.spec.id));
    v
}

fn keep(members: &BTreeMap<NodeId, Member>, holder: Option<NodeId>, role: &str) -> Option<NodeId> {
    holder.filter(|id| members.get(id).is_some_and(|m| eligible(m, role)))
}

/// The next assignments from the members (with their health and labels) and the current ones.
pub fn schedule(members: &BTreeMap<NodeId, Member>, current: &RoleAssignments) -> RoleAssignments {
    let mut controller = keep(members, current.slurm_controller, SLURM_CONTROLLER);
    let mut backup = keep(members, current.slurm_backup, SLURM_CONTROLLER).filter(|b| Some(*b) != controller);
    if controller.is_none() {
        // The backup has been standing by: it takes over, and a new backup is chosen.
        controller = backup.take().or_else(|| ranked(members, SLURM_CONTROLLER, &[]).first().map(|m| m.spec.id));
    }
    if backup.is_none() {
        backup = ranked(members, SLURM_CONTROLLER, &[controller]).first().map(|m| m.spec.id);
    }
    let k3s_server = keep(members, current.k3s_server, K3S_SERVER)
        .or_else(|| ranked(members, K3S_SERVER, &[]).first().map(|m| m.spec.id));
    let slurm_workers: BTreeSet<NodeId> =
        members.values().filter(|m| eligible(m, SLURM_WORKER)).map(|m| m.spec.id).collect();
    let k3s_agents: BTreeSet<NodeId> = members
        .values()
        .filter(|m| eligible(m, K3S_AGENT) && Some(m.spec.id) != k3s_server)
        .map(|m| m.spec.id)
        .collect();
    RoleAssignments { slurm_controller: controller, slurm_backup: backup, slurm_workers, k3s_server, k3s_agents }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::state::{MemberSpec, NodeFacts};

    fn member(id: NodeId, health: Health, labels: &[(&str, &str)]) -> Member {
        Member {
            spec: MemberSpec {
                id,
                name: format!("n{}", id.0),
                api_addr: format!("10.0.0.{}:7600", id.0),
                wg_public_key: crate::core::state::test_wg_key(id.0),
                facts: NodeFacts::default(),
                labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                cluster_keys: Vec::new(),
            },
            mesh_ip: None,
            health,
            health_since_ms: 0,
            registered_at_ms: id.0 * 10,
        }
    }

    fn members(list: Vec<Member>) -> BTreeMap<NodeId, Member> {
        list.into_iter().map(|m| (m.spec.id, m)).collect()
    }

    #[test]
    fn first_assignment_is_deterministic_and_distinct() {
        let m = members(vec![
            member(NodeId(3), Health::Alive, &[]),
            member(NodeId(1), Health::Alive, &[]),
            member(NodeId(2), Health::Alive, &[]),
        ]);
        let r = schedule(&m, &RoleAssignments::default());
        assert_eq!(r.slurm_controller, Some(NodeId(1)));
        assert_eq!(r.slurm_backup, Some(NodeId(2)));
        assert_eq!(r.slurm_workers, [NodeId(1), NodeId(2), NodeId(3)].into());
        assert_eq!(r.k3s_server, Some(NodeId(1)));
        assert_eq!(r.k3s_agents, [NodeId(2), NodeId(3)].into());
        assert_eq!(schedule(&m, &r), r, "stable when nothing changes");
    }

    #[test]
    fn healthy_and_suspect_holders_keep_their_roles() {
        let m = members(vec![
            member(NodeId(1), Health::Alive, &[]),
            member(NodeId(2), Health::Suspect, &[]),
            member(NodeId(3), Health::Alive, &[]),
        ]);
        let current = RoleAssignments {
            slurm_controller: Some(NodeId(2)),
            slurm_backup: Some(NodeId(3)),
            slurm_workers: [NodeId(1), NodeId(2), NodeId(3)].into(),
            k3s_server: Some(NodeId(3)),
            k3s_agents: [NodeId(1), NodeId(2)].into(),
        };
        assert_eq!(schedule(&m, &current), current);
    }

    #[test]
    fn failed_controller_is_replaced_by_its_backup() {
        let m = members(vec![
            member(NodeId(1), Health::Failed, &[]),
            member(NodeId(2), Health::Alive, &[]),
            member(NodeId(3), Health::Alive, &[]),
        ]);
        let current = RoleAssignments {
            slurm_controller: Some(NodeId(1)),
            slurm_backup: Some(NodeId(2)),
            slurm_workers: [NodeId(1), NodeId(2), NodeId(3)].into(),
            k3s_server: Some(NodeId(1)),
            k3s_agents: [NodeId(2), NodeId(3)].into(),
        };
        let r = schedule(&m, &current);
        assert_eq!(r.slurm_controller, Some(NodeId(2)));
        assert_eq!(r.slurm_backup, Some(NodeId(3)));
        assert_eq!(r.slurm_workers, [NodeId(2), NodeId(3)].into());
        assert_eq!(r.k3s_server, Some(NodeId(2)));
        assert_eq!(r.k3s_agents, [NodeId(3)].into());
    }

    #[test]
    fn failed_backup_is_replaced_without_moving_the_controller() {
        let m = members(vec![
            member(NodeId(1), Health::Alive, &[]),
            member(NodeId(2), Health::Left, &[]),
            member(NodeId(3), Health::Alive, &[]),
        ]);
        let current =
            RoleAssignments { slurm_controller: Some(NodeId(1)), slurm_backup: Some(NodeId(2)), ..Default::default() };
        let r = schedule(&m, &current);
        assert_eq!((r.slurm_controller, r.slurm_backup), (Some(NodeId(1)), Some(NodeId(3))));
    }

    #[test]
    fn labels_exclude_and_prefer() {
        let m = members(vec![
            member(NodeId(1), Health::Alive, &[("role.slurm-controller", "never"), ("role.k3s-agent", "never")]),
            member(NodeId(2), Health::Alive, &[]),
            member(NodeId(3), Health::Alive, &[("role.slurm-controller", "prefer"), ("role.slurm-worker", "never")]),
        ]);
        let r = schedule(&m, &RoleAssignments::default());
        assert_eq!(r.slurm_controller, Some(NodeId(3)));
        assert_eq!(r.slurm_backup, Some(NodeId(2)));
        assert_eq!(r.slurm_workers, [NodeId(1), NodeId(2)].into());
        assert_eq!(r.k3s_agents, [NodeId(2), NodeId(3)].into());
    }

    #[test]
    fn single_node_has_a_controller_and_no_backup() {
        let m = members(vec![member(NodeId(7), Health::Alive, &[])]);
        let r = schedule(&m, &RoleAssignments::default());
        assert_eq!((r.slurm_controller, r.slurm_backup), (Some(NodeId(7)), None));
    }

    #[test]
    fn no_usable_member_means_no_holder() {
        let m = members(vec![member(NodeId(1), Health::Failed, &[])]);
        let r = schedule(&m, &RoleAssignments::default());
        assert_eq!(r, RoleAssignments::default());
    }
}
