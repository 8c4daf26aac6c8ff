//! Proofs of the image's ways in: the raw image flashed onto a bigger disk boots through UEFI, grows
//! its root and forms a one-node cluster; a diskless node with no join address boots over the
//! network (PXE) and joins that cluster by its LAN beacons, while a VM of another cluster on the
//! same LAN stays out and is shown as a neighbour; packer turns the image into a site image that boots. (A node without a secret is
//! the container tier's `container_without_secret_says_what_is_missing`.)
//!
//! Needs root, the host tools (scripts/install-host-deps, packer among them) and a built image
//! (target/image, or CLUSTEROS_IMAGE_DIR). Run with `make e2e`, or:
//!     cargo test -p clusteros-e2e --features e2e --test images -- --test-threads=1 --nocapture
//! Phases print as `e2e: <phase> <seconds>`; a failing test keeps each VM's serial console, QEMU
//! log and journal under target/e2e-logs/<test>/ (and, for packer, its build log there too).

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use base64::Engine as _;
use clusteros_e2e::cluster::{random_secret, status_of};
use clusteros_e2e::image::image_dir;
use clusteros_e2e::{
    Accel, Boot, DiskFormat, NetNs, OrFail, StatusExt, TestEnv, Vm, checks, credential, repo_root, timeout, wait_until,
};

