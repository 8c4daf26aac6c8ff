//! Writes the seed inputs (`seeds/TARGET/`) and dictionaries (`dicts/TARGET.dict`) of the fuzz
//! targets from real values, encoded by the agent's own code: signed requests, a config file,
//! snapshots, netlink dumps, sealed SLURM state copies. Run from `agent/fuzz`:
//! `cargo run --example make_seeds`.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clusteros::adapters::raft::state_machine::{SmData, encode_snapshot_file};
use clusteros::adapters::raft::{LogId, SnapshotMeta, StoredMembership, TypeConfig};
use clusteros::adapters::secrets::SecretBox;
use clusteros::adapters::slurm_state::{SEAL_NAME, StateFiles};
use clusteros::core::auth::{ANY_NODE, AuthHeaders, ClusterKey, parse_auth};
use clusteros::core::formation::{Pledge, PledgeRefusal};
use clusteros::core::state::{
    ClusterState, Command, KvEntry, MemberSpec, NodeFacts, NodeId, RequestId, Response, RoleAssignments,
};
use clusteros::proto::{
    Candidate, Empty, ErrorBody, HelloRequest, HelloResponse, JoinRequest, JoinResponse, LeaveRequest, PledgeResponse,
    PreVoteRequest, PreVoteResponse, ReadRequest, ReadResponse, SlurmStateBlob, SnapshotRequest, WriteRequest,
};
use clusteros_agent_fuzz::{NOW_MS, SECRET, TARGET, route};
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_generic::GenlMessage;
use netlink_packet_wireguard::{
    WireguardAddressFamily, WireguardAllowedIp, WireguardAllowedIpAttr, WireguardAttribute, WireguardCmd,
    WireguardMessage, WireguardPeer, WireguardPeerAttribute, WireguardTimeSpec,
};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse};
use openraft::{CommittedLeaderId, EntryPayload, Membership, Vote};
use serde::Serialize;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// A libFuzzer dictionary: one quoted token a line, non-printable bytes as \xNN.
fn write_dict(target: &str, tokens: &BTreeSet<Vec<u8>>) {
    let mut out = String::new();
    for t in tokens {
        out.push('"');
        for b in t {
            match b {
                b'"' | b'\\' => out.push_str(&format!("\\{}", *b as char)),
                0x20..=0x7e => out.push(*b as char),
                _ => out.push_str(&format!("\\x{b:02x}")),
            }
        }
        out.push_str("\"\n");
    }
    std::fs::create_dir_all("dicts").unwrap();
    std::fs::write(Path::new("dicts").join(format!("{target}.dict")), out).unwrap();
}

/// The keys and short strings of a JSON text, as dictionary tokens.
fn json_tokens(json: &[u8], out: &mut BTreeSet<Vec<u8>>) {
    fn walk(v: &serde_json::Value, out: &mut BTreeSet<Vec<u8>>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    out.insert(format!("\"{k}\":").into_bytes());
                    walk(v, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            serde_json::Value::String(s) if s.len() <= 24 => {
                out.insert(format!("\"{s}\"").into_bytes());
                if let Ok(inner) = serde_json::from_str::<serde_json::Value>(s) {
                    walk(&inner, out);
                }
            }
            _ => {}
        }
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) {
        walk(&v, out);
    }
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, NodeId(1)), index)
}

fn spec(id: u64, name: &str) -> MemberSpec {
    MemberSpec {
        id: NodeId(id),
        name: name.into(),
        api_addr: format!("10.0.0.{id}:7600"),
        wg_public_key: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
        facts: NodeFacts { cpus: 2, memory_mb: 2048, kernel: "6.12.0".into(), arch: "x86_64".into() },
        labels: BTreeMap::from([("rack".into(), "r1".into())]),
        cluster_keys: Vec::new(),
    }
}

fn membership() -> StoredMembership {
    let nodes: BTreeMap<NodeId, clusteros::adapters::raft::PeerNode> = (1..=3u8)
        .map(|i| {
            let key = clusteros::core::auth::NodeKey::from_seed(&[i; 32]).public();
            (NodeId(i.into()), clusteros::adapters::raft::PeerNode::new(format!("10.0.0.{i}:7600"), key))
        })
        .collect();
    StoredMembership::new(
        Some(log_id(1, 2)),
        Membership::new(vec![BTreeSet::from([NodeId(1), NodeId(2), NodeId(3)])], nodes),
    )
}

