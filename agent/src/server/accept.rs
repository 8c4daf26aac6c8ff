//! The accept loop of the agent's TCP listeners (the peer API, on the underlay and on the mesh,
//! and `/metrics`): what a connection must do to be kept. A listener holds at most
//! [`Limits::max_connections`] connections, at most [`Limits::max_per_source`] from one IP
//! address (a connection over either is closed at once and counted); a connection that has not
//! sent a whole request head within [`Limits::header_timeout`], or sits idle that long between
//! requests, is closed. So neither idle sockets nor a slow trickle of header bytes from anyone,
//! secret or not, can use up the agent's file descriptors or memory, and one address flooding
//! the port does not lock out the others.
//!
//! Must not: look at what a request says (the router and its middleware do).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;
use tracing::{debug, warn};

use super::Throttle;
use crate::adapters::tls::ChannelKey;

/// What one listener admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at once.
    pub max_connections: usize,
    /// Open connections at once from one IP address.
    pub max_per_source: usize,
    /// Time to send a whole request head, on a new connection and between the requests of a
    /// kept-alive one. Longer than the peer client's pool idle timeout (15 s), so a pooled
    /// connection is never closed under a request the client is sending.
    pub header_timeout: Duration,
    /// Time to finish the TLS handshake of a new connection (a listener with TLS only). Its own,
    /// shorter bound: anyone may start a handshake (the server takes any node key), so a slot
    /// held without a handshake, then without a request head, is held at most this plus
    /// `header_timeout`. Nodes finish theirs in a few round trips and one Ed25519 signature each.
    pub handshake_timeout: Duration,
}

impl Limits {
    /// The peer API. A node talks to another over a handful of connections (Raft replication and
    /// heartbeats, one per forwarded request in flight), so 256 from one address leaves room for
    /// bursts of forwarded client requests; 4,096 in all stays far below the unit's 65,536 file
    /// descriptors.
    pub const PEER: Limits = Limits {
        max_connections: 4096,
        max_per_source: 256,
        header_timeout: Duration::from_secs(20),
        handshake_timeout: Duration::from_secs(5),
    };
    /// `/metrics`: scrapers, one or two per source.
    pub const METRICS: Limits = Limits {
        max_connections: 64,
        max_per_source: 8,
        header_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
    };
}

/// Why a connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds `max_connections`.
    Full,
    /// The source address holds `max_per_source`.
    SourceFull,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Full => "the listener holds its most connections",
            Refusal::SourceFull => "this address holds its most connections",
        })
    }
}

/// The open connections of one listener, counted in all and by source address.
#[derive(Debug)]
pub struct Connections {
    limits: Limits,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// One admitted connection; dropping it gives the place back.
#[derive(Debug)]
pub struct Admitted {
    conns: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    pub fn new(limits: Limits) -> Arc<Connections> {
        Arc::new(Connections { limits, open: Mutex::new((0, HashMap::new())) })
    }

    /// Admits a connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admitted, Refusal> {
        let mut g = self.open.lock().expect("connection count lock");
        let (total, by_source) = &mut *g;
        if *total >= self.limits.max_connections {
            return Err(Refusal::Full);
        }
        let n = by_source.entry(ip).or_insert(0);
        if *n >= self.limits.max_per_source {
            return Err(Refusal::SourceFull);
        }
        *n += 1;
        *total += 1;
        Ok(Admitted { conns: self.clone(), ip })
    }

    /// Open connections: in all, and from `ip`.
    pub fn open(&self, ip: IpAddr) -> (usize, usize) {
        let g = self.open.lock().expect("connection count lock");
        (g.0, g.1.get(&ip).copied().unwrap_or(0))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut g = self.conns.open.lock().expect("connection count lock");
        let (total, by_source) = &mut *g;
        *total -= 1;
        if let Some(n) = by_source.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.ip);
            }
        }
    }
}

