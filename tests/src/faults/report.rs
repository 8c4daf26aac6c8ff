//! The report of one run: operations and outcomes, the verdict per key, lost writes,
//! availability during faults and in quiet time, the longest window without a successful write,
//! and per fault kind how long writes took to succeed again.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::checker::{KeyVerdict, OkResult, Op, OpKind, Outcome};
use super::nemesis::{FaultEvent, FaultKind};
use super::workload::SetOp;

#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct Counts {
    pub ok: usize,
    pub fail: usize,
    pub unknown: usize,
}

impl Counts {
    fn add(&mut self, outcome: &str) {
        match outcome {
            "ok" => self.ok += 1,
            "fail" => self.fail += 1,
            _ => self.unknown += 1,
        }
    }

    pub fn total(&self) -> usize {
        self.ok + self.fail + self.unknown
    }
}

fn outcome_name(o: &Outcome) -> &'static str {
    match o {
        Outcome::Ok(_) => "ok",
        Outcome::Fail => "fail",
        Outcome::Unknown => "unknown",
    }
}

/// Per fault kind.
#[derive(Serialize, Debug, Default, Clone)]
pub struct KindStats {
    pub rounds: usize,
    /// Operations invoked while the fault held.
    pub during: Counts,
    /// From injection to the first successful write invoked after it (ms), per round.
    pub first_write_ms: Vec<u64>,
    /// How long a write started after the injection waited for success, through the slowest
    /// node the fault did not touch (ms), per round.
    pub all_nodes_write_ms: Vec<u64>,
    /// Longest gap between successful writes from the last one before the heal to 3 s after it
    /// (ms), for the rounds in which writes were succeeding when the fault was healed.
    pub heal_gap_ms: Vec<u64>,
    /// From the restart (kill kinds, read-only) to the first successful write started after it
    /// (ms), per round.
    pub after_restart_ms: Vec<u64>,
    /// From the heal until the cluster was whole again (ms), per round.
    pub recovered_ms: Vec<u64>,
    /// Rounds after which the cluster was not whole again within the limit.
    pub not_recovered: usize,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub nodes: usize,
    pub seconds: f64,
    pub register: Counts,
    pub set: Counts,
    pub keys: usize,
    pub linearizable_keys: usize,
    pub violations: Vec<String>,
    pub inconclusive: Vec<String>,
    pub lost_writes: Vec<String>,
    pub unknown_set_adds_present: usize,
    pub quiet: Counts,
    pub faulted: Counts,
    /// The longest time without a successful write (ms), and when it started (s).
    pub longest_write_gap_ms: u64,
    pub longest_write_gap_at_s: f64,
    pub kinds: BTreeMap<FaultKind, KindStats>,
    /// Agents that exited by themselves while their disk was full or read-only (they should:
    /// systemd starts them again), and at any other time (they should not).
    pub expected_exits: usize,
    pub unexpected_exits: Vec<String>,
}

/// A successful write: time of completion, node (process's node) and invocation.
struct Write {
    invoke: u64,
    complete: u64,
    node: usize,
}

fn writes(ops: &[Op], sets: &[SetOp], node_of: &dyn Fn(usize) -> usize) -> Vec<Write> {
    let mut w: Vec<Write> = Vec::new();
    for op in ops {
        let wrote = match (&op.kind, &op.outcome) {
            (OpKind::Put { .. }, Outcome::Ok(_)) => true,
            (OpKind::Cas { .. }, Outcome::Ok(OkResult::Cas { succeeded, .. })) => *succeeded,
            _ => false,
        };
        if wrote && let Some(c) = op.complete {
            w.push(Write { invoke: op.invoke, complete: c, node: node_of(op.process) });
        }
    }
    for s in sets.iter().filter(|s| s.outcome == "ok") {
        if let Some(c) = s.complete {
            w.push(Write { invoke: s.invoke, complete: c, node: s.node });
        }
    }
    w.sort_by_key(|w| w.complete);
    w
}

/// Longest gap between successive completions in `[from, to]`, counting from `from`.
fn longest_gap(w: &[Write], from: u64, to: u64) -> (u64, u64) {
    let mut prev = from;
    let mut best = (0, from);
    for x in w.iter().filter(|x| x.complete >= from && x.complete <= to) {
        if x.complete - prev > best.0 {
            best = (x.complete - prev, prev);
        }
        prev = x.complete;
    }
    if to.saturating_sub(prev) > best.0 {
        best = (to - prev, prev);
    }
    best
}

