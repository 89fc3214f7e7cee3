//! The store behind the API server: one trait, SQLite and etcd implementations.
//!
//! A store maps string keys to opaque byte values. Every write (create, update, delete) gets
//! the next value of ONE global revision counter, shared by all keys; that revision is what the
//! API server hands out as `resourceVersion`. Stores keep history so that a list can be served
//! as of a past revision (paginated lists stay consistent across pages) and a watch can resume
//! from a past revision. `compact` drops history; asking for a revision older than the
//! compacted one fails with [`StoreError::Compacted`] (HTTP 410 Gone).
//!
//! The revision of an empty store is 1 (as in etcd), so the first write gets revision 2 and a
//! revision handed to a client is never 0, which Kubernetes reserves for "any version".
//!
//! Implementations:
//! - [`memory::MemoryStore`]: in process, the reference model; for unit tests.
//! - [`sqlite::SqliteStore`]: embedded, one file, the default.
//! - [`etcd::EtcdStore`]: etcd v3, for several API servers sharing one store.

pub mod compactor;
pub mod etcd;
pub mod memory;
pub mod sqlite;
pub mod testing;
mod watch;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

/// A point in the store's history. Strictly increasing with every write, across all keys.
pub type Revision = i64;

/// The revision of a store that has never been written.
pub const INITIAL_REVISION: Revision = 1;

/// One key and its value as of some revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// Revision of the write that created the key (stays the same across updates).
    pub create_revision: Revision,
    /// Revision of the last write to the key; the object's `resourceVersion`.
    pub mod_revision: Revision,
}

/// A change seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// A create (`prev` is `None`) or an update (`prev` is the value it replaced).
    Put {
        kv: KeyValue,
        prev: Option<KeyValue>,
    },
    /// A delete; `prev` is the last value the key had, `revision` the revision of the delete.
    Delete { prev: KeyValue, revision: Revision },
}

impl WatchEvent {
    /// The revision of the write that caused this event.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put { kv, .. } => kv.mod_revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }

    /// The key this event is about.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put { kv, .. } => &kv.key,
            WatchEvent::Delete { prev, .. } => &prev.key,
        }
    }
}

/// How to list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// List the keys as they were at this revision; `None` lists the current state.
    pub revision: Option<Revision>,
    /// Only keys strictly greater than this one (the last key of the previous page).
    pub start_after: Option<String>,
    /// At most this many items; `None` or `Some(0)` means no limit.
    pub limit: Option<usize>,
}

/// One page of a list, in ascending key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListResult {
    pub items: Vec<KeyValue>,
    /// The revision the list was served at: the one asked for, or the current one. Pass it as
    /// [`ListOptions::revision`] for the next page to get a consistent snapshot.
    pub revision: Revision,
    /// Keys under the prefix after the last returned item (0 when this is the last page).
    pub remaining: u64,
}

impl ListResult {
    /// Whether there are more items after this page.
    pub fn more(&self) -> bool {
        self.remaining > 0
    }
}

/// The events of a watch, in revision order. It yields `Err` at most once and then ends (for
/// example [`StoreError::Compacted`] when a slow watcher fell behind a compaction); the
/// watcher then lists again and watches from the list's revision.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, StoreError>> + Send>>;

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key:?} not found")]
    NotFound { key: String },
    #[error("key {key:?} already exists")]
    AlreadyExists { key: String },
    #[error("key {key:?} was modified: expected revision {expected}, current revision {current}")]
    Conflict {
        key: String,
        expected: Revision,
        current: Revision,
    },
    #[error("revision {requested} has been compacted; the oldest revision kept is {compacted}")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is newer than the current revision {current}")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("sqlite store: {context}: {source}")]
    Sqlite {
        context: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("etcd store: {context}: {source}")]
    Etcd {
        context: &'static str,
        #[source]
        source: etcd_client::Error,
    },
    /// The backend is gone or misbehaved (writer thread stopped, stream closed, I/O on the
    /// data dir); the message says what.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// The store the API server writes to. Object-safe: use it as `Arc<dyn Store>`.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The current value of `key`, or `None`.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// The keys starting with `prefix` (all keys for `""`), in key order, one page at a time.
    /// Keys start with '/', so a prefix is `""` or starts with '/' (`InvalidArgument` else).
    /// Fails with `Compacted` or `FutureRevision` when `opts.revision` is out of range.
    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult, StoreError>;

    /// Creates `key`; fails with `AlreadyExists` if it exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue, StoreError>;

    /// Replaces the value of an existing `key` (`NotFound` otherwise). With `expected`, only
    /// if the key's `mod_revision` is still that (`Conflict` otherwise).
    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> Result<KeyValue, StoreError>;

    /// Deletes `key` and returns its last value; `NotFound` and `Conflict` as for `update`.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue, StoreError>;

    /// The changes under `prefix` with a revision greater than `from`: first the ones already
    /// in history, then live ones. `from` = the revision of a list gives exactly the changes
    /// after that list. Fails with `Compacted` if history after `from` is gone and with
    /// `FutureRevision` if `from` is newer than the current revision. (A compaction racing
    /// with the start of the watch may instead show as the stream's first item, an `Err`.)
    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError>;

    /// The revision of the latest write.
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// Drops the history before `revision`: afterwards lists at revisions below it and
    /// watches from revisions below it fail with `Compacted`. Compacting at or below an
    /// earlier compaction does nothing; above the current revision is `FutureRevision`.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
}

