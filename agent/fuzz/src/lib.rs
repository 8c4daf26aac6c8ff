//! What the fuzz targets and the seed generator (`examples/make_seeds.rs`) share: the peer
//! request encoding of the `peer_request` target.
#![forbid(unsafe_code)]

use clusteros::proto::paths;

/// The cluster secret of every fuzz target.
pub const SECRET: &str = "fuzz-cluster-secret-0123456789";
/// The clock the `peer_request` target checks request times against.
pub const NOW_MS: i64 = 1_750_000_000_000;
/// The node id that Raft paths name.
pub const TARGET: &str = "0123456789abcdef";

/// The peer API path of request kind `kind` (the first input byte of `peer_request`): every
/// route of the peer router, and one that is not a route (only the middleware runs). The top bit
/// is not the route's (`peer_request` reads it as "relayed").
pub fn route(kind: u8) -> String {
    match (kind & 0x7f) % 12 {
        0 => format!("{}/{TARGET}", paths::RAFT_APPEND),
        1 => format!("{}/{TARGET}", paths::RAFT_VOTE),
        2 => format!("{}/{TARGET}", paths::RAFT_SNAPSHOT),
        3 => format!("{}/{TARGET}", paths::RAFT_PREVOTE),
        4 => paths::HELLO.into(),
        5 => paths::JOIN.into(),
        6 => paths::LEAVE.into(),
        7 => paths::WRITE.into(),
        8 => paths::READ.into(),
        9 => paths::SLURM_STATE.into(),
        10 => paths::PLEDGE.into(),
        _ => "/peer/v1/nope".into(),
    }
}
