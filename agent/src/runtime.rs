//! The running agent: wires configuration, identity, Raft and the APIs together, and runs the
//! loops that form or join the cluster, register this node, and (on the leader) track health and
//! drive membership changes. Decisions are made by the pure functions in
//! [`membership`](crate::core::membership); this module only gathers inputs and carries decisions out.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, ForwardToLeader, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::adapters::identity::Identity;
use crate::adapters::peers::{PeerClient, PeerError};
use crate::adapters::raft::log_store::LogStore;
use crate::adapters::raft::network::{ContactTracker, Network};
use crate::adapters::raft::state_machine::{StateHandle, StateMachineStore};
use crate::adapters::raft::{Raft, RaftMetrics, raft_config};
use crate::core::auth::ClusterKey;
use crate::core::config::Config;
use crate::core::membership::{self, AutopilotView, Formation, MembershipAction, PeerView, Pledge, PledgeOutcome};
use crate::core::state::{Command, Health, MemberSpec, NodeFacts, NodeId, RequestId, Response};
use crate::proto::{
    Candidate, HelloRequest, HelloResponse, JoinRequest, JoinResponse, LeaveRequest, PledgeResponse, ReadRequest,
    ReadResponse, paths,
};
use crate::server::ApiError;

pub const LEFT_MARKER: &str = "left";
pub const RAFT_DIR: &str = "raft";

/// Where the agent is in its life cycle.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Looking for the other `bootstrap_expect` nodes.
    Discovering,
    /// Asking a running cluster to admit this node.
    Joining,
    /// Part of the cluster (voter or learner).
    Member,
    /// Left the cluster with `clusteros leave`; waits for `clusteros join`.
    Left,
    /// Nothing to do: no join address and no `bootstrap_expect`.
    Idle,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Discovering => "discovering",
            Phase::Joining => "joining",
            Phase::Member => "member",
            Phase::Left => "left",
            Phase::Idle => "idle",
        })
    }
}

#[derive(Debug, Clone)]
pub struct Progress {
    pub phase: Phase,
    /// One line for people: what the agent waits for.
    pub detail: String,
    /// The last problem met while forming or joining, with what to do.
    pub last_error: Option<String>,
}

/// Why an agent run ended and what the next one does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// Shut down (signal).
    Shutdown,
    /// Left the cluster: wipe Raft state, take a new node id, wait for `clusteros join`.
    Left,
    /// Removed by the cluster while away: wipe Raft state, take a new node id, join again via these.
    Rejoin { via: Vec<String> },
    /// Raft stopped on an error it cannot recover from (a storage write failed: disk full,
    /// read-only file system, I/O error). The process exits so that systemd starts it again.
    Fatal(String),
}

struct LeaderState {
    term: u64,
    since: Instant,
    /// When the leader last probed members' mesh addresses.
    transport_probe: Option<Instant>,
}

pub struct Agent {
    pub cfg: Config,
    pub identity: Identity,
    pub api_addr: String,
    pub raft: Raft,
    pub state: StateHandle,
    pub log: LogStore,
    pub client: PeerClient,
    pub contacts: ContactTracker,
    /// When each leader's AppendEntries (replication or heartbeat) last reached this node.
    pub heard_from_leader: ContactTracker,
    pub facts: NodeFacts,
    pub key: ClusterKey,
    pub secret_box: crate::core::secrets::SecretBox,
    /// The last services reconcile, for status.
    pub services: Mutex<Option<crate::services::ServiceReport>>,
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
    wake: Notify,
    end: watch::Sender<Option<RunEnd>>,
    leader: Mutex<Option<LeaderState>>,
    /// Where linearizable reads start in the term this node leads.
    read_floor: Mutex<Option<membership::ReadFloor>>,
    /// Request ids of this run: a random origin and a counter.
    request_origin: u64,
    request_seq: AtomicU64,
    /// When this agent run started (the election timer's start before any leader is heard).
    started: Instant,
}

/// The error for a request that a leader may still apply: a timeout that says so. (A write goes
/// under one request id, so it is applied at most once however often it was sent.)
fn may_be_applied(last: &ApiError) -> ApiError {
    ApiError::Timeout(format!(
        "{last}; a leader may still apply the request (a write at most once), so read the value back before you retry"
    ))
}

/// How one forwarding attempt ended.
enum Forwarded<Resp> {
    /// The leader's answer (or an error that retrying would not change).
    Answer(Result<Resp, ApiError>),
    /// This node follows a new leader now: send the request there.
    LeaderChanged,
    /// Try again (the leader was not there, or could not act in time).
    Retry { error: ApiError, maybe_delivered: bool },
}

impl StartError {
    /// Whether the error is about the state directory's storage (full, read-only, unreadable,
    /// corrupt): then the agent reports it and tries again later instead of exiting.
    pub fn is_storage(&self) -> bool {
        matches!(
            self,
            StartError::StateDir(_) | StartError::Log { .. } | StartError::StateMachine(_) | StartError::Raft(_)
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot create state directory: {0}")]
    StateDir(#[from] crate::adapters::files::WriteError),
    #[error(
        "cannot open the Raft log {path}: {source}; if it is corrupt, move the directory {dir} away and the node will rejoin as a new member"
    )]
    Log { path: PathBuf, dir: PathBuf, source: redb::Error },
    #[error(transparent)]
    StateMachine(#[from] crate::adapters::raft::state_machine::OpenError),
    #[error("invalid Raft settings: {0}")]
    RaftConfig(#[from] openraft::ConfigError),
    #[error("cannot start Raft: {0}")]
    Raft(String),
    #[error("cannot listen on {addr}: {source}; is another agent running? set listen_addr to a free address")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot work out this node's address: {0}; set advertise_addr in /etc/clusteros/agent.toml")]
    Advertise(String),
}

/// A candidate of discovery: heard from directly (its hello, or its answer to ours), or named by
/// another candidate.
struct Discovered {
    candidate: Candidate,
    /// Its answer to this node's last hello that it answered.
    view: Option<PeerView>,
    /// When this node last heard from it directly.
    heard: Option<Instant>,
}

fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(ms / 2 + rand::thread_rng().gen_range(0..=ms / 2 + 1))
}

/// The address other nodes reach this node at: the configured one, the listen address if it is
/// specific, or the source address the kernel picks towards the first join address.
pub fn resolve_advertise(cfg: &Config) -> Result<SocketAddr, String> {
    if let Some(a) = cfg.advertise_addr {
        return Ok(a);
    }
    if !cfg.listen_addr.ip().is_unspecified() {
        return Ok(cfg.listen_addr);
    }
    let port = cfg.listen_addr.port();
    // connect() on a UDP socket sends nothing; it only asks the kernel for a route and source.
    let probe = |target: SocketAddr| -> Option<SocketAddr> {
        let sock = std::net::UdpSocket::bind(("0.0.0.0", 0)).ok()?;
        sock.connect(target).ok()?;
        sock.local_addr().ok().map(|a| SocketAddr::new(a.ip(), port))
    };
    for j in &cfg.join {
        use std::net::ToSocketAddrs;
        if let Some(a) = j.to_socket_addrs().ok().and_then(|mut it| it.next()).and_then(probe) {
            return Ok(a);
        }
    }
    // No join address: the address of the default route (TEST-NET-1; nothing is sent).
    probe("192.0.2.1:9".parse().expect("valid")).ok_or_else(|| "no join address and no default route".into())
}

/// Reads this machine's facts (CPUs, memory, kernel).
pub fn read_facts() -> NodeFacts {
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let memory_mb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024);
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    NodeFacts { cpus, memory_mb, kernel, arch: std::env::consts::ARCH.to_string() }
}

impl Agent {
    /// Opens storage, starts Raft and returns the agent; the caller starts servers and loops.
    pub async fn open(
        cfg: Config,
        identity: Identity,
        secret: &str,
        extra_join: Vec<String>,
    ) -> Result<Arc<Agent>, StartError> {
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
        let key = ClusterKey::derive(secret);
        let client = PeerClient::new(key.clone());
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
        Ok(Arc::new(Agent {
            identity,
            api_addr,
            raft,
            state,
            log,
            client,
            contacts,
            heard_from_leader: ContactTracker::default(),
            facts: read_facts(),
            key,
            secret_box: crate::core::secrets::SecretBox::new(secret),
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
            join_targets: Mutex::new(join_targets),
            wake: Notify::new(),
            end,
            leader: Mutex::new(None),
            read_floor: Mutex::new(None),
            request_origin: rand::random(),
            request_seq: AtomicU64::new(0),
            started: Instant::now(),
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

    /// A copy of the current Raft metrics (the watch guard is never held across an await).
    pub fn metrics(&self) -> RaftMetrics {
        self.raft.metrics().borrow().clone()
    }

    /// Receives the reason once the run should end.
    pub fn end_signal(&self) -> watch::Receiver<Option<RunEnd>> {
        self.end.subscribe()
    }

    pub fn request_end(&self, why: RunEnd) {
        self.end.send_replace(Some(why));
        self.wake.notify_one();
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

    /// Underlay addresses of the Raft members (for rejoining and for asking whether this node was
    /// removed: both must work without the mesh).
    fn member_underlay_addrs(&self) -> BTreeMap<NodeId, String> {
        self.state.read(|d| {
            d.last_membership
                .membership()
                .nodes()
                .map(|(id, n)| {
                    (*id, d.state.members.get(id).map_or_else(|| n.addr.clone(), |m| m.spec.api_addr.clone()))
                })
                .collect()
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

    // -----------------------------------------------------------------------------------------
    // Leader-only operations (run locally on the leader, forwarded there by `on_leader`)
    // -----------------------------------------------------------------------------------------

    fn forward_err(&self, e: ForwardToLeader<NodeId, BasicNode>) -> ApiError {
        match (e.leader_id.filter(|l| *l != self.id()), e.leader_node) {
            (Some(id), Some(node)) => ApiError::NotLeader { leader: Some((id, node.addr)) },
            _ => ApiError::NotLeader { leader: None },
        }
    }

    fn write_err(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> ApiError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => self.forward_err(f),
            RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => ApiError::Refused(c.to_string()),
            RaftError::Fatal(f) => ApiError::Internal(format!("Raft stopped: {f}")),
        }
    }

    /// Proposes a command on this node, which must be the leader.
    pub async fn local_write(&self, cmd: Command) -> Result<Response, ApiError> {
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 5);
        match tokio::time::timeout(t, self.raft.client_write(cmd)).await {
            Ok(Ok(r)) => Ok(r.data),
            Ok(Err(e)) => Err(self.write_err(e)),
            Err(_) => Err(ApiError::Timeout(format!(
                "the write was not committed within {t:?}: a quorum of voters may be down"
            ))),
        }
    }

    /// Serves a linearizable read on this node, which must be the leader: leadership confirmed
    /// by a quorum after the read arrived, then the state applied up to the read index, which
    /// covers every write this leader acknowledged (see [`membership::ReadFloor`]).
    pub async fn local_read(&self, key: &str) -> Result<ReadResponse, ApiError> {
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 5);
        let deadline = tokio::time::Instant::now() + t;
        let m = self.metrics();
        if !Self::is_leader(&m) {
            return Err(self.not_leader(&m));
        }
        let floor = {
            let mut f = self.read_floor.lock().expect("read floor lock");
            *f = Some(membership::ReadFloor::observe(*f, m.current_term, m.last_log_index));
            f.expect("just set")
        };
        let read = match tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await {
            Ok(Ok(log_id)) => log_id,
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => return Err(self.forward_err(f)),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(q)))) => {
                return Err(ApiError::NoLeader(format!("the leader cannot reach a quorum of voters: {q}")));
            }
            Ok(Err(RaftError::Fatal(f))) => return Err(ApiError::Internal(format!("Raft stopped: {f}"))),
            Err(_) => {
                return Err(ApiError::Timeout(format!("the read could not be confirmed by a quorum within {t:?}")));
            }
        };
        // The leadership just confirmed must be the one whose floor applies.
        let m = self.metrics();
        if m.current_term != floor.term || !Self::is_leader(&m) {
            return Err(self.not_leader(&m));
        }
        let index = floor.read_index(read.map(|l| l.index));
        let mut rx = self.raft.metrics();
        let applied =
            tokio::time::timeout_at(deadline, rx.wait_for(|m| m.last_applied.is_some_and(|l| l.index >= index)));
        match applied.await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Err(ApiError::Internal("Raft stopped".into())),
            Err(_) => {
                return Err(ApiError::Timeout(format!(
                    "the read index {index} was not applied within {t:?}: a quorum of voters may be down"
                )));
            }
        }
        let entry = self.state.read(|d| d.state.kv.get(key).cloned());
        Ok(ReadResponse { key: key.to_string(), entry, read_index: Some(index) })
    }

    async fn change_membership(&self, changes: ChangeMembers<NodeId, BasicNode>, retain: bool) -> Result<(), ApiError> {
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 10);
        match tokio::time::timeout(t, self.raft.change_membership(changes, retain)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.write_err(e)),
            Err(_) => Err(ApiError::Timeout(format!("the membership change was not committed within {t:?}"))),
        }
    }

