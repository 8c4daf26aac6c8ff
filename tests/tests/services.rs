//! Three VMs end to end: formation, the WireGuard mesh, the replicated MUNGE key, elected SLURM
//! roles and real SLURM jobs across them, key rotation, k3s without its binary, SLURM controller
//! failover (slurmctld alone, then the whole VM), the powered-off node's reboot and rejoin with its
//! state, and the Raft leader's power-off. One cluster for all of it: a 3-VM boot under TCG costs
//! minutes. Node 1 also proves the VM builder's extra kernel argument and extra disk on a direct
//! kernel boot (the PXE test's disk1 does on UEFI).
//!
//! Needs root, the host tools (scripts/install-host-deps) and a built image (target/image, or
//! CLUSTEROS_IMAGE_DIR). Run with `make e2e`, or:
//!     cargo test -p clusteros-e2e --features e2e --test services -- --test-threads=1 --nocapture
//! Prints `e2e: <phase> <seconds>`. A failing test saves each VM's serial console, QEMU log and
//! journal under target/e2e-logs/<test>/ and prints that path.
//! Knobs: CLUSTEROS_E2E_TIMEOUT_SCALE (multiply every timeout), CLUSTEROS_E2E_BOOT=direct|initrd|uefi,
//! CLUSTEROS_ACCEL=kvm|tcg, CLUSTEROS_E2E_KEEP=1 (keep the run directory with the VM disks),
//! CLUSTEROS_E2E_SAVE_LOGS=1 (save the logs of a passing test too).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use clusteros_e2e::cluster::agreement;
use clusteros_e2e::{ClusterBuilder, OrFail, StatusExt, TestEnv, Vm, timeout, wait_until};

/// `clusteros roles --json` of one node: holders by name, and this node's units.
fn roles(vm: &Vm) -> Result<serde_json::Value> {
    let out = vm.exec(&["clusteros", "roles", "--json"])?.check("clusteros roles --json")?;
    serde_json::from_str(&out.stdout).context("clusteros roles --json is not JSON")
}

fn holder(r: &serde_json::Value, role: &str) -> Option<String> {
    r["roles"][role].as_str().map(str::to_string)
}

fn names(r: &serde_json::Value, role: &str) -> BTreeSet<String> {
    r["roles"][role].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_string)).collect()
}

fn is_active(vm: &Vm, unit: &str) -> Result<bool> {
    Ok(vm.exec(&["systemctl", "is-active", "--quiet", unit])?.success())
}

/// md5 of /etc/munge/munge.key, after checking owner and mode.
fn munge_key_md5(vm: &Vm) -> Result<String> {
    let st = vm.exec(&["stat", "-c", "%U:%G %a", "/etc/munge/munge.key"])?.check("stat munge.key")?;
    ensure!(st.stdout.trim() == "munge:munge 400", "{}: munge.key is {}", vm.name(), st.stdout.trim());
    let out = vm.exec(&["md5sum", "/etc/munge/munge.key"])?.check("md5sum")?;
    Ok(out.stdout.split_whitespace().next().unwrap_or_default().to_string())
}

/// Every node holds the same key (owner munge, mode 0400) and munged runs; returns the md5.
fn check_munge(nodes: &[&Vm]) -> Result<String> {
    let mut sums = BTreeMap::new();
    for vm in nodes {
        sums.insert(vm.name().to_string(), munge_key_md5(vm)?);
        ensure!(is_active(vm, "munge.service")?, "{}: munge.service is not active", vm.name());
    }
    let distinct: BTreeSet<&String> = sums.values().collect();
    ensure!(distinct.len() == 1, "munge keys differ: {sums:?}");
    Ok(sums.into_values().next().unwrap_or_default())
}

