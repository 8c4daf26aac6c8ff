//! LAN beacons as a node hears them from anyone on its LAN: `BeaconBook::receive` on arbitrary
//! datagrams, and on datagrams signed with the cluster's key (so the fuzzer gets past the MAC to
//! the checks behind it).
//!
//! Input: `[mode]` then, for mode 0, one raw datagram; for mode 1, the fields of a beacon (node id
//! 8 bytes, time offset from now in ms 4 bytes, sequence 2 bytes, flags 1 byte, port 2 bytes,
//! IPv4 4 bytes, then the name), encoded and signed as a node of the cluster would.
//!
//! Checked: nothing panics; a datagram taken is the canonical encoding of what the book recorded
//! (one beacon, one datagram); the same datagram again is a replay; every table stays bounded.

#![forbid(unsafe_code)]
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use clusteros::core::beacon::{Beacon, BeaconBook, BeaconKey, BeaconRefusal, Heard, MAX_BEACON, encode};
use clusteros::core::ids::NodeId;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-cluster-secret-0123456789";
const NOW: i64 = 1_750_000_000_000;

fn signed(key: &BeaconKey, f: &[u8]) -> Option<Vec<u8>> {
    if f.len() < 21 {
        return None;
    }
    let ip = Ipv4Addr::new(f[17], f[18], f[19], f[20]);
    let beacon = Beacon {
        node: NodeId(u64::from_be_bytes(f[0..8].try_into().ok()?)),
        time_ms: NOW + i64::from(i32::from_be_bytes(f[8..12].try_into().ok()?)),
        seq: u64::from(u16::from_be_bytes([f[12], f[13]])),
        member: f[14] & 1 == 1,
        api_addr: SocketAddr::new(IpAddr::V4(ip), u16::from_be_bytes([f[15], f[16]])),
        name: String::from_utf8_lossy(&f[21..]).into_owned(),
    };
    Some(encode(&beacon, key))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let key = BeaconKey::derive(SECRET);
    let mut book = BeaconBook::new(NodeId(1), vec![key.clone()]);
    let datagram = match mode % 2 {
        0 => rest.to_vec(),
        _ => match signed(&key, rest) {
            Some(d) => d,
            None => return,
        },
    };
    let from = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    match book.receive(from, &datagram, NOW) {
        Heard::Peer { node, new } => {
            assert!(new, "the first beacon of a node is news");
            assert!(datagram.len() <= MAX_BEACON);
            let p = book.peers(NOW, 0).into_iter().find(|p| p.node == node).expect("a peer taken is recorded");
            let again = Beacon {
                node,
                name: p.name.clone(),
                api_addr: p.api_addr,
                member: p.member,
                time_ms: i64::from_be_bytes(datagram[18..26].try_into().unwrap()),
                seq: u64::from_be_bytes(datagram[26..34].try_into().unwrap()),
            };
            assert_eq!(encode(&again, &key), datagram, "a beacon taken is not its canonical encoding");
            assert_eq!(book.receive(from, &datagram, NOW), Heard::Refused(BeaconRefusal::Replayed));
        }
        Heard::Neighbour => assert_eq!(book.neighbours(NOW, 0).len(), 1),
        Heard::Own | Heard::Refused(_) => assert!(book.peers(NOW, 0).is_empty()),
    }
});
