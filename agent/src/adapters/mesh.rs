//! The mesh boundary: what the runtime needs from a WireGuard device (read it, change it), as a
//! narrow trait. [`WgNetlink`] is the real one (netlink); [`FakeMesh`] keeps a device in memory and
//! applies the planned changes the way the kernel does, so the mesh loop is tested without one.

use std::future::Future;

use crate::adapters::wireguard::{PeerStats, WgError, WgNetlink};
use crate::core::mesh::{MeshChange, ObservedDevice};

/// A WireGuard device the agent reconciles.
pub trait Mesh: Send {
    /// The device as it is, and its peers' counters.
    fn observe(&mut self) -> impl Future<Output = Result<(ObservedDevice, Vec<PeerStats>), WgError>> + Send;
    /// Applies planned changes in order; the private key is set with the device's configuration.
    fn apply(
        &mut self,
        private_key: &[u8; 32],
        changes: &[MeshChange],
    ) -> impl Future<Output = Result<(), WgError>> + Send;
}

impl Mesh for WgNetlink {
    async fn observe(&mut self) -> Result<(ObservedDevice, Vec<PeerStats>), WgError> {
        WgNetlink::observe(self).await
    }

    async fn apply(&mut self, private_key: &[u8; 32], changes: &[MeshChange]) -> Result<(), WgError> {
        WgNetlink::apply(self, private_key, changes).await
    }
}

/// A device in memory: changes apply as the kernel applies them (a change to a missing link
/// fails), every call is recorded, and the next call can be made to fail.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FakeMesh {
    pub device: ObservedDevice,
    /// Every change applied, in order.
    pub applied: Vec<MeshChange>,
    /// The error the next call returns (then cleared).
    pub fail_next: Option<WgError>,
}

#[cfg(test)]
impl FakeMesh {
    fn take_failure(&mut self) -> Result<(), WgError> {
        self.fail_next.take().map_or(Ok(()), Err)
    }

    fn change(&mut self, key: &[u8; 32], c: &MeshChange) -> Result<(), WgError> {
        let d = &mut self.device;
        if !d.exists && *c != MeshChange::CreateLink {
            return Err(WgError::Netlink(format!("{c:?}: no such device")));
        }
        match c {
            MeshChange::CreateLink => d.exists = true,
            MeshChange::ConfigureDevice { listen_port } => {
                d.listen_port = Some(*listen_port);
                // The public key the kernel derives from the private key.
                d.public_key = Some(crate::adapters::identity::wg_public_key(key));
            }
            MeshChange::AddAddress(a) => {
                d.addresses.insert(*a);
            }
            MeshChange::RemoveAddress(a) => {
                d.addresses.remove(a);
            }
            MeshChange::SetUp => d.up = true,
            MeshChange::AddPeer(p) | MeshChange::UpdatePeer(p) => {
                d.peers.insert(p.public_key.clone(), p.clone());
            }
            MeshChange::RemovePeer { public_key } => {
                d.peers.remove(public_key);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
impl Mesh for FakeMesh {
    async fn observe(&mut self) -> Result<(ObservedDevice, Vec<PeerStats>), WgError> {
        self.take_failure()?;
        let stats = self
            .device
            .peers
            .values()
            .map(|p| PeerStats {
                public_key: p.public_key.clone(),
                endpoint: p.endpoint,
                handshake_age_secs: None,
                rx_bytes: 0,
                tx_bytes: 0,
            })
            .collect();
        Ok((self.device.clone(), stats))
    }

    async fn apply(&mut self, private_key: &[u8; 32], changes: &[MeshChange]) -> Result<(), WgError> {
        self.take_failure()?;
        for c in changes {
            self.change(private_key, c)?;
            self.applied.push(c.clone());
        }
        Ok(())
    }
}
