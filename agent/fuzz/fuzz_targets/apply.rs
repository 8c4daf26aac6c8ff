//! The pure state machine: `ClusterState::apply` and `apply_membership` on command sequences
//! built from the input (each command's variant from one byte, its fields from the next ones,
//! from small pools, so that ids, names, addresses and request ids repeat). After every step the
//! state's invariants must hold; the same sequence applied to fresh states gives the same
//! responses and state, also when the state is restored from its snapshot form midway.

#![forbid(unsafe_code)]
#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use clusteros::core::state::{
    ClusterState, Command, Health, MemberSpec, NodeFacts, NodeId, RequestId, RequestLog, Response, RoleAssignments,
    validate_member,
};
use libfuzzer_sys::fuzz_target;

const IDS: [NodeId; 5] = [NodeId(1), NodeId(2), NodeId(3), NodeId(4), NodeId(0xfeed_0000_0000_0005)];
const NAMES: [&str; 4] = ["n1", "n2", "n3", "same"];
const KEYS: [&str; 4] = ["k", "a", "b", ""];
const VALUES: [&str; 4] = ["", "v", "w", "xyz"];
const IPS: [Ipv4Addr; 3] = [Ipv4Addr::new(10, 90, 0, 1), Ipv4Addr::new(10, 90, 0, 2), Ipv4Addr::new(10, 90, 0, 3)];
const SECRETS: [&str; 3] = ["munge-key", "k3s-token", ""];
const TIMES: [u64; 8] = [0, 1, 1_000, 120_000, 121_001, 250_000, 1_000_000_000, u64::MAX];
const DIGESTS: [&str; 2] = ["d1", "d2"];
/// WireGuard public keys: two well-formed, none (a node without WireGuard), two malformed.
const WG_KEYS: [&str; 5] = [
    "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
    "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
    "",
    "key1",
    "AQID",
];

/// One step: a command, an applied membership (voters, learners), or a gap in the log indexes
/// the state machine sees (entries without a command: blank or membership entries).
#[derive(Debug, Clone)]
enum Step {
    Cmd(Command),
    Membership(BTreeSet<NodeId>, BTreeSet<NodeId>),
    Gap(u64),
}

/// Log index gaps, up to and past the distance after which a request id is forgotten.
const GAPS: [u64; 4] = [1, 1_000, RequestLog::MAX_ENTRIES as u64 / 2, RequestLog::MAX_ENTRIES as u64];

