//! The nemesis: injects one fault at a time, holds it, heals it and lets the cluster be quiet for
//! a moment, following a shuffled schedule with a fixed number of rounds of every fault kind.
//! Every fault is healed before the next one starts and before the run ends.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::net::{Lan, Rules};
use super::nodes::Agents;
use super::workload::Recorder;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// kill -9 of the leader, restarted 0.5-2 s later.
    KillLeader,
    /// kill -9 of a random node, restarted 0.5-2 s later.
    KillRandom,
    /// SIGSTOP of a random node (the leader half the time), SIGCONT later.
    Pause,
    /// One random follower cut off from everyone.
    IsolateOne,
    /// The leader cut off from everyone.
    IsolateLeader,
    /// A random majority and minority that cannot reach each other.
    Split,
    /// One node (the leader half the time) can receive but nothing it sends arrives.
    OneWay,
    /// Two halves that cannot reach each other and one node that reaches both.
    Bridge,
    /// Every node loses a share (10-30%) of the packets it sends and receives.
    Loss,
    /// Every node's incoming packets are held 5-40 ms (with jitter), as `tc netem delay` would
    /// (the host kernel has no netem: an NFQUEUE worker per node does it, see `delay.rs`).
    Delay,
    /// kill -9 of every node, all restarted 0.5-2 s later.
    RestartAll,
    /// One node's state file system fills up (the leader half the time), then space returns.
    DiskFull,
    /// One node comes back with its state file system read-only, then it is writable again.
    ReadOnly,
}

impl FaultKind {
    pub const ALL: [FaultKind; 13] = [
        FaultKind::KillLeader,
        FaultKind::KillRandom,
        FaultKind::Pause,
        FaultKind::IsolateOne,
        FaultKind::IsolateLeader,
        FaultKind::Split,
        FaultKind::OneWay,
        FaultKind::Bridge,
        FaultKind::Loss,
        FaultKind::Delay,
        FaultKind::RestartAll,
        FaultKind::DiskFull,
        FaultKind::ReadOnly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillLeader => "kill-leader",
            FaultKind::KillRandom => "kill-random",
            FaultKind::Pause => "pause",
            FaultKind::IsolateOne => "isolate-one",
            FaultKind::IsolateLeader => "isolate-leader",
            FaultKind::Split => "split",
            FaultKind::OneWay => "one-way",
            FaultKind::Bridge => "bridge",
            FaultKind::Loss => "loss",
            FaultKind::Delay => "delay",
            FaultKind::RestartAll => "restart-all",
            FaultKind::DiskFull => "disk-full",
            FaultKind::ReadOnly => "read-only",
        }
    }
}

