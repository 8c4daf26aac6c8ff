//! TLS 1.3 for the peer API (issue 10, design change 2): every connection between nodes is
//! encrypted from its first byte, and both ends prove their node key (the Ed25519 key that the
//! Raft membership commits, [`NodeKey`]) as an RFC 7250 raw public key. There are no
//! certificates and no CA: who a key belongs to is the membership's business.
//!
//! - The server presents its node key and asks every client for its own (mandatory): it takes any
//!   valid Ed25519 key here, because a node that joins has a key no member knows yet. The key the
//!   handshake proved goes with every request of the connection ([`ChannelKey`]), and the peer
//!   API's gate ([`crate::core::auth::Gate`]) requires each request's node signature to be made
//!   with that key and, for a member, that key to be the one its membership records. A holder of
//!   the secret in the middle therefore cannot relay a node's requests: it would have to present
//!   that node's key, whose private half it lacks.
//! - The client pins the server's key to the one the membership records when it calls a member
//!   ([`client_config`] with `Some(key)`): a machine in the middle, or another machine at a
//!   member's address, fails the handshake before a byte of the request is sent. A call to an
//!   address whose node it cannot know (discovery, joining, formation pledges, and the fallback
//!   of `runtime::member` when a member's address answers with another key) takes any key, so
//!   whoever answers there reads it (such calls carry a node's public facts only: name,
//!   addresses, public keys), and its answer counts only with the cluster secret's MAC over the
//!   request's nonce (see [`crate::adapters::peers`]).
//!
//! Session resumption is off on both sides (a resumed session would skip the key proof; peers
//! keep their connections alive instead), and only TLS 1.3 with the ring provider's suites is
//! offered. `/metrics` stays plain HTTP (`server::accept` without a TLS config).
//!
//! Must not: decide what a key may do (the gate and [`crate::core::permissions`] do).

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, Signer, SigningKey};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureAlgorithm,
    SignatureScheme,
};

use crate::core::auth::{NodeKey, node_key_text};

/// The DER of an Ed25519 SubjectPublicKeyInfo (RFC 8410) up to the key's 32 bytes.
const ED25519_SPKI_PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];

/// The node key the TLS handshake of a connection proved (base64, as the membership records
/// keys): the server side puts it on every request of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelKey(pub String);

/// The SubjectPublicKeyInfo (DER) of an Ed25519 public key: a node's raw public key in TLS.
pub fn spki(public: &[u8; 32]) -> Vec<u8> {
    let mut der = ED25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(public);
    der
}

/// The Ed25519 key of a raw public key (DER SubjectPublicKeyInfo), if it is exactly one and a
/// valid point; anything else (another algorithm, trailing bytes, an X.509 certificate) is not.
pub fn key_of_spki(der: &[u8]) -> Option<[u8; 32]> {
    let key: [u8; 32] = der.strip_prefix(&ED25519_SPKI_PREFIX)?.try_into().ok()?;
    ed25519_dalek::VerifyingKey::from_bytes(&key).ok()?;
    Some(key)
}

/// The node key (base64) the peer proved in a finished handshake: the first, and only, entry of
/// `peer_certificates()` of a raw-public-key connection.
pub fn peer_key(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs?.first().and_then(|c| key_of_spki(c.as_ref())).map(|k| node_key_text(&k))
}

