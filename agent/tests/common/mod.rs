//! Host cluster harness: real `clusteros agent` processes on loopback addresses, each node on its
//! own 127.x.y.z address. Waits on conditions (never fixed sleeps). Every agent is killed when the
//! cluster is dropped; if the test is failing, every agent's log is printed and the directory kept.
#![allow(dead_code)]

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clusteros::cli::client::{ClientError, LocalClient};
use clusteros::status::StatusReport;
use rand::Rng;

/// Scenarios run one at a time: many agents per scenario on 2 cores is enough load.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub const SECRET: &str = "harness-cluster-secret-0123456789";

#[derive(Clone, Debug)]
pub struct Opts {
    pub bootstrap_expect: Option<usize>,
    pub max_voters: usize,
    pub secret: String,
    pub suspect_after_ms: u64,
    pub failed_after_ms: u64,
    pub remove_after_ms: u64,
    pub snapshot_after_logs: u64,
    pub logs_to_keep: u64,
    pub mesh_cidr: Option<String>,
    /// Run the agents inside this network namespace (see [`NetNs`]).
    pub netns: Option<String>,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            bootstrap_expect: Some(3),
            max_voters: 3,
            secret: SECRET.into(),
            suspect_after_ms: 2_000,
            failed_after_ms: 4_000,
            remove_after_ms: 600_000,
            snapshot_after_logs: 1000,
            logs_to_keep: 500,
            mesh_cidr: None,
            netns: None,
        }
    }
}

pub struct Node {
    pub name: String,
    pub addr: String,
    pub dir: PathBuf,
    pub opts: Opts,
    pub join: Vec<String>,
    pub child: Option<Child>,
}

impl Node {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    /// `GET /metrics` of this node (the peer address, port 7601).
    pub async fn metrics(&self) -> Option<String> {
        let ip = self.addr.rsplit_once(':')?.0;
        let r = reqwest::get(format!("http://{ip}:7601/metrics")).await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn client(&self) -> LocalClient {
        LocalClient::new(&self.socket())
    }
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = File::open(self.log_path()) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn write_config(&self) {
        let o = &self.opts;
        let join = self.join.iter().map(|j| format!("{j:?}")).collect::<Vec<_>>().join(", ");
        let mut expect = o.bootstrap_expect.map(|n| format!("bootstrap_expect = {n}\n")).unwrap_or_default();
        if let Some(cidr) = &o.mesh_cidr {
            expect.push_str(&format!("mesh_cidr = {cidr:?}\n"));
        }
        let text = format!(
            "node_name = {name:?}\nstate_dir = {state:?}\nsocket_path = {sock:?}\nlisten_addr = {addr:?}\n\
             join = [{join}]\n{expect}max_voters = {mv}\ncluster_secret_file = {secret:?}\n\
             [raft]\nheartbeat_ms = 100\nelection_timeout_min_ms = 800\nelection_timeout_max_ms = 1600\n\
             snapshot_after_logs = {snap}\nlogs_to_keep = {keep}\nrpc_timeout_ms = 1000\n\
             [health]\nsuspect_after_ms = {s}\nfailed_after_ms = {f}\nremove_after_ms = {r}\n",
            name = self.name,
            state = self.dir.join("state"),
            sock = self.socket(),
            addr = self.addr,
            mv = o.max_voters,
            secret = self.dir.join("secret"),
            snap = o.snapshot_after_logs,
            keep = o.logs_to_keep,
            s = o.suspect_after_ms,
            f = o.failed_after_ms,
            r = o.remove_after_ms,
        );
        std::fs::write(self.dir.join("agent.toml"), text).unwrap();
        std::fs::write(self.dir.join("secret"), format!("{}\n", o.secret)).unwrap();
    }
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<Node>,
    net: (u8, u8),
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The agent under test: this build's binary, or `CLUSTEROS_TEST_BIN` (to run a scenario against
/// another build, e.g. to show that a regression test fails without its fix).
pub fn binary() -> PathBuf {
    match std::env::var_os("CLUSTEROS_TEST_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_clusteros")),
    }
}

impl Cluster {
    /// `n` nodes that all list every node as a join address.
    pub fn new(n: usize, opts: Opts) -> Cluster {
        let mut rng = rand::thread_rng();
        let net = (rng.gen_range(10..250), rng.gen_range(1..250));
        let root = tempfile::Builder::new().prefix("clusteros-test-").tempdir().unwrap();
        let mut c = Cluster { root, nodes: Vec::new(), net };
        let addrs: Vec<String> = (0..n).map(|i| c.addr_of(i)).collect();
        for _ in 0..n {
            c.push_node(opts.clone(), addrs.clone());
        }
        c
    }

    fn addr_of(&self, i: usize) -> String {
        format!("127.{}.{}.{}:7600", self.net.0, self.net.1, i + 1)
    }

    fn push_node(&mut self, opts: Opts, join: Vec<String>) -> usize {
        let i = self.nodes.len();
        let name = format!("node{}", i + 1);
        let dir = self.root.path().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        let node = Node { name, addr: self.addr_of(i), dir, opts, join, child: None };
        node.write_config();
        self.nodes.push(node);
        i
    }

    /// Adds a node whose join addresses are the current nodes' addresses.
    pub fn add_node(&mut self, opts: Opts) -> usize {
        let join = self.nodes.iter().map(|n| n.addr.clone()).collect();
        self.push_node(opts, join)
    }

