//! The agent's servers: the peer API (TCP, every request signed with the cluster key), the local
//! API (a root-only unix socket, used by the CLI) and `/metrics`. Handlers parse and check what
//! arrives and call the runtime; the answers and the error body are the types of [`crate::proto`].
//!
//! Must not: decide anything about the cluster (that is the runtime's and the core's).

pub mod accept;
pub mod beacon;
pub mod local;
pub mod metrics;
pub mod peer;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::proto::ErrorBody;
pub use crate::runtime::ApiError;

/// Lets warnings through, at most `burst` per `every`, and says how many it held back: a flood
/// of refused connections or requests, or a condition retried every few seconds, must not flood
/// the journal.
pub(crate) struct Throttle {
    every: std::time::Duration,
    burst: u32,
    window: Option<std::time::Instant>,
    passed: u32,
    held: u64,
    last: Option<String>,
}

impl Throttle {
    pub(crate) const fn new(every: std::time::Duration, burst: u32) -> Throttle {
        Throttle { every, burst, window: None, passed: 0, held: 0, last: None }
    }

    /// Like [`due`](Self::due), but a message that differs from the last one let through always
    /// passes, and starts a new window and a new count: a change of condition is news, a repeat
    /// is not.
    pub(crate) fn due_unless_repeated(&mut self, message: &str) -> Option<u64> {
        if self.last.as_deref() != Some(message) {
            self.last = Some(message.to_string());
            self.window = None;
            self.held = 0;
        }
        self.due()
    }

    /// `Some(held back since the last one let through)` when this one may be logged.
    pub(crate) fn due(&mut self) -> Option<u64> {
        let now = std::time::Instant::now();
        if self.window.is_none_or(|w| now.duration_since(w) >= self.every) {
            self.window = Some(now);
            self.passed = 0;
        }
        if self.passed >= self.burst {
            self.held += 1;
            return None;
        }
        self.passed += 1;
        Some(std::mem::take(&mut self.held))
    }
}

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

#[cfg(test)]
mod tests {
    use super::Throttle;
    use std::time::{Duration, Instant};

    #[test]
    fn the_throttle_lets_a_burst_through_and_counts_the_rest() {
        let mut t = Throttle::new(Duration::from_secs(3600), 2);
        assert_eq!((t.due(), t.due(), t.due(), t.due()), (Some(0), Some(0), None, None));
        t.window = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(t.due(), Some(2), "the next window's first line says how many were held back");
        assert_eq!((t.due(), t.due()), (Some(0), None));
    }

    #[test]
    fn a_changed_message_passes_and_a_repeated_one_waits_for_the_window() {
        let mut t = Throttle::new(Duration::from_secs(3600), 1);
        assert_eq!(t.due_unless_repeated("disk full"), Some(0));
        assert_eq!(t.due_unless_repeated("disk full"), None);
        assert_eq!(t.due_unless_repeated("read-only"), Some(0), "a new condition is logged at once");
        assert_eq!(t.due_unless_repeated("read-only"), None);
        t.window = Some(Instant::now() - Duration::from_secs(3601));
        assert_eq!(t.due_unless_repeated("read-only"), Some(1), "a repeat again after the window");
    }
}
