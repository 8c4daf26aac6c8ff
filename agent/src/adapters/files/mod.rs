//! Durable file writes: write a temporary file beside the target, fsync it, rename it over the
//! target and fsync the directory, so a crash leaves either the old or the new content. Every
//! path goes through [`Dir`], which follows no link another user could have placed.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
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

mod dir;

pub use dir::{Dir, FileData, Kind, Owner, Staged, UnsafeLink};

/// Splits a file's path into its directory and its name.
fn split(path: &Path) -> Result<(&Path, &std::ffi::OsStr), WriteError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| WriteError { path: path.to_owned(), source: std::io::Error::other("path has no file name") })?;
    Ok((dir, name))
}

/// Atomically replaces `path` with `data`, created with permission bits `mode`.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), WriteError> {
    write_owned(path, data, mode, None)
}

/// Atomically replaces `path` with `data`, with `mode` and `owner` set on the new file before it
/// goes in place. Safe in a directory another user owns: see [`Dir`].
pub fn write_owned(path: &Path, data: &[u8], mode: u32, owner: Option<Owner>) -> Result<(), WriteError> {
    let (dir, name) = split(path)?;
    let err = |source| WriteError { path: path.to_owned(), source };
    Dir::open(dir).and_then(|d| d.write(name, data, mode, owner)).map_err(err)
}

/// Writes `data` to a temporary file beside `path` (a name no other writer uses, created
/// exclusively so that nothing already there is followed or reused), with mode `mode`, synced.
pub fn stage(path: &Path, data: &[u8], mode: u32) -> Result<Staged, WriteError> {
    let (dir, name) = split(path)?;
    let err = |source| WriteError { path: path.to_owned(), source };
    Dir::open(dir).and_then(|d| d.stage(name, data, mode, None)).map_err(err)
}

impl Staged {
    /// Renames the file over its target and syncs the directory.
    pub fn commit(self) -> Result<(), WriteError> {
        let path = self.path().to_owned();
        self.commit_io().map_err(|source| WriteError { path, source })
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

/// Creates a directory (and missing parents) with the given mode, and sets the mode if it exists.
pub fn ensure_dir(path: &Path, mode: u32) -> Result<(), WriteError> {
    let err = |source| WriteError { path: path.to_owned(), source };
    Dir::create(path, mode, None).and_then(|d| d.set_mode(mode)).map_err(err)
}

#[cfg(test)]
mod tests;
