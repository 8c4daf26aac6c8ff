//! A private LAN for a test's VMs: a network namespace with a bridge (host side 10.77.0.1/24) and
//! one tap per VM. Nothing of it is visible outside the namespace; deleting the namespace on drop
//! removes the bridge and taps with it.

use std::sync::Mutex;

use anyhow::{Context, Result};

use crate::run_cmd;

/// Names of namespaces this harness creates: `ce2e-<pid>-<n>`.
const PREFIX: &str = "ce2e-";
pub const BRIDGE: &str = "br0";
pub const SUBNET: &str = "10.77.0";
pub const HOST_ADDR: &str = "10.77.0.1";

pub struct NetNs {
    name: String,
    taps: Mutex<u32>,
    /// Deleted on drop unless it outlives this process ([`NetNs::create_lasting`]).
    lasting: bool,
}

impl NetNs {
    /// Creates namespace `ce2e-<pid>-<n>` with lo up and bridge br0 (10.77.0.1/24) up.
    pub fn new(n: u32) -> Result<NetNs> {
        NetNs::create(format!("{PREFIX}{}-{n}", std::process::id()), false)
    }

    /// Creates namespace `name` like [`NetNs::new`], but one that outlives this process (the
    /// cluster of `qemu/cluster up`); [`NetNs::delete`] removes it. If setting it up fails, it
    /// is removed again.
    pub fn create_lasting(name: &str) -> Result<NetNs> {
        NetNs::create(name.into(), true)
    }

    /// Whether namespace `name` exists.
    pub fn exists(name: &str) -> Result<bool> {
        let list = run_cmd("ip", &["netns", "list"])?;
        Ok(list.lines().any(|l| l.split_whitespace().next() == Some(name)))
    }

    /// Deletes a lasting namespace (and with it its bridge and taps).
    pub fn delete_named(name: &str) -> Result<()> {
        run_cmd("ip", &["netns", "delete", name]).map(|_| ())
    }

    fn create(name: String, lasting: bool) -> Result<NetNs> {
        run_cmd("ip", &["netns", "add", &name]).context("cannot create the network namespace")?;
        // From here on, Drop deletes it, until it is set up.
        let mut ns = NetNs { name, taps: Mutex::new(0), lasting: false };
        let setup = [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"],
            vec!["addr", "add", "10.77.0.1/24", "dev", BRIDGE],
            vec!["link", "set", BRIDGE, "up"],
        ];
        for args in setup {
            ns.ip(&args)?;
        }
        ns.lasting = lasting;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_cmd("ip", &full)
    }

    /// Adds a tap on the bridge and returns its name (tap1, tap2, ...).
    pub fn add_tap(&self) -> Result<String> {
        let tap = {
            let mut n = self.taps.lock().expect("tap counter");
            *n += 1;
            format!("tap{n}")
        };
        self.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        self.ip(&["link", "set", &tap, "master", BRIDGE, "up"])?;
        Ok(tap)
    }

    /// The guest address of node `i` (1-based): 10.77.0.(10+i).
    pub fn node_ip(i: u8) -> String {
        format!("{SUBNET}.{}", 10 + u32::from(i))
    }

    pub fn node_mac(i: u8) -> String {
        format!("52:54:00:77:00:{:02x}", 10 + u32::from(i))
    }

    /// A systemd-networkd .network file giving the NIC with `mac` the address `ip`/24 and, like
    /// any real LAN, a default route (via the host side of the bridge, which forwards nothing).
    pub fn network_file(mac: &str, ip: &str) -> String {
        format!(
            "[Match]\nMACAddress={mac}\n\n[Network]\nAddress={ip}/24\nGateway={HOST_ADDR}\n\
             LinkLocalAddressing=no\nIPv6AcceptRA=no\n"
        )
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.lasting {
            return;
        }
        if let Err(e) = run_cmd("ip", &["netns", "delete", &self.name]) {
            eprintln!("e2e: cannot delete network namespace {}: {e:#}", self.name);
        }
    }
}

/// Deletes namespaces left by runs of this harness whose process is gone (killed before Drop ran).
pub(crate) fn sweep_stale() {
    sweep_namespaces(PREFIX);
}

/// Deletes the namespaces named `<prefix><pid>-...` whose test process `pid` is gone.
pub(crate) fn sweep_namespaces(prefix: &str) {
    clusteros_testkit::lan::sweep(prefix);
}

/// Whether the test process `pid` that created a namespace or VM may still be running. Any live
/// process with that pid counts (test binaries have many names: e2e-<hash>, services-<hash>, ...):
/// a reused pid only delays the cleanup, it never kills another run's VMs.
pub(crate) fn harness_alive(pid: u32) -> bool {
    pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists()
}
