//! The `[discovery]` section: LAN beacons ([`crate::core::beacon`]), by which nodes that share
//! only the cluster secret find each other without join addresses, and DNS SRV records
//! ([`crate::core::dns`]) for sites that prefer DNS.

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
    /// An SRV name to look up for the addresses to greet when there are no join addresses, e.g.
    /// `_clusteros._tcp.site.example` (records: priority weight 7600 node1.site.example).
    pub dns_srv: Option<String>,
    /// DNS servers as IP:PORT or IP (port 53). Default: the `nameserver` lines of
    /// /etc/resolv.conf, read at each lookup.
    pub dns_servers: Option<Vec<String>>,
}

/// The validated `[discovery]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovery {
    /// `None`: beacons are off.
    pub beacon: Option<BeaconSettings>,
    /// `None`: no DNS SRV lookup.
    pub dns: Option<DnsSettings>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    /// The SRV name, without the final dot.
    pub srv: String,
    /// Empty: the nameservers of /etc/resolv.conf.
    pub servers: Vec<SocketAddr>,
}

/// The `nameserver` addresses of a resolv.conf text, at port 53 (at most 3, as the C resolver).
pub fn resolv_conf_nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        // A scoped IPv6 address (fe80::1%eth0) is not taken: the zone needs an interface index.
        .filter_map(|a| a.parse::<std::net::IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(3)
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeaconSettings {
    pub port: u16,
    /// Empty: every broadcast interface's address, found when the beacons are sent.
    pub targets: Vec<SocketAddr>,
}

impl DiscoveryFile {
    pub fn resolve(&self) -> Result<Discovery, ConfigError> {
        Ok(Discovery { beacon: self.beacon()?, dns: self.dns()? })
    }

    fn dns(&self) -> Result<Option<DnsSettings>, ConfigError> {
        let Some(name) = &self.dns_srv else {
            if self.dns_servers.is_some() {
                return Err(invalid(
                    "discovery.dns_servers",
                    "is given without discovery.dns_srv; set both or neither",
                ));
            }
            return Ok(None);
        };
        crate::core::dns::check_name(name).map_err(|e| {
            invalid(
                "discovery.dns_srv",
                format!("{name:?} is not a DNS name: {e}; example: \"_clusteros._tcp.site.example\""),
            )
        })?;
        let servers = self
            .dns_servers
            .iter()
            .flatten()
            .map(|s| {
                let a = s
                    .parse::<SocketAddr>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        invalid("discovery.dns_servers", format!("{s:?} is not IP or IP:PORT; example: \"10.0.0.2\""))
                    })?;
                if a.port() == 0 || a.ip().is_unspecified() {
                    return Err(invalid("discovery.dns_servers", format!("{s:?} names no server")));
                }
                Ok(a)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(DnsSettings { srv: name.trim_end_matches('.').to_ascii_lowercase(), servers }))
    }

    fn beacon(&self) -> Result<Option<BeaconSettings>, ConfigError> {
        if !self.beacon.unwrap_or(true) {
            return Ok(None);
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
        Ok(Some(BeaconSettings { port, targets }))
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
        assert_eq!(on.dns, None);
        let given = DiscoveryFile {
            beacon: Some(true),
            beacon_port: Some(9000),
            beacon_targets: Some(vec!["10.1.255.255:9000".into()]),
            ..Default::default()
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
            (
                DiscoveryFile { dns_srv: Some("_clusteros._tcp..test".into()), ..Default::default() },
                "discovery.dns_srv",
            ),
            (
                DiscoveryFile { dns_servers: Some(vec!["10.0.0.2".into()]), ..Default::default() },
                "discovery.dns_servers",
            ),
            (
                DiscoveryFile {
                    dns_srv: Some("_clusteros._tcp.site.test".into()),
                    dns_servers: Some(vec!["dns.site.test".into()]),
                    ..Default::default()
                },
                "discovery.dns_servers",
            ),
        ] {
            let e = bad.resolve().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn dns_settings_and_resolv_conf() {
        let d = DiscoveryFile {
            dns_srv: Some("_clusteros._tcp.Site.Test.".into()),
            dns_servers: Some(vec!["10.0.0.2".into(), "127.0.0.1:5353".into(), "[fd00::53]:53".into()]),
            ..Default::default()
        };
        let dns = d.resolve().unwrap().dns.unwrap();
        assert_eq!(dns.srv, "_clusteros._tcp.site.test");
        let want: Vec<SocketAddr> =
            ["10.0.0.2:53", "127.0.0.1:5353", "[fd00::53]:53"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(dns.servers, want);
        let conf = "# generated\nsearch site.test\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\n  nameserver ::1\n\
                    nameserver 10.0.0.3\nnameserver 10.0.0.4\nnameserver 10.0.0.5\n";
        let want: Vec<SocketAddr> =
            ["10.0.0.2:53", "[::1]:53", "10.0.0.3:53"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(resolv_conf_nameservers(conf), want, "at most 3, scoped addresses left out");
    }
}
