//! One QEMU VM booting a qcow2 overlay on the image snapshot.
//!
//! The QEMU process runs in its own process group (inside the test's network namespace when the
//! VM has a NIC) and is killed on drop. The guest is reached through qemu-guest-agent
//! ([`Vm::exec`]); an ACPI power-off goes through QMP ([`Vm::power_off`]) and [`Vm::start`] boots
//! the same disk again. If the test is panicking when a `Vm` drops, its serial console, QEMU log
//! and journal are saved to the test's log directory first.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::netns::{NetNs, harness_alive};
use crate::qemu::{Accel, Disk, DiskBus, DiskOrigin, Firmware, Machine, NetBackend, Nic};
pub use crate::qemu::{Boot, DiskFormat};
use crate::qga::{Output, Qga};
use crate::{Abort, TestEnv, run_cmd, wait_until};

/// Every QEMU this harness starts runs with `-name ce2e-<pid of the test process>-<vm>`.
const NAME_PREFIX: &str = "ce2e-";
/// A boot whose guest agent has not answered this long after QEMU started is taken as stalled
/// (scaled by CLUSTEROS_E2E_TIMEOUT_SCALE; CLUSTEROS_E2E_BOOT_STALL=SECONDS overrides). The agent
/// normally answers 30-120 s after QEMU starts here.
pub const BOOT_STALL: Duration = Duration::from_secs(240);

/// The guest agent did not answer within [`BOOT_STALL`] of QEMU's start.
#[derive(Debug)]
struct Stalled(Duration);

impl std::fmt::Display for Stalled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "boot stalled: no answer from the guest agent {:.0} s after QEMU started", self.0.as_secs_f64())
    }
}

impl std::error::Error for Stalled {}

/// Default limit for one command in the guest.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// What the VM boots from.
#[derive(Debug, Clone)]
enum SystemDisk {
    /// An overlay on the image's raw disk (the default).
    Image,
    /// An overlay on another disk image (e.g. a site image made from it).
    Overlay(PathBuf, DiskFormat),
    /// This disk file itself (e.g. the raw image flashed onto a bigger disk).
    Flashed(PathBuf),
    /// No disk at all (a network boot).
    None,
}

pub struct VmBuilder {
    env: Arc<TestEnv>,
    name: String,
    boot: Result<Boot, String>,
    mem_mib: u32,
    cpus: u32,
    disk_size: String,
    system: SystemDisk,
    extra_disks: Vec<String>,
    credentials: BTreeMap<String, Vec<u8>>,
    kernel_args: Vec<String>,
    nic: Option<(Arc<NetNs>, u8)>,
    user_net: bool,
    pxe: Option<(PathBuf, String)>,
    no_reboot: bool,
}

impl VmBuilder {
    pub(crate) fn new(env: Arc<TestEnv>, name: &str) -> VmBuilder {
        VmBuilder {
            env,
            name: name.into(),
            boot: Boot::from_env().map_err(|e| format!("{e:#}")),
            mem_mib: 1024,
            cpus: 1,
            disk_size: "8G".into(),
            system: SystemDisk::Image,
            extra_disks: Vec::new(),
            credentials: BTreeMap::new(),
            kernel_args: Vec::new(),
            nic: None,
            user_net: false,
            pxe: None,
            no_reboot: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn boot(mut self, boot: Boot) -> Self {
        self.boot = Ok(boot);
        self
    }

    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Virtual size of the system disk (the overlay; the root partition grows into it).
    pub fn disk_size(mut self, size: &str) -> Self {
        self.disk_size = size.into();
        self
    }

    /// Boot an overlay on `base` (its virtual size) instead of the image's raw disk.
    pub fn disk_base(mut self, base: &Path, format: DiskFormat) -> Self {
        self.system = SystemDisk::Overlay(base.to_path_buf(), format);
        self
    }

    /// Boot the raw disk file `disk` itself (it is written to), like a disk the image was
    /// flashed onto.
    pub fn flashed_disk(mut self, disk: &Path) -> Self {
        self.system = SystemDisk::Flashed(disk.to_path_buf());
        self
    }

    /// A blank virtio disk (serial extraN) of `size` (qemu-img syntax, e.g. "1G").
    pub fn extra_disk(mut self, size: &str) -> Self {
        self.extra_disks.push(size.into());
        self
    }

    /// A systemd credential, handed to the guest as a file through QEMU's fw_cfg (never on the
    /// command line: see [`Machine::credentials`]).
    pub fn credential(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.credentials.insert(name.into(), value.as_ref().to_vec());
        self
    }

    pub fn remove_credential(mut self, name: &str) -> Self {
        self.credentials.remove(name);
        self
    }

    /// An extra kernel argument (direct boot: appended; UEFI: through systemd-stub's
    /// io.systemd.stub.kernel-cmdline-extra SMBIOS credential).
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.into());
        self
    }

