//! LAN beacons: how identical machines that know only the cluster secret find each other.
//!
//! Every node sends a small UDP datagram now and then to its LAN's broadcast address: "node `id`,
//! named `name`, is reachable at `api_addr`, and is (or is not yet) a member of the cluster whose
//! key has this fingerprint". It is authenticated with a key derived from the cluster secret (an
//! HMAC-SHA256 over every byte before it), so a beacon tells nothing that the signed peer API
//! would not: a receiver only learns an address to say hello to, over TLS, with signed requests.
//! Beacons are never answered. A beacon is taken only
//! - from a datagram of the exact layout below (at most [`MAX_BEACON`] bytes, nothing after it),
//! - if its MAC verifies with one of this node's cluster secrets (the rotation's accepted ones
//!   too),
//! - within [`crate::core::auth::REPLAY_WINDOW`] of this node's clock, and later (by time, then
//!   sequence) than the last one taken from the same node, so a captured beacon cannot be played
//!   back,
//! - while its source address has tokens left ([`RATE_BURST`], refilled at [`RATE_PER_S`] per
//!   second), so a flood costs a bounded number of MAC checks.
//!
//! A well-formed beacon whose fingerprint is not one of this node's is another cluster's: it is
//! remembered as a *neighbour* (at most [`MAX_NEIGHBOURS`], shown by `clusteros status`) and
//! nothing else. A beacon that claims one of this node's fingerprints but does not verify is a
//! forgery or a corrupted datagram, and is only counted. Every table here is bounded.
//!
//! Layout (big-endian): `"COSB"`, version 1, flags (bit 0: member), fingerprint (4 bytes), node id
//! (8), time in unix ms (8, signed), sequence (8), address family (4 or 6), IP (4 or 16), port
//! (2), name length (1) and name (1-63 bytes of a host name), MAC (32).
//!
//! Pure: the caller passes the clock and the datagrams; the socket is `adapters::beacon`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::core::auth::{ClusterKey, REPLAY_WINDOW, hex};
use crate::core::ids::NodeId;

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 4] = b"COSB";
const VERSION: u8 = 1;
const FLAG_MEMBER: u8 = 1;
const MAC_LEN: usize = 32;
/// The largest datagram that can be a beacon (an IPv6 address and a 63-byte name make 147).
pub const MAX_BEACON: usize = 160;
/// Beacons a source address may send at once, and how many more per second.
pub const RATE_BURST: f64 = 10.0;
pub const RATE_PER_S: f64 = 5.0;
/// Source addresses whose rate is tracked; beyond it the fullest buckets are forgotten.
pub const MAX_SOURCES: usize = 1024;
/// Nodes of this cluster remembered (the most recently heard are kept).
pub const MAX_PEERS: usize = 4096;
/// Nodes of other clusters remembered.
pub const MAX_NEIGHBOURS: usize = 64;

/// The key beacons are signed with, derived from the cluster secret (not the peer API's key), and
/// the fingerprint of the cluster key that beacons carry in the clear.
#[derive(Clone)]
pub struct BeaconKey {
    mac: [u8; 32],
    fingerprint: [u8; 4],
}

impl std::fmt::Debug for BeaconKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BeaconKey({})", hex(&self.fingerprint))
    }
}

impl BeaconKey {
    pub fn derive(secret: &str) -> BeaconKey {
        let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
        mac.update(b"clusteros lan beacon v1");
        BeaconKey {
            mac: mac.finalize().into_bytes().into(),
            fingerprint: ClusterKey::derive(secret).fingerprint_bytes(),
        }
    }

    /// The cluster key's fingerprint, as `ClusterKey::fingerprint` writes it (8 hex digits).
    pub fn fingerprint(&self) -> String {
        hex(&self.fingerprint)
    }

    fn tag(&self, signed: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.mac).expect("HMAC accepts any key length");
        mac.update(signed);
        mac
    }
}

/// What a beacon says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    pub node: NodeId,
    pub name: String,
    pub api_addr: SocketAddr,
    /// The sender is a member of a formed cluster.
    pub member: bool,
    pub time_ms: i64,
    /// Counts the sender's beacons within one run (a restart begins again; the time orders runs).
    pub seq: u64,
}

