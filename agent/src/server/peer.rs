//! The peer API server: Raft RPCs, discovery, join, leave and forwarded writes and reads. A
//! middleware verifies every request's proof of the cluster secret and of its sender's node key
//! (against this node's Raft membership) before any handler runs, and signs every answer; the
//! handlers then check that the sender may ask what it asks ([`crate::core::permissions`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, Path, Request, State};
use axum::http::HeaderValue;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use openraft::error::{Fatal, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use tracing::warn;

use super::ApiError;
use crate::adapters::raft::{Snapshot, TypeConfig};
use crate::adapters::tls::ChannelKey;
use crate::core::auth::{
    AuthError, AuthHeaders, ClusterKey, Gate, HDR_AUTH, HDR_BODY, HDR_FROM, HDR_NODE_SIG, HDR_NONCE, HDR_TIME, HDR_TO,
    Origin, parse_auth,
};
use crate::core::formation::Pledge;
use crate::core::state::{NodeId, Response as CmdResponse};
use crate::proto::{
    Empty, HandOffRequest, HandOffResponse, HelloRequest, HelloResponse, JoinRequest, JoinResponse, LeaveRequest,
    PledgeResponse, PreVoteRequest, PreVoteResponse, ReadRequest, ReadResponse, SlurmStateBlob, SnapshotRequest,
    WriteRequest, paths,
};
use crate::runtime::Node;

/// Largest accepted peer request (snapshots and log batches included).
pub const MAX_BODY: usize = 256 * 1024 * 1024;

fn header<'a>(req: &'a Request, name: &'static str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The largest body each route takes: Raft log batches and snapshots up to [`MAX_BODY`], a
/// forwarded write up to 8 MiB (a KV value of 1 MiB, JSON-escaped), every other request 1 MiB.
pub fn body_limit(path: &str) -> usize {
    let raft_bulk = [paths::RAFT_APPEND, paths::RAFT_SNAPSHOT].iter().any(|p| path.starts_with(&format!("{p}/")));
    match path {
        _ if raft_bulk => MAX_BODY,
        paths::WRITE => 8 * 1024 * 1024,
        _ => 1024 * 1024,
    }
}

/// Refuses a request before reading its body unless its headers prove the cluster secret, are
/// fresh and, on a member route, carry the node signature of a member; then reads the body up to
/// the route's limit and checks it against the signed digest. The handler gets the request's
/// [`Origin`].
async fn authenticate(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let auth: &Gate = &node.gate;
    let remote = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string()).unwrap_or_default();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let refuse = |e: AuthError| {
        // At most 20 lines per 10 s: enough to see a misconfigured node, not a flood's worth.
        static LOG: std::sync::Mutex<super::Throttle> =
            std::sync::Mutex::new(super::Throttle::new(std::time::Duration::from_secs(10), 20));
        let due = LOG.lock().map(|mut t| t.due()).unwrap_or(Some(0));
        if let Some(held) = due {
            let more = if held > 0 { format!(" ({held} more refused since the last report)") } else { String::new() };
            warn!(peer_addr = %remote, path = %path, "refused peer request: {e}{more}");
        }
        crate::server::metrics::count_refused();
        ApiError::Unauthorized(e.to_string()).into_response()
    };
    let parsed = parse_auth(AuthHeaders {
        to: header(&req, HDR_TO),
        time: header(&req, HDR_TIME),
        nonce: header(&req, HDR_NONCE),
        body_sha256: header(&req, HDR_BODY),
        signature: header(&req, HDR_AUTH),
        from: header(&req, HDR_FROM),
        node_sig: header(&req, HDR_NODE_SIG),
    });
    let any_node = paths::accepts_any_node(&path);
    let admission = paths::is_admission(&path);
    let a = match parsed {
        Ok(a) => a,
        Err(e) => return refuse(e),
    };
    // Answers are signed with the key that verified the request (see ClusterKeys).
    let reply = match auth.keys.verify_request_head(&method, &path, &a) {
        Ok(k) => k.clone(),
        Err(e) => return refuse(e),
    };
    // The node key this connection's TLS handshake proved (server::accept puts it on every
    // request of the connection; the peer API is served over TLS only).
    let Some(ChannelKey(channel)) = req.extensions().get::<ChannelKey>().cloned() else {
        return refuse(AuthError::Anonymous(path.clone()));
    };
    let membership = node.raft.metrics().borrow().membership_config.clone();
    let sender = |id| node.sender(&membership, &path, id);
    let now = crate::now_ms() as i64;
    let origin = match auth.admit_verified(&method, &path, &a, &channel, admission, any_node, now, sender) {
        Ok(origin) => origin,
        // Signed by a holder of the secret, for another node (a reinstalled machine at an old
        // address, or a replay): a signed "wrong node" answer, as the Raft routes give, so the
        // sender sees why instead of a secret problem.
        Err(e @ AuthError::WrongDestination { .. }) => {
            return sign(&node, &reply, &a.nonce, ApiError::WrongNode(e.to_string()).into_response()).await;
        }
        Err(e) => return refuse(e),
    };
    let limit = body_limit(&path);
    let too_large =
        || ApiError::BadRequest(format!("the request body is larger than {limit} bytes, the limit of {path}"));
    let declared = header(&req, "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return sign(&node, &reply, &a.nonce, too_large().into_response()).await;
    }
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    let mut bytes = Vec::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let e = ApiError::BadRequest(format!("cannot read request body: {e}"));
                return sign(&node, &reply, &a.nonce, e.into_response()).await;
            }
        };
        if bytes.len() + chunk.len() > limit {
            return sign(&node, &reply, &a.nonce, too_large().into_response()).await;
        }
        bytes.extend_from_slice(&chunk);
    }
    if let Err(e) = reply.verify_body(&a, &bytes) {
        return refuse(e);
    }
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(origin);
    let resp = next.run(req).await;
    sign(&node, &reply, &a.nonce, resp).await
}

