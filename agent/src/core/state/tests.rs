//! Tests of the state machine's `apply`.

use super::*;

fn spec(id: NodeId, name: &str) -> MemberSpec {
    MemberSpec {
        id,
        name: name.into(),
        api_addr: format!("10.0.0.{}:7600", id.0),
        wg_public_key: test_wg_key(id.0),
        facts: NodeFacts { cpus: 2, memory_mb: 1024, kernel: "6.12".into(), arch: "x86_64".into() },
        labels: BTreeMap::new(),
        cluster_keys: Vec::new(),
    }
}

#[test]
fn a_malformed_member_record_is_refused_and_changes_nothing() {
    // Issue 10, hole 10: names and labels go into every node's configs, keys into every wg0.
    let mut s = state_with(&[NodeId(1)], &[]);
    assert_eq!(s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 1 }), Response::Ok);
    let before = s.clone();
    let bad = |f: &dyn Fn(&mut MemberSpec)| {
        let mut m = spec(NodeId(1), "n1");
        f(&mut m);
        m
    };
    for (m, says) in [
        (bad(&|m| m.name = "n1\nSlurmctldParameters=x".into()), "not a host name"),
        (bad(&|m| m.name = "".into()), "not a host name"),
        (bad(&|m| m.name = "-n".into()), "not a host name"),
        (bad(&|m| m.wg_public_key = "key1".into()), "WireGuard public key"),
        (
            bad(&|m| m.wg_public_key = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 31])),
            "32 bytes",
        ),
        (bad(&|m| m.api_addr = "0.0.0.0:7600".into()), "peer API address"),
        (bad(&|m| m.api_addr = "host name:1".into()), "peer API address"),
        (bad(&|m| drop(m.labels.insert("rack".into(), "r1\n[x]".into()))), "label"),
        (bad(&|m| drop(m.labels.insert("".into(), "v".into()))), "label"),
        (bad(&|m| m.facts.kernel = "6.1\u{1b}[2J".into()), "facts"),
    ] {
        match s.apply(2, &Command::UpsertMember { spec: m.clone(), at_ms: 2 }) {
            Response::Rejected { reason } => assert!(reason.contains(says), "{m:?}: {reason}"),
            other => panic!("{m:?} was accepted: {other:?}"),
        }
        assert_eq!(s, before, "a refused record changed the state");
    }
    // What real nodes send is accepted: no key (no WireGuard), dotted host names, labels.
    let ok = bad(&|m| {
        m.wg_public_key.clear();
        m.name = "node-1.rack_2".into();
        m.labels.insert("topology.kubernetes.io/zone".into(), "a:b=c, d".into());
        m.facts.kernel = "6.1.0-27-cloud-amd64".into();
    });
    assert_eq!(s.apply(3, &Command::UpsertMember { spec: ok, at_ms: 3 }), Response::Ok);
}

fn state_with(voters: &[NodeId], learners: &[NodeId]) -> ClusterState {
    let mut s = ClusterState::default();
    s.apply_membership(voters.iter().copied().collect(), learners.iter().copied().collect());
    s
}

fn request(seq: u64, at_ms: u64, cmd: Command) -> Command {
    Command::Request { id: RequestId { origin: 7, seq }, at_ms, cmd: Box::new(cmd) }
}

#[test]
fn a_request_is_applied_once_however_often_it_commits() {
    let mut s = ClusterState::default();
    let cas = request(1, 1000, Command::KvCas { key: "k".into(), expected: None, new: Some("a".into()) });
    assert_eq!(s.apply(1, &cas), Response::Cas { succeeded: true, current: Some("a".into()) });
    // The same request committed again (a forwarded write resent to a new leader) answers
    // as the first did and changes nothing; without the id it would report a failed CAS.
    assert_eq!(s.apply(2, &cas), Response::Cas { succeeded: true, current: Some("a".into()) });
    assert_eq!(s.kv["k"].mod_index, 1);
    let put = request(2, 1001, Command::KvPut { key: "k".into(), value: "b".into() });
    assert_eq!(s.apply(3, &put), Response::Kv { previous: Some("a".into()) });
    assert_eq!(s.apply(4, &put), Response::Kv { previous: Some("a".into()) });
    assert_eq!(s.kv["k"].value, "b");
    let nested = request(3, 1002, request(4, 1002, Command::KvDelete { key: "k".into() }));
    assert!(matches!(s.apply(5, &nested), Response::Rejected { .. }));
    assert_eq!(s.kv["k"].value, "b");
}

