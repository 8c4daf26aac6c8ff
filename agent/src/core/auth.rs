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

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::core::ids::NodeId;

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

type HmacSha256 = Hmac<Sha256>;

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

/// The key derived from the cluster secret. Never logged.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

impl ClusterKey {
    pub fn derive(secret: &str) -> ClusterKey {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
        mac.update(b"clusteros peer authentication v1");
        ClusterKey(mac.finalize().into_bytes().into())
    }

    /// A short, non-secret fingerprint of the key, for logs ("which secret is this node using?").
    pub fn fingerprint(&self) -> String {
        hex(&Sha256::digest(self.0)[..4])
    }

    fn mac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(&framed(parts));
        mac
    }

    fn request_parts(
        method: &str,
        path: &str,
        to: &str,
        time_ms: i64,
        nonce: &str,
        body_sha256: &[u8],
    ) -> [Vec<u8>; 6] {
        [
            method.as_bytes().to_vec(),
            path.as_bytes().to_vec(),
            to.as_bytes().to_vec(),
            time_ms.to_string().into_bytes(),
            nonce.as_bytes().to_vec(),
            body_sha256.to_vec(),
        ]
    }

    /// Signs a request for node `to` (or [`ANY_NODE`]). The nonce must be fresh for every
    /// request (the peer client draws 16 random bytes: [`crate::adapters::peers::new_nonce`]);
    /// tests, seeds and fuzzing pass fixed ones.
    pub fn sign_request(
        &self,
        method: &str,
        path: &str,
        to: &str,
        time_ms: i64,
        nonce: &str,
        body: &[u8],
    ) -> RequestAuth {
        let digest = Sha256::digest(body);
        let parts = Self::request_parts(method, path, to, time_ms, nonce, &digest);
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let signature = hex(&self.mac(&refs).finalize().into_bytes());
        RequestAuth {
            to: to.to_string(),
            time_ms,
            nonce: nonce.to_string(),
            body_sha256: hex(&digest),
            signature,
            from: None,
            node_sig: None,
        }
    }

    /// Checks the signature over the headers, before the body is read (time and replay are the
    /// [`ReplayGuard`]'s job, the body's digest [`ClusterKey::verify_body`]'s).
    pub fn verify_request_head(&self, method: &str, path: &str, auth: &RequestAuth) -> Result<(), AuthError> {
        let sig = unhex(&auth.signature).ok_or(AuthError::BadSignature)?;
        let digest = unhex(&auth.body_sha256).filter(|d| d.len() == 32).ok_or(AuthError::Missing(HDR_BODY))?;
        let parts = Self::request_parts(method, path, &auth.to, auth.time_ms, &auth.nonce, &digest);
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        self.mac(&refs).verify_slice(&sig).map_err(|_| AuthError::BadSignature)
    }

    /// Checks that the body read is the one the verified headers sign.
    pub fn verify_body(&self, auth: &RequestAuth, body: &[u8]) -> Result<(), AuthError> {
        let digest = unhex(&auth.body_sha256).ok_or(AuthError::Missing(HDR_BODY))?;
        if digest.as_slice() != Sha256::digest(body).as_slice() {
            return Err(AuthError::BodyMismatch);
        }
        Ok(())
    }

    /// [`ClusterKey::verify_request_head`], then [`ClusterKey::verify_body`].
    pub fn verify_request(&self, method: &str, path: &str, auth: &RequestAuth, body: &[u8]) -> Result<(), AuthError> {
        self.verify_request_head(method, path, auth)?;
        self.verify_body(auth, body)
    }

    pub fn sign_response(&self, request_nonce: &str, status: u16, body: &[u8]) -> String {
        let status = status.to_string();
        hex(&self
            .mac(&[b"response", request_nonce.as_bytes(), status.as_bytes(), &Sha256::digest(body)])
            .finalize()
            .into_bytes())
    }

    pub fn verify_response(
        &self,
        request_nonce: &str,
        status: u16,
        body: &[u8],
        signature: &str,
    ) -> Result<(), AuthError> {
        let sig = unhex(signature).ok_or(AuthError::BadSignature)?;
        let status = status.to_string();
        self.mac(&[b"response", request_nonce.as_bytes(), status.as_bytes(), &Sha256::digest(body)])
            .verify_slice(&sig)
            .map_err(|_| AuthError::BadSignature)
    }
}

