//! The host cluster harness, shared by the cluster tests and the cluster benchmark: real
//! `clusteros agent` processes, each on its own 127.x.y.z address, configured by serializing the
//! agent's own config type. Waits on conditions (never fixed sleeps). Every agent is killed when the
//! cluster is dropped; if the test is failing, every agent's log is printed and the directory kept.

use std::path::PathBuf;
use std::process::Child;
use std::time::Duration;

use clusteros::cli::client::ClientError;
use clusteros::core::config::{DiscoveryFile, FileConfig, HealthTuning, RaftTuning};
use clusteros::status::StatusReport;
use clusteros_testkit::{AgentFiles, fast_raft};
use rand::Rng;

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
    /// Serve `/metrics` on the node's own address, port 7601 (the nodes share the host's
    /// loopback, where the default would put them all); false: the agent's default.
    pub metrics_on_node_addr: bool,
    /// Other cluster secrets the node accepts (`accepted_cluster_secrets_file`).
    pub accepted_secrets: Vec<String>,
    /// Send and hear LAN beacons: only on a [`clusteros_testkit::lan::Lan`] (see
    /// [`Cluster::on_lan`]), never on the host's network.
    pub beacons: bool,
    /// Listen on 0.0.0.0:7600 with no advertise address, so the agent works out its address
    /// itself (otherwise it listens on, and advertises, the node's own address).
    pub listen_any: bool,
    /// The agent's default Raft timings (for the failover benchmark) instead of the tests' fast
    /// ones.
    pub default_raft: bool,
    /// `[discovery] dns_srv` and `dns_servers` (one server).
    pub dns: Option<(String, String)>,
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
            metrics_on_node_addr: true,
            accepted_secrets: Vec::new(),
            beacons: false,
            listen_any: false,
            default_raft: false,
            dns: None,
        }
    }
}

pub struct Node {
    pub name: String,
    pub addr: String,
    /// Its directory: config, secret, socket, log, and the state directory `state/`.
    pub files: AgentFiles,
    pub opts: Opts,
    pub join: Vec<String>,
    pub child: Option<Child>,
}

impl Node {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's own config type, serialized, with the test timings.
    pub(super) fn write_config(&self) {
        let o = &self.opts;
        let file = FileConfig {
            node_name: Some(self.name.clone()),
            state_dir: Some(self.files.dir.join("state")),
            listen_addr: Some(if o.listen_any { "0.0.0.0:7600".into() } else { self.addr.clone() }),
            metrics_addr: o
                .metrics_on_node_addr
                .then(|| format!("{}:7601", self.addr.rsplit_once(':').expect("IP:PORT").0)),
            join: Some(self.join.clone()),
            bootstrap_expect: o.bootstrap_expect,
            max_voters: Some(o.max_voters),
            mesh_cidr: o.mesh_cidr.clone(),
            raft: if o.default_raft {
                RaftTuning {
                    snapshot_after_logs: o.snapshot_after_logs,
                    logs_to_keep: o.logs_to_keep,
                    ..RaftTuning::default()
                }
            } else {
                fast_raft(o.snapshot_after_logs, o.logs_to_keep)
            },
            health: HealthTuning {
                suspect_after_ms: o.suspect_after_ms,
                failed_after_ms: o.failed_after_ms,
                remove_after_ms: o.remove_after_ms,
            },
            accepted_cluster_secrets_file: self.files.write_accepted_secrets(&o.accepted_secrets).unwrap(),
            discovery: DiscoveryFile {
                beacon: Some(o.beacons),
                dns_srv: o.dns.as_ref().map(|d| d.0.clone()),
                dns_servers: o.dns.as_ref().map(|d| vec![d.1.clone()]),
                ..DiscoveryFile::default()
            },
            ..FileConfig::default()
        };
        self.files.write_config(file, &o.secret).unwrap();
    }
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<Node>,
    net: Net,
}

