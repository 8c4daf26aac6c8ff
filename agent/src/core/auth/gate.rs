//! The one check of a request's headers that every listener of a node shares: signature,
//! destination, sender and freshness, with one replay memory (bounded).

use std::collections::HashMap;
use std::sync::Mutex;

use super::node_key::verifying_key;
use super::{ANY_NODE, AuthError, ClusterKeys, MAX_NONCES, Origin, REPLAY_WINDOW, RequestAuth, Sender};
use crate::core::ids::NodeId;

/// What a node checks of a request's headers before it reads the body: the signature, that the
/// request is for this node, its freshness and that its nonce is new. One per node, shared by all
/// of its listeners (the underlay and the mesh address), so a request replayed to another
/// listener is seen as the replay it is.
#[derive(Debug)]
pub struct Gate {
    pub keys: ClusterKeys,
    guard: ReplayGuard,
    /// This node's id as requests name it.
    me: String,
}

impl Gate {
    pub fn new(keys: ClusterKeys, me: &str) -> Gate {
        Gate { keys, guard: ReplayGuard::default(), me: me.to_string() }
    }

    /// Admits `auth` for `method path` and says who it comes from. `admission`: the route is one
    /// a node uses before it is a member (hello, pledge, join). `any_node`: the route may be
    /// addressed to [`ANY_NODE`] (the sender cannot know which node listens at the address).
    /// `sender` says what this node's membership records of a node id (see the table in the
    /// module comment). The nonce is remembered only for a request that passed every other check.
    #[allow(clippy::too_many_arguments)]
    pub fn admit_head(
        &self,
        method: &str,
        path: &str,
        auth: &RequestAuth,
        channel_key: &str,
        admission: bool,
        any_node: bool,
        now_ms: i64,
        sender: impl FnOnce(NodeId) -> Sender,
    ) -> Result<Origin, AuthError> {
        self.keys.verify_request_head(method, path, auth)?;
        self.admit_verified(method, path, auth, channel_key, admission, any_node, now_ms, sender)
    }

    /// [`Gate::admit_head`] for a request whose MAC the caller has verified already with
    /// [`ClusterKeys::verify_request_head`] (the peer middleware, which signs its answer with the
    /// key that verified).
    #[allow(clippy::too_many_arguments)]
    pub fn admit_verified(
        &self,
        method: &str,
        path: &str,
        auth: &RequestAuth,
        channel_key: &str,
        admission: bool,
        any_node: bool,
        now_ms: i64,
        sender: impl FnOnce(NodeId) -> Sender,
    ) -> Result<Origin, AuthError> {
        if auth.to == ANY_NODE {
            if !any_node {
                return Err(AuthError::Unaddressed(path.to_string()));
            }
        } else if auth.to != self.me {
            return Err(AuthError::WrongDestination { to: auth.to.clone(), me: self.me.clone() });
        }
        let origin = self.origin(method, path, auth, channel_key, admission, sender)?;
        self.guard.check(auth, now_ms)?;
        Ok(origin)
    }

    fn origin(
        &self,
        method: &str,
        path: &str,
        auth: &RequestAuth,
        channel_key: &str,
        admission: bool,
        sender: impl FnOnce(NodeId) -> Sender,
    ) -> Result<Origin, AuthError> {
        let (Some(from), Some(_)) = (&auth.from, &auth.node_sig) else {
            return Err(AuthError::Anonymous(path.to_string()));
        };
        // Signed by the key this connection's TLS handshake proved: another machine cannot relay
        // the request, since it would have to present the sender's key.
        auth.verify_node_sig(method, path, channel_key).map_err(|_| AuthError::NotTheChannelKey(from.clone()))?;
        let id = from.parse::<NodeId>().map_err(|_| AuthError::BadNodeSignature(from.clone()))?;
        match sender(id) {
            Sender::Member { node_key } if node_key.is_empty() => Err(AuthError::NoNodeKey(from.clone())),
            Sender::Member { node_key } if !same_key(&node_key, channel_key) => {
                Err(AuthError::BadNodeSignature(from.clone()))
            }
            Sender::Member { .. } => Ok(Origin::Member(id)),
            Sender::Unjoined => Ok(Origin::SecretHolder),
            Sender::Stranger if admission => Ok(Origin::SecretHolder),
            Sender::Stranger => Err(AuthError::NotAMember(from.clone())),
        }
    }
}

/// Whether two node keys (base64) are the same valid key.
fn same_key(a: &str, b: &str) -> bool {
    matches!((verifying_key(a), verifying_key(b)), (Some(a), Some(b)) if a == b)
}

/// Remembers recently seen nonces so that a captured request cannot be replayed.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    pub(super) seen: Mutex<HashMap<String, i64>>,
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
