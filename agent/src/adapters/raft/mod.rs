//! Raft adapters: the openraft type configuration, the durable log store (redb), the state
//! machine (the [`ClusterState`](crate::core::state::ClusterState) with snapshots on disk) and the peer
//! network.

pub mod log_store;
pub mod network;
pub mod state_machine;

use std::sync::Arc;

use crate::core::config::RaftTuning;

pub use crate::core::raft_types::*;

/// The Raft node of this process.
pub type Raft = openraft::Raft<TypeConfig>;

/// The openraft configuration derived from the agent's tuning.
pub fn raft_config(t: &RaftTuning) -> Result<Arc<openraft::Config>, openraft::ConfigError> {
    let c = openraft::Config {
        cluster_name: "clusteros".into(),
        heartbeat_interval: t.heartbeat_ms,
        // Elections are started by the agent after a pre-vote (openraft 0.9 has none; see
        // `Node::run_elections`), never by openraft's own timer. openraft still uses its
        // election timeout as the leader lease: a voter that heard from a leader less than that
        // long ago refuses to vote. The lease is the shortest election timeout, the same span
        // a pre-vote responder requires, so an election granted by pre-vote is not refused.
        enable_elect: false,
        election_timeout_min: (t.heartbeat_ms + 1).max(t.election_timeout_min_ms / 2),
        election_timeout_max: t.election_timeout_min_ms,
        install_snapshot_timeout: t.snapshot_timeout_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_after_logs),
        max_in_snapshot_log_to_keep: t.logs_to_keep,
        // A learner this far behind is not promoted.
        replication_lag_threshold: t.snapshot_after_logs,
        ..Default::default()
    };
    Ok(Arc::new(c.validate()?))
}