    async fn remove_member(&self, id: NodeId) -> Result<(), ApiError> {
        let voters: BTreeSet<NodeId> = self.metrics().membership_config.membership().voter_ids().collect();
        if voters.contains(&id) {
            self.change_membership(ChangeMembers::RemoveVoters([id].into()), false).await
        } else {
            self.change_membership(ChangeMembers::RemoveNodes([id].into()), false).await
        }
    }

    /// Admits a node as a learner (the autopilot promotes it once it has caught up).
    pub async fn local_join(&self, req: JoinRequest) -> Result<JoinResponse, ApiError> {
        crate::core::config::validate_node_name(&req.name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        req.api_addr
            .parse::<SocketAddr>()
            .map_err(|e| ApiError::BadRequest(format!("api_addr {:?} is not IP:PORT: {e}", req.api_addr)))?;
        let m = self.metrics();
        if !Self::is_leader(&m) {
            return Err(self.not_leader(&m));
        }
        let membership = m.membership_config.membership();
        if let Some(node) = membership.get_node(&req.id) {
            let mesh = self.state.read(|d| d.state.members.get(&req.id).and_then(|m| m.mesh_addr()));
            if node.addr != req.api_addr && Some(&node.addr) != mesh.as_ref() {
                info!(node_id = %self.id(), peer = %req.id, addr = %req.api_addr, "member changed its address");
                let nodes = BTreeMap::from([(req.id, BasicNode::new(&req.api_addr))]);
                self.change_membership(ChangeMembers::SetNodes(nodes), true).await?;
            }
            return Ok(JoinResponse { leader: self.id(), replaced: None });
        }
        let stale = self.state.read(|d| {
            d.state.members.values().find(|mm| mm.spec.name == req.name && mm.spec.id != req.id).map(|mm| mm.spec.id)
        });
        let mut replaced = None;
        if let Some(old) = stale {
            let silent = self.silent_for(old);
            if old == self.id() || silent < self.cfg.health.suspect_after() {
                return Err(ApiError::Refused(format!(
                    "the name {:?} belongs to live member {}; give the new node another name (node_name or the clusteros.node-name credential) or stop the other one",
                    req.name, old
                )));
            }
            warn!(node_id = %self.id(), peer = %old, name = %req.name, "replacing stale member with the same name");
            self.remove_member(old).await?;
            replaced = Some(old);
        }
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 10);
        match tokio::time::timeout(t, self.raft.add_learner(req.id, BasicNode::new(&req.api_addr), false)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(self.write_err(e)),
            Err(_) => return Err(ApiError::Timeout(format!("adding the learner was not committed within {t:?}"))),
        }
        info!(node_id = %self.id(), peer = %req.id, name = %req.name, addr = %req.api_addr, "admitted node as learner");
        Ok(JoinResponse { leader: self.id(), replaced })
    }

    /// Removes a member on request (graceful leave).
    pub async fn local_leave(&self, req: LeaveRequest) -> Result<crate::proto::Empty, ApiError> {
        let m = self.metrics();
        if !Self::is_leader(&m) {
            return Err(self.not_leader(&m));
        }
        if m.membership_config.membership().get_node(&req.id).is_none() {
            return Ok(crate::proto::Empty {});
        }
        if self.state.read(|d| d.state.members.contains_key(&req.id)) {
            self.local_write(Command::SetHealth { id: req.id, health: Health::Left, at_ms: crate::now_ms() }).await?;
        }
        self.remove_member(req.id).await?;
        info!(node_id = %self.id(), peer = %req.id, "member left the cluster");
        Ok(crate::proto::Empty {})
    }