/// A machine flashed with the raw image forms a one-node cluster; a diskless VM boots ClusterOS over
/// the network, runs from RAM, and joins it.
///
/// disk1 is the cluster to join: the raw image flashed onto a disk more than twice its size,
/// booted through UEFI (OVMF, systemd-boot, the UKI on the ESP) as a machine does; its root grows
/// to fill the disk on the first boot, its agent is a notify service that logs to the journal with
/// structured fields, and with bootstrap_expect=1 it forms a one-node cluster. pxe1 has no disk
/// at all: its first NIC is QEMU's user-mode network, whose DHCP hands out clusteros.ipxe over
/// TFTP; that script chains clusteros-site.ipxe (written here: the secret, no join address, no
/// bootstrap-expect, the host name and a static .network for the second NIC) and loads the kernel
/// and the initrd holding the whole root file system. Its second NIC is on the test LAN, where it
/// hears disk1's LAN beacons and joins through them (a PXE node needs no join address). The
/// stranger, on the same LAN with a secret of its own, forms its own one-node cluster.
#[test]
fn pxe_node_boots_diskless_and_joins() {
    let env = TestEnv::new("pxe_node_boots_diskless_and_joins").or_fail("setup");
    let net = env.netns().or_fail("network namespace");
    let secret = random_secret();
    let disk_ip = NetNs::node_ip(1);
    let join = format!("{disk_ip}:{}", clusteros_e2e::cluster::PEER_PORT);
    let tftp = env.run_dir().join("tftp");
    write_tftp_root(&tftp, &secret, None, "pxe1", 2).or_fail("the TFTP root");
    env.timer.phase("pxe/tftp-root");

    let flashed = env.run_dir().join("flashed.raw");
    env.image().flash_onto(&flashed, FLASHED_DISK).or_fail("flash the image onto a bigger disk");
    let disk1 = env
        .vm("disk1")
        .boot(Boot::Uefi)
        .flashed_disk(&flashed)
        // The root grows on the first boot, not after a reboot.
        .no_reboot()
        .kernel_arg("clusteros_e2e.marker=disk1")
        .extra_disk("1G")
        .network(&net, 1)
        .credential(credential::CLUSTER_SECRET, &secret)
        .credential(credential::JOIN, &join)
        .credential(credential::BOOTSTRAP_EXPECT, "1")
        .start()
        .or_fail("start disk1");
    let pxe = env.vm("pxe1").pxe(&tftp, "clusteros.ipxe").network(&net, 2).no_reboot().start().or_fail("start pxe1");
    // A machine of another cluster on the same LAN: its own secret, a one-node cluster of its own.
    let stranger_secret = random_secret();
    let stranger = env
        .vm("stranger")
        .network(&net, 3)
        .credential(credential::CLUSTER_SECRET, &stranger_secret)
        .credential(credential::BOOTSTRAP_EXPECT, "1")
        .start()
        .or_fail("start stranger");
    env.timer.phase("pxe/start-vms");

    // The kernel prints its banner once iPXE has fetched the kernel and the initrd and jumped to it.
    wait_until(timeout(300), "pxe1: the kernel banner (iPXE fetched kernel + initrd over TFTP)", || {
        ensure!(pxe.is_running(), clusteros_e2e::Abort::new("QEMU exited"));
        ensure!(disk1.is_running(), clusteros_e2e::Abort::new("disk1's QEMU exited"));
        ensure!(pxe.serial_log().contains("Linux version"), "no kernel banner yet");
        Ok(())
    })
    .or_fail("network boot");
    env.timer.phase("pxe/ipxe-dhcp-tftp");
    let d = pxe.wait_system_running(timeout(420)).or_fail("pxe1 boot");
    env.timer.record("pxe/pxe1.boot-to-running", d);

    check_runs_from_ram(&pxe).or_fail("pxe1 runs from RAM");
    check_cmdline_credentials(&pxe, &secret).or_fail("pxe1's credentials");
    check_lan(&pxe, &net).or_fail("pxe1's cluster NIC");
    env.timer.phase("pxe/pxe1-checks");

    let d = disk1.wait_system_running(timeout(420)).or_fail("disk1 boot");
    env.timer.record("pxe/disk1.boot-to-running(uefi)", d);
    checks::vm_options(&disk1, "clusteros_e2e.marker=disk1")
        .or_fail("harness: disk1's kernel argument and extra disk (UEFI)");
    checks::root_grew(&disk1, FLASHED_DISK).or_fail("the root of disk1's flashed disk grew to fill it");
    let (cluster_id, disk1_id) = wait_until(timeout(180), "disk1 to lead its one-node cluster", || {
        let st = status_of(&disk1)?;
        ensure!(st.is_member() && st.leader().is_some() && st.leader() == st.node.id.as_deref(), "{}", st.summary());
        Ok((st.cluster_id.clone().context("no cluster id yet")?, st.node_id()?.to_string()))
    })
    .or_fail("disk1's cluster");
    checks::agent_service(&disk1, &disk1_id).or_fail("disk1's agent under systemd");
    env.timer.phase("pxe/disk1-checks");
    wait_until(timeout(240), "disk1 to list pxe1 as a member and pxe1 to say it is one", || {
        for vm in [&disk1, &pxe] {
            ensure!(vm.is_running(), clusteros_e2e::Abort::new(format!("{}'s QEMU exited", vm.name())));
        }
        let disk = status_of(&disk1)?;
        let mut names: Vec<&str> = disk.members.iter().filter_map(|m| m.name.as_deref()).collect();
        names.sort();
        ensure!(names == ["disk1", "pxe1"], "disk1 lists members {names:?}");
        let own = status_of(&pxe)?;
        ensure!(own.is_member() && own.cluster_id.as_deref() == Some(cluster_id.as_str()), "pxe1: {}", own.summary());
        Ok(())
    })
    .or_fail("pxe1 joins disk1's cluster");
    env.timer.phase("pxe/joined");
    check_stranger_stays_out(&stranger, &[&disk1, &pxe], &cluster_id).or_fail("the stranger of another cluster");
    env.timer.phase("pxe/stranger-is-a-neighbour");
    let free = pxe.exec(&["free", "-m"]).map(|o| o.stdout).unwrap_or_default();
    println!("e2e: pxe1 memory (MiB):\n{}", free.trim_end());
    env.timer.record("pxe/total", env.timer.total());
}

/// The VM of another cluster on the same LAN forms a cluster of its own, which the others do not
/// list as a member; each side shows the other's nodes as neighbours (beacons of another cluster
/// key's fingerprint, taken note of and left alone).
fn check_stranger_stays_out(stranger: &Vm, members: &[&Vm], cluster_id: &str) -> Result<()> {
    let (own_cluster, fingerprint) = wait_until(timeout(420), "the stranger to lead a cluster of its own", || {
        ensure!(stranger.is_running(), clusteros_e2e::Abort::new("the stranger's QEMU exited"));
        let st = status_of(stranger)?;
        ensure!(st.is_member() && st.leader() == st.node.id.as_deref(), "{}", st.summary());
        let fingerprint = st.node.cluster_keys.first().cloned().context("no cluster key fingerprint")?;
        Ok((st.cluster_id.clone().context("no cluster id")?, fingerprint))
    })?;
    ensure!(own_cluster != cluster_id, "the stranger joined {cluster_id}, the cluster of another secret");
    wait_until(timeout(120), "each side to show the other as neighbours", || {
        let st = status_of(stranger)?;
        ensure!(st.members.len() == 1, "the stranger lists {} members", st.members.len());
        let heard = neighbour_names(&st);
        for vm in members {
            ensure!(
                heard.contains(&vm.name().to_string()),
                "the stranger shows neighbours {heard:?}, not {}",
                vm.name()
            );
            let theirs = status_of(*vm)?;
            ensure!(
                theirs.members.iter().all(|m| m.name.as_deref() != Some("stranger")),
                "{} lists the stranger as a member",
                vm.name()
            );
            let b = theirs.beacons.as_ref().context("no beacons in the status")?;
            let n = b.neighbours.iter().find(|n| n.name == "stranger");
            let n = n.with_context(|| format!("{} shows neighbours {:?}", vm.name(), neighbour_names(&theirs)))?;
            ensure!(n.cluster == fingerprint && n.member, "{} shows the stranger as {n:?}", vm.name());
            ensure!(
                b.refused.get("bad_mac").copied().unwrap_or(0) == 0,
                "{}: beacons refused {:?}",
                vm.name(),
                b.refused
            );
        }
        Ok(())
    })
}

