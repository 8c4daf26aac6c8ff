//! KV benchmark, side by side with etcd in one run on this machine: puts/s and latency of a
//! closed-loop client over HTTP/1.1 keep-alive at 1 and 64 concurrent clients, against
//! - ClusterOS: 3 agents on loopback with the default Raft timings, writes through the leader's
//!   local API (`POST /v1/kv/put` on its unix socket);
//! - etcd (Debian's `etcd-server`, 3.4): 3 members on loopback with etcd's default settings,
//!   writes through its leader's JSON gateway (`POST /v3/kv/put` on TCP).
//!
//! Both keep their data in a directory under the same temporary directory (one file system), and
//! both fsync every committed write. The runs alternate (ClusterOS, etcd, ClusterOS, ...) so that
//! a machine that slows down during the run slows both; the ratio printed is of the medians.
//! Run with `make bench` (it installs etcd when missing) or
//! `cargo bench -p clusteros-agent --bench kv`. Figures, not pass/fail.

#[path = "../tests/common/cluster.rs"]
// The bench runs loopback clusters only; the harness's LAN clusters are unused here.
#[allow(dead_code)]
mod common;
#[allow(dead_code)] // each benchmark uses some of them
mod figures;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use common::{Cluster, Opts, wait_until};
use figures::percentile;

/// The value of every put: 16 bytes, as in the cluster benchmark before.
const VALUE: &str = "0123456789abcdef";

/// Where the closed-loop clients send their puts.
#[derive(Clone)]
enum Target {
    ClusterOs(PathBuf),
    Etcd(String),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::ClusterOs(_) => "ClusterOS",
            Target::Etcd(_) => "etcd",
        }
    }

    /// One HTTP client: one keep-alive connection, as a closed-loop client has.
    fn http(&self) -> reqwest::Client {
        let b = reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(1);
        match self {
            Target::ClusterOs(socket) => b.unix_socket(socket.as_path()),
            Target::Etcd(_) => b,
        }
        .build()
        .expect("an HTTP client builds")
    }

    fn put(&self, http: &reqwest::Client, key: &str) -> reqwest::RequestBuilder {
        match self {
            Target::ClusterOs(_) => {
                http.post("http://localhost/v1/kv/put").json(&serde_json::json!({ "key": key, "value": VALUE }))
            }
            Target::Etcd(url) => http
                .post(format!("{url}/v3/kv/put"))
                .json(&serde_json::json!({ "key": B64.encode(key), "value": B64.encode(VALUE) })),
        }
    }
}

/// What one closed-loop run measured.
struct Run {
    puts_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `clients` tasks, each putting `per_client` keys one after another; every answer must be 200.
async fn closed_loop(target: &Target, clients: usize, per_client: usize, round: usize) -> Run {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let http = target.http();
            let mut lat = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let t = Instant::now();
                let resp = target.put(&http, &format!("bench-{round}-{c}-{i}")).send().await;
                match resp {
                    Ok(r) if r.status().is_success() => {
                        r.bytes().await.expect("the body of a put's answer");
                    }
                    Ok(r) => {
                        let status = r.status();
                        panic!("{} put answered {status}: {}", target.name(), r.text().await.unwrap_or_default())
                    }
                    Err(e) => panic!("{} put failed: {e}", target.name()),
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("a client task"));
    }
    let total = start.elapsed();
    lat.sort();
    Run {
        puts_per_s: lat.len() as f64 / total.as_secs_f64(),
        p50_ms: percentile(&lat, 0.50).as_secs_f64() * 1000.0,
        p99_ms: percentile(&lat, 0.99).as_secs_f64() * 1000.0,
    }
}

