//! The client side of the peer API, behind the narrow [`Peers`] trait: a JSON body posted to a
//! path on a node, its JSON answer. [`PeerClient`] is the real one (HTTPS with this node's key,
//! the server's key pinned to the membership's when the call is for a member; every request
//! signed with the cluster key and the node key and every response verified, every call bounded
//! by a timeout);
//! [`FakePeers`] answers from functions in the test, so the runtime's formation and forwarding
//! are tested without processes. The runtime and the Raft network hold a [`PeerHandle`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::core::auth::{
    ANY_NODE, ClusterKeys, HDR_AUTH, HDR_BODY, HDR_FROM, HDR_NODE_SIG, HDR_NONCE, HDR_TIME, HDR_TO, NodeKey,
};
use crate::core::state::NodeId;
use crate::proto::{ErrorBody, ErrorKind, MAX_ANSWER_BYTES, MAX_MESSAGE_CHARS, printable};

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// `maybe_delivered`: the failure came after the request may have been sent (not while
    /// connecting), so the other side may have acted on it.
    #[error("cannot reach {addr}: {message}")]
    Unreachable { addr: String, message: String, maybe_delivered: bool },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr} refused this node: {message}")]
    Refused { addr: String, message: String },
    #[error("{addr} answered with a signature that does not verify: it uses a different cluster secret")]
    BadResponseSignature { addr: String },
    #[error(
        "{addr} answered without the node signature of {node}, the node the request was for: another holder of the cluster secret answered there (or {node} was reinstalled with a new key)"
    )]
    BadNodeSignature { addr: String, node: String },
    #[error("{addr}: {message}")]
    Remote { addr: String, status: u16, kind: ErrorKind, message: String },
    #[error("{addr} sent an answer that cannot be decoded: {message}")]
    Decode { addr: String, message: String },
}

impl PeerError {
    /// Authentication failures: the other side does not share our cluster secret.
    pub fn is_auth(&self) -> bool {
        matches!(self, PeerError::Refused { .. } | PeerError::BadResponseSignature { .. })
    }

    /// The call failed without an answer, but the other side may have received the request and
    /// acted on it: retrying a request that is not idempotent could apply it twice.
    pub fn maybe_delivered(&self) -> bool {
        match self {
            // An answer that cannot be decoded came from a node that read the request.
            PeerError::Timeout { .. } | PeerError::Decode { .. } => true,
            PeerError::Unreachable { maybe_delivered, .. } => *maybe_delivered,
            _ => false,
        }
    }
}

/// A fresh request nonce: 16 random bytes from the OS, in hex.
pub fn new_nonce() -> String {
    use rand::RngCore;
    let mut n = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n.iter().map(|b| format!("{b:02x}")).collect()
}

/// The node keys this node's Raft membership records, for checking who answered: set once Raft
/// runs ([`MemberKeys::follow`]); until then, and for a node not in that membership, an answer is
/// checked by the cluster secret's MAC alone.
#[derive(Clone, Debug, Default)]
pub struct MemberKeys(Arc<std::sync::OnceLock<tokio::sync::watch::Receiver<crate::core::raft_types::RaftMetrics>>>);

impl MemberKeys {
    /// Follows the membership in `metrics` (Raft's metrics channel) from now on.
    pub fn follow(&self, metrics: tokio::sync::watch::Receiver<crate::core::raft_types::RaftMetrics>) {
        let _ = self.0.set(metrics);
    }

    /// The node key the membership records for `id`, if it records one.
    pub fn key_of(&self, id: NodeId) -> Option<String> {
        let m = self.0.get()?.borrow().membership_config.clone();
        match crate::core::auth::sender_in(m.membership(), id) {
            crate::core::auth::Sender::Member { node_key } if !node_key.is_empty() => Some(node_key),
            _ => None,
        }
    }
}

/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct PeerClient {
    http: Arc<Clients>,
    keys: ClusterKeys,
    /// This node's id as requests name it, and the key that signs them.
    me: String,
    node_key: NodeKey,
    members: MemberKeys,
}

/// The HTTPS clients of a node: one per server key it pins (a member's, as the membership
/// records it), and one for calls to an address whose node it cannot know (discovery, joining,
/// a member recorded without a key). A client's TLS configuration is fixed when it is built.
#[derive(Debug)]
struct Clients {
    node_key: NodeKey,
    by_pin: std::sync::Mutex<std::collections::HashMap<Option<[u8; 32]>, reqwest::Client>>,
}

