//! The running node: the [`Node`] context every loop shares (configuration, identity, Raft, the
//! peer client, what the loops last reported), and the loops themselves, each a
//! [`driver::Reconciler`] run by the one [`driver`]. Decisions are made by the pure functions in
//! [`crate::core`]; this module gathers their inputs and carries them out through the
//! [`crate::adapters`].
//!
//! Must not: decide cluster policy inline (put it in `core` with a table test), or reach the
//! servers above it (`server` calls in here, never the other way).

pub mod beacon;
mod dns;
pub mod driver;
mod elections;
mod error;
mod formation;
mod forward;
mod leader;
mod life;
mod member;
mod mesh;
mod reset;
mod services;
mod slurm;
mod transport;

pub use error::ApiError;
pub use life::{Phase, Progress, RunEnd, StartError};
pub use mesh::{MeshPeerReport, MeshReport};
pub use reset::{ResetError, finish_membership_reset, reset_membership};
pub use slurm::SlurmStateReport;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::ServerState;
use tokio::sync::{Notify, watch};
use tracing::info;

use crate::adapters::identity::Identity;
use crate::adapters::peers::{MemberKeys, PeerClient, PeerHandle};
use crate::adapters::raft::log_store::LogStore;
use crate::adapters::raft::network::{ContactTracker, Network};
use crate::adapters::raft::state_machine::{StateHandle, StateMachineStore};
use crate::adapters::raft::{Raft, RaftMetrics, raft_config};
use crate::core::auth::{ClusterKeys, Sender};
use crate::core::config::Config;
use crate::core::formation::Pledge;
use crate::core::membership;
use crate::core::state::{MemberSpec, NodeFacts, NodeId};
use crate::proto::Candidate;

use crate::adapters::host::{read_facts, resolve_advertise};
use formation::Discovered;

pub const LEFT_MARKER: &str = "left";
pub const RAFT_DIR: &str = "raft";

struct LeaderState {
    term: u64,
    since: Instant,
    /// When the leader last probed members' mesh addresses.
    transport_probe: Option<Instant>,
}

pub struct Node {
    pub cfg: Config,
    pub identity: Identity,
    pub api_addr: String,
    pub raft: Raft,
    pub state: StateHandle,
    pub log: LogStore,
    pub client: PeerHandle,
    pub contacts: ContactTracker,
    /// When each leader's AppendEntries (replication or heartbeat) last reached this node.
    pub heard_from_leader: ContactTracker,
    pub facts: NodeFacts,
    /// What the peer API admits; one for all of this node's listeners.
    pub gate: Arc<crate::core::auth::Gate>,
    /// Node keys of members this node's membership does not list yet, vouched for by a member it
    /// knows (learned while no leader reaches it; see [`crate::core::auth::VouchedKeys`]).
    vouched: Mutex<Option<crate::core::auth::VouchedKeys>>,
    pub secret_box: crate::adapters::secrets::SecretBox,
    /// The last services reconcile, for status.
    pub services: Mutex<Option<crate::adapters::services::ServiceReport>>,
    /// The last mesh reconcile, for status.
    pub mesh: Mutex<Option<MeshReport>>,
    /// The last round of SLURM state replication, for status.
    pub slurm_state: Mutex<Option<SlurmStateReport>>,
    /// On the SLURM controller: the newest sealed copy of its state directory, for the backup.
    pub slurm_copy: Mutex<Option<Arc<crate::proto::SlurmStateBlob>>>,
    /// wg0 has this node's mesh address and its peers (set by the mesh loop).
    mesh_wg: std::sync::atomic::AtomicBool,
    /// The extra peer listener on the mesh address is bound (only with a specific listen address;
    /// a 0.0.0.0 listener covers the mesh address already).
    mesh_listener: std::sync::atomic::AtomicBool,
    progress: Mutex<Progress>,
    /// Candidates of discovery, with what they reported.
    discovered: Mutex<BTreeMap<NodeId, Discovered>>,
    /// Discovery rounds of this run (views carry the round whose hello they answer).
    discovery_rounds: AtomicU64,
    /// The formation pledge this node holds (bootstrap_expect).
    pledges: crate::adapters::pledge::PledgeStore,
    /// Held while pledging and while joining, so that a node never does both at once.
    formation_lock: tokio::sync::Mutex<()>,
    /// Join addresses: from the config, or given by `clusteros join`.
    join_targets: Mutex<Vec<String>>,
    /// This node's address is still a guess (see [`crate::adapters::host::advertise_is_guessed`]),
    /// to be settled by the first node of its cluster it hears (`Node::hear_beacon`).
    address_guessed: std::sync::atomic::AtomicBool,
    /// Wakes the formation loop (see [`Node::nudge`]).
    wake: Notify,
    /// Counts changes of node-local inputs that other loops read (see [`Node::local_changed`]).
    local: watch::Sender<u64>,
    end: watch::Sender<Option<RunEnd>>,
    leader: Mutex<Option<LeaderState>>,
    /// Where linearizable reads start in the term this node leads.
    read_floor: Mutex<Option<membership::ReadFloor>>,
    /// The hand-off the stopping leader this node follows sent it (see [`elections`]).
    hand_off: Mutex<Option<elections::HandOff>>,
    /// Request ids of this run: a random origin and a counter.
    request_origin: u64,
    request_seq: AtomicU64,
    /// When this agent run started (the election timer's start before any leader is heard).
    started: Instant,
    /// LAN beacons; `None` when they are off (`discovery.beacon = false`).
    pub beacons: Option<beacon::Beacons>,
    /// Discovery by DNS SRV records; `None` without `discovery.dns_srv`.
    dns: Option<dns::DnsDiscovery>,
}

