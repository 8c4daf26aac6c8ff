//! ClusterOS end-to-end test harness: boots the real image (target/image) under QEMU and checks the
//! nodes from inside the guests, in the style of cloud-hypervisor's `test_infra`.
//!
//! - [`TestEnv`]: one per test. Snapshots the image into a private run directory, times phases
//!   (`e2e: <phase> <seconds>`), and owns the log directory used when the test fails.
//! - [`NetNs`]: a network namespace with a bridge and one tap per VM (a private LAN); deleted on drop.
//! - [`VmBuilder`] / [`Vm`]: one QEMU process in its own process group, killed on drop. Commands run
//!   in the guest through qemu-guest-agent ([`Vm::exec`]), power-off goes through QMP.
//! - [`ClusterBuilder`] / [`Cluster`]: N nodes with one secret, joined to each other.
//! - [`wait_until`]: every wait polls a condition with a deadline; nothing sleeps a fixed time.
//!
//! When a test panics, each VM's serial console, QEMU log and journal are saved under
//! `target/e2e-logs/<test>/` and the path is printed; a passing test prints only its phase times.
//! The tests themselves (`tests/services.rs`, `tests/images.rs`, `tests/containers.rs`) need the `e2e` feature, root and a built image.

pub mod checks;
pub mod cluster;
pub mod faults;
pub mod image;
pub mod netns;
pub mod nspawn;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub use cluster::{Cluster, ClusterBuilder, MemberStatus, RaftStatus, Status, StatusExt, credential};
pub use image::Image;
pub use netns::NetNs;
pub use nspawn::{Container, ContainerBuilder};
pub use qemu::{Accel, Boot, DiskFormat, Machine};
pub use qga::Output;
pub use vm::{Vm, VmBuilder};

/// The repository root (the workspace this crate lives in).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Cargo's target directory (`CARGO_TARGET_DIR` or `<repo>/target`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            if d.is_absolute() { d } else { repo_root().join(d) }
        }
        None => repo_root().join("target"),
    }
}

/// A timeout sized for TCG, multiplied by `CLUSTEROS_E2E_TIMEOUT_SCALE` (e.g. 2 on a slower host).
pub fn timeout(secs: u64) -> Duration {
    let scale = std::env::var("CLUSTEROS_E2E_TIMEOUT_SCALE").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(1.0);
    Duration::from_secs_f64(secs as f64 * scale.max(0.1))
}

/// Polls `check` until it returns `Ok`, at most `timeout` long. `Err` means "not yet"; the last
/// error is part of the timeout message, so a failed wait says what it saw; an [`Abort`] error
/// ends the wait at once. Polls quickly at first, then every 2 s.
pub fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T>) -> Result<T> {
    let start = Instant::now();
    let mut delay = Duration::from_millis(200);
    let mut checks = 0u32;
    let mut last_err: Option<String> = None;
    loop {
        checks += 1;
        let err = match check() {
            Ok(v) => {
                // A slow success is worth a line: what kept failing, for the next person.
                if start.elapsed() > Duration::from_secs(30)
                    && let Some(e) = last_err
                {
                    eprintln!(
                        "e2e: waited {:.0} s ({checks} checks) for {what}; last failure: {e}",
                        start.elapsed().as_secs_f64()
                    );
                }
                return Ok(v);
            }
            Err(e) if e.is::<Abort>() => return Err(e.context(format!("while waiting for {what}"))),
            Err(e) => e,
        };
        let elapsed = start.elapsed();
        if elapsed >= timeout {
            bail!("timed out after {:.0} s ({checks} checks) waiting for {what}; last: {err:#}", elapsed.as_secs_f64());
        }
        last_err = Some(format!("{err:#}"));
        // Polling interval, bounded by the deadline.
        std::thread::sleep(delay.min(timeout - elapsed));
        delay = (delay * 3 / 2).min(Duration::from_secs(2));
    }
}

/// Returned from a [`wait_until`] check to stop waiting at once: the condition can no longer
/// become true (e.g. the VM exited, or the system ended degraded).
#[derive(Debug)]
pub struct Abort(pub String);

impl Abort {
    pub fn new(msg: impl Into<String>) -> Abort {
        Abort(msg.into())
    }
}

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Abort {}

/// Turns an error into a panic whose message carries the whole context chain. Test steps return
/// `Result` and the test calls `.or_fail(..)` while its VMs are still alive, so that their logs are
/// saved as they unwind.
pub trait OrFail<T> {
    fn or_fail(self, what: &str) -> T;
}

impl<T> OrFail<T> for Result<T> {
    fn or_fail(self, what: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{what}: {e:#}"),
        }
    }
}

/// Prints `e2e: <phase> <seconds>` lines.
pub struct Timer {
    start: Instant,
    last: Mutex<Instant>,
}

impl Timer {
    fn new() -> Self {
        let now = Instant::now();
        Timer { start: now, last: Mutex::new(now) }
    }

    /// Ends a phase that began when the previous one ended; returns its length.
    pub fn phase(&self, name: &str) -> Duration {
        let now = Instant::now();
        let mut last = self.last.lock().expect("timer lock");
        let d = now - *last;
        *last = now;
        print_phase(name, d);
        d
    }

    /// Records a phase measured by the caller (e.g. one of several VMs booting at once).
    pub fn record(&self, name: &str, d: Duration) {
        print_phase(name, d);
    }

    pub fn total(&self) -> Duration {
        self.start.elapsed()
    }
}

