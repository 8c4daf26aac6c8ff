//! Agent configuration: `/etc/clusteros/agent.toml`, overlaid by systemd credentials from
//! `$CREDENTIALS_DIRECTORY`, overlaid by command-line flags. Validation errors name the key and the fix.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/clusteros/agent.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/clusteros";
pub const DEFAULT_SOCKET_PATH: &str = "/run/clusteros/agent.sock";
pub const DEFAULT_PEER_PORT: u16 = 7600;
pub const DEFAULT_METRICS_PORT: u16 = 7601;
pub const MIN_SECRET_LEN: usize = 16;

/// Where `/metrics` is served. It names the members, their roles and keys, so by default only
/// this node and the mesh can reach it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    /// The default (`metrics_addr` unset or `"mesh"`): 127.0.0.1 from the start, and this node's
    /// mesh address once `wg0` has it, on this port.
    LoopbackAndMesh(u16),
    /// Exactly this address, e.g. `0.0.0.0:7601` to let a Prometheus on the underlay scrape it
    /// (firewall it: the page is not authenticated).
    At(SocketAddr),
}

mod discovery;
pub use discovery::{
    BeaconSettings, DEFAULT_BEACON_PORT, Discovery, DiscoveryFile, DnsSettings, resolv_conf_nameservers,
};

/// Names of the systemd credentials the agent reads.
pub mod credential {
    pub const CLUSTER_SECRET: &str = "clusteros.cluster-secret";
    pub const JOIN: &str = "clusteros.join";
    pub const BOOTSTRAP_EXPECT: &str = "clusteros.bootstrap-expect";
    pub const MAX_VOTERS: &str = "clusteros.max-voters";
    pub const NODE_NAME: &str = "clusteros.node-name";
    /// Other cluster secrets this node accepts besides its own, one per line: for rotating the
    /// cluster secret without stopping the cluster (README, "Rotating the cluster secret").
    pub const ACCEPTED_SECRETS: &str = "clusteros.accepted-cluster-secrets";
}

/// How to provide a cluster secret; part of every "no secret" message.
pub const SECRET_HOWTO: &str = "set cluster_secret (or cluster_secret_file) in /etc/clusteros/agent.toml, or pass the \
     systemd credential clusteros.cluster-secret (QEMU: -smbios type=11,value=io.systemd.credential:clusteros.cluster-secret=SECRET; \
     PXE: systemd.set_credential=clusteros.cluster-secret:SECRET on the kernel command line); all nodes need the same secret \
     of at least 16 characters, e.g. from `openssl rand -base64 32`";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("cannot read credential {name} from {dir}: {source}")]
    Credential { name: String, dir: PathBuf, source: std::io::Error },
    #[error("invalid value for {key}: {message}")]
    Invalid { key: &'static str, message: String },
}

/// The agent's unit has no CAP_NET_BIND_SERVICE: a port below 1024 would fail at every start.
fn unprivileged_port(key: &'static str, addr: SocketAddr) -> Result<(), ConfigError> {
    if addr.port() < 1024 {
        return Err(invalid(
            key,
            format!(
                "port {} is below 1024, which the agent may not bind (its unit grants no CAP_NET_BIND_SERVICE); use 1024 or above",
                addr.port()
            ),
        ));
    }
    Ok(())
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key, message: message.into() }
}

/// Raft timing and log retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftTuning {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_after_logs: u64,
    /// Entries kept in the log after a snapshot (older ones are purged).
    pub logs_to_keep: u64,
    /// Timeout of one peer RPC (append, vote, forward).
    pub rpc_timeout_ms: u64,
    /// Timeout of one snapshot transfer.
    pub snapshot_timeout_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        // For a LAN and for VMs under emulation: a heartbeat well above a slow round trip
        // (openraft 0.9 bounds every AppendEntries by one heartbeat), and elections after four
        // to six missed heartbeats, so that a lost leader is replaced within about 1.5 s
        // (`cargo bench --bench cluster` prints the failover figures).
        RaftTuning {
            heartbeat_ms: 250,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 1500,
            snapshot_after_logs: 1000,
            logs_to_keep: 500,
            rpc_timeout_ms: 2000,
            snapshot_timeout_ms: 30_000,
        }
    }
}