/// Every pair of nodes has a recent handshake and pings over the mesh.
fn check_mesh(nodes: &[&Vm]) -> Result<()> {
    let mut mesh_ips = BTreeMap::new();
    for vm in nodes {
        let st: serde_json::Value =
            serde_json::from_str(&vm.exec(&["clusteros", "status", "--json"])?.check("status")?.stdout)?;
        let addr = st["mesh"]["address"].as_str().context("no mesh address yet")?;
        mesh_ips.insert(vm.name().to_string(), addr.split('/').next().unwrap_or_default().to_string());
    }
    for vm in nodes {
        // Independent of the agent: the kernel's own view through wireguard-tools.
        let hs = vm.exec(&["wg", "show", "wg0", "latest-handshakes"])?.check("wg show")?;
        let now = vm.exec(&["date", "+%s"])?.check("date")?.stdout.trim().parse::<u64>()?;
        let peers: Vec<u64> = hs.stdout.lines().filter_map(|l| l.split_whitespace().nth(1)?.parse().ok()).collect();
        ensure!(peers.len() == nodes.len() - 1, "{}: {} WireGuard peers: {}", vm.name(), peers.len(), hs.stdout);
        for t in &peers {
            ensure!(
                *t > 0 && now.saturating_sub(*t) < 120,
                "{}: a handshake is older than 2 minutes: {}",
                vm.name(),
                hs.stdout
            );
        }
        for (other, ip) in &mesh_ips {
            if other != vm.name() {
                vm.exec(&["ping", "-c", "1", "-W", "3", ip])?.check(&format!("{} pings {other} at {ip}", vm.name()))?;
            }
        }
    }
    Ok(())
}

/// Every node's Raft membership lists every member on its mesh address (Raft and the peer API run
/// over WireGuard); the member's own underlay address is kept for its endpoint.
fn check_raft_on_mesh(nodes: &[&Vm]) -> Result<()> {
    for vm in nodes {
        let st = clusteros_e2e::cluster::status_of(*vm)?;
        ensure!(st.members.len() == nodes.len(), "{}: {} members", vm.name(), st.members.len());
        for m in &st.members {
            ensure!(
                m.raft_via() == "mesh",
                "{}: member {:?} is reached at {} (mesh ip {:?}), not on the mesh",
                vm.name(),
                m.name,
                m.raft_addr,
                m.mesh_ip
            );
        }
    }
    Ok(())
}

/// slurmctld runs on exactly the controller and the backup, slurmd on every worker, and sinfo
/// shows every worker idle. Returns (controller, backup).
fn check_slurm(nodes: &[&Vm], workers: usize) -> Result<(String, String)> {
    let r = roles(nodes[0])?;
    let controller = holder(&r, "slurm_controller").context("no SLURM controller assigned")?;
    let backup = holder(&r, "slurm_backup").context("no SLURM backup assigned")?;
    let worker_names = names(&r, "slurm_workers");
    ensure!(worker_names.len() == workers, "workers {worker_names:?}, want {workers}");
    for vm in nodes {
        let ctld = is_active(vm, "slurmctld.service")?;
        let want_ctld = vm.name() == controller || vm.name() == backup;
        ensure!(ctld == want_ctld, "{}: slurmctld active={ctld}, controller {controller}, backup {backup}", vm.name());
        if worker_names.contains(vm.name()) {
            ensure!(is_active(vm, "slurmd.service")?, "{}: slurmd is not active", vm.name());
        }
    }
    let sinfo = nodes[0].exec(&["sinfo", "-h", "-N", "-o", "%N %t"])?.check("sinfo")?;
    let idle: BTreeSet<String> = sinfo
        .stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, state)| state.trim() == "idle")
        .map(|(n, _)| n.to_string())
        .collect();
    ensure!(idle == worker_names, "sinfo: idle {idle:?}, workers {worker_names:?}:\n{}", sinfo.stdout);
    Ok((controller, backup))
}

/// Prometheus metrics on each node (curl inside the guest) show the mesh up, munged active and
/// every member reached over the mesh.
fn check_metrics(nodes: &[&Vm]) -> Result<()> {
    for vm in nodes {
        let out = vm.exec(&["curl", "-sf", "http://127.0.0.1:7601/metrics"])?.check("curl /metrics")?;
        let text = out.stdout;
        for want in
            ["clusteros_mesh_up 1", "clusteros_unit_active{unit=\"munge.service\"} 1", "clusteros_raft_has_leader 1"]
        {
            ensure!(text.lines().any(|l| l == want), "{}: no `{want}` in /metrics", vm.name());
        }
        let on_mesh =
            text.lines().filter(|l| l.starts_with("clusteros_member_info{") && l.contains("raft_via=\"mesh\"")).count();
        ensure!(on_mesh == nodes.len(), "{}: {on_mesh} members on the mesh in /metrics", vm.name());
    }
    Ok(())
}

