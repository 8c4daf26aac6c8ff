//! The peer API as a request from the network meets it: the authentication headers, the
//! signature and replay checks the middleware runs before any handler, and the JSON body of every
//! request type the router accepts; then the answer as the client checks it (response signature,
//! error body, answer type).
//!
//! Input: `[kind, flags, status_lo, status_hi]` then `to \n time \n nonce \n signature \n
//! response-signature \n body`. `kind` picks the route; `flags`: 1, 2, 4 = the time, nonce and
//! signature headers are present; 8 = replace the signature by a correct one (to get past the
//! HMAC to the destination check, the replay guard and the handlers); 16 = sign the answer
//! correctly; 32 = the answer signature header is present; 64 = the body digest header is absent
//! (else it is the body's); 128 = the destination header is absent. The node checking the
//! request is [`TARGET`]; flag 8 also signs the request as member [`MEMBER`] with its node key,
//! the only member whose key the checking node's membership records. The request comes over a
//! TLS connection of that member's key, or (when `kind`'s top bit is set) of another machine's
//! key, which relays it: then a request signed by the member is refused as not the channel's.

#![forbid(unsafe_code)]
#![no_main]

use std::sync::LazyLock;

use clusteros::adapters::raft::TypeConfig;
use clusteros::adapters::raft::state_machine::SmData;
use clusteros::core::auth::{
    ANY_NODE, AuthError, AuthHeaders, ClusterKey, ClusterKeys, Gate, NodeKey, Origin, Sender, body_digest, parse_auth,
};
use clusteros::core::formation::{Pledge, answer_pledge};
use clusteros::core::state::{NodeId, Response as CmdResponse};
use clusteros::proto::{
    Empty, ErrorBody, HelloRequest, HelloResponse, JoinRequest, JoinResponse, LeaveRequest, PledgeResponse,
    PreVoteRequest, PreVoteResponse, ReadRequest, ReadResponse, SlurmStateBlob, SnapshotRequest, WriteRequest,
};
use clusteros_agent_fuzz::{NOW_MS, SECRET, TARGET, route};
use libfuzzer_sys::fuzz_target;
use openraft::error::{Fatal, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use serde::Serialize;
use serde::de::DeserializeOwned;

static KEY: LazyLock<ClusterKey> = LazyLock::new(|| ClusterKey::derive(SECRET));
static MEMBER_KEY: LazyLock<NodeKey> = LazyLock::new(|| NodeKey::from_seed(&[5; 32]));
/// The key of a machine that relays the member's requests over its own TLS connection.
static RELAY_KEY: LazyLock<NodeKey> = LazyLock::new(|| NodeKey::from_seed(&[6; 32]));
/// The one member the checking node knows the key of.
const MEMBER: &str = "000000000000000c";

/// What the checking node's membership records of a sender.
fn membership(id: NodeId) -> Sender {
    if id.to_string() == MEMBER { Sender::Member { node_key: MEMBER_KEY.public() } } else { Sender::Stranger }
}

/// A header value as the middleware sees it: absent, or not visible ASCII, is `None`.
fn header(present: bool, raw: &[u8]) -> Option<String> {
    if !present {
        return None;
    }
    let v = http::HeaderValue::from_bytes(raw).ok()?;
    v.to_str().ok().map(str::to_string)
}

/// Decodes `body` as `T` (what `axum::Json<T>` does); a value that decodes must re-encode to
/// JSON that decodes to the same value.
fn decode<T: DeserializeOwned + Serialize>(body: &[u8]) -> Option<T> {
    let v: T = serde_json::from_slice(body).ok()?;
    let text = serde_json::to_vec(&v).expect("a decoded value encodes");
    let again: T = serde_json::from_slice(&text).expect("an encoded value decodes");
    assert_eq!(
        serde_json::to_value(&v).expect("to value"),
        serde_json::to_value(&again).expect("to value"),
        "round trip changed the value"
    );
    Some(v)
}

/// The handler's body extractor for `kind`.
fn decode_request(kind: u8, body: &[u8]) {
    match kind % 12 {
        0 => {
            decode::<AppendEntriesRequest<TypeConfig>>(body);
        }
        1 => {
            decode::<VoteRequest<NodeId>>(body);
        }
        2 => {
            // The handler passes `data` to the state machine, which decodes it and checks it
            // against the metadata (`install_snapshot`).
            if let Some(req) = decode::<SnapshotRequest>(body)
                && let Some(data) = decode::<SmData>(req.data.as_bytes())
            {
                let _matches = data.last_applied == req.meta.last_log_id;
            }
        }
        3 => {
            decode::<PreVoteRequest>(body);
        }
        4 => {
            decode::<HelloRequest>(body);
        }
        5 => {
            decode::<JoinRequest>(body);
        }
        6 => {
            decode::<LeaveRequest>(body);
        }
        7 => {
            decode::<WriteRequest>(body);
        }
        8 => {
            decode::<ReadRequest>(body);
        }
        9 => {
            decode::<Empty>(body);
        }
        10 => {
            // The handler's decision on a decoded proposal, against a pledge this node holds.
            if let Some(req) = decode::<Pledge>(body) {
                let held = Pledge {
                    proposer: NodeId(1),
                    seq: 3,
                    members: [(NodeId(1), "a".into()), (NodeId(2), "b".into())].into(),
                };
                for current in [None, Some(&held)] {
                    let _ = answer_pledge(NodeId(2), Some(2), false, current, &req);
                }
            }
        }
        _ => {}
    }
}

/// The client's decoding of a verified 2xx answer to `kind`.
fn decode_answer(kind: u8, body: &[u8]) {
    match kind % 12 {
        0 => {
            decode::<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>(body);
        }
        1 => {
            decode::<Result<VoteResponse<NodeId>, RaftError<NodeId>>>(body);
        }
        2 => {
            decode::<Result<SnapshotResponse<NodeId>, Fatal<NodeId>>>(body);
        }
        3 => {
            decode::<PreVoteResponse>(body);
        }
        4 => {
            decode::<HelloResponse>(body);
        }
        5 => {
            decode::<JoinResponse>(body);
        }
        6 => {
            decode::<Empty>(body);
        }
        7 => {
            decode::<CmdResponse>(body);
        }
        8 => {
            decode::<ReadResponse>(body);
        }
        9 => {
            decode::<SlurmStateBlob>(body);
        }
        10 => {
            decode::<PledgeResponse>(body);
        }
        _ => {}
    }
}

/// The client's reading of an error answer (`adapters::peers::PeerClient::call_raw`).
fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => {
            let again: ErrorBody = serde_json::from_slice(&serde_json::to_vec(&b).unwrap()).unwrap();
            assert_eq!(again, b);
            b.error
        }
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (kind, flags, status) = (data[0], data[1], u16::from_le_bytes([data[2], data[3]]));
    let mut parts = data[4..].splitn(6, |b| *b == b'\n');
    let to_raw = parts.next().unwrap_or_default();
    let time_raw = parts.next().unwrap_or_default();
    let nonce_raw = parts.next().unwrap_or_default();
    let sig_raw = parts.next().unwrap_or_default();
    let resp_sig_raw = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let path = route(kind);
    let key = &*KEY;

    // The middleware: headers, then signature, destination, freshness and replay (the Gate),
    // then the body against its digest.
    let to = header(flags & 128 == 0, to_raw);
    let time = header(flags & 1 != 0, time_raw);
    let nonce = header(flags & 2 != 0, nonce_raw);
    let sig = header(flags & 4 != 0, sig_raw);
    // The body digest header: the body's own unless flag 64 leaves it out.
    let digest = (flags & 64 == 0).then(|| body_digest(body));
    let parsed = parse_auth(AuthHeaders {
        to: to.as_deref(),
        time: time.as_deref(),
        nonce: nonce.as_deref(),
        body_sha256: digest.as_deref(),
        signature: sig.as_deref(),
        from: None,
        node_sig: None,
    });
    if let Err(e) = &parsed {
        assert!(matches!(e, AuthError::Missing(_)), "{e:?}");
    }
    let mut auth = parsed.clone();
    if flags & 8 != 0
        && let Ok(a) = &parsed
    {
        let signed = key.sign_request("POST", &path, &a.to, a.time_ms, &a.nonce, body);
        assert_eq!((&signed.to, signed.time_ms, &signed.nonce), (&a.to, a.time_ms, &a.nonce));
        auth = Ok(signed.sign_as("POST", &path, MEMBER, &MEMBER_KEY));
    }
    let gate = Gate::new(ClusterKeys::new(SECRET, &[]), TARGET);
    let relayed = kind & 0x80 != 0;
    let channel = if relayed { RELAY_KEY.public() } else { MEMBER_KEY.public() };
    let any_node = clusteros::proto::paths::accepts_any_node(&path);
    let admission = clusteros::proto::paths::is_admission(&path);
    let checked = auth.clone().and_then(|a| {
        let origin = gate.admit_head("POST", &path, &a, &channel, admission, any_node, NOW_MS, membership)?;
        // A request that names its sender is that member's, or refused.
        if a.from.is_some() {
            assert_eq!(origin, Origin::Member(MEMBER.parse().unwrap()));
        }
        key.verify_body(&a, body)?;
        Ok(a)
    });
    if flags & 8 != 0 && auth.is_ok() {
        let a = auth.as_ref().unwrap();
        // A correct signature verifies; the same request again is refused for the same reason,
        // or as a replay once it was admitted.
        assert_eq!(key.verify_request("POST", &path, a, body), Ok(()));
        let again = gate.admit_head("POST", &path, a, &channel, admission, any_node, NOW_MS, membership);
        match &checked {
            Err(e @ AuthError::NotTheChannelKey(_)) => {
                assert!(relayed, "the member's own channel refused its request: {e:?}");
                assert_eq!(again.as_ref(), Err(e));
            }
            Ok(_) if relayed => panic!("a relayed request was admitted: {a:?}"),
            Ok(_) => assert_eq!(again, Err(AuthError::Replayed)),
            Err(AuthError::Stale { .. }) => assert!(matches!(again, Err(AuthError::Stale { .. }))),
            Err(e @ (AuthError::WrongDestination { .. } | AuthError::Unaddressed(_))) => {
                assert_eq!(again.as_ref(), Err(e));
                assert!(a.to != TARGET && (a.to != ANY_NODE || !any_node), "{e:?} for {a:?}");
            }
            Err(e) => panic!("a correctly signed request was refused: {e:?}"),
        }
    }
    if let Err(e) = &checked {
        // The refusal's message (logged and sent back).
        let _message = e.to_string();
    }
    // The handler's body (the real server decodes only after the checks passed; decoding every
    // input here lets the fuzzer reach the decoders without a valid signature).
    decode_request(kind, body);

    // The client: the answer to a request with this nonce.
    let req_nonce =
        auth.as_ref().map(|a| a.nonce.clone()).unwrap_or_else(|_| String::from_utf8_lossy(nonce_raw).into());
    let resp_sig = if flags & 16 != 0 {
        let s = key.sign_response(&req_nonce, status, body);
        assert_eq!(key.verify_response(&req_nonce, status, body, &s), Ok(()));
        Some(s)
    } else {
        header(flags & 32 != 0, resp_sig_raw)
    };
    if status == 401 {
        error_message(body);
        return;
    }
    let verified = resp_sig.is_some_and(|s| key.verify_response(&req_nonce, status, body, &s).is_ok());
    if !verified {
        return;
    }
    if !(200..300).contains(&status) {
        error_message(body);
        return;
    }
    decode_answer(kind, body);
});
