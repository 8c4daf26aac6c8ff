//! Cluster secrets (MUNGE key, k3s token). Values are sealed with ChaCha20-Poly1305 under a key
//! derived from the cluster secret before they enter the Raft log, so neither the log on disk nor
//! the peer traffic that replicates it ever carries them in clear. Only nodes that know the
//! cluster secret can open them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

pub use crate::core::secrets::{K3S_TOKEN, MANAGED, MUNGE_KEY};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("secret {0} cannot be opened: it was sealed with another cluster secret, or it is corrupt")]
    Open(String),
    #[error("unknown secret {0:?}; known secrets: munge-key, k3s-token")]
    Unknown(String),
}

/// Seals and opens secret values. Never logged. Seals with the cluster secret; opens with it or
/// with an accepted one (while the cluster secret is rotated, see [`crate::core::auth::ClusterKeys`]).
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
    accepted: Vec<ChaCha20Poly1305>,
}

/// Which key opened a sealed value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedWith {
    /// The cluster secret this node seals with.
    Current,
    /// One of the accepted (older or newer) secrets: the leader seals it again with its own.
    Accepted,
}

fn cipher(cluster_secret: &str) -> ChaCha20Poly1305 {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(cluster_secret.as_bytes()).expect("any key length");
    mac.update(b"clusteros secret sealing v1");
    let key: [u8; 32] = mac.finalize().into_bytes().into();
    ChaCha20Poly1305::new(Key::from_slice(&key))
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    pub fn new(cluster_secret: &str, accepted: &[String]) -> SecretBox {
        SecretBox { cipher: cipher(cluster_secret), accepted: accepted.iter().map(|s| cipher(s)).collect() }
    }

    /// base64(nonce || ciphertext), bound to the secret's name.
    pub fn seal(&self, name: &str, plain: &[u8]) -> String {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let payload = chacha20poly1305::aead::Payload { msg: plain, aad: name.as_bytes() };
        let ct = self.cipher.encrypt(Nonce::from_slice(&nonce), payload).expect("encryption cannot fail");
        let mut out = nonce.to_vec();
        out.extend(ct);
        B64.encode(out)
    }

    pub fn open(&self, name: &str, sealed: &str) -> Result<Vec<u8>, SecretError> {
        self.open_with(name, sealed).map(|(plain, _)| plain)
    }

    /// [`SecretBox::open`], saying which key opened it.
    pub fn open_with(&self, name: &str, sealed: &str) -> Result<(Vec<u8>, SealedWith), SecretError> {
        let raw = B64.decode(sealed).map_err(|_| SecretError::Open(name.into()))?;
        if raw.len() < 12 {
            return Err(SecretError::Open(name.into()));
        }
        let (nonce, ct) = raw.split_at(12);
        let open = |c: &ChaCha20Poly1305| {
            c.decrypt(Nonce::from_slice(nonce), chacha20poly1305::aead::Payload { msg: ct, aad: name.as_bytes() }).ok()
        };
        if let Some(plain) = open(&self.cipher) {
            return Ok((plain, SealedWith::Current));
        }
        self.accepted
            .iter()
            .find_map(open)
            .map(|p| (p, SealedWith::Accepted))
            .ok_or_else(|| SecretError::Open(name.into()))
    }
}

/// A fresh value for a managed secret, from the OS random source.
pub fn generate(name: &str) -> Result<Vec<u8>, SecretError> {
    let mut rng = rand::rngs::OsRng;
    match name {
        // MUNGE wants at least 32 bytes; its own tool makes 1024.
        MUNGE_KEY => {
            let mut k = vec![0u8; 1024];
            rng.fill_bytes(&mut k);
            Ok(k)
        }
        K3S_TOKEN => {
            let mut k = [0u8; 32];
            rng.fill_bytes(&mut k);
            Ok(k.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes())
        }
        other => Err(SecretError::Unknown(other.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let b = SecretBox::new("cluster-secret-0123456789", &[]);
        let sealed = b.seal(MUNGE_KEY, b"key bytes");
        assert_eq!(b.open(MUNGE_KEY, &sealed).unwrap(), b"key bytes");
        assert!(!sealed.contains("key bytes"));
        // Bound to the name and the cluster secret.
        assert!(b.open(K3S_TOKEN, &sealed).is_err());
        assert!(SecretBox::new("another-secret-0123456", &[]).open(MUNGE_KEY, &sealed).is_err());
        // While the cluster secret is rotated: opened with the accepted old secret, and known
        // to need sealing again; a value sealed with the new secret opens as current.
        let rotating = SecretBox::new("another-secret-0123456", &["cluster-secret-0123456789".into()]);
        assert_eq!(rotating.open_with(MUNGE_KEY, &sealed).map(|(_, w)| w), Ok(SealedWith::Accepted));
        let resealed = rotating.seal(MUNGE_KEY, &rotating.open(MUNGE_KEY, &sealed).unwrap());
        assert_eq!(rotating.open_with(MUNGE_KEY, &resealed).map(|(_, w)| w), Ok(SealedWith::Current));
        assert_eq!(b.open_with(MUNGE_KEY, &resealed).map(|(_, w)| w), Err(SecretError::Open(MUNGE_KEY.into())));
        assert!(b.open(MUNGE_KEY, "not base64!").is_err());
        assert_ne!(b.seal(MUNGE_KEY, b"x"), b.seal(MUNGE_KEY, b"x"), "fresh nonce each time");
    }

    #[test]
    fn generated_values() {
        let m = generate(MUNGE_KEY).unwrap();
        assert_eq!(m.len(), 1024);
        assert_ne!(m, generate(MUNGE_KEY).unwrap());
        let t = generate(K3S_TOKEN).unwrap();
        assert_eq!(t.len(), 64);
        assert!(generate("nope").is_err());
    }
}
