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
    /// Fingerprints of the cluster secrets the node holds, the one it signs with first (see
    /// [`crate::core::auth::ClusterKeys`]): the leader seals secrets again with a new cluster
    /// secret only once every member holds it, and `status` shows when a rotation may go on.
    #[serde(default)]
    pub cluster_keys: Vec<String>,
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
/// [`slurm_state`](crate::adapters::slurm_state)): which node has it and its digest. The files themselves
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
    /// The same secret value sealed again (with a new cluster secret); refused unless the secret
    /// is still at `version`, which it keeps (its users see no change).
    ResealSecret {
        name: String,
        value: String,
        version: u64,
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

impl Command {
    /// Whether applying it can change nothing but the KV store (and the request log that applies
    /// a request once): the node's loops, which act on members, roles, secrets and the SLURM
    /// copy, need not look again after it.
    pub fn kv_only(&self) -> bool {
        match self {
            Command::KvPut { .. } | Command::KvDelete { .. } | Command::KvCas { .. } => true,
            Command::Request { cmd, .. } => cmd.kv_only(),
            _ => false,
        }
    }
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

mod cluster;

/// A well-formed WireGuard public key of its own for each `n` (test fixtures).
#[cfg(test)]
pub fn test_wg_key(n: u64) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([n as u8; 32])
}
pub use cluster::{ClusterState, validate_kv, validate_member};

#[cfg(test)]
mod tests;
