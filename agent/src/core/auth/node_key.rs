//! Who sent a request: a node's own Ed25519 key, its signatures of requests and answers, what a
//! membership records of a sender, and the keys a member vouched for (see [`super`]'s table).

use sha2::{Digest, Sha256};

use super::{AuthError, RequestAuth, Sender, framed, hex, unhex};
use crate::core::ids::NodeId;

/// A node's own signing key (Ed25519), from its identity: it signs every request the node sends.
/// The private half never leaves the node and is never logged.
#[derive(Clone)]
pub struct NodeKey(ed25519_dalek::SigningKey);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.public())
    }
}

impl NodeKey {
    /// The key of a 32-byte seed (the identity file keeps the seed).
    pub fn from_seed(seed: &[u8; 32]) -> NodeKey {
        NodeKey(ed25519_dalek::SigningKey::from_bytes(seed))
    }

    /// The public key as the membership records it (base64).
    pub fn public(&self) -> String {
        node_key_text(&self.public_bytes())
    }

    /// The public key's 32 bytes (what TLS presents as the node's raw public key).
    pub fn public_bytes(&self) -> [u8; 32] {
        self.0.verifying_key().to_bytes()
    }

    /// An Ed25519 signature of `message`: for the TLS handshake's CertificateVerify, whose
    /// message TLS itself frames with its own context string.
    pub fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.0.sign(message).to_bytes()
    }

    fn sign(&self, message: &[u8]) -> String {
        hex(&self.sign_raw(message))
    }

    /// Signs an answer as node `responder` (the header [`HDR_NODE_SIG`] of the answer).
    pub fn sign_response(&self, request_nonce: &str, status: u16, body: &[u8], responder: &str) -> String {
        self.sign(&response_message(request_nonce, status, body, responder))
    }
}

/// A public node key's bytes as the membership writes them (base64, as [`NodeKey::public`]).
pub fn node_key_text(public: &[u8; 32]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(public)
}

/// Whether `text` is a node key as [`NodeKey::public`] writes it (a valid Ed25519 point).
pub fn is_node_key(text: &str) -> bool {
    verifying_key(text).is_some()
}

/// The 32 bytes of a node key as [`NodeKey::public`] writes it (base64), if it is one.
pub fn node_key_bytes(text: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(text).ok()?.try_into().ok()
}

pub(super) fn verifying_key(text: &str) -> Option<ed25519_dalek::VerifyingKey> {
    ed25519_dalek::VerifyingKey::from_bytes(&node_key_bytes(text)?).ok()
}

/// What a node signature covers: the fields the cluster MAC covers, and the sender's name.
fn node_message(method: &str, path: &str, auth: &RequestAuth, from: &str) -> Vec<u8> {
    let time = auth.time_ms.to_string();
    framed(&[
        b"clusteros node request v1",
        method.as_bytes(),
        path.as_bytes(),
        auth.to.as_bytes(),
        from.as_bytes(),
        time.as_bytes(),
        auth.nonce.as_bytes(),
        auth.body_sha256.as_bytes(),
    ])
}

/// Checks the node signature `signature` (hex) of `message` by `public` (base64), the key of
/// node `who`.
fn verify_node(public: &str, message: &[u8], signature: Option<&str>, who: &str) -> Result<(), AuthError> {
    let bad = || AuthError::BadNodeSignature(who.to_string());
    let key = verifying_key(public).ok_or_else(bad)?;
    let sig: [u8; 64] = signature.and_then(unhex).and_then(|s| s.try_into().ok()).ok_or_else(bad)?;
    key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig)).map_err(|_| bad())
}

/// What a node's signature of an answer covers: the request's nonce, the status, the body's
/// digest and the answering node's name.
fn response_message(request_nonce: &str, status: u16, body: &[u8], responder: &str) -> Vec<u8> {
    let status = status.to_string();
    let digest = Sha256::digest(body);
    framed(&[b"clusteros node response v1", request_nonce.as_bytes(), status.as_bytes(), &digest, responder.as_bytes()])
}

/// Checks an answer's node signature against the key (base64) the membership records for
/// `responder`, the node the request was for.
pub fn verify_node_response(
    public: &str,
    request_nonce: &str,
    status: u16,
    body: &[u8],
    responder: &str,
    signature: &str,
) -> Result<(), AuthError> {
    verify_node(public, &response_message(request_nonce, status, body, responder), Some(signature), responder)
}

/// What `membership` (the latest a node holds) records of node `id`.
pub fn sender_in(membership: &openraft::Membership<NodeId, crate::core::raft_types::PeerNode>, id: NodeId) -> Sender {
    match membership.get_node(&id) {
        Some(n) => Sender::Member { node_key: n.node_key.clone() },
        None if membership.nodes().next().is_none() => Sender::Unjoined,
        None => Sender::Stranger,
    }
}