struct Gen<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Gen<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }
    fn pick<T: Copy>(&mut self, pool: &[T]) -> T {
        pool[self.byte() as usize % pool.len()]
    }
    fn string(&mut self, pool: &[&str]) -> String {
        self.pick(pool).to_string()
    }
    fn opt_id(&mut self) -> Option<NodeId> {
        let b = self.byte();
        (!b.is_multiple_of(6)).then(|| IDS[b as usize % IDS.len()])
    }
    fn id_set(&mut self) -> BTreeSet<NodeId> {
        let mask = self.byte();
        IDS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, id)| *id).collect()
    }
    fn opt_value(&mut self) -> Option<String> {
        let b = self.byte();
        (!b.is_multiple_of(5)).then(|| VALUES[b as usize % VALUES.len()].to_string())
    }

    fn command(&mut self, depth: u8) -> Command {
        match self.byte() % 13 {
            0 => Command::InitCluster { cluster_id: self.string(&["c1", "c2"]), at_ms: self.pick(&TIMES) },
            1 => {
                let id = self.pick(&IDS);
                let name = self.string(&NAMES);
                let b = self.byte();
                let spec = MemberSpec {
                    id,
                    name,
                    api_addr: format!("10.0.0.{}:7600", b % 4),
                    wg_public_key: WG_KEYS[usize::from(b) % WG_KEYS.len()].to_string(),
                    facts: NodeFacts {
                        cpus: u32::from(b % 3),
                        memory_mb: 1024,
                        kernel: "6.12".into(),
                        arch: "x86_64".into(),
                    },
                    labels: if b & 0x80 != 0 {
                        BTreeMap::from([("rack".into(), "r1".into())])
                    } else {
                        BTreeMap::new()
                    },
                    // Valid fingerprints, none, or one the state machine refuses.
                    cluster_keys: match b & 0x60 {
                        0x00 => vec![],
                        0x20 => vec!["0000000a".into()],
                        0x40 => vec!["0000000a".into(), "0000000b".into()],
                        _ => vec!["not hex!".into()],
                    },
                };
                Command::UpsertMember { spec, at_ms: self.pick(&TIMES) }
            }
            2 => Command::SetHealth {
                id: self.pick(&IDS),
                health: self.pick(&[Health::Alive, Health::Suspect, Health::Failed, Health::Left]),
                at_ms: self.pick(&TIMES),
            },
            3 => Command::AssignMeshIp { id: self.pick(&IDS), ip: self.pick(&IPS) },
            4 => Command::SetRoles {
                roles: RoleAssignments {
                    slurm_controller: self.opt_id(),
                    slurm_backup: self.opt_id(),
                    slurm_workers: self.id_set(),
                    k3s_server: self.opt_id(),
                    k3s_agents: self.id_set(),
                },
            },
            5 => Command::SetSecret {
                name: self.string(&SECRETS),
                value: self.string(&VALUES),
                at_ms: self.pick(&TIMES),
            },
            6 => Command::SetSlurmState {
                from: self.pick(&IDS),
                digest: self.string(&DIGESTS),
                files: u32::from(self.byte()),
                bytes: u64::from(self.byte()),
                taken_at_ms: self.pick(&TIMES),
            },
            7 => Command::SlurmTakeover { id: self.pick(&IDS) },
            8 => Command::KvPut { key: self.string(&KEYS), value: self.string(&VALUES) },
            9 => Command::KvDelete { key: self.string(&KEYS) },
            10 => Command::KvCas { key: self.string(&KEYS), expected: self.opt_value(), new: self.opt_value() },
            11 => Command::ResealSecret {
                name: self.string(&SECRETS),
                value: self.string(&VALUES),
                version: u64::from(self.byte() % 3),
            },
            _ => {
                let b = self.byte();
                let id = RequestId { origin: u64::from(b & 1) + 1, seq: u64::from((b >> 1) % 3) + 1 };
                let at_ms = self.pick(&TIMES);
                // Mostly a plain command; sometimes a request in a request (refused).
                let cmd = if depth == 0 { self.command(1) } else { self.command_no_request() };
                Command::Request { id, at_ms, cmd: Box::new(cmd) }
            }
        }
    }

    fn command_no_request(&mut self) -> Command {
        loop {
            let c = self.command(1);
            if !matches!(c, Command::Request { .. }) {
                return c;
            }
            if self.done() {
                return Command::KvDelete { key: "k".into() };
            }
        }
    }

    fn step(&mut self) -> Step {
        match self.byte() % 16 {
            0 | 8 => Step::Membership(self.id_set(), self.id_set()),
            15 => Step::Gap(self.pick(&GAPS)),
            _ => Step::Cmd(self.command(0)),
        }
    }
}

fn run(state: &mut ClusterState, index: u64, step: &Step) -> Response {
    match step {
        Step::Cmd(c) => state.apply(index, c),
        Step::Membership(v, l) => {
            state.apply_membership(v.clone(), l.clone());
            Response::Empty
        }
        Step::Gap(_) => Response::Empty,
    }
}

/// The log index of every step.
fn indexes(steps: &[Step]) -> Vec<u64> {
    let mut index = 0u64;
    steps
        .iter()
        .map(|s| {
            index += match s {
                Step::Gap(n) => *n,
                _ => 1,
            };
            index
        })
        .collect()
}

fn without_requests(s: &ClusterState) -> ClusterState {
    ClusterState { requests: Default::default(), ..s.clone() }
}

fn snapshot_round_trip(s: &ClusterState) -> ClusterState {
    let text = serde_json::to_string(s).expect("the state encodes");
    serde_json::from_str(&text).expect("the encoded state decodes")
}

