//! Adapters: the world outside the process, each behind a narrow interface with a fake for tests
//! where the runtime's loops need one. They carry out what [`crate::core`] decided and report what
//! they observe; they make no cluster decisions of their own.

pub mod beacon;
pub mod config_files;
pub mod dns;
pub mod files;
pub mod host;
pub mod identity;
pub mod mesh;
pub mod peers;
pub mod pledge;
pub mod raft;
pub mod secrets;
pub mod services;
pub mod slurm_state;
pub mod systemd;
pub mod tls;
pub mod wireguard;