/// Node keys of members that a later membership than this node's lists, as a member this node
/// knows vouched for them (its answer signed by its own key). A node that was away while a new
/// node was admitted does not know the new node's key, and learns it only from the log that the
/// new node, if it leads, must send it: without the vouched key it would refuse every append
/// from that leader until leadership moved (see [`VouchedKeys::sender`]).
///
/// This is not a second membership: it only names who may send this node *Raft* messages,
/// whose terms and logs Raft itself checks as from any member; it holds only while the voucher
/// is still a member with the same key in this node's own membership, and it lapses by itself
/// once that membership reaches the vouched one (its own log then says who is a member). So a
/// voucher gains nothing it does not have: while it is a member here, it may already send this
/// node appends of its own; once this node's log removes it, what it vouched for goes with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VouchedKeys {
    /// The member that vouched, and its node key as this node's membership recorded it then.
    pub voucher: NodeId,
    pub voucher_key: String,
    /// The log id of the voucher's membership, compared as Raft orders log ids (its leader, term
    /// first, then its index), so an uncommitted membership entry of an old term on this node
    /// does not hide a later one.
    pub log_id: crate::core::raft_types::LogId,
    /// The members of that membership that this node's did not list, with their node keys.
    pub keys: std::collections::BTreeMap<NodeId, String>,
}

impl VouchedKeys {
    /// What member `voucher` (with `voucher_key`, as `mine` records it) vouches for in its answer:
    /// the keys (`theirs`, id -> node key, of its membership at `their_log_id`) of the nodes
    /// `mine` does not list, when the voucher's membership is later. `None` when it vouches for
    /// nobody, or is not a member of `mine` with that key.
    pub fn from_answer(
        mine: &crate::core::raft_types::StoredMembership,
        voucher: NodeId,
        voucher_key: &str,
        their_log_id: Option<crate::core::raft_types::LogId>,
        theirs: &std::collections::BTreeMap<NodeId, String>,
    ) -> Option<VouchedKeys> {
        let log_id = their_log_id?;
        if mine.log_id().is_some_and(|m| m >= log_id) || !is_member_with_key(mine, voucher, voucher_key) {
            return None;
        }
        let keys: std::collections::BTreeMap<NodeId, String> = theirs
            .iter()
            .filter(|(id, key)| mine.membership().get_node(id).is_none() && !key.is_empty())
            .map(|(id, key)| (*id, key.clone()))
            .collect();
        (!keys.is_empty()).then_some(VouchedKeys { voucher, voucher_key: voucher_key.to_string(), log_id, keys })
    }

    /// Keeps the later of two vouches.
    pub fn newer(self, other: Option<VouchedKeys>) -> VouchedKeys {
        match other {
            Some(o) if o.log_id > self.log_id => o,
            _ => self,
        }
    }

    /// What this node takes `id` for on a Raft route, when its membership `mine` says it is a
    /// `Stranger`: a member with the vouched key while `mine` is earlier than the vouched
    /// membership and still lists the voucher with its key, a stranger otherwise.
    pub fn sender(&self, mine: &crate::core::raft_types::StoredMembership, id: NodeId) -> Sender {
        let current = mine.log_id().is_none_or(|m| m < self.log_id);
        match self.keys.get(&id) {
            Some(key) if current && is_member_with_key(mine, self.voucher, &self.voucher_key) => {
                Sender::Member { node_key: key.clone() }
            }
            _ => Sender::Stranger,
        }
    }
}

/// Whether `m` lists `id` with the (non-empty) node key `key`.
fn is_member_with_key(m: &crate::core::raft_types::StoredMembership, id: NodeId, key: &str) -> bool {
    !key.is_empty() && m.membership().get_node(&id).is_some_and(|n| n.node_key == key)
}

impl RequestAuth {
    /// Adds the sender's name and its node signature to a request signed with the cluster key.
    pub fn sign_as(mut self, method: &str, path: &str, from: &str, key: &NodeKey) -> RequestAuth {
        self.node_sig = Some(key.sign(&node_message(method, path, &self, from)));
        self.from = Some(from.to_string());
        self
    }

    /// Checks the node signature against the sender's public key (base64).
    pub fn verify_node_sig(&self, method: &str, path: &str, public: &str) -> Result<(), AuthError> {
        let from = self.from.as_deref().unwrap_or_default();
        verify_node(public, &node_message(method, path, self, from), self.node_sig.as_deref(), from)
    }
}
