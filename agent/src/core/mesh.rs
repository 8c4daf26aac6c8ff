//! The WireGuard mesh planner (pure): the device this node should have, derived from the committed
//! cluster state, compared with the device it has, gives the list of changes to make. Peers are
//! matched by public key and updated in place, so a change to one peer never tears down the
//! sessions of the others.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use crate::core::state::{ClusterState, NodeId};

pub const WG_INTERFACE: &str = "wg0";
pub const WG_PORT: u16 = 51820;
pub const KEEPALIVE_SECS: u16 = 25;
/// The default mesh network.
pub const MESH_NET: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 0);
pub const MESH_PREFIX: u8 = 16;

/// One peer of the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: BTreeSet<(Ipv4Addr, u8)>,
    pub keepalive_secs: Option<u16>,
}

/// The device as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredDevice {
    pub public_key: String,
    pub listen_port: u16,
    pub address: (Ipv4Addr, u8),
    pub peers: BTreeMap<String, PeerConfig>,
}

/// The device as read from the kernel. `exists == false` means there is no link yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedDevice {
    pub exists: bool,
    pub up: bool,
    pub public_key: Option<String>,
    pub listen_port: Option<u16>,
    pub addresses: BTreeSet<(Ipv4Addr, u8)>,
    pub peers: BTreeMap<String, PeerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshChange {
    CreateLink,
    /// Set the private key (the adapter holds it) and the listen port.
    ConfigureDevice {
        listen_port: u16,
    },
    AddAddress((Ipv4Addr, u8)),
    RemoveAddress((Ipv4Addr, u8)),
    SetUp,
    AddPeer(PeerConfig),
    /// Update endpoint, allowed IPs (replacing them) and keepalive of an existing peer in place.
    UpdatePeer(PeerConfig),
    RemovePeer {
        public_key: String,
    },
}