/// A state machine with a few members, roles, secrets, KV entries and remembered requests.
fn sm_data() -> SmData {
    let mut s = ClusterState::default();
    s.apply_membership(BTreeSet::from([NodeId(1), NodeId(2), NodeId(3)]), BTreeSet::new());
    let mut i = 0;
    let mut apply = |s: &mut ClusterState, c: Command| {
        i += 1;
        s.apply(i, &c)
    };
    apply(&mut s, Command::InitCluster { cluster_id: "c-0001".into(), at_ms: 1_000 });
    for id in 1..=3 {
        apply(&mut s, Command::UpsertMember { spec: spec(id, &format!("n{id}")), at_ms: 1_000 });
        apply(&mut s, Command::AssignMeshIp { id: NodeId(id), ip: format!("10.90.0.{id}").parse().unwrap() });
    }
    let roles = RoleAssignments {
        slurm_controller: Some(NodeId(1)),
        slurm_backup: Some(NodeId(2)),
        slurm_workers: BTreeSet::from([NodeId(1), NodeId(2), NodeId(3)]),
        k3s_server: Some(NodeId(1)),
        k3s_agents: BTreeSet::from([NodeId(2), NodeId(3)]),
    };
    apply(&mut s, Command::SetRoles { roles });
    apply(&mut s, Command::SetSecret { name: "munge-key".into(), value: "c2VjcmV0".into(), at_ms: 2_000 });
    apply(
        &mut s,
        Command::SetSlurmState { from: NodeId(1), digest: "ab".repeat(32), files: 3, bytes: 100, taken_at_ms: 3_000 },
    );
    apply(&mut s, Command::KvPut { key: "k".into(), value: "v".into() });
    let put = Command::KvPut { key: "r".into(), value: "1".into() };
    apply(&mut s, Command::Request { id: RequestId { origin: 7, seq: 1 }, at_ms: 4_000, cmd: Box::new(put) });
    SmData { last_applied: Some(log_id(1, 20)), last_membership: membership(), state: s }
}

