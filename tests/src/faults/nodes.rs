//! The agents under test: one real `clusteros agent` process per node, each in its node's network
//! namespace, with its state directory on a small tmpfs of its own (so that one node's disk can
//! fill up or turn read-only). A supervisor restarts an agent that exits, as systemd's
//! `Restart=always` does in the image, unless the nemesis holds it down.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clusteros::status::StatusReport;
use clusteros_testkit::AgentFiles;

use super::net::Lan;
use crate::run_cmd;

pub const SECRET: &str = "fault-suite-cluster-secret-0123456789";
/// Size of each node's state file system.
pub const STATE_FS_MB: u64 = 64;
/// How long the supervisor waits before it restarts an agent that exited (systemd: RestartSec).
pub const RESTART_DELAY: Duration = Duration::from_millis(500);

/// The agent binary: `CLUSTEROS_BIN`, else the release build, else the debug build.
pub fn agent_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("CLUSTEROS_BIN") {
        return Ok(PathBuf::from(p));
    }
    for profile in ["release", "debug"] {
        let p = crate::target_dir().join(profile).join("clusteros");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("no agent binary: run `cargo build --release -p clusteros-agent` or set CLUSTEROS_BIN")
}

pub struct Node {
    pub index: usize,
    pub name: String,
    pub netns: String,
    pub addr: String,
    /// Its directory: config, secret, socket, log; the state directory is mounted below it.
    pub files: AgentFiles,
    /// A tmpfs of [`STATE_FS_MB`] MiB.
    pub state_dir: PathBuf,
    child: Mutex<Option<Child>>,
    /// The supervisor keeps the agent running while this is set.
    want_up: AtomicBool,
    paused: AtomicBool,
    /// Agent starts so far.
    pub starts: AtomicU32,
    /// Exits the nemesis did not cause: when, and what.
    exits: Mutex<Vec<(Instant, String)>>,
    last_exit: Mutex<Option<Instant>>,
    bin: PathBuf,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().expect("child lock").as_ref().map(Child::id)
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    pub fn exits(&self) -> Vec<(Instant, String)> {
        self.exits.lock().expect("exits lock").clone()
    }

    /// Writes `agent.toml` (the agent's own config type, serialized) and the secret file.
    fn write_config(&self, n: usize, peers: &[String]) -> Result<()> {
        use clusteros::core::config::{FileConfig, HealthTuning, ServiceMode};
        let file = FileConfig {
            node_name: Some(self.name.clone()),
            state_dir: Some(self.state_dir.clone()),
            listen_addr: Some(self.addr.clone()),
            join: Some(peers.to_vec()),
            bootstrap_expect: Some(n),
            max_voters: Some(n),
            manage_services: Some(ServiceMode::Off),
            // Not used by the suite, and the nodes would contend for 127.0.0.1:7601.
            metrics_addr: Some("off".into()),
            raft: clusteros_testkit::fast_raft(300, 100),
            health: HealthTuning { suspect_after_ms: 2000, failed_after_ms: 4000, remove_after_ms: 3_600_000 },
            ..FileConfig::default()
        };
        Ok(self.files.write_config(file, SECRET)?)
    }

    fn spawn(&self) -> Result<()> {
        let mut slot = self.child.lock().expect("child lock");
        if slot.is_some() {
            return Ok(());
        }
        let n = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        let banner = format!("===== fault suite: start {n} of {} =====", self.name);
        *slot = Some(self.files.spawn(&self.bin, Some(&self.netns), Some(&banner))?);
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// kill -9 and reap; the supervisor leaves the node down until [`Node::start`].
    pub fn kill(&self) {
        self.want_up.store(false, Ordering::SeqCst);
        if let Some(mut c) = self.child.lock().expect("child lock").take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused.store(false, Ordering::SeqCst);
    }

    /// Starts the agent now and keeps it running.
    pub fn start(&self) -> Result<()> {
        self.want_up.store(true, Ordering::SeqCst);
        self.spawn()
    }

    /// SIGSTOP (`true`) or SIGCONT.
    pub fn pause(&self, stop: bool) -> Result<()> {
        let Some(pid) = self.pid() else { return Ok(()) };
        run_cmd("kill", &[if stop { "-STOP" } else { "-CONT" }, &pid.to_string()])?;
        self.paused.store(stop, Ordering::SeqCst);
        Ok(())
    }

    /// One supervisor step: reap an exited agent, restart it if it should run.
    fn supervise(&self) {
        let mut slot = self.child.lock().expect("child lock");
        if let Some(c) = slot.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            *slot = None;
            *self.last_exit.lock().expect("exit lock") = Some(Instant::now());
            self.exits.lock().expect("exits lock").push((Instant::now(), format!("{} exited: {status}", self.name)));
        }
        drop(slot);
        let due = self.last_exit.lock().expect("exit lock").is_none_or(|t| t.elapsed() >= RESTART_DELAY);
        if self.want_up.load(Ordering::SeqCst) && due && self.pid().is_none() {
            let _ = self.spawn();
        }
    }