/// The lowest free host address of `net/prefix` not in `used` (network and broadcast excluded).
pub fn allocate_mesh_ip(net: Ipv4Addr, prefix: u8, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
    let base = u32::from(net) & (u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
    let size = 1u64 << (32 - u32::from(prefix));
    (1..size.saturating_sub(1)).map(|off| Ipv4Addr::from(base + off as u32)).find(|ip| !used.contains(ip))
}

/// The WireGuard endpoint of a member: the host of its peer API address, on the WireGuard port.
fn endpoint_of(api_addr: &str) -> Option<SocketAddr> {
    let sa: SocketAddr = api_addr.parse().ok()?;
    Some(SocketAddr::new(sa.ip(), WG_PORT))
}

/// The device node `me` should have, or `None` while it has no mesh address yet.
pub fn desired_device(state: &ClusterState, me: NodeId, prefix: u8) -> Option<DesiredDevice> {
    let mine = state.members.get(&me)?;
    let address = (mine.mesh_ip?, prefix);
    let peers = state
        .members
        .values()
        .filter(|m| m.spec.id != me && !m.spec.wg_public_key.is_empty())
        .filter_map(|m| {
            let ip = m.mesh_ip?;
            Some(PeerConfig {
                public_key: m.spec.wg_public_key.clone(),
                endpoint: endpoint_of(&m.spec.api_addr)
                    .filter(|e| !matches!(e.ip(), IpAddr::V4(v) if v.is_unspecified())),
                allowed_ips: [(ip, 32)].into(),
                keepalive_secs: Some(KEEPALIVE_SECS),
            })
        })
        .map(|p| (p.public_key.clone(), p))
        .collect();
    Some(DesiredDevice { public_key: mine.spec.wg_public_key.clone(), listen_port: WG_PORT, address, peers })
}

/// The changes that turn `observed` into `desired`, in the order they must be applied.
pub fn plan(desired: &DesiredDevice, observed: &ObservedDevice) -> Vec<MeshChange> {
    let mut out = Vec::new();
    if !observed.exists {
        out.push(MeshChange::CreateLink);
    }
    if observed.public_key.as_deref() != Some(desired.public_key.as_str())
        || observed.listen_port != Some(desired.listen_port)
    {
        out.push(MeshChange::ConfigureDevice { listen_port: desired.listen_port });
    }
    for a in observed.addresses.iter().filter(|a| **a != desired.address) {
        out.push(MeshChange::RemoveAddress(*a));
    }
    if !observed.addresses.contains(&desired.address) {
        out.push(MeshChange::AddAddress(desired.address));
    }
    if !observed.up {
        out.push(MeshChange::SetUp);
    }
    for key in observed.peers.keys().filter(|k| !desired.peers.contains_key(*k)) {
        out.push(MeshChange::RemovePeer { public_key: key.clone() });
    }
    for (key, want) in &desired.peers {
        match observed.peers.get(key) {
            None => out.push(MeshChange::AddPeer(want.clone())),
            // A peer that roamed keeps its learned endpoint when we have none to offer.
            Some(have)
                if have != want
                    && !(want.endpoint.is_none()
                        && have.allowed_ips == want.allowed_ips
                        && have.keepalive_secs == want.keepalive_secs) =>
            {
                out.push(MeshChange::UpdatePeer(want.clone()))
            }
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::core::state::{Command, MemberSpec, NodeFacts};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn peer(key: &str, host: &str, mesh: &str) -> PeerConfig {
        PeerConfig {
            public_key: key.into(),
            endpoint: Some(format!("{host}:{WG_PORT}").parse().unwrap()),
            allowed_ips: [(ip(mesh), 32)].into(),
            keepalive_secs: Some(KEEPALIVE_SECS),
        }
    }

    fn desired(peers: &[PeerConfig]) -> DesiredDevice {
        DesiredDevice {
            public_key: "me".into(),
            listen_port: WG_PORT,
            address: (ip("10.90.0.1"), 16),
            peers: peers.iter().map(|p| (p.public_key.clone(), p.clone())).collect(),
        }
    }

    fn observed_matching(d: &DesiredDevice) -> ObservedDevice {
        ObservedDevice {
            exists: true,
            up: true,
            public_key: Some(d.public_key.clone()),
            listen_port: Some(d.listen_port),
            addresses: [d.address].into(),
            peers: d.peers.clone(),
        }
    }

    #[test]
    fn table_of_desired_and_observed_cases() {
        let a = peer("A", "192.168.1.2", "10.90.0.2");
        let b = peer("B", "192.168.1.3", "10.90.0.3");
        let d = desired(&[a.clone(), b.clone()]);
        let in_sync = observed_matching(&d);

        let cases: Vec<(&str, ObservedDevice, Vec<MeshChange>)> = vec![
            (
                "no device",
                ObservedDevice::default(),
                vec![
                    MeshChange::CreateLink,
                    MeshChange::ConfigureDevice { listen_port: WG_PORT },
                    MeshChange::AddAddress((ip("10.90.0.1"), 16)),
                    MeshChange::SetUp,
                    MeshChange::AddPeer(a.clone()),
                    MeshChange::AddPeer(b.clone()),
                ],
            ),
            ("in sync", in_sync.clone(), vec![]),
            (
                "a peer is missing",
                ObservedDevice { peers: [("A".to_string(), a.clone())].into(), ..in_sync.clone() },
                vec![MeshChange::AddPeer(b.clone())],
            ),
            (
                "a stale peer is present",
                ObservedDevice {
                    peers: [
                        ("A".into(), a.clone()),
                        ("B".into(), b.clone()),
                        ("C".into(), peer("C", "192.168.1.9", "10.90.0.9")),
                    ]
                    .into(),
                    ..in_sync.clone()
                },
                vec![MeshChange::RemovePeer { public_key: "C".into() }],
            ),
            (
                "a peer's endpoint changed: updated in place, the other untouched",
                ObservedDevice {
                    peers: [("A".into(), peer("A", "192.168.1.77", "10.90.0.2")), ("B".into(), b.clone())].into(),
                    ..in_sync.clone()
                },
                vec![MeshChange::UpdatePeer(a.clone())],
            ),
            (
                "keepalive missing",
                ObservedDevice {
                    peers: [("A".into(), PeerConfig { keepalive_secs: None, ..a.clone() }), ("B".into(), b.clone())]
                        .into(),
                    ..in_sync.clone()
                },
                vec![MeshChange::UpdatePeer(a.clone())],
            ),
            (
                "wrong address and link down",
                ObservedDevice { up: false, addresses: [(ip("10.90.0.50"), 16)].into(), ..in_sync.clone() },
                vec![
                    MeshChange::RemoveAddress((ip("10.90.0.50"), 16)),
                    MeshChange::AddAddress((ip("10.90.0.1"), 16)),
                    MeshChange::SetUp,
                ],
            ),
            (
                "key changed (reinstalled identity)",
                ObservedDevice { public_key: Some("old".into()), ..in_sync.clone() },
                vec![MeshChange::ConfigureDevice { listen_port: WG_PORT }],
            ),
        ];
        for (name, observed, want) in cases {
            assert_eq!(plan(&d, &observed), want, "case: {name}");
        }
    }

    #[test]
    fn roamed_endpoint_is_kept_when_state_has_none() {
        let mut a = peer("A", "192.168.1.2", "10.90.0.2");
        let observed_a = a.clone();
        a.endpoint = None;
        let d = desired(&[a]);
        let mut o = observed_matching(&d);
        o.peers.insert("A".into(), observed_a);
        assert_eq!(plan(&d, &o), vec![]);
    }

    #[test]
    fn allocation_skips_used_network_and_broadcast() {
        let used: BTreeSet<Ipv4Addr> = [ip("10.90.0.1"), ip("10.90.0.2")].into();
        assert_eq!(allocate_mesh_ip(MESH_NET, 16, &used), Some(ip("10.90.0.3")));
        assert_eq!(allocate_mesh_ip(ip("10.1.2.0"), 30, &BTreeSet::new()), Some(ip("10.1.2.1")));
        let full: BTreeSet<Ipv4Addr> = [ip("10.1.2.1"), ip("10.1.2.2")].into();
        assert_eq!(allocate_mesh_ip(ip("10.1.2.0"), 30, &full), None);
    }

    #[test]
    fn desired_device_from_state() {
        let mut s = ClusterState::default();
        s.apply_membership([NodeId(1), NodeId(2), NodeId(3)].into(), BTreeSet::new());
        for id in 1..=3u64 {
            let spec = MemberSpec {
                id: NodeId(id),
                name: format!("n{}", id),
                api_addr: format!("192.168.1.{}:7600", id),
                wg_public_key: crate::core::state::test_wg_key(id),
                facts: NodeFacts::default(),
                labels: BTreeMap::new(),
                cluster_keys: Vec::new(),
            };
            s.apply(id, &Command::UpsertMember { spec, at_ms: 0 });
        }
        assert_eq!(desired_device(&s, NodeId(1), 16), None, "no mesh address yet");
        s.apply(4, &Command::AssignMeshIp { id: NodeId(1), ip: ip("10.90.0.1") });
        s.apply(5, &Command::AssignMeshIp { id: NodeId(2), ip: ip("10.90.0.2") });
        let d = desired_device(&s, NodeId(1), 16).unwrap();
        assert_eq!(d.address, (ip("10.90.0.1"), 16));
        assert_eq!(d.public_key, crate::core::state::test_wg_key(1));
        // Node 3 has no mesh address yet: not a peer until it has one.
        let k2 = crate::core::state::test_wg_key(2);
        assert_eq!(d.peers.keys().cloned().collect::<Vec<_>>(), vec![k2.clone()]);
        assert_eq!(d.peers[&k2], peer(&k2, "192.168.1.2", "10.90.0.2"));
    }
}
