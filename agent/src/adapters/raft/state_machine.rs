//! The Raft state machine: the [`ClusterState`] in memory, with snapshots that hold all of it
//! written durably to disk. After a restart the state is loaded from the last snapshot and openraft
//! re-applies the committed log entries after it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, StorageIOError};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::adapters::files::{Staged, stage};
use crate::core::state::{ClusterState, Response};

pub const SNAPSHOT_FILE: &str = "snapshot.json";

/// Everything the state machine holds; a snapshot is this, serialized.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct SmData {
    pub last_applied: Option<LogId>,
    pub last_membership: StoredMembership,
    pub state: ClusterState,
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    /// JSON of [`SmData`].
    data: String,
}

/// Decodes the snapshot file as [`StateMachineStore::open`] reads it: the state and the snapshot
/// it came from. The error says what is wrong.
pub fn decode_snapshot_file(bytes: &[u8]) -> Result<(SmData, Snapshot), String> {
    let stored: StoredSnapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let data: SmData = serde_json::from_str(&stored.data).map_err(|e| e.to_string())?;
    if data.last_applied != stored.meta.last_log_id {
        return Err("snapshot metadata does not match its data".into());
    }
    Ok((data, Snapshot { meta: stored.meta, snapshot: Box::new(stored.data.into_bytes()) }))
}

/// The snapshot file for `meta` and `data` (the JSON of [`SmData`]), as the store writes it.
pub fn encode_snapshot_file(meta: &SnapshotMeta, data: String) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&StoredSnapshot { meta: meta.clone(), data })
}

struct Shared {
    data: RwLock<SmData>,
    /// Bumped after every apply or snapshot install that may have changed more than the KV store
    /// (see [`crate::core::state::Command::kv_only`]), so that loops can wait for the changes
    /// they act on: a KV write wakes none of them.
    changed: watch::Sender<u64>,
}

/// Read access to the applied state, for the API and the runtime loops (local, possibly stale).
#[derive(Clone)]
pub struct StateHandle {
    shared: Arc<Shared>,
}

impl StateHandle {
    pub fn read<T>(&self, f: impl FnOnce(&SmData) -> T) -> T {
        f(&self.shared.data.read().expect("state lock"))
    }

    /// A receiver that changes whenever the applied state changes in more than its KV store.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.changed.subscribe()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot read snapshot {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(
        "snapshot {path} is corrupt ({message}); move it away together with raft.redb to let this node fetch the state from the cluster again"
    )]
    Corrupt { path: PathBuf, message: String },
}

pub struct StateMachineStore {
    shared: Arc<Shared>,
    dir: PathBuf,
    /// The newest snapshot, which is also the one on disk. openraft builds a snapshot (in a task
    /// of its own) while it may install one from the leader: both write the snapshot file. Each
    /// writes its file under a name of its own first, then takes this lock to put it in place,
    /// and a built snapshot that is not newer than the current one is dropped (an older snapshot
    /// never replaces a newer one). The lock is never held while a file is written, so
    /// `get_current_snapshot` (which the state machine worker calls) does not wait for a write.
    current: Arc<tokio::sync::Mutex<Option<Snapshot>>>,
    counter: Arc<AtomicU64>,
}