/// Failure detection and dead-node cleanup, run by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthTuning {
    /// No contact for this long: suspect.
    pub suspect_after_ms: u64,
    /// No contact for this long: failed (a failed voter is replaced by a healthy learner).
    pub failed_after_ms: u64,
    /// No contact for this long: removed from the cluster (the grace period). One hour by
    /// default: a machine that reboots for maintenance or an upgrade (server firmware alone can
    /// take minutes, and a TCG VM on a slow host takes more than five to boot) must come back as
    /// the same member, with its id and its Raft log, not as a new node.
    pub remove_after_ms: u64,
}

impl Default for HealthTuning {
    fn default() -> Self {
        HealthTuning { suspect_after_ms: 5_000, failed_after_ms: 15_000, remove_after_ms: 3_600_000 }
    }
}

impl HealthTuning {
    pub fn suspect_after(&self) -> Duration {
        Duration::from_millis(self.suspect_after_ms)
    }
    pub fn failed_after(&self) -> Duration {
        Duration::from_millis(self.failed_after_ms)
    }
    pub fn remove_after(&self) -> Duration {
        Duration::from_millis(self.remove_after_ms)
    }
}

/// The config file as written by people: everything optional. Tests and tools write one by
/// serializing this type ([`FileConfig::to_toml`]), so a renamed key cannot drift from them.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub node_name: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub socket_path: Option<PathBuf>,
    pub listen_addr: Option<String>,
    pub advertise_addr: Option<String>,
    pub join: Option<Vec<String>>,
    pub bootstrap_expect: Option<usize>,
    pub max_voters: Option<usize>,
    pub cluster_secret: Option<String>,
    pub cluster_secret_file: Option<PathBuf>,
    /// A file of other cluster secrets this node accepts (one per line) while the cluster
    /// secret is rotated; it signs and seals with `cluster_secret` only.
    pub accepted_cluster_secrets_file: Option<PathBuf>,
    pub mesh_cidr: Option<String>,
    pub manage_services: Option<ServiceMode>,
    pub metrics_addr: Option<String>,
    #[serde(default)]
    pub raft: RaftTuning,
    #[serde(default)]
    pub health: HealthTuning,
    #[serde(default)]
    pub discovery: DiscoveryFile,
}

/// Values given on the command line; they win over everything else.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub node_name: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub socket_path: Option<PathBuf>,
    pub listen_addr: Option<String>,
    pub advertise_addr: Option<String>,
    pub join: Option<Vec<String>>,
    pub bootstrap_expect: Option<usize>,
    pub max_voters: Option<usize>,
    pub cluster_secret_file: Option<PathBuf>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Node name; `None` means the hostname.
    pub node_name: Option<String>,
    pub state_dir: PathBuf,
    pub socket_path: PathBuf,
    pub listen_addr: SocketAddr,
    pub advertise_addr: Option<SocketAddr>,
    pub join: Vec<String>,
    pub bootstrap_expect: Option<usize>,
    pub max_voters: usize,
    /// `None`: the agent runs, but refuses to form or join a cluster and says how to provide one.
    pub cluster_secret: Option<String>,
    /// Other cluster secrets accepted from peers (and for opening what was sealed with them)
    /// while the cluster secret is rotated; never used to sign or seal. Without duplicates and
    /// without `cluster_secret` itself.
    pub accepted_cluster_secrets: Vec<String>,
    /// The WireGuard mesh network (address, prefix length).
    pub mesh_cidr: (std::net::Ipv4Addr, u8),
    pub manage_services: ServiceMode,
    /// Where Prometheus metrics are served over plain HTTP (`GET /metrics`).
    pub metrics: MetricsListen,
    pub raft: RaftTuning,
    pub health: HealthTuning,
    pub discovery: Discovery,
}

/// Whether the agent drives node services (munge, slurm, k3s) and the WireGuard mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ServiceMode {
    /// When systemd runs as PID 1 (`/run/systemd/system` exists).
    #[default]
    Auto,
    On,
    Off,
}