/// The names of the enum variants of commands, responses and openraft messages.
fn enum_tokens() -> BTreeSet<Vec<u8>> {
    [
        "init_cluster",
        "upsert_member",
        "set_health",
        "assign_mesh_ip",
        "set_roles",
        "set_secret",
        "set_slurm_state",
        "slurm_takeover",
        "kv_put",
        "kv_delete",
        "kv_cas",
        "request",
        "empty",
        "ok",
        "kv",
        "cas",
        "secret",
        "slurm_state",
        "rejected",
        "alive",
        "suspect",
        "failed",
        "left",
        "Err",
        "HigherVote",
        "Conflict",
        "PartialSuccess",
        "Blank",
        "Normal",
        "Membership",
    ]
    .iter()
    .map(|t| format!("\"{t}\"").into_bytes())
    .collect()
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// peer_request: `[kind, flags, status_lo, status_hi] to \n time \n nonce \n sig \n resp-sig \n
/// body`, addressed as the real client addresses that route (the target node, or `*` for
/// discovery and joining).
fn peer_request_input(kind: u8, flags: u8, status: u16, body: &[u8], sign_answer: bool) -> Vec<u8> {
    let key = ClusterKey::derive(SECRET);
    let path = route(kind);
    let to = if clusteros::proto::paths::accepts_any_node(&path) { ANY_NODE } else { TARGET };
    let nonce = format!("{:032x}", u128::from(kind) * 0x1234_5678_9abc_def1 + u128::from(status));
    let a = key.sign_request("POST", &path, to, NOW_MS, &nonce, body);
    let resp_sig = if sign_answer { key.sign_response(&a.nonce, status, body) } else { String::new() };
    let parsed = parse_auth(AuthHeaders {
        to: Some(&a.to),
        time: Some(&a.time_ms.to_string()),
        nonce: Some(&a.nonce),
        body_sha256: Some(&a.body_sha256),
        signature: Some(&a.signature),
        from: None,
        node_sig: None,
    })
    .unwrap();
    key.verify_request("POST", &path, &parsed, body).unwrap();
    let mut out = vec![kind, flags];
    out.extend(status.to_le_bytes());
    for part in [a.to, a.time_ms.to_string(), a.nonce, a.signature, resp_sig] {
        out.extend(part.as_bytes());
        out.push(b'\n');
    }
    out.extend(body);
    out
}

fn peer_request() {
    let data = sm_data();
    let cand = Candidate {
        id: NodeId(1),
        name: "n1".into(),
        api_addr: "10.0.0.1:7600".into(),
        initialized: true,
        bootstrap_expect: Some(3),
        pledged: Some(Pledge {
            proposer: NodeId(1),
            seq: 2,
            members: BTreeMap::from([(NodeId(1), "10.0.0.1:7600".into())]),
        }),
    };
    let pledge = Pledge {
        proposer: NodeId(1),
        seq: 4,
        members: (1..=3).map(|i| (NodeId(i), format!("10.0.0.{i}:7600"))).collect(),
    };
    let entries = vec![
        openraft::Entry::<TypeConfig> { log_id: log_id(1, 1), payload: EntryPayload::Blank },
        openraft::Entry::<TypeConfig> {
            log_id: log_id(1, 2),
            payload: EntryPayload::Membership(membership().membership().clone()),
        },
        openraft::Entry::<TypeConfig> {
            log_id: log_id(1, 3),
            payload: EntryPayload::Normal(Command::Request {
                id: RequestId { origin: 9, seq: 2 },
                at_ms: 5,
                cmd: Box::new(Command::KvCas { key: "k".into(), expected: None, new: Some("v".into()) }),
            }),
        },
    ];
    let append = AppendEntriesRequest::<TypeConfig> {
        vote: Vote::new_committed(1, NodeId(1)),
        prev_log_id: Some(log_id(1, 0)),
        entries,
        leader_commit: Some(log_id(1, 1)),
    };
    let requests: Vec<Vec<u8>> = vec![
        to_json(&append),
        to_json(&VoteRequest::<NodeId> { vote: Vote::new(2, NodeId(2)), last_log_id: Some(log_id(1, 3)) }),
        to_json(&SnapshotRequest {
            vote: Vote::new_committed(1, NodeId(1)),
            meta: SnapshotMeta {
                last_log_id: data.last_applied,
                last_membership: data.last_membership.clone(),
                snapshot_id: "1-20-0".into(),
            },
            data: String::from_utf8(to_json(&data)).unwrap(),
        }),
        to_json(&PreVoteRequest { candidate: NodeId(2), term: 1, last_log_id: Some(log_id(1, 3)) }),
        to_json(&HelloRequest { from: cand.clone() }),
        to_json(&JoinRequest {
            id: NodeId(4),
            name: "n4".into(),
            api_addr: "10.0.0.4:7600".into(),
            node_key: clusteros::core::auth::NodeKey::from_seed(&[4; 32]).public(),
        }),
        to_json(&LeaveRequest { id: NodeId(3) }),
        to_json(&WriteRequest { cmd: Command::KvPut { key: "k".into(), value: "v".into() } }),
        to_json(&ReadRequest { key: "k".into() }),
        to_json(&Empty {}),
        to_json(&pledge),
    ];
    let answers: Vec<Vec<u8>> = vec![
        to_json(&Ok::<_, ()>(AppendEntriesResponse::<NodeId>::Success)),
        to_json(&Ok::<_, ()>(VoteResponse::<NodeId> {
            vote: Vote::new(2, NodeId(2)),
            vote_granted: true,
            last_log_id: Some(log_id(1, 3)),
        })),
        to_json(&Ok::<_, ()>(SnapshotResponse::<NodeId> { vote: Vote::new_committed(1, NodeId(1)) })),
        to_json(&PreVoteResponse { granted: false, term: 1, reason: Some("a leader is alive".into()) }),
        to_json(&HelloResponse {
            me: cand.clone(),
            known: vec![cand],
            leader: Some(NodeId(1)),
            members: BTreeMap::from([(NodeId(1), "10.0.0.1:7600".into())]),
            members_index: Some(7),
            members_log_id: Some(log_id(1, 7)),
            member_keys: BTreeMap::from([(NodeId(1), "MCowBQYDK2VwAyEA".into())]),
        }),
        to_json(&JoinResponse { leader: NodeId(1), replaced: None }),
        to_json(&Empty {}),
        to_json(&Response::Cas { succeeded: true, current: Some("v".into()) }),
        to_json(&ReadResponse {
            key: "k".into(),
            entry: Some(KvEntry { value: "v".into(), mod_index: 3 }),
            read_index: Some(7),
        }),
        to_json(&SlurmStateBlob { from: NodeId(1), version: 2, digest: "ab".repeat(32), sealed: "AAAA".into() }),
        to_json(&PledgeResponse {
            refused: Some(PledgeRefusal::PledgedTo(NodeId(1))),
            node_key: clusteros::core::auth::NodeKey::from_seed(&[1; 32]).public(),
        }),
    ];
    let mut tokens = BTreeSet::new();
    for (kind, (req, ans)) in requests.iter().zip(&answers).enumerate() {
        let kind = kind as u8;
        // A request with all three headers and an answer signature header.
        write("peer_request", &format!("req-{kind}"), &peer_request_input(kind, 1 | 2 | 4 | 32, 200, req, true));
        // Its answer, correctly signed.
        write("peer_request", &format!("ans-{kind}"), &peer_request_input(kind, 1 | 2 | 4 | 32, 200, ans, true));
        json_tokens(req, &mut tokens);
        json_tokens(ans, &mut tokens);
    }
    let err = to_json(&ErrorBody { error: "not the leader".into(), kind: clusteros::proto::ErrorKind::NotLeader });
    write("peer_request", "err-421", &peer_request_input(7, 1 | 2 | 4 | 32, 421, &err, true));
    write("peer_request", "err-401", &peer_request_input(5, 1 | 2 | 4, 401, &err, false));
    // Self-signed: past the HMAC to the replay guard.
    write("peer_request", "selfsigned", &peer_request_input(8, 1 | 2 | 4 | 8 | 16, 200, &requests[8], false));
    // The same, relayed over another machine's TLS key (kind's top bit): refused as not the
    // channel's.
    write("peer_request", "relayed", &peer_request_input(7 | 0x80, 1 | 2 | 4 | 8 | 16, 200, &requests[7], false));
    json_tokens(&err, &mut tokens);
    for t in ["x-clusteros-time", "x-clusteros-nonce", "x-clusteros-auth", "1750000000000", "-9223372036854775808"] {
        tokens.insert(t.as_bytes().to_vec());
    }
    for t in ["9223372036854775807", "18446744073709551615", "null", "true", "false", "{}", "[]"] {
        tokens.insert(t.as_bytes().to_vec());
    }
    tokens.extend(enum_tokens());
    write_dict("peer_request", &tokens);
}

/// config: `[files, flags]` then NUL-separated sections (see the target).
fn config() {
    let toml = r#"node_name = "n1"
state_dir = "/var/lib/clusteros"
socket_path = "/run/clusteros/agent.sock"
listen_addr = "0.0.0.0:7600"
advertise_addr = "10.0.0.1:7600"
join = ["10.0.0.2", "node3:7600", "[fd00::3]:7600"]
bootstrap_expect = 3
max_voters = 3
cluster_secret = "fuzz-cluster-secret-0123456789"
mesh_cidr = "10.90.0.0/16"
manage_services = "auto"
metrics_addr = "off"

[raft]
heartbeat_ms = 250
election_timeout_min_ms = 1500
election_timeout_max_ms = 3000
snapshot_after_logs = 1000
logs_to_keep = 500
rpc_timeout_ms = 2000
snapshot_timeout_ms = 30000

[health]
suspect_after_ms = 5000
failed_after_ms = 15000
remove_after_ms = 600000
"#;
    let input = |files: u8, flags: u8, sections: &[&str]| {
        let mut out = vec![files, flags];
        out.extend(sections.join("\0").as_bytes());
        out
    };
    let path = Path::new("/etc/clusteros/agent.toml");
    let file = clusteros::core::config::parse_toml(path, toml).unwrap();
    let creds = clusteros::core::config::Credentials::from_files(Path::new("/run/credentials"), &[]).unwrap();
    let o = clusteros::core::config::Overrides::default();
    clusteros::core::config::Config::resolve(file, creds, &o, &|_| Err(std::io::ErrorKind::NotFound.into())).unwrap();
    write("config", "full", &input(1, 0, &[toml]));
    write("config", "empty", &input(0, 0, &[]));
    write(
        "config",
        "credentials",
        &input(
            1 | 2 | 4 | 8 | 16 | 32,
            0,
            &[
                "mesh_cidr = \"172.16.0.0/12\"\n",
                "cred-secret-0123456789\n",
                "10.0.0.2:7000, 10.0.0.3\n",
                "3\n",
                "5\n",
                "node-7\n",
            ],
        ),
    );
    write(
        "config",
        "secret-file",
        &input(
            1 | 64,
            0,
            &["cluster_secret_file = \"/etc/clusteros/secret\"\n", "", "", "", "", "", "file-secret-0123456789\n"],
        ),
    );
    write(
        "config",
        "overrides",
        &input(
            1 | 64,
            0x7f,
            &[
                "metrics_addr = \"127.0.0.1:7601\"\n",
                "",
                "",
                "",
                "",
                "",
                "file-secret-0123456789",
                "n2",
                "127.0.0.1:7600",
                "127.0.0.1:7600",
                "10.0.0.1,node2",
                "1",
                "1",
                "/etc/clusteros/secret",
            ],
        ),
    );
    let mut tokens = BTreeSet::new();
    for k in [
        "node_name",
        "state_dir",
        "socket_path",
        "listen_addr",
        "advertise_addr",
        "join",
        "bootstrap_expect",
        "max_voters",
        "cluster_secret",
        "cluster_secret_file",
        "mesh_cidr",
        "manage_services",
        "metrics_addr",
        "[raft]",
        "heartbeat_ms",
        "election_timeout_min_ms",
        "election_timeout_max_ms",
        "snapshot_after_logs",
        "logs_to_keep",
        "rpc_timeout_ms",
        "snapshot_timeout_ms",
        "[health]",
        "suspect_after_ms",
        "failed_after_ms",
        "remove_after_ms",
        "\"auto\"",
        "\"on\"",
        "\"off\"",
        "\"/etc/clusteros/secret\"",
        "10.90.0.0/16",
        "192.168.0.0/8",
        "0.0.0.0:7600",
        "[::1]:7600",
        "::",
        "18446744073709551615",
        "9223372036854775808",
        " = ",
        "\"\"\"",
    ] {
        tokens.insert(k.as_bytes().to_vec());
    }
    write_dict("config", &tokens);
}

fn snapshot() {
    let data = sm_data();
    let json = to_json(&data);
    let meta = SnapshotMeta {
        last_log_id: data.last_applied,
        last_membership: data.last_membership.clone(),
        snapshot_id: "1-20-0".into(),
    };
    let file = encode_snapshot_file(&meta, String::from_utf8(json.clone()).unwrap()).unwrap();
    assert!(clusteros::adapters::raft::state_machine::decode_snapshot_file(&file).unwrap().0 == data);
    write("snapshot", "file", &file);
    write("snapshot", "received", &json);
    let empty = SmData::default();
    write(
        "snapshot",
        "file-empty",
        &encode_snapshot_file(&SnapshotMeta::default(), String::from_utf8(to_json(&empty)).unwrap()).unwrap(),
    );
    let mut tokens = BTreeSet::new();
    json_tokens(&encode_snapshot_file(&meta, String::from_utf8(json.clone()).unwrap()).unwrap(), &mut tokens);
    json_tokens(&json, &mut tokens);
    for t in ["18446744073709551615", "null", "[]", "{}", "\\\""] {
        tokens.insert(t.as_bytes().to_vec());
    }
    tokens.extend(enum_tokens());
    write_dict("snapshot", &tokens);
}

/// apply: `[restore_at]` then steps; a step byte `% 16` of 0 or 8 is a membership change (voter
/// mask, learner mask), 15 a gap in the log indexes (pool index), otherwise a command: variant
/// byte `% 12`, then its fields.
fn apply() {
    // Members 1-3 join, register, get addresses and roles; a secret, KV and a repeated request.
    let form: Vec<u8> = vec![
        2, // restore from a snapshot before step 2
        0, 0b0111, 0b1000, // membership: voters 1, 2, 3, learner 4
        1, 0, 0, 2, // InitCluster "c1" at 1000
        1, 1, 0, 0, 0, 2, // UpsertMember 1 "n1"
        1, 1, 1, 1, 1, 2, // UpsertMember 2 "n2"
        1, 1, 2, 2, 2, 2, // UpsertMember 3 "n3"
        1, 3, 0, 0, // AssignMeshIp 1 -> 10.90.0.1
        1, 3, 1, 1, // AssignMeshIp 2 -> 10.90.0.2
        1, 3, 2, 1, // AssignMeshIp 3 -> 10.90.0.2: refused
        1, 4, 1, 2, 0b0111, 1, 0b0110, // SetRoles: controller 2, backup 3, workers 1-3, k3s 2, agents 2, 3
        1, 5, 0, 1, 3, // SetSecret munge-key "v" at 120000
        1, 5, 0, 2, 4, // rotated: "w" at 121001
        1, 6, 1, 0, 3, 100, 4, // SetSlurmState from 2 (the controller)
        1, 7, 2, // SlurmTakeover by 3 (the backup)
        1, 11, 0, 3, 8, 0, 1, // Request {1, 1} at 120000: KvPut k v
        1, 11, 0, 3, 8, 0, 2, // the same request again (another value): the first answer
        1, 11, 2, 6, 10, 0, 1, 1, // Request {1, 2} at 1e9: KvCas k v -> v
        1, 11, 0, 4, 8, 0, 3, // Request {1, 1} at 121001: forgotten by now, applied again
        1, 11, 1, 1, 11, 0, 1, 9, 0, // a request in a request: refused
        0, 0b0011, 0, // membership: 3 and 4 leave
        1, 9, 0, // KvDelete k
    ];
    write("apply", "form-cluster", &form);
    // Whole steps, one of each kind, as dictionary tokens.
    let steps: [&[u8]; 15] = [
        &[0, 0b0111, 0b1000],
        &[15, 3], // a gap of RequestLog::MAX_ENTRIES log indexes
        &[1, 0, 0, 2],
        &[1, 1, 0, 0, 0, 2],
        &[1, 2, 0, 2, 3],
        &[1, 3, 0, 0],
        &[1, 4, 1, 2, 0b0111, 1, 0b0110],
        &[1, 5, 0, 1, 3],
        &[1, 6, 1, 0, 3, 100, 4],
        &[1, 7, 2],
        &[1, 8, 0, 1],
        &[1, 9, 0],
        &[1, 10, 0, 1, 1],
        &[1, 11, 0, 3, 8, 0, 1],
        &[1, 11, 1, 1, 11, 0, 1, 9, 0],
    ];
    write_dict("apply", &steps.iter().map(|s| s.to_vec()).collect());
    write("apply", "kv", &[0, 1, 8, 0, 1, 1, 8, 1, 2, 1, 10, 0, 1, 2, 1, 9, 0, 1, 10, 2, 0, 1]);
    // A request, then more than RequestLog::MAX_ENTRIES log indexes later the same again.
    write("apply", "forget", &[0, 1, 11, 0, 0, 8, 0, 1, 15, 3, 1, 11, 0, 0, 8, 0, 2, 15, 1, 1, 11, 0, 0, 8, 0, 3]);
    write(
        "apply",
        "requests",
        &[5, 1, 11, 0, 0, 8, 0, 1, 1, 11, 0, 7, 8, 0, 2, 1, 11, 0, 0, 8, 0, 3, 1, 11, 2, 5, 9, 1],
    );
}

fn genl_dump(msgs: &[WireguardMessage], family: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, m) in msgs.iter().enumerate() {
        let mut header = NetlinkHeader::default();
        header.flags = 2; // NLM_F_MULTI
        header.sequence_number = i as u32 + 1;
        let mut g = GenlMessage::from_payload(m.clone());
        g.set_resolved_family_id(family);
        let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(g));
        nl.finalize();
        let mut buf = vec![0; nl.buffer_len()];
        nl.serialize(&mut buf);
        out.extend(buf);
    }
    // NLMSG_DONE
    let mut done = NetlinkMessage::<GenlMessage<WireguardMessage>>::new(
        NetlinkHeader::default(),
        NetlinkPayload::Done(Default::default()),
    );
    done.finalize();
    let mut buf = vec![0; done.buffer_len()];
    done.serialize(&mut buf);
    out.extend(buf);
    out
}