    /// Runs `local` here if this node leads, else forwards `req` to the leader's peer API at `path`,
    /// until one answers or the forwarding deadline passes. Waits for a leader (bounded) when
    /// there is none, and moves on to a new leader as soon as this node learns of one, even while
    /// a request to the old one is still in flight (an isolated leader never answers).
    ///
    /// Every request sent through here must be safe to repeat: reads, joins, leaves, and writes
    /// under a [`RequestId`](crate::core::state::RequestId) (see [`Agent::write`]), which the state
    /// machine applies once however often they commit. When the deadline passes after an attempt
    /// that may have reached a leader, the error is a timeout that says the write may have been
    /// applied; otherwise it says why nothing was done.
    pub async fn on_leader<Req, Resp, F, Fut>(&self, path: &str, req: &Req, local: F) -> Result<Resp, ApiError>
    where
        Req: Serialize,
        Resp: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<Resp, ApiError>>,
    {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.raft.election_timeout_max_ms * 4 + 2000);
        // Whether some attempt may have been acted on by a leader.
        let mut maybe_acted = false;
        let mut last: ApiError;
        loop {
            let mut moved_on = false;
            last = match local().await {
                Err(ApiError::NotLeader { leader: Some((leader, addr)) }) => {
                    match self.forward::<Req, Resp>(leader, &addr, path, req).await {
                        Forwarded::Answer(Ok(r)) => return Ok(r),
                        // A refusal now does not undo an earlier attempt that may have been applied.
                        Forwarded::Answer(Err(e)) if maybe_acted => return Err(may_be_applied(&e)),
                        Forwarded::Answer(Err(e)) => return Err(e),
                        Forwarded::LeaderChanged => {
                            debug!(old = %leader, path, "the leader changed while a request was in flight; sending it to the new one");
                            maybe_acted = true;
                            moved_on = true;
                            ApiError::NoLeader(format!("leader {} was replaced", leader))
                        }
                        Forwarded::Retry { error, maybe_delivered } => {
                            maybe_acted |= maybe_delivered;
                            error
                        }
                    }
                }
                Err(ApiError::NotLeader { leader: None }) => ApiError::NoLeader(self.no_leader_message()),
                Err(ApiError::NoLeader(m)) => ApiError::NoLeader(m),
                // This node leads but could not commit in time: the entry may still commit.
                Err(ApiError::Timeout(m)) => {
                    maybe_acted = true;
                    ApiError::Timeout(m)
                }
                other => return other,
            };
            if Instant::now() >= deadline {
                return Err(if maybe_acted { may_be_applied(&last) } else { last });
            }
            if !moved_on {
                // Wait for the leader to change (or a short while), then try again.
                let mut rx = self.raft.metrics();
                let _ = tokio::time::timeout(Duration::from_millis(300), rx.changed()).await;
            }
        }
    }

    /// Sends `req` to `leader` (over the mesh when this node is on it, the underlay once more if
    /// that fails), giving up as soon as this node follows another leader.
    async fn forward<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        leader: NodeId,
        addr: &str,
        path: &str,
        req: &Req,
    ) -> Forwarded<Resp> {
        let call = async {
            let routed = self.route(leader, addr);
            let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 6);
            let mut r = self.client.call::<_, Resp>(&routed, path, req, t).await;
            // The mesh path may be broken while wg0 looks fine: try the underlay once.
            let underlay = self.underlay_addr(leader, addr);
            let mut maybe_delivered = false;
            if let Err(e @ (PeerError::Unreachable { .. } | PeerError::Timeout { .. })) = &r
                && routed != underlay
            {
                maybe_delivered = e.maybe_delivered();
                debug!(leader = %leader, via = %routed, "leader unreachable over the mesh; trying its underlay address");
                r = self.client.call::<_, Resp>(&underlay, path, req, t).await;
            }
            (r, maybe_delivered)
        };
        let moved = async {
            let mut rx = self.raft.metrics();
            if rx.wait_for(|m| m.current_leader.is_some_and(|l| l != leader)).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        let (r, earlier_maybe) = tokio::select! {
            r = call => r,
            _ = moved => return Forwarded::LeaderChanged,
        };
        match r {
            Ok(r) => Forwarded::Answer(Ok(r)),
            Err(PeerError::Remote { kind, message, .. }) => match ApiError::from_remote(kind, message) {
                // The leader refused before acting (it is not the leader any more).
                e @ ApiError::NoLeader(_) => Forwarded::Retry { error: e, maybe_delivered: earlier_maybe },
                // Its write may commit later; the retry carries the same request id.
                e @ ApiError::Timeout(_) => Forwarded::Retry { error: e, maybe_delivered: true },
                e => Forwarded::Answer(Err(e)),
            },
            Err(e) if e.is_auth() => Forwarded::Answer(Err(ApiError::Peer(e))),
            Err(e) => {
                let maybe_delivered = earlier_maybe || e.maybe_delivered();
                Forwarded::Retry { error: ApiError::Peer(e), maybe_delivered }
            }
        }
    }

    /// Proposes `cmd` through the leader under a new request id, so that resending it (to a new
    /// leader, after a timeout) never applies it twice.
    pub async fn write(&self, cmd: Command) -> Result<Response, ApiError> {
        let id = RequestId { origin: self.request_origin, seq: self.request_seq.fetch_add(1, Ordering::Relaxed) };
        let cmd = Command::Request { id, at_ms: crate::now_ms(), cmd: Box::new(cmd) };
        self.on_leader(paths::WRITE, &crate::proto::WriteRequest { cmd: cmd.clone() }, || self.local_write(cmd.clone()))
            .await
    }

    pub async fn read(&self, key: &str) -> Result<ReadResponse, ApiError> {
        self.on_leader(paths::READ, &ReadRequest { key: key.into() }, || self.local_read(key)).await
    }

    // -----------------------------------------------------------------------------------------
    // Discovery (answered by the peer API)
    // -----------------------------------------------------------------------------------------

    pub async fn hello(&self, req: HelloRequest) -> HelloResponse {
        // Read in this order: a proposer drops its pledge only once it is initialized, so a
        // pledge read as gone, followed by "not initialized", really means withdrawn (read the
        // other way round, a proposer that initializes in between would look withdrawn).
        let pledged = self.held_pledge();
        let initialized = self.raft.is_initialized().await.unwrap_or(false);
        let m = self.metrics();
        let mut d = self.discovered.lock().expect("discovered lock");
        if req.from.id != self.id() {
            let view = d.remove(&req.from.id).and_then(|e| e.view);
            d.insert(req.from.id, Discovered { candidate: req.from.clone(), view, heard: Some(Instant::now()) });
        }
        let forget = self.forget_after();
        let known =
            d.values().filter(|e| e.heard.is_some_and(|t| t.elapsed() < forget)).map(|e| e.candidate.clone()).collect();
        drop(d);
        let members = self.member_underlay_addrs();
        HelloResponse { me: self.candidate(initialized, pledged), known, leader: m.current_leader, members }
    }

    // -----------------------------------------------------------------------------------------
    // Loops
    // -----------------------------------------------------------------------------------------

    /// Forms or joins a cluster, then keeps this node's record current. Returns when the run ends.
    pub async fn run_formation(self: Arc<Self>) {
        let mut end = self.end_signal();
        let mut backoff = Duration::from_millis(500);
        loop {
            if end.borrow().is_some() {
                return;
            }
            let initialized = self.raft.is_initialized().await.unwrap_or(false);
            if initialized {
                if let Err(e) = self.pledges.clear() {
                    warn!(node_id = %self.id(), "cannot remove the formation pledge, which no longer applies: {e}");
                }
                self.set_progress(Phase::Member, "member of the cluster", None);
                return;
            }
            if self.left_marker().exists() {
                self.set_progress(
                    Phase::Left,
                    "this node left the cluster; run `clusteros join ADDR` to join again",
                    None,
                );
                tokio::select! { _ = self.wake.notified() => {}, _ = end.changed() => {} }
                continue;
            }
            let targets = self.join_targets.lock().expect("join lock").clone();
            let ok = match self.cfg.bootstrap_expect {
                Some(expect) => self.discovery_round(expect, &targets).await,
                None if !targets.is_empty() => self.join_round(&targets).await,
                None => {
                    self.set_progress(
                        Phase::Idle,
                        "no join addresses and no bootstrap_expect: set bootstrap_expect (1 for a single node) or join (clusteros.join), or run `clusteros join ADDR`",
                        None,
                    );
                    tokio::select! { _ = self.wake.notified() => {}, _ = end.changed() => {} }
                    continue;
                }
            };
            backoff = if ok { Duration::from_millis(500) } else { (backoff * 2).min(Duration::from_secs(5)) };
            tokio::select! {
                _ = tokio::time::sleep(jitter(backoff)) => {}
                _ = self.wake.notified() => {}
                _ = end.changed() => {}
            }
        }
    }

    /// One round of `bootstrap_expect` discovery. Returns whether it made progress.
    async fn discovery_round(&self, expect: usize, targets: &[String]) -> bool {
        let mut addrs: BTreeSet<String> = targets.iter().cloned().collect();
        addrs.extend(self.discovered.lock().expect("discovered lock").values().map(|e| e.candidate.api_addr.clone()));
        addrs.remove(&self.api_addr);
        let req = HelloRequest { from: self.candidate(false, self.held_pledge()) };
        let round = self.discovery_rounds.fetch_add(1, Ordering::SeqCst) + 1;
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let calls = addrs.iter().map(|a| {
            let req = req.clone();
            async move { (a.clone(), self.client.call::<_, HelloResponse>(a, paths::HELLO, &req, t).await) }
        });
        let results = futures::future::join_all(calls).await;
        let mut errors = Vec::new();
        {
            let mut d = self.discovered.lock().expect("discovered lock");
            for (addr, r) in results {
                match r {
                    Ok(resp) if resp.me.id == self.id() => {}
                    Ok(resp) => {
                        if resp.me.bootstrap_expect.is_some()
                            && resp.me.bootstrap_expect != Some(expect)
                            && !resp.me.initialized
                        {
                            errors.push(format!(
                                "{} ({addr}) has bootstrap_expect {:?}, this node {expect}: give every node the same value",
                                resp.me.name, resp.me.bootstrap_expect
                            ));
                        }
                        let mut known: BTreeSet<NodeId> = resp.known.iter().map(|c| c.id).collect();
                        known.insert(resp.me.id);
                        let view = PeerView {
                            addr: resp.me.api_addr.clone(),
                            initialized: resp.me.initialized || resp.leader.is_some(),
                            known,
                            pledged: resp.me.pledged.clone(),
                            members: resp.members.keys().copied().collect(),
                            round,
                        };
                        d.insert(
                            resp.me.id,
                            Discovered { candidate: resp.me.clone(), view: Some(view), heard: Some(Instant::now()) },
                        );
                        for c in resp.known {
                            if c.id != self.id() {
                                d.entry(c.id).or_insert(Discovered { candidate: c, view: None, heard: None });
                            }
                        }
                    }
                    Err(e) => {
                        if e.is_auth() {
                            warn!(node_id = %self.id(), peer_addr = %addr, "discovery refused: {e}");
                        } else {
                            debug!(peer_addr = %addr, "discovery: {e}");
                        }
                        errors.push(e.to_string());
                    }
                }
            }
        }
        let forget = self.forget_after();
        let views: BTreeMap<NodeId, PeerView> = self
            .discovered
            .lock()
            .expect("discovered lock")
            .iter()
            .filter(|(_, e)| e.heard.is_some_and(|t| t.elapsed() < forget))
            .filter_map(|(id, e)| e.view.clone().map(|v| (*id, v)))
            .collect();
        let last_error = errors.first().cloned();
        let held = match self.pledges.held() {
            Ok(h) => h,
            Err(e) => {
                self.set_progress(Phase::Discovering, "formation stopped: the pledge file is unreadable", Some(e));
                return false;
            }
        };
        match membership::decide_formation(self.id(), &self.api_addr, expect, held.as_ref(), &views) {
            Formation::Wait { seen, expected } => {
                self.set_progress(Phase::Discovering, format!("{seen} of {expected} expected nodes seen"), last_error);
                false
            }
            Formation::Settling { chosen } => {
                self.set_progress(
                    Phase::Discovering,
                    format!(
                        "{} candidates seen; waiting for the initial {} nodes to agree",
                        views.len() + 1,
                        chosen.len()
                    ),
                    last_error,
                );
                true
            }
            Formation::Join { via } => self.join_round(&[via]).await,
            Formation::Pledged { proposer } => {
                let who = self.describe_candidate(proposer);
                let silent = views.get(&proposer).is_none_or(|v| v.round != round);
                let error = silent.then(|| {
                    format!(
                        "{who} does not answer; start it again. If it is gone for good and formed no cluster, stop this \
                         agent, delete {} and start it again",
                        self.pledges.path().display()
                    )
                });
                self.set_progress(
                    Phase::Discovering,
                    format!("pledged to form the cluster proposed by {who}; waiting for it"),
                    error.or(last_error),
                );
                true
            }
            Formation::Release => {
                if let Some(h) = held {
                    match self.pledges.give_up(self.id(), &h) {
                        Ok(_) => info!(
                            node_id = %self.id(),
                            proposer = %h.pledge.proposer,
                            "formation pledge released: its proposal was withdrawn or another cluster formed"
                        ),
                        Err(e) => self.set_last_error(Some(format!("cannot release the formation pledge: {e}"))),
                    }
                }
                true
            }
            Formation::Propose { members } => match self.pledges.propose(self.id(), members, round + 1) {
                Ok(Some(pledge)) => self.ask_pledges(pledge).await,
                // A pledge request came in meanwhile: this node holds another's pledge now.
                Ok(None) => true,
                Err(e) => {
                    self.set_last_error(Some(e.to_string()));
                    false
                }
            },
            Formation::AskAgain { pledge } => self.ask_pledges(pledge).await,
        }
    }

    /// "name (address)" of a discovered candidate, or its id.
    fn describe_candidate(&self, id: NodeId) -> String {
        match self.discovered.lock().expect("discovered lock").get(&id) {
            Some(e) => format!("{} ({})", e.candidate.name, e.candidate.api_addr),
            None => id.to_string(),
        }
    }

    /// As proposer, holding `pledge`: asks every other member for theirs, and initializes Raft
    /// once all of them hold it. Returns whether it made progress.
    async fn ask_pledges(&self, pledge: Pledge) -> bool {
        let me = self.id();
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let calls = pledge.members.iter().filter(|(id, _)| **id != me).map(|(id, addr)| {
            let req = pledge.clone();
            async move { (*id, self.client.call::<_, PledgeResponse>(addr, paths::PLEDGE, &req, t).await) }
        });
        let answers: BTreeMap<NodeId, Result<(), Option<membership::PledgeRefusal>>> = futures::future::join_all(calls)
            .await
            .into_iter()
            .map(|(id, r)| {
                let a = match r {
                    Ok(PledgeResponse { refused: None }) => Ok(()),
                    Ok(PledgeResponse { refused: Some(why) }) => Err(Some(why)),
                    Err(e) => {
                        debug!(peer = %id, "pledge request: {e}");
                        Err(None)
                    }
                };
                (id, a)
            })
            .collect();
        let members = pledge.members.keys().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
        match membership::pledge_outcome(me, &answers) {
            PledgeOutcome::Retry { why } => {
                self.set_progress(
                    Phase::Discovering,
                    format!("proposed forming the cluster with {members}; waiting for their pledges"),
                    Some(why),
                );
                false
            }
            PledgeOutcome::Withdraw { why } => {
                info!(node_id = %me, members = %members, "formation proposal withdrawn: {why}");
                self.set_progress(
                    Phase::Discovering,
                    format!("withdrew the proposal to form the cluster with {members}"),
                    Some(why),
                );
                if let Err(e) = self.pledges.withdraw(&pledge) {
                    self.set_last_error(Some(format!("cannot withdraw the formation proposal: {e}")));
                }
                true
            }
            PledgeOutcome::Initialize => {
                let nodes: BTreeMap<NodeId, BasicNode> =
                    pledge.members.iter().map(|(id, a)| (*id, BasicNode::new(a))).collect();
                info!(node_id = %me, members = %members, "every member pledged: bootstrapping the cluster with {} voters", nodes.len());
                match self.raft.initialize(nodes).await {
                    Ok(()) => {}
                    Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                        debug!("initialize not allowed: this node already has Raft state");
                    }
                    Err(e) => {
                        self.set_last_error(Some(format!("initialize failed: {e}")));
                        return false;
                    }
                }
                true
            }
        }
    }

    /// Answers a proposer's pledge request (see [`membership::answer_pledge`]).
    pub async fn answer_pledge(&self, req: Pledge) -> Result<PledgeResponse, ApiError> {
        let _formation = self.formation_lock.lock().await;
        let initialized = self.raft.is_initialized().await.unwrap_or(true);
        let from_round = self.discovery_rounds.load(Ordering::SeqCst) + 1;
        let taken = self.pledges.take(&req, from_round, |cur| {
            membership::answer_pledge(self.id(), self.cfg.bootstrap_expect, initialized, cur, &req)
        });
        match taken {
            Ok(Ok(())) => {
                info!(node_id = %self.id(), proposer = %req.proposer, "pledged to form the cluster with {} nodes", req.members.len());
                self.wake.notify_one();
                Ok(PledgeResponse { refused: None })
            }
            Ok(Err(why)) => Ok(PledgeResponse { refused: Some(why) }),
            Err(e) => Err(ApiError::Internal(e.to_string())),
        }
    }

    /// Asks each target in turn to admit this node. Returns whether one accepted.
    async fn join_round(&self, targets: &[String]) -> bool {
        let _formation = self.formation_lock.lock().await;
        // Once asked, a cluster may admit this node at any time, even after an answer that timed
        // out or a restart: from now on it pledges to no new cluster.
        if let Err(e) = self.pledges.begin_join() {
            self.set_progress(Phase::Joining, "cannot join", Some(e.to_string()));
            return false;
        }
        let req = JoinRequest { id: self.id(), name: self.identity.name.clone(), api_addr: self.api_addr.clone() };
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms * 12);
        let mut last = None;
        let tried = targets.join(", ");
        self.set_progress(Phase::Joining, format!("asking {tried} to admit this node"), self.progress().last_error);
        for addr in targets.iter().filter(|a| **a != self.api_addr) {
            match self.client.call::<_, JoinResponse>(addr, paths::JOIN, &req, t).await {
                Ok(resp) => {
                    info!(node_id = %self.id(), leader = %resp.leader, via = %addr, "admitted to the cluster; catching up");
                    self.set_progress(Phase::Joining, format!("admitted by leader {}; catching up", resp.leader), None);
                    // Wait (bounded) for the leader's first replication, then re-check.
                    let mut rx = self.raft.metrics();
                    let _ = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|m| m.last_log_index.is_some()))
                        .await;
                    return true;
                }
                Err(e) => {
                    let msg = e.to_string();
                    warn!(node_id = %self.id(), peer_addr = %addr, "join failed: {msg}");
                    last = Some(msg);
                }
            }
        }
        self.set_progress(Phase::Joining, format!("asking {tried} to admit this node"), last);
        false
    }

    /// Sets join targets from `clusteros join` and wakes the formation loop.
    pub fn request_join(&self, addr: String) -> Result<(), ApiError> {
        let addr = crate::core::config::normalize_join_addr(&addr).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if self.progress().phase == Phase::Member {
            return Err(ApiError::Refused(
                "this node is already a member of a cluster; run `clusteros leave` first".into(),
            ));
        }
        let _ = std::fs::remove_file(self.left_marker());
        *self.join_targets.lock().expect("join lock") = vec![addr.clone()];
        info!(node_id = %self.id(), via = %addr, "join requested");
        self.wake.notify_one();
        Ok(())
    }

    /// Leaves the cluster gracefully: the leader removes this node, then the run ends.
    pub async fn leave(&self) -> Result<(), ApiError> {
        if self.progress().phase != Phase::Member {
            return Err(ApiError::Refused("this node is not a member of a cluster".into()));
        }
        let req = LeaveRequest { id: self.id() };
        self.on_leader(paths::LEAVE, &req, || self.local_leave(req.clone())).await?;
        crate::adapters::files::write_atomic(&self.left_marker(), b"left\n", 0o600)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        self.request_end(RunEnd::Left);
        Ok(())
    }

    /// Keeps this node's member record current and notices removal. Runs while a member.
    pub async fn run_member(self: Arc<Self>) {
        let mut end = self.end_signal();
        let mut changes = self.state.subscribe();
        let mut was_member = false;
        let mut leader_silent_since: Option<Instant> = None;
        loop {
            if end.borrow().is_some() {
                return;
            }
            let (in_raft, record) = self
                .state
                .read(|d| (d.state.is_raft_member(self.id()), d.state.members.get(&self.id()).map(|m| m.spec.clone())));
            let peers: Vec<String> = self.member_underlay_addrs().into_values().collect();
            if in_raft {
                was_member = true;
                let spec = self.my_spec();
                if record.as_ref() != Some(&spec) {
                    match self.write(Command::UpsertMember { spec, at_ms: crate::now_ms() }).await {
                        Ok(Response::Rejected { reason }) => {
                            warn!(node_id = %self.id(), "registration refused: {reason}");
                            self.set_last_error(Some(reason));
                        }
                        Ok(_) => {
                            info!(node_id = %self.id(), name = %self.identity.name, "member record registered")
                        }
                        Err(e) => debug!("registration not yet possible: {e}"),
                    }
                }
            } else if was_member {
                warn!(node_id = %self.id(), "this node was removed from the cluster; joining again with a new identity");
                self.request_end(RunEnd::Rejoin { via: peers });
                return;
            }
            // A node that was removed while it was away never hears about it: nobody replicates
            // to it. When no leader has replicated to it for a while, ask the peers. (A learner
            // keeps the leader it last heard of in its metrics forever: it never holds an election.
            // A learner that came back just as the leader removed it got one heartbeat, then silence.)
            let m = self.metrics();
            let window = Duration::from_millis(self.cfg.raft.election_timeout_max_ms * 5);
            let leader_heard = match m.current_leader {
                Some(l) if l == self.id() => true,
                Some(l) => self.heard_from_leader.last(l).is_some_and(|t| t.elapsed() < window),
                None => false,
            };
            if leader_heard {
                leader_silent_since = None;
            } else {
                let since = *leader_silent_since.get_or_insert_with(Instant::now);
                if since.elapsed() > window
                    && let Some(via) = self.check_removed(&peers).await
                {
                    warn!(node_id = %self.id(), "the cluster no longer lists this node; joining again with a new identity");
                    self.request_end(RunEnd::Rejoin { via });
                    return;
                }
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = end.changed() => {}
            }
        }
    }

    /// Asks known peers whether the cluster still lists this node. Returns addresses to rejoin
    /// through when a peer with a leader says it does not.
    async fn check_removed(&self, peers: &[String]) -> Option<Vec<String>> {
        let req = HelloRequest { from: self.candidate(true, None) };
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        for addr in peers.iter().filter(|a| **a != self.api_addr) {
            if let Ok(resp) = self.client.call::<_, HelloResponse>(addr, paths::HELLO, &req, t).await
                && resp.leader.is_some()
                && !resp.members.is_empty()
                && !resp.members.contains_key(&self.id())
            {
                return Some(resp.members.values().cloned().collect());
            }
        }
        None
    }

    // -----------------------------------------------------------------------------------------
    // Elections (openraft's own election timer is off; see raft_config)
    // -----------------------------------------------------------------------------------------

    /// Since this node last heard from a leader (or granted a vote), or since the run started.
    fn leader_silence(&self) -> Duration {
        self.heard_from_leader.latest().unwrap_or(self.started).max(self.started).elapsed()
    }

    fn election_timeout(&self) -> Duration {
        let (lo, hi) = (self.cfg.raft.election_timeout_min_ms, self.cfg.raft.election_timeout_max_ms);
        Duration::from_millis(rand::thread_rng().gen_range(lo..=hi.max(lo)))
    }

    /// Answers a candidate's pre-vote (changes nothing here).
    pub fn answer_pre_vote(&self, req: &crate::proto::PreVoteRequest) -> crate::proto::PreVoteResponse {
        let m = self.metrics();
        let lease = Duration::from_millis(self.cfg.raft.election_timeout_min_ms);
        let verdict = match self.last_log_id() {
            Err(e) => Err(format!("this node cannot read its own log: {e}")),
            Ok(last_log_id) => {
                // Silence counts from this run's start, as openraft's lease does (it refuses votes
                // for a lease after startup): a node that just started grants nothing it would
                // then refuse.
                let view = membership::PreVoteView {
                    is_leader: Self::is_leader(&m),
                    heard_leader_ago: Some(self.leader_silence()),
                    last_log_id,
                };
                membership::grant_pre_vote(&view, req.last_log_id.as_ref(), lease)
            }
        };
        if let Err(why) = &verdict {
            debug!(candidate = %req.candidate, "pre-vote refused: {why}");
        }
        crate::proto::PreVoteResponse { granted: verdict.is_ok(), term: m.current_term, reason: verdict.err() }
    }

    /// The id of the last entry in this node's log.
    fn last_log_id(&self) -> Result<Option<crate::adapters::raft::LogId>, String> {
        let m = self.metrics();
        let Some(index) = m.last_log_index else { return Ok(None) };
        // The metrics carry the index only; the term is the one of the entry at that index, which
        // the log holds unless it was purged into the snapshot.
        match self.log.log_id_at(index) {
            Ok(Some(id)) => Ok(Some(id)),
            Ok(None) => m
                .snapshot
                .filter(|s| s.index == index)
                .map(Some)
                .ok_or_else(|| format!("log entry {index} is neither in the log nor the snapshot")),
            Err(e) => Err(e),
        }
    }

    /// Asks the voters for their pre-vote; true when a quorum (this node included) grants it.
    async fn pre_vote(&self, m: &RaftMetrics) -> bool {
        let membership = m.membership_config.membership().clone();
        let configs = membership.get_joint_config().clone();
        let last_log_id = match self.last_log_id() {
            Ok(l) => l,
            Err(e) => {
                warn!(node_id = %self.id(), "no election: {e}");
                return false;
            }
        };
        let req = crate::proto::PreVoteRequest { candidate: self.id(), term: m.current_term, last_log_id };
        let mut granted: BTreeSet<NodeId> = [self.id()].into();
        if membership::is_quorum(&configs, &granted) {
            return true;
        }
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        let voters: BTreeSet<NodeId> = membership.voter_ids().filter(|v| *v != self.id()).collect();
        let mut calls: futures::stream::FuturesUnordered<_> = voters
            .iter()
            .filter_map(|v| membership.get_node(v).map(|n| (*v, n.addr.clone())))
            .map(|(v, addr)| {
                let req = req.clone();
                async move {
                    let routed = self.route(v, &addr);
                    let path = format!("{}/{}", paths::RAFT_PREVOTE, v);
                    (v, self.client.call::<_, crate::proto::PreVoteResponse>(&routed, &path, &req, t).await)
                }
            })
            .collect();
        use futures::StreamExt;
        let mut refusals = Vec::new();
        while let Some((v, r)) = calls.next().await {
            match r {
                Ok(resp) if resp.granted => {
                    granted.insert(v);
                    if membership::is_quorum(&configs, &granted) {
                        return true;
                    }
                }
                Ok(resp) => refusals.push(format!("{}: {}", v, resp.reason.unwrap_or_default())),
                Err(e) => refusals.push(format!("{}: {e}", v)),
            }
        }
        debug!(node_id = %self.id(), "pre-vote lost: {}", refusals.join("; "));
        false
    }

    /// The election timer: a voter that has heard from no leader for a random election timeout
    /// asks the others for their pre-vote, and starts an election (openraft raises its term and
    /// asks for real votes) only when a quorum would grant it. Runs for the whole agent run.
    pub async fn run_elections(self: Arc<Self>) {
        let mut end = self.end_signal();
        let mut timeout = self.election_timeout();
        let mut last_try: Option<Instant> = None;
        // The timer runs from when this node became a voter (not from before it formed or
        // joined the cluster, which could start a second election right after the first).
        let mut voter_since: Option<Instant> = None;
        loop {
            if end.borrow().is_some() {
                return;
            }
            let m = self.metrics();
            let voter = m.membership_config.membership().voter_ids().any(|v| v == self.id());
            if !voter {
                voter_since = None;
            } else if voter_since.is_none() {
                voter_since = Some(Instant::now());
            }
            let since_try = last_try.map_or(Duration::MAX, |t| t.elapsed());
            let since_voter = voter_since.map_or(Duration::ZERO, |t| t.elapsed());
            let silence = self.leader_silence().min(since_try).min(since_voter);
            if voter && !Self::is_leader(&m) && m.running_state.is_ok() && silence >= timeout {
                last_try = Some(Instant::now());
                timeout = self.election_timeout();
                if self.pre_vote(&m).await
                    && self.leader_silence() >= Duration::from_millis(self.cfg.raft.election_timeout_min_ms)
                {
                    info!(node_id = %self.id(), term = m.current_term + 1, "no leader heard from: pre-vote granted, starting an election");
                    if let Err(e) = self.raft.trigger().elect().await {
                        warn!(node_id = %self.id(), "cannot start an election: {e}");
                    }
                }
                continue;
            }
            let wait = timeout.saturating_sub(silence).clamp(Duration::from_millis(20), Duration::from_millis(200));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = end.changed() => {}
            }
        }
    }

    /// On the leader: since its last successful Raft RPC with `id` in its current term.
    pub fn leader_contact_age(&self, id: NodeId) -> Option<Duration> {
        let since = self.leader.lock().expect("leader lock").as_ref().map(|l| l.since)?;
        Some(self.contacts.last(id).map_or(since, |t| t.max(since)).elapsed())
    }

    /// On the leader: the followers (voters and learners) it has not reached for the shortest
    /// election timeout. Reported as state (status, metrics) and logged once per change, not per
    /// failed RPC.
    pub fn unreachable_followers(&self, m: &RaftMetrics) -> BTreeSet<NodeId> {
        if !Self::is_leader(m) {
            return BTreeSet::new();
        }
        let limit = Duration::from_millis(self.cfg.raft.election_timeout_min_ms);
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .filter(|id| *id != self.id() && self.leader_contact_age(*id).is_some_and(|age| age >= limit))
            .collect()
    }

    fn silent_for(&self, id: NodeId) -> Duration {
        let since = self.leader.lock().expect("leader lock").as_ref().map(|l| l.since);
        let last = match (self.contacts.last(id), since) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        last.map_or(Duration::MAX, |t| t.elapsed())
    }

    /// On the leader: names the cluster, records health transitions, and carries out the
    /// autopilot's membership changes. Runs for the whole agent run; idle on followers.
    pub async fn run_leader(self: Arc<Self>) {
        let mut end = self.end_signal();
        let tick = Duration::from_millis(500);
        let mut unreachable: BTreeSet<NodeId> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = end.changed() => {}
            }
            if end.borrow().is_some() {
                return;
            }
            let m = self.metrics();
            if !Self::is_leader(&m) {
                *self.leader.lock().expect("leader lock") = None;
                unreachable.clear();
                continue;
            }
            {
                let mut l = self.leader.lock().expect("leader lock");
                if l.as_ref().is_none_or(|l| l.term != m.current_term) {
                    info!(node_id = %self.id(), term = m.current_term, "became leader");
                    *l = Some(LeaderState { term: m.current_term, since: Instant::now(), transport_probe: None });
                }
            }
            let now_unreachable = self.unreachable_followers(&m);
            let name = |id: &NodeId| {
                self.state
                    .read(|d| d.state.members.get(id).map(|r| r.spec.name.clone()))
                    .unwrap_or_else(|| id.to_string())
            };
            for id in now_unreachable.difference(&unreachable) {
                let voters = m.membership_config.membership().voter_ids().count();
                warn!(node_id = %self.id(), peer = %id, "follower {} is unreachable: the leader goes on with the others while a quorum of the {voters} voters answers", name(id));
            }
            for id in unreachable.difference(&now_unreachable) {
                info!(node_id = %self.id(), peer = %id, "follower {} answers again", name(id));
            }
            unreachable = now_unreachable;
            if let Err(e) = self.leader_tick(&m).await {
                debug!("leader tick: {e}");
            }
            // Last: its probes may take a while when a member is down.
            if let Err(e) = self.ensure_transport(&m).await {
                debug!("transport: {e}");
            }
        }
    }

    async fn leader_tick(&self, m: &RaftMetrics) -> Result<(), ApiError> {
        if self.state.read(|d| d.state.cluster_id.is_none()) {
            let cluster_id = format!("{}", crate::adapters::identity::new_node_id());
            self.local_write(Command::InitCluster { cluster_id, at_ms: crate::now_ms() }).await?;
        }
        self.ensure_secrets().await?;
        self.ensure_mesh_addresses().await?;
        self.ensure_roles().await?;
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let silent_for: BTreeMap<NodeId, Duration> = voters
            .iter()
            .chain(&learners)
            .filter(|id| **id != self.id())
            .map(|id| (*id, self.silent_for(*id)))
            .collect();

        // Health transitions, committed so every node shows them.
        let recorded: Vec<(NodeId, Health)> =
            self.state.read(|d| d.state.members.values().map(|mm| (mm.spec.id, mm.health)).collect());
        for (id, old) in recorded {
            if old == Health::Left {
                continue;
            }
            let new = if id == self.id() {
                Health::Alive
            } else {
                membership::classify(silent_for.get(&id).copied().unwrap_or(Duration::MAX), &self.cfg.health)
            };
            if new != old {
                info!(node_id = %self.id(), peer = %id, from = %old, to = %new, "member health changed");
                self.local_write(Command::SetHealth { id, health: new, at_ms: crate::now_ms() }).await?;
            }
        }

        let view = AutopilotView {
            leader: self.id(),
            voters: voters.clone(),
            learners,
            silent_for,
            matched: m
                .replication
                .as_ref()
                .map(|r| r.iter().map(|(id, l)| (*id, l.map(|l| l.index))).collect())
                .unwrap_or_default(),
            last_log_index: m.last_log_index.unwrap_or(0),
            max_voters: self.cfg.max_voters,
            max_lag: self.cfg.raft.snapshot_after_logs.max(50),
        };
        let Some(action) = membership::plan_membership(&view, &self.cfg.health) else { return Ok(()) };
        info!(node_id = %self.id(), term = m.current_term, action = ?action, "autopilot membership change");
        match action {
            MembershipAction::Promote { learner } => {
                self.change_membership(ChangeMembers::AddVoterIds([learner].into()), true).await
            }
            MembershipAction::Replace { failed, learner } => {
                let mut next = voters;
                next.remove(&failed);
                next.insert(learner);
                self.change_membership(ChangeMembers::ReplaceAllVoters(next), true).await
            }
            MembershipAction::Remove { id } => self.remove_member(id).await,
        }
    }
}