/// The invariants of a state; `before` is the state before the step.
fn check_invariants(s: &ClusterState, before: &ClusterState) {
    for (id, m) in &s.members {
        assert_eq!(*id, m.spec.id, "member record under another id");
        assert!(s.voters.contains(id) || s.learners.contains(id), "member {id} is not in the Raft membership");
        assert_eq!(validate_member(&m.spec), Ok(()), "a malformed member record was applied");
    }
    let r = &s.roles;
    let holders = [r.slurm_controller, r.slurm_backup, r.k3s_server];
    for id in holders.iter().flatten().chain(&r.slurm_workers).chain(&r.k3s_agents) {
        assert!(s.members.contains_key(id), "role holder {id} is not a member: {r:?}");
    }
    let mut ips = BTreeSet::new();
    for m in s.members.values() {
        if let Some(ip) = m.mesh_ip {
            assert!(ips.insert(ip), "mesh address {ip} used twice");
        }
    }
    for (name, old) in &before.secrets {
        let new = s.secrets.get(name).expect("a secret never disappears");
        assert!(new.version >= old.version, "secret {name} went from version {} to {}", old.version, new.version);
    }
    if let (Some(old), Some(new)) = (&before.slurm_state, &s.slurm_state) {
        assert!(new.version >= old.version, "SLURM state copy version went down");
    }
    assert!(s.requests.len() <= RequestLog::MAX_ENTRIES);
}

fuzz_target!(|data: &[u8]| {
    let Some((&restore_at, rest)) = data.split_first() else { return };
    let mut g = Gen { data: rest, pos: 0 };
    let mut steps = Vec::new();
    while !g.done() && steps.len() < 256 {
        steps.push(g.step());
    }

    let index_of = indexes(&steps);

    // First run, with every invariant checked after every step.
    let mut s = ClusterState::default();
    let mut responses = Vec::new();
    // Requests recorded in the log: id -> (first response, the log index that applied it).
    let mut first: BTreeMap<RequestId, (Response, u64)> = BTreeMap::new();
    for (step, &index) in steps.iter().zip(&index_of) {
        let before = s.clone();
        let resp = run(&mut s, index, step);
        if let Step::Cmd(Command::Request { id, cmd, .. }) = step {
            match before.requests.get(id) {
                Some(remembered) => {
                    let (f, _) = first.get(id).expect("a remembered request was applied before");
                    match remembered {
                        Some(r) => {
                            assert_eq!(r, f, "the log remembers another response than the first application gave");
                            assert_eq!(resp, *f, "a repeated request answered differently");
                        }
                        None => assert_eq!(resp, Response::AlreadyApplied),
                    }
                    assert!(s == before, "a repeated request changed the state");
                }
                None => {
                    if let Some((_, at)) = first.get(id) {
                        assert!(
                            at.saturating_add(RequestLog::MAX_ENTRIES as u64) < index,
                            "request {id:?} (applied at index {at}) forgotten at index {index}"
                        );
                    }
                    if matches!(**cmd, Command::Request { .. }) {
                        assert!(matches!(resp, Response::Rejected { .. }), "a nested request was applied: {resp:?}");
                        assert!(s == before, "a refused nested request changed the state");
                    } else {
                        first.insert(*id, (resp.clone(), index));
                        // The responses here are small: far below the bytes bound.
                        assert_eq!(s.requests.get(id), Some(Some(&resp)), "a request just applied is not remembered");
                    }
                }
            }
        }
        if let Response::Rejected { .. } = resp {
            // A request's response is remembered even when it is a refusal.
            let (a, b) = (without_requests(&s), without_requests(&before));
            assert!(a == b, "a rejected command changed the state: {step:?}");
        }
        check_invariants(&s, &before);
        let back = snapshot_round_trip(&s);
        assert!(back == s, "the state differs after a round trip through its snapshot form");
        assert_eq!(back.requests.len(), s.requests.len());
        for id in first.keys() {
            assert_eq!(back.requests.get(id), s.requests.get(id), "request {id:?} after a round trip");
        }
        responses.push(resp);
    }

    // The same commands on a fresh state: the same responses and state.
    let mut t = ClusterState::default();
    for (i, step) in steps.iter().enumerate() {
        assert_eq!(run(&mut t, index_of[i], step), responses[i], "step {i} answered differently");
    }
    assert!(t == s, "the same commands gave another state");

    // Restored from a snapshot midway (a node that installed a snapshot): the same again.
    let k = restore_at as usize % (steps.len() + 1);
    let mut u = ClusterState::default();
    for (i, step) in steps.iter().enumerate() {
        if i == k {
            u = snapshot_round_trip(&u);
        }
        assert_eq!(run(&mut u, index_of[i], step), responses[i], "step {i} after a restore at {k}");
    }
    assert!(u == s, "a state restored from a snapshot at step {k} diverged");
});