/// Parses `A.B.C.D/N` for the mesh network (a private IPv4 network with room for nodes).
pub fn parse_cidr(s: &str) -> Result<(std::net::Ipv4Addr, u8), ConfigError> {
    let bad = |m: &str| invalid("mesh_cidr", format!("{s:?}: {m}; example: 10.90.0.0/16"));
    let (ip, len) = s.split_once('/').ok_or_else(|| bad("missing /PREFIX"))?;
    let ip: std::net::Ipv4Addr = ip.parse().map_err(|_| bad("not an IPv4 address"))?;
    let len: u8 = len.parse().map_err(|_| bad("prefix is not a number"))?;
    if !(8..=28).contains(&len) {
        return Err(bad("prefix must be between 8 and 28"));
    }
    // The whole network, not just the address given: 192.168.0.0/8 is 192.0.0.0/8.
    let mask = u32::MAX << (32 - u32::from(len));
    let first = std::net::Ipv4Addr::from(u32::from(ip) & mask);
    let last = std::net::Ipv4Addr::from(u32::from(ip) | !mask);
    if !(first.is_private() && last.is_private()) {
        return Err(bad("use a private network (10/8, 172.16/12, 192.168/16)"));
    }
    Ok((ip, len))
}

impl Config {
    /// Combines the config file, the credentials and the overrides and validates the result.
    /// Pure but for `read_secret_file`, which reads `cluster_secret_file` ([`Config::load`] passes
    /// `std::fs::read_to_string`).
    pub fn resolve(
        file: FileConfig,
        creds: Credentials,
        o: &Overrides,
        read_secret_file: &dyn Fn(&Path) -> std::io::Result<String>,
    ) -> Result<Config, ConfigError> {
        let node_name = o.node_name.clone().or(creds.node_name).or(file.node_name);
        if let Some(name) = &node_name {
            validate_node_name(name)?;
        }
        let listen =
            o.listen_addr.clone().or(file.listen_addr).unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_PEER_PORT}"));
        let listen_addr: SocketAddr = listen
            .parse()
            .map_err(|e| invalid("listen_addr", format!("{listen:?} is not IP:PORT ({e}); example: 0.0.0.0:7600")))?;
        unprivileged_port("listen_addr", listen_addr)?;
        let advertise_addr = match o.advertise_addr.clone().or(file.advertise_addr) {
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|e| {
                invalid("advertise_addr", format!("{a:?} is not IP:PORT ({e}); example: 10.0.0.5:7600"))
            })?),
            None => None,
        };
        if let Some(a) = advertise_addr
            && a.ip().is_unspecified()
        {
            return Err(invalid(
                "advertise_addr",
                format!("{a} is unspecified; give the address other nodes reach this node at"),
            ));
        }
        let join = o.join.clone().or(creds.join).or(file.join).unwrap_or_default();
        let join = join.iter().map(|j| normalize_join_addr(j)).collect::<Result<Vec<_>, _>>()?;
        let bootstrap_expect = o.bootstrap_expect.or(creds.bootstrap_expect).or(file.bootstrap_expect);
        if bootstrap_expect == Some(0) {
            return Err(invalid(
                "bootstrap_expect",
                "must be at least 1 (the number of nodes that form the cluster together)",
            ));
        }
        let max_voters = o.max_voters.or(creds.max_voters).or(file.max_voters).unwrap_or(3);
        if max_voters != 1 && max_voters != 3 && max_voters != 5 {
            return Err(invalid(
                "max_voters",
                format!("{max_voters} is not allowed; use 3 (default) or 5 (or 1 for a test cluster)"),
            ));
        }
        let secret_file = o.cluster_secret_file.clone().or(file.cluster_secret_file);
        let cluster_secret = match (creds.cluster_secret, secret_file, file.cluster_secret) {
            (Some(s), _, _) => Some(s),
            (None, Some(p), _) => Some(
                read_secret_file(&p)
                    .map_err(|e| invalid("cluster_secret_file", format!("cannot read {}: {e}", p.display())))?
                    .trim_end_matches(['\n', '\r'])
                    .to_string(),
            ),
            (None, None, s) => s,
        };
        if let Some(s) = &cluster_secret {
            validate_secret(s)?;
        }
        let accepted_text =
            match (creds.accepted_secrets, file.accepted_cluster_secrets_file) {
                (Some(t), _) => Some(t),
                (None, Some(p)) => Some(read_secret_file(&p).map_err(|e| {
                    invalid("accepted_cluster_secrets_file", format!("cannot read {}: {e}", p.display()))
                })?),
                (None, None) => None,
            };
        let mut accepted_cluster_secrets: Vec<String> = Vec::new();
        for line in accepted_text.as_deref().unwrap_or_default().lines().map(str::trim).filter(|l| !l.is_empty()) {
            validate_secret(line).map_err(|e| match e {
                ConfigError::Invalid { message, .. } => invalid("accepted_cluster_secrets", message),
                other => other,
            })?;
            if Some(line) != cluster_secret.as_deref() && !accepted_cluster_secrets.iter().any(|a| a == line) {
                accepted_cluster_secrets.push(line.to_string());
            }
        }
        if !accepted_cluster_secrets.is_empty() && cluster_secret.is_none() {
            return Err(invalid(
                "accepted_cluster_secrets",
                "other secrets are accepted only beside a cluster secret of this node's own: set cluster_secret too",
            ));
        }
        let raft = file.raft;
        if raft.heartbeat_ms == 0 || raft.election_timeout_min_ms <= raft.heartbeat_ms * 2 {
            return Err(invalid("raft.election_timeout_min_ms", "must be more than twice raft.heartbeat_ms"));
        }
        if raft.election_timeout_max_ms <= raft.election_timeout_min_ms {
            return Err(invalid("raft.election_timeout_max_ms", "must be greater than raft.election_timeout_min_ms"));
        }
        if raft.snapshot_after_logs == 0 {
            return Err(invalid("raft.snapshot_after_logs", "must be at least 1"));
        }
        if raft.rpc_timeout_ms == 0 || raft.snapshot_timeout_ms == 0 {
            return Err(invalid("raft.rpc_timeout_ms", "RPC timeouts must be positive"));
        }
        let mesh_cidr = parse_cidr(file.mesh_cidr.as_deref().unwrap_or("10.90.0.0/16"))?;
        let manage_services = file.manage_services.unwrap_or_default();
        let metrics = match file.metrics_addr.as_deref() {
            Some("off") => MetricsListen::Off,
            None | Some("mesh") => MetricsListen::LoopbackAndMesh(DEFAULT_METRICS_PORT),
            Some(a) => {
                let addr = a.parse::<SocketAddr>().map_err(|e| {
                    invalid(
                        "metrics_addr",
                        format!("{a:?} is not IP:PORT, \"mesh\" or \"off\" ({e}); example: \"0.0.0.0:7601\""),
                    )
                })?;
                unprivileged_port("metrics_addr", addr)?;
                MetricsListen::At(addr)
            }
        };
        let health = file.health;
        if !(health.suspect_after_ms < health.failed_after_ms && health.failed_after_ms <= health.remove_after_ms) {
            return Err(invalid(
                "health",
                "need suspect_after_ms < failed_after_ms <= remove_after_ms (e.g. 5000, 15000, 3600000)",
            ));
        }
        Ok(Config {
            node_name,
            state_dir: o.state_dir.clone().or(file.state_dir).unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            socket_path: o.socket_path.clone().or(file.socket_path).unwrap_or_else(|| DEFAULT_SOCKET_PATH.into()),
            listen_addr,
            advertise_addr,
            join,
            bootstrap_expect,
            max_voters,
            cluster_secret,
            accepted_cluster_secrets,
            mesh_cidr,
            manage_services,
            metrics,
            raft,
            health,
            discovery: file.discovery.resolve()?,
        })
    }
}