    /// A NIC on the namespace's bridge with the static address of node `index`
    /// ([`NetNs::node_ip`]), configured through the network.network.10-clusteros credential.
    pub fn network(mut self, net: &Arc<NetNs>, index: u8) -> Self {
        self.nic = Some((net.clone(), index));
        self
    }

    /// A NIC on QEMU's restricted user-mode network (a link that leads nowhere, as a machine on
    /// an isolated LAN has).
    pub fn user_network(mut self) -> Self {
        self.user_net = true;
        self
    }

    /// A diskless VM that boots over the network: its first NIC is QEMU's user-mode network,
    /// whose DHCP hands out `bootfile` from `tftp_dir`, and iPXE fetches the rest from there.
    /// It gets no fw_cfg credentials (a PXE node's come from the kernel command line that the
    /// iPXE script writes); a [`VmBuilder::network`] NIC is its second, without a boot ROM.
    pub fn pxe(mut self, tftp_dir: &Path, bootfile: &str) -> Self {
        self.pxe = Some((tftp_dir.to_path_buf(), bootfile.into()));
        self.system = SystemDisk::None;
        self
    }

    /// QEMU exits where the guest would reboot.
    pub fn no_reboot(mut self) -> Self {
        self.no_reboot = true;
        self
    }

    /// Creates the disks and the tap and starts QEMU. Does not wait for the guest.
    pub fn start(self) -> Result<Vm> {
        let dir = self.env.run_dir().join(&self.name);
        if dir.join("qga.sock").as_os_str().len() > crate::MAX_SOCKET_PATH {
            bail!("VM name {:?} is too long for the unix socket paths under {}", self.name, dir.display());
        }
        if dir.exists() {
            bail!("a VM named {} already exists in this test", self.name);
        }
        std::fs::create_dir_all(&dir)?;
        let boot = self.boot.clone().map_err(anyhow::Error::msg)?;
        let mut m = Machine::clusteros(&self.name, &dir, self.env.image(), boot, Accel::from_env()?)?;
        // The owner's pid in the name lets a later run find VMs of a run that was killed. (No
        // `process=`: the process keeps its name, so `pgrep qemu` finds it.)
        m.name = format!("{NAME_PREFIX}{}-{}", std::process::id(), self.name);
        m.cpus = self.cpus;
        m.mem_mib = self.mem_mib;
        m.no_reboot = self.no_reboot;
        m.kernel_args = self.kernel_args.clone();
        m.credentials.extend(self.credentials.clone());
        let root = &mut m.disks[0];
        match &self.system {
            SystemDisk::Image => {
                root.origin = DiskOrigin::Overlay {
                    backing: self.env.image().raw.clone(),
                    backing_format: DiskFormat::Raw,
                    size: Some(self.disk_size.clone()),
                }
            }
            SystemDisk::Overlay(base, format) => {
                root.origin = DiskOrigin::Overlay { backing: base.clone(), backing_format: *format, size: None }
            }
            SystemDisk::Flashed(file) => {
                root.file = file.clone();
                root.format = DiskFormat::Raw;
                root.origin = DiskOrigin::Existing;
            }
            SystemDisk::None => {
                m.disks.clear();
            }
        }
        for (i, size) in self.extra_disks.iter().enumerate() {
            m.disks.push(Disk {
                id: format!("extra{}", i + 1),
                file: dir.join(format!("extra{}.qcow2", i + 1)),
                format: DiskFormat::Qcow2,
                bus: DiskBus::VirtioBlk,
                bootindex: None,
                discard: false,
                origin: DiskOrigin::Blank { size: size.clone() },
            });
        }
        if let Some((tftp, bootfile)) = &self.pxe {
            if !self.credentials.is_empty() {
                bail!("{}: a PXE-booted VM takes its credentials from the iPXE script, not fw_cfg", self.name);
            }
            m.credentials.clear();
            m.firmware = Firmware::Network;
            m.nics.push(Nic {
                id: "boot".into(),
                backend: NetBackend::User { tftp: Some((tftp.clone(), bootfile.clone())) },
                mac: None,
                rom: true,
                bootindex: Some(1),
            });
        }
        if self.user_net {
            m.nics.push(Nic {
                id: format!("net{}", m.nics.len()),
                backend: NetBackend::User { tftp: None },
                mac: None,
                rom: false,
                bootindex: None,
            });
        }
        let mut ip = None;
        if let Some((net, index)) = &self.nic {
            let tap = net.add_tap()?;
            let mac = NetNs::node_mac(*index);
            let addr = NetNs::node_ip(*index);
            m.nics.push(Nic {
                id: format!("net{}", m.nics.len()),
                backend: NetBackend::Tap { ifname: tap },
                mac: Some(mac.clone()),
                rom: self.pxe.is_none(),
                bootindex: None,
            });
            if self.pxe.is_none() {
                m.credentials
                    .entry("network.network.10-clusteros".into())
                    .or_insert_with(|| NetNs::network_file(&mac, &addr).into_bytes());
            }
            ip = Some(addr);
        }
        m.create_files()?;
        // A bad machine fails here, before anything runs.
        m.args()?;
        let vm = Vm {
            name: self.name.clone(),
            qga: Qga::new(&m.qga_socket),
            dir,
            ip,
            netns: self.nic.as_ref().map(|(n, _)| n.clone()),
            machine: m,
            child: Mutex::new(None),
            boots: AtomicU32::new(0),
            started: Mutex::new(Instant::now()),
            agent_answered: AtomicBool::new(false),
            env: self.env,
        };
        vm.start()?;
        Ok(vm)
    }
}