/// More pinned keys than a cluster has members: the clients of removed members are dropped
/// (with their idle connections) when the map reaches it.
const MAX_CLIENTS: usize = 1024;

impl Clients {
    fn get(&self, pin: Option<[u8; 32]>) -> reqwest::Client {
        let mut by_pin = self.by_pin.lock().expect("peer clients lock");
        if let Some(c) = by_pin.get(&pin) {
            return c.clone();
        }
        if by_pin.len() >= MAX_CLIENTS {
            by_pin.clear();
        }
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(crate::adapters::tls::client_config(&self.node_key, pin))
            .connect_timeout(Duration::from_secs(3))
            // Shorter than the server's idle timeout (`server::accept::Limits::PEER`, 20 s), so
            // a pooled connection is not reused just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(15))
            // A redirect would carry the signed headers elsewhere; peers never send one.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("an HTTPS client with a preconfigured rustls builds");
        by_pin.insert(pin, http.clone());
        http
    }
}

impl PeerClient {
    /// A client that proves the cluster secret (`keys`' primary; answers may be signed with any
    /// of them) and signs as node `me` with `node_key`, over TLS with that key; a call to a node
    /// `members` knows takes only that node's key in the TLS handshake, and its answer must carry
    /// that node's signature.
    pub fn new(keys: ClusterKeys, me: NodeId, node_key: NodeKey, members: MemberKeys) -> PeerClient {
        let http = Arc::new(Clients { node_key: node_key.clone(), by_pin: Default::default() });
        PeerClient { http, keys, me: me.to_string(), node_key, members }
    }

    /// POSTs the call's JSON body to `https://{addr}{path}`: the verified answer's bytes.
    async fn post(&self, call: PeerCall<'_>) -> Result<Vec<u8>, PeerError> {
        let (addr, timeout) = (call.addr, call.timeout);
        match tokio::time::timeout(timeout, self.call_raw(call)).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::Timeout { addr: addr.into(), timeout }),
        }
    }

    async fn call_raw(&self, PeerCall { addr, to: to_id, path, body, .. }: PeerCall<'_>) -> Result<Vec<u8>, PeerError> {
        let to = to_id.map_or_else(|| ANY_NODE.to_string(), |id| id.to_string());
        let auth = self
            .keys
            .primary()
            .sign_request("POST", path, &to, crate::now_ms() as i64, &new_nonce(), &body)
            .sign_as("POST", path, &self.me, &self.node_key);
        // The membership's key of the node the call is for: the TLS handshake takes no other. A
        // recorded key that is not one (apply validates keys, so only a corrupt state) must not
        // turn the pin off: nothing is sent.
        let pinned = to_id.and_then(|id| self.members.key_of(id));
        let pin = match pinned.as_deref().map(crate::core::auth::node_key_bytes) {
            Some(None) => return Err(PeerError::BadNodeSignature { addr: addr.into(), node: to }),
            Some(Some(k)) => Some(k),
            None => None,
        };
        let resp = self
            .http
            .get(pin)
            .post(format!("https://{addr}{path}"))
            .header("content-type", "application/json")
            .header(HDR_TIME, auth.time_ms.to_string())
            .header(HDR_NONCE, &auth.nonce)
            .header(HDR_BODY, &auth.body_sha256)
            .header(HDR_TO, &auth.to)
            .header(HDR_AUTH, &auth.signature)
            .header(HDR_FROM, &self.me)
            .header(HDR_NODE_SIG, auth.node_sig.as_deref().unwrap_or_default())
            .body(body)
            .send()
            .await
            .map_err(|e| {
                if crate::adapters::tls::is_wrong_server_key(&e) {
                    // Another machine at the member's address (or the member reinstalled with a
                    // new key): nothing was sent.
                    PeerError::BadNodeSignature { addr: addr.into(), node: to.clone() }
                } else {
                    PeerError::Unreachable {
                        addr: addr.into(),
                        message: error_chain(&e),
                        maybe_delivered: !e.is_connect(),
                    }
                }
            })?;
        let status = resp.status().as_u16();
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let (sig, node_sig) = (header(HDR_AUTH), header(HDR_NODE_SIG));
        let bytes = read_bounded(addr, resp).await?;
        if status == 401 {
            // Unsigned (the other side does not share our key): shown only as printable text.
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            let message = format!("{} (unsigned answer)", printable(&message, MAX_MESSAGE_CHARS));
            return Err(PeerError::Refused { addr: addr.into(), message });
        }
        let verified = sig.is_some_and(|s| self.keys.verify_response(&auth.nonce, status, &bytes, &s).is_ok());
        if !verified {
            return Err(PeerError::BadResponseSignature { addr: addr.into() });
        }
        // The node the request was for answered itself, not another holder of the secret (the
        // TLS handshake proved its key already; the signature binds the answer to the request).
        if let Some(key) = pinned {
            let signed = node_sig.is_some_and(|s| {
                crate::core::auth::verify_node_response(&key, &auth.nonce, status, &bytes, &to, &s).is_ok()
            });
            if !signed {
                return Err(PeerError::BadNodeSignature { addr: addr.into(), node: to });
            }
        }
        if !(200..300).contains(&status) {
            let (kind, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.kind, b.error),
                Err(_) => (ErrorKind::Unknown, String::from_utf8_lossy(&bytes).into_owned()),
            };
            let message = printable(&message, MAX_MESSAGE_CHARS);
            return Err(PeerError::Remote { addr: addr.into(), status, kind, message });
        }
        Ok(bytes)
    }
}

