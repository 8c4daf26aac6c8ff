//! The agent's two APIs: the peer API (TCP, every request signed with the cluster key) and the
//! local API (a root-only unix socket, used by the CLI): their servers and the error type the
//! handlers return. The request and answer types are in [`crate::proto`] (re-exported here).

pub mod local;
pub mod metrics;
pub mod peer;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::adapters::peers::PeerError;
use crate::core::state::NodeId;
pub use crate::proto::*;

/// Errors of both APIs; each maps to an HTTP status and an [`ErrorBody`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("this node is not the leader")]
    NotLeader { leader: Option<(NodeId, String)> },
    #[error("{0}")]
    NoLeader(String),
    #[error("{0}")]
    NotConfigured(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    WrongNode(String),
    #[error("{0}")]
    Peer(#[from] PeerError),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The error a peer answered with (its kind and message), as this node's own: "not the
    /// leader" and "no leader" both mean "ask the leader again".
    pub fn from_remote(kind: ErrorKind, message: String) -> ApiError {
        match kind {
            ErrorKind::NotLeader | ErrorKind::NoLeader => ApiError::NoLeader(message),
            ErrorKind::BadRequest => ApiError::BadRequest(message),
            ErrorKind::Refused => ApiError::Refused(message),
            ErrorKind::Timeout => ApiError::Timeout(message),
            _ => ApiError::Internal(message),
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            ApiError::NotLeader { .. } => ErrorKind::NotLeader,
            ApiError::NoLeader(_) => ErrorKind::NoLeader,
            ApiError::NotConfigured(_) => ErrorKind::NotConfigured,
            ApiError::BadRequest(_) => ErrorKind::BadRequest,
            ApiError::Refused(_) => ErrorKind::Refused,
            ApiError::Unauthorized(_) => ErrorKind::Unauthorized,
            ApiError::WrongNode(_) => ErrorKind::WrongNode,
            ApiError::Peer(_) => ErrorKind::Peer,
            ApiError::Timeout(_) => ErrorKind::Timeout,
            ApiError::Internal(_) => ErrorKind::Internal,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::NotLeader { .. } => StatusCode::MISDIRECTED_REQUEST,
            ApiError::NoLeader(_) | ApiError::NotConfigured(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Refused(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::WrongNode(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Peer(_) => StatusCode::BAD_GATEWAY,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.to_string(), kind: self.kind() };
        (self.status(), axum::Json(body)).into_response()
    }
}