/// Why a datagram was not taken as a beacon of this cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BeaconRefusal {
    #[error("not a ClusterOS beacon (wrong magic, version or layout)")]
    Malformed,
    #[error("longer than a beacon can be")]
    Oversized,
    #[error("too many beacons from this address: dropped")]
    RateLimited,
    #[error("names this cluster but does not verify with its secret (forged or corrupted)")]
    BadMac,
    #[error("its time is outside the replay window of this node's clock (check time sync)")]
    Stale,
    #[error("not later than one already taken from that node (replayed)")]
    Replayed,
}

impl BeaconRefusal {
    /// The label of this refusal in metrics.
    pub fn label(self) -> &'static str {
        match self {
            BeaconRefusal::Malformed => "malformed",
            BeaconRefusal::Oversized => "oversized",
            BeaconRefusal::RateLimited => "rate_limited",
            BeaconRefusal::BadMac => "bad_mac",
            BeaconRefusal::Stale => "stale",
            BeaconRefusal::Replayed => "replayed",
        }
    }

    pub const ALL: [BeaconRefusal; 6] = [
        BeaconRefusal::Malformed,
        BeaconRefusal::Oversized,
        BeaconRefusal::RateLimited,
        BeaconRefusal::BadMac,
        BeaconRefusal::Stale,
        BeaconRefusal::Replayed,
    ];
}

/// The datagram of `b`, signed with `key`.
pub fn encode(b: &Beacon, key: &BeaconKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_BEACON);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(if b.member { FLAG_MEMBER } else { 0 });
    out.extend_from_slice(&key.fingerprint);
    out.extend_from_slice(&b.node.get().to_be_bytes());
    out.extend_from_slice(&b.time_ms.to_be_bytes());
    out.extend_from_slice(&b.seq.to_be_bytes());
    match b.api_addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&b.api_addr.port().to_be_bytes());
    let name = &b.name.as_bytes()[..b.name.len().min(63)];
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    let tag = key.tag(&out).finalize().into_bytes();
    out.extend_from_slice(&tag);
    out
}

/// A datagram read by its layout, before its MAC is checked.
struct Parsed<'a> {
    beacon: Beacon,
    fingerprint: [u8; 4],
    signed: &'a [u8],
    mac: &'a [u8],
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BeaconRefusal> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len()).ok_or(BeaconRefusal::Malformed)?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BeaconRefusal> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, BeaconRefusal> {
    if bytes.len() > MAX_BEACON {
        return Err(BeaconRefusal::Oversized);
    }
    let mut r = Reader { bytes, at: 0 };
    if r.take(4)? != MAGIC || r.array::<1>()?[0] != VERSION {
        return Err(BeaconRefusal::Malformed);
    }
    let flags = r.array::<1>()?[0];
    if flags & !FLAG_MEMBER != 0 {
        return Err(BeaconRefusal::Malformed);
    }
    let fingerprint = r.array::<4>()?;
    let node = NodeId(u64::from_be_bytes(r.array()?));
    let time_ms = i64::from_be_bytes(r.array()?);
    let seq = u64::from_be_bytes(r.array()?);
    let ip = match r.array::<1>()?[0] {
        4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
        6 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
        _ => return Err(BeaconRefusal::Malformed),
    };
    let port = u16::from_be_bytes(r.array()?);
    let len = usize::from(r.array::<1>()?[0]);
    let name = std::str::from_utf8(r.take(len)?).map_err(|_| BeaconRefusal::Malformed)?;
    let host_name = crate::core::config::validate_node_name(name).is_ok();
    if !host_name || port == 0 || ip.is_unspecified() || ip.is_multicast() {
        return Err(BeaconRefusal::Malformed);
    }
    let signed_len = r.at;
    let mac = r.take(MAC_LEN)?;
    if r.at != bytes.len() {
        return Err(BeaconRefusal::Malformed);
    }
    let beacon = Beacon {
        node,
        name: name.to_string(),
        api_addr: SocketAddr::new(ip, port),
        member: flags & FLAG_MEMBER != 0,
        time_ms,
        seq,
    };
    Ok(Parsed { beacon, fingerprint, signed: &bytes[..signed_len], mac })
}

/// A node of this cluster that a beacon announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeardPeer {
    pub node: NodeId,
    pub name: String,
    pub api_addr: SocketAddr,
    pub member: bool,
    /// This node's clock when the last beacon was taken.
    pub heard_ms: i64,
    last: (i64, u64),
}

