//! The replicated cluster state and its pure `apply` function.
//!
//! Everything in here is deterministic: the same commands applied in the same order produce the same
//! state on every node. Time never comes from the clock here; commands carry the leader's timestamp.
//! The Raft membership (voters and learners) is mirrored from applied membership log entries, so the
//! member list can never disagree with Raft: a member record exists only for a node that Raft knows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

pub use crate::core::ids::NodeId;

/// Largest accepted KV key, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest accepted KV value, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

/// Health of a member as judged by the leader from its last contact.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    #[default]
    Alive,
    Suspect,
    Failed,
    Left,
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Health::Alive => "alive",
            Health::Suspect => "suspect",
            Health::Failed => "failed",
            Health::Left => "left",
        })
    }
}

/// Hardware and OS facts a node reports about itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct NodeFacts {
    pub cpus: u32,
    pub memory_mb: u64,
    pub kernel: String,
    pub arch: String,
}

/// What a node says about itself when it registers (the self-reported part of a member record).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct MemberSpec {
    pub id: NodeId,
    pub name: String,
    /// Address of the node's peer API (host:port on the underlay network).
    pub api_addr: String,
    /// WireGuard public key, base64.
    pub wg_public_key: String,
    pub facts: NodeFacts,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A member record in the cluster state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Member {
    #[serde(flatten)]
    pub spec: MemberSpec,
    /// Address on the WireGuard mesh, allocated by the leader.
    #[serde(default)]
    pub mesh_ip: Option<Ipv4Addr>,
    pub health: Health,
    /// Leader's wall clock (ms since the epoch) when `health` last changed.
    pub health_since_ms: u64,
    pub registered_at_ms: u64,
}

impl Member {
    /// The peer API on this member's mesh address (its mesh IP, the port of its `api_addr`), once
    /// the leader has assigned it one.
    pub fn mesh_addr(&self) -> Option<String> {
        let port = self.spec.api_addr.parse::<std::net::SocketAddr>().ok()?.port();
        self.mesh_ip.map(|ip| std::net::SocketAddr::new(ip.into(), port).to_string())
    }
}

/// A value in the user KV space.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    pub value: String,
    /// Raft log index of the write that last changed this key.
    pub mod_index: u64,
}

/// Who holds which service role. Chosen by the leader's role scheduler.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct RoleAssignments {
    pub slurm_controller: Option<NodeId>,
    pub slurm_backup: Option<NodeId>,
    pub slurm_workers: BTreeSet<NodeId>,
    pub k3s_server: Option<NodeId>,
    pub k3s_agents: BTreeSet<NodeId>,
}

/// A cluster secret (MUNGE key, k3s token, ...). The value never appears in status output or logs.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct SecretEntry {
    /// Base64 of the secret bytes.
    pub value: String,
    /// Starts at 1, +1 on every change (rotation).
    pub version: u64,
    pub changed_at_ms: u64,
}

impl std::fmt::Debug for SecretEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretEntry")
            .field("version", &self.version)
            .field("changed_at_ms", &self.changed_at_ms)
            .finish_non_exhaustive()
    }
}

/// The newest copy of the SLURM controller's state directory (see
/// [`slurm_state`](crate::slurm_state)): which node has it and its digest. The files themselves
/// stay out of the log; the backup fetches them from the controller.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SlurmStateCopy {
    pub from: NodeId,
    /// Starts at 1, +1 on every published copy.
    pub version: u64,
    /// SHA-256 of the files (paths and contents).
    pub digest: String,
    pub files: u32,
    pub bytes: u64,
    /// The controller's wall clock when it read the directory.
    pub taken_at_ms: u64,
}

