//! Node identity: a node id that is never reused, the node name, the WireGuard key pair and the
//! node key (Ed25519) that signs this node's peer requests.
//!
//! Created on first start under the state directory, loaded on later starts. A reinstalled machine
//! has an empty state directory and so gets a new node id; it keeps its name, which lets the cluster
//! replace the stale member entry.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::adapters::files::{WriteError, write_atomic};
use crate::core::auth::NodeKey;
use crate::core::state::NodeId;

pub const IDENTITY_FILE: &str = "identity.json";
pub const WG_KEY_FILE: &str = "wg.key";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "identity file {path} is corrupt ({message}); move it away (with {key}) to create a new identity: the node then joins as a new member"
    )]
    Corrupt { path: PathBuf, key: PathBuf, message: String },
    #[error(transparent)]
    Write(#[from] WriteError),
}

#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
struct IdentityFile {
    node_id: NodeId,
    name: String,
    wg_public_key: String,
    created_at_ms: u64,
    /// The WireGuard private key (base64), so that the identity is one file written in one
    /// atomic step. Files written by agents before this field have only `wg.key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wg_private_key: Option<String>,
    /// The seed of the node key (base64, 32 bytes). Files written by agents before node keys
    /// have none; one is created on the next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    node_key_seed: Option<String>,
}

fn decode_key(text: &str) -> Option<[u8; 32]> {
    B64.decode(text.trim()).ok().and_then(|k| k.try_into().ok())
}

fn key_file_text(key: &[u8; 32]) -> String {
    format!("{}\n", B64.encode(key))
}

/// The loaded identity. The private key is kept out of `Debug` output.
#[derive(Clone)]
pub struct Identity {
    pub node_id: NodeId,
    pub name: String,
    pub wg_public_key: String,
    wg_private_key: [u8; 32],
    node_key: NodeKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("node_id", &format_args!("{}", self.node_id))
            .field("name", &self.name)
            .field("wg_public_key", &self.wg_public_key)
            .field("node_key", &self.node_key)
            .finish_non_exhaustive()
    }
}

/// Generates a WireGuard private key the way `wg genkey` does (random, clamped) and its public key.
pub fn generate_wg_keypair() -> ([u8; 32], String) {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    secret[0] &= 248;
    secret[31] &= 127;
    secret[31] |= 64;
    let public = wg_public_key(&secret);
    (secret, public)
}

/// The base64 public key for a private key.
pub fn wg_public_key(secret: &[u8; 32]) -> String {
    let s = x25519_dalek::StaticSecret::from(*secret);
    B64.encode(x25519_dalek::PublicKey::from(&s).as_bytes())
}

/// A fresh random seed of a node key.
fn new_node_key_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    seed
}

/// A fresh random node id; zero is never used.
pub fn new_node_id() -> NodeId {
    loop {
        let id = rand::rngs::OsRng.next_u64();
        if id != 0 {
            return NodeId(id);
        }
    }
}

