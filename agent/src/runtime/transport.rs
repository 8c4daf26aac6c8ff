//! Which address Raft and the peer API use for each member: the leader moves a member onto its
//! mesh address once it answers there, and back to the underlay if its tunnel breaks. The choice
//! is [`crate::core::membership::choose_transport`]'s; this module probes and commits it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use openraft::ChangeMembers;

use crate::core::raft_types::PeerNode;
use tracing::info;

use super::ApiError;
use crate::adapters::raft::RaftMetrics;
use crate::core::membership::{self};
use crate::core::state::NodeId;
use crate::proto::{HelloRequest, HelloResponse, paths};

use super::Node;

impl Node {
    /// Leader: moves members' Raft (and peer API) addresses onto the mesh once they answer there,
    /// and back to the underlay if a member's tunnel breaks. Joins and discovery always use the
    /// underlay addresses; everything else follows the Raft membership's addresses. Probes run at
    /// most every 5 s and only for members that are off the mesh or quiet on it.
    pub(super) async fn ensure_transport(&self, m: &RaftMetrics) -> Result<(), ApiError> {
        const PERIOD: Duration = Duration::from_secs(5);
        {
            let mut l = self.leader.lock().expect("leader lock");
            let Some(l) = l.as_mut() else { return Ok(()) };
            if l.transport_probe.is_some_and(|t| t.elapsed() < PERIOD) {
                return Ok(());
            }
            l.transport_probe = Some(Instant::now());
        }
        let nodes: Vec<(NodeId, String)> =
            m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
        let records = self.state.read(|d| d.state.members.clone());
        let mut views = Vec::new();
        for (id, current) in nodes {
            let Some(rec) = records.get(&id) else { continue };
            let mesh = rec.mesh_addr();
            let silent = if id == self.id() {
                if self.mesh_up() { Duration::ZERO } else { Duration::MAX }
            } else {
                self.silent_for(id)
            };
            if !membership::needs_transport_probe(&current, mesh.as_deref(), silent, &self.cfg.health) {
                continue;
            }
            views.push((
                id,
                membership::TransportView {
                    current,
                    underlay: rec.spec.api_addr.clone(),
                    mesh,
                    mesh_answers: false,
                    underlay_answers: false,
                    silent_for: silent,
                },
            ));
        }
        if views.is_empty() {
            return Ok(());
        }
        // Members already reached over the mesh: proof that the leader's own tunnel works.
        let others_on_mesh = records.iter().any(|(id, r)| {
            *id != self.id()
                && r.mesh_addr().is_some_and(|a| {
                    m.membership_config.membership().get_node(id).is_some_and(|n| n.addr == a)
                        && self.silent_for(*id) < self.cfg.health.suspect_after()
                })
        });
        let probes = views.iter().map(|(id, v)| async move {
            if *id == self.id() {
                // Settled below, from the other members' answers.
                return (false, true);
            }
            let mesh = match &v.mesh {
                Some(a) => self.answers_as(a, *id).await,
                None => false,
            };
            let underlay = if v.mesh.as_ref() == Some(&v.current) && !mesh {
                self.answers_as(&v.underlay, *id).await
            } else {
                false
            };
            (mesh, underlay)
        });
        let mut answers = futures::future::join_all(probes).await;
        // The leader moves itself once its mesh address is up and some member answers it over the
        // mesh: then followers reach it there too.
        let some_answered = views.iter().zip(&answers).any(|((id, _), (mesh, _))| *id != self.id() && *mesh);
        for ((id, _), a) in views.iter().zip(answers.iter_mut()) {
            if *id == self.id() {
                a.0 = self.mesh_up() && (others_on_mesh || some_answered);
            }
        }
        let mut changes = BTreeMap::new();
        for ((id, mut v), (mesh, underlay)) in views.into_iter().zip(answers) {
            v.mesh_answers = mesh;
            v.underlay_answers = underlay;
            if let Some(addr) = membership::choose_transport(&v, &self.cfg.health) {
                let via = if Some(&addr) == v.mesh.as_ref() { "mesh" } else { "underlay" };
                info!(node_id = %self.id(), peer = %id, addr = %addr, via, "moving the member's Raft address");
                // The address moves; the node key the membership records stays.
                let key =
                    m.membership_config.membership().get_node(&id).map(|n| n.node_key.clone()).unwrap_or_default();
                changes.insert(id, PeerNode::new(&addr, key));
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        self.change_membership(ChangeMembers::SetNodes(changes), true).await
    }

    /// Whether the node at `addr` answers a signed hello as node `id`.
    pub(super) async fn answers_as(&self, addr: &str, id: NodeId) -> bool {
        let req = HelloRequest { from: self.candidate(true, None) };
        let t = Duration::from_millis(self.cfg.raft.rpc_timeout_ms);
        matches!(self.client.call_any::<_, HelloResponse>(addr, paths::HELLO, &req, t).await, Ok(r) if r.me.id == id)
    }
}