/// Serves `app` on `listener` within `limits` until `stop` turns true; then lets the requests in
/// flight finish (the caller bounds how long it waits) and closes idle connections. Every
/// request carries its connection's [`ConnectInfo<SocketAddr>`]. With `tls` (the peer API), a
/// connection must finish a TLS handshake within the header timeout, and every request carries
/// the node key the handshake proved ([`ChannelKey`]); without (`/metrics`), it is plain HTTP.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    what: &'static str,
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    mut stop: watch::Receiver<bool>,
    refused: impl Fn() + Send + Sync + 'static,
) {
    let conns = Connections::new(limits);
    let mut tasks = JoinSet::new();
    let mut throttle = Throttle::new(Duration::from_secs(10), 1);
    let mut accept_errors = Throttle::new(Duration::from_secs(10), 1);
    let handshakes = Arc::new(Mutex::new(Throttle::new(Duration::from_secs(10), 1)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    loop {
        let accepted = tokio::select! {
            () = stopped(&mut stop) => break,
            a = listener.accept() => a,
            // Reap finished connections so the set does not grow.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors or memory, or a connection reset while queued: wait a
                // little instead of spinning, as hyper's own server does.
                if let Some(held) = accept_errors.due() {
                    warn!("{what}: cannot accept a connection: {e} ({held} more since the last report)");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let admitted = match conns.admit(remote.ip()) {
            Ok(a) => a,
            Err(why) => {
                refused();
                if let Some(held) = throttle.due() {
                    let (total, from) = conns.open(remote.ip());
                    warn!(
                        peer_addr = %remote,
                        "{what}: closed a connection at once: {why} ({total} open, {from} from this address; \
                         {held} more closed since the last report)"
                    );
                }
                drop(stream);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let mut stop = stop.clone();
        let acceptor = acceptor.clone();
        let handshakes = handshakes.clone();
        tasks.spawn(async move {
            let _admitted = admitted;
            let Some(acceptor) = acceptor else {
                return serve_connection(what, stream, remote, None, app, limits, stop).await;
            };
            let handshake = tokio::select! {
                h = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream)) => h,
                () = stopped(&mut stop) => return,
            };
            let failed = |why: String| {
                // A node without TLS (an agent older than this one), another program, or a
                // scanner: seen in the journal, not once per connection.
                let due = handshakes.lock().map(|mut t| t.due()).unwrap_or(Some(0));
                if let Some(held) = due {
                    warn!(peer_addr = %remote, "{what}: closed a connection without a TLS 1.3 handshake with a node key: {why} ({held} more since the last report)");
                }
            };
            let tls = match handshake {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return failed(e.to_string()),
                Err(_) => return failed(format!("no handshake within {:?}", limits.handshake_timeout)),
            };
            let Some(key) = crate::adapters::tls::peer_key(tls.get_ref().1.peer_certificates()) else {
                return failed("the client proved no node key".into());
            };
            serve_connection(what, tls, remote, Some(ChannelKey(key)), app, limits, stop).await;
        });
    }
    drop(listener);
    while tasks.join_next().await.is_some() {}
}

/// Serves HTTP/1.1 on one admitted connection (plain, or the TLS stream over it) until the
/// client closes it, it idles past the header timeout, or `stop`.
async fn serve_connection<S>(
    what: &'static str,
    stream: S,
    remote: SocketAddr,
    key: Option<ChannelKey>,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = app.map_request(move |req: hyper::Request<hyper::body::Incoming>| {
        let mut req = req.map(axum::body::Body::new);
        req.extensions_mut().insert(ConnectInfo(remote));
        if let Some(k) = &key {
            req.extensions_mut().insert(k.clone());
        }
        req
    });
    let service = TowerToHyperService::new(service);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = stopped(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // A client that went away or sent too slowly; nothing the agent can mend.
        debug!(peer_addr = %remote, "{what}: connection ended: {e}");
    }
}

/// Returns once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per: usize) -> Limits {
        Limits {
            max_connections: total,
            max_per_source: per,
            header_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_source_gets_its_share_and_the_listener_its_cap() {
        let c = Connections::new(limits(3, 2));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = c.admit(a).unwrap();
        let _a2 = c.admit(a).unwrap();
        assert_eq!(c.admit(a).unwrap_err(), Refusal::SourceFull);
        let _b1 = c.admit(b).unwrap();
        assert_eq!(c.admit(b).unwrap_err(), Refusal::Full, "the listener is full before b's share is");
        assert_eq!(c.open(a), (3, 2));
        drop(a1);
        assert_eq!(c.open(a), (2, 1));
        let _a3 = c.admit(a).unwrap();
        assert_eq!(c.admit(b).unwrap_err(), Refusal::Full);
    }

    #[test]
    fn places_are_given_back_and_sources_forgotten() {
        let c = Connections::new(limits(2, 2));
        let ips: Vec<IpAddr> = (1..=50u8).map(|i| IpAddr::from([10, 0, 1, i])).collect();
        for ip in &ips {
            let x = c.admit(*ip).unwrap();
            let y = c.admit(*ip).unwrap();
            drop((x, y));
        }
        let g = c.open.lock().unwrap();
        assert_eq!(g.0, 0);
        assert!(g.1.is_empty(), "sources with no connection are kept: {:?}", g.1);
    }

    /// A connection that sends nothing, and one that sends half a request head, are closed after
    /// the header timeout; one over the source's share is closed at once; a whole request is
    /// answered.
    #[tokio::test]
    async fn idle_and_slow_connections_are_closed() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            axum::routing::get(|ConnectInfo(a): ConnectInfo<SocketAddr>| async move { a.ip().to_string() }),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let r = refused.clone();
        let lim = Limits {
            max_connections: 8,
            max_per_source: 2,
            header_timeout: Duration::from_millis(300),
            handshake_timeout: Duration::from_millis(300),
        };
        let server = tokio::spawn(serve("test", listener, app, lim, None, stop_rx, move || {
            r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 256];
        // Closed at once: EOF (or a reset) long before the header timeout.
        let n = tokio::time::timeout(Duration::from_secs(5), over.read(&mut buf)).await.expect("closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        for s in [&mut idle, &mut slow] {
            // hyper may answer a timed-out head with a 408 before closing; either way it closes.
            let mut rest = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "a connection without a whole request head is kept open");
        }
        assert_eq!(refused.load(std::sync::atomic::Ordering::Relaxed), 1);
        let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
        ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = String::new();
        ok.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("127.0.0.1"), "{answer}");
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("stops").unwrap();
    }
    /// With TLS: a connection that stops halfway through its handshake is closed after the
    /// handshake timeout (shorter than the header timeout); one that finishes it is served, and
    /// the handler sees the node key it proved.
    #[tokio::test]
    async fn a_tls_listener_bounds_the_handshake_and_names_the_clients_key() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/",
            axum::routing::get(|axum::Extension(ChannelKey(k)): axum::Extension<ChannelKey>| async move { k }),
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let lim = Limits {
            max_connections: 8,
            max_per_source: 8,
            header_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_millis(300),
        };
        let server_key = crate::core::auth::NodeKey::from_seed(&[4; 32]);
        let tls = crate::adapters::tls::server_config(&server_key);
        let server = tokio::spawn(serve("test", listener, app, lim, Some(tls), stop_rx, || {}));
        // Half a ClientHello record, then nothing: closed after the handshake timeout, not the
        // header timeout.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(&[0x16, 0x03, 0x01, 0x00, 0xc8, 0x01]).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a connection stuck in its handshake is kept open");
        // A node's client: answered over TLS, with its key on the request.
        let client_key = crate::core::auth::NodeKey::from_seed(&[5; 32]);
        let config = Arc::new(crate::adapters::tls::client_config(&client_key, Some(server_key.public_bytes())));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
        tls.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with(&client_key.public()), "{answer}");
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server).await.expect("stops").unwrap();
    }
}