/// Reads an answer's body, refusing one over [`MAX_ANSWER_BYTES`] (by its declared length before
/// reading, or as soon as it grows past the limit).
async fn read_bounded(addr: &str, mut resp: reqwest::Response) -> Result<Vec<u8>, PeerError> {
    let too_large = || PeerError::Decode {
        addr: addr.into(),
        message: format!("the answer is larger than {MAX_ANSWER_BYTES} bytes; it was not read"),
    };
    if resp.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    loop {
        let chunk = resp.chunk().await.map_err(|e| PeerError::Unreachable {
            addr: addr.into(),
            message: error_chain(&e),
            maybe_delivered: true,
        })?;
        let Some(chunk) = chunk else { return Ok(bytes) };
        if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        bytes.extend_from_slice(&chunk);
    }
}

fn decode<Resp: DeserializeOwned>(addr: &str, bytes: &[u8]) -> Result<Resp, PeerError> {
    serde_json::from_slice(bytes)
        .map_err(|e| PeerError::Decode { addr: addr.into(), message: printable(&e.to_string(), MAX_MESSAGE_CHARS) })
}

/// One request to a peer.
#[derive(Debug)]
pub struct PeerCall<'a> {
    /// Where it goes: `host:port`.
    pub addr: &'a str,
    /// The node it is for (`None`: whichever node answers at `addr`; discovery and joining only).
    pub to: Option<NodeId>,
    /// The route, one of [`crate::proto::paths`].
    pub path: &'a str,
    /// The JSON body.
    pub body: Vec<u8>,
    /// How long the whole exchange may take.
    pub timeout: Duration,
}

/// The future of one [`Peers::exchange`].
pub type Exchange<'a> = Pin<Box<dyn Future<Output = Result<Vec<u8>, PeerError>> + Send + 'a>>;

/// What the runtime needs from the peer API's client.
pub trait Peers: Send + Sync + 'static {
    /// POSTs the call's JSON body to its path on the node at its address, addressed to its node
    /// (`None`: whichever node answers there, for the routes that allow it:
    /// [`crate::proto::paths::accepts_any_node`]), and gives the JSON answer, or why there is none
    /// (an error answer, a refusal, no answer within the call's timeout).
    fn exchange<'a>(&'a self, call: PeerCall<'a>) -> Exchange<'a>;
}

impl Peers for PeerClient {
    fn exchange<'a>(&'a self, call: PeerCall<'a>) -> Exchange<'a> {
        Box::pin(self.post(call))
    }
}

/// A shared [`Peers`] with typed calls. Cheap to clone.
#[derive(Clone)]
pub struct PeerHandle(Arc<dyn Peers>);

impl std::fmt::Debug for PeerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerHandle(..)")
    }
}

impl PeerHandle {
    pub fn new(peers: impl Peers) -> PeerHandle {
        PeerHandle(Arc::new(peers))
    }

