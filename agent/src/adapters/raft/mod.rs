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

/// How long openraft's vote RPC may take: half the shortest election timeout.
fn vote_rpc_timeout_ms(t: &RaftTuning) -> u64 {
    (t.heartbeat_ms + 1).max(t.election_timeout_min_ms / 2)
}

/// openraft's leader lease: a voter that heard from a leader less than this long ago refuses its
/// vote. It is shorter than the shortest election timeout, the silence a pre-vote responder
/// requires, so an election granted by pre-vote is never refused; and it is what a successor
/// named by a stopping leader waits before it campaigns (a hand-off: the pre-vote grants it
/// without the silence). Disruption by a node that cannot reach the leader is the pre-vote's to
/// prevent, not the lease's. Reads do not rest on it: they confirm leadership with a quorum.
pub fn vote_lease(t: &RaftTuning) -> std::time::Duration {
    std::time::Duration::from_millis(vote_rpc_timeout_ms(t) + t.heartbeat_ms)
}

/// The openraft configuration derived from the agent's tuning.
pub fn raft_config(t: &RaftTuning) -> Result<Arc<openraft::Config>, openraft::ConfigError> {
    let c = openraft::Config {
        cluster_name: "clusteros".into(),
        heartbeat_interval: t.heartbeat_ms,
        // Elections are started by the agent after a pre-vote (openraft 0.9 has none; see
        // `runtime::elections`), never by openraft's own timer. openraft still uses its
        // election timeout: the shortest as the timeout of a vote RPC, the longest as the
        // leader lease (a voter that heard from a leader less than that long ago refuses to
        // vote). See `vote_lease`.
        enable_elect: false,
        election_timeout_min: vote_rpc_timeout_ms(t),
        election_timeout_max: vote_lease(t).as_millis() as u64,
        install_snapshot_timeout: t.snapshot_timeout_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(t.snapshot_after_logs),
        max_in_snapshot_log_to_keep: t.logs_to_keep,
        // A learner this far behind is not promoted.
        replication_lag_threshold: t.snapshot_after_logs,
        ..Default::default()
    };
    Ok(Arc::new(c.validate()?))
}