impl Agent {
    /// Leader: creates the cluster's secrets once (from the OS random source).
    async fn ensure_secrets(&self) -> Result<(), ApiError> {
        for name in crate::core::secrets::MANAGED {
            if self.state.read(|d| d.state.secrets.contains_key(*name)) {
                continue;
            }
            self.set_secret(name).await?;
            info!(node_id = %self.id(), secret = %name, "generated cluster secret");
        }
        Ok(())
    }

    /// Generates a new value for a managed secret, sealed on this node, and commits it. Returns
    /// the new version.
    pub async fn set_secret(&self, name: &str) -> Result<u64, ApiError> {
        let plain = crate::core::secrets::generate(name).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let value = self.secret_box.seal(name, &plain);
        match self.write(Command::SetSecret { name: name.into(), value, at_ms: crate::now_ms() }).await? {
            Response::Secret { version } => Ok(version),
            Response::Rejected { reason } => Err(ApiError::Refused(reason)),
            other => Err(ApiError::Internal(format!("unexpected answer to a secret write: {other:?}"))),
        }
    }

    /// Leader: gives every member without one a mesh address.
    async fn ensure_mesh_addresses(&self) -> Result<(), ApiError> {
        let (net, prefix) = self.cfg.mesh_cidr;
        let (missing, used) = self.state.read(|d| {
            let missing: Vec<NodeId> =
                d.state.members.values().filter(|m| m.mesh_ip.is_none()).map(|m| m.spec.id).collect();
            let used: BTreeSet<std::net::Ipv4Addr> = d.state.members.values().filter_map(|m| m.mesh_ip).collect();
            (missing, used)
        });
        let mut used = used;
        for id in missing {
            let Some(ip) = crate::core::mesh::allocate_mesh_ip(net, prefix, &used) else {
                warn!(node_id = %self.id(), "mesh network {net}/{prefix} is full; set a larger mesh_cidr");
                return Ok(());
            };
            used.insert(ip);
            self.local_write(Command::AssignMeshIp { id, ip }).await?;
            info!(node_id = %self.id(), peer = %id, mesh_ip = %ip, "assigned mesh address");
        }
        Ok(())
    }

