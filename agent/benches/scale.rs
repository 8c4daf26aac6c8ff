//! Scale benchmark (`make bench-scale`): N agents on this host's loopback with identical configs,
//! as identical images would have them (bootstrap_expect = 3, the first three nodes as join
//! addresses, the agent's default Raft and health timings, services off), all started together.
//! For each N (`SCALE_NODES`, default "50 100 250") it prints:
//! - the time until every node sees every member, and until every node has applied the same index;
//! - idle CPU (over `SCALE_IDLE_SECONDS`, default 10) and RSS of the leader and of every agent
//!   (median, max, sum);
//! - the TCP bytes per second the leader sends while idle (`ss`, summed over its sockets);
//! - leader kill -9 -> the next write committed through another node;
//!
//! and at the end a linear model, fitted to those figures, of a leader's and a follower's idle
//! load at 1,000 and 5,000 nodes.
//!
//! Every wait is bounded: formation gives up when no node has seen a new member for
//! `SCALE_STALL_SECONDS` (default 120), or after `SCALE_FORM_SECONDS` (default 600) in all, and
//! says how far it got. The status of every agent is polled every N/50 seconds (at least 1;
//! `SCALE_POLL_SECONDS` sets it), so that the polling does not load the host more as N grows.
//! Figures, not pass/fail.

#[path = "../tests/common/cluster.rs"]
// Loopback clusters only; the harness's LAN clusters are unused here.
#[allow(dead_code)]
mod common;
#[allow(dead_code)] // each benchmark uses some of them
mod figures;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clusteros::core::config::{HealthTuning, RaftTuning};
use common::{Cluster, Opts, wait_until};
use figures::rss_kib;

/// What one poll of every agent's status saw.
struct Poll {
    /// Per node: members it lists, its applied index, whether it leads.
    nodes: Vec<Option<(usize, Option<u64>, bool)>>,
}

impl Poll {
    fn all_see(&self, n: usize) -> bool {
        self.nodes.iter().all(|s| s.is_some_and(|(m, _, _)| m == n))
    }

    fn members_seen(&self) -> usize {
        self.nodes.iter().map(|s| s.map_or(0, |(m, _, _)| m)).sum()
    }

    fn same_applied(&self) -> bool {
        let applied: Vec<Option<u64>> = self.nodes.iter().map(|s| s.and_then(|(_, a, _)| a)).collect();
        applied.iter().all(|a| a.is_some() && *a == applied[0])
    }

    fn leader(&self) -> Option<usize> {
        self.nodes.iter().position(|s| s.is_some_and(|(_, _, l)| l))
    }
}

async fn poll(c: &Cluster) -> Poll {
    let mut tasks = Vec::new();
    for n in &c.nodes {
        let client = n.files.client();
        tasks.push(tokio::spawn(async move {
            let s = client.status().await.ok()?;
            let raft = s.raft.as_ref();
            Some((s.members.len(), raft.and_then(|r| r.applied_index), raft.is_some_and(|r| r.state == "leader")))
        }));
    }
    let mut nodes = Vec::new();
    for t in tasks {
        nodes.push(t.await.ok().flatten());
    }
    Poll { nodes }
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    Some(ticks / hz)
}