/// `sbatch --hold`: a job that stays pending until released; returns its id.
fn submit_held_job(vm: &Vm) -> Result<u64> {
    let out = vm
        .exec(&["sbatch", "--hold", "--job-name=survivor", "--output=/dev/null", "--wrap", "hostname"])?
        .check("sbatch --hold")?;
    out.stdout.split_whitespace().last().and_then(|w| w.parse().ok()).with_context(|| format!("sbatch said {out}"))
}

/// `scontrol show job ID` -> its JobState.
fn job_state(vm: &Vm, id: u64) -> Result<String> {
    let out = vm.exec(&["scontrol", "show", "job", &id.to_string()])?.check("scontrol show job")?;
    out.stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("JobState="))
        .map(str::to_string)
        .with_context(|| format!("no JobState in {out}"))
}

/// The SLURM state copy this node published (controller) or installed (backup):
/// (version, taken_at_ms).
fn slurm_state_copy(vm: &Vm) -> Result<(u64, u64)> {
    let st = clusteros_e2e::cluster::status_of(vm)?;
    let c = st.slurm_state.with_context(|| format!("{}: no SLURM state replication here", vm.name()))?;
    Ok((c.version.context("no copy yet")?, c.taken_at_ms.context("no copy yet")?))
}

/// Submits a held job on the controller and waits until the backup has installed a state copy
/// that holds it: read at least 7 s after the submission (slurmctld saves job state within 5 s,
/// SAVE_MAX_WAIT). Returns (job id, copy version).
fn held_job_reaches_backup(ctl: &Vm, backup: &Vm) -> Result<(u64, u64)> {
    let now_ms = || -> Result<u64> { Ok(ctl.exec(&["date", "+%s%3N"])?.check("date")?.stdout.trim().parse()?) };
    let job = submit_held_job(ctl)?;
    let submitted_ms = now_ms()?;
    let (version, _) = wait_until(timeout(120), "the controller announces a state copy with the held job", || {
        let (v, taken) = slurm_state_copy(ctl)?;
        ensure!(taken >= submitted_ms + 7000, "the newest copy may predate slurmctld's save of the job");
        Ok((v, taken))
    })?;
    wait_until(timeout(120), "the backup installs that copy", || {
        let (v, _) = slurm_state_copy(backup)?;
        ensure!(v >= version, "backup has copy {v}, want {version}");
        Ok(())
    })?;
    eprintln!("e2e: held job {job} is in state copy {version}, installed on the backup {}", backup.name());
    Ok((job, version))
}

