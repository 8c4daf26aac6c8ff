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

/// Seals and opens secret values. Never logged.
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    pub fn new(cluster_secret: &str) -> SecretBox {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(cluster_secret.as_bytes()).expect("any key length");
        mac.update(b"clusteros secret sealing v1");
        let key: [u8; 32] = mac.finalize().into_bytes().into();
        SecretBox { cipher: ChaCha20Poly1305::new(Key::from_slice(&key)) }
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
        let raw = B64.decode(sealed).map_err(|_| SecretError::Open(name.into()))?;
        if raw.len() < 12 {
            return Err(SecretError::Open(name.into()));
        }
        let (nonce, ct) = raw.split_at(12);
        let payload = chacha20poly1305::aead::Payload { msg: ct, aad: name.as_bytes() };
        self.cipher.decrypt(Nonce::from_slice(nonce), payload).map_err(|_| SecretError::Open(name.into()))
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
        let b = SecretBox::new("cluster-secret-0123456789");
        let sealed = b.seal(MUNGE_KEY, b"key bytes");
        assert_eq!(b.open(MUNGE_KEY, &sealed).unwrap(), b"key bytes");
        assert!(!sealed.contains("key bytes"));
        // Bound to the name and the cluster secret.
        assert!(b.open(K3S_TOKEN, &sealed).is_err());
        assert!(SecretBox::new("another-secret-0123456").open(MUNGE_KEY, &sealed).is_err());
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
