//! N ClusterOS VMs on one private LAN, given one cluster secret and each other's addresses.
//!
//! Node `i` (1-based) is VM `node<i>` with address 10.77.0.(10+i) and receives the credentials
//! `clusteros.cluster-secret`, `clusteros.join` (every node's IP:7600) and
//! `clusteros.bootstrap-expect`, unless overridden per node. With
//! [`ClusterBuilder::beacons_only`] there is no `clusteros.join`: the nodes find each other by LAN
//! beacons.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::vm::{Boot, Vm, VmBuilder};
use crate::{NetNs, TestEnv, wait_until};

/// Names of the systemd credentials the agent reads.
pub mod credential {
    pub const CLUSTER_SECRET: &str = "clusteros.cluster-secret";
    pub const JOIN: &str = "clusteros.join";
    pub const BOOTSTRAP_EXPECT: &str = "clusteros.bootstrap-expect";
}

pub const PEER_PORT: u16 = 7600;

/// `clusteros status --json` is the agent's own `StatusReport`: the tests decode exactly what the
/// agent encodes, so a change to the report cannot silently drift from what the tests read.
pub use clusteros::status::{MemberReport as MemberStatus, RaftReport as RaftStatus, StatusReport as Status};

/// Views of a status report that the scenarios use.
pub trait StatusExt {
    fn node_id(&self) -> Result<&str>;
    fn leader(&self) -> Option<&str>;
    /// Sorted voter ids.
    fn voters(&self) -> Vec<String>;
    /// Sorted learner ids.
    fn learners(&self) -> Vec<String>;
    /// Sorted (id, role) of the members.
    fn membership(&self) -> Vec<(String, String)>;
    /// Whether the node says it is a member of a cluster.
    fn is_member(&self) -> bool;
    /// One line for error messages.
    fn summary(&self) -> String;
}

impl StatusExt for Status {
    fn node_id(&self) -> Result<&str> {
        self.node.id.as_deref().with_context(|| format!("{} reports no node id", self.node.name))
    }
    fn leader(&self) -> Option<&str> {
        self.raft.as_ref().and_then(|r| r.leader_id.as_deref())
    }
    fn voters(&self) -> Vec<String> {
        let mut v = self.raft.as_ref().map(|r| r.voters.clone()).unwrap_or_default();
        v.sort();
        v
    }
    fn learners(&self) -> Vec<String> {
        let mut v = self.raft.as_ref().map(|r| r.learners.clone()).unwrap_or_default();
        v.sort();
        v
    }
    fn membership(&self) -> Vec<(String, String)> {
        let mut v: Vec<_> = self.members.iter().map(|m| (m.id.clone(), m.role.clone())).collect();
        v.sort();
        v
    }
    fn is_member(&self) -> bool {
        self.phase == Some(clusteros::runtime::Phase::Member)
    }

    fn summary(&self) -> String {
        let r = self.raft.as_ref();
        format!(
            "{} id {} cluster {} phase {} raft {} term {} leader {} voters {:?} learners {:?} last_error {}",
            self.node.name,
            self.node.id.as_deref().unwrap_or("-"),
            self.cluster_id.as_deref().unwrap_or("-"),
            self.phase.map_or_else(|| "-".to_string(), |p| p.to_string()),
            r.map_or("-", |r| r.state.as_str()),
            r.map_or(0, |r| r.term),
            self.leader().unwrap_or("-"),
            self.voters(),
            self.learners(),
            self.last_error.as_deref().unwrap_or("-"),
        )
    }
}

/// Runs `clusteros status --json` on `vm` (which exits 1 when the node is unconfigured, still
/// printing the report).
pub fn status_of<G: crate::Guest + ?Sized>(vm: &G) -> Result<Status> {
    let out = vm.exec_timeout(&["clusteros", "status", "--json"], Duration::from_secs(30))?;
    serde_json::from_str(&out.stdout).with_context(|| format!("{}: `clusteros status --json`: {out}", vm.name()))
}