    pub fn start(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} already running", node.name);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(node.log_path()).unwrap();
        let mut cmd = match &node.opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let child = cmd
            .arg("agent")
            .arg("--config")
            .arg(node.dir.join("agent.toml"))
            .env("CLUSTEROS_LOG", "info,openraft=warn")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        node.child = Some(child);
    }

    /// Starts `voters` nodes with `bootstrap_expect`, waits for them to form, then adds and
    /// starts one more node that joins as a learner. Returns the learner's index.
    pub async fn form_with_learner(&mut self, opts: &Opts) -> usize {
        self.start_all();
        let voters = self.nodes.len();
        self.wait_converged(voters, 0, Duration::from_secs(60)).await;
        let n = self.add_node(Opts { bootstrap_expect: None, ..opts.clone() });
        self.start(n);
        n
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every node's log, one after another (for lines whichever node led at the time wrote).
    pub fn all_logs(&self) -> String {
        self.nodes.iter().map(|n| n.log()).collect()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) a running node, like a paused VM or a suspended machine.
    pub fn freeze(&self, i: usize, frozen: bool) {
        let pid = self.nodes[i].pid().expect("the node runs");
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGTERM, then wait for the process to exit (bounded; SIGKILL after 20 s).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(20) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("{} did not stop within 20 s of SIGTERM", self.nodes[i].name);
        }
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].child.is_some()).collect()
    }

    pub async fn status(&self, i: usize) -> Result<StatusReport, ClientError> {
        self.nodes[i].client().status().await
    }

    /// Waits until every running node agrees on one leader and the given voter/learner counts,
    /// and has applied the leader's log. Returns the leader's node index.
    pub async fn wait_converged(&self, voters: usize, learners: usize, timeout: Duration) -> usize {
        let running = self.running();
        wait_until(
            timeout,
            &format!("{} running nodes agree on a leader with {voters} voters and {learners} learners", running.len()),
            || async {
                let mut leader = None;
                let mut leader_last = None;
                let mut applied = Vec::new();
                for &i in &running {
                    let s = self.status(i).await.ok()?;
                    let raft = s.raft?;
                    if raft.voters.len() != voters || raft.learners.len() != learners {
                        return None;
                    }
                    let l = raft.leader_id.clone()?;
                    if *leader.get_or_insert(l.clone()) != l {
                        return None;
                    }
                    if raft.state == "leader" {
                        leader_last = raft.last_log_index;
                    }
                    applied.push(raft.applied_index);
                    if s.members.len() != voters + learners || s.members.iter().any(|m| m.name.is_none()) {
                        return None;
                    }
                }
                let last = leader_last?;
                if applied.iter().any(|a| *a != Some(last)) {
                    return None;
                }
                let leader = leader?;
                for &i in &running {
                    if self.status(i).await.ok()?.node.id.as_deref() == Some(leader.as_str()) {
                        return Some(i);
                    }
                }
                None
            },
        )
        .await
    }

    /// The node index of the node with this hex id.
    pub async fn index_of(&self, id: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            let dir = self.nodes[i].dir.join("state/identity.json");
            if let Ok(text) = std::fs::read_to_string(dir) {
                let v: serde_json::Value = serde_json::from_str(&text).ok()?;
                if format!("{:016x}", v["node_id"].as_u64()?) == id {
                    return Some(i);
                }
            }
        }
        None
    }

    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let log = n.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(300);
            eprintln!(
                "===== {} ({}) log: {} (last {} lines) =====",
                n.name,
                n.addr,
                n.log_path().display(),
                lines.len() - from
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            self.dump_logs();
            let kept = std::mem::replace(&mut self.root, tempfile::tempdir().unwrap()).keep();
            eprintln!("cluster directory kept for inspection: {}", kept.display());
        }
    }
}

pub fn rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

pub fn state_dir(node: &Node) -> &Path {
    &node.dir
}

/// A network namespace of its own for a test (needs root and iproute2), deleted on drop. Its
/// loopback is up, so 127.0.0.0/8 works inside it as on the host.
pub struct NetNs {
    pub name: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("cannot run `ip` (install iproute2)");
    assert!(
        out.status.success(),
        "`ip {}` failed: {} (network namespace tests need root)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl NetNs {
    pub fn new(prefix: &str) -> NetNs {
        let name = format!("{prefix}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n NAME ARGS...`, panicking with its error output when it fails.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// The value of the sample `line_prefix VALUE` (e.g. `clusteros_raft_voters`) in a metrics text.
pub fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(line_prefix)?.strip_prefix(' ')?.parse().ok())
}

/// A small tmpfs mounted over a directory (needs root); unmounted on drop.
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &Path, size_mb: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m,mode=0700"), "tmpfs"])
            .arg(path)
            .output()
            .expect("cannot run mount");
        assert!(out.status.success(), "mount tmpfs: {} (this test needs root)", String::from_utf8_lossy(&out.stderr));
        Tmpfs { path: path.to_owned() }
    }

    /// Writes zeros into `name` until the file system is full.
    pub fn fill(&self, name: &str) {
        use std::io::Write;
        let mut f = File::create(self.path.join(name)).unwrap();
        let chunk = vec![0u8; 1 << 16];
        while f.write(&chunk).map(|n| n > 0).unwrap_or(false) {}
        while f.write(&chunk[..64]).map(|n| n > 0).unwrap_or(false) {}
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).output();
    }
}
