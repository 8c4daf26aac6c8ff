//! The openraft type configuration: what a log entry carries ([`Command`]), what applying it
//! answers ([`Response`]), node ids, what the Raft membership records of a node ([`PeerNode`])
//! and the shapes of log ids, votes and snapshots. Types only; the storage and the network that
//! use them are in [`crate::adapters::raft`].

use serde::{Deserialize, Serialize};

use crate::core::state::{Command, NodeId, Response};

/// What the Raft membership records of a member: where its peer API is, and its node key (the
/// Ed25519 public key, base64, that signs every request it sends; see [`crate::core::auth`]).
/// The key is committed with the node's admission (the learner it joins as, or the voters a
/// cluster forms with) and leaves with its removal, so "is this sender a member, and is it who it
/// says" is answered by the membership Raft agreed on, nothing else.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerNode {
    pub addr: String,
    /// Empty only in a membership written by an agent from before node keys: such a member's
    /// requests are refused (see [`crate::core::auth::Sender`]).
    #[serde(default)]
    pub node_key: String,
}

impl PeerNode {
    pub fn new(addr: impl Into<String>, node_key: impl Into<String>) -> PeerNode {
        PeerNode { addr: addr.into(), node_key: node_key.into() }
    }
}

impl std::fmt::Display for PeerNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.addr)
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration of ClusterOS.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = PeerNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Vec<u8>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, PeerNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, PeerNode>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, PeerNode>;