/// The cluster keys of a node: the one it signs with, and the others it accepts while the cluster
/// secret is rotated (configured as `accepted_cluster_secrets`). An answer is signed with the
/// key that verified its request, so a node that knows only one of the two secrets of a rotation
/// still reads it.
#[derive(Clone, Debug)]
pub struct ClusterKeys {
    primary: ClusterKey,
    accepted: Vec<ClusterKey>,
}

impl ClusterKeys {
    pub fn new(secret: &str, accepted: &[String]) -> ClusterKeys {
        ClusterKeys {
            primary: ClusterKey::derive(secret),
            accepted: accepted.iter().map(|s| ClusterKey::derive(s)).collect(),
        }
    }

    /// The key this node signs with.
    pub fn primary(&self) -> &ClusterKey {
        &self.primary
    }

    /// Every key, the primary first.
    pub fn all(&self) -> impl Iterator<Item = &ClusterKey> {
        std::iter::once(&self.primary).chain(&self.accepted)
    }

    /// The fingerprints of every key, the primary first (what a member reports of itself).
    pub fn fingerprints(&self) -> Vec<String> {
        self.all().map(ClusterKey::fingerprint).collect()
    }

    /// The key whose signature the request's headers carry; else the primary key's refusal.
    pub fn verify_request_head(&self, method: &str, path: &str, auth: &RequestAuth) -> Result<&ClusterKey, AuthError> {
        let first = match self.primary.verify_request_head(method, path, auth) {
            Ok(()) => return Ok(&self.primary),
            Err(e) => e,
        };
        self.accepted.iter().find(|k| k.verify_request_head(method, path, auth).is_ok()).ok_or(first)
    }

    /// Checks an answer's signature with every key.
    pub fn verify_response(&self, nonce: &str, status: u16, body: &[u8], signature: &str) -> Result<(), AuthError> {
        if self.all().any(|k| k.verify_response(nonce, status, body, signature).is_ok()) {
            Ok(())
        } else {
            Err(AuthError::BadSignature)
        }
    }
}

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