fn neighbour_names(st: &clusteros_e2e::cluster::Status) -> Vec<String> {
    st.beacons.iter().flat_map(|b| b.neighbours.iter().map(|n| n.name.clone())).collect()
}

/// Size of the disk the image is flashed onto for disk1: more than twice the image's.
const FLASHED_DISK: u64 = 6 << 30;

/// The image's PXE files (hard links, or copies across file systems) and a clusteros-site.ipxe
/// with the cluster settings of node `index` on the test LAN.
fn write_tftp_root(dir: &Path, secret: &str, join: Option<&str>, hostname: &str, index: u8) -> Result<()> {
    let pxe = image_dir().join("pxe");
    std::fs::create_dir_all(dir)?;
    for f in ["clusteros.vmlinuz", "clusteros.initrd", "clusteros.ipxe"] {
        let src = pxe.join(f);
        ensure!(src.is_file(), "{} missing: run image/build", src.display());
        if std::fs::hard_link(&src, dir.join(f)).is_err() {
            std::fs::copy(&src, dir.join(f)).with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    let network = NetNs::network_file(&NetNs::node_mac(index), &NetNs::node_ip(index));
    let network = base64::engine::general_purpose::STANDARD.encode(network);
    let join = join.map(|j| format!("set clusteros_join {j}\n")).unwrap_or_default();
    let site = format!(
        "#!ipxe\nset clusteros_secret {secret}\n{join}set clusteros_args \
         systemd.hostname={hostname} systemd.set_credential_binary=network.network.10-clusteros:{network}\n"
    );
    std::fs::write(dir.join("clusteros-site.ipxe"), site)?;
    Ok(())
}

/// Root on the kernel's tmpfs, no block device, and the root tmpfs enlarged past the kernel's
/// half of RAM (the PXE image's /etc/fstab asks for 75%).
fn check_runs_from_ram(vm: &Vm) -> Result<()> {
    let fstype = vm.exec(&["findmnt", "-n", "-o", "FSTYPE", "/"])?.check("findmnt /")?.stdout;
    ensure!(matches!(fstype.trim(), "rootfs" | "tmpfs" | "ramfs"), "root is {}, not the initramfs", fstype.trim());
    let blk = vm.sh("ls /sys/block | grep -v -e ^loop -e ^ram -e ^zram || true")?.check("ls /sys/block")?.stdout;
    ensure!(blk.trim().is_empty(), "the diskless VM sees block devices: {}", blk.trim());
    let out = vm.sh("df -k --output=size / | tail -n 1; sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo")?;
    let nums: Vec<u64> = out.check("df, meminfo")?.stdout.split_whitespace().filter_map(|n| n.parse().ok()).collect();
    let [root_kb, mem_kb] = nums[..] else { bail!("cannot read the root size and memory: {nums:?}") };
    println!("e2e: pxe1 root tmpfs {root_kb} KiB of {mem_kb} KiB RAM");
    ensure!(root_kb >= mem_kb * 70 / 100, "the root tmpfs was not enlarged (size=75% in the PXE /etc/fstab)");
    Ok(())
}

/// The credentials came from the kernel command line (iPXE) and reached the agent: the same
/// secret, and no join address and no bootstrap-expect.
fn check_cmdline_credentials(vm: &Vm, secret: &str) -> Result<()> {
    let cmdline = vm.exec(&["cat", "/proc/cmdline"])?.check("cat /proc/cmdline")?.stdout;
    ensure!(
        cmdline.contains(&format!("systemd.set_credential=clusteros.cluster-secret:{secret}")),
        "the secret is not on the kernel command line: {cmdline}"
    );
    wait_until(timeout(120), "clusteros-agent.service to be active", || {
        vm.exec(&["systemctl", "is-active", "clusteros-agent.service"])?.check("systemctl is-active").map(|_| ())
    })?;
    let script = "d=$(tr '\\0' '\\n' </proc/$(systemctl show -P MainPID clusteros-agent.service)/environ | \
                  sed -n 's/^CREDENTIALS_DIRECTORY=//p'); \
                  printf '%s|%s|%s' \"$(cat $d/clusteros.cluster-secret)\" \
                  \"$(test -e $d/clusteros.join && echo present || echo absent)\" \
                  \"$(test -e $d/clusteros.bootstrap-expect && echo present || echo absent)\"";
    let got = vm.sh(script)?.check("the agent's credentials")?.stdout;
    ensure!(got == format!("{secret}|absent|absent"), "the agent's credentials differ: {got:?}");
    Ok(())
}

/// The cluster NIC carries traffic both ways: the guest pings the bridge, and the host side of
/// the bridge reaches the agent's peer port.
fn check_lan(vm: &Vm, net: &NetNs) -> Result<()> {
    let ip = vm.ip().context("pxe1 has no LAN address")?;
    wait_until(timeout(60), "pxe1 to ping the bridge", || {
        vm.exec(&["ping", "-c1", "-W1", clusteros_e2e::netns::HOST_ADDR])?.check("ping").map(|_| ())
    })?;
    let port = clusteros_e2e::cluster::PEER_PORT;
    wait_until(timeout(60), "the agent's peer port to be reachable from the bridge", || {
        let probe = format!("exec 3<>/dev/tcp/{ip}/{port}");
        clusteros_e2e::run_cmd("ip", &["netns", "exec", net.name(), "timeout", "5", "bash", "-c", &probe]).map(|_| ())
    })?;
    Ok(())
}

/// packer/build turns the image into a site image (inside a namespace with no way out: offline
/// by construction) that boots under UEFI with the site files, a root of the chosen size, and
/// nothing of its build boot: no login key, a new machine id and SSH host key, one boot in the
/// journal.
#[test]
fn packer_site_image_builds_and_boots() {
    const DISK: &str = "20G";
    let env = TestEnv::new("packer_site_image_builds_and_boots").or_fail("setup");
    let net = env.netns().or_fail("network namespace");
    let source = image_dir().join("clusteros.qcow2");
    assert!(source.is_file(), "{} missing: run image/build", source.display());
    let out = env.run_dir().join("out");
    let log = env.run_dir().join("packer.log");
    let accel = Accel::from_env().or_fail("accelerator");
    let build = packer_build(&net, &source, &out, &log, accel, DISK);
    // The build's logs go with the test's logs if anything fails from here on.
    let _keep = KeepOnFailure(vec![
        (log.clone(), env.log_dir().join("packer.log")),
        (env.run_dir().join("packer-serial.log"), env.log_dir().join("packer-serial.log")),
    ]);
    let (build_machine_id, build_host_key) = build.or_fail("packer/build");
    env.timer.phase("packer/build");

    let image = out.join("clusteros-site.qcow2");
    let vm = env
        .vm("site")
        .boot(Boot::Uefi)
        .disk_base(&image, DiskFormat::Qcow2)
        .user_network()
        .no_reboot()
        .start()
        .or_fail("start the site image");
    let d = vm.wait_system_running(timeout(420)).or_fail("boot the site image");
    env.timer.record("packer/boot-to-running", d);
    check_site_image(&vm, &build_machine_id, &build_host_key, DISK).or_fail("the site image");
    env.timer.phase("packer/checks");
    env.timer.record("packer/total", env.timer.total());
}

/// Copies files (from, to) when the test is failing as this drops (the run dir goes away).
struct KeepOnFailure(Vec<(std::path::PathBuf, std::path::PathBuf)>);

impl Drop for KeepOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (from, to) in &self.0 {
                if let Some(dir) = to.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let _ = std::fs::copy(from, to);
            }
        }
    }
}

