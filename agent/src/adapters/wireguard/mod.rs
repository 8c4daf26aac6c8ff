//! The WireGuard adapter: reads and changes `wg0` through netlink only (rtnetlink for the link,
//! its addresses and state; generic netlink with netlink-packet-wireguard for the device and its
//! peers). Message building and dump merging are pure functions, unit-tested without a kernel.

use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

use futures::{StreamExt, TryStreamExt};
use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{WireguardAttribute, WireguardCmd, WireguardMessage};
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkFlags;
use serde::{Deserialize, Serialize};

use crate::core::mesh::{MeshChange, ObservedDevice};

/// Peers per set-device message: large peer sets are split across several messages.
pub const PEERS_PER_MESSAGE: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WgError {
    #[error(
        "the kernel has no WireGuard support (netlink family \"wireguard\" not found, or link type unsupported): the mesh is unavailable on this node; load the wireguard module (it is loaded at boot in the ClusterOS image)"
    )]
    NoKernelSupport,
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("invalid WireGuard key {0:?}: expected 32 bytes in base64")]
    BadKey(String),
}

/// Live counters of one peer, for `clusteros wg`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStats {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    /// Seconds since the last handshake; `None` if there never was one.
    pub handshake_age_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

mod message;

pub use message::{WgMessage, decode_key, decode_message, merge_dump, set_device_messages};

fn nl_err(e: impl std::fmt::Display) -> WgError {
    WgError::Netlink(e.to_string())
}

/// Whether a netlink error code means "no WireGuard in this kernel".
fn is_unsupported(code: i32) -> bool {
    // ENOENT (family lookup), ENODEV / EOPNOTSUPP (link type), EAFNOSUPPORT.
    matches!(code.abs(), 2 | 19 | 95 | 97)
}

fn rt_err(e: rtnetlink::Error) -> WgError {
    if let rtnetlink::Error::NetlinkError(m) = &e
        && m.code.is_some_and(|c| is_unsupported(c.get()))
    {
        return WgError::NoKernelSupport;
    }
    nl_err(e)
}

/// Netlink connections for one interface.
pub struct WgNetlink {
    ifname: String,
    rt: rtnetlink::Handle,
    genl: genetlink::GenetlinkHandle,
}

impl WgNetlink {
    /// Opens the rtnetlink and generic netlink sockets (their tasks run on the current runtime).
    pub fn connect(ifname: &str) -> Result<WgNetlink, WgError> {
        let (conn, rt, _) = rtnetlink::new_connection().map_err(nl_err)?;
        tokio::spawn(conn);
        let (gconn, genl, _) = genetlink::new_connection().map_err(nl_err)?;
        tokio::spawn(gconn);
        Ok(WgNetlink { ifname: ifname.into(), rt, genl })
    }

    async fn link(&self) -> Result<Option<(u32, bool)>, WgError> {
        let mut links = self.rt.link().get().match_name(self.ifname.clone()).execute();
        match links.try_next().await {
            Ok(Some(l)) => {
                let up = l.header.flags.contains(LinkFlags::Up);
                Ok(Some((l.header.index, up)))
            }
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(m)) if m.code.is_some_and(|c| c.get().abs() == 19) => Ok(None),
            Err(e) => Err(nl_err(e)),
        }
    }

    async fn genl_request(&mut self, msg: WireguardMessage, flags: u16) -> Result<Vec<WireguardMessage>, WgError> {
        let mut nl = NetlinkMessage::from(GenlMessage::from_payload(WgMessage(msg)));
        nl.header.flags = flags;
        let mut stream = self.genl.request(nl).await.map_err(|e| {
            let text = e.to_string();
            if text.contains("No such file") || text.contains("os error 2") || text.contains("family") {
                WgError::NoKernelSupport
            } else {
                nl_err(text)
            }
        })?;
        let mut out = Vec::new();
        while let Some(r) = stream.next().await {
            let m = r.map_err(nl_err)?;
            match m.payload {
                NetlinkPayload::InnerMessage(g) => out.push(g.payload.0),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    let code = e.code.map_or(0, |c| c.get());
                    return Err(if is_unsupported(code) { WgError::NoKernelSupport } else { nl_err(e) });
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// Reads the device: link, addresses, keys and peers.
    pub async fn observe(&mut self) -> Result<(ObservedDevice, Vec<PeerStats>), WgError> {
        let Some((index, up)) = self.link().await? else {
            return Ok((ObservedDevice::default(), Vec::new()));
        };
        let get = WireguardMessage {
            cmd: WireguardCmd::GetDevice,
            attributes: vec![WireguardAttribute::IfName(self.ifname.clone())],
        };
        let dump = self.genl_request(get, NLM_F_REQUEST | NLM_F_DUMP).await?;
        let (mut dev, stats) = merge_dump(&dump, SystemTime::now());
        dev.up = up;
        let mut addrs = self.rt.address().get().set_link_index_filter(index).execute();
        while let Some(a) = addrs.try_next().await.map_err(nl_err)? {
            for attr in &a.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = attr {
                    dev.addresses.insert((*ip, a.header.prefix_len));
                }
            }
        }
        Ok((dev, stats))
    }

    /// Applies planned changes in order.
    pub async fn apply(&mut self, private_key: &[u8; 32], changes: &[MeshChange]) -> Result<(), WgError> {
        for c in changes {
            match c {
                MeshChange::CreateLink => {
                    let msg = rtnetlink::LinkWireguard::new(&self.ifname).build();
                    self.rt.link().add(msg).execute().await.map_err(rt_err)?;
                }
                MeshChange::AddAddress((ip, len)) => {
                    let (index, _) = self.link().await?.ok_or_else(|| nl_err("wg0 vanished"))?;
                    self.rt.address().add(index, IpAddr::V4(*ip), *len).execute().await.map_err(rt_err)?;
                }
                MeshChange::RemoveAddress((ip, len)) => {
                    let (index, _) = self.link().await?.ok_or_else(|| nl_err("wg0 vanished"))?;
                    let mut addrs = self.rt.address().get().set_link_index_filter(index).execute();
                    while let Some(a) = addrs.try_next().await.map_err(nl_err)? {
                        let matches = a.header.prefix_len == *len
                            && a.attributes
                                .iter()
                                .any(|x| matches!(x, AddressAttribute::Address(IpAddr::V4(v)) if v == ip));
                        if matches {
                            self.rt.address().del(a).execute().await.map_err(rt_err)?;
                            break;
                        }
                    }
                }
                MeshChange::SetUp => {
                    let (index, _) = self.link().await?.ok_or_else(|| nl_err("wg0 vanished"))?;
                    let msg = rtnetlink::LinkUnspec::new_with_index(index).up().build();
                    self.rt.link().set(msg).execute().await.map_err(rt_err)?;
                }
                _ => {}
            }
        }
        for msg in set_device_messages(&self.ifname, private_key, changes)? {
            self.genl_request(msg, NLM_F_REQUEST | NLM_F_ACK).await?;
        }
        Ok(())
    }
}
