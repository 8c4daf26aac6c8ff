//! The agent's servers: the peer API (TCP, every request signed with the cluster key), the local
//! API (a root-only unix socket, used by the CLI) and `/metrics`. Handlers parse and check what
//! arrives and call the runtime; the answers and the error body are the types of [`crate::proto`].
//!
//! Must not: decide anything about the cluster (that is the runtime's and the core's).

pub mod accept;
pub mod local;
pub mod metrics;
pub mod peer;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::proto::ErrorBody;
pub use crate::runtime::ApiError;

/// The HTTP status of each error.
fn status(e: &ApiError) -> StatusCode {
    match e {
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody { error: self.to_string(), kind: self.kind() };
        (status(&self), axum::Json(body)).into_response()
    }
}