pub struct Vm {
    name: String,
    dir: PathBuf,
    ip: Option<String>,
    qga: Qga,
    /// Keeps the namespace (and the VM's tap) alive as long as the VM.
    netns: Option<Arc<NetNs>>,
    machine: Machine,
    child: Mutex<Option<Child>>,
    boots: AtomicU32,
    /// When QEMU was last started.
    started: Mutex<Instant>,
    /// Whether the guest agent answered since then.
    agent_answered: AtomicBool,
    env: Arc<TestEnv>,
}

impl Vm {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The guest's address on the test LAN, if it has a NIC.
    pub fn ip(&self) -> Option<&str> {
        self.ip.as_deref()
    }

    /// The VM's run directory (disk, sockets, serial.log, qemu.log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many times QEMU was started for this VM.
    pub fn boots(&self) -> u32 {
        self.boots.load(Ordering::SeqCst)
    }

    /// Starts QEMU (again) on the VM's disk. Fails if it is running.
    pub fn start(&self) -> Result<()> {
        let mut child = self.child.lock().expect("child lock");
        if let Some(c) = child.as_mut()
            && c.try_wait()?.is_none()
        {
            bail!("{} is running", self.name);
        }
        for s in ["qga.sock", "qmp.sock"] {
            let _ = std::fs::remove_file(self.dir.join(s));
        }
        let log = OpenOptions::new().create(true).append(true).open(self.dir.join("qemu.log"))?;
        let mut cmd = self.machine.command(self.netns.as_ref().map(|n| n.name()))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
        let mut c = cmd.spawn().context("cannot start qemu-system-x86_64 (run scripts/install-host-deps)")?;
        self.boots.fetch_add(1, Ordering::SeqCst);
        *self.started.lock().expect("start time") = Instant::now();
        self.agent_answered.store(false, Ordering::SeqCst);
        // QEMU creates its sockets before it runs the guest; an early exit is a bad command line.
        let qmp = self.dir.join("qmp.sock");
        let started = wait_until(Duration::from_secs(30), &format!("{}: QEMU to start", self.name), || {
            if let Some(st) = c.try_wait()? {
                return Err(Abort::new(format!("QEMU exited at once ({st}): {}", self.qemu_log_tail())).into());
            }
            if qmp.exists() { Ok(()) } else { bail!("no QMP socket yet") }
        });
        *child = Some(c);
        started
    }

    /// Whether QEMU runs.
    pub fn is_running(&self) -> bool {
        let mut child = self.child.lock().expect("child lock");
        match child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.lock().expect("child lock").as_ref().map(|c| c.id())
    }

