//! Proof of the cluster secret and of the sender's own identity on every peer RPC.
//!
//! A request carries `x-clusteros-time` (unix ms), `x-clusteros-nonce` (random),
//! `x-clusteros-body-sha256` (the body's SHA-256), `x-clusteros-to` (the node it is for, or `*`
//! where the sender cannot know: discovery and joining) and `x-clusteros-auth`, an HMAC-SHA256
//! over method, path, destination, time, nonce and that digest, keyed by a key derived from the
//! cluster secret. A node refuses a request addressed to another node, and one [`Gate`] (one
//! replay memory) guards all of a node's listeners, so a captured request cannot be applied twice
//! by sending it to another listener or another node within the time window. The
//! headers alone prove the secret, so the server refuses a request without it before reading any
//! of its body ([`ClusterKey::verify_request_head`]), and checks the body against the signed
//! digest once it has read it ([`ClusterKey::verify_body`]). The server refuses requests outside a time window and
//! nonces it has already seen within that window (bounded memory). Responses are signed over the
//! request's nonce, status and body, so a joining node also learns whether the cluster it reached
//! knows the same secret.
//!
//! The cluster secret only admits. Who sent a request is proved by the sender's own node key
//! (Ed25519, [`NodeKey`]): `x-clusteros-from` names the sender and `x-clusteros-node-sig` signs
//! the same fields plus that name. Every request must carry it, made with the key that its
//! connection's TLS handshake proved (the channel key, `crate::adapters::tls`), so a machine in
//! the middle cannot relay a request it did not make. The public keys are the ones committed in
//! the Raft membership ([`crate::core::raft_types::PeerNode`]); a member's requests must come
//! over a channel of its recorded key. What a receiver accepts, by route and by what its own
//! membership says of the sender ([`Sender`]):
//!
//! | route | sender is a member | sender is not a member | this node is in no cluster yet |
//! |---|---|---|---|
//! | admission: hello, pledge, join | its recorded key is checked | the secret suffices | the secret suffices |
//! | Raft (append, snapshot, vote, pre-vote) | its node signature is required | refused, unless a member this node knows vouched for its key ([`VouchedKeys`]) | the secret suffices |
//! | everything else (write, read, leave, SLURM state) | its node signature is required | refused | the secret suffices |
//!
//! The last column is the trust of a node that has not joined: it learns its cluster's keys with
//! the first membership it receives. So a removed node, which still knows the secret, can
//! discover and ask to join (as a new node), but no member whose log has its removal takes a
//! Raft message, a write or a read from it; and a holder of the secret cannot speak for a member, since it lacks that member's
//! key. What each member may ask for is [`crate::core::permissions`]'s table.

use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::core::ids::NodeId;

mod cluster_key;
mod gate;
mod node_key;

pub use cluster_key::{ClusterKey, ClusterKeys};
pub use gate::{Gate, ReplayGuard};
pub use node_key::{NodeKey, VouchedKeys, is_node_key, node_key_bytes, node_key_text, sender_in, verify_node_response};

pub const HDR_TIME: &str = "x-clusteros-time";
pub const HDR_NONCE: &str = "x-clusteros-nonce";
pub const HDR_AUTH: &str = "x-clusteros-auth";
pub const HDR_BODY: &str = "x-clusteros-body-sha256";
pub const HDR_TO: &str = "x-clusteros-to";
pub const HDR_FROM: &str = "x-clusteros-from";
pub const HDR_NODE_SIG: &str = "x-clusteros-node-sig";
/// The destination of a request that whichever node listens at the address may answer.
pub const ANY_NODE: &str = "*";

