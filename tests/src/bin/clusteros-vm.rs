//! clusteros-vm (run as `qemu/cluster`): boot an N-node ClusterOS cluster under QEMU on a private
//! LAN, for people and scripts, and drive it: status, wait, exec, stop, start, down.
//!
//! Node i is VM `node<i>` with address 10.77.0.(10+i)/24 on bridge br0 inside network namespace
//! "clusteros" (the host side of the bridge is 10.77.0.1: reach the guests with
//! `ip netns exec clusteros ...`). Each VM boots a qcow2 overlay on a snapshot of
//! target/image/clusteros.raw and receives as systemd credentials (files in its run dir, handed over
//! through QEMU's fw_cfg so that no secret shows in `ps`): system.hostname,
//! network.network.10-clusteros (a static .network for its NIC), clusteros.cluster-secret (--secret,
//! or a random one kept in the run dir), clusteros.join (every node's 10.77.0.x:7600) and
//! clusteros.bootstrap-expect. `exec` goes through qemu-guest-agent over a virtio-serial port (a
//! unix socket on the host): no guest network needed.
//!
//! The QEMU command line comes from `clusteros_e2e::qemu::Machine`, the same code the VM tests
//! use. The VMs outlive this command (each QEMU leads its own process group); the run dir
//! (target/qemu-run, or CLUSTEROS_RUN_DIR) holds cluster.json, the secret, the image snapshot and
//! per node its disk, serial.log, qemu.log, qga.sock, qmp.sock and qemu.pid.

use std::fs::OpenOptions;
use std::io::{Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use clusteros_e2e::image::{Image, OVMF_CODE, OVMF_VARS, image_dir};
use clusteros_e2e::qemu::{Accel, Boot, Machine, NetBackend, Nic};
use clusteros_e2e::qga::{AgentError, Qga};
use clusteros_e2e::vm::{strip_ansi, tail};
use clusteros_e2e::{NetNs, cluster, is_root, qmp, repo_root, write_private};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use serde_json::json;

const NETNS: &str = "clusteros";
const MAX_NODES: u8 = 50;

#[derive(Parser)]
#[command(
    name = "qemu/cluster",
    bin_name = "qemu/cluster",
    about = "Boot and drive a local ClusterOS cluster of QEMU VMs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a new cluster (fails if one is up).
    Up {
        #[arg(short = 'n', long = "nodes", default_value_t = 3)]
        n: u8,
        /// The cluster secret (default: 32 random bytes, base64).
        #[arg(long)]
        secret: Option<String>,
        /// direct: the image's kernel without initrd, NVMe root (fastest); initrd: with the
        /// initrd and virtio-blk (as PXE nodes boot); uefi: OVMF, systemd-boot, the UKI.
        #[arg(long, default_value = "direct")]
        boot: Boot,
        /// MiB per VM.
        #[arg(long, default_value_t = 1024)]
        mem: u32,
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[arg(long, default_value = "8G")]
        disk_size: String,
        /// Default: the number of nodes.
        #[arg(long)]
        bootstrap_expect: Option<usize>,
        /// Extra kernel arguments for every node.
        #[arg(long, default_value = "", allow_hyphen_values = true)]
        append: String,
    },
    /// Each node's address, QEMU pid and `systemctl is-system-running`.
    Status,
    /// Wait until the guests say `running`. No deadline: a node fails only when its boot makes no
    /// progress (serial console output, systemd jobs left) for --stall seconds, when it ends
    /// degraded or worse, or when QEMU exits. Says what it waits for every 30 s.
    Wait {
        #[arg(long, alias = "timeout", env = "CLUSTEROS_BOOT_STALL", default_value_t = 240)]
        stall: u64,
        nodes: Vec<String>,
    },
    /// Run a command in a guest (as root, no shell: use `sh -c`); its output and exit status
    /// become ours (124: no answer in time, 125: the guest agent refused).
    Exec {
        /// Pass our standard input to the command.
        #[arg(short = 'i')]
        stdin: bool,
        /// Overall limit in seconds, including reaching the guest agent.
        #[arg(long, env = "CLUSTEROS_EXEC_TIMEOUT", default_value_t = 120.0)]
        timeout: f64,
        node: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        argv: Vec<String>,
    },
    /// ACPI power-off (pressed again if the guest ignores it), or pull the plug with --hard.
    Stop {
        #[arg(long)]
        hard: bool,
        node: String,
    },
    /// Boot a stopped node again on its own disk.
    Start { node: String },
    /// Kill every VM and delete the namespace (--purge: the run dir too).
    Down {
        #[arg(long)]
        purge: bool,
    },
}

