//! The durable Raft log, vote and commit index, in a redb database. Every write transaction is
//! committed with redb's default durability (fsync) before openraft is told the I/O completed.
//! The commit index is a hint (for re-applying entries after a restart) and costs no transaction
//! of its own: it is kept in memory and written with the next append.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, RaftLogId, StorageIOError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::core::state::NodeId;

use super::{Entry, LogId, StorageError, TypeConfig, Vote};

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// Cheap to clone: all clones share one database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    /// The last committed log id openraft saved: for status output, and what the next append
    /// writes to disk.
    committed: Arc<Mutex<Option<LogId>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Msg(String);

fn io_err<E: std::fmt::Display>(e: E) -> StorageIOError<NodeId> {
    StorageIOError::write(&Msg(e.to_string()))
}

fn read_err<E: std::fmt::Display>(e: E) -> StorageIOError<NodeId> {
    StorageIOError::read(&Msg(e.to_string()))
}

impl LogStore {
    /// Opens (or creates) the log database at `path`.
    pub fn open(path: &Path) -> Result<LogStore, redb::Error> {
        let db = Database::create(path)?;
        // Create the tables so that read transactions find them.
        let txn = db.begin_write()?;
        txn.open_table(LOGS)?;
        txn.open_table(META)?;
        txn.commit()?;
        let store = LogStore { db: Arc::new(db), committed: Arc::new(Mutex::new(None)) };
        if let Ok(Some(Some(c))) = store.get_meta::<Option<LogId>>(KEY_COMMITTED) {
            *store.committed.lock().expect("committed lock") = Some(c);
        }
        Ok(store)
    }

    /// The last committed log index this node knows of.
    pub fn committed_index(&self) -> Option<u64> {
        self.committed.lock().expect("committed lock").map(|c| c.index)
    }

    /// The id of the entry at `index`, if the log holds it.
    pub fn log_id_at(&self, index: u64) -> Result<Option<LogId>, String> {
        let err = |e: &dyn std::fmt::Display| format!("cannot read log entry {index}: {e}");
        let txn = self.db.begin_read().map_err(|e| err(&e))?;
        let table = txn.open_table(LOGS).map_err(|e| err(&e))?;
        let Some(v) = table.get(index).map_err(|e| err(&e))? else { return Ok(None) };
        serde_json::from_slice::<Entry>(v.value()).map(|e| Some(e.log_id)).map_err(|e| err(&e))
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageIOError<NodeId>> {
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(META).map_err(read_err)?;
        match table.get(key).map_err(read_err)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), StorageIOError<NodeId>> {
        let bytes = serde_json::to_vec(value).map_err(io_err)?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(META)?.insert(key, bytes.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(io_err)?
        .map_err(io_err)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let txn = self.db.begin_read().map_err(|e| StorageIOError::read_logs(&Msg(e.to_string())))?;
        let table = txn.open_table(LOGS).map_err(|e| StorageIOError::read_logs(&Msg(e.to_string())))?;
        let mut out = Vec::new();
        for item in table.range(range).map_err(|e| StorageIOError::read_logs(&Msg(e.to_string())))? {
            let (_, v) = item.map_err(|e| StorageIOError::read_logs(&Msg(e.to_string())))?;
            out.push(serde_json::from_slice(v.value()).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.get_meta(KEY_PURGED)?;
        let txn = self.db.begin_read().map_err(read_err)?;
        let table = txn.open_table(LOGS).map_err(read_err)?;
        let last = match table.last().map_err(read_err)? {
            Some((_, v)) => Some(serde_json::from_slice::<Entry>(v.value()).map_err(read_err)?.log_id),
            None => None,
        };
        Ok(LogState { last_log_id: last.or(last_purged_log_id), last_purged_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote).await.map_err(|e| StorageIOError::write_vote(&Msg(e.to_string())).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE).map_err(|e| StorageIOError::read_vote(&Msg(e.to_string())).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // openraft awaits this between a commit and its apply, on every write: a transaction
        // here would sit on the path of every client write. The commit index is only a hint for
        // re-applying entries after a restart (an older one re-applies fewer, and the leader's
        // commit index brings the rest), so the next append writes it.
        *self.committed.lock().expect("committed lock") = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(*self.committed.lock().expect("committed lock"))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.get_log_id().index, serde_json::to_vec(&e)?)))
            .collect::<Result<Vec<_>, serde_json::Error>>()
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let committed = *self.committed.lock().expect("committed lock");
        let committed = serde_json::to_vec(&committed).map_err(|e| StorageIOError::write_logs(&e))?;
        let db = self.db.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut table = txn.open_table(LOGS)?;
                for (index, bytes) in &rows {
                    table.insert(*index, bytes.as_slice())?;
                }
            }
            txn.open_table(META)?.insert(KEY_COMMITTED, committed.as_slice())?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&Msg(e.to_string())))?;
        match result {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let msg = e.to_string();
                callback.log_io_completed(Err(std::io::Error::other(msg.clone())));
                Err(StorageIOError::write_logs(&Msg(msg)).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(LOGS)?.retain_in(log_id.index.., |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&Msg(e.to_string())))?
        .map_err(|e| StorageIOError::write_logs(&Msg(e.to_string())).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let db = self.db.clone();
        let purged = serde_json::to_vec(&log_id).map_err(|e| StorageIOError::write_logs(&e))?;
        tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            txn.open_table(META)?.insert(KEY_PURGED, purged.as_slice())?;
            txn.open_table(LOGS)?.retain_in(..=log_id.index, |_, _| false)?;
            txn.commit()?;
            Ok(())
        })
        .await
        .map_err(|e| StorageIOError::write_logs(&Msg(e.to_string())))?
        .map_err(|e| StorageIOError::write_logs(&Msg(e.to_string())).into())
    }
}
