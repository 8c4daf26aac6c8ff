//! The SLURM controller's state directory (StateSaveLocation), replicated through Raft.
//!
//! A standby slurmctld needs the primary's state to take over: SLURM expects a file system shared
//! by both. ClusterOS nodes share nothing but the Raft log, so the controller's agent copies the
//! directory into the cluster state (sealed with the cluster key: job environments may hold user
//! secrets) whenever it changes, and the backup's agent installs the newest copy into its own
//! directory while its slurmctld waits in standby. The copy lags the primary by at most the
//! publish period (5 s), and SLURM's own saves already lag by up to 5 s; jobs submitted in that
//! window can be lost at a failover, every earlier job is kept.
//!
//! What is copied: the regular files at the top of the directory (job_state, node_state,
//! part_state, resv_state, trigger_state, their `.old` copies, clustername, heartbeat, ...) and
//! each job's `hash.N/job.ID/{script,environment}`. Files SLURM is writing (`*.new`) are not.
//!
//! The file-system side: [`collect`] reads the directory, [`install`] writes a copy; path checks
//! and digests are pure helpers here, and the decisions on heartbeats (who is in control, when a
//! standby may install) are [`crate::core::slurm_copy`]'s.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::core::slurm_copy::{HEARTBEAT_FRESH_SECS, in_control, may_install, parse_heartbeat};

/// slurm.conf's StateSaveLocation.
pub const STATE_DIR: &str = "/var/lib/slurm/slurmctld";
/// The name the copy is sealed under.
pub const SEAL_NAME: &str = "slurm-state";
/// Largest directory that is replicated; beyond it the copy stops and status says why.
pub const MAX_BYTES: u64 = 16 * 1024 * 1024;
/// The file the primary rewrites every few seconds; it alone changing is not worth a Raft write.
pub const HEARTBEAT: &str = "heartbeat";

#[derive(Debug, thiserror::Error)]
pub enum SlurmStateError {
    #[error("cannot read the SLURM state directory {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "the SLURM state directory is {bytes} bytes, over the replication limit of {MAX_BYTES}; the backup controller no longer gets the job state (finish or cancel jobs to shrink it)"
    )]
    TooLarge { bytes: u64 },
    #[error("the replicated SLURM state holds an unsafe path {0:?}; it was not installed")]
    BadPath(String),
    #[error("the replicated SLURM state is not valid: {0}")]
    Decode(String),
    #[error(transparent)]
    Write(#[from] crate::adapters::files::WriteError),
    #[error("cannot set the owner of {path}: {source}")]
    Chown { path: PathBuf, source: std::io::Error },
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
    #[error("{0} is not a plain directory (a symbolic link?); the copy was not installed: remove it")]
    NotADirectory(PathBuf),
    #[error("the local slurmctld took control while the copy was being installed; installing stopped")]
    TookControl,
}

/// Whether `p` is a real directory (not a symbolic link to one).
fn real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_dir())
}

/// The files of a state directory: relative path -> contents.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StateFiles(pub BTreeMap<String, Vec<u8>>);

#[derive(Serialize, Deserialize)]
struct Wire(BTreeMap<String, String>);

impl StateFiles {
    pub fn bytes(&self) -> u64 {
        self.0.values().map(|v| v.len() as u64).sum()
    }

