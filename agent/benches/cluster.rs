//! Cluster benchmark: prints formation time and the idle RSS of the agents of a 3-node loopback
//! cluster, and the failover time (leader kill -9 or SIGTERM -> next committed write) with the
//! default Raft timings at 3 and 5 voters. KV throughput, side by side with etcd, is the `kv`
//! benchmark.
//! Run with `cargo bench -p clusteros-agent --bench cluster`. Figures, not pass/fail.

#[path = "../tests/common/cluster.rs"]
// The bench runs loopback clusters only; the harness's LAN clusters (`Cluster::on_lan`, for the
// discovery tests) are unused here.
#[allow(dead_code)]
mod common;
#[allow(dead_code)] // each benchmark uses some of them
mod figures;

use std::time::{Duration, Instant};

use common::{Cluster, Opts, wait_until};
use figures::{percentile, rss_kib};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run a short version then.
    let full = std::env::args().any(|a| a == "--bench");
    let rounds = if full { 3 } else { 1 };
    println!(
        "ClusterOS agent benchmark (3 agents on loopback, test Raft timings: heartbeat 100 ms, election 800-1600 ms)"
    );

    let mut formation = Vec::new();
    for _ in 0..rounds {
        let mut c = Cluster::new(3, Opts::default());
        c.start(0);
        c.start(1);
        c.start(2);
        let t = Instant::now();
        c.wait_converged(3, 0, Duration::from_secs(60)).await;
        formation.push(t.elapsed());
    }
    formation.sort();
    println!(
        "formation (3rd agent start -> 3 voters, one leader): median {:.0} ms of {formation:?}",
        formation[formation.len() / 2].as_secs_f64() * 1000.0
    );

    let mut c = Cluster::new(3, Opts::default());
    c.start_all();
    let leader = c.wait_converged(3, 0, Duration::from_secs(60)).await;
    c.nodes[leader].files.client().kv_put("bench", "0123456789abcdef").await.expect("a put");
    // Idle RSS is measured after two seconds without client traffic (a benchmark, not a test).
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (i, n) in c.nodes.iter().enumerate() {
        if let Some(kib) = n.pid().and_then(rss_kib) {
            println!(
                "idle RSS {} ({}): {:.1} MiB",
                n.name,
                if i == leader { "leader" } else { "follower" },
                kib as f64 / 1024.0
            );
        }
    }

    drop(c);

    let d = clusteros::core::config::RaftTuning::default();
    println!(
        "failover with the default timings (heartbeat {} ms, election {}-{} ms): leader gone -> next committed write",
        d.heartbeat_ms, d.election_timeout_min_ms, d.election_timeout_max_ms
    );
    for voters in [3, 5] {
        for how in [Stop::Kill, Stop::Graceful] {
            let mut times = Vec::new();
            for _ in 0..rounds * 2 {
                times.push(failover(voters, how).await);
            }
            times.sort();
            println!(
                "  {voters} voters, {:<21} median {:>5.0} ms, max {:>5.0} ms of {} rounds",
                match how {
                    Stop::Kill => "kill -9 of the leader:",
                    Stop::Graceful => "SIGTERM (hand-off):",
                },
                percentile(&times, 0.5).as_secs_f64() * 1000.0,
                times.last().unwrap().as_secs_f64() * 1000.0,
                times.len()
            );
        }
    }
}

#[derive(Clone, Copy)]
enum Stop {
    Kill,
    Graceful,
}

/// A cluster of `voters` agents with the default Raft timings: the time from the leader's kill
/// (or SIGTERM) to the next write committed through a survivor. The write is retried at once
/// when it fails (the survivor waits for a leader before it answers, bounded).
async fn failover(voters: usize, how: Stop) -> Duration {
    let opts = Opts { bootstrap_expect: Some(voters), max_voters: voters, default_raft: true, ..Opts::default() };
    let mut c = Cluster::new(voters, opts);
    c.start_all();
    let leader = c.wait_converged(voters, 0, Duration::from_secs(120)).await;
    let client = c.nodes[(leader + 1) % voters].files.client();
    // A write through the survivor first, so the one after the kill measures failover alone.
    client.kv_put("before", "x").await.expect("a write before the failover");
    let t = Instant::now();
    match how {
        Stop::Kill => c.kill(leader),
        Stop::Graceful => c.stop(leader),
    }
    wait_until(Duration::from_secs(60), "a write commits after the leader went", || async {
        client.kv_put("failover", "done").await.ok()
    })
    .await;
    t.elapsed()
}
