//! ClusterOS node agent.
//!
//! The layers, and the one way their dependencies run (a layer uses only the layers before it):
//!
//! - [`core`]: pure logic. The replicated state and its `apply`, formation, health and autopilot
//!   decisions, roles, the mesh plan, config validation, renderers, signatures. No tokio, no file
//!   system, no sockets (`make check` refuses them there).
//! - [`proto`]: the wire protocol: paths, request and answer types, the error body.
//! - [`adapters`]: the world outside the process, each behind a narrow interface: Raft storage and
//!   network, the peer client, WireGuard over netlink, systemd over D-Bus, files, the node identity.
//! - [`runtime`]: the running node: the context every loop shares and the loops that carry the
//!   core's decisions out through the adapters.
//! - [`status`]: the report `clusteros status` shows, built from the runtime.
//! - [`server`]: the peer API, the local API and `/metrics`.
//! - [`daemon`] (`clusteros agent`) and [`cli`] (every other command) at the top. Real agent
//!   processes for the test suites are the crate `clusteros-testkit` (testkit/), not part of this one.

pub mod adapters;
pub mod cli;
pub mod core;
pub mod daemon;
pub mod logging;
pub mod proto;
pub mod runtime;
pub mod server;
pub mod status;

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
