//! The one place that builds QEMU command lines.
//!
//! A [`Machine`] describes a VM: acceleration, firmware and how it boots, disks, NICs, systemd
//! credentials (files handed over through QEMU's fw_cfg, never on the command line), the serial
//! console and the guest-agent and QMP sockets.
//! [`Machine::args`] turns it into QEMU's arguments: a pure function, checked against golden files
//! (`testdata/qemu/*.args`, one argument per line; `UPDATE_GOLDEN=1 cargo test -p clusteros-e2e
//! qemu` rewrites them after a deliberate change). [`Machine::clusteros`] lays out a ClusterOS node
//! booting the image; the test harness ([`crate::vm`]) and the `clusteros-vm` command behind
//! `qemu/cluster` both start from it. Only [`Machine::create_files`] (disks, the UEFI variable
//! store, the credential files) and [`Machine::command`] touch the host; this module never starts
//! or stops a process.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::image::{Image, OVMF_CODE, OVMF_VARS};

/// Where systemd looks for credentials in QEMU's fw_cfg.
const FW_CFG_CREDENTIALS: &str = "opt/io.systemd.credentials/";

/// The fw_cfg file name of credential `name`. QEMU takes at most 55 bytes (FW_CFG_MAX_FILE_PATH
/// 56 with the NUL), so a credential name may have at most 28.
fn fw_cfg_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
        && !name.starts_with('.');
    if !ok {
        bail!("credential name {name:?} is not usable: letters, digits and . _ - @ only");
    }
    let full = format!("{FW_CFG_CREDENTIALS}{name}");
    if full.len() > 55 {
        bail!("credential name {name:?} is too long for QEMU's fw_cfg ({} bytes; at most 28)", name.len());
    }
    Ok(full)
}

/// A path as QEMU option text: commas would split the option, so they are refused.
fn path_str(p: &Path) -> Result<&str> {
    let s = crate::image::path_str(p)?;
    if s.contains(',') {
        bail!("{s}: QEMU cannot take a path with a comma in its options; use another directory");
    }
    Ok(s)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Accel> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => bail!("unknown accelerator {s:?}: use kvm or tcg"),
        }
    }
}

impl Accel {
    /// `CLUSTEROS_ACCEL=kvm|tcg|auto` (default auto): KVM only when /dev/kvm is usable with
    /// hardware virtualisation and its module (some hosts offer a paravirtual /dev/kvm that
    /// cannot run ordinary guests), else TCG.
    pub fn from_env() -> Result<Accel> {
        match std::env::var("CLUSTEROS_ACCEL").as_deref() {
            Ok("auto") | Ok("") | Err(_) => Ok(Accel::detect()),
            Ok(other) => other.parse().context("CLUSTEROS_ACCEL (kvm, tcg or auto)"),
        }
    }

