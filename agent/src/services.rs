//! Node services: what this node should run and which files those services need (a pure plan
//! derived from the replicated state), and the reconciler that makes the node match it: every file
//! is rendered before any is written, files are written atomically with their owner and mode, and
//! a unit is restarted only when one of its inputs changed.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapters::systemd::{Systemd, UnitAction, UnitStatus};
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

/// The state of one unit after a reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitReport {
    pub unit: String,
    pub role: String,
    pub wanted: bool,
    pub status: Option<UnitStatus>,
    /// The last action's failure, with the reason.
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ServiceReport {
    pub units: Vec<UnitReport>,
    pub notes: Vec<String>,
    pub files_written: Vec<PathBuf>,
    /// A failure that stopped the reconcile (a file could not be written).
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("user {0:?} does not exist on this node: is its package installed?")]
    NoUser(String),
    #[error("group {0:?} does not exist on this node: is its package installed?")]
    NoGroup(String),
    #[error(transparent)]
    Write(#[from] crate::adapters::files::WriteError),
    #[error("cannot set the owner of {path}: {source}")]
    Chown { path: PathBuf, source: std::io::Error },
}

/// Looks a name up in a passwd or group file under `root`.
pub(crate) fn lookup_id(root: &Path, file: &str, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(root.join(file)).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.split(':');
        (parts.next()? == name).then(|| parts.nth(1)?.parse().ok())?
    })
}

/// Applies service plans on a node whose file system starts at `root` ("/" in production).
pub struct Reconciler<S: Systemd> {
    pub systemd: S,
    pub root: PathBuf,
}

impl<S: Systemd> Reconciler<S> {
    fn host_path(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    fn differs(&self, f: &ManagedFile, uid: u32, gid: u32) -> bool {
        let path = self.host_path(&f.path);
        match (std::fs::read(&path), std::fs::metadata(&path)) {
            (Ok(bytes), Ok(meta)) => {
                bytes != f.contents
                    || meta.permissions().mode() & 0o7777 != f.mode
                    || meta.uid() != uid
                    || meta.gid() != gid
            }
            _ => true,
        }
    }

    /// Writes what differs. All owners are resolved before anything is written.
    fn write_files(&self, files: &[ManagedFile]) -> Result<Vec<PathBuf>, FileError> {
        let mut todo = Vec::new();
        for f in files {
            let uid =
                lookup_id(&self.root, "etc/passwd", &f.owner).ok_or_else(|| FileError::NoUser(f.owner.clone()))?;
            let gid =
                lookup_id(&self.root, "etc/group", &f.group).ok_or_else(|| FileError::NoGroup(f.group.clone()))?;
            if self.differs(f, uid, gid) {
                todo.push((f, uid, gid));
            }
        }
        let mut written = Vec::new();
        for (f, uid, gid) in todo {
            let path = self.host_path(&f.path);
            if let Some(dir) = path.parent()
                && !dir.exists()
            {
                crate::adapters::files::ensure_dir(dir, 0o755)?;
            }
            crate::adapters::files::write_atomic(&path, &f.contents, f.mode)?;
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|source| FileError::Chown { path: path.clone(), source })?;
            written.push(f.path.clone());
        }
        Ok(written)
    }

    /// Makes the node match the plan and reports every unit's state.
    pub async fn apply(&self, plan: &ServicePlan) -> ServiceReport {
        let mut report = ServiceReport { notes: plan.notes.clone(), ..Default::default() };
        match self.write_files(&plan.files) {
            Ok(w) => report.files_written = w,
            Err(e) => {
                // Nothing is started with half-written inputs.
                report.error = Some(e.to_string());
                return report;
            }
        }
        let changed: BTreeSet<&PathBuf> = report.files_written.iter().collect();
        for u in &plan.units {
            let mut r =
                UnitReport { unit: u.unit.clone(), role: u.role.clone(), wanted: u.wanted, status: None, error: None };
            let status = match self.systemd.status(&u.unit).await {
                Ok(s) => s,
                Err(e) => {
                    r.error = Some(e.to_string());
                    report.units.push(r);
                    continue;
                }
            };
            let inputs_changed = u.inputs.iter().any(|p| changed.contains(p));
            let action = match (u.wanted, status.is_active()) {
                (true, false) => Some(UnitAction::Start),
                (true, true) if inputs_changed => Some(UnitAction::Restart),
                (false, true) => Some(UnitAction::Stop),
                _ => None,
            };
            r.status = Some(status);
            if let Some(action) = action {
                match self.systemd.run(&u.unit, action).await {
                    Ok(s) => {
                        tracing::info!(unit = %u.unit, action = %action, active_state = %s.active_state, "unit {action}ed");
                        r.status = Some(s);
                    }
                    Err(e) => {
                        tracing::warn!(unit = %u.unit, action = %action, "{e}");
                        r.error = Some(e.to_string());
                        r.status = self.systemd.status(&u.unit).await.ok();
                    }
                }
            }
            report.units.push(r);
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::adapters::systemd::FakeSystemd;
    use crate::core::state::{Command, RoleAssignments};

    fn state(roles: RoleAssignments) -> ClusterState {
        let mut s = crate::core::render::slurm::tests::three_node_state();
        s.apply(30, &Command::SetRoles { roles });
        s
    }

    fn roles() -> RoleAssignments {
        RoleAssignments {
            slurm_controller: Some(NodeId(1)),
            slurm_backup: Some(NodeId(2)),
            slurm_workers: [NodeId(1), NodeId(2), NodeId(3)].into(),
            k3s_server: Some(NodeId(1)),
            k3s_agents: [NodeId(2), NodeId(3)].into(),
        }
    }

    fn wanted(p: &ServicePlan) -> BTreeMap<String, bool> {
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
    fn inputs<'a>(me: NodeId, state: &'a ClusterState, munge_key: Option<&'a [u8]>) -> PlanInputs<'a> {
        PlanInputs { me, state, munge_key, k3s_token: None, k3s_installed: false, standby_ready: true }
    }

    fn fake_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let me = test_ids();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            format!("root:x:{}:{}::/root:/bin/sh\nmunge:x:{}:{}::/:/bin/false\n", me.0, me.1, me.0, me.1),
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), format!("root:x:{}:\nmunge:x:{}:\n", me.1, me.1)).unwrap();
        root
    }

