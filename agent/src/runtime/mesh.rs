//! The mesh loop: keeps `wg0` matching the committed members through the [`Mesh`] adapter and
//! reports the device as it is.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::core::state::NodeId;

use super::Node;
use super::driver::{Action, LoopError, Reconciler, Triggers, Wake};
use crate::adapters::mesh::Mesh;
use crate::core::mesh::{WG_INTERFACE, desired_device, plan};
use crate::core::state::ClusterState;

/// One peer of the mesh as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPeerReport {
    pub name: Option<String>,
    pub public_key: String,
    pub mesh_ip: Option<std::net::Ipv4Addr>,
    pub endpoint: Option<SocketAddr>,
    /// As of the last reconcile, which is at most 10 s old.
    pub handshake_age_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// This node's WireGuard interface after the last reconcile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MeshReport {
    pub interface: String,
    pub address: Option<String>,
    pub public_key: Option<String>,
    pub listen_port: Option<u16>,
    pub peers: Vec<MeshPeerReport>,
    /// Why the mesh is not (fully) up, with what to do.
    pub error: Option<String>,
}

/// One reconcile of the device: plan the changes from the committed state and what the device
/// has, apply them, and report the device as it then is.
pub(super) async fn reconcile_mesh<M: Mesh>(
    mesh: &mut M,
    state: &ClusterState,
    me: NodeId,
    prefix: u8,
    private_key: &[u8; 32],
) -> MeshReport {
    let mut report = MeshReport { interface: WG_INTERFACE.into(), ..Default::default() };
    let Some(want) = desired_device(state, me, prefix) else {
        report.error = Some("waiting for the leader to assign this node a mesh address".into());
        return report;
    };
    let result = async {
        let (have, _) = mesh.observe().await?;
        let changes = plan(&want, &have);
        if !changes.is_empty() {
            info!(node_id = %me, changes = changes.len(), "reconciling {WG_INTERFACE}");
            mesh.apply(private_key, &changes).await?;
        }
        mesh.observe().await
    }
    .await;
    match result {
        Ok((dev, stats)) => {
            report.address = dev.addresses.iter().next().map(|(ip, len)| format!("{ip}/{len}"));
            report.public_key = dev.public_key.clone();
            report.listen_port = dev.listen_port;
            report.peers = stats
                .into_iter()
                .map(|s| {
                    let m = state.members.values().find(|m| m.spec.wg_public_key == s.public_key);
                    MeshPeerReport {
                        name: m.map(|m| m.spec.name.clone()),
                        mesh_ip: m.and_then(|m| m.mesh_ip),
                        public_key: s.public_key,
                        endpoint: s.endpoint,
                        handshake_age_secs: s.handshake_age_secs,
                        rx_bytes: s.rx_bytes,
                        tx_bytes: s.tx_bytes,
                    }
                })
                .collect();
        }
        Err(e) => {
            warn!(node_id = %me, "mesh: {e}");
            report.error = Some(e.to_string());
        }
    }
    report
}

/// Keeps `wg0` matching the committed members, on every state change and every 10 s. A change
/// that leaves the mesh's inputs alone (a KV write) wakes the loop but costs nothing.
#[derive(Default)]
pub(super) struct MeshLoop {
    device: Option<crate::adapters::wireguard::WgNetlink>,
    /// The state of the last successful reconcile.
    last: Option<ClusterState>,
}

impl Reconciler for MeshLoop {
    const NAME: &'static str = "mesh";
    const TRIGGERS: Triggers = Triggers { state: true, nudge: false, local: false };

    async fn reconcile(&mut self, node: &Arc<Node>, wake: Wake) -> Result<Action, LoopError> {
        const PERIOD: Duration = Duration::from_secs(10);
        let state = node.state.read(|d| d.state.without_kv());
        if !wake.periodic() && self.last.as_ref() == Some(&state) {
            return Ok(Action::After(PERIOD));
        }
        if self.device.is_none() {
            match crate::adapters::wireguard::WgNetlink::connect(WG_INTERFACE) {
                Ok(n) => self.device = Some(n),
                Err(e) => {
                    let report =
                        MeshReport { interface: WG_INTERFACE.into(), error: Some(e.to_string()), ..Default::default() };
                    node.publish_mesh(report);
                    return Ok(Action::After(PERIOD));
                }
            }
        }
        let device = self.device.as_mut().expect("connected above");
        let report =
            reconcile_mesh(device, &state, node.id(), node.cfg.mesh_cidr.1, node.identity.wg_private_key()).await;
        if report.error.is_none() {
            self.last = Some(state);
        }
        node.publish_mesh(report);
        Ok(Action::After(PERIOD))
    }
}

