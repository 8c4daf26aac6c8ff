//! The fast tier: the image's root file system booted as systemd-nspawn containers.
//!
//! For what needs the image's real systemd, D-Bus and units but no kernel of its own: formation,
//! the agent as a Type=notify service, the services loop starting munge and slurmctld over D-Bus,
//! a restart by systemd after the agent is killed. A container boots in seconds where a TCG VM
//! takes a minute. What needs a kernel stays in QEMU: WireGuard (the host kernel has none),
//! slurmd (it refuses this host's hybrid cgroup v1 hierarchy: "Hybrid mode is not supported"),
//! booting, power-off, PXE, growing the disk, upgrades.
//!
//! Each container gets its own read-only loop mount of the image's root partition (at its offset
//! in the raw disk; there is no udev here, so `systemd-nspawn -i` does not work) with a tmpfs
//! overlay (`--volatile=overlay`: nothing it writes reaches the image), its own network namespace
//! holding `host0`, one end of a veth pair whose other end is on the test's bridge, and its
//! settings as systemd credentials (`--load-credential`). The image's /etc/fstab describes the disk
//! (root by PARTLABEL, growfs), which a container does not have: an empty one is bound over it.
//! Commands run through `nsenter` into the container's namespaces. The container is powered off
//! (SIGTERM to nspawn), else killed, on drop; if the test is panicking its journal is saved first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::image::{gpt_partitions, path_str};
use crate::qga::Output;
use crate::{Abort, Guest, NetNs, TestEnv, run_cmd, wait_until, write_private};

/// Label of the image's root partition.
const ROOT_LABEL: &str = "clusteros-root";

pub struct ContainerBuilder {
    env: Arc<TestEnv>,
    name: String,
    net: Arc<NetNs>,
    index: u8,
    credentials: Vec<(String, Vec<u8>)>,
}

impl ContainerBuilder {
    pub(crate) fn new(env: Arc<TestEnv>, name: &str, net: &Arc<NetNs>, index: u8) -> ContainerBuilder {
        ContainerBuilder { env, name: name.into(), net: net.clone(), index, credentials: Vec::new() }
    }

    /// A systemd credential for the container's system (the agent's LoadCredential= finds it).
    pub fn credential(mut self, name: &str, value: impl AsRef<[u8]>) -> Self {
        self.credentials.push((name.into(), value.as_ref().to_vec()));
        self
    }

    /// Mounts the root, wires the network and boots the container. Does not wait for it.
    pub fn start(self) -> Result<Container> {
        let dir = self.env.run_dir().join(&self.name);
        if dir.exists() {
            bail!("a container named {} already exists in this test", self.name);
        }
        let root = dir.join("root");
        let creds = dir.join("credentials");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&creds)?;
        let raw = &self.env.image().raw;
        let part = gpt_partitions(raw)?
            .into_iter()
            .find(|p| p.label == ROOT_LABEL)
            .with_context(|| format!("{}: no partition labelled {ROOT_LABEL}", raw.display()))?;
        // noload: a read-only mount of an ext4 that is not replayed (the same file is mounted once
        // per container).
        let opts = format!("loop,ro,noload,offset={}", part.offset);
        run_cmd("mount", &["-o", &opts, path_str(raw)?, path_str(&root)?]).context("cannot mount the image's root")?;
        let mut c = Container {
            name: self.name.clone(),
            ip: NetNs::node_ip(self.index),
            netns: format!("{}-c{}", self.net.name(), self.index),
            dir: dir.clone(),
            root: root.clone(),
            nspawn: None,
            leader: 0,
            _net: self.net.clone(),
            env: self.env.clone(),
        };
        // From here on, Drop undoes what was done.
        run_cmd("ip", &["netns", "add", &c.netns])?;
        let veth = format!("cv{}", self.index);
        self.net.ip(&["link", "add", &veth, "type", "veth", "peer", "name", "host0", "netns", &c.netns])?;
        self.net.ip(&["link", "set", &veth, "master", crate::netns::BRIDGE, "up"])?;
        let network = format!(
            "[Match]\nName=host0\n\n[Network]\nAddress={}/24\nGateway={}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
            c.ip,
            crate::netns::HOST_ADDR
        );
        let mut all = vec![
            ("system.hostname".to_string(), self.name.clone().into_bytes()),
            ("network.network.10-clusteros".to_string(), network.into_bytes()),
        ];
        all.extend(self.credentials);
        let mut args: Vec<String> = vec![
            "-D".into(),
            path_str(&root)?.into(),
            "--volatile=overlay".into(),
            "--boot".into(),
            "--register=no".into(),
            "--keep-unit".into(),
            format!("--machine={}", self.name),
            "--capability=CAP_NET_ADMIN".into(),
            format!("--network-namespace-path=/run/netns/{}", c.netns),
        ];
        let fstab = dir.join("fstab");
        std::fs::write(&fstab, "# a container's root is nspawn's: nothing to mount or grow\n")?;
        args.push(format!("--bind-ro={}:/etc/fstab", path_str(&fstab)?));
        for (name, value) in &all {
            let f = creds.join(name);
            write_private(&f, value)?;
            args.push(format!("--load-credential={name}:{}", path_str(&f)?));
        }
        let log = std::fs::File::create(dir.join("console.log"))?;
        let child = Command::new("systemd-nspawn")
            .args(&args)
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start systemd-nspawn (run scripts/install-host-deps)")?;
        let pid = child.id();
        c.nspawn = Some(child);
        c.leader = wait_until(Duration::from_secs(30), &format!("{}: the container's init", self.name), || {
            if let Some(st) = c.nspawn.as_mut().expect("just set").try_wait()? {
                return Err(Abort::new(format!("systemd-nspawn exited ({st}): {}", c.console_tail(15))).into());
            }
            container_init(pid).context("no init process in the container's own pid namespace yet")
        })?;
        Ok(c)
    }
}