/// Parses the text of the config file (`path` names it in the error).
impl FileConfig {
    /// The file as TOML, the way [`parse_toml`] reads it back (unset keys are left out).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a FileConfig always serializes")
    }
}

pub fn parse_toml(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str::<FileConfig>(text)
        .map_err(|e| ConfigError::Parse { path: path.to_owned(), message: describe_toml_error(text, &e) })
}

/// Where a TOML error is and what it is, without the text of the line: the line may hold the
/// cluster secret, and this message goes to the journal and to `clusteros status`. The key is
/// named (it is no secret), quoted values in the message are elided.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = elide_values(e.message().trim());
    let Some(before) = e.span().and_then(|s| text.get(..s.start)) else { return msg };
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty() && k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    });
    match key {
        Some(k) => format!("line {line_no}, column {column} (key {k}): {msg}"),
        None => format!("line {line_no}, column {column}: {msg}"),
    }
}

/// Replaces the values serde quotes in its messages (`string "..."`, ``variant `...` ``) by `...`.
fn elide_values(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    loop {
        let next = [("string \"", '"'), ("variant `", '`')]
            .into_iter()
            .filter_map(|(open, close)| rest.find(open).map(|i| (i, open, close)))
            .min_by_key(|(i, _, _)| *i);
        let Some((i, open, close)) = next else { break };
        let value_start = i + open.len();
        out.push_str(&rest[..value_start]);
        out.push_str("...");
        match rest[value_start..].find(close) {
            Some(j) => rest = &rest[value_start + j..],
            None => {
                out.push(close);
                return out;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Values found in `$CREDENTIALS_DIRECTORY`.
#[derive(Debug, Default)]
pub struct Credentials {
    cluster_secret: Option<String>,
    join: Option<Vec<String>>,
    bootstrap_expect: Option<usize>,
    max_voters: Option<usize>,
    node_name: Option<String>,
    /// The accepted secrets, one per line (not trimmed into one value).
    accepted_secrets: Option<String>,
}

impl Credentials {
    /// The credentials from the contents of the files in `dir` (name, bytes), as
    /// [`Config::load`] reads them there; a name that is not given is a missing file.
    pub fn from_files(dir: &Path, files: &[(&str, &[u8])]) -> Result<Credentials, ConfigError> {
        Self::decode(|name| {
            let Some((_, bytes)) = files.iter().find(|(n, _)| *n == name) else { return Ok(None) };
            // What `read_to_string` says about such a file.
            let text = std::str::from_utf8(bytes).map_err(|_| ConfigError::Credential {
                name: name.into(),
                dir: dir.into(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"),
            })?;
            Ok(Some(text.to_string()))
        })
    }

    /// Decodes the credentials; `read(name)` gives the contents of credential `name`, `None` if
    /// there is none.
    pub(crate) fn decode(
        read: impl Fn(&str) -> Result<Option<String>, ConfigError>,
    ) -> Result<Credentials, ConfigError> {
        let get = |name: &str| -> Result<Option<String>, ConfigError> {
            Ok(read(name)?.map(|v| v.trim().to_string()).filter(|v| !v.is_empty()))
        };
        let number = |name: &'static str, key: &'static str| -> Result<Option<usize>, ConfigError> {
            get(name)?
                .map(|v| {
                    v.parse::<usize>().map_err(|_| invalid(key, format!("credential {name} is {v:?}, not a number")))
                })
                .transpose()
        };
        Ok(Credentials {
            cluster_secret: get(credential::CLUSTER_SECRET)?,
            join: get(credential::JOIN)?.map(|v| split_list(&v)),
            bootstrap_expect: number(credential::BOOTSTRAP_EXPECT, "bootstrap_expect")?,
            max_voters: number(credential::MAX_VOTERS, "max_voters")?,
            node_name: get(credential::NODE_NAME)?,
            accepted_secrets: read(credential::ACCEPTED_SECRETS)?.filter(|v| !v.trim().is_empty()),
        })
    }
}

/// Splits a list given as one string: commas and/or whitespace separate entries.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace()).filter(|p| !p.is_empty()).map(str::to_string).collect()
}

/// Accepts `host`, `host:port`, `[v6]:port`; adds the default port when none is given.
pub fn normalize_join_addr(addr: &str) -> Result<String, ConfigError> {
    let addr = addr.trim();
    let bad = |m: &str| invalid("join", format!("{addr:?}: {m}; use HOST or HOST:PORT, e.g. 10.0.0.1:7600"));
    if addr.is_empty() {
        return Err(bad("empty address"));
    }
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(addr.to_string());
    }
    if let Ok(ip) = addr.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PEER_PORT).to_string());
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => {
            port.parse::<u16>().map_err(|_| bad("port is not a number"))?;
            if host.is_empty() {
                return Err(bad("host is empty"));
            }
            Ok(addr.to_string())
        }
        Some(_) => Err(bad("not a valid address")),
        None => Ok(format!("{addr}:{DEFAULT_PEER_PORT}")),
    }
}

pub fn validate_secret(s: &str) -> Result<(), ConfigError> {
    if s.chars().count() < MIN_SECRET_LEN {
        return Err(invalid(
            "cluster_secret",
            format!(
                "the secret is {} characters, it must be at least {MIN_SECRET_LEN}; generate one with `openssl rand -base64 32`",
                s.chars().count()
            ),
        ));
    }
    Ok(())
}

pub fn validate_node_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        return Err(invalid(
            "node_name",
            format!(
                "{name:?} is not a valid host name: use 1-63 letters, digits and '-', not starting or ending with '-'"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