/// Three etcd members on loopback with etcd's defaults (only names, URLs and data directories
/// given), killed on drop.
struct Etcd {
    children: Vec<Child>,
    clients: Vec<String>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Etcd {
    fn start(dir: &Path) -> Etcd {
        let peers: Vec<String> = (0..3).map(|_| format!("http://127.0.0.1:{}", free_port())).collect();
        let clients: Vec<String> = (0..3).map(|_| format!("http://127.0.0.1:{}", free_port())).collect();
        let initial: Vec<String> = peers.iter().enumerate().map(|(i, p)| format!("m{}={p}", i + 1)).collect();
        let mut children = Vec::new();
        for i in 0..3 {
            let data = dir.join(format!("etcd-m{}", i + 1));
            let log = std::fs::File::create(dir.join(format!("etcd-m{}.log", i + 1))).unwrap();
            let child = Command::new("etcd")
                .arg(format!("--name=m{}", i + 1))
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--listen-peer-urls={}", peers[i]))
                .arg(format!("--initial-advertise-peer-urls={}", peers[i]))
                .arg(format!("--listen-client-urls={}", clients[i]))
                .arg(format!("--advertise-client-urls={}", clients[i]))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg("--initial-cluster-token=clusteros-bench")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot start etcd ({e}): install it with `apt-get install etcd-server etcd-client` (make bench does)")
                });
            children.push(child);
        }
        Etcd { children, clients }
    }

    /// The client URL of the member that leads, once all three are healthy.
    async fn leader(&self) -> String {
        let http = reqwest::Client::new();
        wait_until(Duration::from_secs(120), "3 etcd members are healthy and agree on a leader", || async {
            let mut leader = None;
            for url in &self.clients {
                let s: serde_json::Value = http
                    .post(format!("{url}/v3/maintenance/status"))
                    .json(&serde_json::json!({}))
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                let (me, lead) = (s["header"]["member_id"].as_str()?, s["leader"].as_str()?);
                if lead == "0" {
                    return None;
                }
                if me == lead {
                    leader = Some(url.clone());
                }
            }
            leader
        })
        .await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run a short version then.
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full { 3 } else { 1 };
    let d = clusteros::core::config::RaftTuning::default();
    println!(
        "KV puts, ClusterOS (3 agents, default Raft timings: heartbeat {} ms, election {}-{} ms) and etcd {} (3 members, its defaults), both on loopback, writes through the leader, {rounds} alternating round(s) each",
        d.heartbeat_ms,
        d.election_timeout_min_ms,
        d.election_timeout_max_ms,
        etcd_version()
    );

    let mut c = Cluster::new(3, Opts { default_raft: true, ..Opts::default() });
    c.start_all();
    let leader = c.wait_converged(3, 0, Duration::from_secs(120)).await;
    let clusteros = Target::ClusterOs(c.nodes[leader].files.socket());
    let etcd_dir = c.root.path().join("etcd");
    std::fs::create_dir_all(&etcd_dir).unwrap();
    let etcd = Etcd::start(&etcd_dir);
    let etcd_target = Target::Etcd(etcd.leader().await);

    for (clients, per) in [(1, if full { 500 } else { 50 }), (64, if full { 50 } else { 5 })] {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            for (target, out) in [(&clusteros, &mut ours), (&etcd_target, &mut theirs)] {
                let r = closed_loop(target, clients, per, round).await;
                println!(
                    "  {:<9} {clients:>2} client(s): {:>5} puts, {:>7.0} puts/s, p50 {:>6.2} ms, p99 {:>6.2} ms",
                    target.name(),
                    clients * per,
                    r.puts_per_s,
                    r.p50_ms,
                    r.p99_ms
                );
                out.push(r.puts_per_s);
            }
        }
        let (a, b) = (median(&mut ours), median(&mut theirs));
        println!(
            "kv put, {clients:>2} client(s): ClusterOS {a:.0} puts/s, etcd {b:.0} puts/s (medians): ClusterOS / etcd = {:.2}",
            a / b
        );
    }
    drop(etcd);
}

fn etcd_version() -> String {
    Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(|l| l.trim_start_matches("etcd Version: ").to_string()))
        .unwrap_or_else(|| "(not found: install etcd-server)".into())
}