/// Runs packer/build offline (in `net`, which has no route out) and returns the build boot's
/// machine id and SSH host key fingerprint, as provision.sh printed them.
fn packer_build(
    net: &NetNs,
    source: &Path,
    out: &Path,
    log: &Path,
    accel: Accel,
    disk: &str,
) -> Result<(String, String)> {
    let which = std::process::Command::new("sh").args(["-c", "command -v packer"]).output()?;
    ensure!(which.status.success(), "packer not found: run scripts/install-host-deps");
    let logf = std::fs::File::create(log)?;
    let serial = log.with_file_name("packer-serial.log");
    let status = std::process::Command::new("timeout")
        .args(["1500", "ip", "netns", "exec", net.name()])
        .arg(repo_root().join("packer/build"))
        .arg("--source")
        .arg(source)
        .arg("--out")
        .arg(out)
        .args(["--disk-size", disk, "--serial-log"])
        .arg(&serial)
        .env("PACKER_ACCEL", accel.as_str())
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .status()?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    if !status.success() {
        bail!("packer/build failed ({status}); it ends:\n{}", clusteros_e2e::vm::tail(&text, 40));
    }
    for l in text.lines().filter(|l| l.contains("provision:") || l.contains("packer/build:")) {
        println!("e2e: {}", l.trim());
    }
    let find = |marker: &str| -> Option<String> {
        text.lines().find_map(|l| l.split_once(marker).map(|(_, rest)| rest.trim().to_string()))
    };
    let machine_id = find("provision: build machine-id: ")
        .and_then(|m| m.split_whitespace().next().map(str::to_string))
        .context("provision.sh did not print the build machine id")?;
    // "provision: build ssh host key: 256 SHA256:... root@... (ED25519)"
    let host_key = find("provision: build ssh host key: ")
        .and_then(|k| k.split_whitespace().nth(1).map(str::to_string))
        .context("provision.sh did not print the build SSH host key")?;
    Ok((machine_id, host_key))
}

