//! The agent's configuration as `Config::load` builds it: the TOML file, the systemd credentials,
//! the cluster secret file and command-line values, through the same parse, decode and resolve
//! functions `load` uses (file reads replaced by the fuzz input). Must never panic; a config that
//! is accepted must hold only values the validators accept.
//!
//! Input: `[files, flags]` then sections separated by NUL: the TOML text, the five credentials
//! (`clusteros.cluster-secret`, `.join`, `.bootstrap-expect`, `.max-voters`, `.node-name`), the
//! secret file, then the overrides node name, listen, advertise, join (comma-separated),
//! bootstrap-expect, max-voters, secret file path. `files` bit 0: the config file exists; bits
//! 1-5: the credentials exist; bit 6: the secret file exists. `flags` bit N: override N is given.

#![forbid(unsafe_code)]
#![no_main]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use clusteros::core::config::{
    Config, ConfigError, Credentials, FileConfig, Overrides, credential, normalize_join_addr, parse_cidr, parse_toml,
    split_list, validate_node_name, validate_secret,
};
use libfuzzer_sys::fuzz_target;

const CONFIG_PATH: &str = "/etc/clusteros/agent.toml";
const CREDENTIALS_DIR: &str = "/run/credentials/clusteros-agent.service";
/// The only path the fake file system has (when `files` bit 6 is set).
const SECRET_FILE: &str = "/etc/clusteros/secret";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A config the validators accepted holds only values they accept.
fn check_accepted(c: &Config) {
    if let Some(n) = &c.node_name {
        validate_node_name(n).expect("accepted node name");
    }
    if let Some(s) = &c.cluster_secret {
        validate_secret(s).expect("accepted secret");
    }
    for j in &c.join {
        // Normalizing is idempotent: an accepted address is already normal.
        assert_eq!(normalize_join_addr(j).expect("accepted join address is valid"), *j);
    }
    assert!(matches!(c.max_voters, 1 | 3 | 5));
    assert_ne!(c.bootstrap_expect, Some(0));
    let (ip, len) = c.mesh_cidr;
    check_network(ip, len);
    assert!(c.raft.election_timeout_min_ms > c.raft.heartbeat_ms);
    assert!(c.raft.election_timeout_max_ms > c.raft.election_timeout_min_ms);
    assert!(c.health.suspect_after_ms < c.health.failed_after_ms);
    // The openraft configuration is derived from it at startup.
    let _ = clusteros::adapters::raft::raft_config(&c.raft);
}

/// An accepted mesh network lies entirely in the private ranges (the agent allocates mesh
/// addresses from all of it).
fn check_network(ip: Ipv4Addr, len: u8) {
    assert!((8..=28).contains(&len), "prefix {len}");
    let mask = u32::MAX << (32 - u32::from(len));
    let first = Ipv4Addr::from(u32::from(ip) & mask);
    let last = Ipv4Addr::from(u32::from(ip) | !mask);
    assert!(first.is_private() && last.is_private(), "mesh network {ip}/{len} ({first} - {last}) is not private");
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (files, flags) = (data[0], data[1]);
    let sections: Vec<&[u8]> = data[2..].split(|b| *b == 0).collect();
    let section = |i: usize| sections.get(i).copied().unwrap_or_default();

    // The helpers on their own, with any text.
    for s in &sections {
        let s = text(s);
        let _ = split_list(&s);
        if let Ok(a) = normalize_join_addr(&s) {
            assert_eq!(normalize_join_addr(&a).expect("normal form is accepted"), a);
        }
        if let Ok((ip, len)) = parse_cidr(&s) {
            check_network(ip, len);
        }
        let _ = validate_secret(&s).map_err(|e| e.to_string());
        let _ = validate_node_name(&s).map_err(|e| e.to_string());
    }

    let path = Path::new(CONFIG_PATH);
    let file = if files & 1 != 0 {
        match parse_toml(path, &text(section(0))) {
            Ok(f) => f,
            Err(e) => {
                assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
                let _ = e.to_string();
                return;
            }
        }
    } else {
        FileConfig::default()
    };
    let names = [
        credential::CLUSTER_SECRET,
        credential::JOIN,
        credential::BOOTSTRAP_EXPECT,
        credential::MAX_VOTERS,
        credential::NODE_NAME,
    ];
    let given: Vec<(&str, &[u8])> =
        names.iter().enumerate().filter(|(i, _)| files & (2 << i) != 0).map(|(i, n)| (*n, section(1 + i))).collect();
    let creds = match Credentials::from_files(Path::new(CREDENTIALS_DIR), &given) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let secret_file = section(6).to_vec();
    let secret_exists = files & 64 != 0;
    let read_secret_file = move |p: &Path| -> std::io::Result<String> {
        if secret_exists && p == Path::new(SECRET_FILE) {
            String::from_utf8(secret_file.clone())
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "stream did not contain valid UTF-8"))
        } else {
            Err(std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    };
    let opt = |bit: u8, i: usize| (flags & (1 << bit) != 0).then(|| text(section(i)));
    let o = Overrides {
        node_name: opt(0, 7),
        state_dir: None,
        socket_path: None,
        listen_addr: opt(1, 8),
        advertise_addr: opt(2, 9),
        join: opt(3, 10).map(|j| j.split(',').map(str::to_string).collect()),
        // clap parses these as numbers.
        bootstrap_expect: opt(4, 11).and_then(|v| v.parse().ok()),
        max_voters: opt(5, 12).and_then(|v| v.parse().ok()),
        cluster_secret_file: opt(6, 13).map(PathBuf::from),
    };
    match Config::resolve(file, creds, &o, &read_secret_file) {
        Ok(c) => check_accepted(&c),
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