#[test]
fn request_ids_are_kept_by_log_distance_and_responses_by_size() {
    let mut s = ClusterState::default();
    let put = |seq, value: &str| request(seq, 0, Command::KvPut { key: "k".into(), value: value.into() });
    // Large responses (1 MiB previous values) push the oldest responses out, not the ids: a
    // repeat of the first request is still not applied again.
    let big = "x".repeat(1 << 20);
    s.apply(1, &put(1, "first"));
    for seq in 2..20 {
        s.apply(seq, &put(seq, &big));
    }
    assert!(s.requests.bytes <= RequestLog::MAX_BYTES);
    assert!(s.apply(20, &put(1, "first")) == Response::AlreadyApplied, "applied once, answer dropped");
    assert!(s.kv["k"].value == big, "the repeat changed nothing");
    assert!(s.apply(21, &put(19, &big)) == Response::Kv { previous: Some(big.clone()) }, "recent: same answer");
    // An id is forgotten MAX_ENTRIES log entries after it was applied, not before.
    let far = 1 + RequestLog::MAX_ENTRIES as u64;
    s.apply(far, &request(100, 0, Command::KvDelete { key: "other".into() }));
    assert!(s.requests.get(&RequestId { origin: 7, seq: 1 }).is_some());
    s.apply(far + 1, &request(101, 0, Command::KvDelete { key: "other".into() }));
    assert!(s.requests.get(&RequestId { origin: 7, seq: 1 }).is_none());
    assert!(s.requests.get(&RequestId { origin: 7, seq: 2 }).is_some());
    // The snapshot form round-trips, and the rebuilt log goes on exactly as the original.
    let mut back: ClusterState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    assert!(back == s, "the state differs after a round trip through its snapshot form");
    for (i, seq) in (far + 2..far + 40).zip(200..) {
        let cmd = request(seq, 0, Command::KvPut { key: "k".into(), value: big.clone() });
        assert!(s.apply(i, &cmd) == back.apply(i, &cmd));
    }
    assert!(back == s, "a node that installed the snapshot diverged from one that applied the log");
}

#[test]
fn init_cluster_only_first_wins() {
    let mut s = ClusterState::default();
    assert_eq!(s.apply(1, &Command::InitCluster { cluster_id: "a".into(), at_ms: 5 }), Response::Ok);
    assert_eq!(s.apply(2, &Command::InitCluster { cluster_id: "b".into(), at_ms: 9 }), Response::Ok);
    assert_eq!(s.cluster_id.as_deref(), Some("a"));
    assert_eq!(s.created_at_ms, 5);
}

#[test]
fn upsert_requires_raft_membership() {
    let mut s = state_with(&[NodeId(1)], &[]);
    let r = s.apply(3, &Command::UpsertMember { spec: spec(NodeId(2), "n2"), at_ms: 1 });
    assert!(matches!(r, Response::Rejected { .. }), "{r:?}");
    assert!(s.members.is_empty());
    assert_eq!(s.apply(4, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 1 }), Response::Ok);
    assert_eq!(s.members[&NodeId(1)].spec.name, "n1");
    assert_eq!(s.members[&NodeId(1)].health, Health::Alive);
}

