//! Raft log, vote and state machine on local disk, in one `redb` database.
//!
//! Every value is stored sealed: a CRC32C of its JSON encoding, then the JSON. redb keeps
//! its own file consistent across crashes, but does not checksum every page; the seal
//! makes a flipped bit in a log entry, the vote or the state machine an error that names
//! the file, never a silently different configuration. Opening the store reads and
//! checks everything once, so a damaged file is refused at start, not at some later read.
//!
//! The state machine is persisted on every apply (cluster configuration is small), so a
//! snapshot is just that state at its log id; openraft purges the log behind it.

use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader,
    RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::state::{Applied, ClusterState, Command, NodeId, Refused};

openraft::declare_raft_types!(
    /// Bulwark's Raft types: commands in, results out, nodes addressed by their control
    /// address.
    pub TypeConfig:
        D = Command,
        R = Result<Applied, Refused>,
);

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const STATE_MACHINE: &str = "state_machine";
const SNAPSHOT: &str = "snapshot";

/// Why the store could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb refused the file (truncated, not a database, locked by another process...).
    #[error("cannot open the Raft store {path}: {source}. If the file is damaged, move it away and rejoin this node to the cluster (`bulwark node remove` on a healthy node, then `bulwark cluster join`)")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<redb::DatabaseError>,
    },
    /// A value failed its checksum or did not decode.
    #[error("the Raft store {path} is corrupt: {what}. The node refuses to use it; move the file away and rejoin this node to the cluster (`bulwark node remove` on a healthy node, then `bulwark cluster join`)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Which value.
        what: String,
    },
    /// Reading or writing failed.
    #[error("Raft store {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: Box<redb::Error>,
    },
}

fn seal<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own types to JSON cannot fail (string keys, no foreign impls).
    let json = serde_json::to_vec(v).unwrap_or_default();
    let mut out = Vec::with_capacity(json.len() + 4);
    out.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

fn unseal<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let (crc, json) = bytes.split_at_checked(4)?;
    let crc = u32::from_le_bytes(crc.try_into().ok()?);
    if crc32c::crc32c(json) != crc {
        return None;
    }
    serde_json::from_slice(json).ok()
}

/// The persisted state machine: the cluster state and where in the log it stands.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct StateMachineData {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
    state: ClusterState,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// Writes `data` to `path` as a new file only its owner can read (0600), atomically: a
