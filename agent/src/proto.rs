//! The wire protocol of both APIs, and nothing else: the peer API's paths, every request and
//! answer type, and the error body with its kinds. Plain data: it must not depend on the code
//! that serves or sends them (`api`, `transport`, `runtime`), so that both sides and the tests
//! can share it without import cycles.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::core::raft_types::{SnapshotMeta, Vote};
use crate::core::state::{KvEntry, NodeId};

/// Peer API paths.
pub mod paths {
    /// Raft paths are followed by `/{target node id}`.
    pub const RAFT_APPEND: &str = "/peer/v1/raft/append";
    pub const RAFT_VOTE: &str = "/peer/v1/raft/vote";
    pub const RAFT_SNAPSHOT: &str = "/peer/v1/raft/snapshot";
    pub const RAFT_PREVOTE: &str = "/peer/v1/raft/prevote";
    pub const RAFT_HANDOFF: &str = "/peer/v1/raft/handoff";
    pub const HELLO: &str = "/peer/v1/hello";
    pub const JOIN: &str = "/peer/v1/join";
    pub const WRITE: &str = "/peer/v1/write";
    pub const READ: &str = "/peer/v1/read";
    pub const LEAVE: &str = "/peer/v1/leave";
    pub const SLURM_STATE: &str = "/peer/v1/slurm-state";
    /// Formation: a proposer asks a member to pledge to its proposal (`bootstrap_expect`).
    pub const PLEDGE: &str = "/peer/v1/form/pledge";

    /// Whether a request to `path` may be addressed to any node (`x-clusteros-to: *`): only
    /// discovery and a node's own join, sent to an address before the sender knows who answers
    /// there. Everything else names its node, so it cannot be replayed at another.
    pub fn accepts_any_node(path: &str) -> bool {
        path == HELLO || path == JOIN
    }

    /// Whether `path` is an admission route: one a node uses before it is a member (discovery,
    /// formation, its join), taken on the cluster secret from a sender that is not a member. Every
    /// other route takes requests from members only (see [`crate::core::auth`]).
    pub fn is_admission(path: &str) -> bool {
        path == HELLO || path == JOIN || path == PLEDGE
    }

    /// Whether `path` is one of Raft's own routes (append, vote, snapshot, pre-vote).
    pub fn is_raft(path: &str) -> bool {
        path.starts_with("/peer/v1/raft/")
    }
}

/// The SLURM controller's newest state copy, sealed with the cluster key.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SlurmStateBlob {
    pub from: NodeId,
    /// The version the state machine gave this copy when it was announced.
    pub version: u64,
    pub digest: String,
    pub sealed: String,
}

/// The largest answer a peer client reads (the largest legitimate one, the sealed SLURM state
/// copy, is about 30 MiB); a longer one is refused without being read further.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Longest message from another node kept for logs and `clusteros status`.
pub const MAX_MESSAGE_CHARS: usize = 512;

pub use crate::core::text::printable;

/// The body of every error answer, on both APIs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    pub kind: ErrorKind,
}