/// The file of the embedded store inside the data dir.
pub const SQLITE_FILE: &str = "store.db";

/// Which store to open (from `--data-dir` / `--etcd-servers`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store, [`SQLITE_FILE`] in `data_dir` (created if missing).
    Sqlite {
        data_dir: PathBuf,
        durability: sqlite::Durability,
    },
    /// etcd at `endpoints`, keys under `root` (e.g. [`etcd::DEFAULT_ROOT`]).
    Etcd {
        endpoints: Vec<String>,
        root: String,
    },
}

/// Opens the store `backend` names.
pub async fn open(backend: &Backend) -> Result<Arc<dyn Store>, StoreError> {
    match backend {
        Backend::Sqlite {
            data_dir,
            durability,
        } => {
            std::fs::create_dir_all(data_dir).map_err(|e| {
                StoreError::Unavailable(format!("create data dir {}: {e}", data_dir.display()))
            })?;
            let store = sqlite::SqliteStore::open_with(&data_dir.join(SQLITE_FILE), *durability)?;
            Ok(Arc::new(store))
        }
        Backend::Etcd { endpoints, root } => {
            Ok(Arc::new(etcd::EtcdStore::connect(endpoints, root).await?))
        }
    }
}

/// Rejects keys no backend can hold the same way.
pub(crate) fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "must not be empty",
        });
    }
    if !key.starts_with('/') {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "must start with '/'",
        });
    }
    if key.contains('\0') {
        return Err(StoreError::InvalidKey {
            key: key.to_owned(),
            reason: "must not contain NUL",
        });
    }
    Ok(())
}

/// Rejects list and watch prefixes that could reach outside the key space: keys start with
/// '/', so a prefix is empty (all keys) or starts with '/'.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), StoreError> {
    if prefix.is_empty() || prefix.starts_with('/') {
        Ok(())
    } else {
        Err(StoreError::InvalidArgument(format!(
            "prefix {prefix:?} must be empty or start with '/'"
        )))
    }
}

/// The smallest string greater than every string starting with `prefix`, as bytes; `None`
/// when there is none (empty prefix, or all bytes 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/pods/"), Some(b"/pods0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b""), None);
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }

    #[tokio::test]
    async fn open_picks_the_backend() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let store = open(&Backend::Sqlite {
            data_dir: data_dir.clone(),
            durability: sqlite::Durability::default(),
        })
        .await
        .unwrap();
        store.create("/a", Bytes::from_static(b"1")).await.unwrap();
        assert!(data_dir.join(SQLITE_FILE).is_file());

        let err = open(&Backend::Etcd {
            endpoints: Vec::new(),
            root: etcd::DEFAULT_ROOT.to_owned(),
        })
        .await
        .err()
        .expect("no endpoints");
        assert!(matches!(err, StoreError::InvalidArgument(_)), "{err}");
        let err = open(&Backend::Etcd {
            endpoints: vec!["http://127.0.0.1:1".to_owned()],
            root: "registry/".to_owned(),
        })
        .await
        .err()
        .expect("bad root");
        assert!(
            matches!(err, StoreError::InvalidArgument(ref m) if m.contains("root")),
            "{err}"
        );
    }

    #[test]
    fn bad_keys_are_rejected() {
        assert!(matches!(check_key(""), Err(StoreError::InvalidKey { .. })));
        assert!(matches!(
            check_key("a\0b"),
            Err(StoreError::InvalidKey { .. })
        ));
        assert!(matches!(
            check_key("pods/a"),
            Err(StoreError::InvalidKey { .. })
        ));
        assert!(check_key("/pods/default/a").is_ok());
        assert!(check_prefix("").is_ok() && check_prefix("/pods/").is_ok());
        assert!(matches!(
            check_prefix("pods/"),
            Err(StoreError::InvalidArgument(_))
        ));
    }
}
