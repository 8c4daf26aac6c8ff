//! The LAN beacon socket: one UDP socket on the beacon port that hears every beacon sent to it
//! and sends this node's to the broadcast address of each interface (or to the configured
//! targets). What a datagram means is [`crate::core::beacon`]'s business, not this module's.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use tokio::net::UdpSocket;

use crate::core::beacon::MAX_BEACON;
use crate::core::config::BeaconSettings;

#[derive(Debug, thiserror::Error)]
pub enum BeaconSocketError {
    #[error(
        "cannot listen for LAN beacons on UDP port {port}: {source}; is another agent running? set discovery.beacon_port to a free port, or discovery.beacon = false"
    )]
    Bind { port: u16, source: std::io::Error },
    #[error("cannot list this host's network interfaces for their broadcast addresses: {0}")]
    Interfaces(nix::Error),
    #[error(
        "no interface to send LAN beacons on (none is up with an IPv4 broadcast address): set discovery.beacon_targets, or give join addresses"
    )]
    NoTargets,
    #[error("cannot send a LAN beacon to {target}: {source}")]
    Send { target: SocketAddr, source: std::io::Error },
}

/// The socket, bound on every address at the beacon port, allowed to broadcast.
pub struct BeaconSocket {
    socket: UdpSocket,
    settings: BeaconSettings,
}

impl BeaconSocket {
    pub async fn open(settings: &BeaconSettings) -> Result<BeaconSocket, BeaconSocketError> {
        let bind = |source| BeaconSocketError::Bind { port: settings.port, source };
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, settings.port)).await.map_err(bind)?;
        socket.set_broadcast(true).map_err(bind)?;
        Ok(BeaconSocket { socket, settings: settings.clone() })
    }

    /// The next datagram and its sender. The buffer is one byte longer than a beacon can be, so
    /// a longer datagram (cut to the buffer) is still seen as too long.
    pub async fn recv(&self) -> std::io::Result<(Vec<u8>, SocketAddr)> {
        let mut buf = vec![0u8; MAX_BEACON + 1];
        let (n, from) = self.socket.recv_from(&mut buf).await?;
        buf.truncate(n);
        Ok((buf, from))
    }

    /// Where beacons go now: the configured targets, else the broadcast address of every
    /// interface that is up and not loopback (interfaces come and go, so this is read each time).
    pub fn targets(&self) -> Result<Vec<SocketAddr>, BeaconSocketError> {
        if !self.settings.targets.is_empty() {
            return Ok(self.settings.targets.clone());
        }
        let targets = interface_broadcasts(self.settings.port)?;
        if targets.is_empty() {
            return Err(BeaconSocketError::NoTargets);
        }
        Ok(targets)
    }

    /// Sends `datagram` to every target; the first failure is returned after trying them all.
    pub async fn send(&self, datagram: &[u8]) -> Result<Vec<SocketAddr>, BeaconSocketError> {
        let targets = self.targets()?;
        let mut first = None;
        for t in &targets {
            if let Err(source) = self.socket.send_to(datagram, t).await {
                first.get_or_insert(BeaconSocketError::Send { target: *t, source });
            }
        }
        first.map_or(Ok(targets), Err)
    }
}

/// The IPv4 broadcast address of every interface that is up, is not loopback and can broadcast,
/// at `port`, without repeats. Computed from each address and its netmask (the directed
/// broadcast), not read from the interface's broadcast field: an address added without `brd`
/// has none there, and glibc then reports the address itself. Prefixes of /31 and /32 have no
/// broadcast address and are skipped.
pub fn interface_broadcasts(port: u16) -> Result<Vec<SocketAddr>, BeaconSocketError> {
    use nix::net::if_::InterfaceFlags;
    let mut out: Vec<SocketAddr> = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(BeaconSocketError::Interfaces)? {
        let usable = ifa.flags.contains(InterfaceFlags::IFF_UP | InterfaceFlags::IFF_BROADCAST)
            && !ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK);
        let v4 =
            |a: &Option<nix::sys::socket::SockaddrStorage>| a.as_ref().and_then(|a| a.as_sockaddr_in()).map(|a| a.ip());
        let (Some(ip), Some(mask)) = (v4(&ifa.address), v4(&ifa.netmask)) else { continue };
        let Some(b) = directed_broadcast(ip, mask) else { continue };
        let addr = SocketAddr::from((b, port));
        if usable && !out.contains(&addr) {
            out.push(addr);
        }
    }
    Ok(out)
}

/// The broadcast address of `ip`'s network with netmask `mask`; `None` for /31 and /32.
pub fn directed_broadcast(ip: Ipv4Addr, mask: Ipv4Addr) -> Option<Ipv4Addr> {
    let m = u32::from(mask);
    (m.count_zeros() >= 2).then(|| Ipv4Addr::from(u32::from(ip) | !m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broadcast_address_comes_from_the_address_and_its_netmask() {
        let b = |ip: &str, mask: &str| directed_broadcast(ip.parse().unwrap(), mask.parse().unwrap());
        assert_eq!(b("10.66.0.39", "255.255.255.0"), Some("10.66.0.255".parse().unwrap()));
        assert_eq!(b("192.168.1.77", "255.255.240.0"), Some("192.168.15.255".parse().unwrap()));
        assert_eq!(b("10.0.0.1", "255.255.255.254"), None);
        assert_eq!(b("10.0.0.1", "255.255.255.255"), None);
    }
}