/// Bytes sent so far on each established TCP socket of `pid`, by (local, peer) address.
fn tcp_bytes_sent(pid: u32) -> BTreeMap<(String, String), u64> {
    let out = std::process::Command::new("ss").args(["-tinpH", "state", "established"]).output();
    let Ok(out) = out else { return BTreeMap::new() };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut sockets = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let needle = format!("pid={pid},");
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            let addrs: Vec<&str> =
                line.split_whitespace().filter(|t| t.contains(':') && !t.starts_with("users:")).collect();
            current =
                (line.contains(&needle) && addrs.len() >= 2).then(|| (addrs[0].to_string(), addrs[1].to_string()));
        } else if let Some(key) = current.take() {
            let sent = line.split_whitespace().find_map(|t| t.strip_prefix("bytes_sent:")).and_then(|v| v.parse().ok());
            // A socket that has sent nothing yet shows no bytes_sent.
            sockets.insert(key, sent.unwrap_or(0));
        }
    }
    sockets
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// What one N measured, for the model.
struct Figures {
    n: usize,
    leader_cpu: f64,
    follower_cpu_median: f64,
    leader_bytes_per_s: f64,
    rss_median_mib: f64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn run(n: usize) -> Option<Figures> {
    let stall = Duration::from_secs(env_u64("SCALE_STALL_SECONDS", 120));
    let limit = Duration::from_secs(env_u64("SCALE_FORM_SECONDS", 600));
    let every = Duration::from_secs(env_u64("SCALE_POLL_SECONDS", (n as u64 / 50).max(1)).max(1));
    let idle = Duration::from_secs(env_u64("SCALE_IDLE_SECONDS", 10));
    let raft = RaftTuning::default();
    let opts = Opts {
        bootstrap_expect: Some(3),
        max_voters: 3,
        default_raft: true,
        snapshot_after_logs: raft.snapshot_after_logs,
        logs_to_keep: raft.logs_to_keep,
        suspect_after_ms: HealthTuning::default().suspect_after_ms,
        failed_after_ms: HealthTuning::default().failed_after_ms,
        remove_after_ms: HealthTuning::default().remove_after_ms,
        ..Opts::default()
    };
    let mut c = Cluster::identical(n, 3, opts);
    println!("{n} agents:");
    let t0 = Instant::now();
    c.start_all();
    let (mut all_seen, mut same_applied) = (None, None);
    let (mut best, mut last_progress) = (0, Instant::now());
    let last = loop {
        let p = poll(&c).await;
        if all_seen.is_none() && p.all_see(n) {
            all_seen = Some(t0.elapsed());
        }
        if all_seen.is_some() && same_applied.is_none() && p.same_applied() {
            same_applied = Some(t0.elapsed());
        }
        if all_seen.is_some() && same_applied.is_some() {
            break p;
        }
        if p.members_seen() > best {
            (best, last_progress) = (p.members_seen(), Instant::now());
        } else if last_progress.elapsed() > stall {
            break p;
        }
        if t0.elapsed() > limit {
            break p;
        }
        tokio::time::sleep(every).await;
    };
    let secs =
        |d: Option<Duration>| d.map_or_else(|| "not reached".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    println!("  every node sees every member:     {} (polled every {every:?})", secs(all_seen));
    println!("  every node applied the same index: {}", secs(same_applied));
    if all_seen.is_none() {
        let complete = last.nodes.iter().filter(|s| s.is_some_and(|(m, _, _)| m == n)).count();
        let most = last.nodes.iter().filter_map(|s| s.map(|(m, _, _)| m)).max().unwrap_or(0);
        println!(
            "  gave up after {:.0} s ({}): {complete} of {n} nodes saw every member; the most any node saw: {most} members",
            t0.elapsed().as_secs_f64(),
            if t0.elapsed() > limit {
                format!("the limit of {limit:?}")
            } else {
                format!("{stall:?} without progress")
            },
        );
        println!("  (no idle or failover figures: the cluster is not formed)");
        return None;
    }
    let Some(leader) = last.leader() else {
        println!("  (no node leads at the end: no idle or failover figures)");
        return None;
    };

    // Idle: no client traffic.
    let pids: Vec<u32> = c.nodes.iter().filter_map(|x| x.pid()).collect();
    let leader_pid = c.nodes[leader].pid()?;
    let cpu0: Vec<Option<f64>> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let sent0 = tcp_bytes_sent(leader_pid);
    let t = Instant::now();
    tokio::time::sleep(idle).await;
    let window = t.elapsed().as_secs_f64();
    let sent1 = tcp_bytes_sent(leader_pid);
    let cpu: Vec<(u32, f64)> =
        pids.iter().zip(cpu0).filter_map(|(p, c0)| Some((*p, (cpu_seconds(*p)? - c0?) / window))).collect();
    let sent: u64 = sent1.iter().map(|(k, v)| v.saturating_sub(sent0.get(k).copied().unwrap_or(0))).sum();
    let leader_cpu = cpu.iter().find(|(p, _)| *p == leader_pid).map_or(0.0, |(_, c)| *c);
    let mut followers: Vec<f64> = cpu.iter().filter(|(p, _)| *p != leader_pid).map(|(_, c)| *c).collect();
    let all_cpu: f64 = cpu.iter().map(|(_, c)| c).sum();
    let mut rss: Vec<f64> = pids.iter().filter_map(|p| rss_kib(*p)).map(|k| k as f64 / 1024.0).collect();
    let leader_rss = rss_kib(leader_pid).map_or(0.0, |k| k as f64 / 1024.0);
    let rss_sum: f64 = rss.iter().sum();
    let follower_max = followers.iter().copied().fold(0.0, f64::max);
    let follower_median = median(&mut followers);
    let rss_median = median(&mut rss);
    println!(
        "  idle CPU over {window:.0} s: all agents {all_cpu:.3} cores; leader {leader_cpu:.4}; other agents median {follower_median:.4}, max {follower_max:.4}"
    );
    println!(
        "  RSS: median {rss_median:.1} MiB, max {:.1} MiB, leader {leader_rss:.1} MiB, all agents {:.2} GiB",
        rss.last().copied().unwrap_or(0.0),
        rss_sum / 1024.0
    );
    let leader_bytes_per_s = sent as f64 / window;
    println!("  leader TCP bytes sent while idle: {:.1} KiB/s", leader_bytes_per_s / 1024.0);

    // Leader kill -> the next write committed through another node (retried at once).
    let via = (leader + 1) % n;
    let client = c.nodes[via].files.client();
    client.kv_put("scale-before", "x").await.ok()?;
    let t = Instant::now();
    c.kill(leader);
    wait_until(Duration::from_secs(300), "a write commits after the leader's kill", || async {
        client.kv_put("scale-after", "x").await.ok()
    })
    .await;
    println!("  leader kill -9 -> next committed write: {:.2} s", t.elapsed().as_secs_f64());
    Some(Figures {
        n,
        leader_cpu,
        follower_cpu_median: follower_median,
        leader_bytes_per_s,
        rss_median_mib: rss_median,
    })
}

/// Least squares fit y = a + b x.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let k = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |(sx, sy), (x, y)| (sx + x, sy + y));
    let (mx, my) = (sx / k, sy / k);
    let sxx: f64 = points.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    let sxy: f64 = points.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let b = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (my - b * mx, b)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo test --benches` passes no --bench: then one small cluster, to prove it runs.
    let full = std::env::args().any(|a| a == "--bench");
    let default = if full { "50 100 250" } else { "10" };
    let sizes: Vec<usize> = std::env::var("SCALE_NODES")
        .unwrap_or_else(|_| default.into())
        .split_whitespace()
        .map(|s| s.parse().expect("SCALE_NODES: numbers of agents, e.g. \"50 100 250\""))
        .collect();
    for n in &sizes {
        assert!((4..=250).contains(n), "SCALE_NODES: {n} agents: between 4 and 250 fit the loopback net of one bench");
    }
    println!(
        "ClusterOS scale benchmark: identical configs (bootstrap_expect 3, the first 3 nodes as join addresses, default Raft and health timings, 3 voters), on {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut measured = Vec::new();
    for n in sizes {
        if let Some(f) = run(n).await {
            measured.push(f);
        }
    }
    if measured.len() < 2 {
        println!("model: needs figures at two sizes at least");
        return;
    }
    let model = |what: &str, unit: &str, y: &dyn Fn(&Figures) -> f64| {
        let points: Vec<(f64, f64)> = measured.iter().map(|f| (f.n as f64, y(f))).collect();
        let (a, b) = fit(&points);
        let at = |x: f64| a + b * x;
        println!(
            "  {what:<34} {a:>10.4} + {b:.6} x N {unit}: at 1,000 nodes {:.3}, at 5,000 nodes {:.3}",
            at(1000.0),
            at(5000.0)
        );
    };
    println!(
        "model (least squares over {} sizes: {}):",
        measured.len(),
        measured.iter().map(|f| f.n.to_string()).collect::<Vec<_>>().join(", ")
    );
    model("leader idle CPU", "cores", &|f| f.leader_cpu);
    model("leader TCP bytes sent", "KiB/s", &|f| f.leader_bytes_per_s / 1024.0);
    model("other agent idle CPU (median)", "cores", &|f| f.follower_cpu_median);
    model("agent RSS (median)", "MiB", &|f| f.rss_median_mib);
    println!(
        "  (every node is a Raft voter or learner today: the leader replicates to, and hears from, every one of them)"
    );
}
