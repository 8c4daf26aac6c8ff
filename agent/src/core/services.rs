//! Node services, the plan (pure): what this node should run and which files those services need,
//! derived from the replicated state. [`crate::adapters::services`] makes the node match it.

use std::path::PathBuf;

use crate::core::render::k3s::{self, K3sConfig};
use crate::core::render::slurm::{self, SlurmConf};
use crate::core::state::{ClusterState, NodeId};

pub const MUNGE_KEY_PATH: &str = "/etc/munge/munge.key";
pub const K3S_BINARY: &str = "/usr/local/bin/k3s";
pub const MUNGE_UNIT: &str = "munge.service";
pub const SLURMCTLD_UNIT: &str = "slurmctld.service";
pub const SLURMD_UNIT: &str = "slurmd.service";
pub const K3S_SERVER_UNIT: &str = "k3s.service";
pub const K3S_AGENT_UNIT: &str = "k3s-agent.service";

/// A file the node's services need.
#[derive(Clone, PartialEq, Eq)]
pub struct ManagedFile {
    pub path: PathBuf,
    pub contents: Vec<u8>,
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

impl std::fmt::Debug for ManagedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Contents may be secret (munge.key, the k3s token): never printed.
        f.debug_struct("ManagedFile")
            .field("path", &self.path)
            .field("bytes", &self.contents.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .field("owner", &format_args!("{}:{}", self.owner, self.group))
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitPlan {
    pub unit: String,
    /// The role this unit serves, for people.
    pub role: String,
    pub wanted: bool,
    /// Files whose change restarts the unit.
    pub inputs: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePlan {
    pub files: Vec<ManagedFile>,
    pub units: Vec<UnitPlan>,
    /// What is missing or unavailable, for people ("k3s binary not installed").
    pub notes: Vec<String>,
}

/// Everything the plan depends on.
pub struct PlanInputs<'a> {
    pub me: NodeId,
    pub state: &'a ClusterState,
    /// The opened MUNGE key, once the leader has created it.
    pub munge_key: Option<&'a [u8]>,
    pub k3s_token: Option<&'a str>,
    pub k3s_installed: bool,
    /// The backup has installed a copy of the controller's SLURM state (with its heartbeat): its
    /// standby slurmctld can start. Started earlier, it would wait for the heartbeat file without
    /// answering, and the primary's start-up call to it would hang until it times out.
    pub standby_ready: bool,
}

fn unit(unit: &str, role: &str, wanted: bool, inputs: &[&str]) -> UnitPlan {
    UnitPlan { unit: unit.into(), role: role.into(), wanted, inputs: inputs.iter().map(PathBuf::from).collect() }
}

/// What this node should run, and the files for it.
pub fn plan(i: &PlanInputs) -> ServicePlan {
    let mut p = ServicePlan::default();
    let roles = &i.state.roles;
    let have_key = i.munge_key.is_some();
    match i.munge_key {
        Some(key) => p.files.push(ManagedFile {
            path: MUNGE_KEY_PATH.into(),
            contents: key.to_vec(),
            mode: 0o400,
            owner: "munge".into(),
            group: "munge".into(),
        }),
        None => p.notes.push("munge: waiting for the leader to create the cluster's MUNGE key".into()),
    }
    p.units.push(unit(MUNGE_UNIT, "munge", have_key, &[MUNGE_KEY_PATH]));

    // The controller runs slurmctld in control, the backup a standby slurmctld that takes over
    // with the state the agent replicates to it (see slurm_state).
    let is_backup = roles.slurm_backup == Some(i.me) && roles.slurm_controller != Some(i.me);
    let controller = roles.slurm_controller == Some(i.me) || is_backup;
    let worker = roles.slurm_workers.contains(&i.me);
    let mut slurm_ok = false;
    if controller || worker {
        match SlurmConf::from_state(i.state) {
            Ok(conf) => {
                p.files.push(ManagedFile {
                    path: slurm::PATH.into(),
                    contents: conf.to_string().into_bytes(),
                    mode: 0o644,
                    owner: "root".into(),
                    group: "root".into(),
                });
                slurm_ok = have_key;
            }
            Err(e) => p.notes.push(format!("slurm: {e}")),
        }
    }
    let ctl_role = if roles.slurm_backup == Some(i.me) { "slurm backup (standby)" } else { "slurm controller" };
    if slurm_ok && is_backup && !i.standby_ready {
        p.notes.push("slurmctld standby: waiting for the first copy of the controller's state".into());
    }
    let ctld = slurm_ok && controller && (!is_backup || i.standby_ready);
    // A new MUNGE key restarts the SLURM daemons too: restarted, slurmd registers at once with
    // the new key instead of waiting to be pinged back into service after failed credentials.
    p.units.push(unit(SLURMCTLD_UNIT, ctl_role, ctld, &[slurm::PATH, MUNGE_KEY_PATH]));
    p.units.push(unit(SLURMD_UNIT, "slurm worker", slurm_ok && worker, &[slurm::PATH, MUNGE_KEY_PATH]));

    let k3s_server = roles.k3s_server == Some(i.me);
    let k3s_agent = roles.k3s_agents.contains(&i.me);
    if !i.k3s_installed {
        if k3s_server || k3s_agent {
            let role = if k3s_server { "server" } else { "agent" };
            p.notes.push(format!(
                "k3s {role}: unavailable: k3s binary not installed ({K3S_BINARY}); build the image with K3S_BINARY=path"
            ));
        }
    } else {
        let mut k3s_ok = false;
        if k3s_server || k3s_agent {
            match K3sConfig::from_state(i.state, i.me, i.k3s_token.unwrap_or("")) {
                Ok(conf) => {
                    p.files.push(ManagedFile {
                        path: k3s::PATH.into(),
                        contents: conf.to_string().into_bytes(),
                        mode: 0o600,
                        owner: "root".into(),
                        group: "root".into(),
                    });
                    k3s_ok = true;
                }
                Err(e) => p.notes.push(format!("k3s: {e}")),
            }
        }
        p.units.push(unit(K3S_SERVER_UNIT, "k3s server", k3s_ok && k3s_server, &[k3s::PATH]));
        p.units.push(unit(K3S_AGENT_UNIT, "k3s agent", k3s_ok && k3s_agent, &[k3s::PATH]));
    }
    p
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::core::state::{Command, RoleAssignments};

    pub(crate) fn state(roles: RoleAssignments) -> ClusterState {
        let mut s = crate::core::render::slurm::tests::three_node_state();
        s.apply(30, &Command::SetRoles { roles });
        s
    }

    pub(crate) fn roles() -> RoleAssignments {
        RoleAssignments {
            slurm_controller: Some(NodeId(1)),
            slurm_backup: Some(NodeId(2)),
            slurm_workers: [NodeId(1), NodeId(2), NodeId(3)].into(),
            k3s_server: Some(NodeId(1)),
            k3s_agents: [NodeId(2), NodeId(3)].into(),
        }
    }

    pub(crate) fn wanted(p: &ServicePlan) -> BTreeMap<String, bool> {
        p.units.iter().map(|u| (u.unit.clone(), u.wanted)).collect()
    }

    #[test]
    fn plan_follows_roles() {
        let s = state(roles());
        let key = [7u8; 1024];
        let i = PlanInputs {
            me: NodeId(3),
            state: &s,
            munge_key: Some(&key),
            k3s_token: Some("t"),
            k3s_installed: false,
            standby_ready: true,
        };
        let p = plan(&i);
        let w = wanted(&p);
        assert!(w[MUNGE_UNIT]);
        assert!(!w[SLURMCTLD_UNIT]);
        assert!(w[SLURMD_UNIT]);
        assert!(!w.contains_key(K3S_AGENT_UNIT), "k3s units are not managed without the binary");
        assert!(p.notes.iter().any(|n| n.contains("k3s binary not installed")), "{:?}", p.notes);
        let key_file = p.files.iter().find(|f| f.path == Path::new(MUNGE_KEY_PATH)).unwrap();
        assert_eq!((key_file.mode, key_file.owner.as_str()), (0o400, "munge"));
        assert!(!format!("{key_file:?}").contains("7, 7"), "contents in Debug output");

        let i = PlanInputs { me: NodeId(2), ..i };
        assert!(wanted(&plan(&i))[SLURMCTLD_UNIT], "the backup runs a standby slurmctld");
        let waiting = plan(&PlanInputs { standby_ready: false, ..i });
        assert!(!wanted(&waiting)[SLURMCTLD_UNIT], "no standby before the first state copy");
        assert!(waiting.notes.iter().any(|n| n.contains("first copy")), "{:?}", waiting.notes);
        let i = PlanInputs { me: NodeId(2), ..i };
        let i = PlanInputs { me: NodeId(1), k3s_installed: true, ..i };
        let p = plan(&i);
        assert_eq!((wanted(&p)[K3S_SERVER_UNIT], wanted(&p)[K3S_AGENT_UNIT]), (true, false));
    }

    #[test]
    fn nothing_slurm_runs_without_the_munge_key() {
        let s = state(roles());
        let p = plan(&inputs(NodeId(1), &s, None));
        assert!(wanted(&p).values().all(|w| !w), "{p:?}");
        assert!(p.notes.iter().any(|n| n.contains("MUNGE key")));
    }

    #[test]
    fn no_controller_means_no_slurm_conf_and_a_note() {
        let s =
            state(RoleAssignments { slurm_workers: [NodeId(1), NodeId(2), NodeId(3)].into(), ..Default::default() });
        let key = [1u8; 32];
        let p = plan(&inputs(NodeId(1), &s, Some(&key)));
        assert!(p.files.iter().all(|f| f.path != Path::new(slurm::PATH)));
        assert!(p.notes.iter().any(|n| n.contains("SlurmctldHost")), "{:?}", p.notes);
    }

    /// Plan inputs without k3s, with the standby's state copy in place.
    pub(crate) fn inputs<'a>(me: NodeId, state: &'a ClusterState, munge_key: Option<&'a [u8]>) -> PlanInputs<'a> {
        PlanInputs { me, state, munge_key, k3s_token: None, k3s_installed: false, standby_ready: true }
    }
}