/// The membership a node last applied (so committed), as one read.
struct AppliedMembers {
    /// Its log id.
    log_id: Option<crate::core::raft_types::LogId>,
    /// Its members' underlay addresses (from their member records, else from the membership).
    addrs: BTreeMap<NodeId, String>,
    /// Its members' node keys.
    keys: BTreeMap<NodeId, String>,
}

impl Node {
    /// Opens storage, starts Raft and returns the agent; the caller starts servers and loops.
    pub async fn open(
        cfg: Config,
        identity: Identity,
        secret: &str,
        extra_join: Vec<String>,
    ) -> Result<Arc<Node>, StartError> {
        let keys = ClusterKeys::new(secret, &cfg.accepted_cluster_secrets);
        let members = MemberKeys::default();
        let client = PeerClient::new(keys, identity.node_id, identity.node_key().clone(), members.clone());
        let node = Self::open_with_peers(cfg, identity, secret, extra_join, PeerHandle::new(client)).await?;
        members.follow(node.raft.metrics());
        Ok(node)
    }

    /// [`Node::open`] with the given peer client (a [`crate::adapters::peers::FakePeers`] in tests).
    pub async fn open_with_peers(
        cfg: Config,
        identity: Identity,
        secret: &str,
        extra_join: Vec<String>,
        client: PeerHandle,
    ) -> Result<Arc<Node>, StartError> {
        let raft_dir = cfg.state_dir.join(RAFT_DIR);
        crate::adapters::files::ensure_dir(&raft_dir, 0o700)?;
        let log_path = raft_dir.join("raft.redb");
        let log = LogStore::open(&log_path).map_err(|source| StartError::Log {
            path: log_path.clone(),
            dir: raft_dir.clone(),
            source,
        })?;
        let sm = StateMachineStore::open(&raft_dir)?;
        let state = sm.handle();
        let keys = ClusterKeys::new(secret, &cfg.accepted_cluster_secrets);
        let contacts = ContactTracker::default();
        let network = Network {
            client: client.clone(),
            contacts: contacts.clone(),
            rpc_timeout: Duration::from_millis(cfg.raft.rpc_timeout_ms),
            snapshot_timeout: Duration::from_millis(cfg.raft.snapshot_timeout_ms),
        };
        let rc = raft_config(&cfg.raft)?;
        let raft = Raft::new(identity.node_id, rc, network, log.clone(), sm)
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        let api_addr = resolve_advertise(&cfg).map_err(StartError::Advertise)?.to_string();
        let mut join_targets = cfg.join.clone();
        for j in extra_join {
            if !join_targets.contains(&j) {
                join_targets.push(j);
            }
        }
        let (end, _) = watch::channel(None);
        let gate = Arc::new(crate::core::auth::Gate::new(keys.clone(), &identity.node_id.to_string()));
        let identity_id = identity.node_id;
        Ok(Arc::new(Node {
            identity,
            api_addr,
            raft,
            state,
            log,
            client,
            contacts,
            heard_from_leader: ContactTracker::default(),
            facts: read_facts(),
            gate,
            vouched: Mutex::new(None),
            secret_box: crate::adapters::secrets::SecretBox::new(secret, &cfg.accepted_cluster_secrets),
            services: Mutex::new(None),
            mesh: Mutex::new(None),
            slurm_state: Mutex::new(None),
            slurm_copy: Mutex::new(None),
            mesh_wg: std::sync::atomic::AtomicBool::new(false),
            mesh_listener: std::sync::atomic::AtomicBool::new(false),
            progress: Mutex::new(Progress { phase: Phase::Discovering, detail: "starting".into(), last_error: None }),
            discovered: Mutex::new(BTreeMap::new()),
            discovery_rounds: AtomicU64::new(0),
            pledges: crate::adapters::pledge::PledgeStore::open(&cfg.state_dir),
            formation_lock: tokio::sync::Mutex::new(()),
            address_guessed: std::sync::atomic::AtomicBool::new(crate::adapters::host::advertise_is_guessed(&cfg)),
            join_targets: Mutex::new(join_targets),
            wake: Notify::new(),
            local: watch::Sender::new(0),
            end,
            leader: Mutex::new(None),
            read_floor: Mutex::new(None),
            hand_off: Mutex::new(None),
            request_origin: rand::random(),
            request_seq: AtomicU64::new(0),
            started: Instant::now(),
            beacons: cfg
                .discovery
                .beacon
                .clone()
                .map(|b| beacon::Beacons::new(b, identity_id, secret, &cfg.accepted_cluster_secrets)),
            dns: cfg.discovery.dns.clone().map(dns::DnsDiscovery::new),
            cfg,
        }))
    }