    /// Runs `argv` in the guest (no shell; use `sh -c` for one) with the default timeout.
    pub fn exec(&self, argv: &[&str]) -> Result<Output> {
        self.exec_timeout(argv, EXEC_TIMEOUT)
    }

    /// `sh -c SCRIPT` in the guest.
    pub fn sh(&self, script: &str) -> Result<Output> {
        self.exec(&["sh", "-c", script])
    }

    /// Runs `argv` in the guest under `timeout(1)`, so a hung command does not outlive the
    /// call; fails if it does not finish (or the guest agent does not answer) within `limit`.
    pub fn exec_timeout(&self, argv: &[&str], limit: Duration) -> Result<Output> {
        let secs = limit.as_secs().max(1).to_string();
        let mut full = vec!["timeout", "-k", "5", secs.as_str()];
        full.extend_from_slice(argv);
        let t0 = Instant::now();
        let out = self
            .qga
            .exec(&full, None, limit + Duration::from_secs(10))
            .with_context(|| format!("{}: `{}`", self.name, argv.join(" ")))?;
        self.agent_answered.store(true, Ordering::SeqCst);
        if out.code == 124 && t0.elapsed() >= limit {
            bail!("{}: `{}` timed out in the guest after {} s", self.name, argv.join(" "), secs);
        }
        Ok(out)
    }

    /// Waits until the guest agent answers.
    pub fn wait_guest_agent(&self, timeout: Duration) -> Result<()> {
        self.qga.ping(timeout).with_context(|| format!("{}: guest agent", self.name))
    }

    /// Waits until `systemctl is-system-running` says `running`. Fails at once (listing
    /// `systemctl --failed`) if the system ends `degraded` or worse, or QEMU exits.
    ///
    /// Under TCG on a busy host a guest occasionally stalls early in boot (one step every ~30 s,
    /// see [`BOOT_STALL`]). If the guest agent has not answered [`BOOT_STALL`] after QEMU started,
    /// the VM is restarted once on the same disk, with a notice on stderr; the stalled boot's
    /// serial console and QEMU's state are kept in `target/e2e-logs/<test>/<vm>/stalled-boot-N/`.
    pub fn wait_system_running(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        match self.wait_running_once(timeout, true) {
            Err(e) if e.is::<Stalled>() => {
                let left = timeout.saturating_sub(t0.elapsed());
                self.restart_stalled(&e)?;
                self.wait_running_once(left.max(crate::timeout(180)), false)?;
            }
            r => r?,
        }
        Ok(t0.elapsed())
    }

    fn wait_running_once(&self, timeout: Duration, stall_check: bool) -> Result<()> {
        let what = format!("{}: systemctl is-system-running to say running", self.name);
        let stall_limit = std::env::var("CLUSTEROS_E2E_BOOT_STALL")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or_else(|| crate::timeout(BOOT_STALL.as_secs()));
        wait_until(timeout, &what, || {
            if !self.is_running() {
                return Err(Abort::new(format!("QEMU exited; serial console ends: {}", self.serial_tail(20))).into());
            }
            if let Some(panic) = self.kernel_panic() {
                return Err(Abort::new(format!("the guest kernel panicked: {panic}")).into());
            }
            // Ask first: a guest that answers is not stalled, however late the test asks.
            let asked = self.exec_timeout(&["systemctl", "is-system-running"], Duration::from_secs(20));
            let since_start = self.started.lock().expect("start time").elapsed();
            if asked.is_err() && stall_check && !self.agent_answered.load(Ordering::SeqCst) && since_start > stall_limit
            {
                let serial = self.serial_tail(1);
                return Err(anyhow::Error::new(Abort::new(format!("serial console ends: {serial}")))
                    .context(Stalled(since_start)));
            }
            let out = asked?;
            match out.stdout.trim() {
                "running" => Ok(()),
                s @ ("degraded" | "maintenance" | "stopping" | "offline") => {
                    let failed = self
                        .exec(&["systemctl", "--failed", "--no-legend", "--plain"])
                        .map(|o| o.stdout)
                        .unwrap_or_else(|e| format!("(cannot list: {e:#})"));
                    Err(Abort::new(format!("the system is {s}; failed units:\n{}", failed.trim())).into())
                }
                s => bail!("state {s:?}"),
            }
        })
    }