/// Requests whose time differs from ours by more than this are refused.
pub const REPLAY_WINDOW: Duration = Duration::from_secs(60);
/// Upper bound on remembered nonces; beyond it new requests are refused until old ones expire.
pub const MAX_NONCES: usize = 200_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("request is not signed (missing {0} header): the sender is not a ClusterOS agent of this cluster")]
    Missing(&'static str),
    #[error(
        "cluster secret mismatch: the signature does not verify with this cluster's secret; give every node the same clusteros.cluster-secret"
    )]
    BadSignature,
    #[error(
        "request time is {skew_ms} ms away from this node's clock (limit {limit_s} s): check time sync (chrony) on both nodes"
    )]
    Stale { skew_ms: i64, limit_s: u64 },
    #[error("the request body does not match its signed digest (changed in transit?): refused")]
    BodyMismatch,
    #[error("replayed request (nonce already seen): refused")]
    Replayed,
    #[error(
        "the request is for node {to}, not this node ({me}): refused (a replayed request, or the address now belongs to another node)"
    )]
    WrongDestination { to: String, me: String },
    #[error("a request to {0} must name the node it is for ({HDR_TO}): refused")]
    Unaddressed(String),
    #[error("too many requests in the replay window: refused, retry later")]
    Overloaded,
    #[error(
        "the request does not say which node sent it ({HDR_FROM} and {HDR_NODE_SIG}): {0} takes requests signed by a node's key only"
    )]
    Anonymous(String),
    #[error(
        "the request of {0} is not signed by the node key its TLS connection proved: refused (relayed by another machine?)"
    )]
    NotTheChannelKey(String),
    #[error(
        "node {0} is not a member of this node's cluster (it was removed, or has not joined yet): refused; a removed node must join again as a new node"
    )]
    NotAMember(String),
    #[error(
        "the node signature of {0} does not verify with the key its membership records: refused (another node, or a reinstalled machine with a new key under the old id)"
    )]
    BadNodeSignature(String),
    #[error(
        "member {0} has no node key in this cluster's membership (it joined with an agent from before node keys): refused; remove it and let it join again"
    )]
    NoNodeKey(String),
}

/// The five authentication header values of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAuth {
    /// The node the request is for (its id as `NodeId` displays it), or [`ANY_NODE`].
    pub to: String,
    pub time_ms: i64,
    pub nonce: String,
    /// The body's SHA-256, hex.
    pub body_sha256: String,
    pub signature: String,
    /// The sender's node id and its node signature ([`RequestAuth::sign_as`]); `None` for a
    /// request that proves only the cluster secret.
    pub from: Option<String>,
    pub node_sig: Option<String>,
}

/// The header values of a request as the peer API reads them (`None`: absent or not visible
/// ASCII).
#[derive(Debug, Clone, Copy, Default)]
pub struct AuthHeaders<'a> {
    pub to: Option<&'a str>,
    pub time: Option<&'a str>,
    pub nonce: Option<&'a str>,
    pub body_sha256: Option<&'a str>,
    pub signature: Option<&'a str>,
    pub from: Option<&'a str>,
    pub node_sig: Option<&'a str>,
}

/// Reads the authentication headers of a request. What the peer API's middleware checks first,
/// before the signature.
pub fn parse_auth(h: AuthHeaders<'_>) -> Result<RequestAuth, AuthError> {
    let time_ms =
        h.time.ok_or(AuthError::Missing(HDR_TIME))?.parse::<i64>().map_err(|_| AuthError::Missing(HDR_TIME))?;
    let nonce = h.nonce.ok_or(AuthError::Missing(HDR_NONCE))?.to_string();
    let body_sha256 = h.body_sha256.ok_or(AuthError::Missing(HDR_BODY))?.to_string();
    let to = h.to.ok_or(AuthError::Missing(HDR_TO))?.to_string();
    let signature = h.signature.ok_or(AuthError::Missing(HDR_AUTH))?.to_string();
    let (from, node_sig) = (h.from.map(str::to_string), h.node_sig.map(str::to_string));
    Ok(RequestAuth { to, time_ms, nonce, body_sha256, signature, from, node_sig })
}

/// The value of the body digest header for `body`.
pub fn body_digest(body: &[u8]) -> String {
    hex(&Sha256::digest(body))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// The parts of a signed message, each after its length (8 bytes, big-endian): what the MAC and
/// the node signatures cover, so that no two lists of parts give the same bytes.
fn framed(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 8).sum());
    for p in parts {
        out.extend_from_slice(&(p.len() as u64).to_be_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// What this node's Raft membership says of a request's sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// This node holds no membership yet (it has not formed or joined a cluster): the cluster
    /// secret is all it can check, as at its join.
    Unjoined,
    /// A member, with the node key the membership records (empty: none recorded).
    Member { node_key: String },
    /// Not in the membership this node holds: removed, or not admitted (yet).
    Stranger,
}

/// Who a request admitted by the [`Gate`] is known to come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// This member: the request carries its node signature.
    Member(NodeId),
    /// A holder of the cluster secret: an admission request, or any request to a node that is in
    /// no cluster yet. Nothing that needs a member's authority may rest on it.
    SecretHolder,
}

impl Origin {
    /// The member the request comes from, if it proved one.
    pub fn member(&self) -> Option<NodeId> {
        match self {
            Origin::Member(id) => Some(*id),
            Origin::SecretHolder => None,
        }
    }
}

#[cfg(test)]
mod tests;