/// A command replicated through Raft.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Names the cluster. Only the first one applied takes effect.
    InitCluster {
        cluster_id: String,
        at_ms: u64,
    },
    /// Registers or updates a member's self-reported record.
    UpsertMember {
        spec: MemberSpec,
        at_ms: u64,
    },
    /// Records a health transition observed by the leader.
    SetHealth {
        id: NodeId,
        health: Health,
        at_ms: u64,
    },
    /// Gives a member its mesh address (refused if another member has it).
    AssignMeshIp {
        id: NodeId,
        ip: Ipv4Addr,
    },
    /// Replaces the role assignments (members that are not in the cluster are refused).
    SetRoles {
        roles: RoleAssignments,
    },
    /// Sets or rotates a secret; its version goes up by one.
    SetSecret {
        name: String,
        value: String,
        at_ms: u64,
    },
    /// The SLURM controller announces a new copy of its state directory (refused from anyone else).
    SetSlurmState {
        from: NodeId,
        digest: String,
        files: u32,
        bytes: u64,
        taken_at_ms: u64,
    },
    /// The backup's slurmctld has taken control (the controller's stopped answering it): the two
    /// swap roles, so that the controller's slurmctld comes back as the standby, after it has
    /// installed the new controller's state, instead of taking control back with older state.
    SlurmTakeover {
        id: NodeId,
    },
    KvPut {
        key: String,
        value: String,
    },
    KvDelete {
        key: String,
    },
    /// Compare-and-swap: succeeds when the current value equals `expected` (None: key absent).
    /// `new = None` deletes the key.
    KvCas {
        key: String,
        expected: Option<String>,
        new: Option<String>,
    },
    /// A client's command under its request id: applied once however often it is proposed (a
    /// forwarded write is sent again when the leader changes while it is in flight, and both
    /// copies may commit). A repeat answers with the first one's response.
    Request {
        id: RequestId,
        /// The proposer's wall clock when it first sent the request (for people reading the log;
        /// the state machine does not use it).
        at_ms: u64,
        cmd: Box<Command>,
    },
}

/// Names one client request across retries: `origin` is random per agent run, `seq` counts the
/// requests that run received.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId {
    pub origin: u64,
    pub seq: u64,
}

/// The requests applied recently and their responses: the state machine's memory for applying a
/// request once. It is part of the replicated state, so it must be deterministic: an id is
/// remembered for the next [`RequestLog::MAX_ENTRIES`] log entries after the one that applied it
/// (by log index, never by a clock: clocks differ between nodes and jump), and the responses of
/// the newest ids are kept up to [`RequestLog::MAX_BYTES`]; an older id whose response was dropped
/// to stay in that bound still counts as applied and answers [`Response::AlreadyApplied`]. A
/// request is resent only within the agent's forwarding deadline (seconds), long before 100,000
/// more entries commit.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(from = "Vec<AppliedRequest>", into = "Vec<AppliedRequest>")]
pub struct RequestLog {
    order: std::collections::VecDeque<AppliedRequest>,
    index: BTreeMap<RequestId, usize>,
    /// Sequence number of `order[0]` (entries are numbered as they are recorded).
    first: usize,
    /// Sequence number of the oldest entry that still has its response.
    responses_from: usize,
    bytes: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRequest {
    pub id: RequestId,
    /// The log index that applied it.
    pub index: u64,
    /// Its response; None once dropped to stay within [`RequestLog::MAX_BYTES`].
    pub response: Option<Response>,
}

fn response_bytes(r: &Option<Response>) -> usize {
    64 + match r {
        Some(Response::Kv { previous }) => previous.as_ref().map_or(0, String::len),
        Some(Response::Cas { current, .. }) => current.as_ref().map_or(0, String::len),
        Some(Response::Rejected { reason }) => reason.len(),
        _ => 0,
    }
}

/// Equal when the same requests with the same responses are remembered (the index is derived).
impl PartialEq for RequestLog {
    fn eq(&self, other: &RequestLog) -> bool {
        self.order == other.order
    }
}

impl Eq for RequestLog {}

/// From the snapshot form: exactly the entries that were there (no eviction here, so a node that
/// installed a snapshot holds what a node that applied the log holds).
impl From<Vec<AppliedRequest>> for RequestLog {
    fn from(v: Vec<AppliedRequest>) -> RequestLog {
        let mut log = RequestLog::default();
        for (seq, r) in v.into_iter().enumerate() {
            log.index.insert(r.id, seq);
            log.bytes += response_bytes(&r.response);
            log.order.push_back(r);
        }
        log.responses_from = log.order.iter().position(|r| r.response.is_some()).unwrap_or(log.order.len());
        log
    }
}

impl From<RequestLog> for Vec<AppliedRequest> {
    fn from(log: RequestLog) -> Vec<AppliedRequest> {
        log.order.into_iter().collect()
    }
}

impl RequestLog {
    pub const MAX_ENTRIES: usize = 100_000;
    pub const MAX_BYTES: usize = 8 << 20;