fn verifying_key(text: &str) -> Option<ed25519_dalek::VerifyingKey> {
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

/// What a node checks of a request's headers before it reads the body: the signature, that the
/// request is for this node, its freshness and that its nonce is new. One per node, shared by all
/// of its listeners (the underlay and the mesh address), so a request replayed to another
/// listener is seen as the replay it is.
#[derive(Debug)]
pub struct Gate {
    pub keys: ClusterKeys,
    guard: ReplayGuard,
    /// This node's id as requests name it.
    me: String,
}

impl Gate {
    pub fn new(keys: ClusterKeys, me: &str) -> Gate {
        Gate { keys, guard: ReplayGuard::default(), me: me.to_string() }
    }

    /// Admits `auth` for `method path` and says who it comes from. `admission`: the route is one
    /// a node uses before it is a member (hello, pledge, join). `any_node`: the route may be
    /// addressed to [`ANY_NODE`] (the sender cannot know which node listens at the address).
    /// `sender` says what this node's membership records of a node id (see the table in the
    /// module comment). The nonce is remembered only for a request that passed every other check.
    #[allow(clippy::too_many_arguments)]
    pub fn admit_head(
        &self,
        method: &str,
        path: &str,
        auth: &RequestAuth,
        channel_key: &str,
        admission: bool,
        any_node: bool,
        now_ms: i64,
        sender: impl FnOnce(NodeId) -> Sender,
    ) -> Result<Origin, AuthError> {
        self.keys.verify_request_head(method, path, auth)?;
        self.admit_verified(method, path, auth, channel_key, admission, any_node, now_ms, sender)
    }

    /// [`Gate::admit_head`] for a request whose MAC the caller has verified already with
    /// [`ClusterKeys::verify_request_head`] (the peer middleware, which signs its answer with the
    /// key that verified).
    #[allow(clippy::too_many_arguments)]
    pub fn admit_verified(
        &self,
        method: &str,
        path: &str,
        auth: &RequestAuth,
        channel_key: &str,
        admission: bool,
        any_node: bool,
        now_ms: i64,
        sender: impl FnOnce(NodeId) -> Sender,
    ) -> Result<Origin, AuthError> {
        if auth.to == ANY_NODE {
            if !any_node {
                return Err(AuthError::Unaddressed(path.to_string()));
            }
        } else if auth.to != self.me {
            return Err(AuthError::WrongDestination { to: auth.to.clone(), me: self.me.clone() });
        }
        let origin = self.origin(method, path, auth, channel_key, admission, sender)?;
        self.guard.check(auth, now_ms)?;
        Ok(origin)
    }

    fn origin(
        &self,
        method: &str,
        path: &str,
        auth: &RequestAuth,
        channel_key: &str,
        admission: bool,
        sender: impl FnOnce(NodeId) -> Sender,
    ) -> Result<Origin, AuthError> {
        let (Some(from), Some(_)) = (&auth.from, &auth.node_sig) else {
            return Err(AuthError::Anonymous(path.to_string()));
        };
        // Signed by the key this connection's TLS handshake proved: another machine cannot relay
        // the request, since it would have to present the sender's key.
        auth.verify_node_sig(method, path, channel_key).map_err(|_| AuthError::NotTheChannelKey(from.clone()))?;
        let id = from.parse::<NodeId>().map_err(|_| AuthError::BadNodeSignature(from.clone()))?;
        match sender(id) {
            Sender::Member { node_key } if node_key.is_empty() => Err(AuthError::NoNodeKey(from.clone())),
            Sender::Member { node_key } if !same_key(&node_key, channel_key) => {
                Err(AuthError::BadNodeSignature(from.clone()))
            }
            Sender::Member { .. } => Ok(Origin::Member(id)),
            Sender::Unjoined => Ok(Origin::SecretHolder),
            Sender::Stranger if admission => Ok(Origin::SecretHolder),
            Sender::Stranger => Err(AuthError::NotAMember(from.clone())),
        }
    }
}

/// Whether two node keys (base64) are the same valid key.
fn same_key(a: &str, b: &str) -> bool {
    matches!((verifying_key(a), verifying_key(b)), (Some(a), Some(b)) if a == b)
}

/// Remembers recently seen nonces so that a captured request cannot be replayed.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    seen: Mutex<HashMap<String, i64>>,
}