    /// Leader: moves members' Raft (and peer API) addresses onto the mesh once they answer there,
    /// and back to the underlay if a member's tunnel breaks. Joins and discovery always use the
    /// underlay addresses; everything else follows the Raft membership's addresses. Probes run at
    /// most every 5 s and only for members that are off the mesh or quiet on it.
    async fn ensure_transport(&self, m: &RaftMetrics) -> Result<(), ApiError> {
        const PERIOD: Duration = Duration::from_secs(5);
        {
            let mut l = self.leader.lock().expect("leader lock");
            let Some(l) = l.as_mut() else { return Ok(()) };
            if l.transport_probe.is_some_and(|t| t.elapsed() < PERIOD) {
                return Ok(());
            }
            l.transport_probe = Some(Instant::now());
        }
        let nodes: Vec<(NodeId, String)> =
            m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        let records = self.state.read(|d| d.state.members.clone());
        let mut views = Vec::new();
        for (id, current) in nodes {
            let Some(rec) = records.get(&id) else { continue };
            let mesh = rec.mesh_addr();
            let silent = if id == self.id() {
                if self.mesh_up() { Duration::ZERO } else { Duration::MAX }
            } else {
                self.silent_for(id)
            };
            if !membership::needs_transport_probe(&current, mesh.as_deref(), silent, &self.cfg.health) {
                continue;
            }
            views.push((
                id,
                membership::TransportView {
                    current,
                    underlay: rec.spec.api_addr.clone(),
                    mesh,
                    mesh_answers: false,
                    underlay_answers: false,
                    silent_for: silent,
                },
            ));
        }
        if views.is_empty() {
            return Ok(());
        }
        // Members already reached over the mesh: proof that the leader's own tunnel works.
        let others_on_mesh = records.iter().any(|(id, r)| {
            *id != self.id()
                && r.mesh_addr().is_some_and(|a| {
                    m.membership_config.membership().get_node(id).is_some_and(|n| n.addr == a)
                        && self.silent_for(*id) < self.cfg.health.suspect_after()
                })
        });
        let probes = views.iter().map(|(id, v)| async move {
            if *id == self.id() {
                // Settled below, from the other members' answers.
                return (false, true);
            }
            let mesh = match &v.mesh {
                Some(a) => self.answers_as(a, *id).await,
                None => false,
            };
            let underlay = if v.mesh.as_ref() == Some(&v.current) && !mesh {
                self.answers_as(&v.underlay, *id).await
            } else {
                false
            };
            (mesh, underlay)
        });
        let mut answers = futures::future::join_all(probes).await;
        // The leader moves itself once its mesh address is up and some member answers it over the
        // mesh: then followers reach it there too.
        let some_answered = views.iter().zip(&answers).any(|((id, _), (mesh, _))| *id != self.id() && *mesh);
        for ((id, _), a) in views.iter().zip(answers.iter_mut()) {
            if *id == self.id() {
                a.0 = self.mesh_up() && (others_on_mesh || some_answered);
            }
        }
        let mut changes = BTreeMap::new();
        for ((id, mut v), (mesh, underlay)) in views.into_iter().zip(answers) {
            v.mesh_answers = mesh;
            v.underlay_answers = underlay;
            if let Some(addr) = membership::choose_transport(&v, &self.cfg.health) {
                let via = if Some(&addr) == v.mesh.as_ref() { "mesh" } else { "underlay" };
                info!(node_id = %self.id(), peer = %id, addr = %addr, via, "moving the member's Raft address");
                changes.insert(id, BasicNode::new(&addr));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.change_membership(ChangeMembers::SetNodes(changes), true).await
    }

    /// Whether the node at `addr` answers a signed hello as node `id`.
    async fn answers_as(&self, addr: &str, id: NodeId) -> bool {
        let req = HelloRequest { from: self.candidate(true, None) };
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        matches!(self.client.call::<_, HelloResponse>(addr, paths::HELLO, &req, t).await, Ok(r) if r.me.id == id)
    }

    /// Leader: runs the role scheduler and commits a change of holders.
    async fn ensure_roles(&self) -> Result<(), ApiError> {
        let (members, current) = self.state.read(|d| (d.state.members.clone(), d.state.roles.clone()));
        let next = crate::core::roles::schedule(&members, &current);
        if next != current {
            info!(
                node_id = %self.id(),
                slurm_controller = ?next.slurm_controller.map(|i| i.to_string()),
                slurm_backup = ?next.slurm_backup.map(|i| i.to_string()),
                k3s_server = ?next.k3s_server.map(|i| i.to_string()),
                "role assignments changed"
            );
            self.local_write(Command::SetRoles { roles: next }).await?;
        }
        Ok(())
    }

    /// Whether this agent drives node services.
    pub fn manages_services(&self) -> bool {
        match self.cfg.manage_services {
            crate::core::config::ServiceMode::On => true,
            crate::core::config::ServiceMode::Off => false,
            crate::core::config::ServiceMode::Auto => Path::new("/run/systemd/system").exists(),
        }
    }

    /// Whether this node has installed a copy of the SLURM controller's state, heartbeat included
    /// (see [`Agent::run_slurm_state`]).
    fn slurm_standby_ready(&self) -> bool {
        let controller = self.state.read(|d| d.state.roles.slurm_controller);
        self.installed_copy().is_some_and(|c| Some(c.from) == controller)
            && Path::new(crate::slurm_state::STATE_DIR).join(crate::slurm_state::HEARTBEAT).exists()
    }

    /// Waits until this node has applied everything the leader had committed when asked (a read
    /// barrier through the leader: its commit index, then the local apply catching up to it);
    /// false if `max` passed first or the run ended.
    async fn wait_caught_up(&self, max: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        let mut end = self.end_signal();
        let mut rx = self.raft.metrics();
        loop {
            let attempt = async {
                let index = self.read("").await.ok()?.read_index.unwrap_or(0);
                rx.wait_for(|m| m.last_applied.map_or(0, |l| l.index) >= index).await.ok().map(|_| ())
            };
            tokio::select! {
                r = attempt => if r.is_some() { return true },
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = end.changed() => return false,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tokio::time::sleep_until(deadline) => return false,
                _ = end.changed() => return false,
            }
        }
    }

    /// Keeps node services matching the replicated state, on every state change and every 15 s.
    pub async fn run_services(self: Arc<Self>) {
        use crate::services::{PlanInputs, Reconciler, ServiceReport, plan};
        if !self.manages_services() {
            return;
        }
        let mut end = self.end_signal();
        // Act on the cluster's current state, not on what this node last knew: after a reboot its
        // log may still name it SLURM controller although the role has moved on. Wait (bounded:
        // without any leader the last known state is the best there is) until it has heard from
        // a leader and applied everything committed.
        *self.services.lock().expect("services lock") = Some(ServiceReport {
            notes: vec!["waiting to catch up with the cluster before starting services".into()],
            ..Default::default()
        });
        if !self.wait_caught_up(Duration::from_secs(120)).await {
            if end.borrow().is_some() {
                return;
            }
            warn!(node_id = %self.id(), "no leader within 120 s; starting services from this node's last known state");
        }
        let mut changes = self.state.subscribe();
        let mut reconciler = None;
        // The inputs of the last reconcile: a state change that leaves them alone (a KV write)
        // wakes the loop but costs nothing; every 15 s it reconciles anyway (units may drift).
        let mut last: Option<(crate::core::state::ClusterState, bool)> = None;
        let mut periodic = true;
        loop {
            if end.borrow().is_some() {
                return;
            }
            let state = self.state.read(|d| d.state.without_kv());
            let standby_ready = self.slurm_standby_ready();
            if !periodic && reconciler.is_some() && last.as_ref() == Some(&(state.clone(), standby_ready)) {
                periodic = next_wake(&mut changes, &mut end, Duration::from_secs(15)).await;
                continue;
            }
            if reconciler.is_none() {
                match crate::adapters::systemd::DbusSystemd::connect(Duration::from_secs(90)).await {
                    Ok(s) => reconciler = Some(Reconciler { systemd: s, root: PathBuf::from("/") }),
                    Err(e) => {
                        warn!(node_id = %self.id(), "services: {e}");
                        *self.services.lock().expect("services lock") =
                            Some(ServiceReport { error: Some(e.to_string()), ..Default::default() });
                    }
                }
            }
            if let Some(r) = &reconciler {
                let open = |name: &str| {
                    state.secrets.get(name).and_then(|s| match self.secret_box.open(name, &s.value) {
                        Ok(v) => Some(v),
                        Err(e) => {
                            warn!(node_id = %self.id(), "{e}");
                            None
                        }
                    })
                };
                let munge = open(crate::core::secrets::MUNGE_KEY);
                let token = open(crate::core::secrets::K3S_TOKEN).and_then(|t| String::from_utf8(t).ok());
                let p = plan(&PlanInputs {
                    me: self.id(),
                    state: &state,
                    munge_key: munge.as_deref(),
                    k3s_token: token.as_deref(),
                    k3s_installed: Path::new(crate::services::K3S_BINARY).exists(),
                    standby_ready,
                });
                let report = r.apply(&p).await;
                if let Some(e) = &report.error {
                    warn!(node_id = %self.id(), "services: {e}");
                }
                *self.services.lock().expect("services lock") = Some(report);
                last = Some((state, standby_ready));
            }
            periodic = next_wake(&mut changes, &mut end, Duration::from_secs(15)).await;
        }
    }
}

/// One peer of the mesh as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPeerReport {
    pub name: Option<String>,
    pub public_key: String,
    pub mesh_ip: Option<std::net::Ipv4Addr>,
    pub endpoint: Option<SocketAddr>,
    /// As of the last reconcile, which is at most 10 s old.
    pub handshake_age_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// This node's WireGuard interface after the last reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MeshReport {
    pub interface: String,
    pub address: Option<String>,
    pub public_key: Option<String>,
    pub listen_port: Option<u16>,
    pub peers: Vec<MeshPeerReport>,
    /// Why the mesh is not (fully) up, with what to do.
    pub error: Option<String>,
}

impl Agent {
    /// Keeps `wg0` matching the committed members, on every state change and every 10 s.
    pub async fn run_mesh(self: Arc<Self>) {
        use crate::core::mesh::{WG_INTERFACE, desired_device, plan};
        if !self.manages_services() {
            return;
        }
        let mut end = self.end_signal();
        let mut changes = self.state.subscribe();
        let mut nl: Option<crate::adapters::wireguard::WgNetlink> = None;
        // As in `run_services`: skip wake-ups that change nothing the mesh is made of.
        let mut last: Option<crate::core::state::ClusterState> = None;
        let mut periodic = true;
        loop {
            if end.borrow().is_some() {
                return;
            }
            let state = self.state.read(|d| d.state.without_kv());
            if !periodic && last.as_ref() == Some(&state) {
                periodic = next_wake(&mut changes, &mut end, Duration::from_secs(10)).await;
                continue;
            }
            let mut report = MeshReport { interface: WG_INTERFACE.into(), ..Default::default() };
            if nl.is_none() {
                match crate::adapters::wireguard::WgNetlink::connect(WG_INTERFACE) {
                    Ok(n) => nl = Some(n),
                    Err(e) => report.error = Some(e.to_string()),
                }
            }
            if let Some(n) = nl.as_mut() {
                match desired_device(&state, self.id(), self.cfg.mesh_cidr.1) {
                    None => report.error = Some("waiting for the leader to assign this node a mesh address".into()),
                    Some(want) => {
                        let result = async {
                            let (have, _) = n.observe().await?;
                            let changes = plan(&want, &have);
                            if !changes.is_empty() {
                                info!(node_id = %self.id(), changes = changes.len(), "reconciling {WG_INTERFACE}");
                                n.apply(self.identity.wg_private_key(), &changes).await?;
                            }
                            n.observe().await
                        }
                        .await;
                        match result {
                            Ok((dev, stats)) => {
                                report.address = dev.addresses.iter().next().map(|(ip, len)| format!("{ip}/{len}"));
                                report.public_key = dev.public_key.clone();
                                report.listen_port = dev.listen_port;
                                report.peers = stats
                                    .into_iter()
                                    .map(|s| {
                                        let m = state.members.values().find(|m| m.spec.wg_public_key == s.public_key);
                                        MeshPeerReport {
                                            name: m.map(|m| m.spec.name.clone()),
                                            mesh_ip: m.and_then(|m| m.mesh_ip),
                                            public_key: s.public_key,
                                            endpoint: s.endpoint,
                                            handshake_age_secs: s.handshake_age_secs,
                                            rx_bytes: s.rx_bytes,
                                            tx_bytes: s.tx_bytes,
                                        }
                                    })
                                    .collect();
                            }
                            Err(e) => {
                                warn!(node_id = %self.id(), "mesh: {e}");
                                report.error = Some(e.to_string());
                            }
                        }
                    }
                }
            }
            if report.error.is_none() {
                last = Some(state);
            }
            self.set_flag(&self.mesh_wg, report.error.is_none() && report.address.is_some());
            *self.mesh.lock().expect("mesh lock") = Some(report);
            periodic = next_wake(&mut changes, &mut end, Duration::from_secs(10)).await;
        }
    }
}

/// What this node did in the last round of SLURM state replication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SlurmStateReport {
    /// "publishing" on the controller, "installing" on the backup.
    pub role: String,
    /// The version of the copy published or installed last.
    pub version: Option<u64>,
    pub files: u32,
    pub bytes: u64,
    /// When the controller read its directory for that copy (ms since the epoch).
    pub taken_at_ms: Option<u64>,
    /// What the last round is waiting for, or why it failed.
    pub note: Option<String>,
}