    /// The first response of request `id`, if it was applied and is still remembered: `Some(None)`
    /// when it was applied but its response is no longer kept.
    pub fn get(&self, id: &RequestId) -> Option<Option<&Response>> {
        let seq = *self.index.get(id)?;
        self.order.get(seq - self.first).map(|r| r.response.as_ref())
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    fn record(&mut self, id: RequestId, index: u64, response: Response) {
        if self.index.contains_key(&id) {
            return;
        }
        let response = Some(response);
        self.bytes += response_bytes(&response);
        self.index.insert(id, self.first + self.order.len());
        self.order.push_back(AppliedRequest { id, index, response });
        // Forget ids applied more than MAX_ENTRIES log entries ago.
        while let Some(old) = self.order.front() {
            if old.index.saturating_add(Self::MAX_ENTRIES as u64) >= index {
                break;
            }
            let old = self.order.pop_front().expect("front exists");
            self.bytes -= response_bytes(&old.response);
            self.index.remove(&old.id);
            self.first += 1;
        }
        self.responses_from = self.responses_from.max(self.first);
        // Keep the newest responses within MAX_BYTES; the ids stay.
        while self.bytes > Self::MAX_BYTES && self.responses_from < self.first + self.order.len() {
            let r = &mut self.order[self.responses_from - self.first];
            let before = response_bytes(&r.response);
            r.response = None;
            self.bytes = self.bytes - before + response_bytes(&None);
            self.responses_from += 1;
        }
    }
}

/// The result of applying one command.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// A log entry that carried no command (blank or membership entry).
    #[default]
    Empty,
    Ok,
    /// KV put/delete: the value before the write.
    Kv {
        previous: Option<String>,
    },
    Cas {
        succeeded: bool,
        current: Option<String>,
    },
    /// A secret was set; its new version.
    Secret {
        version: u64,
    },
    /// A SLURM state copy was announced; the version it got.
    SlurmState {
        version: u64,
    },
    /// The command was valid Raft-wise but refused by the state machine; the state is unchanged.
    Rejected {
        reason: String,
    },
    /// A repeat of a request that was applied earlier, whose response is no longer kept (see
    /// [`RequestLog`]): it was applied once; read the value back for its effect.
    AlreadyApplied,
}

/// The replicated cluster state: the one source of truth.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct ClusterState {
    pub cluster_id: Option<String>,
    pub created_at_ms: u64,
    /// Voters of the last applied membership (both halves of a joint config).
    pub voters: BTreeSet<NodeId>,
    /// Learners of the last applied membership.
    pub learners: BTreeSet<NodeId>,
    pub members: BTreeMap<NodeId, Member>,
    #[serde(default)]
    pub roles: RoleAssignments,
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretEntry>,
    /// The SLURM controller's state directory, for the backup controller.
    #[serde(default)]
    pub slurm_state: Option<SlurmStateCopy>,
    pub kv: BTreeMap<String, KvEntry>,
    /// Client requests applied recently (see [`RequestLog`]).
    #[serde(default)]
    pub requests: RequestLog,
}

/// Checks a KV key and value against the limits; the error says what is wrong.
pub fn validate_kv(key: &str, value: Option<&str>) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty: give a non-empty key".into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(format!("key is {} bytes, the limit is {MAX_KEY_BYTES}", key.len()));
    }
    if let Some(v) = value
        && v.len() > MAX_VALUE_BYTES
    {
        return Err(format!("value is {} bytes, the limit is {MAX_VALUE_BYTES}", v.len()));
    }
    Ok(())
}

impl ClusterState {
    /// A copy without the user KV space and the SLURM state copy: what the node's mesh and
    /// services are derived from, so that neither user writes nor SLURM state copies cost a copy
    /// of those or a reconcile.
    pub fn without_kv(&self) -> ClusterState {
        ClusterState {
            cluster_id: self.cluster_id.clone(),
            created_at_ms: self.created_at_ms,
            voters: self.voters.clone(),
            learners: self.learners.clone(),
            members: self.members.clone(),
            roles: self.roles.clone(),
            secrets: self.secrets.clone(),
            slurm_state: None,
            kv: BTreeMap::new(),
            requests: RequestLog::default(),
        }
    }

    /// Whether Raft's applied membership contains this node (as voter or learner).
    pub fn is_raft_member(&self, id: NodeId) -> bool {
        self.voters.contains(&id) || self.learners.contains(&id)
    }

    /// Mirrors an applied membership entry. Member records of nodes that Raft no longer knows
    /// are dropped, so the member list is always a subset of Raft's membership.
    pub fn apply_membership(&mut self, voters: BTreeSet<NodeId>, learners: BTreeSet<NodeId>) {
        self.voters = voters;
        self.learners = learners;
        let (voters, learners) = (&self.voters, &self.learners);
        let known = |id: &NodeId| voters.contains(id) || learners.contains(id);
        self.members.retain(|id, _| known(id));
        let r = &mut self.roles;
        for holder in [&mut r.slurm_controller, &mut r.slurm_backup, &mut r.k3s_server] {
            if holder.is_some_and(|id| !known(&id)) {
                *holder = None;
            }
        }
        r.slurm_workers.retain(|id| known(id));
        r.k3s_agents.retain(|id| known(id));
    }

