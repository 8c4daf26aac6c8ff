//! openraft's storage test suite against the real redb log store and the real state machine.

use clusteros::adapters::raft::log_store::LogStore;
use clusteros::adapters::raft::state_machine::StateMachineStore;
use clusteros::adapters::raft::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = LogStore::open(&dir.path().join("raft.redb")).expect("open log store");
        let sm = StateMachineStore::open(dir.path()).expect("open state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

/// The state machine comes back from its snapshot after a restart, and the log store keeps the
/// vote, the log and the purge point.
#[tokio::test]
async fn state_survives_reopen() {
    use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Vote};

    use clusteros::adapters::raft::Entry;
    use clusteros::core::state::{Command, NodeId};

    let dir = tempfile::tempdir().unwrap();
    let log_id = |i| LogId::new(CommittedLeaderId::new(1, NodeId(1)), i);
    {
        let mut log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
        log.save_vote(&Vote::new(1, NodeId(1))).await.unwrap();
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        let entries: Vec<Entry> = (1..=3)
            .map(|i| Entry {
                log_id: log_id(i),
                payload: EntryPayload::Normal(Command::KvPut { key: format!("k{i}"), value: "v".into() }),
            })
            .collect();
        sm.apply(entries).await.unwrap();
        let mut b = sm.get_snapshot_builder().await;
        b.build_snapshot().await.unwrap();
        log.purge(log_id(2)).await.unwrap();
        // The commit index is written with the next append.
        log.save_committed(Some(log_id(3))).await.unwrap();
        let blank = Entry { log_id: log_id(4), payload: EntryPayload::Blank };
        openraft::storage::RaftLogStorageExt::blocking_append(&mut log, [blank]).await.unwrap();
    }
    let mut log = LogStore::open(&dir.path().join("raft.redb")).unwrap();
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(3)));
    assert_eq!(log.committed_index(), Some(3));
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, NodeId(1))));
    assert_eq!(log.get_log_state().await.unwrap().last_purged_log_id, Some(log_id(2)));
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(3)));
    assert_eq!(sm.handle().read(|d| d.state.kv.len()), 3);
}

/// A corrupt snapshot file is reported with what to do, not silently replaced.
#[test]
fn corrupt_snapshot_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("snapshot.json"), b"{garbage").unwrap();
    let e = StateMachineStore::open(dir.path()).err().expect("corrupt snapshot refused");
    assert!(e.to_string().contains("corrupt") && e.to_string().contains("move it away"), "{e}");
    assert_eq!(std::fs::read(dir.path().join("snapshot.json")).unwrap(), b"{garbage");
}

/// openraft builds a snapshot while it may install a newer one from the leader. A build that
/// captured the state before the install must not write its older snapshot over the installed
/// one, neither on disk nor as the current snapshot.
#[tokio::test]
async fn a_snapshot_built_before_an_install_does_not_replace_it() {
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use clusteros::adapters::raft::Entry;
    use clusteros::adapters::raft::state_machine::SmData;
    use clusteros::core::state::{Command, NodeId};

    let dir = tempfile::tempdir().unwrap();
    let log_id = |i| LogId::new(CommittedLeaderId::new(1, NodeId(1)), i);
    let put = |i: u64| Entry {
        log_id: log_id(i),
        payload: EntryPayload::Normal(Command::KvPut { key: format!("k{i}"), value: "v".into() }),
    };
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    sm.apply([put(1)]).await.unwrap();
    // The build captures the state at index 1 ...
    let (old_meta, old_bytes) = sm.capture().unwrap();
    // ... the leader's snapshot at index 5 is installed meanwhile ...
    let mut newer = SmData { last_applied: Some(log_id(5)), ..Default::default() };
    for i in 1..=5 {
        newer.state.apply(i, &Command::KvPut { key: format!("k{i}"), value: "v".into() });
    }
    let meta = clusteros::adapters::raft::SnapshotMeta {
        last_log_id: Some(log_id(5)),
        last_membership: Default::default(),
        snapshot_id: "leader-5".into(),
    };
    sm.install_snapshot(&meta, Box::new(serde_json::to_vec(&newer).unwrap())).await.unwrap();
    // ... and then the build finishes.
    let built = sm.store_built(old_meta, old_bytes).await.unwrap();
    assert_eq!(built.meta.last_log_id, Some(log_id(5)), "the newer snapshot stays current");
    let current = sm.get_current_snapshot().await.unwrap().unwrap();
    assert_eq!(current.meta.snapshot_id, "leader-5");
    drop(sm);
    let sm = StateMachineStore::open(dir.path()).unwrap();
    assert_eq!(
        sm.handle().read(|d| (d.last_applied, d.state.kv.len())),
        (Some(log_id(5)), 5),
        "the file on disk is the newer one"
    );
}

/// The node's loops wait on the state's change signal: a KV write (alone or under a request id)
/// and a blank entry leave it alone; a member change, a membership entry and a snapshot install
/// bump it.
#[tokio::test]
async fn only_changes_beyond_the_kv_store_wake_the_loops() {
    use std::collections::BTreeSet;

    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, EntryPayload, LogId, Membership};

    use clusteros::adapters::raft::Entry;
    use clusteros::core::state::{Command, NodeId, RequestId};

    let dir = tempfile::tempdir().unwrap();
    let log_id = |i| LogId::new(CommittedLeaderId::new(1, NodeId(1)), i);
    let entry = |i, payload| Entry { log_id: log_id(i), payload };
    let put = Command::KvPut { key: "k".into(), value: "v".into() };
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let mut rx = sm.handle().subscribe();
    rx.mark_unchanged();
    sm.apply([
        entry(1, EntryPayload::Blank),
        entry(2, EntryPayload::Normal(put.clone())),
        entry(
            3,
            EntryPayload::Normal(Command::Request {
                id: RequestId { origin: 1, seq: 1 },
                at_ms: 0,
                cmd: Box::new(put),
            }),
        ),
    ])
    .await
    .unwrap();
    assert!(!rx.has_changed().unwrap(), "KV writes and a blank entry woke the loops");
    assert_eq!(sm.handle().read(|d| d.last_applied), Some(log_id(3)), "yet they were applied");

    let init = Command::InitCluster { cluster_id: "c".into(), at_ms: 1 };
    sm.apply([entry(4, EntryPayload::Normal(init))]).await.unwrap();
    assert!(rx.has_changed().unwrap(), "a change of the cluster's record must wake the loops");
    rx.mark_unchanged();

    let membership = Membership::new(vec![BTreeSet::from([NodeId(1)])], None);
    sm.apply([entry(5, EntryPayload::Membership(membership))]).await.unwrap();
    assert!(rx.has_changed().unwrap(), "a membership entry must wake the loops");
}