/// Signs an answer to the request with `nonce` with the cluster key `key` and this node's own
/// node key (the client checks every answer but a 401).
async fn sign(node: &Node, key: &ClusterKey, nonce: &str, resp: Response) -> Response {
    let (mut parts, body) = resp.into_parts();
    let bytes = match to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return ApiError::Internal(format!("cannot buffer the answer: {e}")).into_response(),
    };
    let status = parts.status.as_u16();
    let sig = key.sign_response(nonce, status, &bytes);
    parts.headers.insert(HDR_AUTH, HeaderValue::from_str(&sig).expect("hex is a valid header value"));
    let node_sig = node.identity.node_key().sign_response(nonce, status, &bytes, &node.id().to_string());
    parts.headers.insert(HDR_NODE_SIG, HeaderValue::from_str(&node_sig).expect("hex is a valid header value"));
    Response::from_parts(parts, Body::from(bytes))
}

type Shared = State<Arc<Node>>;
type Sent = Extension<Origin>;

/// A Raft message must come from the node it speaks for: an append or a snapshot from the leader
/// its vote names, a vote or pre-vote request from its candidate. (A node in no cluster yet knows
/// no keys: it takes its first membership on the cluster secret, see [`crate::core::auth`].)
fn check_speaker(origin: &Origin, named: Option<NodeId>, what: &str) -> Result<(), ApiError> {
    match (origin, named) {
        (Origin::SecretHolder, _) => Ok(()),
        (Origin::Member(m), Some(n)) if *m == n => Ok(()),
        (Origin::Member(m), n) => Err(ApiError::Refused(format!(
            "node {m} sent a Raft {what} in the name of {}: refused",
            n.map_or_else(|| "no node".to_string(), |n| n.to_string())
        ))),
    }
}

/// The member a request on a member route comes from (the middleware lets only those and the
/// requests to a node in no cluster yet through).
fn member(origin: &Origin, what: &str) -> Result<NodeId, ApiError> {
    origin.member().ok_or_else(|| {
        ApiError::Refused(format!("{what} needs a member of the cluster, and this node is in none yet: ask a member"))
    })
}

/// Raft RPCs name their target node; a node refuses RPCs meant for another id (the machine was
/// reinstalled, or the address now belongs to another node).
fn check_target(a: &Node, target: &str) -> Result<(), ApiError> {
    let me = a.id().to_string();
    if target != me {
        return Err(ApiError::WrongNode(format!("this address now belongs to node {me}, not {target}")));
    }
    Ok(())
}

async fn append(
    State(a): Shared,
    Extension(origin): Sent,
    Path(target): Path<String>,
    Json(req): Json<AppendEntriesRequest<TypeConfig>>,
) -> Result<Json<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    check_target(&a, &target)?;
    let leader = req.vote.leader_id().voted_for();
    check_speaker(&origin, leader, "append")?;
    let resp = a.raft.append_entries(req).await;
    // Not refused for a higher vote: a leader still replicates to this node (see run_member).
    if let (
        Ok(AppendEntriesResponse::Success | AppendEntriesResponse::PartialSuccess(_) | AppendEntriesResponse::Conflict),
        Some(l),
    ) = (&resp, leader)
    {
        a.heard_from_leader.record(l);
    }
    Ok(Json(resp))
}

async fn vote(
    State(a): Shared,
    Extension(origin): Sent,
    Path(target): Path<String>,
    Json(req): Json<VoteRequest<NodeId>>,
) -> Result<Json<Result<VoteResponse<NodeId>, RaftError<NodeId>>>, ApiError> {
    check_target(&a, &target)?;
    let candidate = req.vote.leader_id().voted_for();
    check_speaker(&origin, candidate, "vote request")?;
    let resp = a.raft.vote(req).await;
    // A vote granted resets this node's election timer, as a leader's heartbeat does.
    if let (Ok(r), Some(c)) = (&resp, candidate)
        && r.vote_granted
    {
        a.heard_from_leader.record(c);
    }
    Ok(Json(resp))
}

