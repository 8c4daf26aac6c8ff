//! The agent's two APIs: the peer API (TCP, every request signed with the cluster key) and the
//! local API (a root-only unix socket, used by the CLI). Requests and answers are plain data types,
//! defined here so that both sides and the tests share them.

pub mod local;
pub mod peer;

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::raft::{SnapshotMeta, Vote};
use crate::state::{KvEntry, NodeId};
use crate::transport::PeerError;

/// Peer API paths.
pub mod paths {
    /// Raft paths are followed by `/{target node id}`.
    pub const RAFT_APPEND: &str = "/peer/v1/raft/append";
    pub const RAFT_VOTE: &str = "/peer/v1/raft/vote";
    pub const RAFT_SNAPSHOT: &str = "/peer/v1/raft/snapshot";
    pub const RAFT_PREVOTE: &str = "/peer/v1/raft/prevote";
    pub const HELLO: &str = "/peer/v1/hello";
    pub const JOIN: &str = "/peer/v1/join";
    pub const WRITE: &str = "/peer/v1/write";
    pub const READ: &str = "/peer/v1/read";
    pub const LEAVE: &str = "/peer/v1/leave";
    pub const SLURM_STATE: &str = "/peer/v1/slurm-state";
    /// Formation: a proposer asks a member to pledge to its proposal (`bootstrap_expect`).
    pub const PLEDGE: &str = "/peer/v1/form/pledge";
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

/// The body of every error answer, on both APIs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    pub kind: String,
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
    pub last_log_id: Option<crate::raft::LogId>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PreVoteResponse {
    pub granted: bool,
    /// The responder's current term.
    pub term: u64,
    /// Why not, when not granted.
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
    pub pledged: Option<crate::membership::Pledge>,
}

/// The answer to a pledge request (the request body is a [`crate::membership::Pledge`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PledgeResponse {
    /// Why the node did not pledge; `None`: it holds the pledge (on disk) now.
    pub refused: Option<crate::membership::PledgeRefusal>,
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
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct JoinRequest {
    pub id: NodeId,
    pub name: String,
    pub api_addr: String,
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

/// Errors of both APIs; each maps to an HTTP status and an [`ErrorBody`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("this node is not the leader")]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("{0}")]
    NoLeader(String),
    #[error("{0}")]
    NotConfigured(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    WrongNode(String),
    #[error("{0}")]
    Peer(#[from] PeerError),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The error a peer answered with (its kind and message), as this node's own: "not the
    /// leader" and "no leader" both mean "ask the leader again".
    pub fn from_remote(kind: &str, message: String) -> ApiError {
        match kind {
            "not_leader" | "no_leader" => ApiError::NoLeader(message),
            "bad_request" => ApiError::BadRequest(message),
            "refused" => ApiError::Refused(message),
            "timeout" => ApiError::Timeout(message),
            _ => ApiError::Internal(message),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::NotLeader { .. } => "not_leader",
            ApiError::NoLeader(_) => "no_leader",
            ApiError::NotConfigured(_) => "not_configured",
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Refused(_) => "refused",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::WrongNode(_) => "wrong_node",
            ApiError::Peer(_) => "peer",
            ApiError::Timeout(_) => "timeout",
            ApiError::Internal(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotLeader { .. } => StatusCode::MISDIRECTED_REQUEST,
            ApiError::NoLeader(_) | ApiError::NotConfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Refused(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::WrongNode(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Peer(_) => StatusCode::BAD_GATEWAY,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.to_string(), kind: self.kind().into() };
        (self.status(), axum::Json(body)).into_response()
    }
}

/// Peer API: a command to propose on the leader.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WriteRequest {
    pub cmd: crate::state::Command,
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