/// What `up` chose, kept in `<run>/cluster.json` for the other commands.
#[derive(Serialize, Deserialize)]
struct State {
    nodes: u8,
    boot: String,
    mem: u32,
    cpus: u32,
    disk_size: String,
    bootstrap_expect: usize,
    accel: String,
    append: String,
}

struct Run {
    dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = Run {
        dir: std::env::var_os("CLUSTEROS_RUN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/qemu-run")),
    };
    let r = match cli.cmd {
        Cmd::Up { n, secret, boot, mem, cpus, disk_size, bootstrap_expect, append } => {
            run.up(n, secret, boot, mem, cpus, disk_size, bootstrap_expect, append).map(|_| 0)
        }
        Cmd::Status => run.status().map(|_| 0),
        Cmd::Wait { stall, nodes } => run.wait(Duration::from_secs(stall), &nodes),
        Cmd::Exec { stdin, timeout, node, argv } => run.exec(stdin, timeout, &node, &argv),
        Cmd::Stop { hard, node } => run.stop(hard, &node).map(|_| 0),
        Cmd::Start { node } => run.start(&node).map(|_| 0),
        Cmd::Down { purge } => run.down(purge).map(|_| 0),
    };
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("qemu/cluster: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("qemu/cluster: {msg}");
}

fn need_root() -> Result<()> {
    ensure!(is_root(), "must run as root (network namespace, taps)");
    Ok(())
}

impl Run {
    fn node_dir(&self, i: u8) -> PathBuf {
        self.dir.join(format!("node{i}"))
    }

    fn load(&self) -> Result<State> {
        let f = self.dir.join("cluster.json");
        let text = std::fs::read_to_string(&f)
            .with_context(|| format!("no cluster in {} (run 'qemu/cluster up' first)", self.dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is damaged: qemu/cluster down --purge", f.display()))
    }

    /// node1 / 1 -> 1, checked against the cluster size.
    fn node_index(&self, st: &State, node: &str) -> Result<u8> {
        match node.strip_prefix("node").unwrap_or(node).parse::<u8>() {
            Ok(i) if (1..=st.nodes).contains(&i) => Ok(i),
            _ => bail!("no such node: {node} (nodes: node1..node{})", st.nodes),
        }
    }

    /// The nodes that have a directory in the run dir.
    fn node_dirs(&self) -> Vec<u8> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut v: Vec<u8> =
            entries.flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok()).collect();
        v.sort();
        v
    }