impl Identity {
    /// Loads the identity from `state_dir`, creating it on first start. `name` is the configured or
    /// host name; when it differs from the stored one the stored name is updated.
    pub fn load_or_create(state_dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        let path = state_dir.join(IDENTITY_FILE);
        let key_path = state_dir.join(WG_KEY_FILE);
        let corrupt = |message: String| IdentityError::Corrupt { path: path.clone(), key: key_path.clone(), message };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let mut file: IdentityFile = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let on_disk = std::fs::read_to_string(&key_path);
                let key = match &file.wg_private_key {
                    Some(k) => {
                        decode_key(k).ok_or_else(|| corrupt("its wg_private_key is not a base64 32-byte key".into()))?
                    }
                    None => {
                        let text = on_disk
                            .as_ref()
                            .map_err(|e| IdentityError::Read { path: key_path.clone(), source: clone_io(e) })?;
                        decode_key(text)
                            .ok_or_else(|| corrupt(format!("{} is not a base64 32-byte key", key_path.display())))?
                    }
                };
                if wg_public_key(&key) != file.wg_public_key {
                    return Err(corrupt("the public key does not match the private key".into()));
                }
                if file.node_id == NodeId(0) {
                    return Err(corrupt("node id 0 is invalid".into()));
                }
                let node_seed = match &file.node_key_seed {
                    Some(k) => {
                        decode_key(k).ok_or_else(|| corrupt("its node_key_seed is not a base64 32-byte seed".into()))?
                    }
                    None => new_node_key_seed(),
                };
                if file.name != name || file.wg_private_key.is_none() || file.node_key_seed.is_none() {
                    file.name = name.to_string();
                    file.wg_private_key = Some(B64.encode(key));
                    file.node_key_seed = Some(B64.encode(node_seed));
                    write_atomic(&path, &serde_json::to_vec_pretty(&file).expect("serializable"), 0o600)?;
                }
                // wg.key is a copy for tools (wg, debugging); one left behind by a crash is mended.
                if on_disk.ok().and_then(|t| decode_key(&t)) != Some(key) {
                    write_atomic(&key_path, key_file_text(&key).as_bytes(), 0o600)?;
                }
                Ok(Identity {
                    node_id: file.node_id,
                    name: file.name,
                    wg_public_key: file.wg_public_key,
                    wg_private_key: key,
                    node_key: NodeKey::from_seed(&node_seed),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Self::create(state_dir, name),
            Err(source) => Err(IdentityError::Read { path, source }),
        }
    }

    /// Creates a new identity (new node id and key pair), replacing any existing one.
    pub fn create(state_dir: &Path, name: &str) -> Result<Identity, IdentityError> {
        let (file, secret) = Self::new_file(name);
        for (path, bytes) in Self::files(state_dir, &file, &secret) {
            write_atomic(&path, &bytes, 0o600)?;
        }
        let seed = file.node_key_seed.as_deref().and_then(decode_key).expect("new_file writes a seed");
        Ok(Identity {
            node_id: file.node_id,
            name: file.name,
            wg_public_key: file.wg_public_key,
            wg_private_key: secret,
            node_key: NodeKey::from_seed(&seed),
        })
    }

    fn new_file(name: &str) -> (IdentityFile, [u8; 32]) {
        let (secret, public) = generate_wg_keypair();
        let file = IdentityFile {
            node_id: new_node_id(),
            name: name.to_string(),
            wg_public_key: public,
            created_at_ms: crate::now_ms(),
            wg_private_key: Some(B64.encode(secret)),
            node_key_seed: Some(B64.encode(new_node_key_seed())),
        };
        (file, secret)
    }

    /// The files of an identity, in the order they are written. The first holds the whole
    /// identity, so a crash after any of them leaves one that loads (the old or the new).
    fn files(state_dir: &Path, file: &IdentityFile, secret: &[u8; 32]) -> [(PathBuf, Vec<u8>); 2] {
        [
            (state_dir.join(IDENTITY_FILE), serde_json::to_vec_pretty(file).expect("serializable")),
            (state_dir.join(WG_KEY_FILE), key_file_text(secret).into_bytes()),
        ]
    }

    /// The WireGuard private key bytes (for the mesh adapter).
    pub fn wg_private_key(&self) -> &[u8; 32] {
        &self.wg_private_key
    }

    /// The key that signs this node's peer requests.
    pub fn node_key(&self) -> &NodeKey {
        &self.node_key
    }
}

fn clone_io(e: &std::io::Error) -> std::io::Error {
    std::io::Error::new(e.kind(), e.to_string())
}

/// The host name of this machine, for the default node name.
pub fn hostname() -> String {
    // uname(2), not /proc/sys/kernel/hostname: the unit's ProcSubset=pid hides /proc/sys.
    nix::sys::utsname::uname()
        .map(|u| u.nodename().to_string_lossy().trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn created_once_then_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path(), "n1").unwrap();
        let b = Identity::load_or_create(dir.path(), "n1").unwrap();
        assert_eq!(a.node_id, b.node_id);
        assert_eq!(a.wg_public_key, b.wg_public_key);
        assert_eq!(a.wg_private_key(), b.wg_private_key());
        assert_eq!(a.node_key().public(), b.node_key().public(), "the node key is kept");
        for f in [IDENTITY_FILE, WG_KEY_FILE] {
            let mode = std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        // A rename keeps the id.
        let c = Identity::load_or_create(dir.path(), "renamed").unwrap();
        assert_eq!(c.node_id, a.node_id);
        assert_eq!(Identity::load_or_create(dir.path(), "renamed").unwrap().name, "renamed");
    }

    #[test]
    fn a_crash_while_replacing_the_identity_leaves_one_that_loads() {
        // Issue 10, hole 8: Identity::create writes two files; the machine may stop after the
        // first. (The key used to be written first, beside an identity file of another key: the
        // node then refused to start as "corrupt".)
        let dir = tempfile::tempdir().unwrap();
        let old = Identity::load_or_create(dir.path(), "n1").unwrap();
        let (file, secret) = Identity::new_file("n1");
        let [first, _] = Identity::files(dir.path(), &file, &secret);
        write_atomic(&first.0, &first.1, 0o600).unwrap();
        let now = Identity::load_or_create(dir.path(), "n1").unwrap();
        assert_ne!(now.node_id, old.node_id, "the new identity is the one in place");
        assert_eq!((now.node_id, now.wg_private_key()), (file.node_id, &secret));
        let key = std::fs::read_to_string(dir.path().join(WG_KEY_FILE)).unwrap();
        assert_eq!(decode_key(&key), Some(secret), "wg.key was mended");
    }

    #[test]
    fn an_identity_of_an_older_agent_loads_and_gains_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, public) = generate_wg_keypair();
        let legacy = format!(r#"{{"node_id":77,"name":"n1","wg_public_key":"{public}","created_at_ms":1}}"#);
        std::fs::write(dir.path().join(IDENTITY_FILE), legacy).unwrap();
        std::fs::write(dir.path().join(WG_KEY_FILE), key_file_text(&secret)).unwrap();
        let id = Identity::load_or_create(dir.path(), "n1").unwrap();
        assert_eq!((id.node_id, id.wg_private_key()), (NodeId(77), &secret));
        let file: IdentityFile =
            serde_json::from_slice(&std::fs::read(dir.path().join(IDENTITY_FILE)).unwrap()).unwrap();
        assert_eq!(file.wg_private_key.as_deref().and_then(decode_key), Some(secret));
        // It gained a node key too, and keeps it.
        let seed = file.node_key_seed.as_deref().and_then(decode_key).expect("a node key seed");
        assert_eq!(id.node_key().public(), NodeKey::from_seed(&seed).public());
        assert_eq!(Identity::load_or_create(dir.path(), "n1").unwrap().node_key().public(), id.node_key().public());
    }

