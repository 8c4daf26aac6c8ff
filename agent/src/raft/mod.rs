//! Raft adapters: the openraft type configuration, the durable log store (redb), the state
//! machine (the [`ClusterState`](crate::state::ClusterState) with snapshots on disk) and the peer
//! network.

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::sync::Arc;

use crate::config::RaftTuning;
use crate::state::{Command, NodeId, Response};

openraft::declare_raft_types!(
    /// openraft type configuration of ClusterOS.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Vec<u8>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type Snapshot = openraft::storage::Snapshot<TypeConfig>;
pub type RaftMetrics = openraft::RaftMetrics<NodeId, openraft::BasicNode>;

/// The openraft configuration derived from the agent's tuning.
pub fn raft_config(t: &RaftTuning) -> Result<Arc<openraft::Config>, openraft::ConfigError> {
    let c = openraft::Config {
        cluster_name: "clusteros".into(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: t.election_timeout_min_ms,
        election_timeout_max: t.election_timeout_max_ms,
        install_snapshot_timeout: t.snapshot_timeout_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_after_logs),
        max_in_snapshot_log_to_keep: t.logs_to_keep,
        // A learner this far behind is not promoted.
        replication_lag_threshold: t.snapshot_after_logs,
        ..Default::default()
    };
    Ok(Arc::new(c.validate()?))
}
