//! Node services, the applier: makes the node match a [`ServicePlan`]. Every file is rendered
//! before any is written, files are written atomically with their owner and mode, and a unit is
//! restarted only when one of its inputs changed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::adapters::files::{Dir, Owner, WriteError, write_owned};
use crate::adapters::systemd::{Systemd, UnitAction, UnitStatus};
use std::collections::BTreeSet;

use crate::core::services::{ManagedFile, ServicePlan};

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
    Write(#[from] WriteError),
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
pub struct ServiceApplier<S: Systemd> {
    pub systemd: S,
    pub root: PathBuf,
}

impl<S: Systemd> ServiceApplier<S> {
    fn host_path(&self, p: &Path) -> PathBuf {
        self.root.join(p.strip_prefix("/").unwrap_or(p))
    }

    /// Whether the file on disk differs from `f` in contents, mode or owner. Read through
    /// [`Dir`]: a link or FIFO planted in a directory another user owns is never opened.
    fn differs(&self, f: &ManagedFile, owner: Owner) -> bool {
        let path = self.host_path(&f.path);
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return true };
        let on_disk = Dir::open(dir).ok().and_then(|d| d.read(name, f.contents.len() as u64 + 1).ok().flatten());
        !on_disk.is_some_and(|d| d.data == f.contents && d.mode == f.mode && d.uid == owner.uid && d.gid == owner.gid)
    }

    /// Writes what differs. All owners are resolved before anything is written. Each file gets
    /// its owner and mode before it goes in place (see [`crate::adapters::files`]).
    fn write_files(&self, files: &[ManagedFile]) -> Result<Vec<PathBuf>, FileError> {
        let mut todo = Vec::new();
        for f in files {
            let uid =
                lookup_id(&self.root, "etc/passwd", &f.owner).ok_or_else(|| FileError::NoUser(f.owner.clone()))?;
            let gid =
                lookup_id(&self.root, "etc/group", &f.group).ok_or_else(|| FileError::NoGroup(f.group.clone()))?;
            let owner = Owner { uid, gid };
            if self.differs(f, owner) {
                todo.push((f, owner));
            }
        }
        let mut written = Vec::new();
        for (f, owner) in todo {
            let path = self.host_path(&f.path);
            if let Some(dir) = path.parent() {
                // A missing directory is made root's (0755); one that exists keeps its owner.
                Dir::create(dir, 0o755, None).map_err(|source| WriteError { path: dir.to_owned(), source })?;
            }
            write_owned(&path, &f.contents, f.mode, Some(owner))?;
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

    use super::*;
    use crate::adapters::systemd::FakeSystemd;
    use crate::core::services::tests::{inputs, roles, state};
    use crate::core::services::{MUNGE_KEY_PATH, MUNGE_UNIT, SLURMCTLD_UNIT, SLURMD_UNIT, plan};
    use crate::core::state::{NodeId, RoleAssignments};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

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
        let r = ServiceApplier { systemd: fake.clone(), root: root.path().to_owned() };
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
        let r = ServiceApplier { systemd: fake, root: root.path().to_owned() };
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
        let r = ServiceApplier { systemd: fake.clone(), root: root.path().to_owned() };
        let s = state(roles());
        let key = [9u8; 1024];
        let rep = r.apply(&plan(&inputs(NodeId(1), &s, Some(&key)))).await;
        assert!(rep.error.as_deref().unwrap().contains("user \"munge\" does not exist"), "{rep:?}");
        assert!(fake.take_calls().is_empty());
        assert!(!root.path().join("etc/slurm/slurm.conf").exists(), "nothing written when one file cannot be");
    }
}
