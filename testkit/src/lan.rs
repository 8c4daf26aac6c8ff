//! A LAN of network namespaces for tests: a bridge in a hub namespace of its own and one
//! namespace per node, each with a veth `eth0` on the bridge at `A.B.C.(10 + i)/24`. Nothing of
//! it touches the host's network; dropping the [`Lan`] deletes every namespace (and with them the
//! bridge and veths). Needs root and iproute2. The fault suite adds its nftables faults on top
//! (tests/src/faults/net.rs); the host cluster tests run agents on it that find each other by LAN
//! beacons.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

/// A command that failed, with what it said.
#[derive(Debug)]
pub struct LanError(pub String);

impl std::fmt::Display for LanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LanError {}

/// Runs `program args...`; its stdout, or what it said on failure.
pub fn run(program: &str, args: &[&str]) -> Result<String, LanError> {
    let out =
        Command::new(program).args(args).stdin(Stdio::null()).output().map_err(|e| {
            LanError(format!("cannot run {program}: {e} (install iproute2: scripts/install-host-deps)"))
        })?;
    if !out.status.success() {
        return Err(LanError(format!(
            "`{program} {}` failed ({}): {} (network namespaces need root)",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct Lan {
    subnet: [u8; 3],
    hub: String,
    nodes: Vec<String>,
}

impl Lan {
    /// The hub and `n` node namespaces (`n` at most 240), named `<prefix><pid>-<tag>-<hub|nI>`
    /// (`tag` tells LANs of one process apart); node `i` is at `subnet.(10 + i)`. Namespaces of
    /// earlier runs with `prefix` whose process is gone are deleted first. If a step fails, what
    /// was made is deleted again.
    pub fn new(prefix: &str, tag: u8, subnet: [u8; 3], n: usize) -> Result<Lan, LanError> {
        assert!(n <= 240, "a LAN of this kind holds at most 240 nodes");
        sweep(prefix);
        let pid = std::process::id();
        let hub = format!("{prefix}{pid}-{tag}-hub");
        run("ip", &["netns", "add", &hub])?;
        let mut lan = Lan { subnet, hub, nodes: Vec::new() };
        lan.hub_ip(&["link", "set", "lo", "up"])?;
        lan.hub_ip(&["link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])?;
        lan.hub_ip(&["link", "set", "br0", "up"])?;
        for i in 0..n {
            let ns = format!("{prefix}{pid}-{tag}-n{i}");
            run("ip", &["netns", "add", &ns])?;
            lan.nodes.push(ns.clone());
            let veth = format!("v{i}");
            run(
                "ip",
                &["link", "add", &veth, "netns", &lan.hub, "type", "veth", "peer", "name", "eth0", "netns", &ns],
            )?;
            lan.hub_ip(&["link", "set", &veth, "master", "br0", "up"])?;
            let addr = format!("{}/24", lan.ip(i));
            for args in [
                vec!["link", "set", "lo", "up"],
                vec!["addr", "add", addr.as_str(), "dev", "eth0"],
                vec!["link", "set", "eth0", "up"],
            ] {
                let mut full = vec!["-n", ns.as_str()];
                full.extend(args);
                run("ip", &full)?;
            }
        }
        Ok(lan)
    }

    fn hub_ip(&self, args: &[&str]) -> Result<String, LanError> {
        let mut full = vec!["-n", self.hub.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], 10 + i as u8)
    }

    /// Gives node `i` a second network, as a machine with a management or PXE NIC besides the
    /// cluster's has: `wan0` at `subnet.1/24`, and the default route through it to a gateway
    /// `subnet.2` that is not there (the other end of `wan0` lies unbridged in the hub).
    pub fn add_default_route_elsewhere(&self, i: usize, subnet: [u8; 3]) -> Result<(), LanError> {
        let ns = self.nodes[i].as_str();
        let peer = format!("w{i}");
        run("ip", &["link", "add", "wan0", "netns", ns, "type", "veth", "peer", "name", &peer, "netns", &self.hub])?;
        self.hub_ip(&["link", "set", &peer, "up"])?;
        let [a, b, c] = subnet;
        let (addr, gateway) = (format!("{a}.{b}.{c}.1/24"), format!("{a}.{b}.{c}.2"));
        for args in [
            vec!["addr", "add", addr.as_str(), "dev", "wan0"],
            vec!["link", "set", "wan0", "up"],
            vec!["route", "add", "default", "via", gateway.as_str(), "dev", "wan0"],
        ] {
            let mut full = vec!["-n", ns];
            full.extend(args);
            run("ip", &full)?;
        }
        Ok(())
    }

    /// Node `i`'s namespace name (for `ip netns exec`).
    pub fn netns(&self, i: usize) -> &str {
        &self.nodes[i]
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = run("ip", &["netns", "delete", ns]);
        }
    }
}

/// Deletes the namespaces named `<prefix><pid>-...` whose process `pid` is gone.
pub fn sweep(prefix: &str) {
    let Ok(list) = run("ip", &["netns", "list"]) else { return };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        let Some(rest) = name.strip_prefix(prefix) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "delete", name]);
        }
    }
}