#[allow(clippy::too_many_arguments)]
pub fn build(
    nodes: usize,
    ops: &[Op],
    sets: &[SetOp],
    verdicts: &BTreeMap<String, KeyVerdict>,
    present: &BTreeSet<String>,
    events: &[FaultEvent],
    node_of: &dyn Fn(usize) -> usize,
    workload: (u64, u64),
    agent_exits: Vec<(u64, String)>,
) -> Report {
    let mut register = Counts::default();
    let mut quiet = Counts::default();
    let mut faulted = Counts::default();
    let in_fault = |t: u64| events.iter().find(|e| t >= e.inject && t <= e.heal);
    for op in ops {
        let o = outcome_name(&op.outcome);
        register.add(o);
        match in_fault(op.invoke) {
            Some(_) => faulted.add(o),
            None => quiet.add(o),
        }
    }
    let mut set = Counts::default();
    for s in sets {
        set.add(&s.outcome);
        match in_fault(s.invoke) {
            Some(_) => faulted.add(&s.outcome),
            None => quiet.add(&s.outcome),
        }
    }
    let mut violations = Vec::new();
    let mut inconclusive = Vec::new();
    let mut linearizable_keys = 0;
    for (k, v) in verdicts {
        match v {
            KeyVerdict::Linearizable => linearizable_keys += 1,
            KeyVerdict::Violation(w) => violations.push(format!("key {k}: {w}")),
            other => inconclusive.push(format!("key {k}: {other}")),
        }
    }
    let acked: BTreeSet<&String> = sets.iter().filter(|s| s.outcome == "ok").map(|s| &s.key).collect();
    let lost_writes: Vec<String> = acked.iter().filter(|k| !present.contains(**k)).map(|k| (*k).clone()).collect();
    let unknown_set_adds_present = sets.iter().filter(|s| s.outcome == "unknown" && present.contains(&s.key)).count();

    // A storage fault makes its node's agent exit (until the node is whole again).
    let storage_fault = |t: u64| {
        events.iter().any(|e| {
            matches!(e.kind, FaultKind::DiskFull | FaultKind::ReadOnly)
                && t >= e.inject
                && t <= e.heal + e.recovered_ms.unwrap_or(60_000) * 1_000_000
        })
    };
    let unexpected_exits: Vec<String> = agent_exits
        .iter()
        .filter(|(t, _)| !storage_fault(*t))
        .map(|(t, what)| format!("{what} at {:.1} s", *t as f64 / 1e9))
        .collect();
    let w = writes(ops, sets, node_of);
    // Every write attempt: (invoke, node).
    let mut tries: Vec<(u64, usize)> = ops
        .iter()
        .filter(|o| !matches!(o.kind, OpKind::Read) && o.process != usize::MAX)
        .map(|o| (o.invoke, node_of(o.process)))
        .collect();
    tries.extend(sets.iter().map(|s| (s.invoke, s.node)));
    let (gap, gap_at) = longest_gap(&w, workload.0, workload.1);
    let mut kinds: BTreeMap<FaultKind, KindStats> = BTreeMap::new();
    for (n, e) in events.iter().enumerate() {
        // Until the next fault begins (or the workload ends).
        let next = events.get(n + 1).map_or(workload.1, |x| x.inject);
        let k = kinds.entry(e.kind).or_default();
        k.rounds += 1;
        for op in ops.iter().filter(|o| o.invoke >= e.inject && o.invoke <= e.heal) {
            k.during.add(outcome_name(&op.outcome));
        }
        for s in sets.iter().filter(|s| s.invoke >= e.inject && s.invoke <= e.heal) {
            k.during.add(&s.outcome);
        }
        let after: Vec<&Write> = w.iter().filter(|x| x.invoke >= e.inject).collect();
        if let Some(first) = after.iter().map(|x| x.complete).min() {
            k.first_write_ms.push((first - e.inject) / 1_000_000);
        }
        // Every node the fault left alone must write again (a bridge fault leaves the half
        // without the leader unable to, by design).
        // How long a write started after the fault waits for success, through the slowest node
        // the fault left alone: from the later of the injection and the node's first request
        // after it (its clients may still be busy with requests from before), to the first
        // success. (A bridge fault leaves the half without the leader unable to write, by design.)
        let untouched: Vec<usize> = (0..nodes).filter(|i| !e.affected.contains(i)).collect();
        if !untouched.is_empty() && e.kind != FaultKind::Bridge {
            let per_node: Option<Vec<u64>> = untouched
                .iter()
                .map(|n| {
                    let first_try =
                        tries.iter().filter(|(t, node)| *node == *n && *t >= e.inject).map(|(t, _)| *t).min()?;
                    let ok = after.iter().filter(|x| x.node == *n).map(|x| x.complete).min()?;
                    Some(ok.saturating_sub(first_try.max(e.inject)))
                })
                .collect();
            if let Some(all) = per_node.and_then(|v| v.into_iter().max()) {
                k.all_nodes_write_ms.push(all / 1_000_000);
            }
        }
        // Whether healing caused an outage: the longest gap between successful writes from the
        // last one before the heal to 3 s after it (or to the next fault). Only when writes were
        // succeeding just before the heal (within 500 ms): otherwise the fault itself had stopped
        // them, and the gap would measure the fault, not the heal.
        let prev = w.iter().map(|x| x.complete).filter(|c| *c <= e.heal).max().unwrap_or(0);
        let flowing = prev + 500_000_000 >= e.heal;
        let (g, _) = longest_gap(&w, prev, (e.heal + 3_000_000_000).min(next.max(e.heal)));
        if e.kind.restarts() {
            if let Some(first) = w.iter().filter(|x| x.invoke >= e.heal).map(|x| x.complete).min() {
                k.after_restart_ms.push((first - e.heal) / 1_000_000);
            }
        } else if flowing {
            k.heal_gap_ms.push(g / 1_000_000);
        }
        match e.recovered_ms {
            Some(ms) => k.recovered_ms.push(ms),
            None => k.not_recovered += 1,
        }
    }
    Report {
        nodes,
        seconds: (workload.1 - workload.0) as f64 / 1e9,
        register,
        set,
        keys: verdicts.len(),
        linearizable_keys,
        violations,
        inconclusive,
        lost_writes,
        unknown_set_adds_present,
        quiet,
        faulted,
        longest_write_gap_ms: gap / 1_000_000,
        longest_write_gap_at_s: gap_at as f64 / 1e9,
        kinds,
        expected_exits: agent_exits.len() - unexpected_exits.len(),
        unexpected_exits,
    }
}

