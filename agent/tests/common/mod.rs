//! Test support for the agent's host tests, by concern: the cluster harness (also used by the
//! benchmark), what only scenarios need, and host resources (network namespaces, tmpfs).

pub mod cluster;
pub mod host;
pub mod scenarios;

pub use cluster::{Cluster, Opts, binary, wait_until};
pub use host::{Capture, NetNs, Tmpfs};
pub use scenarios::{metric, serial};