/// uniquely named temporary file, synced, renamed over `path`.
pub fn write_private_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The database; shared by the log store and the state machine.
#[derive(Debug)]
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the store at `path` and checks every value in it.
    pub fn open(path: &Path) -> Result<Arc<Store>, StoreError> {
        // redb asserts (panics) on some truncated files instead of returning an error;
        // either way the file is refused with the same advice.
        let opened = std::panic::catch_unwind(|| Database::create(path)).map_err(|_| {
            StoreError::Corrupt {
                path: path.to_path_buf(),
                what: "the file is truncated or its layout is damaged".into(),
            }
        })?;
        let db = opened.map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        let store = Arc::new(Store {
            db,
            path: path.to_path_buf(),
        });
        store.verify()?;
        Ok(store)
    }

    fn io(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what: format!("{} fails its checksum", what.into()),
        }
    }

    /// Reads every value once: checksums and decoding.
    fn verify(&self) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            // Create the tables on first use so readers never miss them.
            let log = tx.open_table(LOG).map_err(|e| self.io(e))?;
            let meta = tx.open_table(META).map_err(|e| self.io(e))?;
            let mut prev: Option<u64> = None;
            for item in log.iter().map_err(|e| self.io(e))? {
                let (k, v) = item.map_err(|e| self.io(e))?;
                let index = k.value();
                let entry: Entry<TypeConfig> =
                    unseal(v.value()).ok_or_else(|| self.corrupt(format!("log entry {index}")))?;
                if entry.log_id.index != index || prev.is_some_and(|p| p + 1 != index) {
                    return Err(self.corrupt(format!("log entry {index} (out of sequence)")));
                }
                prev = Some(index);
            }
            for item in meta.iter().map_err(|e| self.io(e))? {
                let (k, v) = item.map_err(|e| self.io(e))?;
                let ok = match k.value() {
                    VOTE => unseal::<Vote<NodeId>>(v.value()).is_some(),
                    COMMITTED | PURGED => unseal::<LogId<NodeId>>(v.value()).is_some(),
                    STATE_MACHINE => unseal::<StateMachineData>(v.value()).is_some(),
                    SNAPSHOT => unseal::<StoredSnapshot>(v.value()).is_some(),
                    _ => true,
                };
                if !ok {
                    return Err(self.corrupt(k.value().to_string()));
                }
            }
        }
        tx.commit().map_err(|e| self.io(e))?;
        Ok(())
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(META).map_err(|e| self.io(e))?;
        match t.get(key).map_err(|e| self.io(e))? {
            None => Ok(None),
            Some(v) => unseal(v.value()).map(Some).ok_or_else(|| self.corrupt(key)),
        }
    }

    fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = tx.open_table(META).map_err(|e| self.io(e))?;
            t.insert(key, seal(v).as_slice()).map_err(|e| self.io(e))?;
        }
        tx.commit().map_err(|e| self.io(e))
    }

    fn read_entries(
        &self,
        range: impl RangeBounds<u64>,
    ) -> Result<Vec<Entry<TypeConfig>>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(LOG).map_err(|e| self.io(e))?;
        let mut out = Vec::new();
        for item in t.range(range).map_err(|e| self.io(e))? {
            let (k, v) = item.map_err(|e| self.io(e))?;
            out.push(
                unseal(v.value())
                    .ok_or_else(|| self.corrupt(format!("log entry {}", k.value())))?,
            );
        }
        Ok(out)
    }

    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(LOG).map_err(|e| self.io(e))?;
        let last = match t.last().map_err(|e| self.io(e))? {
            None => None,
            Some((k, v)) => {
                let e: Entry<TypeConfig> = unseal(v.value())
                    .ok_or_else(|| self.corrupt(format!("log entry {}", k.value())))?;
                Some(e.log_id)
            }
        };
        Ok(last)
    }

    fn append(&self, entries: &[Entry<TypeConfig>]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = tx.open_table(LOG).map_err(|e| self.io(e))?;
            for e in entries {
                t.insert(e.log_id.index, seal(e).as_slice())
                    .map_err(|e| self.io(e))?;
            }
        }
        tx.commit().map_err(|e| self.io(e))
    }

    /// Deletes log entries in `range`; with `purged`, records it as the last purged id in
    /// the same transaction.
    fn delete_entries(
        &self,
        range: impl RangeBounds<u64>,
        purged: Option<&LogId<NodeId>>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.io(e))?;
        {
            let mut t = tx.open_table(LOG).map_err(|e| self.io(e))?;
            t.retain_in(range, |_, _| false).map_err(|e| self.io(e))?;
            if let Some(p) = purged {
                let mut m = tx.open_table(META).map_err(|e| self.io(e))?;
                m.insert(PURGED, seal(p).as_slice())
                    .map_err(|e| self.io(e))?;
            }
        }
        tx.commit().map_err(|e| self.io(e))
    }

    /// Number of entries in the log (for status: shows compaction at work).
    pub fn log_len(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.io(e))?;
        let t = tx.open_table(LOG).map_err(|e| self.io(e))?;
        t.len().map_err(|e| self.io(e))
    }
}

/// Runs a blocking store operation off the async runtime's threads.
async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || f(&s)).await {
        Ok(r) => r,
        Err(e) => Err(StoreError::Io {
            path: store.path.clone(),
            source: Box::new(redb::Error::Io(std::io::Error::other(e.to_string()))),
        }),
    }
}

