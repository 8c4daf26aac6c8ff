//! Proof of the cluster secret on every peer RPC, in both directions.
//!
//! A request carries `x-clusteros-time` (unix ms), `x-clusteros-nonce` (random),
//! `x-clusteros-body-sha256` (the body's SHA-256) and `x-clusteros-auth`, an HMAC-SHA256 over
//! method, path, time, nonce and that digest, keyed by a key derived from the cluster secret. The
//! headers alone prove the secret, so the server refuses a request without it before reading any
//! of its body ([`ClusterKey::verify_request_head`]), and checks the body against the signed
//! digest once it has read it ([`ClusterKey::verify_body`]). The server refuses requests outside a time window and
//! nonces it has already seen within that window (bounded memory). Responses are signed over the
//! request's nonce, status and body, so a joining node also learns whether the cluster it reached
//! knows the same secret.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub const HDR_TIME: &str = "x-clusteros-time";
pub const HDR_NONCE: &str = "x-clusteros-nonce";
pub const HDR_AUTH: &str = "x-clusteros-auth";
pub const HDR_BODY: &str = "x-clusteros-body-sha256";

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
    #[error("too many requests in the replay window: refused, retry later")]
    Overloaded,
}

/// The key derived from the cluster secret. Never logged.
#[derive(Clone)]
pub struct ClusterKey([u8; 32]);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(..)")
    }
}

/// The four authentication header values of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestAuth {
    pub time_ms: i64,
    pub nonce: String,
    /// The body's SHA-256, hex.
    pub body_sha256: String,
    pub signature: String,
}

/// Reads the four authentication headers of a request (`None`: the header is absent or not
/// visible ASCII). What the peer API's middleware checks first, before the signature.
pub fn parse_auth(
    time: Option<&str>,
    nonce: Option<&str>,
    body_sha256: Option<&str>,
    signature: Option<&str>,
) -> Result<RequestAuth, AuthError> {
    let time_ms = time.ok_or(AuthError::Missing(HDR_TIME))?.parse::<i64>().map_err(|_| AuthError::Missing(HDR_TIME))?;
    let nonce = nonce.ok_or(AuthError::Missing(HDR_NONCE))?.to_string();
    let body_sha256 = body_sha256.ok_or(AuthError::Missing(HDR_BODY))?.to_string();
    let signature = signature.ok_or(AuthError::Missing(HDR_AUTH))?.to_string();
    Ok(RequestAuth { time_ms, nonce, body_sha256, signature })
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
        for p in parts {
            mac.update(&(p.len() as u64).to_be_bytes());
            mac.update(p);
        }
        mac
    }

    fn request_parts(method: &str, path: &str, time_ms: i64, nonce: &str, body_sha256: &[u8]) -> [Vec<u8>; 5] {
        [
            method.as_bytes().to_vec(),
            path.as_bytes().to_vec(),
            time_ms.to_string().into_bytes(),
            nonce.as_bytes().to_vec(),
            body_sha256.to_vec(),
        ]
    }

    /// Signs a request. The nonce must be fresh for every request (the peer client draws 16
    /// random bytes: [`crate::adapters::peers::new_nonce`]); tests, seeds and fuzzing pass
    /// fixed ones.
    pub fn sign_request(&self, method: &str, path: &str, time_ms: i64, nonce: &str, body: &[u8]) -> RequestAuth {
        let digest = Sha256::digest(body);
        let parts = Self::request_parts(method, path, time_ms, nonce, &digest);
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let signature = hex(&self.mac(&refs).finalize().into_bytes());
        RequestAuth { time_ms, nonce: nonce.to_string(), body_sha256: hex(&digest), signature }
    }

    /// Checks the signature over the headers, before the body is read (time and replay are the
    /// [`ReplayGuard`]'s job, the body's digest [`ClusterKey::verify_body`]'s).
    pub fn verify_request_head(&self, method: &str, path: &str, auth: &RequestAuth) -> Result<(), AuthError> {
        let sig = unhex(&auth.signature).ok_or(AuthError::BadSignature)?;
        let digest = unhex(&auth.body_sha256).filter(|d| d.len() == 32).ok_or(AuthError::Missing(HDR_BODY))?;
        let parts = Self::request_parts(method, path, auth.time_ms, &auth.nonce, &digest);
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
        let a = k.sign_request("POST", "/peer/v1/join", 1000, &nonce(), b"{}");
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
        let a = k.sign_request("POST", "/p", now, &nonce(), b"");
        assert_eq!(g.check(&a, now), Ok(()));
        assert_eq!(g.check(&a, now + 10), Err(AuthError::Replayed));
        let old = k.sign_request("POST", "/p", now - 61_000, &nonce(), b"");
        assert!(matches!(g.check(&old, now), Err(AuthError::Stale { .. })));
        let future = k.sign_request("POST", "/p", now + 61_000, &nonce(), b"");
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
            let a = k.sign_request("POST", "/p", t, &nonce(), b"");
            assert!(matches!(g.check(&a, now), Err(AuthError::Stale { .. })), "time {t}");
        }
        let a = parse_auth(Some("-9223372036854775808"), Some(""), Some(""), Some("")).unwrap();
        assert!(matches!(g.check(&a, now), Err(AuthError::Stale { .. })));
        assert!(g.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn auth_headers_are_parsed_in_order() {
        let ok = parse_auth(Some("12"), Some("n"), Some("d"), Some("s")).unwrap();
        assert_eq!(ok, RequestAuth { time_ms: 12, nonce: "n".into(), body_sha256: "d".into(), signature: "s".into() });
        assert_eq!(parse_auth(None, None, None, None), Err(AuthError::Missing(HDR_TIME)));
        assert_eq!(parse_auth(Some("x"), Some("n"), Some("d"), Some("s")), Err(AuthError::Missing(HDR_TIME)));
        assert_eq!(parse_auth(Some("1"), None, Some("d"), Some("s")), Err(AuthError::Missing(HDR_NONCE)));
        assert_eq!(parse_auth(Some("1"), Some("n"), None, Some("s")), Err(AuthError::Missing(HDR_BODY)));
        assert_eq!(parse_auth(Some("1"), Some("n"), Some("d"), None), Err(AuthError::Missing(HDR_AUTH)));
    }

    #[test]
    fn nonce_memory_is_bounded() {
        let g = ReplayGuard::default();
        let k = ClusterKey::derive("secret-secret-secret");
        // Old entries are pruned once the table is half full.
        for i in 0..(MAX_NONCES / 2 + 10) {
            let a = RequestAuth {
                time_ms: 0,
                nonce: format!("{}", i),
                body_sha256: String::new(),
                signature: String::new(),
            };
            g.check(&a, 0).unwrap();
        }
        let fresh = k.sign_request("POST", "/p", 120_000, &nonce(), b"");
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
