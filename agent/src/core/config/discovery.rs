//! The `[discovery]` section: LAN beacons ([`crate::core::beacon`]), by which nodes that share
//! only the cluster secret find each other without join addresses.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{ConfigError, invalid};

/// The UDP port beacons are sent to and heard on.
pub const DEFAULT_BEACON_PORT: u16 = 7609;

/// `[discovery]` as written in the config file; every key optional.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryFile {
    /// Send and hear LAN beacons (default true). Join addresses, when given, are still what a
    /// node joins through; beacons also let later nodes without them find this one.
    pub beacon: Option<bool>,
    /// Default 7609.
    pub beacon_port: Option<u16>,
    /// Where beacons go, as IP:PORT (broadcast or unicast addresses). Default: the broadcast
    /// address of every IPv4 interface that is up and not loopback, at `beacon_port`.
    pub beacon_targets: Option<Vec<String>>,
}

/// The validated `[discovery]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// `None`: beacons are off.
    pub beacon: Option<BeaconSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeaconSettings {
    pub port: u16,
    /// Empty: every broadcast interface's address, found when the beacons are sent.
    pub targets: Vec<SocketAddr>,
}

impl DiscoveryFile {
    pub fn resolve(&self) -> Result<Discovery, ConfigError> {
        if !self.beacon.unwrap_or(true) {
            return Ok(Discovery { beacon: None });
        }
        let port = self.beacon_port.unwrap_or(DEFAULT_BEACON_PORT);
        if port == 0 {
            return Err(invalid("discovery.beacon_port", "must be a port number (1-65535); the default is 7609"));
        }
        let targets = self
            .beacon_targets
            .iter()
            .flatten()
            .map(|t| {
                let a: SocketAddr = t.parse().map_err(|e| {
                    invalid(
                        "discovery.beacon_targets",
                        format!("{t:?} is not IP:PORT ({e}); example: \"192.168.1.255:{DEFAULT_BEACON_PORT}\""),
                    )
                })?;
                if a.port() == 0 || a.ip().is_unspecified() {
                    return Err(invalid(
                        "discovery.beacon_targets",
                        format!("{t:?} names no destination; give a broadcast or unicast IP:PORT"),
                    ));
                }
                Ok(a)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Discovery { beacon: Some(BeaconSettings { port, targets }) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_explicit_values_and_errors() {
        let on = DiscoveryFile::default().resolve().unwrap();
        assert_eq!(on.beacon, Some(BeaconSettings { port: DEFAULT_BEACON_PORT, targets: vec![] }));
        let off = DiscoveryFile { beacon: Some(false), beacon_port: Some(0), ..Default::default() };
        assert_eq!(off.resolve().unwrap().beacon, None, "off: the other keys do not matter");
        let given = DiscoveryFile {
            beacon: Some(true),
            beacon_port: Some(9000),
            beacon_targets: Some(vec!["10.1.255.255:9000".into()]),
        };
        assert_eq!(
            given.resolve().unwrap().beacon,
            Some(BeaconSettings { port: 9000, targets: vec!["10.1.255.255:9000".parse().unwrap()] })
        );
        for (bad, key) in [
            (DiscoveryFile { beacon_port: Some(0), ..Default::default() }, "discovery.beacon_port"),
            (
                DiscoveryFile { beacon_targets: Some(vec!["10.1.255.255".into()]), ..Default::default() },
                "discovery.beacon_targets",
            ),
            (
                DiscoveryFile { beacon_targets: Some(vec!["0.0.0.0:7609".into()]), ..Default::default() },
                "discovery.beacon_targets",
            ),
        ] {
            let e = bad.resolve().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
