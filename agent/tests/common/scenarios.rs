//! What only the scenario tests need of the harness: one scenario at a time, more ways to
//! disturb a node (freeze, add one), and reading its metrics.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::cluster::{Cluster, Node, Opts};

/// Scenarios running now, and the wake-up of those waiting for a turn.
static RUNNING: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

/// At most `CLUSTEROS_TEST_SCENARIOS` scenarios (default 2) run at once, whatever libtest's
/// thread count: a scenario is several agents with 100 ms heartbeats, and more of them at once on
/// 2 cores would be load, not coverage. Two at a time: a scenario mostly waits (on elections,
/// timeouts, restarts), so one alone kept the host at about a third of its 2 cores and the
/// 29 scenarios took 190 s. Set it to 1 to run them one by one (e.g. to read one's timing).
pub fn serial() -> Turn {
    let limit = std::env::var("CLUSTEROS_TEST_SCENARIOS").ok().and_then(|v| v.parse().ok()).unwrap_or(2usize).max(1);
    let (count, cv) = &RUNNING;
    let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
    while *n >= limit {
        n = cv.wait(n).unwrap_or_else(|p| p.into_inner());
    }
    *n += 1;
    Turn
}

/// A scenario's turn: ends when dropped (also when the scenario panics).
pub struct Turn;

impl Drop for Turn {
    fn drop(&mut self) {
        let (count, cv) = &RUNNING;
        *count.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        cv.notify_one();
    }
}

impl Node {
    /// `GET /metrics` of this node (the peer address, port 7601).
    pub async fn metrics(&self) -> Option<String> {
        let ip = self.addr.rsplit_once(':')?.0;
        let r = http_get(&format!("http://{ip}:7601/metrics")).await.ok()?;
        if !r.status().is_success() {
            return None;
        }
        r.text().await.ok()
    }
}

/// `GET url` over plain HTTP (`/metrics`).
pub async fn http_get(url: &str) -> reqwest::Result<reqwest::Response> {
    // reqwest asks for a rustls provider even for a plain client.
    clusteros::adapters::tls::install_default_provider();
    reqwest::get(url).await
}

/// An HTTPS client of the peer API that proves `key` in its TLS handshakes: a node's own key, to
/// speak as that node; any other, to be a stranger to the cluster.
pub fn peer_https(key: &clusteros::core::auth::NodeKey) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(clusteros::adapters::tls::client_config(key, None))
        .build()
        .expect("an HTTPS client with a preconfigured rustls builds")
}

/// A TLS connection to the peer API at `addr` (`ip:port`) that proves `key`, for writing raw
/// HTTP over it.
pub async fn peer_tls(
    addr: &str,
    key: &clusteros::core::auth::NodeKey,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect to the peer API");
    let ip = addr.rsplit_once(':').expect("ip:port").0.to_string();
    let name = rustls::pki_types::ServerName::try_from(ip).expect("an IP address is a server name");
    let config = std::sync::Arc::new(clusteros::adapters::tls::client_config(key, None));
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("a TLS handshake with the peer API")
}

/// A node key of no node: a stranger's.
pub fn stranger_key() -> clusteros::core::auth::NodeKey {
    clusteros::core::auth::NodeKey::from_seed(&rand::random::<[u8; 32]>())
}

impl Cluster {
    /// Adds a node whose join addresses are the current nodes' addresses.
    pub fn add_node(&mut self, opts: Opts) -> usize {
        let join = self.nodes.iter().map(|n| n.addr.clone()).collect();
        self.push_node(opts, join)
    }
    /// Starts `voters` nodes with `bootstrap_expect`, waits for them to form, then adds and
    /// starts one more node that joins as a learner. Returns the learner's index.
    pub async fn form_with_learner(&mut self, opts: &Opts) -> usize {
        self.start_all();
        let voters = self.nodes.len();
        self.wait_converged(voters, 0, Duration::from_secs(60)).await;
        let n = self.add_node(Opts { bootstrap_expect: None, ..opts.clone() });
        self.start(n);
        n
    }
    /// Every node's log, one after another (for lines whichever node led at the time wrote).
    pub fn all_logs(&self) -> String {
        self.nodes.iter().map(|n| n.files.log()).collect()
    }
    /// Freezes (SIGSTOP) or thaws (SIGCONT) a running node, like a paused VM or a suspended machine.
    pub fn freeze(&self, i: usize, frozen: bool) {
        let pid = self.nodes[i].pid().expect("the node runs");
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
        assert!(ok, "kill {sig} {pid}");
    }
    /// Changes node `i`'s options and rewrites its config (the agent reads it at its next start).
    pub fn reconfigure(&mut self, i: usize, change: impl FnOnce(&mut Opts)) {
        change(&mut self.nodes[i].opts);
        self.nodes[i].write_config();
    }
}

/// The value of the sample `line_prefix VALUE` (e.g. `clusteros_raft_voters`) in a metrics text.
pub fn metric(text: &str, line_prefix: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(line_prefix)?.strip_prefix(' ')?.parse().ok())
}