impl Node {
    /// Records the mesh loop's report for status, and whether the mesh is up.
    fn publish_mesh(&self, report: MeshReport) {
        self.set_flag(&self.mesh_wg, report.error.is_none() && report.address.is_some());
        *self.mesh.lock().expect("mesh lock") = Some(report);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::*;
    use crate::adapters::mesh::FakeMesh;
    use crate::adapters::wireguard::WgError;
    use crate::core::mesh::MeshChange;
    use crate::core::state::{Health, Member, MemberSpec, NodeFacts};

    const KEY: [u8; 32] = [7; 32];

    fn state(ids: &[u64]) -> ClusterState {
        let mut s = ClusterState::default();
        for id in ids {
            let key = if *id == 1 { crate::adapters::identity::wg_public_key(&KEY) } else { format!("{:0>43}=", id) };
            s.members.insert(
                NodeId(*id),
                Member {
                    spec: MemberSpec {
                        id: NodeId(*id),
                        name: format!("n{id}"),
                        api_addr: format!("192.168.1.{id}:7600"),
                        wg_public_key: key,
                        facts: NodeFacts::default(),
                        labels: BTreeMap::new(),
                        cluster_keys: Vec::new(),
                    },
                    mesh_ip: Some(Ipv4Addr::new(10, 90, 0, *id as u8)),
                    health: Health::Alive,
                    health_since_ms: 0,
                    registered_at_ms: 0,
                },
            );
        }
        s
    }

    #[tokio::test]
    async fn a_fresh_node_gets_its_device_then_a_member_joins_and_leaves_in_place() {
        let mut mesh = FakeMesh::default();
        let r = reconcile_mesh(&mut mesh, &state(&[1, 2]), NodeId(1), 16, &KEY).await;
        assert_eq!(r.error, None);
        assert_eq!(r.address.as_deref(), Some("10.90.0.1/16"));
        assert_eq!(r.public_key, Some(crate::adapters::identity::wg_public_key(&KEY)));
        assert_eq!(r.peers.iter().map(|p| p.name.as_deref()).collect::<Vec<_>>(), [Some("n2")]);
        assert!(mesh.device.up && mesh.applied.first() == Some(&MeshChange::CreateLink));

        // A third member: one peer added, nothing else touched.
        mesh.applied.clear();
        let r = reconcile_mesh(&mut mesh, &state(&[1, 2, 3]), NodeId(1), 16, &KEY).await;
        assert_eq!(r.peers.len(), 2);
        assert!(matches!(mesh.applied.as_slice(), [MeshChange::AddPeer(p)] if p.public_key.ends_with("3=")));

        // Unchanged state: no change applied.
        mesh.applied.clear();
        reconcile_mesh(&mut mesh, &state(&[1, 2, 3]), NodeId(1), 16, &KEY).await;
        assert_eq!(mesh.applied, []);

        // A member removed: only its peer goes.
        let r = reconcile_mesh(&mut mesh, &state(&[1, 3]), NodeId(1), 16, &KEY).await;
        assert!(matches!(mesh.applied.as_slice(), [MeshChange::RemovePeer { .. }]));
        assert_eq!(r.peers.iter().map(|p| p.name.as_deref()).collect::<Vec<_>>(), [Some("n3")]);
    }

    #[tokio::test]
    async fn without_a_mesh_address_nothing_is_touched_and_the_report_says_why() {
        let mut mesh = FakeMesh::default();
        let mut s = state(&[1, 2]);
        s.members.get_mut(&NodeId(1)).unwrap().mesh_ip = None;
        let r = reconcile_mesh(&mut mesh, &s, NodeId(1), 16, &KEY).await;
        assert!(r.error.unwrap().contains("assign this node a mesh address"));
        assert_eq!(mesh.applied, []);
    }

    #[tokio::test]
    async fn a_kernel_without_wireguard_is_reported_with_the_fix() {
        let mut mesh = FakeMesh { fail_next: Some(WgError::NoKernelSupport), ..Default::default() };
        let r = reconcile_mesh(&mut mesh, &state(&[1, 2]), NodeId(1), 16, &KEY).await;
        assert!(r.error.unwrap().contains("load the wireguard module"));
        assert_eq!(r.address, None);
        // The next round succeeds.
        let r = reconcile_mesh(&mut mesh, &state(&[1, 2]), NodeId(1), 16, &KEY).await;
        assert_eq!(r.error, None);
    }
}
