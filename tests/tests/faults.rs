//! The fault-injection suite: `make faults` runs it in full (`FAULTS_ROUNDS=20`), `.ci/run` a
//! short version (the default, 2 rounds of every fault kind). The 3-node and 5-node runs are two
//! tests, so they run at the same time unless `--test-threads=1`.
//!
//! Each run forms a cluster of real agents in network namespaces, runs clients on every node
//! while the nemesis injects and heals faults, then checks the history for linearizability and
//! lost writes and prints the report. A run passes with no violation, no inconclusive key, no
//! lost acknowledged write and no agent panic; timings are reported, never asserted.

use clusteros_e2e::faults::{self, Config};

async fn run(nodes: usize) {
    let cfg = Config::from_env(nodes).unwrap_or_else(|e| panic!("fault suite settings: {e:#}"));
    let out = faults::run(&cfg).await.unwrap_or_else(|e| panic!("fault suite {}: {e:#}", cfg.name));
    assert!(
        out.passed(),
        "fault suite {} (seed {}) found problems (files in {}):\n{}\n{}",
        cfg.name,
        cfg.seed,
        out.dir.display(),
        out.report,
        out.panics.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_3_nodes() {
    run(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_5_nodes() {
    run(5).await;
}