    pub fn id(&self) -> NodeId {
        self.identity.node_id
    }

    pub fn progress(&self) -> Progress {
        self.progress.lock().expect("progress lock").clone()
    }

    fn set_progress(&self, phase: Phase, detail: impl Into<String>, last_error: Option<String>) {
        let detail = detail.into();
        let mut p = self.progress.lock().expect("progress lock");
        if p.phase != phase || p.detail != detail {
            info!(node_id = %self.id(), phase = %phase, "{detail}");
        }
        *p = Progress { phase, detail, last_error };
    }

    fn set_last_error(&self, e: Option<String>) {
        self.progress.lock().expect("progress lock").last_error = e;
    }

    /// Who the sender `id` of a request on `path` is, by this node's Raft membership `m` (the
    /// latest it holds, committed or not): on Raft routes, a node this membership does not list
    /// yet is a member with the key a known member vouched for, until the membership catches up.
    pub fn sender(&self, m: &crate::core::raft_types::StoredMembership, path: &str, id: NodeId) -> Sender {
        match crate::core::auth::sender_in(m.membership(), id) {
            Sender::Stranger if crate::proto::paths::is_raft(path) => {
                self.vouched.lock().expect("vouched lock").as_ref().map_or(Sender::Stranger, |v| v.sender(m, id))
            }
            other => other,
        }
    }

    /// Records node keys a member vouched for (keeps the later vouch). Whether it changed what
    /// this node holds.
    fn vouch(&self, v: crate::core::auth::VouchedKeys) -> bool {
        let mut held = self.vouched.lock().expect("vouched lock");
        let before = held.clone();
        *held = Some(v.newer(held.take()));
        *held != before
    }

    /// A copy of the current Raft metrics (the watch guard is never held across an await).
    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// Receives the reason once the run should end.
    /// A receiver of the run's end. An end requested before the call counts as a change, so
    /// `changed()` sees it: the daemon subscribes only once the servers and loops are up, and a
    /// beacon heard meanwhile may already have ended the run (`RunEnd::Readdress`).
    pub fn end_signal(&self) -> watch::Receiver<Option<RunEnd>> {
        let mut rx = self.end.subscribe();
        if rx.borrow().is_some() {
            rx.mark_changed();
        }
        rx
    }

    pub fn request_end(&self, why: RunEnd) {
        self.end.send_replace(Some(why));
        self.nudge();
    }

    /// Asks the formation loop to look again now (a pledge was taken, `clusteros join`).
    pub(crate) fn nudge(&self) {
        self.wake.notify_one();
    }

    /// Resolves on the next [`Node::nudge`] (one waiter: the formation loop).
    pub(crate) async fn nudged(&self) {
        self.wake.notified().await
    }