/// Masks and stops slurmctld on the controller, waits for the backup to take control and the roles
/// to swap, unmasks it, and waits for SLURM to be whole again. Returns the new (controller, backup).
fn slurmctld_takeover(nodes: &[&Vm], controller: &str, backup: &str) -> Result<(String, String)> {
    let by_name = |n: &str| nodes.iter().copied().find(|vm| vm.name() == n).with_context(|| format!("no VM {n}"));
    let ctl = by_name(controller)?;
    let (job, _) = held_job_reaches_backup(ctl, by_name(backup)?)?;
    let t = Instant::now();
    ctl.exec(&["systemctl", "mask", "--runtime", "slurmctld.service"])?.check("mask slurmctld")?;
    ctl.exec(&["systemctl", "stop", "slurmctld.service"])?.check("stop slurmctld")?;
    let swapped = wait_until(timeout(240), "the roles swap after the standby takes control", || {
        let r = roles(nodes[0])?;
        let pair = (holder(&r, "slurm_controller"), holder(&r, "slurm_backup"));
        ensure!(pair == (Some(backup.to_string()), Some(controller.to_string())), "roles {pair:?}");
        Ok(())
    });
    // Unmask whatever happened, so the rest of the test (and its logs) see a normal node.
    ctl.exec(&["systemctl", "unmask", "--runtime", "slurmctld.service"])?.check("unmask slurmctld")?;
    swapped?;
    eprintln!(
        "e2e: slurmctld stopped on {controller}: {backup} took control, roles swapped after {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let (c, b) = wait_until(timeout(240), "slurmctld on both controllers, every node idle", || check_slurm(nodes, 3))?;
    ensure!((c.as_str(), b.as_str()) == (backup, controller), "roles moved on again: {c}, {b}");
    // Asked only now: the swap rewrites slurm.conf, and the new controller's slurmctld restarts
    // on it, so right after the swap no controller may be answering.
    let state = job_state(by_name(backup)?, job)?;
    ensure!(state == "PENDING", "job {job}, queued before the takeover, is {state}");
    wait_until(timeout(120), "srun -N3 hostname after the takeover", || srun_hostnames(nodes[0], 3))?;
    nodes[0].exec(&["scancel", &job.to_string()])?.check("scancel")?;
    Ok((c, b))
}

/// `srun -N<n> hostname` prints n different host names.
fn srun_hostnames(vm: &Vm, n: usize) -> Result<BTreeSet<String>> {
    let out = vm.exec(&["timeout", "60", "srun", &format!("-N{n}"), "hostname"])?.check("srun")?;
    let hosts: BTreeSet<String> = out.stdout.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect();
    ensure!(hosts.len() == n, "srun -N{n} hostname printed {hosts:?}");
    Ok(hosts)
}

/// No failed units, k3s included: the k3s role reports its binary missing and nothing fails.
fn check_k3s_unavailable(nodes: &[&Vm]) -> Result<()> {
    let mut reported = false;
    for vm in nodes {
        let failed = vm.exec(&["systemctl", "--failed", "--no-legend", "--plain"])?.check("systemctl --failed")?;
        ensure!(failed.stdout.trim().is_empty(), "{}: failed units: {}", vm.name(), failed.stdout);
        let r = roles(vm)?;
        let notes = r["services"]["notes"].as_array().cloned().unwrap_or_default();
        reported |= notes.iter().any(|n| n.as_str().is_some_and(|n| n.contains("k3s binary not installed")));
    }
    ensure!(reported, "no node reports the k3s binary as missing");
    Ok(())
}

#[test]
fn mesh_munge_slurm_failover_and_rotation() {
    let env = TestEnv::new("mesh_munge_slurm_failover_and_rotation").or_fail("setup");
    // No join addresses: the three find each other by LAN beacons (issue 11's zero-touch proof).
    let cluster = ClusterBuilder::new(&env, 3)
        .beacons_only()
        .node_options(1, |b| b.kernel_arg("clusteros_e2e.marker=n1").extra_disk("1G"))
        .start()
        .or_fail("start 3 VMs");
    let all = [1, 2, 3];
    let t0 = Instant::now();
    cluster.wait_running(&all, timeout(420), "boot-to-running").or_fail("boot");
    let formed = cluster.wait_agreement(&all, 3, timeout(300)).or_fail("formation");
    let ids = node_ids(&formed).or_fail("formation");
    env.timer.phase("formed");
    clusteros_e2e::checks::vm_options(cluster.node(1), "clusteros_e2e.marker=n1")
        .or_fail("harness: node 1's kernel argument and extra disk (direct boot)");
    let nodes: Vec<&Vm> = all.iter().map(|i| cluster.node(*i)).collect();

    // 1. The mesh.
    wait_until(timeout(240), "a full WireGuard mesh with recent handshakes", || check_mesh(&nodes)).or_fail("(1) mesh");
    wait_until(timeout(120), "Raft on the mesh addresses", || check_raft_on_mesh(&nodes)).or_fail("(1) raft on mesh");
    env.timer.phase("1.mesh");
    // 2. One MUNGE key everywhere.
    let md5 = wait_until(timeout(180), "the same MUNGE key on every node", || check_munge(&nodes)).or_fail("(2) munge");
    env.timer.phase("2.munge");
    // 3. SLURM daemons where the roles say, every node idle.
    let (controller, backup) =
        wait_until(timeout(240), "slurmctld on controller and backup, every node idle", || check_slurm(&nodes, 3))
            .or_fail("(3) slurm");
    env.timer.phase("3.slurm");
    cluster.record("boot-to-slurm-ready", t0);
    // 4. A job across the cluster.
    let hosts = wait_until(timeout(120), "srun -N3 hostname", || srun_hostnames(nodes[0], 3)).or_fail("(4) srun -N3");
    eprintln!("e2e: srun -N3 hostname -> {hosts:?}");
    env.timer.phase("4.srun");
    wait_until(timeout(60), "metrics on every node", || check_metrics(&nodes)).or_fail("metrics");
    // 7. k3s without its binary.
    check_k3s_unavailable(&nodes).or_fail("(7) k3s");
    // 6. Key rotation.
    nodes[1].exec(&["clusteros", "secrets", "rotate", "munge"]).and_then(|o| o.check("rotate")).or_fail("(6) rotate");
    let rotated = wait_until(timeout(180), "a new MUNGE key on every node", || {
        let m = check_munge(&nodes)?;
        ensure!(m != md5, "the key did not change");
        Ok(m)
    })
    .or_fail("(6) rotation");
    eprintln!("e2e: munge key md5 {md5} -> {rotated}");
    wait_until(timeout(120), "srun -N3 hostname after rotation", || srun_hostnames(nodes[0], 3)).or_fail("(6) srun");
    env.timer.phase("6.rotation");
    // 5a. slurmctld alone dies on the controller (its node stays up) and stays down: the standby
    // takes control, the agents swap the two roles, and the old controller comes back as the
    // standby with the new controller's state (not as primary with its own older state).
    let (controller, backup) = slurmctld_takeover(&nodes, &controller, &backup).or_fail("(5a) takeover");
    env.timer.phase("5a.takeover");
    // 5. The controller's VM powers off: the backup takes over.
    let vm_named = |name: &str| {
        all.iter().copied().find(|i| cluster.node(*i).name() == name).with_context(|| format!("no VM is named {name}"))
    };
    let ci = vm_named(&controller).or_fail("(5) the controller's VM");
    let rest: Vec<&Vm> = all.iter().filter(|i| **i != ci).map(|i| cluster.node(*i)).collect();
    let ctl = cluster.node(ci);
    let bi = vm_named(&backup).or_fail("(5) the backup's VM");
    // A job queued on the controller must survive it: the backup works from the replicated state.
    let (job, _) = held_job_reaches_backup(ctl, cluster.node(bi)).or_fail("(5) held job");
    let t = Instant::now();
    cluster.node(ci).power_off(timeout(180)).or_fail("(5) power off the controller");
    wait_until(timeout(300), "srun -N2 hostname without the controller", || srun_hostnames(rest[0], 2))
        .or_fail("(5) failover");
    let took = cluster.record("5.controller-off-to-srun-N2", t);
    eprintln!(
        "e2e: backup {backup} took over from {controller}: srun -N2 worked {:.0} s after power-off",
        took.as_secs_f64()
    );
    // SLURM's own backup may answer srun before the agents have committed the role move.
    wait_until(timeout(90), "the backup to hold the controller role", || {
        let c = holder(&roles(rest[0])?, "slurm_controller");
        ensure!(c.as_deref() == Some(backup.as_str()), "the controller role is held by {c:?}, not {backup}");
        Ok(())
    })
    .or_fail("(5) the backup holds the controller role");
    wait_until(timeout(180), "slurmctld on the new controller and its new backup", || {
        let r = roles(rest[0])?;
        let (c, b) = (holder(&r, "slurm_controller"), holder(&r, "slurm_backup"));
        for vm in &rest {
            let want = Some(vm.name().to_string());
            ensure!(c == want || b == want, "{} holds neither controller role ({c:?}, {b:?})", vm.name());
            ensure!(is_active(vm, "slurmctld.service")?, "{}: slurmctld is not active", vm.name());
        }
        Ok(())
    })
    .or_fail("(5) slurmctld after failover");
    // The job queued before the failover is still there, and runs once released (its script
    // was replicated too: a lost script fails the job).
    let state = job_state(rest[0], job).or_fail("(5) held job after failover");
    assert_eq!(state, "PENDING", "(5) job {job} queued before the failover");
    rest[0]
        .exec(&["scontrol", "release", &job.to_string()])
        .and_then(|o| o.check("scontrol release"))
        .or_fail("(5) release");
    wait_until(timeout(180), "the held job completes after its release", || {
        let s = job_state(rest[0], job)?;
        ensure!(s == "COMPLETED", "job {job} is {s}");
        Ok(())
    })
    .or_fail("(5) held job completes");
    eprintln!("e2e: job {job}, queued on {controller} before it powered off, completed after the failover");
    env.timer.phase("5.failover");

    // 8. A write while the controller's VM is off; the VM boots again and rejoins with its
    // persisted state (the same id, the write in its own copy, a linearizable read).
    let key = "e2e/written-while-off";
    let value = format!("node{ci}-was-off-{:08x}", rand::random::<u32>());
    wait_until(timeout(120), "the two running nodes to accept a write", || {
        rest[0].exec(&["clusteros", "kv", "put", key, &value])?.check("clusteros kv put").map(drop)
    })
    .or_fail("(8) write with one node off");
    ctl.start().or_fail("(8) boot the old controller again");
    let d = ctl.wait_system_running(timeout(300)).or_fail("(8) reboot");
    env.timer.record(&format!("8.node{ci}.reboot-to-running"), d);
    wait_until(timeout(240), "the rebooted node to rejoin with its state", || {
        let st = cluster.statuses(&all)?;
        let (_, voters) = agreement(&st, 3)?;
        ensure!(voters == sorted(&ids), "voters are {voters:?}, were {ids:?}");
        let me = &st[ci - 1];
        ensure!(me.node.id.as_deref() == Some(ids[ci - 1].as_str()), "node{ci} has a new id: {}", me.summary());
        let got = ctl.exec(&["clusteros", "kv", "get", "--stale", key])?;
        ensure!(got.success() && got.stdout.trim() == value, "node{ci}'s own copy of {key}: {got}");
        Ok(())
    })
    .or_fail("(8) rejoin");
    let got = ctl.exec(&["clusteros", "kv", "get", key]).and_then(|o| o.check("kv get")).or_fail("(8) read");
    assert_eq!(got.stdout.trim(), value, "(8) linearizable read on node{ci}");
    env.timer.phase("8.rejoined");

    // 9. The Raft leader's VM powers off: the other two elect a new leader (the voters stay) and
    // accept a write. Who leads is read once all three agree again (right after the rejoin, the
    // rebooted node may not name the leader yet). The powered-off leader is not booted again:
    // a powered-off node's reboot and rejoin is phase 8's, and a third boot costs CI minutes.
    let st = cluster.wait_agreement(&all, 3, timeout(120)).or_fail("(9) the three nodes agree on a leader");
    let (old_leader, _) = agreement(&st, 3).or_fail("(9) leader");
    let li = cluster.index_of(&st, &all, &old_leader).or_fail("(9) leader index");
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != li).collect();
    let t = Instant::now();
    cluster.node(li).power_off(timeout(180)).or_fail("(9) power off the leader");
    wait_until(timeout(180), "the survivors to elect a new leader", || {
        let st = cluster.statuses(&survivors)?;
        let (leader, voters) = agreement(&st, 3)?;
        ensure!(leader != old_leader, "the leader is still the powered-off {old_leader}");
        ensure!(voters == sorted(&ids), "voters changed: {voters:?}");
        Ok(())
    })
    .or_fail("(9) re-election");
    cluster.record("9.leader-off-to-new-leader", t);
    wait_until(timeout(120), "the two survivors to accept a write", || {
        let v = format!("after-node{li}-off");
        cluster.node(survivors[0]).exec(&["clusteros", "kv", "put", "e2e/failover", &v])?.check("kv put").map(drop)
    })
    .or_fail("(9) write with the leader off");
    env.timer.phase("9.write-accepted");
    env.timer.record("services/total", env.timer.total());
}

/// The node ids of a formed cluster, in node order; they must be its three voters.
fn node_ids(formed: &[clusteros_e2e::Status]) -> Result<Vec<String>> {
    let (_, voters) = agreement(formed, 3)?;
    let ids: Vec<String> = formed.iter().map(|s| s.node_id().map(str::to_string)).collect::<Result<_>>()?;
    ensure!(voters == sorted(&ids), "voters {voters:?} are not the three nodes {ids:?}");
    for s in formed {
        ensure!(s.members.len() == 3, "{} lists {} members", s.node.name, s.members.len());
    }
    Ok(ids)
}

fn sorted(v: &[String]) -> Vec<String> {
    let mut v = v.to_vec();
    v.sort();
    v
}