/// A node of another cluster (another secret) on this LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// The fingerprint of its cluster key (8 hex digits).
    pub fingerprint: String,
    pub node: NodeId,
    pub name: String,
    pub api_addr: SocketAddr,
    pub member: bool,
    pub heard_ms: i64,
}

/// What [`BeaconBook::receive`] made of a datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A beacon of this cluster; `new`: its node or its address was not known before.
    Peer {
        node: NodeId,
        new: bool,
    },
    /// This node's own beacon, back from the broadcast.
    Own,
    /// A beacon of another cluster.
    Neighbour,
    Refused(BeaconRefusal),
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

/// Counts of what was received, for metrics and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BeaconCounts {
    pub peer: u64,
    pub own: u64,
    pub neighbour: u64,
    pub refused: BTreeMap<&'static str, u64>,
}

/// What this node learned from beacons: the nodes of its cluster, its neighbours, and the rate
/// of every source. Bounded in every table.
#[derive(Debug)]
pub struct BeaconBook {
    me: NodeId,
    /// This node's keys, the one it signs with first.
    keys: Vec<BeaconKey>,
    peers: BTreeMap<NodeId, HeardPeer>,
    neighbours: BTreeMap<(String, NodeId), Neighbour>,
    sources: HashMap<IpAddr, Bucket>,
    counts: BeaconCounts,
}

impl BeaconBook {
    /// `keys`: the key this node signs with, then the others it accepts (rotation).
    pub fn new(me: NodeId, keys: Vec<BeaconKey>) -> BeaconBook {
        assert!(!keys.is_empty(), "a beacon book needs this node's key");
        BeaconBook {
            me,
            keys,
            peers: BTreeMap::new(),
            neighbours: BTreeMap::new(),
            sources: HashMap::new(),
            counts: BeaconCounts::default(),
        }
    }

    /// The key this node signs its beacons with.
    pub fn key(&self) -> &BeaconKey {
        &self.keys[0]
    }

    /// Takes (or refuses) the datagram `bytes` from `from`, at `now_ms` on this node's clock.
    pub fn receive(&mut self, from: IpAddr, bytes: &[u8], now_ms: i64) -> Heard {
        let heard = self.judge(from, bytes, now_ms);
        match &heard {
            Heard::Peer { .. } => self.counts.peer += 1,
            Heard::Own => self.counts.own += 1,
            Heard::Neighbour => self.counts.neighbour += 1,
            Heard::Refused(r) => *self.counts.refused.entry(r.label()).or_default() += 1,
        }
        heard
    }

    fn judge(&mut self, from: IpAddr, bytes: &[u8], now_ms: i64) -> Heard {
        if !self.take_token(from, now_ms) {
            return Heard::Refused(BeaconRefusal::RateLimited);
        }
        let p = match parse(bytes) {
            Ok(p) => p,
            Err(r) => return Heard::Refused(r),
        };
        let Some(key) = self.keys.iter().find(|k| k.fingerprint == p.fingerprint) else {
            // Another cluster's: not verifiable here, and trusted for nothing but the display.
            self.remember_neighbour(hex(&p.fingerprint), p.beacon, now_ms);
            return Heard::Neighbour;
        };
        if key.tag(p.signed).verify_slice(p.mac).is_err() {
            return Heard::Refused(BeaconRefusal::BadMac);
        }
        let b = p.beacon;
        if b.time_ms.saturating_sub(now_ms).unsigned_abs() > REPLAY_WINDOW.as_millis() as u64 {
            return Heard::Refused(BeaconRefusal::Stale);
        }
        if b.node == self.me {
            return Heard::Own;
        }
        let stamp = (b.time_ms, b.seq);
        let new = match self.peers.get(&b.node) {
            Some(old) if old.last >= stamp => return Heard::Refused(BeaconRefusal::Replayed),
            Some(old) => old.api_addr != b.api_addr,
            None => true,
        };
        if new && !self.peers.contains_key(&b.node) && self.peers.len() >= MAX_PEERS {
            let oldest = self.peers.values().min_by_key(|p| p.heard_ms).map(|p| p.node);
            if let Some(o) = oldest {
                self.peers.remove(&o);
            }
        }
        let node = b.node;
        self.peers.insert(
            node,
            HeardPeer { node, name: b.name, api_addr: b.api_addr, member: b.member, heard_ms: now_ms, last: stamp },
        );
        Heard::Peer { node, new }
    }

