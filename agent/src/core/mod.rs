//! Pure logic: everything the agent decides, as functions of values. No tokio, no file system, no
//! sockets, no clock (callers pass the time in). Owns the replicated ClusterState and its `apply`;
//! must not reach outside the process (`make check` greps for it).

pub mod auth;
pub mod beacon;
pub mod config;
pub mod dns;
pub mod formation;
pub mod ids;
pub mod leader;
pub mod membership;
pub mod mesh;
pub mod permissions;
pub mod raft_types;
pub mod render;
pub mod roles;
pub mod secrets;
pub mod services;
pub mod slurm_copy;
pub mod state;
pub mod text;