/// Where a cluster's nodes listen.
enum Net {
    /// Node `i` at 127.a.b.(i + 1), in the host's (or `Opts::netns`'s) network.
    Loopback(u8, u8),
    /// Node `i` in namespace `netns[i]` of a bridged LAN, at `addrs[i]`.
    Lan { netns: Vec<String>, addrs: Vec<String> },
}

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match clusteros_testkit::poll(timeout, f).await {
        Some(v) => v,
        None => panic!("timed out after {timeout:?} waiting for: {what}"),
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

/// A 127.a.b.0/24 of its own for each cluster of this process (scenarios run two at a time), from
/// a random start so that two test processes are unlikely to meet.
fn unique_net() -> (u8, u8) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(usize::MAX);
    let _ = NEXT.compare_exchange(
        usize::MAX,
        rand::thread_rng().gen_range(0..240 * 249),
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let k = NEXT.fetch_add(1, Ordering::SeqCst) % (240 * 249);
    ((10 + k / 249) as u8, (1 + k % 249) as u8)
}

impl Cluster {
    /// `n` nodes that all list every node as a join address.
    pub fn new(n: usize, opts: Opts) -> Cluster {
        let (a, b) = unique_net();
        let root = tempfile::Builder::new().prefix("clusteros-test-").tempdir().unwrap();
        let mut c = Cluster { root, nodes: Vec::new(), net: Net::Loopback(a, b) };
        let addrs: Vec<String> = (0..n).map(|i| c.addr_of(i)).collect();
        for _ in 0..n {
            c.push_node(opts.clone(), addrs.clone());
        }
        c
    }

    /// `n` nodes with one config, as identical images have: the first `joins` nodes are every
    /// node's join addresses.
    pub fn identical(n: usize, joins: usize, opts: Opts) -> Cluster {
        let mut c = Cluster::new(0, opts.clone());
        let join: Vec<String> = (0..joins.min(n)).map(|i| c.addr_of(i)).collect();
        for _ in 0..n {
            c.push_node(opts.clone(), join.clone());
        }
        c
    }

    /// Nodes in namespaces `slots` of `lan` (node `i` in namespace `slots.start + i`), with LAN
    /// beacons on and no join addresses: they find each other by beacon alone.
    pub fn on_lan(lan: &clusteros_testkit::lan::Lan, slots: std::ops::Range<usize>, opts: Opts) -> Cluster {
        let root = tempfile::Builder::new().prefix("clusteros-test-").tempdir().unwrap();
        let net = Net::Lan {
            netns: slots.clone().map(|j| lan.netns(j).to_string()).collect(),
            addrs: slots.clone().map(|j| format!("{}:7600", lan.ip(j))).collect(),
        };
        let mut c = Cluster { root, nodes: Vec::new(), net };
        for _ in slots {
            c.push_node(Opts { beacons: true, ..opts.clone() }, Vec::new());
        }
        c
    }

    fn addr_of(&self, i: usize) -> String {
        match &self.net {
            Net::Loopback(a, b) => format!("127.{a}.{b}.{}:7600", i + 1),
            Net::Lan { addrs, .. } => addrs[i].clone(),
        }
    }

    pub(super) fn push_node(&mut self, mut opts: Opts, join: Vec<String>) -> usize {
        let i = self.nodes.len();
        let name = format!("node{}", i + 1);
        let dir = self.root.path().join(&name);
        std::fs::create_dir_all(&dir).unwrap();
        if let Net::Lan { netns, .. } = &self.net {
            opts.netns = Some(netns[i].clone());
        }
        let node = Node { name, addr: self.addr_of(i), files: AgentFiles::new(dir), opts, join, child: None };
        node.write_config();
        self.nodes.push(node);
        i
    }

    pub fn start(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} already running", node.name);
        let child = node.files.spawn(&binary(), node.opts.netns.as_deref(), None).unwrap();
        node.child = Some(child);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start(i);
        }
    }

    /// SIGTERM, then wait for the process to exit (bounded; SIGKILL after 20 s).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = std::process::Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let start = std::time::Instant::now();
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

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].child.is_some()).collect()
    }

    pub async fn status(&self, i: usize) -> Result<StatusReport, ClientError> {
        self.nodes[i].files.client().status().await
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

    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let log = n.files.log();
            let lines: Vec<&str> = log.lines().collect();
            let from = lines.len().saturating_sub(300);
            eprintln!(
                "===== {} ({}) log: {} (last {} lines) =====",
                n.name,
                n.addr,
                n.files.log_path().display(),
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