fn check_site_image(vm: &Vm, build_machine_id: &str, build_host_key: &str, disk: &str) -> Result<()> {
    let run = |argv: &[&str]| -> Result<String> { Ok(vm.exec(argv)?.check(&argv.join(" "))?.stdout) };
    run(&["test", "-s", "/etc/issue.d/clusteros-site.issue"]).context("/etc/issue.d/clusteros-site.issue")?;
    let want = std::fs::read(repo_root().join("packer/site/etc/clusteros/agent.toml"))?;
    let got = run(&["cat", "/etc/clusteros/agent.toml"])?;
    ensure!(got.as_bytes() == want, "/etc/clusteros/agent.toml is not packer/site's:\n{got}");
    let info = run(&["cat", "/etc/clusteros/image-info"])?;
    ensure!(info.lines().any(|l| l == "site=example"), "/etc/clusteros/image-info lacks site=example:\n{info}");
    ensure!(
        !vm.exec(&["test", "-e", "/root/.ssh/authorized_keys"])?.success(),
        "packer's key is still in /root/.ssh/authorized_keys"
    );
    let machine_id = run(&["cat", "/etc/machine-id"])?.trim().to_string();
    let key = run(&["ssh-keygen", "-lf", "/etc/ssh/ssh_host_ed25519_key.pub"])?;
    let key = key.split_whitespace().nth(1).unwrap_or_default();
    println!(
        "e2e: machine id: build {build_machine_id}, now {machine_id}; ssh host key: build {build_host_key}, now {key}"
    );
    ensure!(
        machine_id.len() == 32 && machine_id.bytes().all(|b| b.is_ascii_hexdigit()) && machine_id != build_machine_id,
        "the machine id was not regenerated ({machine_id})"
    );
    ensure!(!key.is_empty() && key != build_host_key, "the SSH host key was not regenerated ({key})");
    let boots = run(&["journalctl", "--list-boots", "-q", "--no-pager"])?;
    let n = boots.lines().filter(|l| !l.trim().is_empty()).count();
    ensure!(n == 1, "the journal holds {n} boots: the build boot's journal was not removed\n{boots}");
    for unit in ["clusteros-agent.service", "ssh.service"] {
        run(&["systemctl", "is-active", unit]).with_context(|| format!("{unit} is not active"))?;
    }
    let fs: u64 = run(&["sh", "-c", "df -B1 --output=size / | tail -n 1"])?.trim().parse()?;
    let size: u64 = disk.trim_end_matches('G').parse::<u64>()? << 30;
    ensure!(fs >= size / 10 * 9, "the root file system ({fs} B) does not span the {disk} disk");
    Ok(())
}
