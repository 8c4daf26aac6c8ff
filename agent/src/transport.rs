//! The client side of the peer API: JSON over HTTP, every request signed with the cluster key and
//! every response verified, every call bounded by a timeout.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::ErrorBody;
use crate::auth::{ClusterKey, HDR_AUTH, HDR_NONCE, HDR_TIME};

#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("cannot reach {addr}: {message}")]
    Unreachable { addr: String, message: String },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr} refused this node: {message}")]
    Refused { addr: String, message: String },
    #[error("{addr} answered with a signature that does not verify: it uses a different cluster secret")]
    BadResponseSignature { addr: String },
    #[error("{addr}: {message}")]
    Remote { addr: String, status: u16, kind: String, message: String },
    #[error("{addr} sent an answer that cannot be decoded: {message}")]
    Decode { addr: String, message: String },
}

impl PeerError {
    /// Authentication failures: the other side does not share our cluster secret.
    pub fn is_auth(&self) -> bool {
        matches!(self, PeerError::Refused { .. } | PeerError::BadResponseSignature { .. })
    }
}

/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct PeerClient {
    http: reqwest::Client,
    key: ClusterKey,
}

impl PeerClient {
    pub fn new(key: ClusterKey) -> PeerClient {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .pool_idle_timeout(Duration::from_secs(30))
            .no_proxy()
            .build()
            .expect("HTTP client without TLS builds");
        PeerClient { http, key }
    }

    /// POSTs `req` as JSON to `http://{addr}{path}` and decodes the JSON answer.
    pub async fn call<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, PeerError> {
        let body = serde_json::to_vec(req).expect("request types serialize");
        match tokio::time::timeout(timeout, self.call_raw(addr, path, body)).await {
            Ok(r) => r,
            Err(_) => Err(PeerError::Timeout { addr: addr.into(), timeout }),
        }
    }

    async fn call_raw<Resp: DeserializeOwned>(&self, addr: &str, path: &str, body: Vec<u8>) -> Result<Resp, PeerError> {
        let auth = self.key.sign_request("POST", path, crate::now_ms() as i64, &body);
        let resp = self
            .http
            .post(format!("http://{addr}{path}"))
            .header("content-type", "application/json")
            .header(HDR_TIME, auth.time_ms.to_string())
            .header(HDR_NONCE, &auth.nonce)
            .header(HDR_AUTH, &auth.signature)
            .body(body)
            .send()
            .await
            .map_err(|e| PeerError::Unreachable { addr: addr.into(), message: error_chain(&e) })?;
        let status = resp.status().as_u16();
        let sig = resp.headers().get(HDR_AUTH).and_then(|v| v.to_str().ok()).map(str::to_string);
        let bytes =
            resp.bytes().await.map_err(|e| PeerError::Unreachable { addr: addr.into(), message: error_chain(&e) })?;
        if status == 401 {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|b| b.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(PeerError::Refused { addr: addr.into(), message });
        }
        let verified = sig.is_some_and(|s| self.key.verify_response(&auth.nonce, status, &bytes, &s).is_ok());
        if !verified {
            return Err(PeerError::BadResponseSignature { addr: addr.into() });
        }
        if !(200..300).contains(&status) {
            let (kind, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => (b.kind, b.error),
                Err(_) => ("unknown".into(), String::from_utf8_lossy(&bytes).into_owned()),
            };
            return Err(PeerError::Remote { addr: addr.into(), status, kind, message });
        }
        serde_json::from_slice(&bytes).map_err(|e| PeerError::Decode { addr: addr.into(), message: e.to_string() })
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