#[test]
fn upsert_updates_spec_but_keeps_health_and_registration_time() {
    let mut s = state_with(&[NodeId(1)], &[]);
    s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 10 });
    s.apply(2, &Command::SetHealth { id: NodeId(1), health: Health::Suspect, at_ms: 20 });
    let mut changed = spec(NodeId(1), "n1");
    changed.facts.cpus = 8;
    s.apply(3, &Command::UpsertMember { spec: changed, at_ms: 30 });
    let m = &s.members[&NodeId(1)];
    assert_eq!(m.spec.facts.cpus, 8);
    assert_eq!(m.health, Health::Suspect);
    assert_eq!(m.health_since_ms, 20);
    assert_eq!(m.registered_at_ms, 10);
}

#[test]
fn duplicate_names_are_refused() {
    let mut s = state_with(&[NodeId(1), NodeId(2)], &[]);
    s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "same"), at_ms: 0 });
    let r = s.apply(2, &Command::UpsertMember { spec: spec(NodeId(2), "same"), at_ms: 0 });
    assert!(matches!(r, Response::Rejected { ref reason } if reason.contains("already used")), "{r:?}");
    assert_eq!(s.members.len(), 1);
}

#[test]
fn membership_change_drops_records_of_removed_nodes() {
    let mut s = state_with(&[NodeId(1), NodeId(2), NodeId(3)], &[NodeId(4)]);
    for id in 1..=4 {
        s.apply(id, &Command::UpsertMember { spec: spec(NodeId(id), &format!("n{}", id)), at_ms: 0 });
    }
    assert_eq!(s.members.len(), 4);
    s.apply_membership([NodeId(1), NodeId(2), NodeId(4)].into(), BTreeSet::new());
    assert_eq!(s.members.keys().copied().collect::<Vec<_>>(), vec![NodeId(1), NodeId(2), NodeId(4)]);
    assert_eq!(s.voters, [NodeId(1), NodeId(2), NodeId(4)].into());
    assert!(s.learners.is_empty());
}

#[test]
fn set_health_records_transition_time_only_on_change() {
    let mut s = state_with(&[NodeId(1)], &[]);
    s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 0 });
    s.apply(2, &Command::SetHealth { id: NodeId(1), health: Health::Failed, at_ms: 100 });
    s.apply(3, &Command::SetHealth { id: NodeId(1), health: Health::Failed, at_ms: 200 });
    assert_eq!(s.members[&NodeId(1)].health_since_ms, 100);
    let r = s.apply(4, &Command::SetHealth { id: NodeId(9), health: Health::Failed, at_ms: 200 });
    assert!(matches!(r, Response::Rejected { .. }));
}

#[test]
fn kv_put_delete_and_cas() {
    let mut s = ClusterState::default();
    assert_eq!(s.apply(1, &Command::KvPut { key: "a".into(), value: "1".into() }), Response::Kv { previous: None });
    assert_eq!(
        s.apply(2, &Command::KvPut { key: "a".into(), value: "2".into() }),
        Response::Kv { previous: Some("1".into()) }
    );
    assert_eq!(s.kv["a"].mod_index, 2);
    // Stale expected value: refused, state unchanged.
    assert_eq!(
        s.apply(3, &Command::KvCas { key: "a".into(), expected: Some("1".into()), new: Some("3".into()) }),
        Response::Cas { succeeded: false, current: Some("2".into()) }
    );
    assert_eq!(s.kv["a"].value, "2");
    assert_eq!(
        s.apply(4, &Command::KvCas { key: "a".into(), expected: Some("2".into()), new: Some("3".into()) }),
        Response::Cas { succeeded: true, current: Some("3".into()) }
    );
    // Create-if-absent.
    assert_eq!(
        s.apply(5, &Command::KvCas { key: "b".into(), expected: None, new: Some("x".into()) }),
        Response::Cas { succeeded: true, current: Some("x".into()) }
    );
    assert_eq!(
        s.apply(6, &Command::KvCas { key: "b".into(), expected: None, new: Some("y".into()) }),
        Response::Cas { succeeded: false, current: Some("x".into()) }
    );
    // CAS delete.
    assert_eq!(
        s.apply(7, &Command::KvCas { key: "b".into(), expected: Some("x".into()), new: None }),
        Response::Cas { succeeded: true, current: None }
    );
    assert!(!s.kv.contains_key("b"));
    assert_eq!(s.apply(8, &Command::KvDelete { key: "a".into() }), Response::Kv { previous: Some("3".into()) });
    assert!(s.kv.is_empty());
}