    /// Sends `req` as JSON to `path` on node `to` at `addr` and decodes the JSON answer.
    pub async fn call<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        to: NodeId,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let body = serde_json::to_vec(req).expect("request types serialize");
        decode(addr, &self.0.exchange(PeerCall { addr, to: Some(to), path, body, timeout }).await?)
    }

    /// [`PeerHandle::call`] to whichever node answers at `addr` (discovery and joining only).
    pub async fn call_any<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let body = serde_json::to_vec(req).expect("request types serialize");
        decode(addr, &self.0.exchange(PeerCall { addr, to: None, path, body, timeout }).await?)
    }
}

/// Peers that answer from functions of the test, by address and path; every call is recorded.
/// A call to an address or path without an answer fails as an unreachable node does.
#[cfg(test)]
#[derive(Clone, Default)]
pub struct FakePeers {
    routes: Arc<std::sync::Mutex<std::collections::BTreeMap<(String, String), FakeRoute>>>,
    /// Every call: (address, path, request body as JSON).
    pub calls: Arc<std::sync::Mutex<Vec<(String, String, serde_json::Value)>>>,
}

#[cfg(test)]
type FakeRoute = Arc<dyn Fn(&[u8]) -> Result<Vec<u8>, PeerError> + Send + Sync>;

#[cfg(test)]
impl FakePeers {
    /// Answers `path` on `addr` with `f(request)`.
    pub fn answer<Req, Resp, F>(&self, addr: &str, path: &str, f: F)
    where
        Req: DeserializeOwned,
        Resp: Serialize,
        F: Fn(Req) -> Result<Resp, PeerError> + Send + Sync + 'static,
    {
        let a = addr.to_string();
        let route: FakeRoute = Arc::new(move |body: &[u8]| {
            let req: Req = serde_json::from_slice(body).map_err(|e| PeerError::Remote {
                addr: a.clone(),
                status: 400,
                kind: ErrorKind::BadRequest,
                message: e.to_string(),
            })?;
            Ok(serde_json::to_vec(&f(req)?).expect("answers serialize"))
        });
        self.routes.lock().expect("routes lock").insert((addr.into(), path.into()), route);
    }

    /// The calls made to `path`, in order: (address, request).
    pub fn calls_to(&self, path: &str) -> Vec<(String, serde_json::Value)> {
        let calls = self.calls.lock().expect("calls lock");
        calls.iter().filter(|(_, p, _)| p == path).map(|(a, _, b)| (a.clone(), b.clone())).collect()
    }
}

#[cfg(test)]
impl Peers for FakePeers {
    fn exchange<'a>(&'a self, PeerCall { addr, to, path, body, .. }: PeerCall<'a>) -> Exchange<'a> {
        // What the real server would refuse, the fake refuses too (a test that forgets the
        // destination fails here, not only against real agents).
        if to.is_none() && !crate::proto::paths::accepts_any_node(path) {
            panic!("a call to {path} on {addr} names no node: the peer API refuses it");
        }
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        self.calls.lock().expect("calls lock").push((addr.into(), path.into(), json));
        let route = self.routes.lock().expect("routes lock").get(&(addr.to_string(), path.to_string())).cloned();
        Box::pin(async move {
            match route {
                Some(f) => f(&body),
                None => Err(PeerError::Unreachable {
                    addr: addr.into(),
                    message: format!("no fake answer for {path}"),
                    maybe_delivered: false,
                }),
            }
        })
    }
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> PeerHandle {
        PeerHandle::new(PeerClient::new(
            ClusterKeys::new("transport-test-secret", &[]),
            NodeId(1),
            NodeKey::from_seed(&[7; 32]),
            MemberKeys::default(),
        ))
    }

    #[tokio::test]
    async fn a_refused_connection_was_not_delivered() {
        // Bind, learn the port, close: nothing listens there any more.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let e = client()
            .call::<_, serde_json::Value>(&addr, NodeId(1), "/peer/v1/x", &(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, PeerError::Unreachable { .. }), "{e:?}");
        assert!(!e.maybe_delivered(), "a connection that was never made cannot have delivered: {e:?}");
    }

    /// The key the test servers present in TLS (node 1's in the tests' membership-less client).
    fn server_key() -> NodeKey {
        NodeKey::from_seed(&[8; 32])
    }

    type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

