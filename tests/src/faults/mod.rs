//! The fault-injection suite (Jepsen-style): real `clusteros agent` processes, each in its own
//! network namespace on one bridge, concurrent clients on every node recording a history of
//! linearizable gets, puts and compare-and-sets plus a set workload, a nemesis that kills,
//! pauses, partitions, drops packets, restarts everything and fills or write-protects disks, and
//! a linearizability checker over the history ([`checker`]).
//!
//! One run ([`run`]): form the cluster, start the clients, run the nemesis schedule (every fault
//! healed before the next), let the cluster be quiet, stop the clients, wait until every node has
//! converged, read every key back, check, report. The run's directory
//! (`target/faults/<name>/`) keeps the history, the fault events, the report and every agent's
//! log when the run fails (or with `FAULTS_KEEP=1`).
//!
//! Needs root (namespaces, tmpfs mounts) and `nft` (nftables).

pub mod checker;
pub mod delay;
pub mod nemesis;
pub mod net;
pub mod nodes;
pub mod report;
pub mod workload;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::SeedableRng;
use rand::rngs::StdRng;

use self::checker::{OpKind, Outcome};
use self::nemesis::{FaultKind, Nemesis};
use self::net::Lan;
use self::nodes::Agents;
use self::report::Report;
use self::workload::{Recorder, RegisterClient, SetClient};

/// What one run does.
#[derive(Clone, Debug)]
pub struct Config {
    /// A name for the run directory and the output.
    pub name: String,
    pub nodes: usize,
    /// Rounds of every fault kind.
    pub rounds: usize,
    pub kinds: Vec<FaultKind>,
    pub seed: u64,
    pub clients_per_node: usize,
    /// The nemesis stops starting new faults after this long.
    pub max_faults_time: Duration,
    /// Tells LANs of one process apart (0-255).
    pub lan_id: u8,
}