impl FaultKind {
    /// Faults healed by starting agents again (the heal is a restart, not a network repair).
    pub fn restarts(self) -> bool {
        matches!(self, FaultKind::KillLeader | FaultKind::KillRandom | FaultKind::RestartAll | FaultKind::ReadOnly)
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One injected fault.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FaultEvent {
    pub kind: FaultKind,
    /// What exactly was done, for people.
    pub detail: String,
    /// Nodes that could not serve while the fault held (killed, paused, cut off, on the minority
    /// side); writes through the other nodes are expected to succeed.
    pub affected: Vec<usize>,
    /// Suite clock (ns).
    pub inject: u64,
    pub heal: u64,
    /// From the heal until every node was up, agreed on the leader and had caught up (ms); None
    /// if that did not happen within [`RECOVERY_LIMIT`].
    pub recovered_ms: Option<u64>,
}

/// How long the nemesis waits for the cluster to be whole again after a heal.
pub const RECOVERY_LIMIT: Duration = Duration::from_secs(60);

/// A schedule: `rounds` of every kind, shuffled.
pub fn schedule(rounds: usize, rng: &mut StdRng) -> Vec<FaultKind> {
    let mut s: Vec<FaultKind> = FaultKind::ALL.iter().flat_map(|k| std::iter::repeat_n(*k, rounds)).collect();
    s.shuffle(rng);
    s
}

pub struct Nemesis {
    pub lan: Arc<Lan>,
    pub agents: Arc<Agents>,
    pub rec: Arc<Recorder>,
    pub rng: StdRng,
}

fn ms(rng: &mut StdRng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(rng.gen_range(lo..=hi))
}

impl Nemesis {
    fn n(&self) -> usize {
        self.agents.len()
    }

    async fn leader_or_random(&mut self) -> usize {
        match self.agents.leader().await {
            Some(l) => l,
            None => self.rng.gen_range(0..self.n()),
        }
    }

    /// The leader half of the time, else a random node.
    async fn maybe_leader(&mut self) -> usize {
        if self.rng.gen_bool(0.5) { self.leader_or_random().await } else { self.rng.gen_range(0..self.n()) }
    }

    async fn follower(&mut self) -> usize {
        let leader = self.agents.leader().await;
        let others: Vec<usize> = (0..self.n()).filter(|i| Some(*i) != leader).collect();
        *others.choose(&mut self.rng).expect("more than one node")
    }

    fn names(&self, nodes: &[usize]) -> String {
        nodes.iter().map(|i| self.agents.nodes[*i].name.clone()).collect::<Vec<_>>().join(",")
    }

    /// Injects `kind`, holds it, heals it. Returns the event.
    pub async fn run_one(&mut self, kind: FaultKind) -> Result<FaultEvent> {
        let n = self.n();
        let mut rules = Rules::new(n);
        let inject;
        let detail;
        let affected: Vec<usize>;
        match kind {
            FaultKind::KillLeader | FaultKind::KillRandom => {
                let v = if kind == FaultKind::KillLeader {
                    self.leader_or_random().await
                } else {
                    self.rng.gen_range(0..n)
                };
                inject = self.rec.now();
                self.agents.nodes[v].kill();
                let hold = ms(&mut self.rng, 500, 2000);
                tokio::time::sleep(hold).await;
                self.agents.nodes[v].start()?;
                detail = format!("kill -9 {} for {} ms", self.names(&[v]), hold.as_millis());
                affected = vec![v];
            }
            FaultKind::RestartAll => {
                inject = self.rec.now();
                for node in &self.agents.nodes {
                    node.kill();
                }
                let hold = ms(&mut self.rng, 500, 2000);
                tokio::time::sleep(hold).await;
                for node in &self.agents.nodes {
                    node.start()?;
                }
                detail = format!("kill -9 of all, restarted after {} ms", hold.as_millis());
                affected = (0..n).collect();
            }
            FaultKind::Pause => {
                let v = self.maybe_leader().await;
                inject = self.rec.now();
                self.agents.nodes[v].pause(true)?;
                let hold = ms(&mut self.rng, 1000, 2500);
                tokio::time::sleep(hold).await;
                self.agents.nodes[v].pause(false)?;
                detail = format!("SIGSTOP {} for {} ms", self.names(&[v]), hold.as_millis());
                affected = vec![v];
            }
            FaultKind::DiskFull => {
                let v = self.maybe_leader().await;
                inject = self.rec.now();
                self.agents.nodes[v].fill_disk()?;
                let hold = ms(&mut self.rng, 1000, 2500);
                tokio::time::sleep(hold).await;
                self.agents.nodes[v].free_disk()?;
                detail = format!("state disk of {} full for {} ms", self.names(&[v]), hold.as_millis());
                affected = vec![v];
            }
            FaultKind::ReadOnly => {
                let v = self.maybe_leader().await;
                let node = self.agents.nodes[v].clone();
                inject = self.rec.now();
                node.kill();
                node.remount(true)?;
                node.start()?;
                let hold = ms(&mut self.rng, 1000, 2500);
                tokio::time::sleep(hold).await;
                node.kill();
                node.remount(false)?;
                node.start()?;
                detail = format!("{} restarted with a read-only state disk for {} ms", node.name, hold.as_millis());
                affected = vec![v];
            }
            FaultKind::IsolateOne | FaultKind::IsolateLeader | FaultKind::OneWay => {
                let v = match kind {
                    FaultKind::IsolateOne => self.follower().await,
                    FaultKind::IsolateLeader => self.leader_or_random().await,
                    _ => self.maybe_leader().await,
                };
                if kind == FaultKind::OneWay {
                    for b in (0..n).filter(|b| *b != v) {
                        rules.cut_one_way(v, b);
                    }
                } else {
                    rules.partition(&[v]);
                }
                inject = self.rec.now();
                self.lan.apply(&rules)?;
                let hold = ms(&mut self.rng, 1000, 2500);
                tokio::time::sleep(hold).await;
                let how = if kind == FaultKind::OneWay { "cannot send to the others" } else { "cut off" };
                detail = format!("{} {how} for {} ms", self.names(&[v]), hold.as_millis());
                affected = vec![v];
            }
            FaultKind::Split => {
                let mut all: Vec<usize> = (0..n).collect();
                all.shuffle(&mut self.rng);
                let minority: Vec<usize> = all[..(n - 1) / 2].to_vec();
                rules.partition(&minority);
                inject = self.rec.now();
                self.lan.apply(&rules)?;
                let hold = ms(&mut self.rng, 1000, 2500);
                tokio::time::sleep(hold).await;
                detail = format!("minority {} | majority for {} ms", self.names(&minority), hold.as_millis());
                affected = minority;
            }
            FaultKind::Bridge => {
                let mut all: Vec<usize> = (0..n).collect();
                all.shuffle(&mut self.rng);
                let bridge = all[0];
                let half = (n - 1) / 2;
                let (a, b) = all[1..].split_at(half);
                for &x in a {
                    for &y in b {
                        rules.cut(x, y);
                    }
                }
                inject = self.rec.now();
                self.lan.apply(&rules)?;
                let hold = ms(&mut self.rng, 1000, 2500);
                tokio::time::sleep(hold).await;
                detail = format!(
                    "{} | {} with {} reaching both for {} ms",
                    self.names(a),
                    self.names(b),
                    self.names(&[bridge]),
                    hold.as_millis()
                );
                // Whichever half lacks the leader's quorum cannot write; the report judges by
                // the nodes that kept writing.
                affected = Vec::new();
            }
            FaultKind::Delay => {
                let base = self.rng.gen_range(5..=40u64);
                let jitter = self.rng.gen_range(0..=base / 2);
                let (d, j) = (Duration::from_millis(base), Duration::from_millis(jitter));
                inject = self.rec.now();
                let mut held = Vec::new();
                for i in 0..n {
                    held.push(super::delay::delay_ingress(self.lan.netns(i), "eth0", 0, d, j)?);
                }
                let hold = ms(&mut self.rng, 1000, 2500);
                tokio::time::sleep(hold).await;
                let mut overflow = 0;
                for h in held {
                    let st = h.stop()?;
                    overflow += st.overflow_accepted + st.kernel_fail_open;
                }
                detail = format!(
                    "every node's incoming packets held {base}±{jitter} ms for {} ms ({overflow} packets passed undelayed)",
                    hold.as_millis()
                );
                affected = Vec::new();
            }
            FaultKind::Loss => {
                let p = self.rng.gen_range(10..=30u8);
                for i in 0..n {
                    rules.lose(i, p);
                }
                inject = self.rec.now();
                self.lan.apply(&rules)?;
                let hold = ms(&mut self.rng, 1000, 2500);
                tokio::time::sleep(hold).await;
                detail = format!("{p}% packet loss on every node for {} ms", hold.as_millis());
                affected = Vec::new();
            }
        }
        self.lan.heal()?;
        let heal = self.rec.now();
        Ok(FaultEvent { kind, detail, affected, inject, heal, recovered_ms: None })
    }

    /// Runs the whole schedule with a quiet pause after each fault; stops early at `until`.
    pub async fn run(&mut self, plan: &[FaultKind], until: Instant) -> Result<Vec<FaultEvent>> {
        let mut events = Vec::new();
        for &kind in plan {
            if Instant::now() >= until {
                break;
            }
            let mut ev = self.run_one(kind).await?;
            // The next fault starts on a whole cluster: every node up, agreeing on a leader and
            // caught up (bounded; a cluster that does not recover is a finding in itself).
            let healed = Instant::now();
            let recovered = self.agents.wait_converged(RECOVERY_LIMIT).await;
            ev.recovered_ms = recovered.is_ok().then(|| healed.elapsed().as_millis() as u64);
            println!(
                "faults: {:>7.1} s {:<14} {}; {}",
                ev.inject as f64 / 1e9,
                ev.kind.name(),
                ev.detail,
                match ev.recovered_ms {
                    Some(ms) => format!("whole again {ms} ms after the heal"),
                    None => format!("NOT whole {} s after the heal", RECOVERY_LIMIT.as_secs()),
                }
            );
            events.push(ev);
            let quiet = ms(&mut self.rng, 300, 800);
            tokio::time::sleep(quiet).await;
        }
        Ok(events)
    }
}
