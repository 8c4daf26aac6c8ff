//! Ending a membership on disk: the Raft state goes and a new identity takes the old one's
//! place, as one step as far as a crash is concerned. The daemon calls it when the node left or
//! was removed, and at start to complete a reset a crash interrupted.

use std::path::{Path, PathBuf};

use tracing::warn;

use super::RAFT_DIR;
use crate::adapters::identity::Identity;

/// The file that says a membership reset is under way in the state directory.
const RESET_MARKER: &str = "membership-reset";

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("cannot mark the membership reset in {path}: {source}")]
    Mark { path: PathBuf, source: crate::adapters::files::WriteError },
    #[error("cannot remove the old Raft state {path}: {source}; remove it by hand, then restart the agent")]
    Wipe { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot open the state directory {path}: {source}; check that it exists and is a directory, then restart the agent"
    )]
    OpenDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Identity(#[from] crate::adapters::identity::IdentityError),
    #[error("cannot remove {path}: {source}")]
    Unmark { path: PathBuf, source: std::io::Error },
}

/// Ends this node's membership on disk (it left, or the cluster removed it): the Raft state goes
/// and a new identity takes the old one's place, so the next run joins as a new member (node ids
/// are never reused). One step as far as a crash is concerned: a marker is written first and
/// removed last, and [`finish_membership_reset`] completes an interrupted reset at the next
/// start. Without it, a crash between the two restarted the old id on an empty log, a voter that
/// had forgotten its vote.
pub fn reset_membership(state_dir: &Path, name: &str) -> Result<Identity, ResetError> {
    let marker = state_dir.join(RESET_MARKER);
    crate::adapters::files::write_atomic(&marker, b"the Raft state and the identity are being replaced\n", 0o600)
        .map_err(|source| ResetError::Mark { path: marker.clone(), source })?;
    complete_reset(state_dir, name)
}

/// Completes a reset a crash interrupted (see [`reset_membership`]); `None` when none was
/// under way.
pub fn finish_membership_reset(state_dir: &Path, name: &str) -> Result<Option<Identity>, ResetError> {
    if !state_dir.join(RESET_MARKER).exists() {
        return Ok(None);
    }
    warn!("completing a membership reset that was interrupted: removing the Raft state, making a new identity");
    complete_reset(state_dir, name).map(Some)
}

fn complete_reset(state_dir: &Path, name: &str) -> Result<Identity, ResetError> {
    use std::ffi::OsStr;
    let wipe = |source| ResetError::Wipe { path: state_dir.join(RAFT_DIR), source };
    let dir = crate::adapters::files::Dir::open(state_dir)
        .map_err(|source| ResetError::OpenDir { path: state_dir.to_path_buf(), source })?;
    dir.remove_tree(OsStr::new(RAFT_DIR)).map_err(wipe)?;
    let identity = Identity::create(state_dir, name)?;
    // The new identity is durable (written and its directory synced) before the marker goes.
    let unmark = |source| ResetError::Unmark { path: state_dir.join(RESET_MARKER), source };
    dir.remove_tree(OsStr::new(RESET_MARKER)).map_err(unmark)?;
    dir.sync().map_err(unmark)?;
    Ok(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10, hole 4: a reset that a crash interrupted after the Raft state went, before the
    /// new identity was written, is completed at the next start: the old id never runs again on
    /// an empty log.
    #[test]
    fn an_interrupted_membership_reset_is_completed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let old = Identity::create(dir.path(), "n1").unwrap();
        std::fs::create_dir_all(dir.path().join(RAFT_DIR)).unwrap();
        std::fs::write(dir.path().join(RAFT_DIR).join("raft.redb"), b"old log").unwrap();
        assert!(finish_membership_reset(dir.path(), "n1").unwrap().is_none(), "no reset under way");
        assert!(dir.path().join(RAFT_DIR).exists());

        // The crash: the marker is written and the Raft state removed, the identity is the old one.
        crate::adapters::files::write_atomic(&dir.path().join(RESET_MARKER), b"x", 0o600).unwrap();
        std::fs::remove_dir_all(dir.path().join(RAFT_DIR)).unwrap();
        let new = finish_membership_reset(dir.path(), "n1").unwrap().expect("the reset is completed");
        assert_ne!(new.node_id, old.node_id);
        assert_eq!(Identity::load_or_create(dir.path(), "n1").unwrap().node_id, new.node_id);
        assert!(!dir.path().join(RESET_MARKER).exists());
        assert!(finish_membership_reset(dir.path(), "n1").unwrap().is_none());

        // The whole step: the Raft state goes, a new id comes.
        std::fs::create_dir_all(dir.path().join(RAFT_DIR)).unwrap();
        let newer = reset_membership(dir.path(), "n1").unwrap();
        assert_ne!(newer.node_id, new.node_id);
        assert!(!dir.path().join(RAFT_DIR).exists() && !dir.path().join(RESET_MARKER).exists());
        assert_eq!(Identity::load_or_create(dir.path(), "n1").unwrap().node_id, newer.node_id);
    }
}