    /// Keeps the evidence of a stalled boot (in the test's log directory), then kills QEMU and
    /// starts it again.
    fn restart_stalled(&self, why: &anyhow::Error) -> Result<()> {
        let dir = self.env.failure_dir().join(&self.name).join(format!("stalled-boot-{}", self.boots()));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("stall.txt"), format!("{why:#}\n\n{}", self.qmp_diagnostics()))?;
        let _ = std::fs::rename(self.dir.join("serial.log"), dir.join("serial.log"));
        eprintln!("e2e: {}: {why:#}; restarting it once (evidence in {})", self.name, dir.display());
        self.kill();
        self.start()
    }

    /// The console's "Kernel panic" line with the lines before it, if the guest kernel panicked.
    pub fn kernel_panic(&self) -> Option<String> {
        let log = strip_ansi(&self.serial_log());
        let lines: Vec<&str> = log.lines().collect();
        let at = lines.iter().position(|l| l.contains("Kernel panic"))?;
        Some(lines[at.saturating_sub(3)..=at].join("\n"))
    }

    /// QEMU's view of a VM that does not answer: run state and vCPU registers (HLT, RIP).
    pub fn qmp_diagnostics(&self) -> String {
        let qmp = self.dir.join("qmp.sock");
        let t = Duration::from_secs(10);
        let mut out = String::new();
        match crate::qmp::call(&qmp, "query-status", json!({}), t) {
            Ok(v) => out.push_str(&format!("query-status: {v}\n")),
            Err(e) => out.push_str(&format!("query-status: {e:#}\n")),
        }
        for hmp in ["info registers", "info lapic", "info irq"] {
            match crate::qmp::call(&qmp, "human-monitor-command", json!({ "command-line": hmp }), t) {
                Ok(v) => out.push_str(&format!("== {hmp}\n{}\n", v.as_str().unwrap_or_default())),
                Err(e) => out.push_str(&format!("== {hmp}: {e:#}\n")),
            }
        }
        out
    }

    /// ACPI power-off through QMP (the power button); waits (bounded) for QEMU to exit.
    ///
    /// A guest ignores the button until its ACPI button driver is bound and logind watches it. The
    /// image loads the driver early (modules-load.d), but like a person at a machine that did not
    /// react, this presses the button again when the console shows no sign of a shutdown after
    /// [`POWER_BUTTON_RETRY`]; it says so when it had to.
    pub fn power_off(&self, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        let mut presses = 0u32;
        let mut last_press = t0;
        // Byte offset of the console at the last press; the console is read only when a press is due.
        let mut serial_at_press = 0usize;
        let result = wait_until(timeout, &format!("{} to power off", self.name), || {
            if !self.is_running() {
                return Ok(());
            }
            let press = presses == 0
                || (last_press.elapsed() >= POWER_BUTTON_RETRY && !shows_shutdown(&self.serial_since(serial_at_press)));
            if press {
                serial_at_press = std::fs::metadata(self.dir.join("serial.log")).map_or(0, |m| m.len() as usize);
                crate::qmp::call(&self.dir.join("qmp.sock"), "system_powerdown", json!({}), Duration::from_secs(10))
                    .with_context(|| format!("{}: system_powerdown", self.name))?;
                presses += 1;
                last_press = Instant::now();
            }
            bail!("QEMU still runs after {presses} power button press(es)")
        });
        if let Err(e) = result {
            bail!("{e:#}\nlast lines of the serial console:\n{}", self.serial_tail(25));
        }
        if presses > 1 {
            eprintln!("e2e: {}: the guest ignored the power button; it powered off after press {presses}", self.name);
        }
        Ok(t0.elapsed())
    }

    /// Kills QEMU's process group (pulls the plug) and reaps it.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                // QEMU leads its own process group (process_group(0)): kill the whole group.
                let _ = run_cmd("kill", &["-KILL", "--", &format!("-{}", c.id())]);
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }

    /// The serial console so far.
    pub fn serial_log(&self) -> String {
        self.serial_since(0)
    }

    /// The serial console from byte `offset` on.
    fn serial_since(&self, offset: usize) -> String {
        let b = std::fs::read(self.dir.join("serial.log")).unwrap_or_default();
        String::from_utf8_lossy(&b[offset.min(b.len())..]).into_owned()
    }

    /// The last lines of the serial console, without terminal escape sequences.
    fn serial_tail(&self, lines: usize) -> String {
        strip_ansi(&tail(&self.serial_log(), lines))
    }

    fn qemu_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default();
        tail(&log, 20)
    }

    /// Saves the serial console, QEMU's log and, if the guest answers, its journal, the agent's
    /// journal (JSON) and a few status commands into `dir`.
    pub fn save_logs(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        for f in ["serial.log", "qemu.log"] {
            let _ = std::fs::copy(self.dir.join(f), dir.join(f));
        }
        if !self.is_running() {
            std::fs::write(dir.join("NOT-RUNNING"), "QEMU was not running when the test failed\n")?;
            return Ok(());
        }
        if let Err(e) = self.wait_guest_agent(Duration::from_secs(10)) {
            std::fs::write(dir.join("NO-GUEST-AGENT"), format!("{e:#}\n\n{}", self.qmp_diagnostics()))?;
            return Ok(());
        }
        let cmds: [(&str, &[&str]); 5] = [
            ("journal.txt", &["journalctl", "-b", "--no-pager"]),
            ("agent-journal.json", &["journalctl", "-u", "clusteros-agent", "-o", "json", "--no-pager"]),
            ("boots.txt", &["journalctl", "--list-boots", "--no-pager"]),
            ("status.txt", &["clusteros", "status"]),
            ("systemctl-failed.txt", &["systemctl", "--failed", "--no-pager"]),
        ];
        for (file, argv) in cmds {
            let text = match self.exec_timeout(argv, Duration::from_secs(60)) {
                Ok(o) if o.success() => o.stdout,
                Ok(o) => format!("{o}\n"),
                Err(e) => format!("{e:#}\n"),
            };
            std::fs::write(dir.join(file), text)?;
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // A failing test's logs, or every test's with CLUSTEROS_E2E_SAVE_LOGS set (to look into
        // what a passing one waited for).
        if std::thread::panicking() || std::env::var_os("CLUSTEROS_E2E_SAVE_LOGS").is_some() {
            let dir = self.env.failure_dir().join(&self.name);
            if let Err(e) = self.save_logs(&dir) {
                eprintln!("e2e: cannot save the logs of {}: {e:#}", self.name);
            }
        }
        self.kill();
    }
}

