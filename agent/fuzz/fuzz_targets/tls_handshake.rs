//! The peer API's TLS as bytes from the network meet it (issue 10, design change 2): what a
//! client sends, fed to a server with the agent's own configuration
//! (`clusteros::adapters::tls::server_config`: TLS 1.3 only, raw public keys, a client key
//! required, our verifier and signer), and what a server sends, fed to a client with the agent's
//! configuration, pinned to a member's key or not. Neither side may panic; a raw public key
//! that the agent takes as a node key must be exactly one Ed25519 SubjectPublicKeyInfo.
//!
//! Input: `[flags]` then the bytes. `flags` bit 0: feed them to a client instead of a server;
//! bit 1: that client pins a member's key; bits 2-7: the bytes are split into reads of
//! `(flags >> 2) + 1` * 61 bytes (records that arrive in pieces).

#![forbid(unsafe_code)]
#![no_main]

use std::sync::{Arc, LazyLock};

use clusteros::adapters::tls::{client_config, key_of_spki, server_config, spki};
use clusteros::core::auth::NodeKey;
use libfuzzer_sys::fuzz_target;

static SERVER: LazyLock<NodeKey> = LazyLock::new(|| NodeKey::from_seed(&[1; 32]));
static CLIENT: LazyLock<NodeKey> = LazyLock::new(|| NodeKey::from_seed(&[2; 32]));
static SERVER_CONFIG: LazyLock<Arc<rustls::ServerConfig>> = LazyLock::new(|| server_config(&SERVER));
static CLIENT_CONFIGS: LazyLock<[Arc<rustls::ClientConfig>; 2]> = LazyLock::new(|| {
    [Arc::new(client_config(&CLIENT, None)), Arc::new(client_config(&CLIENT, Some(SERVER.public_bytes())))]
});

/// Feeds `bytes` to `conn` in reads of `chunk` bytes, answering as a peer would read it
/// (what the connection writes is taken and dropped), until the bytes run out or it fails.
fn feed<C, D>(conn: &mut C, mut bytes: &[u8], chunk: usize)
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    let mut sink = Vec::new();
    while !bytes.is_empty() {
        let (now, rest) = bytes.split_at(chunk.min(bytes.len()));
        bytes = rest;
        let mut now = now;
        while !now.is_empty() {
            match conn.read_tls(&mut now) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if conn.process_new_packets().is_err() {
                // The alert it sends back is written out, as the agent would.
                let _ = conn.write_tls(&mut sink);
                return;
            }
        }
        while conn.wants_write() {
            sink.clear();
            if conn.write_tls(&mut sink).is_err() {
                return;
            }
        }
        let mut plain = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut conn.reader(), &mut plain) {
            if n == 0 {
                break;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, bytes)) = data.split_first() else { return };
    // Any bytes as a raw public key: a node key only if they are exactly its SPKI.
    if let Some(k) = key_of_spki(bytes) {
        assert_eq!(spki(&k), bytes, "a node key taken from other bytes than its SPKI");
    }
    let chunk = ((flags >> 2) as usize + 1) * 61;
    if flags & 1 == 0 {
        let mut server = rustls::ServerConnection::new(SERVER_CONFIG.clone()).expect("a server connection");
        feed(&mut server, bytes, chunk);
        if !server.is_handshaking() {
            // A finished handshake proved a node key, and only the agent's client can have made it.
            let key = clusteros::adapters::tls::peer_key(server.peer_certificates());
            assert!(key.is_some(), "a handshake finished without a client key");
        }
    } else {
        let config = CLIENT_CONFIGS[usize::from(flags & 2 != 0)].clone();
        let name = rustls::pki_types::ServerName::try_from("10.0.0.1").expect("an IP is a server name");
        let mut client = rustls::ClientConnection::new(config, name).expect("a client connection");
        // Its ClientHello goes out first.
        let mut hello = Vec::new();
        let _ = client.write_tls(&mut hello);
        feed(&mut client, bytes, chunk);
    }
});
