//! Clients on every node and the history they record. Register clients run linearizable gets,
//! puts and compare-and-sets on a few keys that rotate every few seconds (so that each key's
//! history stays small enough to check); set clients add unique keys, every acknowledged one of
//! which must be there at the end. Every operation is recorded with its invocation and completion
//! times (monotonic, from the suite's start) and an outcome: ok, fail (definitely not applied) or
//! unknown (it may have been applied, or may still be).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clusteros::cli::client::{ClientError, LocalClient};
use clusteros::core::state::Response;
use clusteros::proto::ErrorKind;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::checker::{OkResult, Op, OpKind, Outcome};
use super::nodes::Agents;

/// How long a client waits for one answer before it counts the operation as unknown. Longer
/// than the agent's own forwarding deadline, so that the agent's answer (often a definite one)
/// arrives first.
pub const OP_TIMEOUT: Duration = Duration::from_secs(12);

/// The shared clock and the history.
pub struct Recorder {
    start: Instant,
    ops: Mutex<Vec<Op>>,
    sets: Mutex<Vec<SetOp>>,
    next_id: AtomicUsize,
}

/// One add of the set workload.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct SetOp {
    pub node: usize,
    pub key: String,
    pub invoke: u64,
    pub complete: Option<u64>,
    /// "ok", "fail" or "unknown".
    pub outcome: String,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
            sets: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(0),
        })
    }

    /// Nanoseconds since the suite started.
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    pub fn push(&self, mut op: Op) {
        op.id = self.next_id.fetch_add(1, Ordering::SeqCst);
        self.ops.lock().expect("history lock").push(op);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().expect("history lock").clone()
    }

    pub fn sets(&self) -> Vec<SetOp> {
        self.sets.lock().expect("history lock").clone()
    }
}

/// What a write's error says about whether it was applied.
fn write_outcome(e: &ClientError) -> Outcome {
    match e {
        // The request never reached the agent.
        ClientError::NotRunning(_) | ClientError::Refused(_) | ClientError::Permission(_) => Outcome::Fail,
        ClientError::Api(body) => match body.kind {
            // Refused before anything was proposed, or proposed and truncated.
            ErrorKind::NoLeader
            | ErrorKind::NotLeader
            | ErrorKind::Refused
            | ErrorKind::BadRequest
            | ErrorKind::NotConfigured
            | ErrorKind::Unauthorized
            | ErrorKind::WrongNode => Outcome::Fail,
            // A timeout says it may have been applied; anything else we cannot rule out.
            ErrorKind::Timeout | ErrorKind::Peer | ErrorKind::Internal | ErrorKind::Unknown => Outcome::Unknown,
        },
        ClientError::Transport { .. } | ClientError::Decode(_) => Outcome::Unknown,
    }
}

/// A register client on `node`: `process` names it in the history.
pub struct RegisterClient {
    pub node: usize,
    pub process: usize,
    pub keys_per_epoch: usize,
    pub epoch: Duration,
    pub seed: u64,
}

impl RegisterClient {
    pub async fn run(self, agents: Arc<Agents>, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
        let client = agents.nodes[self.node].files.client();
        let mut rng = StdRng::seed_from_u64(self.seed ^ (self.process as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut seen: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut seq = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let epoch = rec.start().elapsed().as_nanos() / self.epoch.as_nanos().max(1);
            let key = format!("r{epoch}-{}", rng.gen_range(0..self.keys_per_epoch));
            let roll = rng.gen_range(0..100);
            let kind = if roll < 50 {
                OpKind::Read
            } else if roll < 75 {
                seq += 1;
                OpKind::Put { value: format!("p{}-{seq}", self.process) }
            } else {
                seq += 1;
                let expected = seen.get(&key).cloned().flatten();
                OpKind::Cas { expected, new: Some(format!("p{}-{seq}", self.process)) }
            };
            let op = run_op(&client, &rec, self.process, &key, kind).await;
            if let Outcome::Ok(r) = &op.outcome {
                let v = match r {
                    OkResult::Read { value } => value.clone(),
                    OkResult::Put { .. } => match &op.kind {
                        OpKind::Put { value } => Some(value.clone()),
                        _ => None,
                    },
                    OkResult::Cas { current, .. } => current.clone(),
                };
                seen.insert(key.clone(), v);
            }
            rec.push(op);
            // Pacing: a few tens of operations per second per client keep 2 cores responsive.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..30))).await;
        }
    }
}

/// Runs one operation through `client` and returns it recorded (id assigned on push).
pub async fn run_op(client: &LocalClient, rec: &Recorder, process: usize, key: &str, kind: OpKind) -> Op {
    let invoke = rec.now();
    let outcome = match &kind {
        OpKind::Read => match tokio::time::timeout(OP_TIMEOUT, client.kv_get(key, false)).await {
            Ok(Ok(r)) => Outcome::Ok(OkResult::Read { value: r.entry.map(|e| e.value) }),
            // A read that failed or timed out changed nothing.
            Ok(Err(_)) => Outcome::Fail,
            Err(_) => Outcome::Unknown,
        },
        OpKind::Put { value } => match tokio::time::timeout(OP_TIMEOUT, client.kv_put(key, value)).await {
            Ok(Ok(Response::Kv { previous })) => Outcome::Ok(OkResult::Put { previous }),
            Ok(Ok(Response::Rejected { .. })) => Outcome::Fail,
            Ok(Ok(_)) => Outcome::Unknown,
            Ok(Err(e)) => write_outcome(&e),
            Err(_) => Outcome::Unknown,
        },
        OpKind::Cas { expected, new } => {
            match tokio::time::timeout(OP_TIMEOUT, client.kv_cas(key, expected.clone(), new.clone())).await {
                Ok(Ok(Response::Cas { succeeded, current })) => Outcome::Ok(OkResult::Cas { succeeded, current }),
                Ok(Ok(Response::Rejected { .. })) => Outcome::Fail,
                Ok(Ok(_)) => Outcome::Unknown,
                Ok(Err(e)) => write_outcome(&e),
                Err(_) => Outcome::Unknown,
            }
        }
    };
    let complete = (!matches!(outcome, Outcome::Unknown)).then(|| rec.now());
    Op { id: 0, process, key: key.to_string(), kind, invoke, complete, outcome }
}

/// A set client on `node`: adds unique keys `s<node>-<n>`.
pub struct SetClient {
    pub node: usize,
}

impl SetClient {
    pub async fn run(self, agents: Arc<Agents>, rec: Arc<Recorder>, stop: Arc<AtomicBool>) {
        let client = agents.nodes[self.node].files.client();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let key = format!("s{}-{n}", self.node);
            let invoke = rec.now();
            let outcome = match tokio::time::timeout(OP_TIMEOUT, client.kv_put(&key, "1")).await {
                Ok(Ok(Response::Kv { .. })) => "ok",
                Ok(Ok(Response::Rejected { .. })) => "fail",
                Ok(Ok(_)) => "unknown",
                Ok(Err(e)) => match write_outcome(&e) {
                    Outcome::Fail => "fail",
                    _ => "unknown",
                },
                Err(_) => "unknown",
            };
            let complete = (outcome != "unknown").then(|| rec.now());
            rec.sets.lock().expect("history lock").push(SetOp {
                node: self.node,
                key,
                invoke,
                complete,
                outcome: outcome.into(),
            });
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    }
}
