//! Identifiers. A [`NodeId`] is random, 64 bits, generated once per installation and never reused;
//! people, logs and peer paths see it as 16 hex digits, the wire and the Raft log as a number.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Raft node id. Shown as 16 lowercase hex digits (`Display`, `Debug`); serialized as a number, as
/// it always was, so state files, snapshots and peers of earlier builds read it unchanged.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[serde(transparent)]
pub struct NodeId(pub u64);

impl NodeId {
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<u64> for NodeId {
    fn from(v: u64) -> Self {
        NodeId(v)
    }
}

/// Why a string is not a node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a node id: expected 1 to 16 hex digits, as `clusteros members` shows them")]
pub struct BadNodeId(pub String);

impl FromStr for NodeId {
    type Err = BadNodeId;

    /// Parses the hex form that `Display` writes (leading zeros optional).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BadNodeId(s.to_string()));
        }
        u64::from_str_radix(s, 16).map(NodeId).map_err(|_| BadNodeId(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_as_sixteen_hex_digits_and_parsed_back() {
        for (id, text) in [(0u64, "0000000000000000"), (0xabc, "0000000000000abc"), (u64::MAX, "ffffffffffffffff")] {
            assert_eq!(NodeId(id).to_string(), text);
            assert_eq!(format!("{:?}", NodeId(id)), text);
            assert_eq!(text.parse::<NodeId>(), Ok(NodeId(id)));
        }
        assert_eq!("abc".parse::<NodeId>(), Ok(NodeId(0xabc)));
    }

    #[test]
    fn anything_else_is_refused_with_the_form_it_should_have() {
        for bad in ["", "+abc", "-1", "0x12", "g", "00000000000000001", " 1"] {
            let e = bad.parse::<NodeId>().unwrap_err();
            assert!(e.to_string().contains("hex digits"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_wire_form_is_the_number_it_always_was() {
        assert_eq!(serde_json::to_string(&NodeId(42)).unwrap(), "42");
        let map: std::collections::BTreeMap<NodeId, u8> = [(NodeId(7), 1)].into();
        let text = serde_json::to_string(&map).unwrap();
        assert_eq!(text, r#"{"7":1}"#);
        assert_eq!(serde_json::from_str::<std::collections::BTreeMap<NodeId, u8>>(&text).unwrap(), map);
    }
}
