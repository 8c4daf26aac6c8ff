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
    let err = |source| WriteError { path: path.to_owned(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name = path.file_name().ok_or_else(|| err(std::io::Error::other("path has no file name")))?;
    // A name no other writer uses (concurrent writers of one path each get their own), created
    // exclusively so that nothing already there is followed or reused.
    let tmp = dir.join(format!(".{}.tmp-{:016x}", file_name.to_string_lossy(), rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The mode given to open() is filtered by the umask; set it exactly.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(err)
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
    fn error_names_the_path() {
        let e = write_atomic(Path::new("/nonexistent-dir/x"), b"", 0o600).unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x"), "{e}");
    }
}
