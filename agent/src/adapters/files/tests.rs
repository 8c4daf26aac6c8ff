use super::*;
use std::os::unix::fs::PermissionsExt;

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

// Directories another user owns (issue 10, hole 1): nothing planted there may make the agent, which
// runs as root, write, chown, read or remove anything outside them.

use std::os::unix::fs::MetadataExt;

/// The user that owns the hostile directories: nobody when the tests run as root (they do in
/// `make test`); otherwise the directory is made writable by every user, which makes it just as
/// untrusted.
const NOBODY: Owner = Owner { uid: 65534, gid: 65534 };

fn as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A directory under `parent` that another user can change.
fn hostile_dir(parent: &Path, name: &str) -> PathBuf {
    let d = parent.join(name);
    std::fs::create_dir(&d).unwrap();
    if as_root() {
        std::os::unix::fs::chown(&d, Some(NOBODY.uid), Some(NOBODY.gid)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    } else {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    d
}

/// A file only root may read, outside the hostile directory: what an attacker aims at.
fn victim(parent: &Path) -> PathBuf {
    let v = parent.join("victim");
    std::fs::write(&v, b"root's secret").unwrap();
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o600)).unwrap();
    v
}

fn assert_untouched(v: &Path, uid: u32) {
    let m = std::fs::symlink_metadata(v).unwrap();
    assert_eq!(std::fs::read(v).unwrap(), b"root's secret", "the victim's contents changed");
    assert_eq!(m.mode() & 0o7777, 0o600, "the victim's mode changed");
    assert_eq!(m.uid(), uid, "the victim changed owner");
}

fn the_owner() -> Owner {
    if as_root() {
        NOBODY
    } else {
        Owner { uid: nix::unistd::geteuid().as_raw(), gid: nix::unistd::getegid().as_raw() }
    }
}

#[test]
fn a_link_planted_at_the_target_is_replaced_not_followed() {
    let top = tempfile::tempdir().unwrap();
    let v = victim(top.path());
    let uid = std::fs::metadata(&v).unwrap().uid();
    let h = hostile_dir(top.path(), "munge");
    std::os::unix::fs::symlink(&v, h.join("munge.key")).unwrap();
    write_owned(&h.join("munge.key"), b"new key", 0o400, Some(the_owner())).unwrap();
    assert_untouched(&v, uid);
    let m = std::fs::symlink_metadata(h.join("munge.key")).unwrap();
    assert!(m.file_type().is_file(), "the link was replaced by the file");
    assert_eq!((m.uid(), m.mode() & 0o7777), (the_owner().uid, 0o400));
    assert_eq!(std::fs::read(h.join("munge.key")).unwrap(), b"new key");
}

#[test]
fn a_link_planted_as_a_directory_is_refused_and_names_itself() {
    let top = tempfile::tempdir().unwrap();
    let elsewhere = top.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let h = hostile_dir(top.path(), "slurmctld");
    std::os::unix::fs::symlink(&elsewhere, h.join("hash.1")).unwrap();
    let e = write_atomic(&h.join("hash.1/job_state"), b"x", 0o600).unwrap_err();
    assert!(e.to_string().contains("hash.1 is a symbolic link"), "{e}");
    let e = ensure_dir(&h.join("hash.1/job.7"), 0o700).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "nothing was written through the link");
    // The same link in a directory only root can change is followed (/var/run -> /run).
    let trusted_link = top.path().join("run");
    std::os::unix::fs::symlink(&elsewhere, &trusted_link).unwrap();
    write_atomic(&trusted_link.join("f"), b"ok", 0o600).unwrap();
    assert_eq!(std::fs::read(elsewhere.join("f")).unwrap(), b"ok");
}

#[test]
fn a_racing_swap_never_gives_the_victim_to_the_directory_owner() {
    // The directory's owner replaces the file by a link to the victim as fast as it can while the
    // agent writes it: an owner set by path after the rename would land on the victim.
    let top = tempfile::tempdir().unwrap();
    let v = victim(top.path());
    let uid = std::fs::metadata(&v).unwrap().uid();
    let h = hostile_dir(top.path(), "slurmctld");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 2_000_000 {
                let planted = h.join(format!(".plant-{n}"));
                if std::os::unix::fs::symlink(&v, &planted).is_ok() {
                    let _ = std::fs::rename(&planted, h.join("job_state"));
                }
                n += 1;
            }
        });
        for _ in 0..2_000 {
            write_owned(&h.join("job_state"), b"state", 0o600, Some(the_owner())).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_untouched(&v, uid);
}

#[test]
fn reads_open_only_regular_files_and_never_block() {
    let top = tempfile::tempdir().unwrap();
    let v = victim(top.path());
    let h = hostile_dir(top.path(), "state");
    std::os::unix::fs::symlink(&v, h.join("link")).unwrap();
    nix::unistd::mkfifo(&h.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    std::fs::write(h.join("plain"), b"0123456789").unwrap();
    let d = Dir::open(&h).unwrap();
    assert_eq!(d.read("link".as_ref(), 100).unwrap(), None, "a link is not followed");
    assert_eq!(d.read("fifo".as_ref(), 100).unwrap(), None, "a FIFO is not read (nor waited on)");
    assert_eq!(d.read("missing".as_ref(), 100).unwrap(), None);
    let f = d.read("plain".as_ref(), 4).unwrap().unwrap();
    assert_eq!((f.data.as_slice(), f.size), (&b"0123"[..], 10), "the limit holds, the size is told");
    let mut kinds = d.entries().unwrap();
    kinds.sort();
    let want: Vec<(std::ffi::OsString, Kind)> =
        vec![("fifo".into(), Kind::Other), ("link".into(), Kind::Other), ("plain".into(), Kind::File)];
    assert_eq!(kinds, want);
}

#[test]
fn removing_a_tree_does_not_descend_into_links() {
    let top = tempfile::tempdir().unwrap();
    let elsewhere = top.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("keep"), b"k").unwrap();
    let h = hostile_dir(top.path(), "hash.1");
    std::fs::create_dir_all(h.join("job.7/deeper")).unwrap();
    std::fs::write(h.join("job.7/script"), b"s").unwrap();
    std::os::unix::fs::symlink(&elsewhere, h.join("job.7/link")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, h.join("job.8")).unwrap();
    let d = Dir::open(&h).unwrap();
    assert!(d.remove_tree("job.7".as_ref()).unwrap());
    assert!(d.remove_tree("job.8".as_ref()).unwrap(), "a link is removed itself");
    assert!(!d.remove_tree("job.9".as_ref()).unwrap());
    assert_eq!(std::fs::read_dir(&h).unwrap().count(), 0);
    assert_eq!(std::fs::read(elsewhere.join("keep")).unwrap(), b"k");
}

#[test]
fn names_with_slashes_or_dots_are_refused() {
    let top = tempfile::tempdir().unwrap();
    let d = Dir::open(top.path()).unwrap();
    for bad in ["", ".", "..", "a/b", "../x"] {
        assert!(d.write(bad.as_ref(), b"x", 0o600, None).is_err(), "{bad:?}");
        assert!(d.read(bad.as_ref(), 1).is_err(), "{bad:?}");
    }
}