    /// The ids of the test process, so chown works whether or not the tests run as root.
    fn test_ids() -> (u32, u32) {
        let m = std::fs::metadata("/proc/self").unwrap();
        (m.uid(), m.gid())
    }

    #[tokio::test]
    async fn reconcile_writes_then_starts_and_restarts_only_on_change() {
        let root = fake_root();
        let fake = FakeSystemd::with_units(&[MUNGE_UNIT, SLURMCTLD_UNIT, SLURMD_UNIT]);
        let r = Reconciler { systemd: fake.clone(), root: root.path().to_owned() };
        let s = state(roles());
        let key = [9u8; 1024];
        let p = plan(&inputs(NodeId(1), &s, Some(&key)));

        let rep = r.apply(&p).await;
        assert_eq!(rep.error, None);
        assert_eq!(fake.take_calls(), vec!["start munge.service", "start slurmctld.service", "start slurmd.service"]);
        let key_path = root.path().join("etc/munge/munge.key");
        assert_eq!(std::fs::read(&key_path).unwrap(), key);
        assert_eq!(std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777, 0o400);
        assert!(
            std::fs::read_to_string(root.path().join("etc/slurm/slurm.conf"))
                .unwrap()
                .contains("SlurmctldHost=node1(10.90.0.1)")
        );

        // Same inputs: nothing to do.
        let rep = r.apply(&p).await;
        assert!(rep.files_written.is_empty());
        assert_eq!(fake.take_calls(), Vec::<String>::new());

        // A new key restarts munged, then the SLURM daemons that use it.
        let key2 = [3u8; 1024];
        let p2 = plan(&inputs(NodeId(1), &s, Some(&key2)));
        let rep = r.apply(&p2).await;
        assert_eq!(rep.files_written, vec![PathBuf::from(MUNGE_KEY_PATH)]);
        assert_eq!(
            fake.take_calls(),
            vec!["restart munge.service", "restart slurmctld.service", "restart slurmd.service"]
        );

        // Losing the controller roles stops slurmctld.
        let s2 = state(RoleAssignments { slurm_controller: Some(NodeId(2)), slurm_backup: Some(NodeId(3)), ..roles() });
        let p3 = plan(&inputs(NodeId(1), &s2, Some(&key2)));
        r.apply(&p3).await;
        assert_eq!(fake.take_calls(), vec!["stop slurmctld.service", "restart slurmd.service"]);
    }

    #[tokio::test]
    async fn failed_units_are_reported_with_the_reason() {
        let root = fake_root();
        let fake = FakeSystemd::with_units(&[MUNGE_UNIT, SLURMCTLD_UNIT, SLURMD_UNIT]);
        fake.broken.lock().unwrap().insert(SLURMD_UNIT.into());
        let r = Reconciler { systemd: fake, root: root.path().to_owned() };
        let s = state(roles());
        let key = [9u8; 1024];
        let rep = r.apply(&plan(&inputs(NodeId(3), &s, Some(&key)))).await;
        let slurmd = rep.units.iter().find(|u| u.unit == SLURMD_UNIT).unwrap();
        assert!(slurmd.error.as_deref().unwrap().contains("journalctl -u slurmd.service"), "{slurmd:?}");
        assert_eq!(slurmd.status.as_ref().unwrap().active_state, "failed");
    }

    #[tokio::test]
    async fn missing_user_stops_before_any_write_or_start() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\n").unwrap();
        let fake = FakeSystemd::with_units(&[MUNGE_UNIT, SLURMCTLD_UNIT, SLURMD_UNIT]);
        let r = Reconciler { systemd: fake.clone(), root: root.path().to_owned() };
        let s = state(roles());
        let key = [9u8; 1024];
        let rep = r.apply(&plan(&inputs(NodeId(1), &s, Some(&key)))).await;
        assert!(rep.error.as_deref().unwrap().contains("user \"munge\" does not exist"), "{rep:?}");
        assert!(fake.take_calls().is_empty());
        assert!(!root.path().join("etc/slurm/slurm.conf").exists(), "nothing written when one file cannot be");
    }
}
