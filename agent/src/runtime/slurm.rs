//! SLURM controller state replication: the controller publishes a sealed copy of its state
//! directory, the backup installs the newest one while its slurmctld stands by.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::core::state::{Command, NodeId, Response};
use crate::proto::paths;

use super::driver::{Action, LoopError, Reconciler, Triggers, Wake};
use super::{Node, RAFT_DIR};
use crate::core::slurm_copy::{
    CopyRole, InstallStep, InstalledCopy, PublishStep, check_fetched, copy_role, install_step, publish_step,
};

/// What this node did in the last round of SLURM state replication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SlurmStateReport {
    /// "publishing" on the controller, "installing" on the backup.
    pub role: String,
    /// The version of the copy published or installed last.
    pub version: Option<u64>,
    pub files: u32,
    pub bytes: u64,
    /// When the controller read its directory for that copy (ms since the epoch).
    pub taken_at_ms: Option<u64>,
    /// What the last round is waiting for, or why it failed.
    pub note: Option<String>,
}

/// Where the backup records the copy it installed last: `FROM_ID VERSION DIGEST` (inside the Raft
/// directory: a node that joins anew starts over).
const SLURM_STATE_MARKER: &str = "slurm-state.installed";

/// Replicates the SLURM controller's state directory to the backup, every 5 s: the controller
/// reads its directory and, while its slurmctld is in control and the files changed, keeps the
/// sealed copy in memory (served at `/peer/v1/slurm-state`) and announces its digest through Raft;
/// the backup fetches each announced copy and installs it while its own slurmctld is a standby.
/// When the backup's slurmctld takes control by itself, its agent asks for the roles to be
/// swapped. See [`crate::adapters::slurm_state`].
#[derive(Default)]
pub(super) struct SlurmStateLoop {
    /// [`Node::slurm_standby_ready`] after the last round: when it changes, the services loop
    /// is told at once (it starts or stops the standby slurmctld on it).
    standby_ready: Option<bool>,
}

impl Reconciler for SlurmStateLoop {
    const NAME: &'static str = "slurm-state";
    const TRIGGERS: Triggers = Triggers { state: false, nudge: false, local: false };

    async fn reconcile(&mut self, node: &Arc<Node>, _wake: Wake) -> Result<Action, LoopError> {
        const PERIOD: Duration = Duration::from_secs(5);
        let dir = Path::new(crate::adapters::slurm_state::STATE_DIR);
        let roles = node.state.read(|d| d.state.roles.clone());
        let report = match copy_role(node.id(), &roles) {
            CopyRole::Publish => Some(node.publish_slurm_state(dir).await),
            CopyRole::Install { controller } => {
                *node.slurm_copy.lock().expect("slurm copy lock") = None;
                Some(node.install_slurm_state(dir, controller).await)
            }
            CopyRole::None => {
                *node.slurm_copy.lock().expect("slurm copy lock") = None;
                None
            }
        };
        if let Some(note) = report.as_ref().and_then(|r| r.note.as_ref()) {
            debug!(node_id = %node.id(), "slurm state: {note}");
        }
        *node.slurm_state.lock().expect("slurm state lock") = report;
        let ready = node.slurm_standby_ready();
        if self.standby_ready.replace(ready) != Some(ready) {
            node.local_changed();
        }
        Ok(Action::After(PERIOD))
    }
}

const NO_SLURM_USER: &str = "user or group \"slurm\" does not exist on this node: is slurmctld installed?";

impl Node {
    pub(super) fn slurm_marker(&self) -> PathBuf {
        self.cfg.state_dir.join(RAFT_DIR).join(SLURM_STATE_MARKER)
    }

    pub(super) fn installed_copy(&self) -> Option<InstalledCopy> {
        std::fs::read_to_string(self.slurm_marker()).ok().and_then(|t| InstalledCopy::parse(&t))
    }

    pub(super) async fn publish_slurm_state(&self, dir: &Path) -> SlurmStateReport {
        use crate::adapters::slurm_state::{HEARTBEAT, SEAL_NAME, collect, slurm_owner};
        let mut report = SlurmStateReport { role: "publishing".into(), ..Default::default() };
        let Some(owner) = slurm_owner(Path::new("/")) else {
            report.note = Some(NO_SLURM_USER.into());
            return report;
        };
        let d = dir.to_owned();
        let files = match tokio::task::spawn_blocking(move || collect(&d, owner.uid)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => {
                report.note = Some("slurmctld has not saved any state yet".into());
                return report;
            }
            Ok(Err(e)) => {
                warn!(node_id = %self.id(), "slurm state: {e}");
                report.note = Some(e.to_string());
                return report;
            }
            Err(e) => {
                report.note = Some(format!("reading the state directory failed: {e}"));
                return report;
            }
        };
        report.files = files.0.len() as u32;
        report.bytes = files.bytes();
        let digest = files.digest(true);
        let announced = self.state.read(|d| d.state.slurm_state.clone());
        let held = self.slurm_copy.lock().expect("slurm copy lock").as_ref().map(|b| b.digest.clone());
        let heartbeat = files.0.get(HEARTBEAT).map(Vec::as_slice);
        match publish_step(self.id(), heartbeat, crate::now_ms() / 1000, &digest, announced.as_ref(), held.as_deref()) {
            PublishStep::NotInControl => {
                report.note =
                    Some("slurmctld on this node is not in control (no fresh heartbeat); not publishing".into());
                return report;
            }
            PublishStep::Unchanged { version, taken_at_ms } => {
                report.version = Some(version);
                report.taken_at_ms = Some(taken_at_ms);
                return report;
            }
            PublishStep::Announce => {}
        }
        let sealed = self.secret_box.seal(SEAL_NAME, &files.to_json());
        let taken_at_ms = crate::now_ms();
        let cmd = Command::SetSlurmState {
            from: self.id(),
            digest: digest.clone(),
            files: report.files,
            bytes: report.bytes,
            taken_at_ms,
        };
        match self.write(cmd).await {
            Ok(Response::SlurmState { version }) => {
                *self.slurm_copy.lock().expect("slurm copy lock") =
                    Some(Arc::new(crate::proto::SlurmStateBlob { from: self.id(), version, digest, sealed }));
                report.version = Some(version);
                report.taken_at_ms = Some(taken_at_ms);
            }
            Ok(Response::Rejected { reason }) => report.note = Some(reason),
            Ok(other) => report.note = Some(format!("unexpected answer: {other:?}")),
            Err(e) => report.note = Some(format!("cannot announce the copy: {e}")),
        }
        report
    }

