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
use std::time::Instant;

use anyhow::{Result, ensure};
use clusteros_e2e::cluster::{agreement, random_secret, status_of};
use clusteros_e2e::{Boot, ClusterBuilder, OrFail, StatusExt, TestEnv, Vm, credential, timeout, wait_until};

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

/// (c) three VMs with one secret and bootstrap_expect=3 form one cluster; (d) the leader is
/// powered off, the other two elect a new leader and accept a write, and the old leader boots
/// again and rejoins with its persisted state. (A node with a wrong secret is refused in the
/// container tier, `containers.rs`: it needs the image and systemd, not a kernel of its own.)
#[test]
fn three_node_cluster_failover() {
    let env = TestEnv::new("three_node_cluster_failover").or_fail("setup");
    let cluster = ClusterBuilder::new(&env, 3).start().or_fail("start 3 VMs");
    env.timer.phase("cluster/start-vms");
    let all = [1, 2, 3];

    // (c) formation.
    let t = Instant::now();
    cluster.wait_running(&all, timeout(420), "c.boot-to-running").or_fail("(c) boot");
    env.timer.phase("c.all-running");
    let formed = wait_until(timeout(300), "one cluster of three voters", || {
        let st = cluster.statuses(&all)?;
        check_formed(&st)?;
        Ok(st)
    })
    .or_fail("(c) formation");
    env.timer.phase("c.formed-after-running");
    cluster.record("c.boot-to-formed", t);
    let ids: Vec<String> = formed.iter().map(|s| s.node_id().map(str::to_string)).collect::<Result<_>>().or_fail("ids");

    // (d) failover and rejoin.
    let (old_leader, _) = agreement(&formed, 3).or_fail("(d) leader");
    let li = cluster.index_of(&formed, &all, &old_leader).or_fail("(d) leader index");
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != li).collect();
    cluster.node(li).power_off(timeout(180)).or_fail("(d) power off the leader");
    env.timer.phase("d.leader-power-off");
    wait_until(timeout(180), "the survivors to elect a new leader", || {
        let st = cluster.statuses(&survivors)?;
        let (leader, voters) = agreement(&st, 3)?;
        ensure!(leader != old_leader, "the leader is still the powered-off {old_leader}");
        ensure!(voters == sorted(&ids), "voters changed: {voters:?}");
        Ok(())
    })
    .or_fail("(d) re-election");
    env.timer.phase("d.new-leader");
    let value = format!("written-while-node{li}-was-off-{}", rand_suffix());
    let key = "e2e/failover";
    let writer = cluster.node(survivors[0]);
    wait_until(timeout(120), "the two survivors to accept a write", || {
        writer.exec(&["clusteros", "kv", "put", key, &value])?.check("clusteros kv put").map(drop)
    })
    .or_fail("(d) write with one node down");
    env.timer.phase("d.write-accepted");
    cluster.node(li).start().or_fail("(d) boot the old leader again");
    let d = cluster.node(li).wait_system_running(timeout(300)).or_fail("(d) reboot");
    env.timer.record(&format!("d.node{li}.reboot-to-running"), d);
    env.timer.phase("d.old-leader-running");
    wait_until(timeout(240), "the old leader to rejoin with its state", || {
        let st = cluster.statuses(&all)?;
        let (_, voters) = agreement(&st, 3)?;
        ensure!(voters == sorted(&ids), "voters are {voters:?}, were {ids:?}");
        let me = &st[li - 1];
        ensure!(me.node.id.as_deref() == Some(ids[li - 1].as_str()), "node{li} has a new id: {}", me.summary());
        let got = cluster.node(li).exec(&["clusteros", "kv", "get", "--stale", key])?;
        ensure!(got.success() && got.stdout.trim() == value, "node{li}'s own copy of {key}: {got}");
        Ok(())
    })
    .or_fail("(d) rejoin");
    let got = cluster.node(li).exec(&["clusteros", "kv", "get", key]).and_then(|o| o.check("kv get")).or_fail("(d)");
    assert_eq!(got.stdout.trim(), value, "(d) linearizable read on node{li}");
    env.timer.phase("d.rejoined");

    env.timer.record("cluster/total", env.timer.total());
}

/// One cluster (same id, leader and voters everywhere) whose three voters are these three nodes.
fn check_formed(formed: &[clusteros_e2e::Status]) -> Result<()> {
    let (_, voters) = agreement(formed, 3)?;
    let ids: Vec<String> = formed.iter().map(|s| s.node_id().map(str::to_string)).collect::<Result<_>>()?;
    ensure!(voters == sorted(&ids), "voters {voters:?} are not the three nodes {ids:?}");
    for s in formed {
        ensure!(s.members.len() == 3, "{} lists {} members", s.node.name, s.members.len());
    }
    Ok(())
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}
