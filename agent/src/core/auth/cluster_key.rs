//! The key derived from the cluster secret: it signs and checks every peer request and answer
//! (the HMAC the module comment of [`super`] describes), and the set of keys a node accepts while
//! the secret is rotated. No I/O: the nonce and the clock come from the caller.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::{AuthError, HDR_BODY, RequestAuth, framed, hex, unhex};

type HmacSha256 = Hmac<Sha256>;

/// The key derived from the cluster secret. Never logged.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

impl ClusterKey {
    pub fn derive(secret: &str) -> ClusterKey {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
        mac.update(b"clusteros peer authentication v1");
        ClusterKey(mac.finalize().into_bytes().into())
    }

    /// A short, non-secret fingerprint of the key, for logs ("which secret is this node using?").
    pub fn fingerprint(&self) -> String {
        hex(&self.fingerprint_bytes())
    }

    /// The fingerprint's 4 bytes (what LAN beacons carry: [`crate::core::beacon`]).
    pub fn fingerprint_bytes(&self) -> [u8; 4] {
        Sha256::digest(self.0)[..4].try_into().expect("a SHA-256 digest has 32 bytes")
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