fn read_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::read(AnyError::new(&e)).into()
}

fn write_err(e: StoreError) -> StorageError<NodeId> {
    StorageIOError::write(AnyError::new(&e)).into()
}

/// openraft's log storage over [`Store`].
#[derive(Clone, Debug)]
pub struct LogStore {
    store: Arc<Store>,
}

impl LogStore {
    /// The log store of `store`.
    pub fn new(store: Arc<Store>) -> Self {
        LogStore { store }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + std::fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        blocking(&self.store, move |s| s.read_entries((start, end)))
            .await
            .map_err(read_err)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        blocking(&self.store, |s| {
            let purged: Option<LogId<NodeId>> = s.get_meta(PURGED)?;
            let last = s.last_entry_id()?.or(purged);
            Ok(LogState {
                last_purged_log_id: purged,
                last_log_id: last,
            })
        })
        .await
        .map_err(read_err)
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        blocking(&self.store, move |s| s.put_meta(VOTE, &vote))
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        blocking(&self.store, |s| s.get_meta(VOTE))
            .await
            .map_err(|e| StorageIOError::read_vote(AnyError::new(&e)).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        blocking(&self.store, move |s| s.put_meta(COMMITTED, &committed))
            .await
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        blocking(&self.store, |s| {
            Ok(s.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
        })
        .await
        .map_err(read_err)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        // redb commits durably (fsync) before returning, so the entries are both readable
        // and persisted when the blocking call ends.
        let r = blocking(&self.store, move |s| s.append(&entries)).await;
        match r {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        blocking(&self.store, move |s| s.delete_entries(log_id.index.., None))
            .await
            .map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        blocking(&self.store, move |s| {
            s.delete_entries(..=log_id.index, Some(&log_id))
        })
        .await
        .map_err(write_err)
    }
}

/// openraft's state machine over [`Store`]; publishes every applied state on a watch
/// channel so the node can reconcile what it serves.
pub struct StateMachineStore {
    store: Arc<Store>,
    sm: StateMachineData,
    snapshot: Option<StoredSnapshot>,
    published: watch::Sender<Arc<ClusterState>>,
}

impl StateMachineStore {
    /// Loads the state machine and the last snapshot from `store`: the newer of the two
    /// (applying does not persist the state machine; see [`Self::apply`]). openraft
    /// then applies the committed entries that follow.
    pub async fn load(
        store: Arc<Store>,
    ) -> Result<(StateMachineStore, watch::Receiver<Arc<ClusterState>>), StoreError> {
        let (sm, snapshot) = blocking(&store, |s| {
            Ok((
                s.get_meta::<StateMachineData>(STATE_MACHINE)?,
                s.get_meta::<StoredSnapshot>(SNAPSHOT)?,
            ))
        })
        .await?;
        let saved_up_to = sm.as_ref().and_then(|sm| sm.last_applied);
        let sm = match &snapshot {
            Some(snap) if snap.meta.last_log_id > saved_up_to => StateMachineData {
                last_applied: snap.meta.last_log_id,
                membership: snap.meta.last_membership.clone(),
                state: serde_json::from_slice(&snap.data)
                    .map_err(|_| store.corrupt("the snapshot's cluster state"))?,
            },
            _ => sm.unwrap_or_else(|| StateMachineData {
                state: ClusterState::new(),
                ..Default::default()
            }),
        };
        let (published, rx) = watch::channel(Arc::new(sm.state.clone()));
        Ok((
            StateMachineStore {
                store,
                sm,
                snapshot,
                published,
            },
            rx,
        ))
    }
}

/// Builds a snapshot from a copy of the state machine.
pub struct SnapshotBuilder {
    store: Arc<Store>,
    sm: StateMachineData,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = serde_json::to_vec(&self.sm.state)
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        let snapshot_id = match &self.sm.last_applied {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".to_string(),
        };
        let meta = SnapshotMeta {
            last_log_id: self.sm.last_applied,
            last_membership: self.sm.membership.clone(),
            snapshot_id,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        // The state machine saved with it, so that an earlier version, which loads only
        // the state machine, finds it no older than the entries kept in the log.
        let sm = self.sm.clone();
        blocking(&self.store, move |s| {
            s.put_meta(SNAPSHOT, &stored)?;
            s.put_meta(STATE_MACHINE, &sm)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        Ok((self.sm.last_applied, self.sm.membership.clone()))
    }

    async fn apply<I>(
        &mut self,
        entries: I,
    ) -> Result<Vec<Result<Applied, Refused>>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        for entry in entries {
            self.sm.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => out.push(Ok(Applied::Done)),
                EntryPayload::Normal(cmd) => out.push(self.sm.state.apply(&cmd)),
                EntryPayload::Membership(m) => {
                    self.sm.membership = StoredMembership::new(Some(entry.log_id), m);
                    out.push(Ok(Applied::Done));
                }
            }
        }
        // Not persisted here: the log holds every committed entry, and a restart loads
        // the last snapshot and applies the entries after it. Saving the whole state
        // per apply (a cluster with 256 volumes: its serialization and an fsync each
        // time) let applying fall behind committing during a failover, and lease
        // grants, which wait for the applied state, took up to 500 ms (issue 19).
        self.published.send_replace(Arc::new(self.sm.state.clone()));
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            sm: self.sm.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let state: ClusterState = serde_json::from_slice(&data).map_err(|e| {
            StorageIOError::read_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        self.sm = StateMachineData {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            state,
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        let sm = self.sm.clone();
        blocking(&self.store, move |s| {
            s.put_meta(SNAPSHOT, &stored)?;
            s.put_meta(STATE_MACHINE, &sm)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e)))?;
        self.snapshot = None;
        self.published.send_replace(Arc::new(self.sm.state.clone()));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        // The builder writes snapshots straight to the store; read the newest back.
        let stored = blocking(&self.store, |s| s.get_meta::<StoredSnapshot>(SNAPSHOT))
            .await
            .map_err(read_err)?;
        self.snapshot = stored.clone();
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, EntryPayload};

    fn entry(index: u64, marker: &str) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::CreateTarget {
                iqn: format!("iqn.2026-11.io.bulwark:{marker}-{index}"),
                alias: None,
            }),
        }
    }

    fn write_log(path: &Path, n: u64) {
        let store = Store::open(path).unwrap();
        let entries: Vec<_> = (1..=n).map(|i| entry(i, "marker")).collect();
        store.append(&entries).unwrap();
        assert_eq!(store.read_entries(1..=n).unwrap(), entries);
    }

    #[test]
    fn a_flipped_bit_in_a_log_entry_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        write_log(&path, 20);
        let mut bytes = std::fs::read(&path).unwrap();
        let needle = b"marker-7\"";
        let at = bytes
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("entry 7 is in the file");
        bytes[at] ^= 0x20; // 'm' -> 'M': still valid JSON, wrong checksum
        std::fs::write(&path, &bytes).unwrap();
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("is corrupt: log entry 7 fails its checksum"),
            "{err}"
        );
        assert!(err.contains("rejoin"), "says what to do: {err}");
    }

    #[test]
    fn a_truncated_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raft.redb");
        write_log(&path, 200);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len / 2).unwrap();
        drop(f);
        let err = Store::open(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()),
            "names the file: {err}"
        );
    }

    #[test]
    fn values_are_sealed() {
        let v = seal(&42u32);
        assert_eq!(unseal::<u32>(&v), Some(42));
        let mut bad = v.clone();
        bad[5] ^= 1;
        assert_eq!(unseal::<u32>(&bad), None);
        assert_eq!(unseal::<u32>(&v[..3]), None);
    }
}