    fn take_token(&mut self, from: IpAddr, now_ms: i64) -> bool {
        if !self.sources.contains_key(&from) && self.sources.len() >= MAX_SOURCES {
            // Forget the sources that have been quiet longest (their buckets are fullest).
            let mut by_age: Vec<(i64, IpAddr)> = self.sources.iter().map(|(ip, b)| (b.at_ms, *ip)).collect();
            by_age.sort();
            for (_, ip) in by_age.into_iter().take(MAX_SOURCES / 4) {
                self.sources.remove(&ip);
            }
        }
        let b = self.sources.entry(from).or_insert(Bucket { tokens: RATE_BURST, at_ms: now_ms });
        let elapsed_s = (now_ms.saturating_sub(b.at_ms)).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed_s * RATE_PER_S).min(RATE_BURST);
        b.at_ms = b.at_ms.max(now_ms);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn remember_neighbour(&mut self, fingerprint: String, b: Beacon, now_ms: i64) {
        let key = (fingerprint.clone(), b.node);
        if !self.neighbours.contains_key(&key) && self.neighbours.len() >= MAX_NEIGHBOURS {
            let oldest = self.neighbours.iter().min_by_key(|(_, n)| n.heard_ms).map(|(k, _)| k.clone());
            if let Some(o) = oldest {
                self.neighbours.remove(&o);
            }
        }
        self.neighbours.insert(
            key,
            Neighbour {
                fingerprint,
                node: b.node,
                name: b.name,
                api_addr: b.api_addr,
                member: b.member,
                heard_ms: now_ms,
            },
        );
    }

    /// The nodes of this cluster heard within `max_age_ms`: where discovery says hello. When some
    /// of them are members of a formed cluster, only up to `max_members` of those (the most
    /// recently heard first): one answer suffices to join it, and a node that joins a cluster of
    /// hundreds need not call every one.
    pub fn discovery_targets(&self, now_ms: i64, max_age_ms: i64, max_members: usize) -> Vec<SocketAddr> {
        let mut fresh: Vec<&HeardPeer> = self.peers.values().filter(|p| now_ms - p.heard_ms <= max_age_ms).collect();
        fresh.sort_by_key(|p| (std::cmp::Reverse(p.heard_ms), p.node));
        if fresh.iter().any(|p| p.member) {
            fresh.into_iter().filter(|p| p.member).take(max_members).map(|p| p.api_addr).collect()
        } else {
            fresh.into_iter().map(|p| p.api_addr).collect()
        }
    }

    /// The nodes of this cluster heard within `max_age_ms`.
    pub fn peers(&self, now_ms: i64, max_age_ms: i64) -> Vec<HeardPeer> {
        self.peers.values().filter(|p| now_ms - p.heard_ms <= max_age_ms).cloned().collect()
    }

    /// The nodes of other clusters heard within `max_age_ms`.
    pub fn neighbours(&self, now_ms: i64, max_age_ms: i64) -> Vec<Neighbour> {
        self.neighbours.values().filter(|n| now_ms - n.heard_ms <= max_age_ms).cloned().collect()
    }