    pub async fn status(&self, timeout: Duration) -> Option<StatusReport> {
        tokio::time::timeout(timeout, self.files.client().status()).await.ok()?.ok()
    }

    /// Fills the state file system (a file of zeros until ENOSPC).
    pub fn fill_disk(&self) -> Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(self.state_dir.join("filler"))?;
        let chunk = vec![0u8; 1 << 20];
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => return Err(e).context("filling the state file system"),
            }
        }
        // Also the last few bytes.
        loop {
            match f.write(&chunk[..512]) {
                Ok(n) if n > 0 => {}
                _ => break,
            }
        }
        Ok(())
    }

    pub fn free_disk(&self) -> Result<()> {
        match std::fs::remove_file(self.state_dir.join("filler")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Remounts the state file system read-only (`true`) or read-write. A file system cannot go
    /// read-only while a process holds files open for writing (EBUSY), so the caller stops the
    /// agent first: this is the node that comes back with its disk remounted read-only.
    pub fn remount(&self, read_only: bool) -> Result<()> {
        let opts = if read_only { "remount,ro" } else { "remount,rw" };
        run_cmd("mount", &["-o", opts, &self.state_dir.to_string_lossy()])?;
        Ok(())
    }
}

/// Unmounts every file system mounted below `dir` (state file systems an earlier run, killed
/// before it could clean up, left behind), deepest first.
pub fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return };
    let prefix = format!("{}/", dir.display());
    let mut points: Vec<&str> =
        mounts.lines().filter_map(|l| l.split_whitespace().nth(1)).filter(|p| p.starts_with(&prefix)).collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = run_cmd("umount", &["-l", p]);
    }
}

/// All agents of one cluster under test, their directories and the supervisor.
pub struct Agents {
    pub nodes: Vec<Arc<Node>>,
    pub root: PathBuf,
    keep: AtomicBool,
    supervisor: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Agents {
    /// Prepares `lan.len()` nodes under `root` (created), each listing every node as a join
    /// address, with `bootstrap_expect` = `max_voters` = the number of nodes.
    pub fn new(lan: &Lan, root: &Path) -> Result<Arc<Agents>> {
        let bin = agent_binary()?;
        std::fs::create_dir_all(root)?;
        let n = lan.len();
        let addrs: Vec<String> = (0..n).map(|i| format!("{}:7600", lan.ip(i))).collect();
        let mut nodes = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let dir = root.join(&name);
            let state_dir = dir.join("state");
            std::fs::create_dir_all(&state_dir)?;
            run_cmd(
                "mount",
                &[
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={STATE_FS_MB}m,mode=0700"),
                    "tmpfs",
                    &state_dir.to_string_lossy(),
                ],
            )
            .context("cannot mount a tmpfs for a node's state (the fault suite needs root)")?;
            let node = Node {
                index: i,
                name,
                netns: lan.netns(i).to_string(),
                addr: addr.clone(),
                files: AgentFiles::new(dir),
                state_dir,
                child: Mutex::new(None),
                want_up: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                starts: AtomicU32::new(0),
                exits: Mutex::new(Vec::new()),
                last_exit: Mutex::new(None),
                bin: bin.clone(),
            };
            node.write_config(n, &addrs)?;
            nodes.push(Arc::new(node));
        }
        Ok(Arc::new(Agents {
            nodes,
            root: root.to_owned(),
            keep: AtomicBool::new(false),
            supervisor: Mutex::new(None),
        }))
    }