    /// QEMU's pid for node `i`, if that QEMU runs (a zombie or a reused pid does not count).
    fn pid(&self, i: u8) -> Option<i32> {
        let pid: i32 = std::fs::read_to_string(self.node_dir(i).join("qemu.pid")).ok()?.trim().parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        if matches!(state, Some("Z" | "X") | None) {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let qga = self.node_dir(i).join("qga.sock");
        String::from_utf8_lossy(&cmdline).contains(qga.to_str()?).then_some(pid)
    }

    fn qga(&self, i: u8) -> Qga {
        Qga::new(self.node_dir(i).join("qga.sock"))
    }

    fn machine(&self, st: &State, i: u8) -> Result<Machine> {
        let dir = self.node_dir(i);
        let image = Image::open_snapshot(&self.dir)?;
        let accel: Accel = st.accel.parse().context("cluster.json")?;
        let mut m = Machine::clusteros(&format!("node{i}"), &dir, &image, st.boot.parse()?, accel)?;
        m.cpus = st.cpus;
        m.mem_mib = st.mem;
        m.pidfile = Some(dir.join("qemu.pid"));
        if let clusteros_e2e::qemu::DiskOrigin::Overlay { size, .. } = &mut m.disks[0].origin {
            *size = Some(st.disk_size.clone());
        }
        m.kernel_args = st.append.split_whitespace().map(str::to_string).collect();
        let mac = NetNs::node_mac(i);
        m.nics.push(Nic {
            id: "net0".into(),
            backend: NetBackend::Tap { ifname: format!("tap{i}") },
            mac: Some(mac.clone()),
            rom: true,
            bootindex: None,
        });
        let join = (1..=st.nodes).map(|j| format!("{}:{}", NetNs::node_ip(j), cluster::PEER_PORT)).collect::<Vec<_>>();
        let secret = std::fs::read(self.dir.join("secret")).context("the cluster secret is gone from the run dir")?;
        let creds = [
            ("network.network.10-clusteros", NetNs::network_file(&mac, &NetNs::node_ip(i)).into_bytes()),
            (cluster::credential::CLUSTER_SECRET, secret),
            (cluster::credential::JOIN, join.join(",").into_bytes()),
            (cluster::credential::BOOTSTRAP_EXPECT, st.bootstrap_expect.to_string().into_bytes()),
        ];
        for (k, v) in creds {
            m.credentials.insert(k.into(), v);
        }
        Ok(m)
    }

    /// Starts node `i`'s QEMU in its own process group (it outlives this command) and waits
    /// (bounded) until it has written its pidfile.
    fn launch(&self, st: &State, i: u8) -> Result<()> {
        let m = self.machine(st, i)?;
        m.create_files()?;
        let dir = self.node_dir(i);
        for f in ["qemu.pid", "qga.sock", "qmp.sock"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let log = OpenOptions::new().create(true).append(true).open(dir.join("qemu.log"))?;
        let mut cmd = m.command(Some(NETNS))?;
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
        let mut child = cmd.spawn().context("cannot start qemu-system-x86_64 (run scripts/install-host-deps)")?;
        let t0 = Instant::now();
        loop {
            // QEMU writes its pidfile early, and creates its QMP socket once the devices are set
            // up: a bad tap or drive makes it exit before that.
            if self.pid(i).is_some() && dir.join("qmp.sock").exists() {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                let qlog = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                bail!("node{i}: QEMU exited at once ({status}): {}", tail(&qlog, 10));
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(30),
                "node{i}: QEMU did not start; see {}/qemu.log",
                dir.display()
            );
            // Polling interval while QEMU starts.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn up(
        &self,
        n: u8,
        secret: Option<String>,
        boot: Boot,
        mem: u32,
        cpus: u32,
        disk_size: String,
        expect: Option<usize>,
        append: String,
    ) -> Result<()> {
        ensure!((1..=MAX_NODES).contains(&n), "up: -n must be 1..{MAX_NODES}");
        need_root()?;
        let accel = Accel::from_env()?;
        let images = image_dir();
        for f in ["clusteros.raw", "clusteros.vmlinuz", "clusteros.initrd", "clusteros.cmdline"] {
            ensure!(images.join(f).is_file(), "{} missing: run image/build", images.join(f).display());
        }
        if boot == Boot::Uefi {
            ensure!(
                Path::new(OVMF_CODE).is_file() && Path::new(OVMF_VARS).is_file(),
                "OVMF not found: run scripts/install-host-deps"
            );
        }
        ensure!(!NetNs::exists(NETNS)?, "network namespace {NETNS} exists: a cluster is up (qemu/cluster down first)");
        ensure!(
            self.node_dirs().iter().all(|&i| self.pid(i).is_none()),
            "VMs of an earlier cluster still run: qemu/cluster down first"
        );
        let longest = self.node_dir(MAX_NODES).join("qga.sock");
        ensure!(
            longest.as_os_str().len() <= clusteros_e2e::MAX_SOCKET_PATH,
            "run dir path too long for unix sockets: {} (set CLUSTEROS_RUN_DIR)",
            self.dir.display()
        );
        let t0 = Instant::now();
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        // A snapshot, so that a rebuild while the cluster runs cannot pull the disk from under it.
        Image::snapshot(&images, &self.dir)?;
        let secret = secret.unwrap_or_else(cluster::random_secret);
        write_private(&self.dir.join("secret"), secret.as_bytes())?;
        let st = State {
            nodes: n,
            boot: boot.to_string(),
            mem,
            cpus,
            disk_size,
            bootstrap_expect: expect.unwrap_or(usize::from(n)),
            accel: accel.as_str().into(),
            append,
        };
        std::fs::write(self.dir.join("cluster.json"), serde_json::to_vec_pretty(&st)?)?;
        // Anything that fails from here on leaves no VM or namespace behind.
        let started = (|| -> Result<()> {
            let ns = NetNs::create_lasting(NETNS)?;
            for i in 1..=n {
                std::fs::create_dir_all(self.node_dir(i))?;
                let tap = ns.add_tap()?;
                ensure!(tap == format!("tap{i}"), "tap {tap} where tap{i} was expected");
            }
            for i in 1..=n {
                self.launch(&st, i)?;
            }
            Ok(())
        })();
        if let Err(e) = started {
            log("up failed, cleaning up");
            let _ = self.down(false);
            return Err(e);
        }
        log(format!(
            "{n} node(s) started in {}s (boot={} accel={}, {cpus} vCPU, {mem} MiB each)",
            t0.elapsed().as_secs(),
            st.boot,
            st.accel
        ));
        self.status()
    }

    fn start(&self, node: &str) -> Result<()> {
        need_root()?;
        let st = self.load()?;
        let i = self.node_index(&st, node)?;
        ensure!(NetNs::exists(NETNS)?, "network namespace {NETNS} is gone: qemu/cluster up again");
        ensure!(self.pid(i).is_none(), "node{i} is running");
        self.launch(&st, i)?;
        log(format!("node{i} started (pid {})", self.pid(i).map_or("?".into(), |p| p.to_string())));
        Ok(())
    }

    fn stop(&self, hard: bool, node: &str) -> Result<()> {
        need_root()?;
        let st = self.load()?;
        let i = self.node_index(&st, node)?;
        let Some(pid) = self.pid(i) else {
            log(format!("node{i} is not running"));
            return Ok(());
        };
        if !hard {
            // A guest that has not yet bound its ACPI button driver ignores the press: press
            // again, like a person would, before pulling the plug.
            for press in 1..=3 {
                let qmp = self.node_dir(i).join("qmp.sock");
                if let Err(e) = qmp::call(&qmp, "system_powerdown", json!({}), Duration::from_secs(5)) {
                    log(format!("node{i}: power button: {e:#}"));
                }
                if self.wait_gone(&[i], Duration::from_secs(30)) {
                    log(format!("node{i} powered off"));
                    return Ok(());
                }
                if press < 3 {
                    log(format!("node{i} still runs 30 s after power button press {press}: pressing it again"));
                }
            }
            log(format!("node{i} did not power off within 90 s: killing it"));
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        ensure!(self.wait_gone(&[i], Duration::from_secs(10)), "node{i} (pid {pid}) did not die");
        log(format!("node{i} stopped"));
        Ok(())
    }

    /// Waits (bounded) until none of `nodes` runs; whether they all stopped.
    fn wait_gone(&self, nodes: &[u8], limit: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            if nodes.iter().all(|&i| self.pid(i).is_none()) {
                return true;
            }
            if t0.elapsed() >= limit {
                return false;
            }
            // Polling interval while QEMU exits.
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn down(&self, purge: bool) -> Result<()> {
        need_root()?;
        // Every node directory, whatever cluster.json says (it may be missing or damaged).
        let nodes = self.node_dirs();
        let running: Vec<(u8, i32)> = nodes.iter().filter_map(|&i| self.pid(i).map(|p| (i, p))).collect();
        let signal_all = |sig| {
            for (i, pid) in &running {
                // Each QEMU leads its own process group.
                if self.pid(*i).is_some() {
                    let _ = kill(Pid::from_raw(-pid), sig);
                    let _ = kill(Pid::from_raw(*pid), sig);
                }
            }
        };
        let ids: Vec<u8> = running.iter().map(|(i, _)| *i).collect();
        signal_all(Signal::SIGTERM);
        if !self.wait_gone(&ids, Duration::from_secs(15)) {
            signal_all(Signal::SIGKILL);
            ensure!(self.wait_gone(&ids, Duration::from_secs(5)), "some QEMU processes survived SIGKILL");
        }
        if NetNs::exists(NETNS)? {
            NetNs::delete_named(NETNS)?;
        }
        for &i in &nodes {
            let _ = std::fs::remove_file(self.node_dir(i).join("qemu.pid"));
        }
        if purge {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            let _ = std::fs::remove_file(self.dir.join("base.raw"));
            for &i in &nodes {
                let _ = std::fs::remove_file(self.node_dir(i).join("disk.qcow2"));
            }
        }
        log(format!("down: {} VM(s) stopped, namespace {NETNS} removed", running.len()));
        Ok(())
    }

    fn exec(&self, stdin: bool, timeout: f64, node: &str, argv: &[String]) -> Result<u8> {
        let st = self.load()?;
        let i = self.node_index(&st, node)?;
        let argv: Vec<&str> = argv.iter().map(String::as_str).skip_while(|a| *a == "--").collect();
        ensure!(!argv.is_empty(), "exec: no command given");
        ensure!(self.pid(i).is_some(), "node{i} is not running");
        ensure!(timeout.is_finite() && timeout > 0.0, "--timeout must be a positive number of seconds");
        let mut input = Vec::new();
        if stdin {
            std::io::stdin().read_to_end(&mut input).context("cannot read standard input")?;
        }
        let limit = Duration::from_secs_f64(timeout);
        match self.qga(i).exec_raw(&argv, stdin.then_some(&input[..]), limit) {
            Ok(out) => {
                std::io::stdout().write_all(&out.stdout)?;
                std::io::stdout().flush()?;
                std::io::stderr().write_all(&out.stderr)?;
                if out.truncated {
                    eprintln!("qemu/cluster: the output was truncated by the guest agent");
                }
                Ok(u8::try_from(out.code).unwrap_or(1))
            }
            Err(e) if e.is::<AgentError>() => {
                eprintln!("qemu/cluster: node{i}: {e:#}");
                Ok(125)
            }
            Err(e) => {
                eprintln!("qemu/cluster: node{i}: {e:#}");
                Ok(124)
            }
        }
    }

    /// Runs `argv` in node `i` under `timeout(1)` (so that a command the guest is slow to answer
    /// does not pile up there), all within `limit`.
    fn guest(&self, i: u8, argv: &[&str], limit: Duration) -> Result<clusteros_e2e::Output> {
        let secs = limit.as_secs().saturating_sub(2).max(1).to_string();
        let mut full = vec!["timeout", "-k", "1", secs.as_str()];
        full.extend_from_slice(argv);
        self.qga(i).exec(&full, None, limit)
    }

    /// `systemctl is-system-running` in node `i`, or why there is no answer.
    fn system_state(&self, i: u8, limit: Duration) -> Result<String> {
        let out = self.guest(i, &["systemctl", "is-system-running"], limit)?;
        Ok(out.stdout.trim().to_string())
    }

    fn wait(&self, stall: Duration, names: &[String]) -> Result<u8> {
        let st = self.load()?;
        let nodes: Vec<u8> = if names.is_empty() {
            (1..=st.nodes).collect()
        } else {
            names.iter().map(|n| self.node_index(&st, n)).collect::<Result<_>>()?
        };
        struct Watch {
            i: u8,
            mark: String,
            moved: Instant,
            state: String,
        }
        let t0 = Instant::now();
        let mut pending: Vec<Watch> =
            nodes.iter().map(|&i| Watch { i, mark: String::new(), moved: t0, state: "no answer".into() }).collect();
        let mut failed = false;
        let mut next_note = t0 + Duration::from_secs(30);
        let secs = |t: Instant| t.elapsed().as_secs();
        while !pending.is_empty() {
            let mut still = Vec::new();
            for mut w in pending {
                let i = w.i;
                if self.pid(i).is_none() {
                    println!(
                        "node{i}: QEMU exited (after {}s); serial console ends: {}",
                        secs(t0),
                        self.serial_tail(i)
                    );
                    failed = true;
                    continue;
                }
                if let Ok(s) = self.system_state(i, Duration::from_secs(10)) {
                    w.state = if s.is_empty() { "no answer".into() } else { s };
                }
                match w.state.as_str() {
                    "running" => {
                        println!("node{i}: running (after {}s)", secs(t0));
                        continue;
                    }
                    "degraded" | "maintenance" | "stopping" | "offline" => {
                        println!("node{i}: {} (after {}s)", w.state, secs(t0));
                        let argv = ["systemctl", "list-units", "--failed", "--no-legend", "--plain"];
                        if let Ok(out) = self.guest(i, &argv, Duration::from_secs(10)) {
                            for l in out.stdout.lines() {
                                println!("node{i}: failed: {l}");
                            }
                        }
                        failed = true;
                        continue;
                    }
                    _ => {}
                }
                // Progress: the serial console grows, or the number of systemd jobs left changes.
                let serial = std::fs::metadata(self.node_dir(i).join("serial.log")).map_or(0, |m| m.len());
                let jobs = self
                    .guest(
                        i,
                        &["sh", "-c", "systemctl list-jobs --no-legend 2>/dev/null | wc -l"],
                        Duration::from_secs(10),
                    )
                    .map_or_else(|_| "?".to_string(), |o| o.stdout.trim().to_string());
                let mark = format!("{serial}/{jobs}");
                if mark != w.mark {
                    w.mark = mark;
                    w.moved = Instant::now();
                } else if w.moved.elapsed() >= stall {
                    println!(
                        "node{i}: boot stalled: no progress for {}s (state {}, {jobs} jobs left, serial log {serial} bytes) \
                         after {}s; serial console ends: {}",
                        stall.as_secs(),
                        w.state,
                        secs(t0),
                        self.serial_tail(i)
                    );
                    failed = true;
                    continue;
                }
                still.push(w);
            }
            pending = still;
            if !pending.is_empty() && Instant::now() >= next_note {
                next_note = Instant::now() + Duration::from_secs(30);
                for w in &pending {
                    println!(
                        "node{}: waiting for 'running' ({}s so far): state {}, progress {} (serial bytes/jobs left), \
                         last progress {}s ago",
                        w.i,
                        secs(t0),
                        w.state,
                        w.mark,
                        secs(w.moved)
                    );
                }
            }
            if !pending.is_empty() {
                // Polling interval of the wait on the guests' state.
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Ok(u8::from(failed))
    }

    /// The last non-empty line of node `i`'s serial console, without control characters.
    fn serial_tail(&self, i: u8) -> String {
        let b = std::fs::read(self.node_dir(i).join("serial.log")).unwrap_or_default();
        let text = String::from_utf8_lossy(&b[b.len().saturating_sub(2000)..]).replace('\r', "");
        let clean = strip_ansi(&text);
        let line = clean.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        tail(line, 1).chars().filter(|c| !c.is_control()).take(200).collect()
    }

    fn status(&self) -> Result<()> {
        let st = self.load()?;
        println!("cluster: {} node(s), boot={}, accel={}, run dir {}", st.nodes, st.boot, st.accel, self.dir.display());
        if NetNs::exists(NETNS)? {
            println!("netns: {NETNS} (bridge br0 10.77.0.1/24)");
        } else {
            println!("netns: absent");
        }
        for i in 1..=st.nodes {
            let ip = NetNs::node_ip(i);
            match self.pid(i) {
                Some(pid) => {
                    let state =
                        self.system_state(i, Duration::from_secs(3)).unwrap_or_else(|_| "(no guest agent yet)".into());
                    let serial = self.node_dir(i).join("serial.log");
                    println!("node{i:<3} {ip:<12} pid {pid:<8} {state}  serial {}", serial.display());
                }
                None => println!("node{i:<3} {ip:<12} stopped"),
            }
        }
        Ok(())
    }
}
