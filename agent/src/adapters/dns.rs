//! DNS SRV lookups over UDP (the I/O of [`crate::core::dns`]): the SRV query to each server in
//! turn, then A and AAAA queries for the targets the answer gave no address for. A fresh socket
//! (a random source port) and a random id per query; an answer from another address than the
//! server asked is ignored.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

use crate::core::config::{DnsSettings, resolv_conf_nameservers};
use crate::core::dns::{self, Answer, DnsError, TYPE_A, TYPE_AAAA, TYPE_SRV};

/// How long one server is given for one query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// At most this many targets are looked up by name after the SRV answer.
const MAX_TARGET_LOOKUPS: usize = 16;

/// The result of one SRV lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvLookup {
    /// `IP:PORT` to greet, in SRV order.
    pub addrs: Vec<String>,
    /// The shortest TTL of the records used (seconds).
    pub ttl: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("no DNS server: give discovery.dns_servers, or a nameserver line in /etc/resolv.conf ({0})")]
    NoServer(String),
    #[error("{name}: {error} (asked {servers})")]
    Dns { name: String, error: String, servers: String },
    #[error("{name}: the SRV records name no address to greet ({why})")]
    Empty { name: String, why: String },
}

/// Looks up `settings.srv` and the addresses of its targets.
pub async fn lookup_srv(settings: &DnsSettings) -> Result<SrvLookup, LookupError> {
    let servers = if settings.servers.is_empty() {
        let conf = std::fs::read_to_string("/etc/resolv.conf")
            .map_err(|e| LookupError::NoServer(format!("cannot read /etc/resolv.conf: {e}")))?;
        let s = resolv_conf_nameservers(&conf);
        if s.is_empty() {
            return Err(LookupError::NoServer("/etc/resolv.conf has no nameserver line".into()));
        }
        s
    } else {
        settings.servers.clone()
    };
    let srv = query(&servers, &settings.srv, TYPE_SRV).await?;
    let mut ttl = srv.srv.iter().map(|s| s.ttl).chain(srv.addrs.iter().map(|a| a.2)).min().unwrap_or(0);
    let (mut addrs, missing) = dns::srv_addresses(&srv.srv, &srv.addrs);
    if !missing.is_empty() {
        let mut known = srv.addrs.clone();
        let mut errors = Vec::new();
        for target in missing.iter().take(MAX_TARGET_LOOKUPS) {
            for qtype in [TYPE_A, TYPE_AAAA] {
                match query(&servers, target, qtype).await {
                    Ok(a) => {
                        ttl = a.addrs.iter().map(|a| a.2).chain([ttl]).min().unwrap_or(ttl);
                        known.extend(a.addrs.into_iter().filter(|(n, _, _)| n == target));
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        addrs = dns::srv_addresses(&srv.srv, &known).0;
        if addrs.is_empty() {
            return Err(LookupError::Empty { name: settings.srv.clone(), why: errors.join("; ") });
        }
    }
    if addrs.is_empty() {
        let why = if srv.srv.is_empty() { "no SRV record" } else { "every target is \".\" or port 0" };
        return Err(LookupError::Empty { name: settings.srv.clone(), why: why.into() });
    }
    Ok(SrvLookup { addrs, ttl })
}

/// One query, to each server in turn until one answers.
async fn query(servers: &[SocketAddr], name: &str, qtype: u16) -> Result<Answer, LookupError> {
    let mut last = String::new();
    for server in servers {
        match query_one(*server, name, qtype).await {
            Ok(a) => return Ok(a),
            // The name does not exist: another server would say the same.
            Err(e @ QueryError::Dns(DnsError::NoSuchName(_))) => {
                return Err(LookupError::Dns { name: name.into(), error: e.to_string(), servers: server.to_string() });
            }
            Err(e) => last = format!("{server}: {e}"),
        }
    }
    let list = servers.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    Err(LookupError::Dns { name: name.into(), error: last, servers: list })
}

#[derive(Debug, thiserror::Error)]
enum QueryError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Dns(#[from] DnsError),
}

async fn query_one(server: SocketAddr, name: &str, qtype: u16) -> Result<Answer, QueryError> {
    let local: SocketAddr =
        if server.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(server).await?;
    let id: u16 = rand::random();
    socket.send(&dns::encode_query(id, name, qtype)).await?;
    let mut buf = vec![0u8; 1500];
    let answer = async {
        loop {
            // A connected socket takes datagrams from the server only; one for another query
            // (a stale id) is skipped, anything malformed ends the query.
            let n = socket.recv(&mut buf).await?;
            match dns::parse_answer(&buf[..n], id, name, qtype) {
                Err(DnsError::Mismatch) => continue,
                r => return r.map_err(QueryError::from),
            }
        }
    };
    tokio::time::timeout(QUERY_TIMEOUT, answer).await.map_err(|_| QueryError::Timeout(QUERY_TIMEOUT))?
}
