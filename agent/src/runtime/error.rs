//! The error every runtime operation a server handler calls returns: what went wrong, as one of
//! the wire's [`ErrorKind`]s. The servers map it to an HTTP status and an error body.

use crate::adapters::peers::PeerError;
use crate::core::state::NodeId;
use crate::proto::ErrorKind;

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
}