    #[test]
    fn reinstall_gets_a_new_id() {
        let a = Identity::load_or_create(tempfile::tempdir().unwrap().path(), "n1").unwrap();
        let b = Identity::load_or_create(tempfile::tempdir().unwrap().path(), "n1").unwrap();
        assert_ne!(a.node_id, b.node_id);
        assert_ne!(a.node_key().public(), b.node_key().public(), "and a new node key");
    }

    #[test]
    fn keys_are_clamped_like_wg_genkey() {
        let (k, public) = generate_wg_keypair();
        assert_eq!(k[0] & 7, 0);
        assert_eq!(k[31] & 128, 0);
        assert_eq!(k[31] & 64, 64);
        assert_eq!(B64.decode(public).unwrap().len(), 32);
    }

    #[test]
    fn rfc7748_x25519_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let k: [u8; 32] = (0..32)
            .map(|i| {
                u8::from_str_radix(
                    &"77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"[2 * i..2 * i + 2],
                    16,
                )
                .unwrap()
            })
            .collect::<Vec<_>>()
            .try_into()
            .unwrap();
        assert_eq!(wg_public_key(&k), "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=");
    }

    #[test]
    fn corrupt_identity_is_reported_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(IDENTITY_FILE), b"{not json").unwrap();
        let e = Identity::load_or_create(dir.path(), "n1").unwrap_err();
        assert!(e.to_string().contains("corrupt") && e.to_string().contains("move it away"), "{e}");
        assert_eq!(std::fs::read(dir.path().join(IDENTITY_FILE)).unwrap(), b"{not json");
    }
}