    /// Says that a node-local input of other loops changed (the SLURM state copy this node
    /// installed, which decides whether its standby slurmctld may run): the loops with
    /// [`driver::Triggers::local`] look again now rather than at their next timer.
    pub(crate) fn local_changed(&self) {
        self.local.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Receives [`Node::local_changed`].
    pub(crate) fn local_changes(&self) -> watch::Receiver<u64> {
        self.local.subscribe()
    }

    fn left_marker(&self) -> PathBuf {
        self.cfg.state_dir.join(LEFT_MARKER)
    }

    fn my_spec(&self) -> MemberSpec {
        MemberSpec {
            id: self.id(),
            name: self.identity.name.clone(),
            api_addr: self.api_addr.clone(),
            wg_public_key: self.identity.wg_public_key.clone(),
            facts: self.facts.clone(),
            labels: BTreeMap::new(),
            cluster_keys: self.gate.keys.fingerprints(),
        }
    }

    /// Whether this node's peer API answers on its mesh address: wg0 is configured and the peer
    /// API listens there (0.0.0.0, or the extra listener is bound). Without a managed wg0 (no
    /// systemd, e.g. host tests) only an extra listener bound on the mesh address counts: the
    /// kernel then has that address, or the bind would have failed.
    pub fn mesh_up(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let listener = self.mesh_listener.load(Relaxed);
        if self.manages_services() {
            self.mesh_wg.load(Relaxed) && (listener || self.cfg.listen_addr.ip().is_unspecified())
        } else {
            listener
        }
    }

    fn set_flag(&self, flag: &std::sync::atomic::AtomicBool, value: bool) {
        let before = self.mesh_up();
        flag.store(value, std::sync::atomic::Ordering::Relaxed);
        let after = self.mesh_up();
        if before != after {
            info!(node_id = %self.id(), mesh_up = after, "peer API on this node's mesh address is {}", if after { "up" } else { "down" });
        }
    }

    /// The extra peer API listener on the mesh address is bound.
    pub fn set_mesh_listening(&self) {
        self.set_flag(&self.mesh_listener, true);
    }

    /// A member's own (underlay) address, where it can be reached without the mesh; falls back to
    /// its Raft address for a member that has not registered yet.
    fn underlay_addr(&self, id: NodeId, raft_addr: &str) -> String {
        self.state
            .read(|d| d.state.members.get(&id).map(|m| m.spec.api_addr.clone()))
            .unwrap_or_else(|| raft_addr.into())
    }

    /// Where to send a peer API request for a member whose Raft address is `raft_addr`: that
    /// address once the leader has moved this node itself onto the mesh (proof that its tunnel to
    /// the leader works); before that (a node that just joined) or after a fallback (its tunnel
    /// broke), the member's underlay address.
    fn route(&self, id: NodeId, raft_addr: &str) -> String {
        let on_mesh = self.state.read(|d| {
            let mine = d.state.members.get(&self.id()).and_then(|m| m.mesh_addr());
            let current = d.last_membership.membership().get_node(&self.id()).map(|n| n.addr.clone());
            mine.is_some() && mine == current
        });
        if on_mesh && self.mesh_up() { raft_addr.to_string() } else { self.underlay_addr(id, raft_addr) }
    }

    /// The Raft membership this node last applied.
    fn applied_membership(&self) -> membership::AppliedMembership {
        self.state.read(|d| membership::AppliedMembership {
            index: d.last_membership.log_id().map(|l| l.index),
            members: d.last_membership.membership().nodes().map(|(id, _)| *id).collect(),
        })
    }

    /// Underlay addresses of the Raft members (for rejoining and for asking whether this node was
    /// removed: both must work without the mesh).
    fn member_underlay_addrs(&self) -> BTreeMap<NodeId, String> {
        self.applied_members().addrs
    }

    /// The membership this node last applied, read at once.
    fn applied_members(&self) -> AppliedMembers {
        self.state.read(|d| {
            let m = d.last_membership.membership();
            AppliedMembers {
                log_id: *d.last_membership.log_id(),
                addrs: m
                    .nodes()
                    .map(|(id, n)| {
                        (*id, d.state.members.get(id).map_or_else(|| n.addr.clone(), |m| m.spec.api_addr.clone()))
                    })
                    .collect(),
                keys: m.nodes().map(|(id, n)| (*id, n.node_key.clone())).collect(),
            }
        })
    }

    /// This node as discovery shows it. An unreadable pledge file shows as no pledge: formation
    /// stops on this node until the file is dealt with, so nothing acts on that.
    fn candidate(&self, initialized: bool, pledged: Option<Pledge>) -> Candidate {
        Candidate {
            id: self.id(),
            name: self.identity.name.clone(),
            api_addr: self.api_addr.clone(),
            initialized,
            bootstrap_expect: self.cfg.bootstrap_expect,
            pledged,
        }
    }

    fn held_pledge(&self) -> Option<Pledge> {
        self.pledges.held().ok().flatten().map(|h| h.pledge)
    }

    /// Discovery forgets a candidate it has not heard from directly for this long: a node that
    /// died during formation must not be chosen, or waited for, for ever.
    fn forget_after(&self) -> Duration {
        Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 15)
    }