fn wg_dump() {
    use netlink_packet_core::Emitable;
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    let allowed = |ip: &str, cidr: u8| {
        WireguardAllowedIp(vec![
            WireguardAllowedIpAttr::Family(WireguardAddressFamily::Ipv4),
            WireguardAllowedIpAttr::IpAddr(ip.parse().unwrap()),
            WireguardAllowedIpAttr::Cidr(cidr),
        ])
    };
    let part1 = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![
            WireguardAttribute::IfIndex(4),
            WireguardAttribute::IfName("wg0".into()),
            WireguardAttribute::PublicKey([9u8; 32]),
            WireguardAttribute::ListenPort(51820),
            WireguardAttribute::Peers(vec![
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(k1),
                    WireguardPeerAttribute::Endpoint("192.168.1.2:51820".parse().unwrap()),
                    WireguardPeerAttribute::PersistentKeepalive(25),
                    WireguardPeerAttribute::LastHandshake(WireguardTimeSpec {
                        seconds: 1_749_999_990,
                        nano_seconds: 5,
                    }),
                    WireguardPeerAttribute::RxBytes(10),
                    WireguardPeerAttribute::TxBytes(20),
                    WireguardPeerAttribute::ProtocolVersion(1),
                    WireguardPeerAttribute::AllowedIps(vec![allowed("10.90.0.2", 32)]),
                ]),
                WireguardPeer(vec![
                    WireguardPeerAttribute::PublicKey(k2),
                    WireguardPeerAttribute::Endpoint("[fd00::2]:51820".parse().unwrap()),
                    WireguardPeerAttribute::AllowedIps(vec![allowed("10.90.0.3", 32)]),
                ]),
            ]),
        ],
    };
    // The first peer continues in the next message.
    let part2 = WireguardMessage {
        cmd: WireguardCmd::GetDevice,
        attributes: vec![WireguardAttribute::Peers(vec![WireguardPeer(vec![
            WireguardPeerAttribute::PublicKey(k1),
            WireguardPeerAttribute::AllowedIps(vec![allowed("10.91.0.0", 16)]),
        ])])],
    };
    let mut raw = vec![0u8];
    raw.extend(genl_dump(&[part1.clone(), part2.clone()], 0x1d));
    {
        let mut buf = &raw[1..];
        let mut msgs = Vec::new();
        while !buf.is_empty() {
            let len = netlink_packet_core::NetlinkBuffer::new_checked(buf).unwrap().length() as usize;
            let m = NetlinkMessage::<GenlMessage<WireguardMessage>>::deserialize(&buf[..len]).unwrap();
            if let NetlinkPayload::InnerMessage(g) = m.payload {
                msgs.push(g.payload);
            }
            buf = &buf[len..];
        }
        let (dev, stats) = clusteros::adapters::wireguard::merge_dump(&msgs, std::time::SystemTime::now());
        assert_eq!((dev.peers.len(), stats.len(), dev.listen_port), (2, 2, Some(51820)));
        assert_eq!(dev.peers.values().next().unwrap().allowed_ips.len(), 2);
    }
    write("wg_dump", "raw-dump", &raw);
    let mut framed = vec![1u8];
    let mut tokens = BTreeSet::new();
    for m in [&part1, &part2] {
        let mut attrs = vec![0; m.buffer_len()];
        m.emit(&mut attrs);
        framed.extend((attrs.len() as u16).to_le_bytes());
        framed.push(0); // WG_CMD_GET_DEVICE
        framed.extend(&attrs);
        // Attribute headers (length, type) as tokens.
        for a in &m.attributes {
            let mut b = vec![0; a.buffer_len()];
            a.emit(&mut b);
            tokens.insert(b[..4].to_vec());
        }
    }
    write("wg_dump", "framed-dump", &framed);
    let mut key = vec![2u8];
    key.extend(b"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=");
    write("wg_dump", "key", &key);
    for t in [&b"wg0\0"[..], b"\x0a\x00", b"\x02\x00", b"\x14\x00\x03\x00", b"\x20\x00\x00\x00"] {
        tokens.insert(t.to_vec());
    }
    // Extreme values of the 64-bit counters and time fields, and a second in nanoseconds.
    for v in [i64::MAX.to_le_bytes(), i64::MIN.to_le_bytes(), u64::MAX.to_le_bytes()] {
        tokens.insert(v.to_vec());
    }
    tokens.insert(1_000_000_000u32.to_le_bytes().to_vec());
    write_dict("wg_dump", &tokens);
}