impl StateMachineStore {
    /// Opens the state machine whose snapshot lives in `dir`.
    pub fn open(dir: &Path) -> Result<StateMachineStore, OpenError> {
        let path = dir.join(SNAPSHOT_FILE);
        let corrupt = |message: String| OpenError::Corrupt { path: path.clone(), message };
        let (data, current) = match std::fs::read(&path) {
            Ok(bytes) => {
                let (data, snap) = decode_snapshot_file(&bytes).map_err(corrupt)?;
                (data, Some(snap))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (SmData::default(), None),
            Err(source) => return Err(OpenError::Read { path, source }),
        };
        let (changed, _) = watch::channel(0);
        Ok(StateMachineStore {
            shared: Arc::new(Shared { data: RwLock::new(data), changed }),
            dir: dir.to_owned(),
            current: Arc::new(tokio::sync::Mutex::new(current)),
            counter: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn handle(&self) -> StateHandle {
        StateHandle { shared: self.shared.clone() }
    }

    fn builder(&self) -> StateMachineStore {
        StateMachineStore {
            shared: self.shared.clone(),
            dir: self.dir.clone(),
            current: self.current.clone(),
            counter: self.counter.clone(),
        }
    }

    /// Writes the snapshot file beside its place, synced (the slow part, done without the lock).
    async fn stage(&self, meta: &SnapshotMeta, data: &[u8]) -> Result<Staged, StorageError> {
        let text =
            String::from_utf8(data.to_vec()).map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let bytes =
            encode_snapshot_file(meta, text).map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        let path = self.dir.join(SNAPSHOT_FILE);
        tokio::task::spawn_blocking(move || stage(&path, &bytes, 0o600))
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }

    /// Puts a staged snapshot file in place (a rename and a directory sync).
    async fn commit(meta: &SnapshotMeta, staged: Staged) -> Result<(), StorageError> {
        tokio::task::spawn_blocking(move || staged.commit())
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e).into())
    }
}

impl StateMachineStore {
    /// The first half of building a snapshot: the applied state, serialized, with its metadata.
    pub fn capture(&self) -> Result<(SnapshotMeta, Vec<u8>), StorageError> {
        let (bytes, last_applied, last_membership) = {
            let d = self.shared.data.read().expect("state lock");
            let bytes = serde_json::to_vec(&*d).map_err(|e| StorageIOError::read_state_machine(&e))?;
            (bytes, d.last_applied, d.last_membership.clone())
        };
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let snapshot_id = match last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, n),
            None => format!("none-{n}"),
        };
        Ok((SnapshotMeta { last_log_id: last_applied, last_membership, snapshot_id }, bytes))
    }

    /// The second half: writes the captured snapshot unless a newer one (installed from the
    /// leader meanwhile) is already there. Returns the snapshot that is current afterwards.
    pub async fn store_built(&self, meta: SnapshotMeta, bytes: Vec<u8>) -> Result<Snapshot, StorageError> {
        let staged = self.stage(&meta, &bytes).await?;
        let mut current = self.current.lock().await;
        if let Some(c) = current.as_ref()
            && c.meta.last_log_id >= meta.last_log_id
        {
            // Dropping the staged file removes it.
            return Ok(c.clone());
        }
        Self::commit(&meta, staged).await?;
        let snap = Snapshot { meta, snapshot: Box::new(bytes) };
        *current = Some(snap.clone());
        Ok(snap)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let (meta, bytes) = self.capture()?;
        self.store_built(meta, bytes).await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let d = self.shared.data.read().expect("state lock");
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut beyond_kv = false;
        {
            let mut d = self.shared.data.write().expect("state lock");
            for entry in entries {
                d.last_applied = Some(entry.log_id);
                beyond_kv |= match &entry.payload {
                    EntryPayload::Blank => false,
                    EntryPayload::Normal(cmd) => !cmd.kv_only(),
                    EntryPayload::Membership(_) => true,
                };
                let resp = match &entry.payload {
                    EntryPayload::Blank => Response::Empty,
                    EntryPayload::Normal(cmd) => d.state.apply(entry.log_id.index, cmd),
                    EntryPayload::Membership(m) => {
                        d.last_membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        d.state.apply_membership(m.voter_ids().collect(), m.learner_ids().collect());
                        Response::Empty
                    }
                };
                out.push(resp);
            }
        }
        if beyond_kv {
            self.shared.changed.send_modify(|v| *v += 1);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.builder()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Vec<u8>>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta, snapshot: Box<Vec<u8>>) -> Result<(), StorageError> {
        let data: SmData =
            serde_json::from_slice(&snapshot).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        if data.last_applied != meta.last_log_id {
            return Err(StorageIOError::read_snapshot(
                Some(meta.signature()),
                &std::io::Error::other("snapshot data does not match its metadata"),
            )
            .into());
        }
        let staged = self.stage(meta, &snapshot).await?;
        let mut current = self.current.lock().await;
        Self::commit(meta, staged).await?;
        *self.shared.data.write().expect("state lock") = data;
        *current = Some(Snapshot { meta: meta.clone(), snapshot });
        drop(current);
        self.shared.changed.send_modify(|v| *v += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.current.lock().await.clone())
    }
}
