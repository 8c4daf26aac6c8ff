//! The names of the cluster's managed secrets. Their values, sealed with the cluster key, are in
//! the replicated state; sealing, opening and drawing new values is
//! [`crate::adapters::secrets`]' work (it needs the OS random source).

pub const MUNGE_KEY: &str = "munge-key";
pub const K3S_TOKEN: &str = "k3s-token";
/// Secrets the leader creates when the cluster has none, and `clusteros secrets rotate` accepts.
pub const MANAGED: &[&str] = &[MUNGE_KEY, K3S_TOKEN];