/// Where the backup records the copy it installed last: `FROM_ID VERSION DIGEST` (inside the Raft
/// directory: a node that joins anew starts over).
const SLURM_STATE_MARKER: &str = "slurm-state.installed";

/// The copy a backup installed last, as recorded in its marker file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct InstalledCopy {
    from: NodeId,
    version: u64,
    digest: String,
}

impl InstalledCopy {
    fn parse(text: &str) -> Option<InstalledCopy> {
        let mut it = text.split_whitespace();
        let from: NodeId = it.next()?.parse().ok()?;
        let version = it.next()?.parse().ok()?;
        let digest = it.next()?.to_string();
        Some(InstalledCopy { from, version, digest })
    }

    fn render(&self) -> String {
        format!("{} {} {}\n", self.from, self.version, self.digest)
    }
}

impl Agent {
    fn slurm_marker(&self) -> PathBuf {
        self.cfg.state_dir.join(RAFT_DIR).join(SLURM_STATE_MARKER)
    }

    fn installed_copy(&self) -> Option<InstalledCopy> {
        std::fs::read_to_string(self.slurm_marker()).ok().and_then(|t| InstalledCopy::parse(&t))
    }

    /// Replicates the SLURM controller's state directory to the backup, every 5 s: the controller
    /// reads its directory and, while its slurmctld is in control and the files changed, keeps
    /// the sealed copy in memory (served at `/peer/v1/slurm-state`) and announces its digest
    /// through Raft; the backup fetches each announced copy and installs it while its own
    /// slurmctld is a standby. When the backup's slurmctld takes control by itself, its agent
    /// asks for the roles to be swapped. See [`crate::slurm_state`].
    pub async fn run_slurm_state(self: Arc<Self>) {
        if !self.manages_services() {
            return;
        }
        let dir = PathBuf::from(crate::slurm_state::STATE_DIR);
        let mut end = self.end_signal();
        loop {
            if end.borrow().is_some() {
                return;
            }
            let roles = self.state.read(|d| d.state.roles.clone());
            let report = if roles.slurm_controller == Some(self.id()) && roles.slurm_backup.is_some() {
                Some(self.publish_slurm_state(&dir).await)
            } else {
                *self.slurm_copy.lock().expect("slurm copy lock") = None;
                if roles.slurm_backup == Some(self.id()) {
                    Some(self.install_slurm_state(&dir, roles.slurm_controller).await)
                } else {
                    None
                }
            };
            if let Some(note) = report.as_ref().and_then(|r| r.note.as_ref()) {
                debug!(node_id = %self.id(), "slurm state: {note}");
            }
            *self.slurm_state.lock().expect("slurm state lock") = report;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = end.changed() => {}
            }
        }
    }

    async fn publish_slurm_state(&self, dir: &Path) -> SlurmStateReport {
        use crate::slurm_state::{HEARTBEAT, SEAL_NAME, collect, in_control};
        let mut report = SlurmStateReport { role: "publishing".into(), ..Default::default() };
        let d = dir.to_owned();
        let files = match tokio::task::spawn_blocking(move || collect(&d)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => {
                report.note = Some("slurmctld has not saved any state yet".into());
                return report;
            }
            Ok(Err(e)) => {
                warn!(node_id = %self.id(), "slurm state: {e}");
                report.note = Some(e.to_string());
                return report;
            }
            Err(e) => {
                report.note = Some(format!("reading the state directory failed: {e}"));
                return report;
            }
        };
        report.files = files.0.len() as u32;
        report.bytes = files.bytes();
        // Only a slurmctld in control writes a fresh heartbeat with index 0. When it is down (the
        // backup may have taken over), this directory is older than the backup's.
        if !in_control(files.0.get(HEARTBEAT).map(Vec::as_slice), 0, crate::now_ms() / 1000) {
            report.note = Some("slurmctld on this node is not in control (no fresh heartbeat); not publishing".into());
            return report;
        }
        let digest = files.digest(true);
        let announced = self.state.read(|d| d.state.slurm_state.clone()).filter(|c| c.from == self.id());
        if let Some(c) = &announced
            && c.digest == digest
            && self.slurm_copy.lock().expect("slurm copy lock").as_ref().is_some_and(|b| b.digest == digest)
        {
            report.version = Some(c.version);
            report.taken_at_ms = Some(c.taken_at_ms);
            return report;
        }
        let sealed = self.secret_box.seal(SEAL_NAME, &files.to_json());
        let taken_at_ms = crate::now_ms();
        let cmd = Command::SetSlurmState {
            from: self.id(),
            digest: digest.clone(),
            files: report.files,
            bytes: report.bytes,
            taken_at_ms,
        };
        match self.write(cmd).await {
            Ok(Response::SlurmState { version }) => {
                *self.slurm_copy.lock().expect("slurm copy lock") =
                    Some(Arc::new(crate::proto::SlurmStateBlob { from: self.id(), version, digest, sealed }));
                report.version = Some(version);
                report.taken_at_ms = Some(taken_at_ms);
            }
            Ok(Response::Rejected { reason }) => report.note = Some(reason),
            Ok(other) => report.note = Some(format!("unexpected answer: {other:?}")),
            Err(e) => report.note = Some(format!("cannot announce the copy: {e}")),
        }
        report
    }

    async fn install_slurm_state(&self, dir: &Path, controller: Option<NodeId>) -> SlurmStateReport {
        use crate::slurm_state::{HEARTBEAT, SEAL_NAME, StateFiles, in_control, install, may_install};
        let mut report = SlurmStateReport { role: "installing".into(), ..Default::default() };
        let now_secs = crate::now_ms() / 1000;
        let local_hb = std::fs::read(dir.join(HEARTBEAT)).ok();
        // This node's slurmctld took control (index 1: the backup's): the controller's stopped
        // answering it. Ask for the roles to be swapped, and never install over its state.
        if in_control(local_hb.as_deref(), 1, now_secs) {
            report.note = Some("the local slurmctld has taken control; asking for the controller role".into());
            match self.write(Command::SlurmTakeover { id: self.id() }).await {
                Ok(Response::Ok) => {
                    warn!(node_id = %self.id(), "slurmctld here took control from the controller; roles swapped")
                }
                Ok(Response::Rejected { reason }) => debug!("slurm takeover: {reason}"),
                Ok(_) => {}
                Err(e) => report.note = Some(format!("cannot ask for the controller role: {e}")),
            }
            return report;
        }
        let Some(copy) = self.state.read(|d| d.state.slurm_state.clone()) else {
            report.note = Some("waiting for the controller's first copy".into());
            return report;
        };
        report.files = copy.files;
        report.bytes = copy.bytes;
        report.taken_at_ms = Some(copy.taken_at_ms);
        let Some(controller) = controller.filter(|c| *c == copy.from) else {
            report.note = Some("the newest copy is from a former controller; waiting for the current one".into());
            return report;
        };
        let installed = self.installed_copy();
        if installed.as_ref().is_some_and(|i| i.from == copy.from && i.version >= copy.version) {
            report.version = installed.map(|i| i.version);
            return report;
        }
        if !may_install(local_hb.as_deref(), now_secs) {
            report.note = Some("the local slurmctld is in control; the copy is not installed".into());
            return report;
        }
        let Some(raft_addr) =
            self.metrics().membership_config.membership().get_node(&controller).map(|n| n.addr.clone())
        else {
            report.note = Some("the controller is not in the Raft membership".into());
            return report;
        };
        let addr = self.route(controller, &raft_addr);
        let t = Duration::from_millis(self.cfg.raft.snapshot_timeout_ms);
        let blob = match self
            .client
            .call::<_, crate::proto::SlurmStateBlob>(&addr, paths::SLURM_STATE, &crate::proto::Empty {}, t)
            .await
        {
            Ok(b) if b.from == copy.from && b.version >= copy.version => b,
            Ok(b) => {
                report.note = Some(format!(
                    "the controller served copy {} while {} is announced; retrying",
                    b.version, copy.version
                ));
                return report;
            }
            Err(e) => {
                report.note = Some(format!("cannot fetch the copy from the controller at {addr}: {e}"));
                return report;
            }
        };
        let secret_box = self.secret_box.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            let plain = secret_box.open(SEAL_NAME, &blob.sealed).map_err(|e| e.to_string())?;
            let files = StateFiles::from_json(&plain).map_err(|e| e.to_string())?;
            if files.digest(true) != blob.digest {
                return Err("the fetched copy does not match its digest".to_string());
            }
            Ok((files, blob.version, blob.digest))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let (files, version, digest) = match decoded {
            Ok(d) => d,
            Err(e) => {
                warn!(node_id = %self.id(), "slurm state: {e}");
                report.note = Some(e);
                return report;
            }
        };
        let root = Path::new("/");
        let (Some(uid), Some(gid)) = (
            crate::services::lookup_id(root, "etc/passwd", "slurm"),
            crate::services::lookup_id(root, "etc/group", "slurm"),
        ) else {
            report.note = Some("user or group \"slurm\" does not exist on this node: is slurmctld installed?".into());
            return report;
        };
        let d = dir.to_owned();
        let r = tokio::task::spawn_blocking(move || {
            crate::adapters::files::ensure_dir(&d, 0o755)?;
            let hb = d.join(HEARTBEAT);
            let standby = || may_install(std::fs::read(&hb).ok().as_deref(), crate::now_ms() / 1000);
            install(&d, &files, uid, gid, &standby)
        })
        .await;
        match r {
            Ok(Ok(done)) => {
                let marker = InstalledCopy { from: copy.from, version, digest };
                if let Err(e) =
                    crate::adapters::files::write_atomic(&self.slurm_marker(), marker.render().as_bytes(), 0o600)
                {
                    report.note = Some(e.to_string());
                    return report;
                }
                if done.written + done.removed > 0 {
                    debug!(node_id = %self.id(), version, written = done.written, removed = done.removed, "installed the SLURM controller's state");
                }
                report.version = Some(version);
            }
            Ok(Err(e)) => {
                warn!(node_id = %self.id(), "slurm state: {e}");
                report.note = Some(e.to_string());
            }
            Err(e) => report.note = Some(format!("installing failed: {e}")),
        }
        report
    }
}

/// Waits for the applied state to change, the run to end, or `period` to pass; true when the
/// period passed (a periodic reconcile is due).
pub(crate) async fn next_wake(
    changes: &mut watch::Receiver<u64>,
    end: &mut watch::Receiver<Option<RunEnd>>,
    period: Duration,
) -> bool {
    tokio::select! {
        _ = changes.changed() => false,
        _ = tokio::time::sleep(period) => true,
        _ = end.changed() => false,
    }
}

/// Removes Raft state and the identity so the next run starts as a new member.
pub fn wipe_membership_state(state_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(state_dir.join(RAFT_DIR)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(())
}