    pub fn counts(&self) -> &BeaconCounts {
        &self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn beacon(node: u64, seq: u64) -> Beacon {
        Beacon {
            node: NodeId(node),
            name: format!("node-{node}"),
            api_addr: SocketAddr::new(Ipv4Addr::from(0x0a00_0000 | node as u32).into(), 7600),
            member: false,
            time_ms: NOW,
            seq,
        }
    }

    fn book() -> BeaconBook {
        BeaconBook::new(NodeId(1), vec![BeaconKey::derive("the-cluster-secret-0123")])
    }

    fn src(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
    }

    #[test]
    fn round_trip_and_own_beacon() {
        let mut b = book();
        let key = b.key().clone();
        let d = encode(&beacon(2, 1), &key);
        assert!(d.len() <= MAX_BEACON);
        assert_eq!(b.receive(src(2), &d, NOW), Heard::Peer { node: NodeId(2), new: true });
        let p = &b.peers(NOW, 1000)[0];
        assert_eq!((p.name.as_str(), p.api_addr.to_string(), p.member), ("node-2", "10.0.0.2:7600".into(), false));
        assert_eq!(b.receive(src(1), &encode(&beacon(1, 1), &key), NOW), Heard::Own);
        // IPv6 and the longest name fit.
        let long = Beacon { name: "a".repeat(63), api_addr: "[fd00::1]:7600".parse().unwrap(), ..beacon(3, 1) };
        let d = encode(&long, &key);
        assert!(d.len() <= MAX_BEACON, "{}", d.len());
        assert_eq!(b.receive(src(3), &d, NOW), Heard::Peer { node: NodeId(3), new: true });
    }

    #[test]
    fn another_secret_is_a_neighbour_and_a_forgery_is_refused() {
        let mut b = book();
        let other = BeaconKey::derive("another-cluster-secret-99");
        assert_eq!(b.receive(src(5), &encode(&beacon(5, 1), &other), NOW), Heard::Neighbour);
        let n = b.neighbours(NOW, 1000);
        assert_eq!((n.len(), n[0].fingerprint.clone()), (1, other.fingerprint()));
        assert!(b.peers(NOW, 1000).is_empty(), "a neighbour is not a peer");
        // Our fingerprint, but signed with another key: forged.
        let mut forged = encode(&beacon(6, 1), &other);
        forged[6..10].copy_from_slice(&b.key().fingerprint);
        assert_eq!(b.receive(src(6), &forged, NOW), Heard::Refused(BeaconRefusal::BadMac));
        // Any flipped bit of a genuine beacon.
        let good = encode(&beacon(7, 1), b.key());
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            let mut fresh = book();
            assert!(
                !matches!(fresh.receive(src(7), &bad, NOW), Heard::Peer { .. }),
                "a beacon with byte {i} changed was taken"
            );
        }
        assert!(b.peers(NOW, 1000).is_empty());
    }

    #[test]
    fn accepted_secrets_of_a_rotation_verify() {
        let old = BeaconKey::derive("the-old-secret-abcdefgh");
        let mut b = BeaconBook::new(NodeId(1), vec![BeaconKey::derive("the-new-secret-abcdefgh"), old.clone()]);
        assert_eq!(b.receive(src(2), &encode(&beacon(2, 1), &old), NOW), Heard::Peer { node: NodeId(2), new: true });
    }

    #[test]
    fn replays_and_stale_beacons_are_refused() {
        let mut b = book();
        let key = b.key().clone();
        let first = encode(&beacon(2, 1), &key);
        assert!(matches!(b.receive(src(2), &first, NOW), Heard::Peer { new: true, .. }));
        assert_eq!(b.receive(src(2), &first, NOW + 10), Heard::Refused(BeaconRefusal::Replayed));
        let second = encode(&beacon(2, 2), &key);
        assert_eq!(b.receive(src(2), &second, NOW + 20), Heard::Peer { node: NodeId(2), new: false });
        assert_eq!(b.receive(src(2), &first, NOW + 30), Heard::Refused(BeaconRefusal::Replayed));
        // A restart: the sequence begins again, the time is later.
        let restarted = Beacon { time_ms: NOW + 5_000, ..beacon(2, 1) };
        assert!(matches!(b.receive(src(2), &encode(&restarted, &key), NOW + 5_000), Heard::Peer { new: false, .. }));
        // A new address is news.
        let moved = Beacon { time_ms: NOW + 6_000, api_addr: "10.0.0.99:7600".parse().unwrap(), ..beacon(2, 2) };
        assert!(matches!(b.receive(src(2), &encode(&moved, &key), NOW + 6_000), Heard::Peer { new: true, .. }));
        let window = REPLAY_WINDOW.as_millis() as i64;
        let old = Beacon { time_ms: NOW - window - 1, ..beacon(3, 1) };
        assert_eq!(b.receive(src(3), &encode(&old, &key), NOW), Heard::Refused(BeaconRefusal::Stale));
        let future = Beacon { time_ms: NOW + window + 1, ..beacon(3, 1) };
        assert_eq!(b.receive(src(3), &encode(&future, &key), NOW), Heard::Refused(BeaconRefusal::Stale));
        let extreme = Beacon { time_ms: i64::MIN, ..beacon(3, 1) };
        assert_eq!(b.receive(src(3), &encode(&extreme, &key), NOW), Heard::Refused(BeaconRefusal::Stale));
    }