#[test]
fn kv_limits_are_enforced_in_apply() {
    let mut s = ClusterState::default();
    let r = s.apply(1, &Command::KvPut { key: String::new(), value: "v".into() });
    assert!(matches!(r, Response::Rejected { .. }));
    let big = "x".repeat(MAX_VALUE_BYTES + 1);
    let r = s.apply(2, &Command::KvPut { key: "k".into(), value: big });
    assert!(matches!(r, Response::Rejected { .. }));
    assert!(s.kv.is_empty());
}

#[test]
fn mesh_addresses_are_unique() {
    let mut s = state_with(&[NodeId(1), NodeId(2)], &[]);
    s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 0 });
    s.apply(2, &Command::UpsertMember { spec: spec(NodeId(2), "n2"), at_ms: 0 });
    let ip: Ipv4Addr = "10.90.0.1".parse().unwrap();
    assert_eq!(s.apply(3, &Command::AssignMeshIp { id: NodeId(1), ip }), Response::Ok);
    let r = s.apply(4, &Command::AssignMeshIp { id: NodeId(2), ip });
    assert!(matches!(r, Response::Rejected { .. }), "{r:?}");
    assert_eq!(s.members[&NodeId(2)].mesh_ip, None);
    // Re-assigning a member its own address is fine.
    assert_eq!(s.apply(5, &Command::AssignMeshIp { id: NodeId(1), ip }), Response::Ok);
}

#[test]
fn roles_name_members_only_and_follow_membership() {
    let mut s = state_with(&[NodeId(1), NodeId(2), NodeId(3)], &[]);
    for id in 1..=3 {
        s.apply(id, &Command::UpsertMember { spec: spec(NodeId(id), &format!("n{}", id)), at_ms: 0 });
    }
    let roles = RoleAssignments {
        slurm_controller: Some(NodeId(1)),
        slurm_backup: Some(NodeId(2)),
        slurm_workers: [NodeId(1), NodeId(2), NodeId(3)].into(),
        k3s_server: Some(NodeId(3)),
        k3s_agents: [NodeId(1), NodeId(2)].into(),
    };
    assert_eq!(s.apply(4, &Command::SetRoles { roles: roles.clone() }), Response::Ok);
    let bad = RoleAssignments { slurm_controller: Some(NodeId(9)), ..roles.clone() };
    assert!(matches!(s.apply(5, &Command::SetRoles { roles: bad }), Response::Rejected { .. }));
    assert_eq!(s.roles, roles);
    // Node 2 leaves Raft: it loses every role.
    s.apply_membership([NodeId(1), NodeId(3)].into(), BTreeSet::new());
    assert_eq!(s.roles.slurm_backup, None);
    assert_eq!(s.roles.slurm_workers, [NodeId(1), NodeId(3)].into());
    assert_eq!(s.roles.k3s_agents, [NodeId(1)].into());
    assert_eq!(s.roles.slurm_controller, Some(NodeId(1)));
}

#[test]
fn secrets_are_versioned_and_hidden_from_debug() {
    let mut s = ClusterState::default();
    s.apply(1, &Command::SetSecret { name: "munge".into(), value: "c2VjcmV0".into(), at_ms: 1 });
    s.apply(2, &Command::SetSecret { name: "munge".into(), value: "b3RoZXI=".into(), at_ms: 2 });
    assert_eq!(s.secrets["munge"].version, 2);
    assert!(!format!("{s:?}").contains("b3RoZXI="), "secret value in Debug output");
    let r = s.apply(3, &Command::SetSecret { name: "x".into(), value: String::new(), at_ms: 3 });
    assert!(matches!(r, Response::Rejected { .. }));
}

