//! ClusterOS end-to-end scenarios: real images booted under QEMU, checked from inside the guests.
//!
//! Needs root, the host tools (scripts/install-host-deps) and a built image (target/image, or
//! CLUSTEROS_IMAGE_DIR). Run with `make e2e`, or:
//!     cargo test -p clusteros-e2e --features e2e -- --test-threads=1 --nocapture
//! Each scenario prints `e2e: <phase> <seconds>`. A failing test saves each VM's serial console,
//! QEMU log and journal under target/e2e-logs/<test>/ and prints that path.
//! Knobs: CLUSTEROS_E2E_TIMEOUT_SCALE (multiply every timeout), CLUSTEROS_E2E_BOOT=direct|initrd|uefi,
//! CLUSTEROS_ACCEL=kvm|tcg, CLUSTEROS_E2E_KEEP=1 (keep the run directory with the VM disks).

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
use clusteros_e2e::cluster::{agreement, random_secret, status_of};
use clusteros_e2e::{Boot, OrFail, StatusExt, TestEnv, Vm, credential, timeout, wait_until};

/// (a) one VM with a secret and bootstrap_expect=1 comes up whole and forms a one-node cluster;
/// (b) one VM without a secret comes up, and `clusteros status` says what is missing and how to
/// provide it. Both boot at once; (a) boots through UEFI (OVMF, systemd-boot, the UKI on the ESP)
/// from the raw image flashed onto a bigger raw disk, as a machine does, and its root grows to
/// fill that disk on first boot; (b) boots with a direct kernel boot.
#[test]
fn single_node_with_and_without_secret() {
    let env = TestEnv::new("single_node_with_and_without_secret").or_fail("setup");
    let net = env.netns().or_fail("network namespace");
    let flashed = env.run_dir().join("flashed.raw");
    env.image().flash_onto(&flashed, FLASHED_DISK).or_fail("(a) flash the image onto a bigger disk");
    let a = env
        .vm("with-secret")
        .boot(Boot::Uefi)
        .flashed_disk(&flashed)
        // The root grows on the first boot, not after a reboot.
        .no_reboot()
        .network(&net, 1)
        .credential(credential::CLUSTER_SECRET, random_secret())
        .credential(credential::BOOTSTRAP_EXPECT, "1")
        .kernel_arg("clusteros_e2e.marker=a")
        .extra_disk("1G")
        .start()
        .or_fail("(a) start the VM");
    let b = env
        .vm("no-secret")
        .network(&net, 2)
        .kernel_arg("clusteros_e2e.marker=b")
        .extra_disk("1G")
        .start()
        .or_fail("(b) start the VM");
    env.timer.phase("single/start-vms");

    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| a.wait_system_running(timeout(300)));
        let hb = s.spawn(|| b.wait_system_running(timeout(300)));
        (ha.join().expect("wait thread"), hb.join().expect("wait thread"))
    });
    let (da, db) = (ra.or_fail("(a) boot"), rb.or_fail("(b) boot"));
    env.timer.record("single/a.boot-to-running(uefi)", da);
    env.timer.record("single/b.boot-to-running", db);
    env.timer.phase("single/both-running");

    check_vm_options(&a, "clusteros_e2e.marker=a").or_fail("(a) harness: kernel argument and extra disk (UEFI)");
    check_vm_options(&b, "clusteros_e2e.marker=b").or_fail("(b) harness: kernel argument and extra disk");
    check_root_grew(&a, FLASHED_DISK).or_fail("(a) the root of the flashed disk grew to fill it");
    check_configured_node(&a).or_fail("(a) node with a secret");
    env.timer.phase("single/a.checks");
    check_unconfigured_node(&b).or_fail("(b) node without a secret");
    env.timer.phase("single/b.checks");
    env.timer.record("single/total", env.timer.total());
}

/// Size of the disk the image is flashed onto in (a): more than twice the image's.
const FLASHED_DISK: u64 = 6 << 30;

/// On first boot systemd-repart grew the root partition to the end of the disk and
/// x-systemd.growfs grew its ext4 with it.
fn check_root_grew(vm: &Vm, disk: u64) -> Result<()> {
    let num = |argv: &[&str]| -> Result<u64> {
        let out = vm.exec(argv)?.check(&argv.join(" "))?;
        let v = out.stdout.split_whitespace().last().unwrap_or_default().to_string();
        v.parse().map_err(|_| anyhow::anyhow!("`{}` printed {:?}", argv.join(" "), out.stdout))
    };
    let part = num(&["lsblk", "-bno", "SIZE", "/dev/disk/by-partlabel/clusteros-root"])?;
    let fs = num(&["df", "-B1", "--output=size", "/"])?;
    // The disk minus the 256 MiB ESP and the GPT; ext4 keeps some of it for its own metadata.
    let want = disk - (512 << 20);
    println!("e2e: flashed disk {disk} B: root partition {part} B, root file system {fs} B");
    ensure!(part >= want, "the root partition did not grow to the disk ({part} < {want} bytes)");
    ensure!(fs >= want / 10 * 9, "the root file system did not grow with its partition ({fs} bytes)");
    Ok(())
}

