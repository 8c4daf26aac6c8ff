//! The local API on a root-only unix socket, used by the `clusteros` CLI. Writes and linearizable
//! reads are forwarded to the leader by the agent; the client never has to find the leader.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::ApiError;
use crate::core::state::{Command, Response, validate_kv};
use crate::proto::{CasBody, Empty, GetBody, JoinBody, KeyBody, PutBody, ReadResponse, RotateBody, RotateResponse};
use crate::runtime::Node;
use crate::status::{self, StatusReport};

/// What the socket serves: a running agent, or one that cannot run yet and says why.
#[derive(Clone)]
pub enum LocalState {
    Running(Arc<Node>),
    Unconfigured { name: String, problems: Vec<String> },
}

impl LocalState {
    fn agent(&self) -> Result<&Arc<Node>, ApiError> {
        match self {
            LocalState::Running(a) => Ok(a),
            LocalState::Unconfigured { problems, .. } => Err(ApiError::NotConfigured(problems.join("; "))),
        }
    }
}

type Shared = State<LocalState>;

async fn status(State(s): Shared) -> Json<StatusReport> {
    Json(match &s {
        LocalState::Running(a) => status::report(a),
        LocalState::Unconfigured { name, problems } => status::unconfigured(name, problems.clone()),
    })
}

async fn kv_get(State(s): Shared, Json(b): Json<GetBody>) -> Result<Json<ReadResponse>, ApiError> {
    let a = s.agent()?;
    validate_kv(&b.key, None).map_err(ApiError::BadRequest)?;
    if b.stale {
        let entry = a.state.read(|d| d.state.kv.get(&b.key).cloned());
        return Ok(Json(ReadResponse { key: b.key, entry, read_index: None }));
    }
    Ok(Json(a.read(&b.key).await?))
}

async fn kv_put(State(s): Shared, Json(b): Json<PutBody>) -> Result<Json<Response>, ApiError> {
    validate_kv(&b.key, Some(&b.value)).map_err(ApiError::BadRequest)?;
    Ok(Json(s.agent()?.write(Command::KvPut { key: b.key, value: b.value }).await?))
}

async fn kv_delete(State(s): Shared, Json(b): Json<KeyBody>) -> Result<Json<Response>, ApiError> {
    validate_kv(&b.key, None).map_err(ApiError::BadRequest)?;
    Ok(Json(s.agent()?.write(Command::KvDelete { key: b.key }).await?))
}

async fn kv_cas(State(s): Shared, Json(b): Json<CasBody>) -> Result<Json<Response>, ApiError> {
    validate_kv(&b.key, b.new.as_deref()).map_err(ApiError::BadRequest)?;
    Ok(Json(s.agent()?.write(Command::KvCas { key: b.key, expected: b.expected, new: b.new }).await?))
}

async fn rotate(State(s): Shared, Json(b): Json<RotateBody>) -> Result<Json<RotateResponse>, ApiError> {
    let name = match b.name.as_str() {
        "munge" => crate::core::secrets::MUNGE_KEY.to_string(),
        other => other.to_string(),
    };
    if name == "cluster-secret" {
        return Err(ApiError::BadRequest(
            "the cluster secret is each node's own credential, not a value in the cluster state: rotate it in three \
             rolling steps, restarting one agent at a time (1: every node accepts the new secret, \
             accepted_cluster_secrets_file or the clusteros.accepted-cluster-secrets credential; 2: every node signs with \
             the new one and accepts the old; 3: drop the old once `clusteros status` shows no secret sealed with it); \
             see the README, \"Rotating the cluster secret\""
                .into(),
        ));
    }
    if !crate::core::secrets::MANAGED.contains(&name.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "unknown secret {:?}; rotate one of: munge, k3s-token (or see cluster-secret)",
            b.name
        )));
    }
    let version = s.agent()?.set_secret(&name).await?;
    Ok(Json(RotateResponse { name, version }))
}

async fn join(State(s): Shared, Json(b): Json<JoinBody>) -> Result<Json<Empty>, ApiError> {
    s.agent()?.request_join(b.addr)?;
    Ok(Json(Empty {}))
}

async fn leave(State(s): Shared) -> Result<Json<Empty>, ApiError> {
    s.agent()?.leave().await?;
    Ok(Json(Empty {}))
}

pub fn router(state: LocalState) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/kv/get", post(kv_get))
        .route("/v1/kv/put", post(kv_put))
        .route("/v1/kv/delete", post(kv_delete))
        .route("/v1/kv/cas", post(kv_cas))
        .route("/v1/secrets/rotate", post(rotate))
        .route("/v1/join", post(join))
        .route("/v1/leave", post(leave))
        .with_state(state)
}

async fn metrics(State(s): Shared) -> impl axum::response::IntoResponse {
    let report = match &s {
        LocalState::Running(a) => status::report(a),
        LocalState::Unconfigured { name, problems } => status::unconfigured(name, problems.clone()),
    };
    let body = crate::server::metrics::render(&report, crate::server::metrics::Refusals::now(), crate::now_ms());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}

/// The Prometheus endpoint (`GET /metrics`), served on plain HTTP at `metrics_addr`.
pub fn metrics_router(state: LocalState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}