    /// A peer server on a fresh port: each connection finishes a TLS handshake as a node with
    /// `key` and is handed to `serve`. Returns the address.
    async fn tls_server<F, Fut>(key: NodeKey, serve: F) -> String
    where
        F: Fn(TlsStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let acceptor = tokio_rustls::TlsAcceptor::from(crate::adapters::tls::server_config(&key));
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (acceptor, serve) = (acceptor.clone(), serve.clone());
                tokio::spawn(async move {
                    if let Ok(t) = acceptor.accept(s).await {
                        serve(t).await;
                    }
                });
            }
        });
        addr
    }

    /// A server that reads the request, then never answers (`hang`) or hangs up without an
    /// answer.
    async fn reading_server(hang: bool) -> String {
        tls_server(server_key(), move |mut s| async move {
            let mut buf = vec![0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
            if hang {
                std::future::pending::<()>().await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn a_request_without_an_answer_may_have_been_delivered() {
        let addr = reading_server(true).await;
        let e = client()
            .call::<_, serde_json::Value>(&addr, NodeId(1), "/peer/v1/x", &(), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, PeerError::Timeout { .. }), "{e:?}");
        assert!(e.maybe_delivered());
    }

    #[tokio::test]
    async fn a_connection_closed_after_the_request_may_have_been_delivered() {
        let addr = reading_server(false).await;
        let e = client()
            .call::<_, serde_json::Value>(&addr, NodeId(1), "/peer/v1/x", &(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, PeerError::Unreachable { .. }), "{e:?}");
        assert!(e.maybe_delivered(), "{e:?}");
    }

    /// A server that answers every connection with `answer` (raw HTTP), counting connections.
    async fn answering_server(answer: Vec<u8>) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let h = hits.clone();
        let addr = tls_server(server_key(), move |mut s| {
            h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer = answer.clone();
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 64 * 1024];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(&answer).await;
                // An endless body: keep sending until the client hangs up.
                if answer.ends_with(b"\r\n\r\n") && answer.starts_with(b"HTTP/1.1 200 OK\r\ntransfer-encoding") {
                    let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, "x".repeat(1 << 20));
                    while s.write_all(chunk.as_bytes()).await.is_ok() {}
                }
                let _ = s.flush().await;
            }
        })
        .await;
        (addr, hits)
    }

    /// A server whose TLS key is `key` that answers `{}` with a correct cluster MAC over the
    /// request's nonce and the node signature of `key` as `responder`; counts the requests it
    /// read.
    async fn node_server(key: NodeKey, responder: &'static str) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = read.clone();
        let addr = tls_server(key.clone(), move |mut s| {
            let (key, r) = (key.clone(), r.clone());
            async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 64 * 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                if n > 0 {
                    r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let nonce = head
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{HDR_NONCE}: ")))
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                let mac =
                    crate::core::auth::ClusterKey::derive("transport-test-secret").sign_response(&nonce, 200, b"{}");
                let sig = key.sign_response(&nonce, 200, b"{}", responder);
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n{HDR_AUTH}: {mac}\r\n{HDR_NODE_SIG}: {sig}\r\n\r\n{{}}"
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.flush().await;
            }
        })
        .await;
        (addr, read)
    }

    /// Issue 10, design change 1: an answer from a member must carry that member's node
    /// signature, so a holder of the secret at its address cannot answer for it (a forged
    /// append "success" would let a leader commit without a quorum).
    #[tokio::test]
    async fn an_answer_for_a_member_must_be_signed_by_that_member() {
        use crate::core::raft_types::{PeerNode, RaftMetrics};
        let member = NodeKey::from_seed(&[2; 32]);
        let mut metrics = RaftMetrics::new_initial(NodeId(1));
        let nodes = std::collections::BTreeMap::from([
            (NodeId(1), PeerNode::new("127.0.0.1:1", NodeKey::from_seed(&[7; 32]).public())),
            (NodeId(2), PeerNode::new("127.0.0.1:2", member.public())),
            (NodeId(3), PeerNode::new("127.0.0.1:3", "not a key")),
        ]);
        let membership = openraft::Membership::new(vec![[NodeId(1), NodeId(2), NodeId(3)].into()], nodes);
        metrics.membership_config = Arc::new(openraft::StoredMembership::new(None, membership));
        let (_tx, rx) = tokio::sync::watch::channel(metrics);
        let members = MemberKeys::default();
        members.follow(rx);
        let client = PeerHandle::new(PeerClient::new(
            ClusterKeys::new("transport-test-secret", &[]),
            NodeId(1),
            NodeKey::from_seed(&[7; 32]),
            members,
        ));
        let call = |addr: String, to: NodeId| {
            let client = client.clone();
            async move { client.call::<_, serde_json::Value>(&addr, to, "/peer/v1/x", &(), Duration::from_secs(5)).await }
        };
        let to2 = "0000000000000002";
        // Node 2 itself answers.
        let (addr, _) = node_server(member.clone(), to2).await;
        assert!(call(addr, NodeId(2)).await.is_ok());
        // A holder of the secret with another key: the TLS handshake fails on the pinned key,
        // before a byte of the request reaches it (design change 2).
        let (addr, read) = node_server(NodeKey::from_seed(&[9; 32]), to2).await;
        let e = call(addr, NodeId(2)).await.unwrap_err();
        assert!(matches!(&e, PeerError::BadNodeSignature { node, .. } if node == to2), "{e:?}");
        assert!(!e.maybe_delivered(), "{e:?}");
        assert_eq!(read.load(std::sync::atomic::Ordering::SeqCst), 0, "the request reached another key");
        // Node 2's key signing an answer for another name.
        let (addr, _) = node_server(member.clone(), "0000000000000003").await;
        let e = call(addr, NodeId(2)).await.unwrap_err();
        assert!(matches!(e, PeerError::BadNodeSignature { .. }), "{e:?}");
        // A member recorded with a key that is not one: refused before anything is sent (the
        // pin is not dropped).
        let (addr, read) = node_server(member.clone(), "0000000000000003").await;
        let e = call(addr, NodeId(3)).await.unwrap_err();
        assert!(matches!(&e, PeerError::BadNodeSignature { .. }), "{e:?}");
        assert_eq!(read.load(std::sync::atomic::Ordering::SeqCst), 0, "sent without a pin");
        // A node this membership does not know: any key in TLS, and the secret's MAC.
        let (addr, _) = node_server(NodeKey::from_seed(&[9; 32]), "0000000000000005").await;
        assert!(call(addr, NodeId(5)).await.is_ok());
    }

    #[tokio::test]
    async fn redirects_are_not_followed() {
        // Issue 10, hole 6: a redirect would carry the signed headers to another listener.
        let (elsewhere, hits) = answering_server(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec()).await;
        let redirect = format!(
            "HTTP/1.1 307 Temporary Redirect\r\nlocation: https://{elsewhere}/peer/v1/x\r\ncontent-length: 0\r\n\r\n"
        );
        let (addr, _) = answering_server(redirect.into_bytes()).await;
        let e = client()
            .call::<_, serde_json::Value>(&addr, NodeId(1), "/peer/v1/x", &(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(e, PeerError::BadResponseSignature { .. }), "{e:?}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0, "the redirect was followed");
    }

    #[tokio::test]
    async fn an_unsigned_refusal_is_shown_as_short_printable_text() {
        let body = format!("\u{1b}[2J\u{1b}]0;owned\u{7}evil\r\nline{}", "y".repeat(100_000));
        let answer = format!("HTTP/1.1 401 Unauthorized\r\ncontent-length: {}\r\n\r\n{body}", body.len());
        let (addr, _) = answering_server(answer.into_bytes()).await;
        let e = client()
            .call::<_, serde_json::Value>(&addr, NodeId(1), "/peer/v1/x", &(), Duration::from_secs(5))
            .await
            .unwrap_err();
        let PeerError::Refused { message, .. } = &e else { panic!("{e:?}") };
        assert!(!message.chars().any(char::is_control), "{message:?}");
        assert!(message.starts_with("?[2J?]0;owned?evil??line"), "{message:?}");
        assert!(message.chars().count() < MAX_MESSAGE_CHARS + 40, "{} chars", message.chars().count());
    }

    #[tokio::test]
    async fn an_oversized_answer_is_refused_without_reading_it_all() {
        let declared = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 100u64 << 30);
        let (addr, _) = answering_server(declared.into_bytes()).await;
        let e = client()
            .call::<_, serde_json::Value>(&addr, NodeId(1), "/peer/v1/x", &(), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
        // Chunked without end: refused once past the limit, not after the timeout.
        let endless = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let (addr, _) = answering_server(endless).await;
        let e = client()
            .call::<_, serde_json::Value>(&addr, NodeId(1), "/peer/v1/x", &(), Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("larger than"), "{e}");
    }
}