pub struct Container {
    name: String,
    ip: String,
    netns: String,
    dir: PathBuf,
    root: PathBuf,
    nspawn: Option<Child>,
    /// The container's PID 1, as the host sees it.
    leader: u32,
    /// Keeps the bridge alive as long as the container.
    _net: Arc<NetNs>,
    env: Arc<TestEnv>,
}

impl Container {
    /// The container's address on the test LAN.
    pub fn ip(&self) -> &str {
        &self.ip
    }

    /// Runs `argv` in the container (all its namespaces, as root) under `timeout(1)`.
    pub fn exec_input(&self, argv: &[&str], input: Option<&[u8]>, limit: Duration) -> Result<Output> {
        use std::io::Write as _;
        let secs = limit.as_secs().max(1).to_string();
        let leader = self.leader.to_string();
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "5", &secs, "nsenter", "-t", &leader, "-a", "--"]).args(argv);
        cmd.stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let t0 = Instant::now();
        let mut child = cmd.spawn().context("cannot run nsenter")?;
        if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
            stdin.write_all(data)?;
        }
        let out = child.wait_with_output()?;
        let code = out.status.code().unwrap_or(128);
        if code == 124 && t0.elapsed() >= limit {
            bail!("{}: `{}` timed out after {secs} s", self.name, argv.join(" "));
        }
        Ok(Output {
            code,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Waits until `unit` is active; fails at once if it failed or the container is gone.
    pub fn wait_active(&self, unit: &str, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        wait_until(timeout, &format!("{}: {unit} to be active", self.name), || {
            let out = self.exec_timeout(&["systemctl", "is-active", unit], Duration::from_secs(20))?;
            match out.stdout.trim() {
                "active" => Ok(()),
                "failed" => Err(Abort::new(format!("{unit} failed: {}", self.unit_log(unit))).into()),
                s => bail!("{unit} is {s}"),
            }
        })?;
        Ok(t0.elapsed())
    }

    fn unit_log(&self, unit: &str) -> String {
        self.exec_timeout(&["journalctl", "-u", unit, "-n", "15", "--no-pager", "-o", "cat"], Duration::from_secs(20))
            .map(|o| o.stdout)
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    fn console_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default();
        crate::vm::strip_ansi(&crate::vm::tail(&text, lines))
    }

    /// Powers the container off (nspawn turns SIGTERM into a clean shutdown of the container),
    /// bounded; kills it if that does not end it.
    pub fn stop(&mut self) {
        let Some(mut child) = self.nspawn.take() else { return };
        let _ = run_cmd("kill", &["-TERM", &child.id().to_string()]);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            // Polling interval while the container shuts down.
            std::thread::sleep(Duration::from_millis(100));
        }
        // Pull the plug: nspawn, and the container's init with everything in its pid namespace.
        let _ = child.kill();
        let _ = run_cmd("kill", &["-KILL", &self.leader.to_string()]);
        let _ = child.wait();
    }

    fn save_logs(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        let _ = std::fs::copy(self.dir.join("console.log"), dir.join("console.log"));
        let cmds: [(&str, &[&str]); 3] = [
            ("journal.txt", &["journalctl", "-b", "--no-pager"]),
            ("status.txt", &["clusteros", "status"]),
            ("systemctl-failed.txt", &["systemctl", "--failed", "--no-pager"]),
        ];
        for (file, argv) in cmds {
            let text = match self.exec_timeout(argv, Duration::from_secs(30)) {
                Ok(o) => format!("{}{}", o.stdout, o.stderr),
                Err(e) => format!("{e:#}\n"),
            };
            std::fs::write(dir.join(file), text)?;
        }
        Ok(())
    }
}

impl Guest for Container {
    fn name(&self) -> &str {
        &self.name
    }

    fn exec_timeout(&self, argv: &[&str], limit: Duration) -> Result<Output> {
        self.exec_input(argv, None, limit)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() && self.nspawn.is_some() {
            let dir = self.env.log_dir().join(&self.name);
            if let Err(e) = self.save_logs(&dir) {
                eprintln!("e2e: cannot save the logs of {}: {e:#}", self.name);
            }
        }
        self.stop();
        if let Err(e) = run_cmd("umount", &[path_str(&self.root).unwrap_or_default()]) {
            eprintln!("e2e: {}: {e:#}", self.name);
        }
        let _ = run_cmd("ip", &["netns", "delete", &self.netns]);
    }
}

/// The container's init: the child of nspawn `pid` that is PID 1 of its own pid namespace (while
/// nspawn sets up, its first child is a helper in ours).
fn container_init(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()).find(|c| {
        let status = std::fs::read_to_string(format!("/proc/{c}/status")).unwrap_or_default();
        // "NSpid:\t<pid here>\t1": two levels, PID 1 in the inner one.
        status.lines().find_map(|l| l.strip_prefix("NSpid:")).is_some_and(|ns| {
            let ids: Vec<&str> = ns.split_whitespace().collect();
            ids.len() >= 2 && ids.last() == Some(&"1")
        })
    })
}