    pub(super) async fn install_slurm_state(&self, dir: &Path, controller: Option<NodeId>) -> SlurmStateReport {
        use crate::adapters::slurm_state::{SEAL_NAME, StateFiles, install, may_install, read_heartbeat, slurm_owner};
        let mut report = SlurmStateReport { role: "installing".into(), ..Default::default() };
        let d = dir.to_owned();
        let local_hb = tokio::task::spawn_blocking(move || read_heartbeat(&d)).await.ok().flatten();
        let copy = self.state.read(|d| d.state.slurm_state.clone());
        if let Some(c) = &copy {
            report.files = c.files;
            report.bytes = c.bytes;
            report.taken_at_ms = Some(c.taken_at_ms);
        }
        let installed = self.installed_copy();
        let step =
            install_step(local_hb.as_deref(), crate::now_ms() / 1000, copy.as_ref(), controller, installed.as_ref());
        report.note = step.note().map(str::to_string);
        let (controller, copy_version, announced_digest) = match step {
            InstallStep::Takeover => {
                match self.write(Command::SlurmTakeover { id: self.id() }).await {
                    Ok(Response::Ok) => {
                        warn!(node_id = %self.id(), "slurmctld here took control from the controller; roles swapped")
                    }
                    Ok(Response::Rejected { reason }) => debug!("slurm takeover: {reason}"),
                    Ok(_) => {}
                    Err(e) => report.note = Some(format!("cannot ask for the controller role: {e}")),
                }
                return report;
            }
            InstallStep::UpToDate { version } => {
                report.version = Some(version);
                return report;
            }
            InstallStep::WaitForFirstCopy | InstallStep::FromFormerController | InstallStep::LocalInControl => {
                return report;
            }
            InstallStep::Fetch { from, version, digest } => (from, version, digest),
        };
        let Some(raft_addr) =
            self.metrics().membership_config.membership().get_node(&controller).map(|n| n.addr.clone())
        else {
            report.note = Some("the controller is not in the Raft membership".into());
            return report;
        };
        let addr = self.route(controller, &raft_addr);
        let t = Duration::from_millis(self.cfg.raft.snapshot_timeout_ms);
        let blob = match self
            .client
            .call::<_, crate::proto::SlurmStateBlob>(&addr, controller, paths::SLURM_STATE, &crate::proto::Empty {}, t)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                report.note = Some(format!("cannot fetch the copy from the controller at {addr}: {e}"));
                return report;
            }
        };
        let secret_box = self.secret_box.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let plain = secret_box.open(SEAL_NAME, &blob.sealed).map_err(|e| e.to_string())?;
            let files = StateFiles::from_json(&plain).map_err(|e| e.to_string())?;
            let digest = files.digest(true);
            check_fetched((controller, copy_version, &announced_digest), (blob.from, blob.version), &digest)?;
            Ok((files, blob.version, digest))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let (files, version, digest) = match decoded {
            Ok(d) => d,
            Err(e) => {
                warn!(node_id = %self.id(), "slurm state: {e}");
                report.note = Some(e);
                return report;
            }
        };
        let Some(owner) = slurm_owner(Path::new("/")) else {
            report.note = Some(NO_SLURM_USER.into());
            return report;
        };
        let d = dir.to_owned();
        let r = tokio::task::spawn_blocking(move || {
            // Missing (slurmctld never ran here): made as the slurm user's, as the package makes it.
            crate::adapters::files::Dir::create(&d, 0o755, Some(owner))
                .map_err(|source| crate::adapters::files::WriteError { path: d.clone(), source })?;
            let standby = |hb: Option<&[u8]>| may_install(hb, crate::now_ms() / 1000);
            install(&d, &files, owner, &standby)
        })
        .await;
        match r {
            Ok(Ok(done)) => {
                let marker = InstalledCopy { from: controller, version, digest };
                if let Err(e) =
                    crate::adapters::files::write_atomic(&self.slurm_marker(), marker.render().as_bytes(), 0o600)
                {
                    report.note = Some(e.to_string());
                    return report;
                }
                if done.written + done.removed > 0 {
                    debug!(node_id = %self.id(), version, written = done.written, removed = done.removed, "installed the SLURM controller's state");
                }
                report.version = Some(version);
            }
            Ok(Err(e)) => {
                warn!(node_id = %self.id(), "slurm state: {e}");
                report.note = Some(e.to_string());
            }
            Err(e) => report.note = Some(format!("installing failed: {e}")),
        }
        report
    }
}
