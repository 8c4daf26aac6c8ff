//! Directories opened so that nothing another user placed is followed.
//!
//! The agent runs as root and writes into directories that other users own (`/etc/munge` is
//! munge's, `/var/lib/slurm/slurmctld` is slurm's). Whoever owns such a directory can put a
//! symbolic link, a hard link or a FIFO under any name in it at any moment, so every name there
//! is hostile. [`Dir`] holds an open directory and does everything relative to it:
//!
//! - a path is opened one component at a time with `O_NOFOLLOW`; a symbolic link is followed
//!   only where it lies in a directory that root (or the agent's own user) owns and nobody else
//!   can write, since only root could have put it there (`/var/run -> /run`); anywhere else the
//!   open is refused with an error that names the link;
//! - a file is written under a random name created with `O_CREAT|O_EXCL|O_NOFOLLOW`, given its
//!   owner and mode on the open file (`fchown`, `fchmod`), synced, and renamed over the target
//!   inside the same open directory: no path is looked up again after it was checked;
//! - a file is read with `O_NOFOLLOW|O_NONBLOCK` and only if it is a regular file, up to a limit,
//!   with the owner it had when it was opened;
//! - a tree is removed by descending through directories opened with `O_NOFOLLOW`.
//!
//! It must not: follow a link in a directory another user can change, or act on a path by name
//! after checking it (`chown(path)` after `rename`).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat, readlinkat, renameat};
use nix::sys::stat::{FileStat, Mode, SFlag, fchmod, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, geteuid, unlinkat};

/// Symbolic links followed while opening one path (the kernel's own limit).
const MAX_LINKS: usize = 40;
/// Directory levels [`Dir::remove_tree`] descends.
const MAX_DEPTH: usize = 16;

/// The owner a file or directory is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// What a directory entry is, as listed (links are not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    /// A symbolic link, FIFO, socket or device.
    Other,
}

/// A regular file as read: its contents (up to the limit asked for) and what `fstat` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileData {
    pub data: Vec<u8>,
    /// The file's size when it was opened (larger than `data` when the limit cut it).
    pub size: u64,
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
}

/// A link the agent will not follow (see the module comment).
#[derive(Debug, thiserror::Error)]
#[error(
    "{link} is a symbolic link in a directory that {who} can change; links there are not followed (replace the link by a real directory or file)"
)]
pub struct UnsafeLink {
    pub link: PathBuf,
    pub who: String,
}

/// An open directory; see the module comment.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == kind
}

/// Who other than root and the agent can change a directory, or `None` if nobody can.
fn others_who_can_change(st: &FileStat) -> Option<String> {
    let owner_ok = st.st_uid == 0 || st.st_uid == geteuid().as_raw();
    match (owner_ok, st.st_mode & 0o022) {
        (true, 0) => None,
        (false, _) => Some(format!("uid {}", st.st_uid)),
        (true, m) if m & 0o002 != 0 => Some("every user".into()),
        (true, _) => Some(format!("group {}", st.st_gid)),
    }
}

/// One name inside a directory: a single normal component.
fn check_name(name: &OsStr) -> io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{name:?} is not a file name")));
    }
    Ok(())
}