fn slurm_state() {
    let files = StateFiles(BTreeMap::from([
        ("job_state".to_string(), b"\x00\x01job state".to_vec()),
        ("node_state".to_string(), b"nodes".to_vec()),
        ("heartbeat".to_string(), [1_750_000_000u64.to_be_bytes(), 0u64.to_be_bytes()].concat()),
        ("hash.7/job.17/script".to_string(), b"#!/bin/sh\nhostname\n".to_vec()),
        ("hash.7/job.17/environment".to_string(), b"A=1\0B=2\0".to_vec()),
    ]));
    let now = 1_750_000_010u64.to_be_bytes();
    let input = |flags: u8, payload: &[u8]| [&[flags][..], &now, payload].concat();
    let json = files.to_json();
    write("slurm_state", "plain", &input(1, &json));
    let sealed = SecretBox::new(SECRET, &[]).seal(SEAL_NAME, &json);
    let opened = SecretBox::new(SECRET, &[]).open(SEAL_NAME, &sealed).unwrap();
    assert_eq!(StateFiles::from_json(&opened).unwrap(), files);
    write("slurm_state", "sealed", &input(0, sealed.as_bytes()));
    let hb = [1_750_000_005u64.to_be_bytes(), 1u64.to_be_bytes()].concat();
    write("slurm_state", "local-heartbeat", &input(3, &[&hb[..], &json].concat()));
    let mut tokens = BTreeSet::new();
    json_tokens(&json, &mut tokens);
    for t in
        ["hash.", "job.", "/job.", "heartbeat", "job_state", ".new", ".old", "script", "environment", "..", "\\u0000"]
    {
        tokens.insert(t.as_bytes().to_vec());
    }
    write_dict("slurm_state", &tokens);
}