    /// Applies one command at log index `index`. Pure: no I/O, no clock.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> Response {
        match cmd {
            Command::InitCluster { cluster_id, at_ms } => {
                if self.cluster_id.is_none() {
                    self.cluster_id = Some(cluster_id.clone());
                    self.created_at_ms = *at_ms;
                }
                Response::Ok
            }
            Command::UpsertMember { spec, at_ms } => {
                if !self.is_raft_member(spec.id) {
                    return Response::Rejected {
                        reason: format!("node {} is not in the Raft membership; join the cluster first", spec.id),
                    };
                }
                if let Some(other) = self.members.values().find(|m| m.spec.name == spec.name && m.spec.id != spec.id) {
                    return Response::Rejected {
                        reason: format!(
                            "node name {:?} is already used by node {}; remove that node or rename this one",
                            spec.name, other.spec.id
                        ),
                    };
                }
                match self.members.get_mut(&spec.id) {
                    Some(m) => m.spec = spec.clone(),
                    None => {
                        self.members.insert(
                            spec.id,
                            Member {
                                spec: spec.clone(),
                                mesh_ip: None,
                                health: Health::Alive,
                                health_since_ms: *at_ms,
                                registered_at_ms: *at_ms,
                            },
                        );
                    }
                }
                Response::Ok
            }
            Command::SetHealth { id, health, at_ms } => match self.members.get_mut(id) {
                Some(m) => {
                    if m.health != *health {
                        m.health = *health;
                        m.health_since_ms = *at_ms;
                    }
                    Response::Ok
                }
                None => Response::Rejected { reason: format!("no member {id}") },
            },
            Command::AssignMeshIp { id, ip } => {
                if let Some(other) = self.members.values().find(|m| m.mesh_ip == Some(*ip) && m.spec.id != *id) {
                    return Response::Rejected {
                        reason: format!("mesh address {ip} is already used by {}", other.spec.id),
                    };
                }
                match self.members.get_mut(id) {
                    Some(m) => {
                        m.mesh_ip = Some(*ip);
                        Response::Ok
                    }
                    None => Response::Rejected { reason: format!("no member {id}") },
                }
            }
            Command::SetRoles { roles } => {
                let holders = [roles.slurm_controller, roles.slurm_backup, roles.k3s_server];
                let all = holders.iter().flatten().chain(&roles.slurm_workers).chain(&roles.k3s_agents);
                if let Some(id) = all.into_iter().find(|id| !self.members.contains_key(id)) {
                    return Response::Rejected { reason: format!("role holder {id} is not a member") };
                }
                self.roles = roles.clone();
                Response::Ok
            }
            Command::SetSecret { name, value, at_ms } => {
                if name.is_empty() || value.is_empty() {
                    return Response::Rejected { reason: "secret name and value must not be empty".into() };
                }
                let version = self.secrets.get(name).map_or(1, |s| s.version + 1);
                self.secrets.insert(name.clone(), SecretEntry { value: value.clone(), version, changed_at_ms: *at_ms });
                Response::Secret { version }
            }
            Command::SetSlurmState { from, digest, files, bytes, taken_at_ms } => {
                if self.roles.slurm_controller != Some(*from) {
                    return Response::Rejected {
                        reason: format!(
                            "node {from} is not the SLURM controller ({}); only the controller publishes its state",
                            self.roles.slurm_controller.map_or_else(|| "none assigned".into(), |c| format!("{c}"))
                        ),
                    };
                }
                let version = self.slurm_state.as_ref().map_or(1, |c| c.version + 1);
                self.slurm_state = Some(SlurmStateCopy {
                    from: *from,
                    version,
                    digest: digest.clone(),
                    files: *files,
                    bytes: *bytes,
                    taken_at_ms: *taken_at_ms,
                });
                Response::SlurmState { version }
            }
            Command::SlurmTakeover { id } => {
                let r = &mut self.roles;
                match (r.slurm_controller, r.slurm_backup) {
                    (Some(c), Some(b)) if b == *id => {
                        r.slurm_controller = Some(b);
                        r.slurm_backup = Some(c);
                        Response::Ok
                    }
                    _ => Response::Rejected {
                        reason: format!("node {id} is not the SLURM backup controller; nothing to take over"),
                    },
                }
            }
            Command::KvPut { key, value } => {
                if let Err(reason) = validate_kv(key, Some(value)) {
                    return Response::Rejected { reason };
                }
                let previous =
                    self.kv.insert(key.clone(), KvEntry { value: value.clone(), mod_index: index }).map(|e| e.value);
                Response::Kv { previous }
            }
            Command::KvDelete { key } => {
                let previous = self.kv.remove(key).map(|e| e.value);
                Response::Kv { previous }
            }
            Command::KvCas { key, expected, new } => {
                if let Err(reason) = validate_kv(key, new.as_deref()) {
                    return Response::Rejected { reason };
                }
                let current = self.kv.get(key).map(|e| e.value.clone());
                if current != *expected {
                    return Response::Cas { succeeded: false, current };
                }
                match new {
                    Some(v) => {
                        self.kv.insert(key.clone(), KvEntry { value: v.clone(), mod_index: index });
                    }
                    None => {
                        self.kv.remove(key);
                    }
                }
                Response::Cas { succeeded: true, current: new.clone() }
            }
            Command::Request { id, cmd, .. } => {
                match self.requests.get(id) {
                    Some(Some(first)) => return first.clone(),
                    Some(None) => return Response::AlreadyApplied,
                    None => {}
                }
                if matches!(**cmd, Command::Request { .. }) {
                    return Response::Rejected { reason: "a request cannot contain another request".into() };
                }
                let response = self.apply(index, cmd);
                self.requests.record(*id, index, response.clone());
                response
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: NodeId, name: &str) -> MemberSpec {
        MemberSpec {
            id,
            name: name.into(),
            api_addr: format!("10.0.0.{}:7600", id.0),
            wg_public_key: format!("key{}", id.0),
            facts: NodeFacts { cpus: 2, memory_mb: 1024, kernel: "6.12".into(), arch: "x86_64".into() },
            labels: BTreeMap::new(),
        }
    }

    fn state_with(voters: &[NodeId], learners: &[NodeId]) -> ClusterState {
        let mut s = ClusterState::default();
        s.apply_membership(voters.iter().copied().collect(), learners.iter().copied().collect());
        s
    }

    fn request(seq: u64, at_ms: u64, cmd: Command) -> Command {
        Command::Request { id: RequestId { origin: 7, seq }, at_ms, cmd: Box::new(cmd) }
    }

    #[test]
    fn a_request_is_applied_once_however_often_it_commits() {
        let mut s = ClusterState::default();
        let cas = request(1, 1000, Command::KvCas { key: "k".into(), expected: None, new: Some("a".into()) });
        assert_eq!(s.apply(1, &cas), Response::Cas { succeeded: true, current: Some("a".into()) });
        // The same request committed again (a forwarded write resent to a new leader) answers
        // as the first did and changes nothing; without the id it would report a failed CAS.
        assert_eq!(s.apply(2, &cas), Response::Cas { succeeded: true, current: Some("a".into()) });
        assert_eq!(s.kv["k"].mod_index, 1);
        let put = request(2, 1001, Command::KvPut { key: "k".into(), value: "b".into() });
        assert_eq!(s.apply(3, &put), Response::Kv { previous: Some("a".into()) });
        assert_eq!(s.apply(4, &put), Response::Kv { previous: Some("a".into()) });
        assert_eq!(s.kv["k"].value, "b");
        let nested = request(3, 1002, request(4, 1002, Command::KvDelete { key: "k".into() }));
        assert!(matches!(s.apply(5, &nested), Response::Rejected { .. }));
        assert_eq!(s.kv["k"].value, "b");
    }

    #[test]
    fn request_ids_are_kept_by_log_distance_and_responses_by_size() {
        let mut s = ClusterState::default();
        let put = |seq, value: &str| request(seq, 0, Command::KvPut { key: "k".into(), value: value.into() });
        // Large responses (1 MiB previous values) push the oldest responses out, not the ids: a
        // repeat of the first request is still not applied again.
        let big = "x".repeat(1 << 20);
        s.apply(1, &put(1, "first"));
        for seq in 2..20 {
            s.apply(seq, &put(seq, &big));
        }
        assert!(s.requests.bytes <= RequestLog::MAX_BYTES);
        assert!(s.apply(20, &put(1, "first")) == Response::AlreadyApplied, "applied once, answer dropped");
        assert!(s.kv["k"].value == big, "the repeat changed nothing");
        assert!(s.apply(21, &put(19, &big)) == Response::Kv { previous: Some(big.clone()) }, "recent: same answer");
        // An id is forgotten MAX_ENTRIES log entries after it was applied, not before.
        let far = 1 + RequestLog::MAX_ENTRIES as u64;
        s.apply(far, &request(100, 0, Command::KvDelete { key: "other".into() }));
        assert!(s.requests.get(&RequestId { origin: 7, seq: 1 }).is_some());
        s.apply(far + 1, &request(101, 0, Command::KvDelete { key: "other".into() }));
        assert!(s.requests.get(&RequestId { origin: 7, seq: 1 }).is_none());
        assert!(s.requests.get(&RequestId { origin: 7, seq: 2 }).is_some());
        // The snapshot form round-trips, and the rebuilt log goes on exactly as the original.
        let mut back: ClusterState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert!(back == s, "the state differs after a round trip through its snapshot form");
        for (i, seq) in (far + 2..far + 40).zip(200..) {
            let cmd = request(seq, 0, Command::KvPut { key: "k".into(), value: big.clone() });
            assert!(s.apply(i, &cmd) == back.apply(i, &cmd));
        }
        assert!(back == s, "a node that installed the snapshot diverged from one that applied the log");
    }

    #[test]
    fn init_cluster_only_first_wins() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(1, &Command::InitCluster { cluster_id: "a".into(), at_ms: 5 }), Response::Ok);
        assert_eq!(s.apply(2, &Command::InitCluster { cluster_id: "b".into(), at_ms: 9 }), Response::Ok);
        assert_eq!(s.cluster_id.as_deref(), Some("a"));
        assert_eq!(s.created_at_ms, 5);
    }

    #[test]
    fn upsert_requires_raft_membership() {
        let mut s = state_with(&[NodeId(1)], &[]);
        let r = s.apply(3, &Command::UpsertMember { spec: spec(NodeId(2), "n2"), at_ms: 1 });
        assert!(matches!(r, Response::Rejected { .. }), "{r:?}");
        assert!(s.members.is_empty());
        assert_eq!(s.apply(4, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 1 }), Response::Ok);
        assert_eq!(s.members[&NodeId(1)].spec.name, "n1");
        assert_eq!(s.members[&NodeId(1)].health, Health::Alive);
    }

    #[test]
    fn upsert_updates_spec_but_keeps_health_and_registration_time() {
        let mut s = state_with(&[NodeId(1)], &[]);
        s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 10 });
        s.apply(2, &Command::SetHealth { id: NodeId(1), health: Health::Suspect, at_ms: 20 });
        let mut changed = spec(NodeId(1), "n1");
        changed.facts.cpus = 8;
        s.apply(3, &Command::UpsertMember { spec: changed, at_ms: 30 });
        let m = &s.members[&NodeId(1)];
        assert_eq!(m.spec.facts.cpus, 8);
        assert_eq!(m.health, Health::Suspect);
        assert_eq!(m.health_since_ms, 20);
        assert_eq!(m.registered_at_ms, 10);
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut s = state_with(&[NodeId(1), NodeId(2)], &[]);
        s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "same"), at_ms: 0 });
        let r = s.apply(2, &Command::UpsertMember { spec: spec(NodeId(2), "same"), at_ms: 0 });
        assert!(matches!(r, Response::Rejected { ref reason } if reason.contains("already used")), "{r:?}");
        assert_eq!(s.members.len(), 1);
    }

    #[test]
    fn membership_change_drops_records_of_removed_nodes() {
        let mut s = state_with(&[NodeId(1), NodeId(2), NodeId(3)], &[NodeId(4)]);
        for id in 1..=4 {
            s.apply(id, &Command::UpsertMember { spec: spec(NodeId(id), &format!("n{}", id)), at_ms: 0 });
        }
        assert_eq!(s.members.len(), 4);
        s.apply_membership([NodeId(1), NodeId(2), NodeId(4)].into(), BTreeSet::new());
        assert_eq!(s.members.keys().copied().collect::<Vec<_>>(), vec![NodeId(1), NodeId(2), NodeId(4)]);
        assert_eq!(s.voters, [NodeId(1), NodeId(2), NodeId(4)].into());
        assert!(s.learners.is_empty());
    }

    #[test]
    fn set_health_records_transition_time_only_on_change() {
        let mut s = state_with(&[NodeId(1)], &[]);
        s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 0 });
        s.apply(2, &Command::SetHealth { id: NodeId(1), health: Health::Failed, at_ms: 100 });
        s.apply(3, &Command::SetHealth { id: NodeId(1), health: Health::Failed, at_ms: 200 });
        assert_eq!(s.members[&NodeId(1)].health_since_ms, 100);
        let r = s.apply(4, &Command::SetHealth { id: NodeId(9), health: Health::Failed, at_ms: 200 });
        assert!(matches!(r, Response::Rejected { .. }));
    }

    #[test]
    fn kv_put_delete_and_cas() {
        let mut s = ClusterState::default();
        assert_eq!(s.apply(1, &Command::KvPut { key: "a".into(), value: "1".into() }), Response::Kv { previous: None });
        assert_eq!(
            s.apply(2, &Command::KvPut { key: "a".into(), value: "2".into() }),
            Response::Kv { previous: Some("1".into()) }
        );
        assert_eq!(s.kv["a"].mod_index, 2);
        // Stale expected value: refused, state unchanged.
        assert_eq!(
            s.apply(3, &Command::KvCas { key: "a".into(), expected: Some("1".into()), new: Some("3".into()) }),
            Response::Cas { succeeded: false, current: Some("2".into()) }
        );
        assert_eq!(s.kv["a"].value, "2");
        assert_eq!(
            s.apply(4, &Command::KvCas { key: "a".into(), expected: Some("2".into()), new: Some("3".into()) }),
            Response::Cas { succeeded: true, current: Some("3".into()) }
        );
        // Create-if-absent.
        assert_eq!(
            s.apply(5, &Command::KvCas { key: "b".into(), expected: None, new: Some("x".into()) }),
            Response::Cas { succeeded: true, current: Some("x".into()) }
        );
        assert_eq!(
            s.apply(6, &Command::KvCas { key: "b".into(), expected: None, new: Some("y".into()) }),
            Response::Cas { succeeded: false, current: Some("x".into()) }
        );
        // CAS delete.
        assert_eq!(
            s.apply(7, &Command::KvCas { key: "b".into(), expected: Some("x".into()), new: None }),
            Response::Cas { succeeded: true, current: None }
        );
        assert!(!s.kv.contains_key("b"));
        assert_eq!(s.apply(8, &Command::KvDelete { key: "a".into() }), Response::Kv { previous: Some("3".into()) });
        assert!(s.kv.is_empty());
    }

    #[test]
    fn kv_limits_are_enforced_in_apply() {
        let mut s = ClusterState::default();
        let r = s.apply(1, &Command::KvPut { key: String::new(), value: "v".into() });
        assert!(matches!(r, Response::Rejected { .. }));
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        let r = s.apply(2, &Command::KvPut { key: "k".into(), value: big });
        assert!(matches!(r, Response::Rejected { .. }));
        assert!(s.kv.is_empty());
    }

    #[test]
    fn mesh_addresses_are_unique() {
        let mut s = state_with(&[NodeId(1), NodeId(2)], &[]);
        s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 0 });
        s.apply(2, &Command::UpsertMember { spec: spec(NodeId(2), "n2"), at_ms: 0 });
        let ip: Ipv4Addr = "10.90.0.1".parse().unwrap();
        assert_eq!(s.apply(3, &Command::AssignMeshIp { id: NodeId(1), ip }), Response::Ok);
        let r = s.apply(4, &Command::AssignMeshIp { id: NodeId(2), ip });
        assert!(matches!(r, Response::Rejected { .. }), "{r:?}");
        assert_eq!(s.members[&NodeId(2)].mesh_ip, None);
        // Re-assigning a member its own address is fine.
        assert_eq!(s.apply(5, &Command::AssignMeshIp { id: NodeId(1), ip }), Response::Ok);
    }

    #[test]
    fn roles_name_members_only_and_follow_membership() {
        let mut s = state_with(&[NodeId(1), NodeId(2), NodeId(3)], &[]);
        for id in 1..=3 {
            s.apply(id, &Command::UpsertMember { spec: spec(NodeId(id), &format!("n{}", id)), at_ms: 0 });
        }
        let roles = RoleAssignments {
            slurm_controller: Some(NodeId(1)),
            slurm_backup: Some(NodeId(2)),
            slurm_workers: [NodeId(1), NodeId(2), NodeId(3)].into(),
            k3s_server: Some(NodeId(3)),
            k3s_agents: [NodeId(1), NodeId(2)].into(),
        };
        assert_eq!(s.apply(4, &Command::SetRoles { roles: roles.clone() }), Response::Ok);
        let bad = RoleAssignments { slurm_controller: Some(NodeId(9)), ..roles.clone() };
        assert!(matches!(s.apply(5, &Command::SetRoles { roles: bad }), Response::Rejected { .. }));
        assert_eq!(s.roles, roles);
        // Node 2 leaves Raft: it loses every role.
        s.apply_membership([NodeId(1), NodeId(3)].into(), BTreeSet::new());
        assert_eq!(s.roles.slurm_backup, None);
        assert_eq!(s.roles.slurm_workers, [NodeId(1), NodeId(3)].into());
        assert_eq!(s.roles.k3s_agents, [NodeId(1)].into());
        assert_eq!(s.roles.slurm_controller, Some(NodeId(1)));
    }

    #[test]
    fn secrets_are_versioned_and_hidden_from_debug() {
        let mut s = ClusterState::default();
        s.apply(1, &Command::SetSecret { name: "munge".into(), value: "c2VjcmV0".into(), at_ms: 1 });
        s.apply(2, &Command::SetSecret { name: "munge".into(), value: "b3RoZXI=".into(), at_ms: 2 });
        assert_eq!(s.secrets["munge"].version, 2);
        assert!(!format!("{s:?}").contains("b3RoZXI="), "secret value in Debug output");
        let r = s.apply(3, &Command::SetSecret { name: "x".into(), value: String::new(), at_ms: 3 });
        assert!(matches!(r, Response::Rejected { .. }));
    }

    #[test]
    fn only_the_slurm_controller_publishes_its_state() {
        let mut s = state_with(&[NodeId(1), NodeId(2)], &[]);
        let publish = |from| Command::SetSlurmState { from, digest: "d".into(), files: 3, bytes: 100, taken_at_ms: 5 };
        assert!(matches!(s.apply(1, &publish(NodeId(1))), Response::Rejected { .. }), "no controller assigned");
        s.roles.slurm_controller = Some(NodeId(1));
        assert!(matches!(s.apply(2, &publish(NodeId(2))), Response::Rejected { .. }), "node 2 is not the controller");
        assert_eq!(s.apply(3, &publish(NodeId(1))), Response::SlurmState { version: 1 });
        assert_eq!(s.apply(4, &publish(NodeId(1))), Response::SlurmState { version: 2 });
        let c = s.slurm_state.clone().unwrap();
        assert_eq!((c.from, c.version, c.files), (NodeId(1), 2, 3));
        assert_eq!(s.without_kv().slurm_state, None, "the services loop does not see copies");
    }

    #[test]
    fn slurm_takeover_swaps_controller_and_backup() {
        let mut s = state_with(&[NodeId(1), NodeId(2), NodeId(3)], &[]);
        s.roles.slurm_controller = Some(NodeId(1));
        s.roles.slurm_backup = Some(NodeId(2));
        assert!(matches!(s.apply(1, &Command::SlurmTakeover { id: NodeId(3) }), Response::Rejected { .. }));
        assert!(matches!(s.apply(2, &Command::SlurmTakeover { id: NodeId(1) }), Response::Rejected { .. }));
        assert_eq!(s.apply(3, &Command::SlurmTakeover { id: NodeId(2) }), Response::Ok);
        assert_eq!((s.roles.slurm_controller, s.roles.slurm_backup), (Some(NodeId(2)), Some(NodeId(1))));
        // Replayed (a retry after a lost answer): node 2 is no longer the backup.
        assert!(matches!(s.apply(4, &Command::SlurmTakeover { id: NodeId(2) }), Response::Rejected { .. }));
    }

    #[test]
    fn without_kv_keeps_everything_but_the_kv_space() {
        let mut s = state_with(&[NodeId(1)], &[]);
        s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 0 });
        s.apply(2, &Command::KvPut { key: "k".into(), value: "v".into() });
        let t = s.without_kv();
        assert!(t.kv.is_empty());
        assert_eq!(ClusterState { kv: s.kv.clone(), ..t }, s);
    }

    #[test]
    fn apply_is_deterministic() {
        let cmds = [
            Command::InitCluster { cluster_id: "c".into(), at_ms: 1 },
            Command::KvPut { key: "k".into(), value: "v".into() },
            Command::KvCas { key: "k".into(), expected: Some("v".into()), new: Some("w".into()) },
        ];
        let mut a = ClusterState::default();
        let mut b = ClusterState::default();
        for (i, c) in cmds.iter().enumerate() {
            assert_eq!(a.apply(i as u64, c), b.apply(i as u64, c));
        }
        assert_eq!(a, b);
    }
}
