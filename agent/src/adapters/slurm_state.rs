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
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::adapters::files::{Dir, Kind, Owner, WriteError};
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
    #[error("cannot remove {path}: {source}")]
    Remove { path: PathBuf, source: std::io::Error },
    #[error("{0} is not a plain directory (a symbolic link?); the copy was not installed: remove it")]
    NotADirectory(PathBuf),
    #[error("the local slurmctld took control while the copy was being installed; installing stopped")]
    TookControl,
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
/// there). Only regular files owned by `owner` (the slurm user, who writes them) are read, each
/// opened without following links: the directory is the slurm user's, and nothing that user can
/// place there (a link, a FIFO, a hard link to a file of root's) may make this agent read a file
/// the slurm user cannot, into a copy that goes to another node.
pub fn collect(dir: &Path, owner: u32) -> Result<Option<StateFiles>, SlurmStateError> {
    let read_err = |path: &Path, source| SlurmStateError::Read { path: path.to_owned(), source };
    let top = match Dir::open(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(dir, e)),
    };
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    let mut add = |d: &Dir, name: &OsStr, rel: String| -> Result<(), SlurmStateError> {
        // Replaced or removed by slurmctld while we read: the next round sees the new one.
        match d.read(name, MAX_BYTES - total + 1).map_err(|e| read_err(&d.path().join(name), e))? {
            Some(f) if f.uid == owner => {
                total += f.data.len() as u64;
                if total > MAX_BYTES {
                    return Err(SlurmStateError::TooLarge { bytes: total });
                }
                files.insert(rel, f.data);
            }
            _ => {}
        }
        Ok(())
    };
    // A directory that became a link or vanished since it was listed is skipped, not followed.
    let sub = |d: &Dir, name: &OsStr| d.sub(name).ok().flatten();
    let entries = |d: &Dir| d.entries().map_err(|e| read_err(d.path(), e));
    for (name, kind) in entries(&top)? {
        let Some(n) = name.to_str() else { continue };
        if kind == Kind::File && valid_path(n) {
            add(&top, &name, n.to_string())?;
        } else if kind == Kind::Dir && is_hash_dir(n) {
            let Some(hash) = sub(&top, &name) else { continue };
            for (job, kind) in entries(&hash)? {
                let Some(j) = job.to_str() else { continue };
                if kind != Kind::Dir || !is_job_dir(j) {
                    continue;
                }
                let Some(jd) = sub(&hash, &job) else { continue };
                for (f, kind) in entries(&jd)? {
                    let Some(fname) = f.to_str() else { continue };
                    let rel = format!("{n}/{j}/{fname}");
                    if kind == Kind::File && valid_path(&rel) {
                        add(&jd, &f, rel)?;
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

/// The heartbeat file, read without following a link or waiting on a FIFO.
fn heartbeat(d: &Dir) -> Option<Vec<u8>> {
    d.read(OsStr::new(HEARTBEAT), 4096).ok().flatten().map(|f| f.data)
}

/// The heartbeat in the state directory `dir`; `None` if there is none (or it is not a file).
pub fn read_heartbeat(dir: &Path) -> Option<Vec<u8>> {
    heartbeat(&Dir::open(dir).ok()?)
}

/// The slurm user and group of the node whose file system starts at `root`.
pub fn slurm_owner(root: &Path) -> Option<Owner> {
    let uid = crate::adapters::services::lookup_id(root, "etc/passwd", "slurm")?;
    let gid = crate::adapters::services::lookup_id(root, "etc/group", "slurm")?;
    Some(Owner { uid, gid })
}

/// The job directories (`hash.N/job.ID`) present in `top`, through real directories only.
fn local_job_dirs(top: &Dir) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (h, kind) in top.entries().unwrap_or_default() {
        let Some(hn) = h.to_str().filter(|n| kind == Kind::Dir && is_hash_dir(n)) else { continue };
        let Ok(Some(hash)) = top.sub(&h) else { continue };
        for (j, _) in hash.entries().unwrap_or_default() {
            if let Some(jn) = j.to_str().filter(|n| is_job_dir(n)) {
                out.insert(format!("{hn}/{jn}"));
            }
        }
    }
    out
}

/// Installs a copy into `dir` (files 0600, directories 0700, owned by `owner`, each file
/// replaced atomically), writing only files whose contents differ and removing the directories of
/// jobs the copy no longer has. `standby` is asked before every change: the local slurmctld must
/// still be a standby. Everything happens through directories opened without following links
/// (the directory is the slurm user's; see [`Dir`]): a link where a job directory should be is
/// refused, a link where a file should be is replaced.
pub fn install(
    dir: &Path,
    copy: &StateFiles,
    owner: Owner,
    standby: &dyn Fn(Option<&[u8]>) -> bool,
) -> Result<InstallReport, SlurmStateError> {
    let io_err = |path: PathBuf| {
        move |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::NotADirectory => SlurmStateError::NotADirectory(path),
            _ => SlurmStateError::Write(WriteError { path, source }),
        }
    };
    let top = Dir::open(dir).map_err(io_err(dir.to_owned()))?;
    let standby = || standby(heartbeat(&top).as_deref());
    let mut report = InstallReport::default();
    for (rel, contents) in &copy.0 {
        if !valid_path(rel) {
            return Err(SlurmStateError::BadPath(rel.clone()));
        }
        // hash.N, then hash.N/job.ID: each a real directory, or created.
        let parts: Vec<&str> = rel.split('/').collect();
        let (name, subdirs) = parts.split_last().expect("a valid path has a name");
        let mut here = None::<Dir>;
        for part in subdirs {
            let next = {
                let parent = here.as_ref().unwrap_or(&top);
                parent.sub_create(part.as_ref(), 0o700, Some(owner)).map_err(io_err(parent.path().join(part)))?
            };
            here = Some(next);
        }
        let d = here.as_ref().unwrap_or(&top);
        let name = OsStr::new(name);
        let same = d
            .read(name, contents.len() as u64 + 1)
            .ok()
            .flatten()
            .is_some_and(|f| f.data == *contents && f.uid == owner.uid && f.gid == owner.gid && f.mode == 0o600);
        if same {
            continue;
        }
        if !standby() {
            return Err(SlurmStateError::TookControl);
        }
        d.write(name, contents, 0o600, Some(owner)).map_err(io_err(d.path().join(name)))?;
        report.written += 1;
    }
    for job in stale_job_dirs(&local_job_dirs(&top), copy) {
        if !standby() {
            return Err(SlurmStateError::TookControl);
        }
        let (hash, job_dir) = job.split_once('/').expect("job directories are hash.N/job.ID");
        let path = dir.join(&job);
        let removed = top
            .sub(hash.as_ref())
            .and_then(|h| h.map_or(Ok(false), |h| h.remove_tree(job_dir.as_ref())))
            .map_err(|source| SlurmStateError::Remove { path, source })?;
        if removed {
            report.removed += 1;
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
        let (uid, gid) = nix_ids();
        let owner = Owner { uid, gid };
        assert_eq!(collect(&src.path().join("missing"), uid).unwrap(), None);
        assert_eq!(collect(src.path(), uid).unwrap(), None, "nothing saved yet");
        std::fs::write(src.path().join("heartbeat"), "hb").unwrap();
        std::fs::write(src.path().join("job_state"), "jobs").unwrap();
        std::fs::write(src.path().join("job_state.new"), "partial").unwrap();
        std::fs::create_dir_all(src.path().join("hash.7/job.17")).unwrap();
        std::fs::write(src.path().join("hash.7/job.17/script"), "#!/bin/sh\nhostname\n").unwrap();
        let copy = collect(src.path(), uid).unwrap().unwrap();
        assert_eq!(copy.0.keys().collect::<Vec<_>>(), vec!["hash.7/job.17/script", "heartbeat", "job_state"]);

        let dst = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dst.path().join("hash.2/job.2")).unwrap();
        std::fs::write(dst.path().join("hash.2/job.2/script"), "finished job").unwrap();
        let yes = |_: Option<&[u8]>| true;
        let r = install(dst.path(), &copy, owner, &yes).unwrap();
        assert_eq!(r, InstallReport { written: 3, removed: 1 });
        assert_eq!(collect(dst.path(), uid).unwrap().unwrap(), copy);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dst.path().join("job_state")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Installing the same copy again writes nothing.
        assert_eq!(install(dst.path(), &copy, owner, &yes).unwrap(), InstallReport::default());

        // The local slurmctld took control: nothing is written.
        let newer = StateFiles(copy.0.iter().map(|(p, c)| (p.clone(), [c.as_slice(), b"+"].concat())).collect());
        let no = |_: Option<&[u8]>| false;
        assert!(matches!(install(dst.path(), &newer, owner, &no), Err(SlurmStateError::TookControl)));
        assert_eq!(collect(dst.path(), uid).unwrap().unwrap(), copy);

        // A symbolic link planted as a job directory is refused, and its target left alone.
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dst.path().join("hash.9")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dst.path().join("hash.9/job.9")).unwrap();
        let evil = StateFiles([("hash.9/job.9/script".to_string(), b"x".to_vec())].into());
        assert!(matches!(install(dst.path(), &evil, owner, &yes), Err(SlurmStateError::NotADirectory(_))));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }

    #[test]
    fn collect_reads_only_the_slurm_users_regular_files() {
        // Issue 10, hole 2: the directory is the slurm user's; a link, a FIFO or a hard link to a
        // file of root's placed there must not end up in the copy sent to the backup.
        use std::os::unix::fs::MetadataExt;
        let top = tempfile::tempdir().unwrap();
        let secret = top.path().join("cluster-secret");
        std::fs::write(&secret, "root only").unwrap();
        let dir = top.path().join("slurmctld");
        std::fs::create_dir(&dir).unwrap();
        let root = nix::unistd::geteuid().is_root();
        // The slurm user: nobody when the tests run as root (they do in make test), else us.
        let slurm = if root { 65534 } else { nix_ids().0 };
        let mine = |p: &Path| {
            if root {
                std::os::unix::fs::lchown(p, Some(slurm), Some(slurm)).unwrap();
            }
        };
        std::fs::write(dir.join("job_state"), "jobs").unwrap();
        mine(&dir.join("job_state"));
        std::os::unix::fs::symlink(&secret, dir.join("node_state")).unwrap();
        mine(&dir.join("node_state"));
        nix::unistd::mkfifo(&dir.join("part_state"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        mine(&dir.join("part_state"));
        std::fs::create_dir_all(dir.join("hash.1")).unwrap();
        std::os::unix::fs::symlink(top.path(), dir.join("hash.1/job.1")).unwrap();
        if root {
            // Root's file, linked in: its owner is root's, not slurm's.
            std::fs::hard_link(&secret, dir.join("resv_state")).unwrap();
            assert_eq!(std::fs::metadata(dir.join("resv_state")).unwrap().uid(), 0);
        }
        let copy = collect(&dir, slurm).unwrap().unwrap();
        assert_eq!(copy.0.keys().collect::<Vec<_>>(), vec!["job_state"], "only the slurm user's regular file");
        assert_eq!(collect(&dir, slurm + 1).unwrap(), None, "files of another owner are not read");
    }

    /// The test process's own uid and gid (chown to oneself works without root).
    fn nix_ids() -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::NamedTempFile::new().unwrap();
        let m = f.as_file().metadata().unwrap();
        (m.uid(), m.gid())
    }
}