/// tls_handshake: a real ClientHello of the agent's client (for the server; whole and in
/// pieces) and the first flight of the agent's server answering it (for a client, pinned or not),
/// and a node key's SPKI. (A ClientHello holds fresh randomness: the seeds differ on every run.)
fn tls_handshake() {
    use std::sync::Arc;

    use clusteros::adapters::tls::{client_config, server_config, spki};
    use clusteros::core::auth::NodeKey;
    let (server_key, client_key) = (NodeKey::from_seed(&[1; 32]), NodeKey::from_seed(&[2; 32]));
    let name = rustls::pki_types::ServerName::try_from("10.0.0.1").unwrap();
    let mut client = rustls::ClientConnection::new(Arc::new(client_config(&client_key, None)), name).unwrap();
    let mut server = rustls::ServerConnection::new(server_config(&server_key)).unwrap();
    let mut hello = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut hello).unwrap();
    }
    server.read_tls(&mut &hello[..]).unwrap();
    server.process_new_packets().unwrap();
    let mut flight = Vec::new();
    while server.wants_write() {
        server.write_tls(&mut flight).unwrap();
    }
    assert!(hello.len() > 100 && flight.len() > 100, "no handshake to seed with");
    // flags: bits 2-7 all set read the bytes in 3,904-byte pieces (whole), clear in 61-byte ones.
    write("tls_handshake", "client-hello", &[&[0xfc][..], &hello].concat());
    write("tls_handshake", "client-hello-in-pieces", &[&[0u8][..], &hello].concat());
    write("tls_handshake", "server-flight", &[&[0xfd][..], &flight].concat());
    write("tls_handshake", "server-flight-pinned", &[&[0xff][..], &flight].concat());
    write("tls_handshake", "spki", &[&[0u8][..], &spki(&server_key.public_bytes())].concat());
}

