//! What the daemon and `status` see of a node's life: its phase and progress, why a run ended,
//! and why a node could not start.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    /// Not yet a member, this node guessed its address from the default route, and the first
    /// node of its cluster it heard (by LAN beacon) is reached from another one: start again
    /// advertising that one.
    Readdress { addr: SocketAddr },
    /// Raft stopped on an error it cannot recover from (a storage write failed: disk full,
    /// read-only file system, I/O error). The process exits so that systemd starts it again.
    Fatal(String),
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
