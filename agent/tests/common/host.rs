//! Host resources a test sets up and tears down: a network namespace, a small tmpfs to fill.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A network namespace of its own for a test (needs root and iproute2), deleted on drop. Its
/// loopback is up, so 127.0.0.0/8 works inside it as on the host.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("cannot run `ip` (install iproute2)");
    assert!(
        out.status.success(),
        "`ip {}` failed: {} (network namespace tests need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n NAME ARGS...`, panicking with its error output when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A small tmpfs mounted over a directory (needs root); unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size_mb: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .expect("cannot run mount");
        assert!(out.status.success(), "mount tmpfs: {} (this test needs root)", String::from_utf8_lossy(&out.stderr));
        Tmpfs { path: path.to_owned() }
    }

    /// Writes zeros into `name` until the file system is full.
    pub fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = File::create(self.path.join(name)).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while f.write(&chunk).map(|n| n > 0).unwrap_or(false) {}
        while f.write(&chunk[..64]).map(|n| n > 0).unwrap_or(false) {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}
