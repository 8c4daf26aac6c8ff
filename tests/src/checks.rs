//! Checks of one VM from inside it that more than one VM scenario makes: the harness's options
//! reached the guest, a flashed disk's root grew on first boot, the agent runs as a notify
//! service and logs to the journal with structured fields.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};

use crate::Vm;

/// The builder's extra kernel argument `marker` and its blank 1 GiB disk (`extra_disk("1G")`)
/// reached the guest.
pub fn vm_options(vm: &Vm, marker: &str) -> Result<()> {
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

/// On first boot systemd-repart grew the root partition to the end of the `disk`-byte disk the
/// image was flashed onto, and x-systemd.growfs grew its ext4 with it.
pub fn root_grew(vm: &Vm, disk: u64) -> Result<()> {
    let num = |argv: &[&str]| -> Result<u64> {
        let out = vm.exec(argv)?.check(&argv.join(" "))?;
        let v = out.stdout.split_whitespace().last().unwrap_or_default().to_string();
        v.parse().map_err(|_| anyhow::anyhow!("`{}` printed {:?}", argv.join(" "), out.stdout))
    };
    let part = num(&["lsblk", "-bno", "SIZE", "/dev/disk/by-partlabel/clusteros-root"])?;
    let fs = num(&["df", "-B1", "--output=size", "/"])?;
    // The disk minus the 256 MiB ESP and the GPT; ext4 keeps some of it for its own metadata.
    let want = disk - (512 << 20);
    println!("e2e: {}: flashed disk {disk} B: root partition {part} B, root file system {fs} B", vm.name());
    ensure!(part >= want, "the root partition did not grow to the disk ({part} < {want} bytes)");
    ensure!(fs >= want / 10 * 9, "the root file system did not grow with its partition ({fs} bytes)");
    Ok(())
}

/// `systemctl show UNIT -p ...` as a map.
pub fn unit_properties(vm: &Vm, unit: &str, props: &[&str]) -> Result<BTreeMap<String, String>> {
    let mut argv = vec!["systemctl", "show", unit];
    for p in props {
        argv.extend(["-p", p]);
    }
    let out = vm.exec(&argv)?.check("systemctl show")?;
    Ok(out.stdout.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

/// The agent is a Type=notify unit, active/running (so it sent READY=1) with a STATUS= text and
/// never restarted; it logs to the journal with structured fields, NODE_ID among them, and
/// `node_id` (the id its `clusteros status` reports) is one of them.
pub fn agent_service(vm: &Vm, node_id: &str) -> Result<()> {
    let props =
        unit_properties(vm, "clusteros-agent", &["ActiveState", "SubState", "Type", "StatusText", "NRestarts"])?;
    let get = |k: &str| props.get(k).map(String::as_str).unwrap_or("");
    ensure!(
        get("ActiveState") == "active" && get("SubState") == "running" && get("Type") == "notify",
        "clusteros-agent is not active/running/notify: {props:?}"
    );
    ensure!(!get("StatusText").is_empty(), "clusteros-agent sent no STATUS= text: {props:?}");
    ensure!(get("NRestarts") == "0", "clusteros-agent restarted: {props:?}");

    let out = vm.exec(&["journalctl", "-u", "clusteros-agent", "-o", "json", "--no-pager"])?.check("journalctl")?;
    let entries: Vec<serde_json::Value> = out.stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    ensure!(!entries.is_empty(), "no journal entries for clusteros-agent");
    let with_id = entries.iter().filter(|e| e.get("NODE_ID").is_some()).count();
    ensure!(with_id > 0, "none of {} agent journal entries has a NODE_ID field", entries.len());
    ensure!(
        entries.iter().any(|e| e["NODE_ID"].as_str() == Some(node_id)),
        "no agent journal entry has NODE_ID={node_id} (the id `clusteros status` reports)"
    );
    Ok(())
}