/// What kind of error an answer carries: the one list of them (the wire spells them in
/// snake_case). A kind this version does not know (from a newer peer) reads as `Unknown`.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    NotLeader,
    NoLeader,
    NotConfigured,
    BadRequest,
    Refused,
    Unauthorized,
    WrongNode,
    Peer,
    Timeout,
    Internal,
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotLeader => "not_leader",
            ErrorKind::NoLeader => "no_leader",
            ErrorKind::NotConfigured => "not_configured",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Refused => "refused",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::WrongNode => "wrong_node",
            ErrorKind::Peer => "peer",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
            ErrorKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_kinds_are_spelled_on_the_wire_as_they_always_were() {
        let all = [
            ErrorKind::NotLeader,
            ErrorKind::NoLeader,
            ErrorKind::NotConfigured,
            ErrorKind::BadRequest,
            ErrorKind::Refused,
            ErrorKind::Unauthorized,
            ErrorKind::WrongNode,
            ErrorKind::Peer,
            ErrorKind::Timeout,
            ErrorKind::Internal,
            ErrorKind::Unknown,
        ];
        for k in all {
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{}\"", k.as_str()));
            assert_eq!(serde_json::from_str::<ErrorKind>(&format!("\"{k}\"")).unwrap(), k);
        }
        let newer: ErrorBody = serde_json::from_str(r#"{"error":"e","kind":"from_the_future"}"#).unwrap();
        assert_eq!(newer.kind, ErrorKind::Unknown);
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SnapshotRequest {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    /// JSON of the state machine.
    pub data: String,
}

/// Pre-vote: "would you vote for me if I started an election now?" Answering changes nothing on
/// the responder; a node starts a real election (and raises its term) only after a quorum said
/// yes, so a node that cannot reach a quorum, or that a healthy leader still reaches, never
/// disturbs the cluster.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    /// The candidate's current term (it would campaign in the next one).
    pub term: u64,
    pub last_log_id: Option<crate::core::raft_types::LogId>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PreVoteResponse {
    pub granted: bool,
    /// The responder's current term.
    pub term: u64,
    /// Why not, when not granted.
    pub reason: Option<String>,
}

/// A stopping leader hands its office over: sent to every other voter after its Raft has stopped
/// (no more heartbeats), naming the voter whose log matched furthest. That successor campaigns as
/// soon as openraft's lease allows, and the others grant it their pre-vote without waiting for an
/// election timeout of silence. Only the leader itself may send it (checked by its node key).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HandOffRequest {
    pub leader: NodeId,
    /// The term the leader led.
    pub term: u64,
    pub successor: NodeId,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct HandOffResponse {
    pub taken: bool,
    /// Why not, when not taken.
    pub reason: Option<String>,
}

/// What a node says about itself during discovery.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
    /// The node has Raft state (it formed or joined a cluster before).
    pub initialized: bool,
    /// `bootstrap_expect` of that node, to detect mismatched settings.
    pub bootstrap_expect: Option<usize>,
    /// The formation pledge the node holds (it is forming a cluster with those members).
    #[serde(default)]
    pub pledged: Option<crate::core::formation::Pledge>,
}

/// The answer to a pledge request (the request body is a [`crate::core::formation::Pledge`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PledgeResponse {
    /// Why the node did not pledge; `None`: it holds the pledge (on disk) now.
    pub refused: Option<crate::core::formation::PledgeRefusal>,
    /// The node's node key: the proposer commits it in the first membership.
    #[serde(default)]
    pub node_key: String,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HelloRequest {
    pub from: Candidate,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct HelloResponse {
    pub me: Candidate,
    /// Candidates the responder has heard from directly (not including itself).
    pub known: Vec<Candidate>,
    /// The responder's view of the cluster, when it is in one.
    pub leader: Option<NodeId>,
    /// Raft members as the responder last applied them: id -> peer address.
    pub members: BTreeMap<NodeId, String>,
    /// The log index of that membership (applied, so committed): whether it is later than the
    /// asker's own (see [`crate::core::membership::removal_confirmed`]).
    #[serde(default)]
    pub members_index: Option<u64>,
    /// The log id of that membership (term and index: which of two memberships is later, as
    /// Raft orders log ids).
    #[serde(default)]
    pub members_log_id: Option<crate::core::raft_types::LogId>,
    /// The node keys of that membership: id -> node key (base64). A member that missed a node's
    /// admission learns its key from here (see [`crate::core::auth::VouchedKeys`]).
    #[serde(default)]
    pub member_keys: BTreeMap<NodeId, String>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct JoinRequest {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
    /// The joining node's node key (see [`crate::core::auth::NodeKey`]), committed with it.
    #[serde(default)]
    pub node_key: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct JoinResponse {
    pub leader: NodeId,
    /// A stale member with the same name that this join replaced.
    pub replaced: Option<NodeId>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct ReadRequest {
    pub key: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReadResponse {
    pub key: String,
    pub entry: Option<KvEntry>,
    /// The log index the read was served at (linearizable reads only).
    pub read_index: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LeaveRequest {
    pub id: NodeId,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Empty {}

/// Local API: `POST /v1/kv/put`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct PutBody {
    pub key: String,
    pub value: String,
}

/// Local API: `POST /v1/kv/cas`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct CasBody {
    pub key: String,
    pub expected: Option<String>,
    pub new: Option<String>,
}

/// Local API: `POST /v1/join`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct JoinBody {
    pub addr: String,
}

/// Peer API: a command to propose on the leader.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WriteRequest {
    pub cmd: crate::core::state::Command,
}

/// Local API: `POST /v1/kv/get`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct GetBody {
    pub key: String,
    /// Serve from this node's applied state without asking the leader.
    #[serde(default)]
    pub stale: bool,
}

/// Local API: `POST /v1/kv/delete`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct KeyBody {
    pub key: String,
}

/// Local API: `POST /v1/secrets/rotate`.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RotateBody {
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RotateResponse {
    pub name: String,
    pub version: u64,
}