#[test]
fn only_the_slurm_controller_publishes_its_state() {
    let mut s = state_with(&[NodeId(1), NodeId(2)], &[]);
    let publish = |from| Command::SetSlurmState { from, digest: "d".into(), files: 3, bytes: 100, taken_at_ms: 5 };
    assert!(matches!(s.apply(1, &publish(NodeId(1))), Response::Rejected { .. }), "no controller assigned");
    s.roles.slurm_controller = Some(NodeId(1));
    assert!(matches!(s.apply(2, &publish(NodeId(2))), Response::Rejected { .. }), "node 2 is not the controller");
    assert_eq!(s.apply(3, &publish(NodeId(1))), Response::SlurmState { version: 1 });
    assert_eq!(s.apply(4, &publish(NodeId(1))), Response::SlurmState { version: 2 });
    let c = s.slurm_state.clone().unwrap();
    assert_eq!((c.from, c.version, c.files), (NodeId(1), 2, 3));
    assert_eq!(s.without_kv().slurm_state, None, "the services loop does not see copies");
}

#[test]
fn slurm_takeover_swaps_controller_and_backup() {
    let mut s = state_with(&[NodeId(1), NodeId(2), NodeId(3)], &[]);
    s.roles.slurm_controller = Some(NodeId(1));
    s.roles.slurm_backup = Some(NodeId(2));
    assert!(matches!(s.apply(1, &Command::SlurmTakeover { id: NodeId(3) }), Response::Rejected { .. }));
    assert!(matches!(s.apply(2, &Command::SlurmTakeover { id: NodeId(1) }), Response::Rejected { .. }));
    assert_eq!(s.apply(3, &Command::SlurmTakeover { id: NodeId(2) }), Response::Ok);
    assert_eq!((s.roles.slurm_controller, s.roles.slurm_backup), (Some(NodeId(2)), Some(NodeId(1))));
    // Replayed (a retry after a lost answer): node 2 is no longer the backup.
    assert!(matches!(s.apply(4, &Command::SlurmTakeover { id: NodeId(2) }), Response::Rejected { .. }));
}

#[test]
fn without_kv_keeps_everything_but_the_kv_space() {
    let mut s = state_with(&[NodeId(1)], &[]);
    s.apply(1, &Command::UpsertMember { spec: spec(NodeId(1), "n1"), at_ms: 0 });
    s.apply(2, &Command::KvPut { key: "k".into(), value: "v".into() });
    let t = s.without_kv();
    assert!(t.kv.is_empty());
    assert_eq!(ClusterState { kv: s.kv.clone(), ..t }, s);
}

#[test]
fn apply_is_deterministic() {
    let cmds = [
        Command::InitCluster { cluster_id: "c".into(), at_ms: 1 },
        Command::KvPut { key: "k".into(), value: "v".into() },
        Command::KvCas { key: "k".into(), expected: Some("v".into()), new: Some("w".into()) },
    ];
    let mut a = ClusterState::default();
    let mut b = ClusterState::default();
    for (i, c) in cmds.iter().enumerate() {
        assert_eq!(a.apply(i as u64, c), b.apply(i as u64, c));
    }
    assert_eq!(a, b);
}

#[test]
fn only_kv_commands_are_kv_only() {
    let put = Command::KvPut { key: "k".into(), value: "v".into() };
    let req = |cmd: Command| Command::Request { id: RequestId { origin: 1, seq: 1 }, at_ms: 0, cmd: Box::new(cmd) };
    let table = [
        (put.clone(), true),
        (Command::KvDelete { key: "k".into() }, true),
        (Command::KvCas { key: "k".into(), expected: None, new: Some("v".into()) }, true),
        (req(put.clone()), true),
        (req(Command::SetSecret { name: "s".into(), value: "v".into(), at_ms: 0 }), false),
        (Command::InitCluster { cluster_id: "c".into(), at_ms: 0 }, false),
        (Command::SetRoles { roles: RoleAssignments::default() }, false),
        (Command::SlurmTakeover { id: NodeId(1) }, false),
    ];
    for (cmd, kv_only) in table {
        assert_eq!(cmd.kv_only(), kv_only, "{cmd:?}");
    }
}