fn print_phase(name: &str, d: Duration) {
    println!("e2e: {name} {:.1}", d.as_secs_f64());
}

/// One test's surroundings: run directory (image snapshot, VM disks and sockets), log directory
/// for failures, phase timer. Create it first in a test and keep it alive until the end.
pub struct TestEnv {
    name: String,
    run_dir: PathBuf,
    log_dir: PathBuf,
    image: Image,
    pub timer: Timer,
    netns_count: Mutex<u32>,
}

impl TestEnv {
    /// Sets up the run directory for test `name` and snapshots the image from
    /// `CLUSTEROS_IMAGE_DIR` (default `target/image`). Also removes VMs and namespaces that an
    /// earlier, killed run of this harness left behind.
    pub fn new(name: &str) -> Result<Arc<TestEnv>> {
        if !is_root() {
            bail!("the e2e tests need root (network namespaces, taps)");
        }
        netns::sweep_stale();
        vm::sweep_stale();
        let timer = Timer::new();
        let run_dir = short_run_dir(name)?;
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
        let image = Image::snapshot(&image::image_dir(), &run_dir.join("image"))?;
        let log_dir = target_dir().join("e2e-logs").join(name);
        // Logs of an earlier failure of this test would be confused with this run's.
        let _ = std::fs::remove_dir_all(&log_dir);
        let env = TestEnv { name: name.into(), run_dir, log_dir, image, timer, netns_count: Mutex::new(0) };
        env.timer.phase(&format!("{name}/setup"));
        Ok(Arc::new(env))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// Where a failing test's logs go: `target/e2e-logs/<test>/`.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    /// A new network namespace (bridge 10.77.0.1/24) for this test.
    pub fn netns(&self) -> Result<Arc<NetNs>> {
        let n = {
            let mut c = self.netns_count.lock().expect("netns counter");
            *c += 1;
            *c
        };
        NetNs::new(n).map(Arc::new)
    }

    /// A VM named `name` (also its hostname); see [`VmBuilder`].
    pub fn vm(self: &Arc<Self>, name: &str) -> VmBuilder {
        VmBuilder::new(self.clone(), name)
    }

    /// A container `name` (also its hostname) on `net` with the address of node `index`; see
    /// [`ContainerBuilder`].
    pub fn container(self: &Arc<Self>, name: &str, net: &Arc<NetNs>, index: u8) -> ContainerBuilder {
        ContainerBuilder::new(self.clone(), name, net, index)
    }

    /// The log directory (created): failure logs and stalled-boot evidence go there.
    fn failure_dir(&self) -> PathBuf {
        let _ = std::fs::create_dir_all(&self.log_dir);
        self.log_dir.clone()
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if std::thread::panicking() && self.log_dir.exists() {
            eprintln!("e2e: {} failed; logs in {}", self.name, self.log_dir.display());
        }
        if std::env::var_os("CLUSTEROS_E2E_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}

/// Longest unix socket path (sun_path holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// `target/e2e-run/<test>` when the VMs' unix socket paths (`<run>/<vm>/qga.sock`, VM names up to
/// 20 characters) fit, else `/tmp/clusteros-e2e-<pid>/<test>`.
fn short_run_dir(name: &str) -> Result<PathBuf> {
    let fits = |p: &Path| p.as_os_str().len() + "/".len() + 20 + "/qga.sock".len() <= MAX_SOCKET_PATH;
    let preferred = target_dir().join("e2e-run").join(name);
    if fits(&preferred) {
        return Ok(preferred);
    }
    let tmp = std::env::temp_dir().join(format!("clusteros-e2e-{}", std::process::id())).join(name);
    if !fits(&tmp) {
        bail!("no run directory short enough for unix sockets: {}", tmp.display());
    }
    Ok(tmp)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // No libc (unsafe is forbidden): /proc tells our effective uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A machine the tests run commands in: a QEMU VM ([`Vm`]) or an nspawn container ([`Container`]).
pub trait Guest {
    fn name(&self) -> &str;
    /// Runs `argv` (no shell) and fails if it does not finish within `limit`.
    fn exec_timeout(&self, argv: &[&str], limit: Duration) -> Result<Output>;
}

impl Guest for Vm {
    fn name(&self) -> &str {
        Vm::name(self)
    }
    fn exec_timeout(&self, argv: &[&str], limit: Duration) -> Result<Output> {
        Vm::exec_timeout(self, argv, limit)
    }
}

/// Writes a new file that only its owner can read (secrets, credentials).
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)?;
    Ok(())
}

/// Runs a host command, failing with its stderr.
pub fn run_cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_the_first_success() {
        let mut n = 0;
        let v = wait_until(Duration::from_secs(5), "n to reach 3", || {
            n += 1;
            if n >= 3 { Ok(n) } else { bail!("n is {n}") }
        })
        .unwrap();
        assert_eq!(v, 3);
    }

    #[test]
    fn wait_until_stops_on_abort() {
        let t0 = Instant::now();
        let e =
            wait_until(Duration::from_secs(30), "x", || -> Result<()> { Err(Abort::new("gone").into()) }).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(format!("{e:#}").contains("gone"));
    }

    #[test]
    fn wait_until_times_out_with_the_last_reason() {
        let e = wait_until(Duration::from_millis(300), "never", || -> Result<()> { bail!("still no") }).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("waiting for never") && msg.contains("still no"), "{msg}");
    }
}