    fn detect() -> Accel {
        let rw = OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok();
        let hw = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
            .unwrap_or(false);
        let module = Path::new("/sys/module/kvm_intel").exists() || Path::new("/sys/module/kvm_amd").exists();
        if rw && hw && module { Accel::Kvm } else { Accel::Tcg }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How a ClusterOS node boots the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boot {
    /// `-kernel/-append` with the image's kernel and command line and no initrd: the root disk is
    /// NVMe, which the Debian cloud kernel has built in (as it has ext4), so the kernel mounts the
    /// root itself and the initrd's phase is skipped (fastest under TCG).
    Direct,
    /// The same kernel with the image's initrd and a virtio-blk disk (the way PXE nodes boot).
    Initrd,
    /// OVMF firmware, systemd-boot and the UKI on the disk's ESP: the path a flashed machine takes.
    Uefi,
}

impl Boot {
    /// `CLUSTEROS_E2E_BOOT=direct|initrd|uefi` (default direct).
    pub fn from_env() -> Result<Boot> {
        match std::env::var("CLUSTEROS_E2E_BOOT") {
            Ok(v) if !v.is_empty() => v.parse().context("CLUSTEROS_E2E_BOOT"),
            _ => Ok(Boot::Direct),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Boot::Direct => "direct",
            Boot::Initrd => "initrd",
            Boot::Uefi => "uefi",
        }
    }
}

impl std::str::FromStr for Boot {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Boot> {
        match s {
            "direct" => Ok(Boot::Direct),
            "initrd" => Ok(Boot::Initrd),
            "uefi" => Ok(Boot::Uefi),
            _ => bail!("unknown boot mode {s:?}: use direct, initrd or uefi"),
        }
    }
}

impl std::fmt::Display for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS loads `kernel` (and `initrd`) with `cmdline`; extra kernel arguments are appended.
    Kernel { kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String },
    /// OVMF: read-only code and this VM's own copy of the variable store. Extra kernel arguments
    /// reach the UKI through systemd-stub's `io.systemd.stub.kernel-cmdline-extra` credential.
    Uefi { code: PathBuf, vars: PathBuf },
    /// SeaBIOS boots from the network only (`-boot order=n,strict=on`), through the boot NIC's
    /// iPXE ROM. Extra kernel arguments cannot be passed this way (the iPXE script holds them).
    Network,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    Nvme,
    VirtioBlk,
}

/// Where a disk's file comes from ([`Machine::create_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskOrigin {
    /// A qcow2 overlay on `backing` (which is never written), of virtual size `size` (qemu-img
    /// syntax; `None`: the backing file's size).
    Overlay { backing: PathBuf, backing_format: DiskFormat, size: Option<String> },
    /// A blank disk of `size`.
    Blank { size: String },
    /// The file exists already (e.g. an image flashed onto a bigger disk).
    Existing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// QEMU's drive id; also the disk's serial (the guest sees /dev/disk/by-id/*_<id>).
    pub id: String,
    pub file: PathBuf,
    pub format: DiskFormat,
    pub bus: DiskBus,
    pub bootindex: Option<u32>,
    pub discard: bool,
    pub origin: DiskOrigin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A tap device (created by the caller, e.g. on a bridge in a network namespace).
    Tap { ifname: String },
    /// QEMU's user-mode network, restricted (no way out of the VM but to QEMU's own services);
    /// with `tftp`, its DHCP offers `bootfile` from that directory over TFTP.
    User { tftp: Option<(PathBuf, String)> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub id: String,
    pub backend: NetBackend,
    pub mac: Option<String>,
    /// Whether the NIC's option ROM (iPXE) is loaded: only a NIC that boots needs it.
    pub rom: bool,
    pub bootindex: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    /// QEMU's `-name` (shown by `ps`; harnesses find their VMs by it).
    pub name: String,
    pub accel: Accel,
    pub cpus: u32,
    pub mem_mib: u32,
    pub firmware: Firmware,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    /// The serial console is appended to this file (it survives a restart of the VM).
    pub serial_log: PathBuf,
    pub qga_socket: PathBuf,
    pub qmp_socket: Option<PathBuf>,
    pub pidfile: Option<PathBuf>,
    /// systemd credentials. Each is written to `credentials_dir/NAME` (0600) and passed as
    /// `-fw_cfg name=opt/io.systemd.credentials/NAME,file=...`: an SMBIOS string would put the
    /// value (the cluster secret) on QEMU's command line, which every user of the host can read
    /// in `ps`.
    pub credentials: BTreeMap<String, Vec<u8>>,
    pub credentials_dir: PathBuf,
    pub kernel_args: Vec<String>,
    /// Exit instead of rebooting (a test that reboots by accident fails instead of looping).
    pub no_reboot: bool,
}

impl Machine {
    /// A ClusterOS node booting `image` the `boot` way, with its files in `dir`: the system disk
    /// `dir/disk.qcow2` (an 8 GiB overlay on the image's raw disk; the root partition grows into
    /// it), `serial.log`, `qga.sock`, `qmp.sock` and, for UEFI, `efivars.fd`. 1 vCPU, 1 GiB,
    /// hostname credential = `name`, no NIC.
    pub fn clusteros(name: &str, dir: &Path, image: &Image, boot: Boot, accel: Accel) -> Result<Machine> {
        let kernel = || image.vmlinuz.clone();
        let firmware = match boot {
            Boot::Direct => Firmware::Kernel {
                kernel: kernel(),
                initrd: None,
                cmdline: format!("{} rootfstype=ext4", image.cmdline),
            },
            Boot::Initrd => Firmware::Kernel {
                kernel: kernel(),
                initrd: Some(image.initrd.clone().with_context(|| {
                    format!("--boot initrd needs clusteros.initrd next to {}: run image/build", image.raw.display())
                })?),
                cmdline: image.cmdline.clone(),
            },
            Boot::Uefi => Firmware::Uefi { code: OVMF_CODE.into(), vars: dir.join("efivars.fd") },
        };
        let mut credentials = BTreeMap::new();
        credentials.insert("system.hostname".to_string(), name.as_bytes().to_vec());
        Ok(Machine {
            name: name.into(),
            accel,
            cpus: 1,
            mem_mib: 1024,
            firmware,
            disks: vec![Disk {
                id: "disk0".into(),
                file: dir.join("disk.qcow2"),
                format: DiskFormat::Qcow2,
                // NVMe only for the direct boot (built into the kernel); the initrd and the
                // firmware take virtio-blk, as PXE nodes and flashed machines see it.
                bus: if boot == Boot::Direct { DiskBus::Nvme } else { DiskBus::VirtioBlk },
                bootindex: (boot == Boot::Uefi).then_some(1),
                discard: true,
                origin: DiskOrigin::Overlay {
                    backing: image.raw.clone(),
                    backing_format: DiskFormat::Raw,
                    size: Some("8G".into()),
                },
            }],
            nics: Vec::new(),
            serial_log: dir.join("serial.log"),
            qga_socket: dir.join("qga.sock"),
            qmp_socket: Some(dir.join("qmp.sock")),
            pidfile: None,
            credentials,
            credentials_dir: dir.join("credentials"),
            kernel_args: Vec::new(),
            no_reboot: false,
        })
    }

