//! openraft's network over the signed peer API. Every successful exchange with a node is recorded
//! as contact, which is what the leader's failure detector reads.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::core::raft_types::PeerNode;
use openraft::error::{
    Fatal, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, SnapshotResponse,
    VoteRequest, VoteResponse,
};

use super::{Snapshot, TypeConfig, Vote};
use crate::adapters::peers::{PeerError, PeerHandle};
use crate::core::state::NodeId;
use crate::proto::{SnapshotRequest, paths};

/// Last successful contact with each peer, as seen by this node.
#[derive(Clone, Default)]
pub struct ContactTracker {
    inner: Arc<Mutex<HashMap<NodeId, Instant>>>,
}

impl ContactTracker {
    pub fn record(&self, id: NodeId) {
        self.inner.lock().expect("contact lock").insert(id, Instant::now());
    }

    pub fn last(&self, id: NodeId) -> Option<Instant> {
        self.inner.lock().expect("contact lock").get(&id).copied()
    }

    /// The most recent contact with any peer.
    pub fn latest(&self) -> Option<Instant> {
        self.inner.lock().expect("contact lock").values().max().copied()
    }
}

#[derive(Clone)]
pub struct Network {
    pub client: PeerHandle,
    pub contacts: ContactTracker,
    pub rpc_timeout: Duration,
    pub snapshot_timeout: Duration,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &PeerNode) -> PeerConnection {
        PeerConnection { target, addr: node.addr.clone(), net: self.clone() }
    }
}

pub struct PeerConnection {
    target: NodeId,
    addr: String,
    net: Network,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

impl PeerConnection {
    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, PeerNode, RaftError<NodeId, E>>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        E: std::error::Error + serde::de::DeserializeOwned,
    {
        // The target id is part of the (signed) path: a node that now holds another id at this
        // address (a reinstalled machine) refuses the RPC instead of acting as the old node.
        let path = format!("{path}/{}", self.target);
        let r: Result<Resp, RaftError<NodeId, E>> =
            self.net.client.call(&self.addr, self.target, &path, req, timeout).await.map_err(to_rpc_error)?;
        self.net.contacts.record(self.target);
        r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Whether the target is, for Raft, not there: down, silent, or replaced by another node id.
fn unreachable(e: &PeerError) -> bool {
    match e {
        // Another node answers at the address: for Raft, the target is not there.
        PeerError::Unreachable { .. } | PeerError::Timeout { .. } | PeerError::BadNodeSignature { .. } => true,
        PeerError::Remote { kind, .. } => *kind == crate::proto::ErrorKind::WrongNode,
        _ => false,
    }
}

fn to_rpc_error<E: std::error::Error>(e: PeerError) -> RPCError<NodeId, PeerNode, E> {
    if unreachable(&e) { RPCError::Unreachable(Unreachable::new(&e)) } else { RPCError::Network(NetworkError::new(&e)) }
}

impl PeerConnection {
    /// openraft asks heartbeats to finish within one heartbeat interval. On loaded machines (VMs
    /// under emulation) that is too tight: a late answer still proves the peer is alive, while a
    /// timeout makes the leader back off and can cost it its lease. So the configured RPC timeout
    /// is the bound when it is longer.
    fn rpc_timeout(&self, option: &RPCOption) -> Duration {
        option.hard_ttl().max(self.net.rpc_timeout)
    }
}

impl RaftNetwork<TypeConfig> for PeerConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let t = self.rpc_timeout(&option);
        self.rpc(paths::RAFT_APPEND, &rpc, t).await
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        // With `generic-snapshot-data` openraft sends snapshots through `full_snapshot` only.
        Err(RPCError::Network(NetworkError::new(
            &Msg("chunked snapshot transfer is not used; full_snapshot is".into()),
        )))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, PeerNode, RaftError<NodeId>>> {
        let t = self.rpc_timeout(&option);
        self.rpc(paths::RAFT_VOTE, &rpc, t).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let data = String::from_utf8(*snapshot.snapshot)
            .map_err(|e| StreamingError::Network(NetworkError::new(&Msg(format!("snapshot is not UTF-8: {e}")))))?;
        let req = SnapshotRequest { vote, meta: snapshot.meta, data };
        let path = format!("{}/{}", paths::RAFT_SNAPSHOT, self.target);
        let call = self.net.client.call::<_, Result<SnapshotResponse<NodeId>, Fatal<NodeId>>>(
            &self.addr,
            self.target,
            &path,
            &req,
            self.net.snapshot_timeout,
        );
        let r = tokio::select! {
            r = call => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        let r = r.map_err(|e| {
            if unreachable(&e) {
                StreamingError::Unreachable(Unreachable::new(&e))
            } else {
                StreamingError::Network(NetworkError::new(&e))
            }
        })?;
        self.net.contacts.record(self.target);
        r.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }
}