/// Every status is a member of the same cluster (cluster id) and names the same leader and the
/// same `voters` voters; returns (leader, voters).
pub fn agreement(statuses: &[Status], voters: usize) -> Result<(String, Vec<String>)> {
    let first = statuses.first().context("no status")?;
    for s in statuses {
        ensure!(s.configured, "{} is not configured: {:?}", s.node.name, s.problems);
        ensure!(s.is_member(), "{}", s.summary());
        ensure!(s.cluster_id.is_some(), "no cluster id yet: {}", s.summary());
        ensure!(s.leader().is_some(), "no leader: {}", s.summary());
        ensure!(s.voters().len() == voters, "not {voters} voters: {}", s.summary());
        ensure!(
            s.cluster_id == first.cluster_id && s.leader() == first.leader() && s.voters() == first.voters(),
            "nodes disagree: {} / {}",
            first.summary(),
            s.summary()
        );
    }
    let leader = first.leader().expect("checked").to_string();
    ensure!(first.voters().contains(&leader), "the leader {leader} is not a voter: {}", first.summary());
    Ok((leader, first.voters()))
}

/// Per-node credential changes: (name, Some(value) to set / None to leave out).
type Overrides = BTreeMap<u8, Vec<(String, Option<Vec<u8>>)>>;
/// Per-node changes of the VM itself (kernel arguments, disks, ...).
type NodeOptions = BTreeMap<u8, Vec<Box<dyn FnOnce(VmBuilder) -> VmBuilder>>>;

pub struct ClusterBuilder {
    env: Arc<TestEnv>,
    n: u8,
    secret: Option<String>,
    bootstrap_expect: Option<usize>,
    boot: Option<Boot>,
    mem_mib: u32,
    cpus: u32,
    overrides: Overrides,
    options: NodeOptions,
    join: bool,
}

impl ClusterBuilder {
    /// `n` nodes with a random secret and bootstrap_expect = n.
    pub fn new(env: &Arc<TestEnv>, n: u8) -> ClusterBuilder {
        ClusterBuilder {
            env: env.clone(),
            n,
            secret: Some(random_secret()),
            bootstrap_expect: Some(usize::from(n)),
            boot: None,
            mem_mib: 1024,
            cpus: 1,
            overrides: BTreeMap::new(),
            options: BTreeMap::new(),
            join: true,
        }
    }

    /// No `clusteros.join` credential: the nodes have only the secret and bootstrap_expect and
    /// find each other by LAN beacons, as identical images do.
    pub fn beacons_only(mut self) -> Self {
        self.join = false;
        self
    }

    pub fn secret(mut self, s: Option<&str>) -> Self {
        self.secret = s.map(str::to_string);
        self
    }

    pub fn bootstrap_expect(mut self, n: Option<usize>) -> Self {
        self.bootstrap_expect = n;
        self
    }

    pub fn boot(mut self, b: Boot) -> Self {
        self.boot = Some(b);
        self
    }

    pub fn mem_mib(mut self, mib: u32) -> Self {
        self.mem_mib = mib;
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    /// Node `i` (1-based) gets credential `name` = `value` (None: not passed at all).
    pub fn node_credential(mut self, i: u8, name: &str, value: Option<&str>) -> Self {
        self.overrides.entry(i).or_default().push((name.into(), value.map(|v| v.as_bytes().to_vec())));
        self
    }

    /// Node `i` (1-based) is built with `f` applied to its VM builder, e.g.
    /// `|b| b.kernel_arg("x=1").extra_disk("1G")`.
    pub fn node_options(mut self, i: u8, f: impl FnOnce(VmBuilder) -> VmBuilder + 'static) -> Self {
        self.options.entry(i).or_default().push(Box::new(f));
        self
    }

    /// Creates the namespace and starts every VM (without waiting for the guests).
    pub fn start(mut self) -> Result<Cluster> {
        let net = self.env.netns()?;
        let join = self
            .join
            .then(|| (1..=self.n).map(|i| format!("{}:{PEER_PORT}", NetNs::node_ip(i))).collect::<Vec<_>>().join(","));
        let mut cluster = Cluster {
            env: self.env.clone(),
            net,
            secret: self.secret.clone(),
            join,
            bootstrap_expect: self.bootstrap_expect,
            boot: self.boot,
            mem_mib: self.mem_mib,
            cpus: self.cpus,
            nodes: Vec::new(),
        };
        for i in 1..=self.n {
            let mut b = cluster.node_builder(i);
            for (name, value) in self.overrides.get(&i).into_iter().flatten() {
                b = match value {
                    Some(v) => b.credential(name, v),
                    None => b.remove_credential(name),
                };
            }
            for f in self.options.remove(&i).into_iter().flatten() {
                b = f(b);
            }
            cluster.add(b)?;
        }
        Ok(cluster)
    }
}

/// 32 random bytes, base64 (like `openssl rand -base64 32`).
pub fn random_secret() -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
}