async fn prevote(
    State(a): Shared,
    Extension(origin): Sent,
    Path(target): Path<String>,
    Json(req): Json<PreVoteRequest>,
) -> Result<Json<PreVoteResponse>, ApiError> {
    check_target(&a, &target)?;
    check_speaker(&origin, Some(req.candidate), "pre-vote request")?;
    Ok(Json(a.answer_pre_vote(&req)))
}

async fn handoff(
    State(a): Shared,
    Extension(origin): Sent,
    Path(target): Path<String>,
    Json(req): Json<HandOffRequest>,
) -> Result<Json<HandOffResponse>, ApiError> {
    check_target(&a, &target)?;
    check_speaker(&origin, Some(req.leader), "hand-off")?;
    Ok(Json(a.take_hand_off(&req)))
}

async fn snapshot(
    State(a): Shared,
    Extension(origin): Sent,
    Path(target): Path<String>,
    Json(req): Json<SnapshotRequest>,
) -> Result<Json<Result<SnapshotResponse<NodeId>, Fatal<NodeId>>>, ApiError> {
    check_target(&a, &target)?;
    check_speaker(&origin, req.vote.leader_id().voted_for(), "snapshot")?;
    let snap = Snapshot { meta: req.meta, snapshot: Box::new(req.data.into_bytes()) };
    Ok(Json(a.raft.install_full_snapshot(req.vote, snap).await))
}

async fn hello(State(a): Shared, Json(req): Json<HelloRequest>) -> Json<HelloResponse> {
    Json(a.hello(req).await)
}

async fn pledge(State(a): Shared, Json(req): Json<Pledge>) -> Result<Json<PledgeResponse>, ApiError> {
    Ok(Json(a.answer_pledge(req).await?))
}

async fn join(
    State(a): Shared,
    Extension(origin): Sent,
    Json(req): Json<JoinRequest>,
) -> Result<Json<JoinResponse>, ApiError> {
    a.check_join_origin(&req, &origin)?;
    // Forwarded to the leader, so the joining node may ask any member.
    let r = a.on_leader(paths::JOIN, &req, || a.local_join(req.clone())).await?;
    Ok(Json(r))
}

async fn leave(
    State(a): Shared,
    Extension(origin): Sent,
    Json(req): Json<LeaveRequest>,
) -> Result<Json<Empty>, ApiError> {
    let sender = member(&origin, "leaving")?;
    if sender != req.id {
        return Err(ApiError::Refused(format!(
            "node {sender} asked for node {} to leave: a node leaves only itself",
            req.id
        )));
    }
    Ok(Json(a.local_leave(req).await?))
}

/// The SLURM controller's newest state copy (sealed), for the backup.
async fn slurm_state(State(a): Shared, Json(_): Json<Empty>) -> Result<Json<SlurmStateBlob>, ApiError> {
    match a.slurm_copy.lock().expect("slurm copy lock").clone() {
        Some(b) => Ok(Json((*b).clone())),
        None => Err(ApiError::Refused(
            "this node holds no SLURM state copy: it is not the SLURM controller, or its slurmctld is not in control yet"
                .into(),
        )),
    }
}

async fn write(
    State(a): Shared,
    Extension(origin): Sent,
    Json(req): Json<WriteRequest>,
) -> Result<Json<CmdResponse>, ApiError> {
    let sender = member(&origin, "a write")?;
    crate::core::permissions::may_forward(sender, &req.cmd).map_err(|e| ApiError::Refused(e.to_string()))?;
    Ok(Json(a.local_write(req.cmd).await?))
}

async fn read(State(a): Shared, Json(req): Json<ReadRequest>) -> Result<Json<ReadResponse>, ApiError> {
    Ok(Json(a.local_read(&req.key).await?))
}

/// The peer router, authenticated with the agent's cluster key and its members' node keys.
pub fn router(agent: Arc<Node>) -> Router {
    Router::new()
        .route(&format!("{}/{{target}}", paths::RAFT_APPEND), post(append))
        .route(&format!("{}/{{target}}", paths::RAFT_VOTE), post(vote))
        .route(&format!("{}/{{target}}", paths::RAFT_SNAPSHOT), post(snapshot))
        .route(&format!("{}/{{target}}", paths::RAFT_PREVOTE), post(prevote))
        .route(&format!("{}/{{target}}", paths::RAFT_HANDOFF), post(handoff))
        .route(paths::HELLO, post(hello))
        .route(paths::PLEDGE, post(pledge))
        .route(paths::JOIN, post(join))
        .route(paths::LEAVE, post(leave))
        .route(paths::WRITE, post(write))
        .route(paths::READ, post(read))
        .route(paths::SLURM_STATE, post(slurm_state))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(agent.clone(), authenticate))
        .with_state(agent)
}