    /// Starts every agent and the supervisor.
    pub fn start_all(self: &Arc<Self>) -> Result<()> {
        for n in &self.nodes {
            n.start()?;
        }
        let me = Arc::downgrade(self);
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let Some(a) = me.upgrade() else { return };
                for n in &a.nodes {
                    n.supervise();
                }
            }
        });
        *self.supervisor.lock().expect("supervisor lock") = Some(task);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Keep the directory (histories, logs) after the run.
    pub fn keep(&self) {
        self.keep.store(true, Ordering::SeqCst);
    }

    /// Every node's status (None where the agent does not answer within `timeout`).
    pub async fn statuses(&self, timeout: Duration) -> Vec<Option<StatusReport>> {
        futures::future::join_all(self.nodes.iter().map(|n| n.status(timeout))).await
    }

    /// The node that leads, as the nodes see it: one that says it is the leader (the highest
    /// term wins when a deposed leader has not noticed yet).
    pub async fn leader(&self) -> Option<usize> {
        let st = self.statuses(Duration::from_millis(800)).await;
        st.iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let r = s.as_ref()?.raft.as_ref()?;
                (r.state == "leader").then_some((r.term, i))
            })
            .max()
            .map(|(_, i)| i)
    }

    /// Waits until every node answers and all agree on one leader, then until every node has
    /// applied what that leader had logged at that moment (under a steady write load the leader's
    /// log keeps growing, so "caught up" is measured against a fixed point); returns the leader.
    /// Polls (no fixed sleeps) up to `timeout`.
    pub async fn wait_converged(&self, timeout: Duration) -> Result<usize> {
        let start = Instant::now();
        let mut target: Option<(usize, u64)> = None;
        loop {
            let st = self.statuses(Duration::from_secs(2)).await;
            let why = match (agreed_leader(&st), target) {
                (Err(why), _) => {
                    target = None;
                    why
                }
                (Ok((l, _)), Some((tl, index))) if l == tl => match lagging(&st, index) {
                    None => return Ok(l),
                    Some(why) => why,
                },
                (Ok((l, last)), _) => {
                    target = Some((l, last));
                    continue;
                }
            };
            if start.elapsed() > timeout {
                bail!("the cluster did not converge within {timeout:?}: {why}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every node's log, one after another.
    pub fn dump_logs(&self, tail: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            let log = n.files.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(tail);
            out.push_str(&format!("===== {} ({}) {} =====\n", n.name, n.addr, n.files.log_path().display()));
            for l in &lines[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// The leader (index, last log index) when every node is up and all agree on it.
fn agreed_leader(st: &[Option<StatusReport>]) -> std::result::Result<(usize, u64), String> {
    let mut leader = None;
    let mut found = None;
    for (i, s) in st.iter().enumerate() {
        let s = s.as_ref().ok_or_else(|| format!("n{} does not answer", i + 1))?;
        let r = s.raft.as_ref().ok_or_else(|| format!("n{} has no Raft state", i + 1))?;
        let l = r.leader_id.clone().ok_or_else(|| format!("n{} knows no leader", i + 1))?;
        if *leader.get_or_insert(l.clone()) != l {
            return Err(format!("n{} follows {l}, others {leader:?}", i + 1));
        }
        if r.state == "leader" {
            found = Some((i, r.last_log_index.unwrap_or(0)));
        }
    }
    found.ok_or_else(|| "no node says it is the leader".into())
}

/// Which node has not applied `index` yet, if any.
fn lagging(st: &[Option<StatusReport>], index: u64) -> Option<String> {
    st.iter().enumerate().find_map(|(i, s)| {
        let applied = s.as_ref().and_then(|s| s.raft.as_ref()).and_then(|r| r.applied_index);
        (applied.unwrap_or(0) < index).then(|| format!("n{} applied {applied:?} of {index}", i + 1))
    })
}

impl Drop for Agents {
    fn drop(&mut self) {
        if let Some(t) = self.supervisor.lock().expect("supervisor lock").take() {
            t.abort();
        }
        for n in &self.nodes {
            let _ = n.pause(false);
            n.kill();
            let _ = run_cmd("umount", &["-l", &n.state_dir.to_string_lossy()]);
        }
        if !self.keep.load(Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}