    fn leader_addr(m: &RaftMetrics, id: NodeId) -> Option<String> {
        m.membership_config.membership().get_node(&id).map(|n| n.addr.clone())
    }

    fn not_leader(&self, m: &RaftMetrics) -> ApiError {
        match m.current_leader.filter(|l| *l != self.id()) {
            Some(l) => ApiError::NotLeader { leader: Self::leader_addr(m, l).map(|a| (l, a)) },
            None => ApiError::NotLeader { leader: None },
        }
    }

    fn is_leader(m: &RaftMetrics) -> bool {
        m.state == ServerState::Leader && m.current_leader == Some(m.id)
    }

    /// Text for "there is no leader": what this node is waiting for.
    fn no_leader_message(&self) -> String {
        let p = self.progress();
        match p.phase {
            Phase::Member => "no leader yet: an election is in progress or a quorum of voters is unreachable".into(),
            _ => format!("no leader yet: {}", p.detail),
        }
    }
}

/// Starts every loop of the node on the driver; each ends with the run. The formation loop
/// hands over to the member loop once this node is in the cluster.
pub fn start(node: &Arc<Node>) -> Vec<tokio::task::JoinHandle<()>> {
    use driver::run;
    let n = node.clone();
    let mut loops = vec![
        tokio::spawn(async move {
            run(n.clone(), formation::FormationLoop::new()).await;
            if n.progress().phase == Phase::Member {
                run(n, member::MemberLoop::default()).await;
            }
        }),
        spawn(node, leader::LeaderLoop::default()),
        spawn(node, elections::ElectionLoop::new(node)),
    ];
    if node.beacons.is_some() {
        loops.push(spawn(node, beacon::BeaconLoop));
    }
    if node.manages_services() {
        loops.push(spawn(node, services::ServicesLoop::default()));
        loops.push(spawn(node, mesh::MeshLoop::default()));
        loops.push(spawn(node, slurm::SlurmStateLoop::default()));
    }
    loops
}

fn spawn<R: driver::Reconciler>(node: &Arc<Node>, r: R) -> tokio::task::JoinHandle<()> {
    let node = node.clone();
    tokio::spawn(async move {
        driver::run(node, r).await;
    })
}

/// A node on `dir` for tests, talking to `fake` peers, with services off.
#[cfg(test)]
pub(crate) async fn test_node(
    dir: &std::path::Path,
    fake: &crate::adapters::peers::FakePeers,
    listen: &str,
    join: &[&str],
    bootstrap_expect: Option<usize>,
) -> Arc<Node> {
    use crate::core::config::{Credentials, FileConfig, Overrides, ServiceMode};
    const SECRET: &str = "runtime-test-secret-0123456789";
    let file = FileConfig {
        node_name: Some("n1".into()),
        state_dir: Some(dir.into()),
        listen_addr: Some(listen.into()),
        join: Some(join.iter().map(|p| p.to_string()).collect()),
        bootstrap_expect,
        cluster_secret: Some(SECRET.into()),
        manage_services: Some(ServiceMode::Off),
        ..Default::default()
    };
    let cfg = Config::resolve(file, Credentials::default(), &Overrides::default(), &|_| unreachable!()).unwrap();
    let identity = Identity::load_or_create(dir, "n1").unwrap();
    Node::open_with_peers(cfg, identity, SECRET, vec![], PeerHandle::new(fake.clone())).await.unwrap()
}