/// `systemctl show UNIT -p ...` as a map.
fn unit_properties(vm: &Vm, unit: &str, props: &[&str]) -> Result<BTreeMap<String, String>> {
    let mut argv = vec!["systemctl", "show", unit];
    for p in props {
        argv.extend(["-p", p]);
    }
    let out = vm.exec(&argv)?.check("systemctl show")?;
    Ok(out.stdout.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

/// The builder's extra kernel argument and blank disk reached the guest.
fn check_vm_options(vm: &Vm, marker: &str) -> Result<()> {
    let cmdline = vm.exec(&["cat", "/proc/cmdline"])?.check("cat /proc/cmdline")?.stdout;
    ensure!(cmdline.split_whitespace().any(|a| a == marker), "{marker} is not on the kernel command line: {cmdline}");
    let disk = vm.exec(&["readlink", "-f", "/dev/disk/by-id/virtio-extra1"])?.check("the extra disk by id")?.stdout;
    let size = vm.exec(&["blockdev", "--getsize64", disk.trim()])?.check("blockdev")?.stdout;
    ensure!(
        size.trim() == (1u64 << 30).to_string(),
        "the extra disk {} has {} bytes, not 1 GiB",
        disk.trim(),
        size.trim()
    );
    Ok(())
}

fn check_configured_node(vm: &Vm) -> Result<()> {
    // A Type=notify unit is active/running only after READY=1; STATUS= text is set with it.
    let props =
        unit_properties(vm, "clusteros-agent", &["ActiveState", "SubState", "Type", "StatusText", "NRestarts"])?;
    let get = |k: &str| props.get(k).map(String::as_str).unwrap_or("");
    ensure!(
        get("ActiveState") == "active" && get("SubState") == "running" && get("Type") == "notify",
        "clusteros-agent is not active/running/notify: {props:?}"
    );
    ensure!(!get("StatusText").is_empty(), "clusteros-agent sent no STATUS= text: {props:?}");
    ensure!(get("NRestarts") == "0", "clusteros-agent restarted: {props:?}");

    // bootstrap_expect=1: it forms a one-node cluster and leads it.
    let st = wait_until(timeout(120), "a one-node cluster led by this node", || {
        let st = status_of(vm)?;
        agreement(std::slice::from_ref(&st), 1)?;
        ensure!(st.leader() == st.node.id.as_deref(), "not the leader: {}", st.summary());
        Ok(st)
    })?;
    let id = st.node_id()?.to_string();

    // The agent logs to the journal with structured fields (no prefix): NODE_ID among them.
    let out = vm.exec(&["journalctl", "-u", "clusteros-agent", "-o", "json", "--no-pager"])?.check("journalctl")?;
    let entries: Vec<serde_json::Value> = out.stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    ensure!(!entries.is_empty(), "no journal entries for clusteros-agent");
    let with_id = entries.iter().filter(|e| e.get("NODE_ID").is_some()).count();
    ensure!(with_id > 0, "none of {} agent journal entries has a NODE_ID field", entries.len());
    ensure!(
        entries.iter().any(|e| e["NODE_ID"].as_str() == Some(id.as_str())),
        "no agent journal entry has NODE_ID={id} (the id `clusteros status` reports)"
    );
    Ok(())
}

fn check_unconfigured_node(vm: &Vm) -> Result<()> {
    let props = unit_properties(vm, "clusteros-agent", &["ActiveState", "SubState", "StatusText"])?;
    ensure!(
        props.get("ActiveState").map(String::as_str) == Some("active"),
        "clusteros-agent is not active without a secret: {props:?}"
    );
    let out = vm.exec(&["clusteros", "status"])?;
    ensure!(!out.success(), "`clusteros status` succeeded on a node without a secret: {out}");
    let text = format!("{}{}", out.stdout, out.stderr);
    ensure!(text.contains("no cluster secret"), "`clusteros status` does not say \"no cluster secret\": {out}");
    ensure!(
        text.contains("clusteros.cluster-secret") && text.contains("agent.toml"),
        "`clusteros status` does not say how to provide the secret: {out}"
    );
    let st = status_of(vm)?;
    ensure!(!st.configured && !st.problems.is_empty(), "status --json: {st:?}");
    Ok(())
}
