//! Facts about the host this agent runs on: its CPUs, memory and kernel, and the address other
//! nodes reach it at.

use std::net::{IpAddr, SocketAddr};

use crate::core::config::Config;
use crate::core::state::NodeFacts;

/// The address other nodes reach this node at: the configured one, the listen address if it is
/// specific, or the source address the kernel picks towards the first join address.
pub fn resolve_advertise(cfg: &Config) -> Result<SocketAddr, String> {
    if let Some(a) = cfg.advertise_addr {
        return Ok(a);
    }
    if !cfg.listen_addr.ip().is_unspecified() {
        return Ok(cfg.listen_addr);
    }
    let port = cfg.listen_addr.port();
    let probe = |target: SocketAddr| source_towards(target.ip(), port);
    for j in &cfg.join {
        use std::net::ToSocketAddrs;
        if let Some(a) = j.to_socket_addrs().ok().and_then(|mut it| it.next()).and_then(probe) {
            return Ok(a);
        }
    }
    // No join address: the address of the default route (TEST-NET-1; nothing is sent).
    probe("192.0.2.1:9".parse().expect("valid")).ok_or_else(|| "no join address and no default route".into())
}

/// Whether [`resolve_advertise`] can only guess: no `advertise_addr`, a listener on every address
/// and no join address, so it took the address of the default route, which on a machine with
/// several networks (a PXE or management NIC besides the cluster's) need not be the cluster's.
pub fn advertise_is_guessed(cfg: &Config) -> bool {
    cfg.advertise_addr.is_none() && cfg.listen_addr.ip().is_unspecified() && cfg.join.is_empty()
}

/// The address the kernel sends from towards `peer`, with `port`; `None` without a route.
pub fn source_towards(peer: IpAddr, port: u16) -> Option<SocketAddr> {
    // connect() on a UDP socket sends nothing; it only asks the kernel for a route and source.
    let any: SocketAddr =
        if peer.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock = std::net::UdpSocket::bind(any).ok()?;
    sock.connect(SocketAddr::new(peer, 9)).ok()?;
    sock.local_addr().ok().map(|a| SocketAddr::new(a.ip(), port))
}

/// Reads this machine's facts (CPUs, memory, kernel).
pub fn read_facts() -> NodeFacts {
    // From system calls, not /proc: the unit's ProcSubset=pid hides /proc/meminfo and /proc/sys.
    let cpus = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let memory_mb = nix::sys::sysinfo::sysinfo().map_or(0, |i| i.ram_total() / (1024 * 1024));
    let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    NodeFacts { cpus, memory_mb, kernel, arch: std::env::consts::ARCH.to_string() }
}

#[cfg(test)]
mod tests {
    /// The facts come from system calls and agree with what /proc says where the test can read
    /// it (the agent's unit hides those files from the agent).
    #[test]
    fn the_source_towards_loopback_is_loopback() {
        let a = super::source_towards("127.0.0.1".parse().unwrap(), 7600).unwrap();
        assert_eq!(a, "127.0.0.1:7600".parse().unwrap());
    }

    #[test]
    fn facts_match_proc() {
        let f = super::read_facts();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kb: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(f.memory_mb.abs_diff(kb / 1024) <= 1, "{} MB, /proc/meminfo {kb} kB", f.memory_mb);
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert_eq!(f.kernel, release.trim());
        assert!(f.cpus >= 1);
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(crate::adapters::identity::hostname(), name.trim());
    }
}