    /// SHA-256 over paths and contents; without the heartbeat when `with_heartbeat` is false.
    pub fn digest(&self, with_heartbeat: bool) -> String {
        let mut h = Sha256::new();
        for (p, c) in self.0.iter().filter(|(p, _)| with_heartbeat || p.as_str() != HEARTBEAT) {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
            h.update((c.len() as u64).to_le_bytes());
            h.update(c);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn to_json(&self) -> Vec<u8> {
        let wire = Wire(self.0.iter().map(|(p, c)| (p.clone(), B64.encode(c))).collect());
        serde_json::to_vec(&wire).expect("a map of strings serializes")
    }

    /// Decodes a copy and checks every path (a corrupt or hostile copy must not write outside the
    /// state directory).
    pub fn from_json(data: &[u8]) -> Result<StateFiles, SlurmStateError> {
        let wire: Wire = serde_json::from_slice(data).map_err(|e| SlurmStateError::Decode(e.to_string()))?;
        let mut files = BTreeMap::new();
        for (p, c) in wire.0 {
            if !valid_path(&p) {
                return Err(SlurmStateError::BadPath(p));
            }
            let c = B64.decode(c).map_err(|e| SlurmStateError::Decode(format!("{p}: {e}")))?;
            files.insert(p, c);
        }
        Ok(StateFiles(files))
    }

    /// The job directories (`hash.N/job.ID`) in this copy.
    fn job_dirs(&self) -> BTreeSet<String> {
        self.0.keys().filter_map(|p| p.rsplit_once('/').map(|(d, _)| d.to_string())).collect()
    }
}

fn plain_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.starts_with('.') && !s.contains(['/', '\0'])
}

fn is_hash_dir(s: &str) -> bool {
    s.strip_prefix("hash.").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_job_dir(s: &str) -> bool {
    s.strip_prefix("job.").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A path the copy may hold: `NAME` (a top-level file, not one being written) or
/// `hash.N/job.ID/NAME`.
pub fn valid_path(p: &str) -> bool {
    let parts: Vec<&str> = p.split('/').collect();
    match parts.as_slice() {
        [name] => plain_name(name) && !name.ends_with(".new") && !is_hash_dir(name),
        [hash, job, name] => is_hash_dir(hash) && is_job_dir(job) && plain_name(name),
        _ => false,
    }
}

/// Reads the state directory. `Ok(None)` while it is missing or empty (slurmctld has not run
/// there).
pub fn collect(dir: &Path) -> Result<Option<StateFiles>, SlurmStateError> {
    let read_err = |path: &Path, source| SlurmStateError::Read { path: path.to_owned(), source };
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    let mut add = |rel: String, path: &Path, files: &mut BTreeMap<String, Vec<u8>>| -> Result<(), SlurmStateError> {
        match std::fs::read(path) {
            Ok(c) => {
                total += c.len() as u64;
                if total > MAX_BYTES {
                    return Err(SlurmStateError::TooLarge { bytes: total });
                }
                files.insert(rel, c);
                Ok(())
            }
            // Replaced or removed by slurmctld while we read: the next round sees the new one.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(read_err(path, e)),
        }
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| read_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_file() && valid_path(&name) {
            add(name, &entry.path(), &mut files)?;
        } else if ft.is_dir() && is_hash_dir(&name) {
            let jobs = match std::fs::read_dir(entry.path()) {
                Ok(j) => j,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(read_err(&entry.path(), e)),
            };
            for job in jobs.flatten() {
                let job_name = job.file_name().to_string_lossy().into_owned();
                if !job.file_type().is_ok_and(|t| t.is_dir()) || !is_job_dir(&job_name) {
                    continue;
                }
                let Ok(inner) = std::fs::read_dir(job.path()) else { continue };
                for f in inner.flatten() {
                    let rel = format!("{name}/{job_name}/{}", f.file_name().to_string_lossy());
                    if f.file_type().is_ok_and(|t| t.is_file()) && valid_path(&rel) {
                        add(rel, &f.path(), &mut files)?;
                    }
                }
            }
        }
    }
    if files.is_empty() {
        return Ok(None);
    }
    Ok(Some(StateFiles(files)))
}

/// What installing a copy changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    pub written: usize,
    pub removed: usize,
}

/// Job directories present locally but not in the copy: jobs that have finished on the primary.
pub fn stale_job_dirs(local: &BTreeSet<String>, copy: &StateFiles) -> BTreeSet<String> {
    let keep = copy.job_dirs();
    local.difference(&keep).cloned().collect()
}

fn local_job_dirs(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for h in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let hn = h.file_name().to_string_lossy().into_owned();
        if !is_hash_dir(&hn) || !real_dir(&h.path()) {
            continue;
        }
        for j in std::fs::read_dir(h.path()).into_iter().flatten().flatten() {
            let jn = j.file_name().to_string_lossy().into_owned();
            if is_job_dir(&jn) {
                out.insert(format!("{hn}/{jn}"));
            }
        }
    }
    out
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), SlurmStateError> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|source| SlurmStateError::Chown { path: path.to_owned(), source })
}