/// Whether `e` (or an error it wraps) is the client refusing a server's key that is not the
/// pinned one: the node at the address is not the member the call was for.
pub fn is_wrong_server_key(e: &(dyn std::error::Error + 'static)) -> bool {
    let wrong = |t: &Error| matches!(t, Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<Error>().is_some_and(wrong) {
            return true;
        }
        // tokio-rustls reports handshake failures as an io::Error around the rustls::Error (and
        // hyper-util wraps that in another), and io::Error's source() skips the error it wraps.
        cur = match err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process's default rustls provider, once. An HTTP client built without a TLS
/// configuration of its own (the CLI's, over the agent's Unix socket; a `/metrics` scraper)
/// still asks for one when it is built.
pub fn install_default_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another part of the process may have installed one first: that one is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn certified(key: &NodeKey) -> Arc<CertifiedKey> {
    let der = CertificateDer::from(spki(&key.public_bytes()));
    Arc::new(CertifiedKey::new(vec![der], Arc::new(NodeSigner(key.clone()))))
}

/// The server side of the peer API: presents `key`, requires a client key.
pub fn server_config(key: &NodeKey) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .with_client_cert_verifier(Arc::new(AnyNodeKey))
        .with_cert_resolver(Arc::new(rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified(key))));
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// The client side: presents `key`; takes only the server key `pinned` when given, else any
/// valid node key (the caller then checks who answered, see [`peer_key`]).
pub fn client_config(key: &NodeKey, pinned: Option<[u8; 32]>) -> ClientConfig {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ServerKey { pinned }))
        .with_client_cert_resolver(Arc::new(rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified(key))));
    cfg.resumption = rustls::client::Resumption::disabled();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg
}

/// Signs the handshake with a node key (Ed25519, the only scheme offered).
#[derive(Debug)]
struct NodeSigner(NodeKey);

impl SigningKey for NodeSigner {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn Signer>> {
        offered.contains(&SignatureScheme::ED25519).then(|| Box::new(NodeSigner(self.0.clone())) as Box<dyn Signer>)
    }

    fn public_key(&self) -> Option<SubjectPublicKeyInfoDer<'_>> {
        Some(SubjectPublicKeyInfoDer::from(spki(&self.0.public_bytes())))
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        SignatureAlgorithm::ED25519
    }
}

impl Signer for NodeSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        Ok(self.0.sign_raw(message).to_vec())
    }

    fn scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

fn bad(e: CertificateError) -> Error {
    Error::InvalidCertificate(e)
}

/// Checks a TLS 1.3 handshake signature by the raw public key `cert`.
fn verify_ed25519(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(bad(CertificateError::BadSignature));
    }
    let key = key_of_spki(cert.as_ref()).ok_or(bad(CertificateError::BadEncoding))?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(&key).map_err(|_| bad(CertificateError::BadEncoding))?;
    let sig: [u8; 64] = dss.signature().try_into().map_err(|_| bad(CertificateError::BadSignature))?;
    key.verify_strict(message, &ed25519_dalek::Signature::from_bytes(&sig))
        .map_err(|_| bad(CertificateError::BadSignature))?;
    Ok(HandshakeSignatureValid::assertion())
}

fn tls12_refused() -> Error {
    Error::General("TLS 1.2 is not offered by ClusterOS peers".into())
}

/// The handshake checks both verifiers share (two rustls traits with the same methods): TLS 1.3
/// only, Ed25519 only, raw public keys only.
macro_rules! raw_ed25519_key_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(tls12_refused())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_ed25519(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }

        fn requires_raw_public_keys(&self) -> bool {
            true
        }
    };
}

/// The client's check of the server: one Ed25519 raw public key, the pinned one if any.
#[derive(Debug)]
struct ServerKey {
    pinned: Option<[u8; 32]>,
}

impl ServerCertVerifier for ServerKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let key = key_of_spki(end_entity.as_ref()).ok_or(bad(CertificateError::BadEncoding))?;
        if !intermediates.is_empty() {
            return Err(bad(CertificateError::BadEncoding));
        }
        match self.pinned {
            Some(p) if p != key => Err(bad(CertificateError::ApplicationVerificationFailure)),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    raw_ed25519_key_checks!();
}

/// The server's check of a client: any one valid Ed25519 raw public key (what that key may do
/// is the gate's question, per request).
#[derive(Debug)]
struct AnyNodeKey;

