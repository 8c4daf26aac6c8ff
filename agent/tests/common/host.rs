//! Host resources a test sets up and tears down: a network namespace, a packet capture in it, a
//! small tmpfs to fill.

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

/// tcpdump writing the packets of a network namespace's loopback that match a filter to a file
/// (needs root and tcpdump: scripts/install-host-deps). Stopped on drop.
pub struct Capture {
    child: std::process::Child,
    pub path: PathBuf,
}

impl Capture {
    /// Starts tcpdump in `ns` on `lo` with `filter`, writing every packet as it comes (`-U`) to
    /// `path`; returns once tcpdump says it listens (or panics with what it said instead).
    pub fn start(ns: &NetNs, filter: &str, path: &Path) -> Capture {
        use std::io::BufRead;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "tcpdump", "-i", "lo", "-n", "-U", "-s", "0", "-w"])
            .arg(path)
            .arg(filter)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("cannot run `ip netns exec ... tcpdump` (install tcpdump: scripts/install-host-deps)");
        let stderr = child.stderr.take().unwrap();
        let mut said = String::new();
        // tcpdump writes "listening on lo, ..." once its capture runs, or an error and exits:
        // either way a line comes (or the pipe closes).
        let mut lines = std::io::BufReader::new(stderr).lines();
        for line in lines.by_ref() {
            let line = line.unwrap_or_default();
            said.push_str(&line);
            said.push('\n');
            if line.contains("listening on") {
                // Keep draining its stderr so it never blocks on a full pipe.
                std::thread::spawn(move || for _ in lines {});
                return Capture { child, path: path.to_owned() };
            }
        }
        let _ = child.wait();
        panic!("tcpdump did not start a capture: {said}");
    }

    /// Stops tcpdump (SIGTERM: it writes out what it holds) and returns the capture file.
    pub fn stop(mut self) -> Vec<u8> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        std::fs::read(&self.path).expect("the capture file")
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
