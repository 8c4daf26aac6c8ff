//! Durable file writes: write a temporary file beside the target, fsync it, rename it over the
//! target and fsync the directory, so a crash leaves either the old or the new content.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}{hint}", hint = hint(source))]
pub struct WriteError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn hint(e: &std::io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(28) => " (the disk is full: free space and the agent will retry)",
        Some(30) => " (read-only file system)",
        Some(13) => " (permission denied: the agent must run as root)",
        _ => "",
    }
}

/// Atomically replaces `path` with `data`, created with permission bits `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    stage(path, data, mode)?.commit()
}

/// A file written and synced under a temporary name beside its target, not in place yet: commit
/// it, or drop it to remove it. (Writing is the slow part; a caller that must decide under a lock
/// whether the file goes in place stages it first and commits under the lock.)
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    done: bool,
}

/// Writes `data` to a temporary file beside `path` (a name no other writer uses, created
/// exclusively so that nothing already there is followed or reused), with mode `mode`, synced.
pub fn stage(path: &Path, data: &[u8], mode: u32) -> Result<Staged, WriteError> {
    let err = |source| WriteError { path: path.to_owned(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().ok_or_else(|| err(std::io::Error::other("path has no file name")))?;
    let tmp = dir.join(format!(".{}.tmp-{:016x}", file_name.to_string_lossy(), rand::random::<u64>()));
    let staged = Staged { tmp, path: path.to_owned(), done: false };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&staged.tmp).map_err(err)?;
    (|| {
        // The mode given to open() is filtered by the umask; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()
    })()
    .map_err(err)?;
    Ok(staged)
}

impl Staged {
    /// Renames the file over its target and syncs the directory.
    pub fn commit(mut self) -> Result<(), WriteError> {
        let err = |source| WriteError { path: self.path.clone(), source };
        std::fs::rename(&self.tmp, &self.path).map_err(err)?;
        self.done = true;
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Removes temporary files that [`stage`] and [`probe_writable`] leave behind when the process
/// dies between writing and renaming (they take space, exactly when a disk is full).
pub fn remove_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".space-probe-") || (name.starts_with('.') && name.contains(".tmp-")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Checks that `dir` takes writes: creates a probe file, writes `bytes` bytes, syncs it and
/// removes it. A full or read-only file system fails here, before anything else is written.
pub fn probe_writable(dir: &Path, bytes: usize) -> Result<(), WriteError> {
    let path = dir.join(format!(".space-probe-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&path)?;
        let chunk = vec![0u8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            f.write_all(&chunk[..n])?;
            left -= n;
        }
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result.map_err(|source| WriteError { path: dir.to_owned(), source })
}

/// Creates a directory (and parents) with the given mode if it does not exist.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<(), WriteError> {
    let err = |source| WriteError { path: path.to_owned(), source };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o640).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o640);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }

    #[test]
    fn concurrent_writers_of_one_path_each_replace_it_whole() {
        // Two writers of one file (openraft builds and installs snapshots concurrently) must
        // not share a temporary file: each rename must succeed and leave one whole version.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("snap");
        let a = vec![b'a'; 64 * 1024];
        let b = vec![b'b'; 96 * 1024];
        std::thread::scope(|s| {
            for data in [&a, &b] {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..200 {
                        write_atomic(p, data, 0o600).unwrap();
                    }
                });
            }
        });
        let got = std::fs::read(&p).unwrap();
        assert!(got == a || got == b, "a torn file of {} bytes", got.len());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left behind");
    }

    #[test]
    fn probe_leaves_nothing_and_names_a_missing_directory() {
        let dir = tempfile::tempdir().unwrap();
        probe_writable(dir.path(), 100_000).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let e = probe_writable(&dir.path().join("missing"), 10).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn a_dropped_stage_leaves_nothing_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        drop(stage(&p, b"x", 0o600).unwrap());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        // What a crash between write and rename leaves:
        std::mem::forget(stage(&p, b"x", 0o600).unwrap());
        std::fs::write(dir.path().join(".space-probe-00ff"), b"").unwrap();
        std::fs::write(dir.path().join("kept"), b"").unwrap();
        remove_leftovers(dir.path());
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("kept")]);
    }

    #[test]
    fn error_names_the_path() {
        let e = write_atomic(Path::new("/nonexistent-dir/x"), b"", 0o600).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x"), "{e}");
    }
}