/// Removes CSI escape sequences (ESC [ ... final byte), as systemd's colored status lines have.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `lines` lines of `s`.
pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Kills QEMU processes that runs of this harness left behind (their test process is gone).
pub(crate) fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline);
        let args: Vec<&str> = cmdline.split('\0').collect();
        if !args.first().is_some_and(|a| a.starts_with("qemu-system") || a.contains("/qemu-system")) {
            continue;
        }
        let Some(owner) = args
            .windows(2)
            .find(|w| w[0] == "-name")
            .and_then(|w| w[1].strip_prefix(NAME_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !harness_alive(owner) {
            let _ = run_cmd("kill", &["-KILL", &pid.to_string()]);
        }
    }
}

/// How long [`Vm::power_off`] waits for a sign of a shutdown before it presses the button again.
const POWER_BUTTON_RETRY: Duration = Duration::from_secs(30);

/// Whether console output shows systemd shutting the system down (its stop jobs or final stage).
fn shows_shutdown(console: &str) -> bool {
    ["Stopping ", "Stopped ", "systemd-shutdown", "Reached target shutdown"].iter().any(|m| console.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_are_stripped() {
        assert_eq!(
            strip_ansi("[\x1b[0;32m  OK  \x1b[0m] Reached \x1b[0;1;39mtarget\x1b[0m."),
            "[  OK  ] Reached target."
        );
    }

    #[test]
    fn a_shutdown_is_recognised_on_the_console() {
        let booting = "[\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mssh.service\x1b[0m - OpenBSD Secure Shell server.\r\n\
                       [   84.785476] ACPI: button: Power Button [PWRF]\r\n";
        assert!(!shows_shutdown(booting));
        let stopping = "         Stopping \x1b[0;1;39mclusteros-agent.service\x1b[0m - ClusterOS agent...\r\n";
        assert!(shows_shutdown(stopping));
        assert!(shows_shutdown("[  106.214286] systemd-shutdown[1]: All filesystems unmounted.\n"));
    }
}