pub struct Cluster {
    env: Arc<TestEnv>,
    net: Arc<NetNs>,
    secret: Option<String>,
    /// `None`: no join addresses (LAN beacons only).
    join: Option<String>,
    bootstrap_expect: Option<usize>,
    boot: Option<Boot>,
    mem_mib: u32,
    cpus: u32,
    nodes: Vec<Vm>,
}

impl Cluster {
    pub fn env(&self) -> &Arc<TestEnv> {
        &self.env
    }

    pub fn net(&self) -> &Arc<NetNs> {
        &self.net
    }

    pub fn secret(&self) -> Option<&str> {
        self.secret.as_deref()
    }

    /// The clusteros.join value every node gets: IP:7600 of the initial nodes (`None`: the
    /// nodes have none, see [`ClusterBuilder::beacons_only`]).
    pub fn join_addrs(&self) -> Option<&str> {
        self.join.as_deref()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn nodes(&self) -> &[Vm] {
        &self.nodes
    }

    /// Node `i`, 1-based (node(1) is VM node1).
    pub fn node(&self, i: usize) -> &Vm {
        &self.nodes[i - 1]
    }

    /// A builder for node `i` with the cluster's credentials and its address on the LAN; change
    /// it and pass it to [`Cluster::add`].
    pub fn node_builder(&self, i: u8) -> VmBuilder {
        let mut b = self.env.vm(&format!("node{i}")).network(&self.net, i).mem_mib(self.mem_mib).cpus(self.cpus);
        if let Some(boot) = self.boot {
            b = b.boot(boot);
        }
        if let Some(s) = &self.secret {
            b = b.credential(credential::CLUSTER_SECRET, s);
        }
        if let Some(join) = &self.join {
            b = b.credential(credential::JOIN, join);
        }
        if let Some(n) = self.bootstrap_expect {
            b = b.credential(credential::BOOTSTRAP_EXPECT, n.to_string());
        }
        b
    }

    /// Starts the VM and makes it the next node (`node(len())`).
    pub fn add(&mut self, b: VmBuilder) -> Result<&Vm> {
        let expected = format!("node{}", self.nodes.len() + 1);
        ensure!(b.name() == expected, "nodes are added in order: expected {expected}, got {}", b.name());
        self.nodes.push(b.start()?);
        Ok(self.nodes.last().expect("just pushed"))
    }

    /// Waits (concurrently) until each of `nodes` (1-based) is `running`; records each one's time
    /// as phase `<label>/<node>`.
    pub fn wait_running(&self, nodes: &[usize], timeout: Duration, label: &str) -> Result<()> {
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = nodes
                .iter()
                .map(|&i| {
                    let vm = self.node(i);
                    s.spawn(move || {
                        let d = vm.wait_system_running(timeout)?;
                        self.env.timer.record(&format!("{label}/{}", vm.name()), d);
                        Ok(())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("waiting thread panicked")))).collect()
        });
        let errors: Vec<String> = results.into_iter().filter_map(|r| r.err().map(|e| format!("{e:#}"))).collect();
        if !errors.is_empty() {
            bail!("{}", errors.join("\n"));
        }
        Ok(())
    }

    /// `clusteros status --json` on node `i` (1-based).
    pub fn status_json(&self, i: usize) -> Result<Status> {
        status_of(self.node(i))
    }

    /// Statuses of `nodes` (1-based), in that order.
    pub fn statuses(&self, nodes: &[usize]) -> Result<Vec<Status>> {
        nodes.iter().map(|&i| self.status_json(i)).collect()
    }

    /// Waits until every one of `nodes` is a member and all name the same leader and the same
    /// `voters` voters. Returns the statuses.
    pub fn wait_agreement(&self, nodes: &[usize], voters: usize, timeout: Duration) -> Result<Vec<Status>> {
        let what = format!("nodes {nodes:?} to agree on one leader and {voters} voters");
        wait_until(timeout, &what, || {
            let st = self.statuses(nodes)?;
            agreement(&st, voters)?;
            Ok(st)
        })
    }

    /// The 1-based index of the node whose id is `id`.
    pub fn index_of(&self, statuses: &[Status], nodes: &[usize], id: &str) -> Result<usize> {
        statuses
            .iter()
            .zip(nodes)
            .find(|(s, _)| s.node.id.as_deref() == Some(id))
            .map(|(_, &i)| i)
            .with_context(|| format!("no node among {nodes:?} has id {id}"))
    }

    /// Time since `t0`, recorded as phase `name`.
    pub fn record(&self, name: &str, t0: Instant) -> Duration {
        let d = t0.elapsed();
        self.env.timer.record(name, d);
        d
    }
}