    #[test]
    fn malformed_and_oversized_datagrams_are_refused() {
        let mut b = book();
        let good = encode(&beacon(2, 1), b.key());
        let mut longer = good.clone();
        longer.push(0);
        let cases: Vec<(Vec<u8>, BeaconRefusal)> = vec![
            (vec![], BeaconRefusal::Malformed),
            (good[..good.len() - 1].to_vec(), BeaconRefusal::Malformed),
            (longer, BeaconRefusal::Malformed),
            (vec![0; MAX_BEACON + 1], BeaconRefusal::Oversized),
            (b"COSB\x02".to_vec(), BeaconRefusal::Malformed),
        ];
        for (i, (d, want)) in cases.into_iter().enumerate() {
            assert_eq!(b.receive(src(i as u8 + 10), &d, NOW), Heard::Refused(want), "case {i}");
        }
        // Valid MAC over a bad name or address: refused by the layout, before the MAC.
        for bad in [
            Beacon { name: "-bad".into(), ..beacon(4, 1) },
            Beacon { name: String::new(), ..beacon(4, 1) },
            Beacon { name: "has space".into(), ..beacon(4, 1) },
            Beacon { api_addr: "0.0.0.0:7600".parse().unwrap(), ..beacon(4, 1) },
            Beacon { api_addr: "10.0.0.4:0".parse().unwrap(), ..beacon(4, 1) },
            Beacon { api_addr: "224.0.0.1:7600".parse().unwrap(), ..beacon(4, 1) },
        ] {
            assert_eq!(b.receive(src(4), &encode(&bad, b.key()), NOW), Heard::Refused(BeaconRefusal::Malformed));
        }
        assert_eq!(b.counts().refused.values().sum::<u64>(), 11);
    }

    #[test]
    fn a_flood_from_one_address_costs_its_burst_and_then_its_rate() {
        let mut b = book();
        let key = b.key().clone();
        let taken = (0..100u64)
            .filter(|i| matches!(b.receive(src(2), &encode(&beacon(2, i + 1), &key), NOW), Heard::Peer { .. }))
            .count();
        assert_eq!(taken, RATE_BURST as usize);
        // Another address is not held back by it.
        assert!(matches!(b.receive(src(3), &encode(&beacon(3, 1), &key), NOW), Heard::Peer { .. }));
        // One second later: RATE_PER_S more.
        let later = (0..100u64)
            .filter(|i| {
                let d = encode(&Beacon { time_ms: NOW + 1000, ..beacon(2, 1000 + i) }, &key);
                matches!(b.receive(src(2), &d, NOW + 1000), Heard::Peer { .. })
            })
            .count();
        assert_eq!(later, RATE_PER_S as usize);
        assert_eq!(b.counts().refused.get("rate_limited"), Some(&(90 + 95)));
    }

    #[test]
    fn every_table_is_bounded() {
        let mut b = book();
        let key = b.key().clone();
        let other = BeaconKey::derive("another-cluster-secret-99");
        for i in 0..(MAX_PEERS as u64 + 50) {
            let from = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
            let t = NOW + i as i64;
            b.receive(from, &encode(&Beacon { time_ms: t, ..beacon(i + 2, 1) }, &key), t);
            b.receive(from, &encode(&Beacon { time_ms: t, ..beacon(i + 2, 2) }, &other), t);
        }
        assert!(b.peers.len() <= MAX_PEERS);
        assert!(b.neighbours.len() <= MAX_NEIGHBOURS);
        assert!(b.sources.len() <= MAX_SOURCES);
        // The newest are the ones kept.
        assert!(b.peers.contains_key(&NodeId(MAX_PEERS as u64 + 51)));
    }

    #[test]
    fn discovery_targets_prefer_a_few_members_and_forget_the_silent() {
        let mut b = book();
        let key = b.key().clone();
        for n in 2..6u64 {
            b.receive(src(n as u8), &encode(&beacon(n, 1), &key), NOW);
        }
        assert_eq!(b.discovery_targets(NOW, 1000, 2).len(), 4, "no members: every node heard");
        for n in 6..10u64 {
            let t = NOW + n as i64;
            b.receive(src(n as u8), &encode(&Beacon { member: true, time_ms: t, ..beacon(n, 1) }, &key), t);
        }
        let t = b.discovery_targets(NOW + 10, 1000, 2);
        assert_eq!(t, vec!["10.0.0.9:7600".parse().unwrap(), "10.0.0.8:7600".parse().unwrap()]);
        assert!(b.discovery_targets(NOW + 5_000, 1000, 2).is_empty(), "silent for longer than max_age");
    }
}