impl Config {
    /// `nodes` nodes, the other settings from the environment: `FAULTS_ROUNDS` (default 2),
    /// `FAULTS_SEED` (default: from the clock, printed), `FAULTS_KINDS` (comma-separated kind
    /// names, default all), `FAULTS_MAX_SECS` (default 900).
    pub fn from_env(nodes: usize) -> Result<Config> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let rounds = env("FAULTS_ROUNDS").map(|v| v.parse()).transpose().context("FAULTS_ROUNDS")?.unwrap_or(2);
        let seed = match env("FAULTS_SEED") {
            Some(s) => s.parse().context("FAULTS_SEED must be a number")?,
            None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as u64,
        };
        let kinds = match env("FAULTS_KINDS") {
            Some(list) => list
                .split(',')
                .map(|name| {
                    FaultKind::ALL.iter().copied().find(|k| k.name() == name.trim()).with_context(|| {
                        format!(
                            "unknown fault kind {name:?} in FAULTS_KINDS; kinds: {}",
                            FaultKind::ALL.map(FaultKind::name).join(", ")
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            None => FaultKind::ALL.to_vec(),
        };
        let max = env("FAULTS_MAX_SECS").map(|v| v.parse()).transpose().context("FAULTS_MAX_SECS")?.unwrap_or(900);
        Ok(Config {
            name: format!("n{nodes}"),
            nodes,
            rounds,
            kinds,
            seed,
            clients_per_node: 2,
            max_faults_time: Duration::from_secs(max),
            lan_id: nodes as u8,
        })
    }
}

/// What a run found, and where its files are.
pub struct Outcomes {
    pub report: Report,
    pub dir: PathBuf,
    /// Agent log lines that say an agent panicked.
    pub panics: Vec<String>,
}

impl Outcomes {
    pub fn passed(&self) -> bool {
        self.report.passed() && self.panics.is_empty()
    }
}

/// One whole run. Errors are problems of the harness or a cluster that never converged; what
/// the checker finds is in the report.
pub async fn run(cfg: &Config) -> Result<Outcomes> {
    let dir = crate::target_dir().join("faults").join(&cfg.name);
    nodes::unmount_below(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "faults: {}: {} nodes, {} rounds of {} kinds, seed {}",
        cfg.name,
        cfg.nodes,
        cfg.rounds,
        cfg.kinds.len(),
        cfg.seed
    );
    let lan = Arc::new(Lan::new(cfg.lan_id, cfg.nodes)?);
    let agents = Agents::new(&lan, &dir)?;
    let result = run_in(cfg, lan, agents.clone()).await;
    let keep = std::env::var_os("FAULTS_KEEP").is_some();
    match &result {
        Ok(o) if o.passed() && !keep => {}
        Ok(_) | Err(_) => {
            agents.keep();
            println!("faults: {}: files kept in {}", cfg.name, dir.display());
        }
    }
    result
}

async fn run_in(cfg: &Config, lan: Arc<Lan>, agents: Arc<Agents>) -> Result<Outcomes> {
    let dir = agents.root.clone();
    let t0 = Instant::now();
    agents.start_all()?;
    agents.wait_converged(Duration::from_secs(120)).await.context("forming the cluster")?;
    println!("faults: {}: formed in {:.1} s", cfg.name, t0.elapsed().as_secs_f64());

    let rec = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let per = cfg.clients_per_node;
    for node in 0..cfg.nodes {
        for c in 0..per {
            let client = RegisterClient {
                node,
                process: node * per + c,
                keys_per_epoch: 3,
                epoch: Duration::from_secs(10),
                seed: cfg.seed,
            };
            clients.push(tokio::spawn(client.run(agents.clone(), rec.clone(), stop.clone())));
        }
        clients.push(tokio::spawn(SetClient { node }.run(agents.clone(), rec.clone(), stop.clone())));
    }
    let workload_start = rec.now();
    // Some quiet history first.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let plan: Vec<FaultKind> =
        nemesis::schedule(cfg.rounds, &mut rng).into_iter().filter(|k| cfg.kinds.contains(k)).collect();
    let mut nemesis = Nemesis { lan: lan.clone(), agents: agents.clone(), rec: rec.clone(), rng };
    let events = nemesis.run(&plan, Instant::now() + cfg.max_faults_time).await;
    // Whatever happened, heal everything.
    let _ = lan.heal();
    for n in &agents.nodes {
        let _ = n.pause(false);
        let _ = n.free_disk();
        let _ = n.start();
    }
    let events = events?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.await;
    }
    let workload_end = rec.now();

    let converged = agents.wait_converged(Duration::from_secs(120)).await;
    if let Err(e) = &converged {
        std::fs::write(dir.join("agents.log"), agents.dump_logs(400))?;
        return Err(anyhow::anyhow!("{e:#}")).context("after the last fault was healed");
    }

    // Read every key back, linearizably (recorded in the history, so the checker sees them).
    let reader = agents.nodes[0].files.client();
    let keys: BTreeSet<String> = rec.ops().iter().map(|o| o.key.clone()).collect();
    for key in &keys {
        let op = clusteros_testkit::poll(Duration::from_secs(60), || async {
            let op = workload::run_op(&reader, &rec, usize::MAX, key, OpKind::Read).await;
            matches!(op.outcome, Outcome::Ok(_)).then_some(op)
        })
        .await
        .with_context(|| format!("reading {key} back after the run"))?;
        rec.push(op);
    }
    let mut present = BTreeSet::new();
    for s in rec.sets() {
        let got = clusteros_testkit::poll(Duration::from_secs(60), || async {
            match tokio::time::timeout(workload::OP_TIMEOUT, reader.kv_get(&s.key, false)).await {
                Ok(Ok(r)) => Some(r.entry.is_some()),
                _ => None,
            }
        })
        .await
        .with_context(|| format!("reading set key {} back after the run", s.key))?;
        if got {
            present.insert(s.key.clone());
        }
    }

    let ops = rec.ops();
    let started = Instant::now();
    let verdicts = checker::check(&ops);
    println!("faults: {}: checked {} operations in {:.1} s", cfg.name, ops.len(), started.elapsed().as_secs_f64());
    let exits: Vec<(u64, String)> = agents
        .nodes
        .iter()
        .flat_map(|n| n.exits())
        .map(|(at, what)| (at.saturating_duration_since(rec.start()).as_nanos() as u64, what))
        .collect();
    let node_of = |p: usize| if p == usize::MAX { 0 } else { p / per };
    let report = report::build(
        cfg.nodes,
        &ops,
        &rec.sets(),
        &verdicts,
        &present,
        &events,
        &node_of,
        (workload_start, workload_end),
        exits,
    );
    let panics: Vec<String> = agents
        .nodes
        .iter()
        .flat_map(|n| {
            n.files
                .log()
                .lines()
                .filter(|l| l.contains("panicked at"))
                .map(|l| format!("{}: {l}", n.name))
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::write(dir.join("history.json"), serde_json::to_vec(&ops)?)?;
    std::fs::write(dir.join("sets.json"), serde_json::to_vec(&rec.sets())?)?;
    std::fs::write(dir.join("events.json"), serde_json::to_vec_pretty(&events)?)?;
    std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    std::fs::write(dir.join("report.txt"), report.to_string())?;
    println!("{report}");
    for p in &panics {
        println!("  AGENT PANIC {p}");
    }
    Ok(Outcomes { report, dir, panics })
}
