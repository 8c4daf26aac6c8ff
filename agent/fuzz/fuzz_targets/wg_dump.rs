//! The WireGuard get-device dump as the adapter reads it from the kernel: netlink messages decoded
//! as `NetlinkMessage<GenlMessage<WgMessage>>` (what the adapter's genetlink requests decode, with
//! netlink-packet-core, -generic and -wireguard), their payloads merged by `merge_dump`; and
//! `decode_key` on key text.
//!
//! Input: `[mode]` then, for mode 0, raw netlink bytes, split into messages as the netlink codec
//! does (by each header's length); for mode 1, chunks `[len_lo, len_hi, genl cmd, attributes..]`,
//! each wrapped in a valid netlink and generic netlink header (so that the fuzzer works on the
//! WireGuard attributes); for mode 2, a key in base64.

#![forbid(unsafe_code)]
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clusteros::adapters::wireguard::{WgMessage, decode_key, merge_dump};
use libfuzzer_sys::fuzz_target;
use netlink_packet_core::{NetlinkBuffer, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{WireguardAttribute, WireguardMessage, WireguardPeerAttribute};

/// The generic netlink family id the kernel gave "wireguard" (any id >= 16).
const FAMILY: u16 = 0x1d;
const NLM_F_MULTI: u16 = 2;

/// The payloads the adapter collects from a dump (`WgNetlink::genl_request`): `None` when the
/// kernel answered with an error.
fn collect(messages: Vec<Vec<u8>>) -> Option<Vec<WireguardMessage>> {
    let mut out = Vec::new();
    for bytes in messages {
        let Ok(m) = NetlinkMessage::<GenlMessage<WgMessage>>::deserialize(&bytes) else {
            // The codec logs and drops a message it cannot decode.
            continue;
        };
        match m.payload {
            NetlinkPayload::InnerMessage(g) => out.push(g.payload.0),
            NetlinkPayload::Error(e) if e.code.is_some() => return None,
            // The end of the dump.
            NetlinkPayload::Done(_) => break,
            _ => {}
        }
    }
    Some(out)
}

/// Splits a receive buffer into messages like netlink-proto's `NetlinkCodec::decode`.
fn split_raw(mut buf: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let Ok(nl) = NetlinkBuffer::new_checked(buf) else { break };
        let len = nl.length() as usize;
        out.push(buf[..len].to_vec());
        buf = &buf[len..];
    }
    out
}

/// Wraps each chunk in a netlink header and a generic netlink header.
fn frame(mut buf: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut seq = 1u32;
    while buf.len() >= 3 {
        let want = u16::from_le_bytes([buf[0], buf[1]]) as usize;
        let cmd = buf[2];
        buf = &buf[3..];
        let n = want.min(buf.len());
        let (attrs, rest) = buf.split_at(n);
        buf = rest;
        let len = 16 + 4 + attrs.len();
        let mut m = Vec::with_capacity(len);
        m.extend((len as u32).to_ne_bytes());
        m.extend(FAMILY.to_ne_bytes());
        m.extend(NLM_F_MULTI.to_ne_bytes());
        m.extend(seq.to_ne_bytes());
        m.extend(0u32.to_ne_bytes());
        m.extend([cmd, 1, 0, 0]);
        m.extend(attrs);
        out.push(m);
        seq += 1;
    }
    out
}

fn check_key(text: &str) {
    if let Ok(k) = decode_key(text) {
        // One key, one text: the mesh planner matches peers by this text.
        assert_eq!(B64.encode(k), text, "key text is not canonical base64");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let messages = match mode % 3 {
        0 => split_raw(rest),
        1 => frame(rest),
        _ => {
            check_key(&String::from_utf8_lossy(rest));
            return;
        }
    };
    let Some(msgs) = collect(messages) else { return };
    let now = UNIX_EPOCH + Duration::from_secs(1_750_000_000);
    let (dev, stats) = merge_dump(&msgs, now);
    assert!(dev.exists);
    // One stats entry per peer, in key order, and every peer the dump names.
    assert_eq!(stats.iter().map(|s| &s.public_key).collect::<Vec<_>>(), dev.peers.keys().collect::<Vec<_>>());
    for m in &msgs {
        for a in &m.attributes {
            if let WireguardAttribute::Peers(peers) = a {
                for p in peers {
                    let key = p.0.iter().find_map(|a| match a {
                        WireguardPeerAttribute::PublicKey(k) => Some(B64.encode(k)),
                        _ => None,
                    });
                    if let Some(k) = key {
                        assert!(dev.peers.contains_key(&k), "a peer of the dump is missing");
                    }
                }
            }
        }
    }
    for (k, p) in &dev.peers {
        assert_eq!(&p.public_key, k);
        check_key(k);
        decode_key(k).expect("a dumped key decodes");
    }
    for s in &stats {
        if let Some(age) = s.handshake_age_secs {
            assert!(age < 1_750_000_000, "a handshake before the epoch");
        }
    }
});