fn main() {
    peer_request();
    config();
    snapshot();
    apply();
    wg_dump();
    slurm_state();
    tls_handshake();
    beacon();
    dns();
}

fn beacon() {
    use clusteros::core::beacon::{Beacon, BeaconKey, encode};
    // The fuzz target's secret and clock (fuzz_targets/beacon.rs).
    let key = BeaconKey::derive("fuzz-cluster-secret-0123456789");
    let beacon = Beacon {
        node: clusteros::core::ids::NodeId(0x0123_4567_89ab_cdef),
        name: "node-2".into(),
        api_addr: "10.0.0.2:7600".parse().unwrap(),
        member: true,
        time_ms: 1_750_000_000_000,
        seq: 7,
    };
    let raw = [&[0u8][..], &encode(&beacon, &key)].concat();
    write("beacon", "signed-raw", &raw);
    let v6 = Beacon { api_addr: "[fd00::2]:7600".parse().unwrap(), ..beacon.clone() };
    write("beacon", "signed-v6", &[&[0u8][..], &encode(&v6, &key)].concat());
    let other = BeaconKey::derive("another-cluster-secret-0123");
    write("beacon", "neighbour", &[&[0u8][..], &encode(&beacon, &other)].concat());
    // Mode 1: node id, time offset, sequence, flags, port, IPv4, name.
    let fields = [
        &0x0123_4567_89ab_cdefu64.to_be_bytes()[..],
        &0i32.to_be_bytes(),
        &7u16.to_be_bytes(),
        &[1],
        &7600u16.to_be_bytes(),
        &[10, 0, 0, 2],
        b"node-2",
    ]
    .concat();
    write("beacon", "fields", &[&[1u8][..], &fields].concat());
    let tokens: BTreeSet<Vec<u8>> =
        [&b"COSB\x01"[..], b"COSB\x01\x01", b"\x04", b"\x06", b"\x1d\xb0"].iter().map(|t| t.to_vec()).collect();
    write_dict("beacon", &tokens);
}