impl ReplayGuard {
    /// Checks freshness and records the nonce. `now_ms` is this node's clock.
    pub fn check(&self, auth: &RequestAuth, now_ms: i64) -> Result<(), AuthError> {
        let window = REPLAY_WINDOW.as_millis() as u64;
        // Saturating: a time near the ends of the i64 range is stale, not an overflow.
        let skew = auth.time_ms.saturating_sub(now_ms);
        if skew.unsigned_abs() > window {
            return Err(AuthError::Stale { skew_ms: skew, limit_s: REPLAY_WINDOW.as_secs() });
        }
        let mut seen = self.seen.lock().expect("replay guard lock");
        if seen.len() >= MAX_NONCES / 2 {
            seen.retain(|_, t| now_ms.saturating_sub(*t).unsigned_abs() <= window);
        }
        if seen.len() >= MAX_NONCES {
            return Err(AuthError::Overloaded);
        }
        if seen.insert(auth.nonce.clone(), auth.time_ms).is_some() {
            return Err(AuthError::Replayed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh nonce per call, as the peer client draws them.
    fn nonce() -> String {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        format!("{:032x}", N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    #[test]
    fn request_round_trip_and_tampering() {
        let k = ClusterKey::derive("secret-secret-secret");
        let a = k.sign_request("POST", "/peer/v1/join", "0000000000000001", 1000, &nonce(), b"{}");
        assert_eq!(k.verify_request("POST", "/peer/v1/join", &a, b"{}"), Ok(()));
        assert_eq!(k.verify_request("POST", "/peer/v1/join", &a, b"{ }"), Err(AuthError::BodyMismatch));
        // The headers alone are checked before the body is read: they must carry the proof.
        assert_eq!(k.verify_request_head("POST", "/peer/v1/join", &a), Ok(()));
        let other_body = RequestAuth { body_sha256: body_digest(b"{ }"), ..a.clone() };
        assert_eq!(k.verify_request_head("POST", "/peer/v1/join", &other_body), Err(AuthError::BadSignature));
        let short = RequestAuth { body_sha256: "00ff".into(), ..a.clone() };
        assert_eq!(k.verify_request_head("POST", "/peer/v1/join", &short), Err(AuthError::Missing(HDR_BODY)));
        assert_eq!(k.verify_request("POST", "/peer/v1/leave", &a, b"{}"), Err(AuthError::BadSignature));
        assert_eq!(k.verify_request("GET", "/peer/v1/join", &a, b"{}"), Err(AuthError::BadSignature));
        let shifted = RequestAuth { time_ms: 1001, ..a.clone() };
        assert_eq!(k.verify_request("POST", "/peer/v1/join", &shifted, b"{}"), Err(AuthError::BadSignature));
        let other = ClusterKey::derive("another-secret-entirely");
        assert_eq!(other.verify_request("POST", "/peer/v1/join", &a, b"{}"), Err(AuthError::BadSignature));
        let garbage = RequestAuth { signature: "zz".into(), ..a };
        assert_eq!(k.verify_request("POST", "/peer/v1/join", &garbage, b"{}"), Err(AuthError::BadSignature));
    }

    #[test]
    fn response_round_trip() {
        let k = ClusterKey::derive("secret-secret-secret");
        let s = k.sign_response("n1", 200, b"ok");
        assert_eq!(k.verify_response("n1", 200, b"ok", &s), Ok(()));
        assert_eq!(k.verify_response("n2", 200, b"ok", &s), Err(AuthError::BadSignature));
        assert_eq!(k.verify_response("n1", 500, b"ok", &s), Err(AuthError::BadSignature));
        assert_eq!(
            ClusterKey::derive("x-other-secret-xx").verify_response("n1", 200, b"ok", &s),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn replay_and_staleness_are_refused() {
        let k = ClusterKey::derive("secret-secret-secret");
        let g = ReplayGuard::default();
        let now = 1_000_000;
        let a = k.sign_request("POST", "/p", "0000000000000001", now, &nonce(), b"");
        assert_eq!(g.check(&a, now), Ok(()));
        assert_eq!(g.check(&a, now + 10), Err(AuthError::Replayed));
        let old = k.sign_request("POST", "/p", "0000000000000001", now - 61_000, &nonce(), b"");
        assert!(matches!(g.check(&old, now), Err(AuthError::Stale { .. })));
        let future = k.sign_request("POST", "/p", "0000000000000001", now + 61_000, &nonce(), b"");
        assert!(matches!(g.check(&future, now), Err(AuthError::Stale { .. })));
    }

    /// Found by fuzzing (peer_request): a signed request with time -9223372036854775808
    /// overflowed `time - now` (a panic in debug builds; in release builds a time of exactly
    /// `now + i64::MIN` wrapped to a skew whose `abs()` is negative, and passed as fresh).
    #[test]
    fn extreme_request_times_are_stale_not_an_overflow() {
        let k = ClusterKey::derive("secret-secret-secret");
        let g = ReplayGuard::default();
        let now = 1_750_000_000_000;
        for t in [i64::MIN, i64::MIN + now, i64::MIN + now + 1, i64::MAX, i64::MAX - 1] {
            let a = k.sign_request("POST", "/p", "0000000000000001", t, &nonce(), b"");
            assert!(matches!(g.check(&a, now), Err(AuthError::Stale { .. })), "time {t}");
        }
        let h = AuthHeaders {
            to: Some("*"),
            time: Some("-9223372036854775808"),
            nonce: Some(""),
            body_sha256: Some(""),
            signature: Some(""),
            from: None,
            node_sig: None,
        };
        let a = parse_auth(h).unwrap();
        assert!(matches!(g.check(&a, now), Err(AuthError::Stale { .. })));
        assert!(g.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn auth_headers_are_parsed_in_order() {
        let all = AuthHeaders {
            to: Some("t"),
            time: Some("12"),
            nonce: Some("n"),
            body_sha256: Some("d"),
            signature: Some("s"),
            from: Some("f"),
            node_sig: Some("g"),
        };
        let want = RequestAuth {
            to: "t".into(),
            time_ms: 12,
            nonce: "n".into(),
            body_sha256: "d".into(),
            signature: "s".into(),
            from: Some("f".into()),
            node_sig: Some("g".into()),
        };
        assert_eq!(parse_auth(all), Ok(want));
        // The sender's name and signature are optional: admission requests may lack them.
        let anonymous = parse_auth(AuthHeaders { from: None, node_sig: None, ..all }).unwrap();
        assert_eq!((anonymous.from, anonymous.node_sig), (None, None));
        assert_eq!(parse_auth(AuthHeaders::default()), Err(AuthError::Missing(HDR_TIME)));
        assert_eq!(parse_auth(AuthHeaders { time: Some("x"), ..all }), Err(AuthError::Missing(HDR_TIME)));
        assert_eq!(parse_auth(AuthHeaders { nonce: None, ..all }), Err(AuthError::Missing(HDR_NONCE)));
        assert_eq!(parse_auth(AuthHeaders { body_sha256: None, ..all }), Err(AuthError::Missing(HDR_BODY)));
        assert_eq!(parse_auth(AuthHeaders { to: None, ..all }), Err(AuthError::Missing(HDR_TO)));
        assert_eq!(parse_auth(AuthHeaders { signature: None, ..all }), Err(AuthError::Missing(HDR_AUTH)));
    }

    /// Issue 10, hole 5: a request is signed for one node. Another node refuses it (a captured
    /// forwarded write cannot be replayed at another leader), changing the destination breaks the
    /// signature, a route that needs a destination refuses `*`, and one gate serves every
    /// listener of a node, so the same request at its second listener is a replay.
    #[test]
    fn a_request_is_for_one_node_and_one_gate_guards_its_listeners() {
        let k = ClusterKey::derive("secret-secret-secret");
        let keys = ClusterKeys::new("secret-secret-secret", &[]);
        let now = 1_000_000;
        let (a, b) = (Gate::new(keys.clone(), "000000000000000a"), Gate::new(keys.clone(), "000000000000000b"));
        let me = NodeKey::from_seed(&[3; 32]);
        let members = |_: NodeId| Sender::Member { node_key: me.public() };
        let signed = |path: &str, to: &str| {
            k.sign_request("POST", path, to, now, &nonce(), b"{}").sign_as("POST", path, "000000000000000c", &me)
        };
        let w = signed("/peer/v1/write", "000000000000000a");
        assert_eq!(
            b.admit_head("POST", "/peer/v1/write", &w, &me.public(), false, false, now, members),
            Err(AuthError::WrongDestination { to: "000000000000000a".into(), me: "000000000000000b".into() })
        );
        let readdressed = RequestAuth { to: "000000000000000b".into(), ..w.clone() };
        assert_eq!(
            b.admit_head("POST", "/peer/v1/write", &readdressed, &me.public(), false, false, now, members),
            Err(AuthError::BadSignature)
        );
        let any = signed("/peer/v1/write", ANY_NODE);
        assert_eq!(
            a.admit_head("POST", "/peer/v1/write", &any, &me.public(), false, false, now, members),
            Err(AuthError::Unaddressed("/peer/v1/write".into()))
        );
        // Refusals leave the nonce unrecorded: the right node still takes the request, once.
        assert_eq!(
            a.admit_head("POST", "/peer/v1/write", &w, &me.public(), false, false, now, members),
            Ok(Origin::Member(NodeId(12)))
        );
        let shared = std::sync::Arc::new(a);
        let (underlay, mesh) = (shared.clone(), shared);
        assert_eq!(
            mesh.admit_head("POST", "/peer/v1/write", &w, &me.public(), false, false, now + 5, members),
            Err(AuthError::Replayed)
        );
        let hello = k.sign_request("POST", "/peer/v1/hello", ANY_NODE, now, &nonce(), b"{}").sign_as(
            "POST",
            "/peer/v1/hello",
            "000000000000000c",
            &me,
        );
        let stranger = |_: NodeId| Sender::Stranger;
        let admit_hello =
            |g: &Gate| g.admit_head("POST", "/peer/v1/hello", &hello, &me.public(), true, true, now, stranger);
        assert_eq!(admit_hello(&underlay), Ok(Origin::SecretHolder));
        assert_eq!(admit_hello(&b), Ok(Origin::SecretHolder), "another node's own memory");
    }

    /// A node that missed an admission takes the vouched key of the new member on Raft routes
    /// while its own membership is earlier than the vouched one, and never the key of a node the
    /// later membership does not list or lists without a key.
    #[test]
    fn a_vouched_key_holds_until_this_nodes_membership_is_as_late() {
        use crate::core::raft_types::{LogId, PeerNode, StoredMembership};
        let log = |term: u64, index: u64| LogId::new(openraft::CommittedLeaderId::new(term, NodeId(0)), index);
        let membership = |at: LogId, members: &[(u64, &str)]| {
            let nodes: std::collections::BTreeMap<NodeId, PeerNode> =
                members.iter().map(|(id, key)| (NodeId(*id), PeerNode::new("10.0.0.1:7600", *key))).collect();
            let voters = nodes.keys().copied().collect::<std::collections::BTreeSet<_>>();
            StoredMembership::new(Some(at), openraft::Membership::new(vec![voters], nodes))
        };
        let mine = membership(log(2, 10), &[(1, "k1"), (2, "k2"), (3, "k3")]);
        let theirs = std::collections::BTreeMap::from([
            (NodeId(1), "k1".to_string()),
            (NodeId(4), "k4".to_string()),
            (NodeId(5), String::new()),
        ]);
        let vouch = |mine: &StoredMembership, voucher: u64, key: &str, at: LogId| {
            VouchedKeys::from_answer(mine, NodeId(voucher), key, Some(at), &theirs)
        };
        // Only the later membership's members this node does not list, and only with a key.
        let v = vouch(&mine, 1, "k1", log(2, 12)).unwrap();
        assert_eq!(v.keys, std::collections::BTreeMap::from([(NodeId(4), "k4".into())]));
        assert_eq!(vouch(&mine, 1, "k1", log(2, 10)), None, "not later");
        assert_eq!(vouch(&mine, 1, "k1", log(1, 11)), None, "an earlier term is earlier, whatever its index");
        assert_eq!(vouch(&mine, 9, "k9", log(2, 12)), None, "not a member");
        assert_eq!(vouch(&mine, 1, "k2", log(2, 12)), None, "not with that key");
        assert_eq!(VouchedKeys::from_answer(&mine, NodeId(1), "k1", None, &theirs), None, "no membership");
        // A later term is later, even at a lower index (this node's own entry was never committed).
        assert!(vouch(&mine, 1, "k1", log(3, 8)).is_some());
        // Taken while this node's membership is earlier and still lists the voucher with its key.
        assert_eq!(v.sender(&mine, NodeId(4)), Sender::Member { node_key: "k4".into() });
        assert_eq!(v.sender(&mine, NodeId(6)), Sender::Stranger);
        let caught_up = membership(log(2, 12), &[(1, "k1"), (2, "k2"), (3, "k3"), (4, "k4")]);
        assert_eq!(v.sender(&caught_up, NodeId(4)), Sender::Stranger, "lapses once this node is as late");
        // A voucher this node's log has removed since vouches for nobody any more (a removed
        // node could otherwise keep a key of its own in the door by vouching for it).
        let voucher_removed = membership(log(2, 11), &[(2, "k2"), (3, "k3")]);
        assert_eq!(v.sender(&voucher_removed, NodeId(4)), Sender::Stranger);
        // The later of two vouches is kept.
        let later = VouchedKeys { log_id: log(3, 1), ..v.clone() };
        assert_eq!(v.clone().newer(Some(later.clone())), later);
        assert_eq!(later.clone().newer(Some(v.clone())), later);
        assert_eq!(v.clone().newer(None), v);
    }

    /// Issue 10, design change 1: the secret only admits. Who sent a request is the node whose
    /// key signed it, as this node's membership records it (the table in the module comment).
    #[test]
    fn the_sender_is_the_member_whose_key_signed_it() {
        let k = ClusterKey::derive("secret-secret-secret");
        let now = 1_000_000;
        let gate = Gate::new(ClusterKeys::new("secret-secret-secret", &[]), "000000000000000a");
        let (alice, mallory) = (NodeKey::from_seed(&[1; 32]), NodeKey::from_seed(&[2; 32]));
        let alice_id = "0000000000000001";
        let membership = |id: NodeId| match id.get() {
            1 => Sender::Member { node_key: alice.public() },
            2 => Sender::Member { node_key: String::new() },
            _ => Sender::Stranger,
        };
        let request = |path: &str, from: Option<(&str, &NodeKey)>| {
            let a = k.sign_request("POST", path, "000000000000000a", now, &nonce(), b"{}");
            match from {
                Some((id, key)) => a.sign_as("POST", path, id, key),
                None => a,
            }
        };
        let write = "/peer/v1/write";
        // Over a channel whose TLS handshake proved `channel`.
        let admit_on = |a: &RequestAuth, channel: &NodeKey, admission: bool, sender: &dyn Fn(NodeId) -> Sender| {
            gate.admit_head("POST", &a_path(a, admission), a, &channel.public(), admission, false, now, sender)
        };
        // Over a channel of the key that signed it.
        let admit = |a: &RequestAuth, admission: bool, sender: &dyn Fn(NodeId) -> Sender| {
            let signer = if a.verify_node_sig("POST", &a_path(a, admission), &alice.public()).is_ok() {
                &alice
            } else {
                &mallory
            };
            admit_on(a, signer, admission, sender)
        };
        fn a_path(_: &RequestAuth, admission: bool) -> String {
            if admission { "/peer/v1/join".into() } else { "/peer/v1/write".into() }
        }
        // A member's own signature: its request is its.
        assert_eq!(admit(&request(write, Some((alice_id, &alice))), false, &membership), Ok(Origin::Member(NodeId(1))));
        // A holder of the secret signing as alice with another key; alice's signature over
        // another sender name; and a signature of no known member: all refused.
        assert_eq!(
            admit(&request(write, Some((alice_id, &mallory))), false, &membership),
            Err(AuthError::BadNodeSignature(alice_id.into()))
        );
        // (Renamed, the signature verifies with no key, alice's channel's included.)
        let renamed = RequestAuth { from: Some("0000000000000003".into()), ..request(write, Some((alice_id, &alice))) };
        assert_eq!(
            admit_on(&renamed, &alice, false, &membership),
            Err(AuthError::NotTheChannelKey("0000000000000003".into()))
        );
        // A removed node knows the secret and its own key, but is no member: refused on member
        // routes; it may still discover and ask to join (as a new node) on admission routes.
        let removed = request(write, Some(("0000000000000009", &mallory)));
        assert_eq!(admit(&removed, false, &membership), Err(AuthError::NotAMember("0000000000000009".into())));
        let removed_join = request("/peer/v1/join", Some(("0000000000000009", &mallory)));
        assert_eq!(admit(&removed_join, true, &membership), Ok(Origin::SecretHolder));
        // No sender at all: refused everywhere (the agent signs every request, and the signature
        // is what binds a request to its TLS channel).
        assert_eq!(admit(&request(write, None), false, &membership), Err(AuthError::Anonymous(write.into())));
        let join = "/peer/v1/join";
        assert_eq!(admit(&request(join, None), true, &membership), Err(AuthError::Anonymous(join.into())));
        // Design change 2: a request signed by one key over a channel of another was relayed
        // (a holder of the secret in the middle): refused, whether the signer is a member or a
        // joiner, and on a node in no cluster yet too.
        let alices = request(write, Some((alice_id, &alice)));
        assert_eq!(admit_on(&alices, &mallory, false, &membership), Err(AuthError::NotTheChannelKey(alice_id.into())));
        let joiner = request(join, Some(("0000000000000009", &alice)));
        assert_eq!(
            admit_on(&joiner, &mallory, true, &membership),
            Err(AuthError::NotTheChannelKey("0000000000000009".into()))
        );
        assert_eq!(
            admit_on(&alices, &mallory, false, &|_| Sender::Unjoined),
            Err(AuthError::NotTheChannelKey(alice_id.into()))
        );
        // A member recorded without a key (an agent from before node keys) is refused.
        assert_eq!(
            admit(&request(write, Some(("0000000000000002", &mallory))), false, &membership),
            Err(AuthError::NoNodeKey("0000000000000002".into()))
        );
        // A member's signature is checked on admission routes too.
        assert_eq!(
            admit(&request("/peer/v1/join", Some((alice_id, &mallory))), true, &membership),
            Err(AuthError::BadNodeSignature(alice_id.into()))
        );
        // A node in no cluster yet knows no keys: the secret is all it checks.
        assert_eq!(
            admit(&request(write, Some(("0000000000000009", &mallory))), false, &|_| Sender::Unjoined),
            Ok(Origin::SecretHolder)
        );
        // The node signature covers the body digest and the destination, as the MAC does.
        let signed = request(write, Some((alice_id, &alice)));
        let other_body = RequestAuth { body_sha256: body_digest(b"[]"), ..signed.clone() };
        assert_eq!(
            other_body.verify_node_sig("POST", write, &alice.public()),
            Err(AuthError::BadNodeSignature(alice_id.into()))
        );
        assert_eq!(
            signed.verify_node_sig("POST", "/peer/v1/read", &alice.public()),
            Err(AuthError::BadNodeSignature(alice_id.into()))
        );
        assert_eq!(signed.verify_node_sig("POST", write, &alice.public()), Ok(()));
        assert!(is_node_key(&alice.public()) && !is_node_key("not a key") && !is_node_key(""));
        assert!(!format!("{alice:?}").contains(&hex(&[1; 32])), "the private key is not in Debug output");
    }

    /// Rotating the cluster secret: a node that signs with the new secret and still accepts the
    /// old one takes requests signed with either, and answers each with the key that verified
    /// it, so a node that knows only one of them reads the answer.
    #[test]
    fn a_node_accepts_the_secrets_of_a_rotation_and_answers_in_the_requests_key() {
        let (old, new) = ("old-secret-old-secret", "new-secret-new-secret");
        let rotating = ClusterKeys::new(new, &[old.to_string()]);
        let only_old = ClusterKeys::new(old, &[]);
        let a = only_old.primary().sign_request("POST", "/peer/v1/hello", ANY_NODE, 1, &nonce(), b"{}");
        let key = rotating.verify_request_head("POST", "/peer/v1/hello", &a).expect("the old secret is accepted");
        assert_eq!(key.fingerprint(), only_old.primary().fingerprint());
        let answer = key.sign_response(&a.nonce, 200, b"{}");
        assert_eq!(only_old.verify_response(&a.nonce, 200, b"{}", &answer), Ok(()));
        assert_eq!(rotating.verify_response(&a.nonce, 200, b"{}", &answer), Ok(()));
        assert_eq!(
            rotating.fingerprints(),
            [ClusterKey::derive(new).fingerprint(), ClusterKey::derive(old).fingerprint()]
        );
        // A third secret is neither.
        let other = ClusterKeys::new("other-secret-other-secret", &[]);
        let b = other.primary().sign_request("POST", "/peer/v1/hello", ANY_NODE, 1, &nonce(), b"{}");
        assert_eq!(rotating.verify_request_head("POST", "/peer/v1/hello", &b).err(), Some(AuthError::BadSignature));
        assert_eq!(
            only_old.verify_response(&b.nonce, 200, b"{}", &other.primary().sign_response(&b.nonce, 200, b"{}")),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn nonce_memory_is_bounded() {
        let g = ReplayGuard::default();
        let k = ClusterKey::derive("secret-secret-secret");
        // Old entries are pruned once the table is half full.
        for i in 0..(MAX_NONCES / 2 + 10) {
            let a = RequestAuth {
                to: ANY_NODE.into(),
                time_ms: 0,
                nonce: format!("{}", i),
                body_sha256: String::new(),
                signature: String::new(),
                from: None,
                node_sig: None,
            };
            g.check(&a, 0).unwrap();
        }
        let fresh = k.sign_request("POST", "/p", "0000000000000001", 120_000, &nonce(), b"");
        assert_eq!(g.check(&fresh, 120_000), Ok(()));
        assert!(g.seen.lock().unwrap().len() < 10);
    }

    #[test]
    fn fingerprint_differs_per_secret_and_hides_the_key() {
        let a = ClusterKey::derive("secret-secret-secret");
        let b = ClusterKey::derive("secret-secret-secreT");
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint().len(), 8);
        assert_eq!(format!("{a:?}"), "ClusterKey(..)");
    }
}