impl ClientCertVerifier for AnyNodeKey {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        key_of_spki(end_entity.as_ref()).ok_or(bad(CertificateError::BadEncoding))?;
        if !intermediates.is_empty() {
            return Err(bad(CertificateError::BadEncoding));
        }
        Ok(ClientCertVerified::assertion())
    }

    raw_ed25519_key_checks!();
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    use super::*;

    fn key(b: u8) -> NodeKey {
        NodeKey::from_seed(&[b; 32])
    }

    /// One handshake over an in-memory pipe: what each side saw of the other, or the client's
    /// error.
    async fn handshake(
        server: &NodeKey,
        client: &NodeKey,
        pinned: Option<[u8; 32]>,
    ) -> Result<(String, String), String> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server_config(server));
        let connector = TlsConnector::from(Arc::new(client_config(client, pinned)));
        let name = ServerName::try_from("10.0.0.1").unwrap();
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            let seen = peer_key(s.get_ref().1.peer_certificates()).ok_or("no client key")?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            s.write_all(&buf).await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(seen)
        });
        let mut c = connector.connect(name, c).await.map_err(|e| {
            assert!(!is_wrong_server_key(&e) || pinned.is_some(), "a wrong key without a pin: {e}");
            format!("{}{e}", if is_wrong_server_key(&e) { "wrong server key: " } else { "" })
        })?;
        let server_seen = peer_key(c.get_ref().1.peer_certificates()).ok_or("no server key")?;
        assert_eq!(c.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
        c.write_all(b"hello").await.unwrap();
        let mut echo = [0u8; 5];
        c.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello");
        let client_seen = srv.await.unwrap()?;
        Ok((server_seen, client_seen))
    }

    #[tokio::test]
    async fn both_ends_prove_their_node_keys() {
        let (a, b) = (key(1), key(2));
        let (server, client) = handshake(&a, &b, None).await.unwrap();
        assert_eq!(server, a.public(), "the client sees the server's node key");
        assert_eq!(client, b.public(), "the server sees the client's node key");
        let (server, _) = handshake(&a, &b, Some(a.public_bytes())).await.unwrap();
        assert_eq!(server, a.public(), "a pinned key that matches");
    }

    #[tokio::test]
    async fn a_pinned_client_refuses_another_key_before_it_sends() {
        let (a, b, c) = (key(1), key(2), key(3));
        let e = handshake(&a, &b, Some(c.public_bytes())).await.unwrap_err();
        assert!(e.starts_with("wrong server key"), "{e}");
    }

    #[test]
    fn only_an_ed25519_raw_public_key_is_a_node_key() {
        let k = key(7);
        let der = spki(&k.public_bytes());
        assert_eq!(der.len(), 44);
        assert_eq!(key_of_spki(&der), Some(k.public_bytes()));
        assert_eq!(peer_key(Some(&[CertificateDer::from(der.clone())])), Some(k.public()));
        let mut longer = der.clone();
        longer.push(0);
        assert_eq!(key_of_spki(&longer), None, "trailing bytes");
        assert_eq!(key_of_spki(&der[..43]), None, "short");
        let mut other = der.clone();
        other[8] = 0x71; // the OID of Ed448, not Ed25519
        assert_eq!(key_of_spki(&other), None, "another algorithm");
        assert_eq!(peer_key(None), None);
        assert_eq!(peer_key(Some(&[])), None);
    }

    /// A client that is not TLS (an agent from before TLS, or a plain HTTP request) gets no
    /// answer in clear: the handshake fails.
    #[tokio::test]
    async fn plain_http_is_not_answered() {
        let (mut c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server_config(&key(1)));
        let srv = tokio::spawn(async move { acceptor.accept(s).await.map(drop) });
        c.write_all(b"POST /peer/v1/hello HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let r = srv.await.unwrap();
        assert!(r.is_err(), "a plain request got through the TLS handshake");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        assert!(!String::from_utf8_lossy(&rest).contains("HTTP/1.1"), "answered in clear: {rest:?}");
    }
}