    /// QEMU's arguments for this machine.
    pub fn args(&self) -> Result<Vec<String>> {
        let mut args: Vec<String> = Vec::new();
        let mut arg = |a: &[&str]| args.extend(a.iter().map(|s| s.to_string()));
        // A network boot shows SeaBIOS and iPXE on the serial console (DHCP and TFTP progress).
        let machine = if self.firmware == Firmware::Network { "q35,graphics=off" } else { "q35" };
        arg(&["-name", &self.name, "-machine", machine]);
        match self.accel {
            Accel::Kvm => arg(&["-accel", "kvm", "-cpu", "host"]),
            Accel::Tcg => arg(&["-accel", "tcg", "-cpu", "max"]),
        }
        arg(&["-smp", &self.cpus.to_string(), "-m", &self.mem_mib.to_string()]);
        arg(&["-nodefaults", "-no-user-config", "-display", "none"]);
        if self.no_reboot {
            arg(&["-no-reboot"]);
        }
        arg(&["-chardev", &format!("file,id=serial0,path={},append=on", path_str(&self.serial_log)?)]);
        arg(&["-serial", "chardev:serial0"]);
        for d in &self.disks {
            let discard = if d.discard { ",discard=unmap" } else { "" };
            let file = path_str(&d.file)?;
            arg(&["-drive", &format!("if=none,id={},file={file},format={}{discard}", d.id, d.format.as_str())]);
            let dev = match d.bus {
                DiskBus::Nvme => "nvme",
                DiskBus::VirtioBlk => "virtio-blk-pci",
            };
            let boot = d.bootindex.map(|i| format!(",bootindex={i}")).unwrap_or_default();
            arg(&["-device", &format!("{dev},drive={id},serial={id}{boot}", id = d.id)]);
        }
        for n in &self.nics {
            let netdev = match &n.backend {
                NetBackend::Tap { ifname } => format!("tap,id={},ifname={ifname},script=no,downscript=no", n.id),
                NetBackend::User { tftp: None } => format!("user,id={},restrict=on", n.id),
                NetBackend::User { tftp: Some((dir, bootfile)) } => {
                    format!("user,id={},restrict=on,tftp={},bootfile={bootfile}", n.id, path_str(dir)?)
                }
            };
            arg(&["-netdev", &netdev]);
            let mut dev = format!("virtio-net-pci,netdev={}", n.id);
            if let Some(mac) = &n.mac {
                dev.push_str(&format!(",mac={mac}"));
            }
            if !n.rom {
                dev.push_str(",romfile=");
            }
            if let Some(i) = n.bootindex {
                dev.push_str(&format!(",bootindex={i}"));
            }
            arg(&["-device", &dev]);
        }
        arg(&["-device", "virtio-rng-pci", "-device", "virtio-serial-pci"]);
        arg(&["-chardev", &format!("socket,id=qga0,path={},server=on,wait=off", path_str(&self.qga_socket)?)]);
        arg(&["-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]);
        if let Some(qmp) = &self.qmp_socket {
            arg(&["-qmp", &format!("unix:{},server=on,wait=off", path_str(qmp)?)]);
        }
        if let Some(p) = &self.pidfile {
            arg(&["-pidfile", path_str(p)?]);
        }
        for name in self.credentials.keys() {
            let fw_name = fw_cfg_name(name)?;
            let file = path_str(&self.credentials_dir.join(name))?.to_string();
            arg(&["-fw_cfg", &format!("name={fw_name},file={file}")]);
        }
        match &self.firmware {
            Firmware::Kernel { kernel, initrd, cmdline } => {
                arg(&["-kernel", path_str(kernel)?]);
                if let Some(initrd) = initrd {
                    arg(&["-initrd", path_str(initrd)?]);
                }
                let mut line = cmdline.clone();
                for a in &self.kernel_args {
                    line.push(' ');
                    line.push_str(a);
                }
                arg(&["-append", &line]);
            }
            Firmware::Uefi { code, vars } => {
                arg(&["-drive", &format!("if=pflash,format=raw,unit=0,readonly=on,file={}", path_str(code)?)]);
                arg(&["-drive", &format!("if=pflash,format=raw,unit=1,file={}", path_str(vars)?)]);
                if !self.kernel_args.is_empty() {
                    // A comma in an SMBIOS value is written twice.
                    let extra = self.kernel_args.join(" ").replace(',', ",,");
                    arg(&["-smbios", &format!("type=11,value=io.systemd.stub.kernel-cmdline-extra={extra}")]);
                }
            }
            Firmware::Network => {
                if !self.kernel_args.is_empty() {
                    bail!(
                        "{}: a network boot takes its kernel arguments from the iPXE script, not the host",
                        self.name
                    );
                }
                if !self.nics.iter().any(|n| n.rom) {
                    bail!("{}: a network boot needs a NIC with its boot ROM", self.name);
                }
                arg(&["-boot", "order=n,strict=on"]);
            }
        }
        Ok(args)
    }

    /// Creates what the machine needs on the host before its first start: overlay and blank disks
    /// (qemu-img) and this VM's UEFI variable store. Files that exist are kept (a VM restarted on
    /// its own disk keeps its state).
    pub fn create_files(&self) -> Result<()> {
        self.write_credentials()?;
        for d in &self.disks {
            let file = path_str(&d.file)?;
            match &d.origin {
                DiskOrigin::Existing => {
                    if !d.file.is_file() {
                        bail!("{}: disk {} does not exist", self.name, d.file.display());
                    }
                }
                _ if d.file.exists() => {}
                DiskOrigin::Overlay { backing, backing_format, size } => {
                    let mut a = vec!["create", "-q", "-f", "qcow2", "-F", backing_format.as_str()];
                    a.extend(["-b", path_str(backing)?, file]);
                    if let Some(s) = size {
                        a.push(s);
                    }
                    crate::run_cmd("qemu-img", &a)?;
                }
                DiskOrigin::Blank { size } => {
                    crate::run_cmd("qemu-img", &["create", "-q", "-f", d.format.as_str(), file, size])?;
                }
            }
        }
        if let Firmware::Uefi { vars, .. } = &self.firmware
            && !vars.exists()
        {
            std::fs::copy(OVMF_VARS, vars)
                .with_context(|| format!("cannot copy {OVMF_VARS} (run scripts/install-host-deps)"))?;
        }
        Ok(())
    }

    /// Writes each credential to `credentials_dir/NAME` (the directory 0700, the files 0600,
    /// replaced whole) and removes files of credentials the machine no longer has.
    fn write_credentials(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = &self.credentials_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let keep = entry.file_name().to_str().is_some_and(|n| self.credentials.contains_key(n));
            if !keep {
                std::fs::remove_file(entry.path())
                    .with_context(|| format!("cannot remove {}", entry.path().display()))?;
            }
        }
        for (name, value) in &self.credentials {
            fw_cfg_name(name)?;
            clusteros::adapters::files::write_atomic(&dir.join(name), value, 0o600)
                .with_context(|| format!("cannot write credential {name}"))?;
        }
        Ok(())
    }

    /// The command that runs this machine: `qemu-system-x86_64 ARGS`, inside network namespace
    /// `netns` when given (`ip netns exec` execs QEMU in place, so the child's pid is QEMU's).
    pub fn command(&self, netns: Option<&str>) -> Result<Command> {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args(self.args()?);
        Ok(cmd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Image {
        Image {
            raw: "/run/image/base.raw".into(),
            vmlinuz: "/run/image/base.vmlinuz".into(),
            initrd: Some("/run/image/base.initrd".into()),
            cmdline: "root=PARTUUID=0fc63daf-8483-4772-8e79-3d69d8477de4 rw console=ttyS0".into(),
        }
    }

    fn node(boot: Boot) -> Machine {
        let mut m = Machine::clusteros("node1", Path::new("/run/vm/node1"), &image(), boot, Accel::Tcg).unwrap();
        m.nics.push(Nic {
            id: "net0".into(),
            backend: NetBackend::Tap { ifname: "tap1".into() },
            mac: Some("52:54:00:77:00:0b".into()),
            rom: true,
            bootindex: None,
        });
        m.credentials.insert("clusteros.join".into(), b"10.77.0.11:7600,10.77.0.12:7600".to_vec());
        m
    }

    /// Compares `m.args()` with `testdata/qemu/<name>.args` (UPDATE_GOLDEN=1 rewrites it).
    fn golden(name: &str, m: &Machine) {
        let got = m.args().unwrap().join("\n") + "\n";
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/testdata/qemu").join(format!("{name}.args"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &got).unwrap();
        }
        let want = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        assert_eq!(got, want, "{name}: QEMU arguments differ from {} (UPDATE_GOLDEN=1 rewrites it)", path.display());
    }

    #[test]
    fn direct_boot_node() {
        let mut m = node(Boot::Direct);
        m.pidfile = Some("/run/vm/node1/qemu.pid".into());
        m.kernel_args.push("clusteros_e2e.marker=a".into());
        golden("direct", &m);
    }

    #[test]
    fn initrd_boot_node() {
        golden("initrd", &node(Boot::Initrd));
    }

    #[test]
    fn uefi_node_with_an_extra_disk_and_kernel_args() {
        let mut m = node(Boot::Uefi);
        m.accel = Accel::Kvm;
        m.cpus = 2;
        m.mem_mib = 2048;
        m.disks.push(Disk {
            id: "extra1".into(),
            file: "/run/vm/node1/extra1.qcow2".into(),
            format: DiskFormat::Qcow2,
            bus: DiskBus::VirtioBlk,
            bootindex: None,
            discard: false,
            origin: DiskOrigin::Blank { size: "1G".into() },
        });
        m.kernel_args = vec!["a=1,2".into(), "b".into()];
        golden("uefi", &m);
    }

    #[test]
    fn diskless_network_boot() {
        let mut m = node(Boot::Direct);
        m.name = "pxe1".into();
        m.firmware = Firmware::Network;
        m.disks.clear();
        m.credentials.clear();
        m.nics[0].rom = false;
        m.nics.insert(
            0,
            Nic {
                id: "boot".into(),
                backend: NetBackend::User { tftp: Some(("/run/vm/tftp".into(), "clusteros.ipxe".into())) },
                mac: None,
                rom: true,
                bootindex: Some(1),
            },
        );
        m.no_reboot = true;
        golden("pxe", &m);
    }

    /// Issue 10, hole 13: a credential's value is in a 0600 file, not in QEMU's arguments
    /// (which every user of the host sees in `ps`).
    #[test]
    fn credentials_are_files_not_arguments() {
        use std::os::unix::fs::PermissionsExt as _;
        // A private directory of its own (mkdtemp: 0700, a fresh name), removed at the end.
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("clusteros-credentials-XXXXXX")).unwrap();
        let mut m = node(Boot::Direct);
        m.credentials_dir = dir.join("credentials");
        let secret = "the-cluster-secret-0123456789";
        m.credentials.insert("clusteros.cluster-secret".into(), secret.as_bytes().to_vec());
        let args = m.args().unwrap().join(" ");
        assert!(!args.contains(secret), "the secret is on QEMU's command line: {args}");
        let file = m.credentials_dir.join("clusteros.cluster-secret");
        let want = format!("name=opt/io.systemd.credentials/clusteros.cluster-secret,file={}", file.display());
        assert!(args.contains(&want), "{args}");
        std::fs::create_dir_all(&m.credentials_dir).unwrap();
        std::fs::write(m.credentials_dir.join("old.credential"), "x").unwrap();
        m.write_credentials().unwrap();
        m.write_credentials().unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), secret);
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&m.credentials_dir).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(!m.credentials_dir.join("old.credential").exists(), "a dropped credential's file is kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn impossible_machines_are_refused() {
        let mut m = node(Boot::Direct);
        m.firmware = Firmware::Network;
        m.nics[0].rom = false;
        assert!(format!("{:#}", m.args().unwrap_err()).contains("boot ROM"));
        m.nics[0].rom = true;
        m.kernel_args.push("x".into());
        assert!(format!("{:#}", m.args().unwrap_err()).contains("iPXE script"));
        let mut m = node(Boot::Direct);
        m.credentials.insert("a,b".into(), vec![]);
        assert!(m.args().is_err());
        let mut m = node(Boot::Direct);
        m.credentials.insert("network.network.10-clusteros".into(), vec![]);
        assert!(m.args().is_ok(), "28 bytes fit");
        m.credentials.insert("network.network.100-clusteros".into(), vec![]);
        assert!(format!("{:#}", m.args().unwrap_err()).contains("too long"));
        let mut no_initrd = image();
        no_initrd.initrd = None;
        let e = Machine::clusteros("n", Path::new("/x"), &no_initrd, Boot::Initrd, Accel::Tcg).unwrap_err();
        assert!(format!("{e:#}").contains("clusteros.initrd"));
    }

    #[test]
    fn paths_with_commas_are_refused() {
        let mut m = node(Boot::Direct);
        m.serial_log = "/run/a,b/serial.log".into();
        assert!(format!("{:#}", m.args().unwrap_err()).contains("comma"));
    }

    #[test]
    fn boot_modes_parse() {
        for b in [Boot::Direct, Boot::Initrd, Boot::Uefi] {
            assert_eq!(b.as_str().parse::<Boot>().unwrap(), b);
        }
        assert!("bios".parse::<Boot>().is_err());
    }
}