/// Installs a copy into `dir` (files 0600, directories 0700, owned by `uid:gid`, each file
/// replaced atomically), writing only files whose contents differ and removing the directories of
/// jobs the copy no longer has. `standby` is asked before every change: the local slurmctld must
/// still be a standby. Symbolic links in the job directories (the directory is the slurm user's)
/// are refused, never followed.
pub fn install(
    dir: &Path,
    copy: &StateFiles,
    uid: u32,
    gid: u32,
    standby: &dyn Fn() -> bool,
) -> Result<InstallReport, SlurmStateError> {
    let mut report = InstallReport::default();
    for (rel, contents) in &copy.0 {
        if !valid_path(rel) {
            return Err(SlurmStateError::BadPath(rel.clone()));
        }
        let path = dir.join(rel);
        let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
        if is_file && std::fs::read(&path).is_ok_and(|c| c == *contents) {
            continue;
        }
        // hash.N, then hash.N/job.ID: each must be a real directory or absent (then created).
        let mut sub = dir.to_path_buf();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            sub.push(part);
            if std::fs::symlink_metadata(&sub).is_err() {
                crate::adapters::files::ensure_dir(&sub, 0o700)?;
                chown(&sub, uid, gid)?;
            } else if !real_dir(&sub) {
                return Err(SlurmStateError::NotADirectory(sub));
            }
        }
        if !standby() {
            return Err(SlurmStateError::TookControl);
        }
        // The rename replaces a symbolic link itself, never its target.
        crate::adapters::files::write_atomic(&path, contents, 0o600)?;
        chown(&path, uid, gid)?;
        report.written += 1;
    }
    for job in stale_job_dirs(&local_job_dirs(dir), copy) {
        if !standby() {
            return Err(SlurmStateError::TookControl);
        }
        let path = dir.join(&job);
        match std::fs::remove_dir_all(&path) {
            Ok(()) => report.removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(SlurmStateError::Remove { path, source }),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_state_files_and_job_files_are_valid_paths() {
        for ok in ["job_state", "job_state.old", "heartbeat", "clustername", "hash.3/job.17/script"] {
            assert!(valid_path(ok), "{ok}");
        }
        for bad in [
            "",
            "job_state.new",
            ".hidden",
            "../etc/passwd",
            "/etc/passwd",
            "hash.3",
            "hash.3/job.17",
            "hash.x/job.17/script",
            "hash.3/job.17/../../x",
            "hash.3/job.17/a/b",
            "hash.3/evil/script",
            "a/b",
        ] {
            assert!(!valid_path(bad), "{bad:?} accepted");
        }
    }

    fn files(pairs: &[(&str, &str)]) -> StateFiles {
        StateFiles(pairs.iter().map(|(p, c)| (p.to_string(), c.as_bytes().to_vec())).collect())
    }

    #[test]
    fn digest_can_ignore_the_heartbeat() {
        let a = files(&[("job_state", "1"), ("heartbeat", "t1")]);
        let b = files(&[("job_state", "1"), ("heartbeat", "t2")]);
        assert_eq!(a.digest(false), b.digest(false));
        assert_ne!(a.digest(true), b.digest(true));
        assert_ne!(a.digest(false), files(&[("job_state", "2"), ("heartbeat", "t1")]).digest(false));
    }

    #[test]
    fn json_round_trip_and_bad_paths_are_refused() {
        let a = files(&[("job_state", "\u{0}\u{1}binary"), ("hash.1/job.1/script", "#!/bin/sh")]);
        assert_eq!(StateFiles::from_json(&a.to_json()).unwrap(), a);
        let evil = br#"{"../../etc/shadow":"eA=="}"#;
        assert!(matches!(StateFiles::from_json(evil), Err(SlurmStateError::BadPath(_))));
        assert!(matches!(StateFiles::from_json(b"nope"), Err(SlurmStateError::Decode(_))));
    }

    #[test]
    fn collect_then_install_reproduces_the_directory() {
        let src = tempfile::tempdir().unwrap();
        assert_eq!(collect(&src.path().join("missing")).unwrap(), None);
        assert_eq!(collect(src.path()).unwrap(), None, "nothing saved yet");
        std::fs::write(src.path().join("heartbeat"), "hb").unwrap();
        std::fs::write(src.path().join("job_state"), "jobs").unwrap();
        std::fs::write(src.path().join("job_state.new"), "partial").unwrap();
        std::fs::create_dir_all(src.path().join("hash.7/job.17")).unwrap();
        std::fs::write(src.path().join("hash.7/job.17/script"), "#!/bin/sh\nhostname\n").unwrap();
        let copy = collect(src.path()).unwrap().unwrap();
        assert_eq!(copy.0.keys().collect::<Vec<_>>(), vec!["hash.7/job.17/script", "heartbeat", "job_state"]);

        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dst.path().join("hash.2/job.2")).unwrap();
        std::fs::write(dst.path().join("hash.2/job.2/script"), "finished job").unwrap();
        let (uid, gid) = nix_ids();
        let yes = || true;
        let r = install(dst.path(), &copy, uid, gid, &yes).unwrap();
        assert_eq!(r, InstallReport { written: 3, removed: 1 });
        assert_eq!(collect(dst.path()).unwrap().unwrap(), copy);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dst.path().join("job_state")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Installing the same copy again writes nothing.
        assert_eq!(install(dst.path(), &copy, uid, gid, &yes).unwrap(), InstallReport::default());

        // The local slurmctld took control: nothing is written.
        let newer = StateFiles(copy.0.iter().map(|(p, c)| (p.clone(), [c.as_slice(), b"+"].concat())).collect());
        let no = || false;
        assert!(matches!(install(dst.path(), &newer, uid, gid, &no), Err(SlurmStateError::TookControl)));
        assert_eq!(collect(dst.path()).unwrap().unwrap(), copy);

        // A symbolic link planted as a job directory is refused, and its target left alone.
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dst.path().join("hash.9")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dst.path().join("hash.9/job.9")).unwrap();
        let evil = StateFiles([("hash.9/job.9/script".to_string(), b"x".to_vec())].into());
        assert!(matches!(install(dst.path(), &evil, uid, gid, &yes), Err(SlurmStateError::NotADirectory(_))));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    /// The test process's own uid and gid (chown to oneself works without root).
    fn nix_ids() -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::NamedTempFile::new().unwrap();
        let m = f.as_file().metadata().unwrap();
        (m.uid(), m.gid())
    }
}