fn components(p: &Path) -> impl Iterator<Item = OsString> + '_ {
    p.components().filter_map(|c| match c {
        Component::Normal(n) => Some(n.to_owned()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

fn set_owner_and_mode(fd: impl AsFd + Copy, mode: u32, owner: Option<Owner>) -> io::Result<()> {
    // The owner first: chown clears set-id bits, and the mode must end exactly as asked.
    if let Some(o) = owner {
        fchown(fd, Some(Uid::from_raw(o.uid)), Some(Gid::from_raw(o.gid)))?;
    }
    fchmod(fd, Mode::from_bits_truncate(mode))?;
    Ok(())
}

impl Dir {
    /// Opens the directory `path`, which must exist.
    pub fn open(path: &Path) -> io::Result<Dir> {
        Self::walk(path, None)
    }

    /// Opens the directory `path`, creating each missing directory on the way with `mode` and
    /// `owner` (directories that exist keep theirs).
    pub fn create(path: &Path, mode: u32, owner: Option<Owner>) -> io::Result<Dir> {
        Self::walk(path, Some((mode, owner)))
    }

    fn walk(path: &Path, create: Option<(u32, Option<Owner>)>) -> io::Result<Dir> {
        let start = if path.is_absolute() { "/" } else { "." };
        let mut fd = openat(AT_FDCWD, start, dir_flags(), Mode::empty())?;
        let mut todo: VecDeque<OsString> = components(path).collect();
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            match openat(&fd, c.as_os_str(), dir_flags(), Mode::empty()) {
                Ok(next) => fd = next,
                Err(Errno::ENOENT) => {
                    let Some((mode, owner)) = create else { return Err(Errno::ENOENT.into()) };
                    let made = match mkdirat(&fd, c.as_os_str(), Mode::from_bits_truncate(mode)) {
                        Ok(()) => true,
                        // Made by someone else meanwhile: opened like any other.
                        Err(Errno::EEXIST) => false,
                        Err(e) => return Err(e.into()),
                    };
                    let next = openat(&fd, c.as_os_str(), dir_flags(), Mode::empty())?;
                    if made {
                        set_owner_and_mode(&next, mode, owner)?;
                    }
                    fd = next;
                }
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    let st = fstatat(&fd, c.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
                    if !is_kind(&st, SFlag::S_IFLNK) {
                        return Err(io::Error::new(
                            io::ErrorKind::NotADirectory,
                            format!("{c:?} in {} is not a directory", path.display()),
                        ));
                    }
                    if let Some(who) = others_who_can_change(&fstat(&fd)?) {
                        let link = Path::new(&fd_path(&fd)).join(&c);
                        return Err(io::Error::other(UnsafeLink { link, who }));
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(Errno::ELOOP.into());
                    }
                    let target = PathBuf::from(readlinkat(&fd, c.as_os_str())?);
                    if target.is_absolute() {
                        fd = openat(AT_FDCWD, "/", dir_flags(), Mode::empty())?;
                    }
                    for (i, t) in components(&target).enumerate() {
                        todo.insert(i, t);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(Dir { fd, path: path.to_owned() })
    }

    /// The path this directory was opened by (for messages).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The subdirectory `name`: `None` if there is none; an error if `name` is a link or a file.
    pub fn sub(&self, name: &OsStr) -> io::Result<Option<Dir>> {
        check_name(name)?;
        match openat(&self.fd, name, dir_flags(), Mode::empty()) {
            Ok(fd) => Ok(Some(Dir { fd, path: self.path.join(name) })),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP | Errno::ENOTDIR) => Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a plain directory (a symbolic link?)", self.path.join(name).display()),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// The subdirectory `name`, created with `mode` and `owner` if it is missing.
    pub fn sub_create(&self, name: &OsStr, mode: u32, owner: Option<Owner>) -> io::Result<Dir> {
        check_name(name)?;
        if let Some(d) = self.sub(name)? {
            return Ok(d);
        }
        let made = match mkdirat(&self.fd, name, Mode::from_bits_truncate(mode)) {
            Ok(()) => true,
            Err(Errno::EEXIST) => false,
            Err(e) => return Err(e.into()),
        };
        let d = self.sub(name)?.ok_or_else(|| io::Error::from(Errno::ENOENT))?;
        if made {
            set_owner_and_mode(&d.fd, mode, owner)?;
        }
        Ok(d)
    }

    /// Sets this directory's permission bits.
    pub fn set_mode(&self, mode: u32) -> io::Result<()> {
        set_owner_and_mode(&self.fd, mode, None)
    }

    /// This directory's owner.
    pub fn owner(&self) -> io::Result<Owner> {
        let st = fstat(&self.fd)?;
        Ok(Owner { uid: st.st_uid, gid: st.st_gid })
    }

    /// The entries, without `.` and `..`; links are listed as [`Kind::Other`], never followed.
    pub fn entries(&self) -> io::Result<Vec<(OsString, Kind)>> {
        use nix::dir::Type;
        // A new open file description: listing must not move a shared offset.
        let mut listing = nix::dir::Dir::openat(&self.fd, ".", dir_flags(), Mode::empty())?;
        let mut out = Vec::new();
        for e in listing.iter() {
            let e = e?;
            let name = OsStr::from_bytes(e.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let kind = match e.file_type() {
                Some(Type::File) => Kind::File,
                Some(Type::Directory) => Kind::Dir,
                Some(_) => Kind::Other,
                // File systems that do not fill d_type: ask, still without following.
                None => match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) if is_kind(&st, SFlag::S_IFREG) => Kind::File,
                    Ok(st) if is_kind(&st, SFlag::S_IFDIR) => Kind::Dir,
                    Ok(_) => Kind::Other,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(e.into()),
                },
            };
            out.push((name.to_owned(), kind));
        }
        Ok(out)
    }

    /// Reads the regular file `name`, at most `limit` bytes. `None` if it is missing or is not a
    /// regular file (a link, FIFO, directory or device is never opened for reading).
    pub fn read(&self, name: &OsStr, limit: u64) -> io::Result<Option<FileData>> {
        check_name(name)?;
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        let fd = match openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT | Errno::ELOOP | Errno::ENXIO) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let st = fstat(&fd)?;
        if !is_kind(&st, SFlag::S_IFREG) {
            return Ok(None);
        }
        let mut data = Vec::new();
        std::fs::File::from(fd).take(limit).read_to_end(&mut data)?;
        Ok(Some(FileData { data, size: st.st_size as u64, uid: st.st_uid, gid: st.st_gid, mode: st.st_mode & 0o7777 }))
    }

    /// Writes `data` to a new file beside `name` (a random name, created exclusively, so nothing
    /// already there is followed or reused) with `owner` and `mode`, synced; not in place yet.
    pub fn stage(&self, name: &OsStr, data: &[u8], mode: u32, owner: Option<Owner>) -> io::Result<Staged> {
        check_name(name)?;
        let mut tmp = OsString::from(".");
        tmp.push(name);
        tmp.push(format!(".tmp-{:016x}", rand::random::<u64>()));
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = openat(&self.fd, tmp.as_os_str(), flags, Mode::from_bits_truncate(mode & 0o777))?;
        let staged =
            Staged { dir: self.fd.try_clone()?, tmp, name: name.to_owned(), path: self.path.join(name), done: false };
        set_owner_and_mode(&fd, mode, owner)?;
        let mut f = std::fs::File::from(fd);
        f.write_all(data)?;
        f.sync_all()?;
        Ok(staged)
    }

    /// [`Dir::stage`], then [`Staged::commit`].
    pub fn write(&self, name: &OsStr, data: &[u8], mode: u32, owner: Option<Owner>) -> io::Result<()> {
        self.stage(name, data, mode, owner)?.commit_io()
    }

    /// Makes the entries of this directory (files created, renamed or removed in it) durable.
    pub fn sync(&self) -> io::Result<()> {
        Ok(nix::unistd::fsync(&self.fd)?)
    }

    /// Removes `name` and everything under it, descending only through real directories.
    /// Returns whether there was anything to remove.
    pub fn remove_tree(&self, name: &OsStr) -> io::Result<bool> {
        check_name(name)?;
        self.remove_tree_at(name, 0)
    }

    fn remove_tree_at(&self, name: &OsStr, depth: usize) -> io::Result<bool> {
        match unlinkat(&self.fd, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => return Ok(true),
            Err(Errno::ENOENT) => return Ok(false),
            Err(Errno::EISDIR) => {}
            Err(e) => return Err(e.into()),
        }
        if depth >= MAX_DEPTH {
            return Err(io::Error::other(format!("{} is nested too deep to remove", self.path.join(name).display())));
        }
        if let Some(sub) = self.sub(name)? {
            for (entry, _) in sub.entries()? {
                sub.remove_tree_at(&entry, depth + 1)?;
            }
        }
        match unlinkat(&self.fd, name, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }
}

/// The path of an open directory, for messages only.
fn fd_path(fd: &OwnedFd) -> PathBuf {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_else(|_| PathBuf::from("?"))
}

/// A file written and synced under a temporary name beside its target, not in place yet: commit
/// it, or drop it to remove it. (Writing is the slow part; a caller that must decide under a lock
/// whether the file goes in place stages it first and commits under the lock.)
#[derive(Debug)]
pub struct Staged {
    dir: OwnedFd,
    tmp: OsString,
    name: OsString,
    path: PathBuf,
    done: bool,
}

impl Staged {
    /// The target's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Renames the file over its target (a link there is replaced, never followed) and syncs
    /// the directory.
    pub fn commit_io(mut self) -> io::Result<()> {
        renameat(&self.dir, self.tmp.as_os_str(), &self.dir, self.name.as_os_str())?;
        self.done = true;
        nix::unistd::fsync(&self.dir)?;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = unlinkat(&self.dir, self.tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}
