//! The CLI's client for the agent's local unix socket.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::adapters::peers::error_chain;
use crate::core::state::Response;
use crate::proto::{CasBody, Empty, ErrorBody, GetBody, JoinBody, KeyBody, PutBody, ReadResponse};
use crate::status::StatusReport;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent not running (no socket at {0}): start it with `systemctl start clusteros-agent.service`")]
    NotRunning(PathBuf),
    #[error("agent not running (nothing listens on {0}): start it with `systemctl start clusteros-agent.service`")]
    Refused(PathBuf),
    #[error("permission denied on {0}: run clusteros as root (sudo clusteros ...)")]
    Permission(PathBuf),
    #[error("cannot talk to the agent on {path}: {message}")]
    Transport { path: PathBuf, message: String },
    #[error("{}", .0.error)]
    Api(ErrorBody),
    #[error("the agent sent an answer that cannot be decoded: {0}")]
    Decode(String),
}

pub struct LocalClient {
    http: reqwest::Client,
    socket: PathBuf,
}

impl LocalClient {
    pub fn new(socket: &Path) -> LocalClient {
        crate::adapters::tls::install_default_provider();
        let http = reqwest::Client::builder()
            .unix_socket(socket)
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .expect("an HTTP client over a Unix socket builds");
        LocalClient { http, socket: socket.to_owned() }
    }

    fn transport_error(&self, e: reqwest::Error) -> ClientError {
        let text = error_chain(&e);
        let io = std::error::Error::source(&e).and_then(|mut s| {
            loop {
                if let Some(io) = s.downcast_ref::<std::io::Error>() {
                    return Some(io.kind());
                }
                s = s.source()?;
            }
        });
        match io {
            Some(std::io::ErrorKind::NotFound) => ClientError::NotRunning(self.socket.clone()),
            Some(std::io::ErrorKind::ConnectionRefused) => ClientError::Refused(self.socket.clone()),
            Some(std::io::ErrorKind::PermissionDenied) => ClientError::Permission(self.socket.clone()),
            _ if !self.socket.exists() => ClientError::NotRunning(self.socket.clone()),
            _ => ClientError::Transport { path: self.socket.clone(), message: text },
        }
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(e))?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => ClientError::Api(b),
                Err(_) => ClientError::Decode(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes))),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, ClientError> {
        self.send(self.http.post(format!("http://localhost{path}")).json(body)).await
    }

    pub async fn status(&self) -> Result<StatusReport, ClientError> {
        self.send(self.http.get("http://localhost/v1/status")).await
    }

    pub async fn kv_get(&self, key: &str, stale: bool) -> Result<ReadResponse, ClientError> {
        self.post("/v1/kv/get", &GetBody { key: key.into(), stale }).await
    }

    pub async fn kv_put(&self, key: &str, value: &str) -> Result<Response, ClientError> {
        self.post("/v1/kv/put", &PutBody { key: key.into(), value: value.into() }).await
    }

    pub async fn kv_delete(&self, key: &str) -> Result<Response, ClientError> {
        self.post("/v1/kv/delete", &KeyBody { key: key.into() }).await
    }

    pub async fn kv_cas(
        &self,
        key: &str,
        expected: Option<String>,
        new: Option<String>,
    ) -> Result<Response, ClientError> {
        self.post("/v1/kv/cas", &CasBody { key: key.into(), expected, new }).await
    }

    pub async fn rotate_secret(&self, name: &str) -> Result<crate::proto::RotateResponse, ClientError> {
        self.post("/v1/secrets/rotate", &crate::proto::RotateBody { name: name.into() }).await
    }

    pub async fn join(&self, addr: &str) -> Result<Empty, ClientError> {
        self.post("/v1/join", &JoinBody { addr: addr.into() }).await
    }

    pub async fn leave(&self) -> Result<Empty, ClientError> {
        self.post("/v1/leave", &Empty {}).await
    }
}