/// Real answers of a real DNS server (dnsmasq, from `scripts/install-host-deps`) to the agent's
/// own queries, for the names and the query id of fuzz_targets/dns.rs.
fn dns() {
    use clusteros::core::dns::{TYPE_A, TYPE_AAAA, TYPE_SRV, encode_query};
    const NAME: &str = "_clusteros._tcp.site.test";
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = std::process::Command::new("dnsmasq")
        .args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            &format!("--port={port}"),
            "--user=root",
            "--pid-file=",
            &format!("--srv-host={NAME},node-1.site.test,7600,0,10"),
            &format!("--srv-host={NAME},node-2.site.test,7600,10,20"),
            "--host-record=node-1.site.test,10.0.0.1,fd00::1",
            "--host-record=node-2.site.test,10.0.0.2",
        ])
        .spawn()
        .expect("cannot start dnsmasq: install it with scripts/install-host-deps (Debian package dnsmasq-base)");
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
    let ask = |name: &str, qtype: u16| -> Vec<u8> {
        // dnsmasq may not listen yet: ask again until it answers (at most 50 times).
        for _ in 0..50 {
            sock.send_to(&encode_query(0x1234, name, qtype), ("127.0.0.1", port)).unwrap();
            let mut buf = [0u8; 4096];
            if let Ok(n) = sock.recv(&mut buf) {
                return buf[..n].to_vec();
            }
        }
        panic!("dnsmasq on port {port} did not answer");
    };
    // The first byte selects the query type (0 SRV, 1 A, 2 AAAA).
    write("dns", "dnsmasq-srv", &[&[0u8][..], &ask(NAME, TYPE_SRV)].concat());
    write("dns", "dnsmasq-a", &[&[1u8][..], &ask(NAME, TYPE_A)].concat());
    write("dns", "dnsmasq-aaaa", &[&[2u8][..], &ask(NAME, TYPE_AAAA)].concat());
    write("dns", "dnsmasq-refused", &[&[0u8][..], &ask("_clusteros._tcp.other.test", TYPE_SRV)].concat());
    let _ = server.kill();
    let _ = server.wait();
    let tokens: BTreeSet<Vec<u8>> =
        [&b"\x00\x21\x00\x01"[..], b"\x00\x01\x00\x01", b"\x00\x1c\x00\x01", b"\xc0\x0c", b"\x12\x34\x81\x80"]
            .iter()
            .map(|t| t.to_vec())
            .collect();
    write_dict("dns", &tokens);
}
