//! ClusterOS node agent.
//!
//! Pure logic (no I/O): [`state`] (the replicated ClusterState and its `apply`), [`membership`]
//! (formation, health and autopilot decisions), [`config`] validation, [`auth`] signatures.
//! Adapters: [`raft`] (storage, network), [`api`] (peer and local servers), [`transport`],
//! [`files`]. [`runtime`] wires them into the running agent; [`daemon`] is `clusteros agent`;
//! [`cli`] and [`client`] are the command line.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod files;
pub mod identity;
pub mod logging;
pub mod membership;
pub mod mesh;
pub mod metrics;
pub mod pledge;
pub mod proto;
pub mod raft;
pub mod render;
pub mod roles;
pub mod runtime;
pub mod secrets;
pub mod services;
pub mod slurm_state;
pub mod state;
pub mod status;
pub mod systemd;
pub mod transport;
pub mod wireguard;

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