fn pct(c: &Counts) -> String {
    if c.total() == 0 { "-".into() } else { format!("{:.0}%", 100.0 * c.ok as f64 / c.total() as f64) }
}

fn median(v: &[u64]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    s[s.len() / 2].to_string()
}

fn max(v: &[u64]) -> String {
    v.iter().max().map_or_else(|| "-".into(), |m| m.to_string())
}

impl Report {
    /// Whether the run found nothing wrong: every key linearizable (none inconclusive), no lost
    /// write, the cluster whole again after every fault, and no agent exit outside a storage
    /// fault.
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
            && self.inconclusive.is_empty()
            && self.lost_writes.is_empty()
            && self.kinds.values().all(|k| k.not_recovered == 0)
            && self.unexpected_exits.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "fault suite report: {} nodes, {:.0} s of workload", self.nodes, self.seconds)?;
        writeln!(
            f,
            "  register ops {} (ok {}, fail {}, unknown {}); set adds {} (ok {}, fail {}, unknown {}, {} unknown ones present)",
            self.register.total(),
            self.register.ok,
            self.register.fail,
            self.register.unknown,
            self.set.total(),
            self.set.ok,
            self.set.fail,
            self.set.unknown,
            self.unknown_set_adds_present
        )?;
        writeln!(
            f,
            "  keys {}: linearizable {}, violations {}, inconclusive {}; lost acknowledged writes {}",
            self.keys,
            self.linearizable_keys,
            self.violations.len(),
            self.inconclusive.len(),
            self.lost_writes.len()
        )?;
        writeln!(
            f,
            "  answered ok: quiet {} of {}, during faults {} of {}; longest time without a successful write {} ms (at {:.1} s)",
            pct(&self.quiet),
            self.quiet.total(),
            pct(&self.faulted),
            self.faulted.total(),
            self.longest_write_gap_ms,
            self.longest_write_gap_at_s
        )?;
        writeln!(
            f,
            "  {:<14} {:>6} {:>13} {:>14} {:>14} {:>14} {:>14} {:>15}",
            "fault",
            "rounds",
            "ok during",
            "1st write ms",
            "every node ms",
            "heal gap ms",
            "restart->write",
            "whole again ms"
        )?;
        writeln!(
            f,
            "  {:<14} {:>6} {:>13} {:>14} {:>14} {:>14} {:>14} {:>15}",
            "", "", "ok/all", "p50/max", "p50/max", "p50/max", "ms p50/max", "p50/max"
        )?;
        for (k, s) in &self.kinds {
            let whole = format!("{}/{}", median(&s.recovered_ms), max(&s.recovered_ms));
            writeln!(
                f,
                "  {:<14} {:>6} {:>13} {:>14} {:>14} {:>14} {:>14} {:>15}",
                k.name(),
                s.rounds,
                format!("{}/{}", s.during.ok, s.during.total()),
                format!("{}/{}", median(&s.first_write_ms), max(&s.first_write_ms)),
                format!("{}/{}", median(&s.all_nodes_write_ms), max(&s.all_nodes_write_ms)),
                format!("{}/{}", median(&s.heal_gap_ms), max(&s.heal_gap_ms)),
                format!("{}/{}", median(&s.after_restart_ms), max(&s.after_restart_ms)),
                if s.not_recovered > 0 { format!("{whole} ({} NOT)", s.not_recovered) } else { whole },
            )?;
        }
        for v in &self.violations {
            writeln!(f, "  VIOLATION {v}")?;
        }
        for v in &self.inconclusive {
            writeln!(f, "  INCONCLUSIVE {v}")?;
        }
        if !self.lost_writes.is_empty() {
            writeln!(f, "  LOST acknowledged set adds: {}", self.lost_writes.join(", "))?;
        }
        writeln!(
            f,
            "  agents that exited on a full or read-only disk (and were started again): {}",
            self.expected_exits
        )?;
        for e in &self.unexpected_exits {
            writeln!(f, "  UNEXPECTED EXIT {e}")?;
        }
        Ok(())
    }
}
