//! The embedded store: one SQLite file, inspectable with `sqlite3`.
//!
//! Layout: `history` holds every write ever made (until compacted), one row per revision;
//! a key's current value is its newest row, and a delete is a row without a value. That
//! makes a list at a past revision and a watch replay plain range queries. `meta` holds the
//! current and the compacted revision. The `live` view shows the current keys.
//!
//! Writes: one dedicated writer thread owns the only writing connection. Callers queue
//! their writes; the thread takes everything queued, applies it in ONE transaction with
//! consecutive revisions, commits, then publishes the events to watchers and answers the
//! callers. A write is acknowledged only after the commit that holds it.
//!
//! Durability, see [`Durability`]: the default keeps every acknowledged write across a
//! killed process (`kill -9`, OOM kill, panic), which is what the control plane promises;
//! [`Durability::PowerLoss`] also keeps them across an OS crash or power loss, at the cost
//! of one fsync per group commit (about 7 ms on this project's VMs, which caps 8 clients at
//! roughly 1,000 creates/s, the same as etcd, which fsyncs every batch too).
//!
//! Reads run on a small pool of read-only connections on tokio's blocking threads; in WAL
//! mode they read a consistent snapshot without blocking the writer.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::watch::{self, Batch, History};
use super::{
    INITIAL_REVISION, KeyValue, ListOptions, ListResult, Revision, Store, StoreError, WatchEvent,
    WatchStream, check_key, check_prefix, prefix_end,
};

/// Most writes committed in one transaction.
const MAX_GROUP: usize = 512;
/// Writes waiting for the writer thread before callers wait to queue (back-pressure).
const QUEUE: usize = 4096;
/// Read connections: reads beyond this many wait for one, so connections (each with its
/// prepared statements) are opened once and reused, never opened and closed per read.
const MAX_READERS: usize = 16;
/// Read connections for lists.
const MAX_SCANNERS: usize = 4;
/// How much of the database file a list connection maps (address space, not memory).
const SCANNER_MMAP_BYTES: i64 = 1 << 30;
/// Keys are UTF-8, which never contains the byte 0xff: an upper bound for "all keys".
const NO_KEY_END: &[u8] = b"\xff";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (name, value) VALUES ('revision', 1), ('compacted', 0);
CREATE TABLE IF NOT EXISTS history (
    revision INTEGER PRIMARY KEY,
    key BLOB NOT NULL,
    create_revision INTEGER NOT NULL,
    -- The revision of the value this write replaced; NULL for a create.
    prev_revision INTEGER,
    -- NULL for a delete.
    value BLOB
);
CREATE INDEX IF NOT EXISTS history_by_key ON history (key, revision);
CREATE VIEW IF NOT EXISTS live AS
    SELECT CAST(key AS TEXT) AS key, CAST(value AS TEXT) AS value, create_revision,
           max(revision) AS mod_revision
    FROM history GROUP BY key HAVING value IS NOT NULL;
";

fn sql(context: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Sqlite { context, source }
}

/// What an acknowledged write survives. Both use SQLite's WAL journal; a crash never
/// corrupts the database, the modes differ in which acknowledged writes a crash may lose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// `synchronous=NORMAL`: a commit is in the WAL file (the OS's page cache) before it is
    /// acknowledged, so it survives the process dying at any moment; the WAL is fsynced at
    /// checkpoints, so an OS crash or power loss can lose the last acknowledged writes.
    #[default]
    ProcessCrash,
    /// `synchronous=FULL`: the WAL is fsynced before each group commit is acknowledged, so
    /// writes survive power loss as well.
    PowerLoss,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::ProcessCrash => "NORMAL",
            Durability::PowerLoss => "FULL",
        }
    }
}

/// The SQLite store. Cloning gives another handle to the same store; the writer thread
/// stops when the last handle is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    readers: Arc<Readers>,
    /// Connections for lists, which map the file (see [`Readers::mmap`]).
    scanners: Arc<Readers>,
    live: broadcast::Sender<Batch>,
    /// The revision of the last committed write.
    revision: Arc<AtomicI64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue stops the writer after its current group; joining it releases
        // the file lock before a new store can open the same file.
        self.writer.take();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            tracing::error!("sqlite store writer thread panicked");
        }
    }
}

enum Op {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Option<Revision>,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

struct Command {
    op: Op,
    reply: oneshot::Sender<Result<Option<KeyValue>, StoreError>>,
}

impl SqliteStore {
    /// Opens (creating if needed) the store in the file at `path`. Fails if another process
    /// (or another store in this one) has it open.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Self::open_with(path, Durability::default())
    }

    /// [`SqliteStore::open`] with a chosen durability.
    pub fn open_with(path: &Path, durability: Durability) -> Result<SqliteStore, StoreError> {
        let (lock, lock_path) = lock_file(path)?;
        Self::open_locked(path, lock, durability).inspect_err(|_| {
            // Nothing of a failed open stays behind; the lock is ours until here.
            let _ = std::fs::remove_file(&lock_path);
        })
    }

    fn open_locked(
        path: &Path,
        lock: File,
        durability: Durability,
    ) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(sql("open the database"))?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql("switch to WAL journal"))?;
        conn.pragma_update(None, "synchronous", durability.pragma())
            .map_err(sql("set synchronous"))?;
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql("set busy timeout"))?;
        conn.execute_batch(SCHEMA).map_err(sql("create schema"))?;
        let revision = read_meta(&conn, "revision")?;
        let revision = Arc::new(AtomicI64::new(revision));

        let readers = Arc::new(Readers {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(MAX_READERS),
            mmap: false,
        });
        let scanners = Arc::new(Readers {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(MAX_SCANNERS),
            mmap: true,
        });
        let live = watch::live_channel();
        let (tx, rx) = mpsc::channel(QUEUE);
        let writer = Writer {
            conn,
            revision: revision.load(Ordering::SeqCst),
            published: revision.clone(),
            live: live.clone(),
            _lock: lock,
        };
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".to_owned())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Unavailable(format!("start the sqlite writer thread: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                writer: Some(tx),
                thread: Some(thread),
                readers,
                scanners,
                live,
                revision,
            }),
        })
    }

    async fn write(&self, op: Op) -> Result<Option<KeyValue>, StoreError> {
        let stopped = || StoreError::Unavailable("the sqlite writer thread stopped".to_owned());
        let (reply, answer) = oneshot::channel();
        let writer = self.inner.writer.as_ref().ok_or_else(stopped)?;
        writer
            .send(Command { op, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    async fn write_kv(&self, op: Op) -> Result<KeyValue, StoreError> {
        self.write(op).await?.ok_or_else(|| {
            StoreError::Unavailable("the sqlite writer answered a write without a value".into())
        })
    }
}

/// Takes an exclusive lock on `<path>.lock`, held by the writer thread: two stores writing
/// one file would each hand out the same revisions.
fn lock_file(path: &Path) -> Result<(File, PathBuf), StoreError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StoreError::Unavailable(format!("open {}: {e}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok((file, lock_path)),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Unavailable(format!(
            "{} is in use by another store (lock {} is held)",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(StoreError::Unavailable(format!(
            "lock {}: {e}",
            lock_path.display()
        ))),
    }
}

fn read_meta(tx: &Connection, name: &str) -> Result<Revision, StoreError> {
    tx.prepare_cached("SELECT value FROM meta WHERE name = ?1")
        .and_then(|mut s| s.query_row([name], |r| r.get(0)))
        .map_err(sql("read meta"))
}

fn key_range(prefix: &str) -> (Vec<u8>, Vec<u8>) {
    let end = prefix_end(prefix.as_bytes()).unwrap_or_else(|| NO_KEY_END.to_vec());
    (prefix.as_bytes().to_vec(), end)
}

fn key_from_blob(blob: Vec<u8>) -> Result<String, rusqlite::Error> {
    String::from_utf8(blob).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Blob, Box::new(e))
    })
}

struct Writer {
    conn: Connection,
    /// The last revision handed out (committed or in the open transaction).
    revision: Revision,
    published: Arc<AtomicI64>,
    live: broadcast::Sender<Batch>,
    _lock: File,
}

/// The current row of a key, if the key exists.
struct Current {
    kv: KeyValue,
}

impl Writer {
    fn run(mut self, mut queue: mpsc::Receiver<Command>) {
        let mut group = Vec::with_capacity(MAX_GROUP);
        while let Some(first) = queue.blocking_recv() {
            group.push(first);
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            self.commit_group(&mut group);
        }
        tracing::debug!("sqlite store writer stopped");
    }

    fn commit_group(&mut self, group: &mut Vec<Command>) {
        let start_revision = self.revision;
        let outcome = self.apply_group(group);
        match outcome {
            Ok((results, events)) => {
                self.published.store(self.revision, Ordering::SeqCst);
                if !events.is_empty() {
                    // No receivers is fine: nobody is watching.
                    let _ = self.live.send(events.into());
                }
                for (command, result) in group.drain(..).zip(results) {
                    // The caller may have gone away; the write stands anyway.
                    let _ = command.reply.send(result);
                }
            }
            Err(e) => {
                self.revision = start_revision;
                tracing::error!(error = %e, writes = group.len(), "sqlite store: group commit failed");
                let message = e.to_string();
                for command in group.drain(..) {
                    let _ = command.reply.send(Err(StoreError::Unavailable(format!(
                        "commit failed, write not applied: {message}"
                    ))));
                }
            }
        }
    }

    /// Applies every command in one transaction. A command that fails its checks (exists,
    /// not found, conflict) writes nothing and gets its error; a database error aborts the
    /// whole group.
    #[allow(clippy::type_complexity)]
    fn apply_group(
        &mut self,
        group: &[Command],
    ) -> Result<(Vec<Result<Option<KeyValue>, StoreError>>, Vec<WatchEvent>), StoreError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql("begin write transaction"))?;
        let mut revision = self.revision;
        let mut results = Vec::with_capacity(group.len());
        let mut events = Vec::with_capacity(group.len());
        for command in group {
            let result = match &command.op {
                Op::Create { key, value } => {
                    apply_create(&tx, &mut revision, key, value).map(|(kv, event)| {
                        events.push(event);
                        Some(kv)
                    })
                }
                Op::Update {
                    key,
                    value,
                    expected,
                } => apply_update(&tx, &mut revision, key, value, *expected).map(|(kv, event)| {
                    events.push(event);
                    Some(kv)
                }),
                Op::Delete { key, expected } => apply_delete(&tx, &mut revision, key, *expected)
                    .map(|(kv, event)| {
                        events.push(event);
                        Some(kv)
                    }),
                Op::Compact { revision: keep } => {
                    apply_compact(&tx, revision, *keep).map(|()| None)
                }
            };
            match result {
                Err(e @ (StoreError::Sqlite { .. } | StoreError::Unavailable(_))) => return Err(e),
                other => results.push(other),
            }
        }
        if revision != self.revision {
            tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'revision'")
                .and_then(|mut s| s.execute([revision]))
                .map_err(sql("store the revision"))?;
        }
        tx.commit().map_err(sql("commit"))?;
        self.revision = revision;
        Ok((results, events))
    }
}

fn current(tx: &Connection, key: &str) -> Result<Option<Current>, StoreError> {
    let row = tx
        .prepare_cached(
            "SELECT revision, create_revision, value FROM history
             WHERE key = ?1 ORDER BY revision DESC LIMIT 1",
        )
        .and_then(|mut s| {
            s.query_row([key.as_bytes()], |r| {
                Ok((
                    r.get::<_, Revision>(0)?,
                    r.get::<_, Revision>(1)?,
                    r.get::<_, Option<Vec<u8>>>(2)?,
                ))
            })
            .optional()
        })
        .map_err(sql("read a key"))?;
    Ok(match row {
        Some((mod_revision, create_revision, Some(value))) => Some(Current {
            kv: KeyValue {
                key: key.to_owned(),
                value: value.into(),
                create_revision,
                mod_revision,
            },
        }),
        _ => None,
    })
}

fn insert(
    tx: &Connection,
    revision: Revision,
    key: &str,
    create_revision: Revision,
    prev_revision: Option<Revision>,
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO history (revision, key, create_revision, prev_revision, value)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            revision,
            key.as_bytes(),
            create_revision,
            prev_revision,
            value
        ])
    })
    .map_err(sql("insert a revision"))?;
    Ok(())
}

fn check_expected(current: &KeyValue, expected: Option<Revision>) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != current.mod_revision => Err(StoreError::Conflict {
            key: current.key.clone(),
            expected,
            current: current.mod_revision,
        }),
        _ => Ok(()),
    }
}

fn apply_create(
    tx: &Connection,
    revision: &mut Revision,
    key: &str,
    value: &Bytes,
) -> Result<(KeyValue, WatchEvent), StoreError> {
    if current(tx, key)?.is_some() {
        return Err(StoreError::AlreadyExists {
            key: key.to_owned(),
        });
    }
    let rev = *revision + 1;
    insert(tx, rev, key, rev, None, Some(value))?;
    *revision = rev;
    let kv = KeyValue {
        key: key.to_owned(),
        value: value.clone(),
        create_revision: rev,
        mod_revision: rev,
    };
    Ok((
        kv.clone(),
        WatchEvent::Put {
            kv: kv.clone(),
            prev: None,
        },
    ))
}

fn apply_update(
    tx: &Connection,
    revision: &mut Revision,
    key: &str,
    value: &Bytes,
    expected: Option<Revision>,
) -> Result<(KeyValue, WatchEvent), StoreError> {
    let Some(Current { kv: prev }) = current(tx, key)? else {
        return Err(StoreError::NotFound {
            key: key.to_owned(),
        });
    };
    check_expected(&prev, expected)?;
    let rev = *revision + 1;
    insert(
        tx,
        rev,
        key,
        prev.create_revision,
        Some(prev.mod_revision),
        Some(value),
    )?;
    *revision = rev;
    let kv = KeyValue {
        key: key.to_owned(),
        value: value.clone(),
        create_revision: prev.create_revision,
        mod_revision: rev,
    };
    Ok((
        kv.clone(),
        WatchEvent::Put {
            kv,
            prev: Some(prev),
        },
    ))
}

fn apply_delete(
    tx: &Connection,
    revision: &mut Revision,
    key: &str,
    expected: Option<Revision>,
) -> Result<(KeyValue, WatchEvent), StoreError> {
    let Some(Current { kv: prev }) = current(tx, key)? else {
        return Err(StoreError::NotFound {
            key: key.to_owned(),
        });
    };
    check_expected(&prev, expected)?;
    let rev = *revision + 1;
    insert(
        tx,
        rev,
        key,
        prev.create_revision,
        Some(prev.mod_revision),
        None,
    )?;
    *revision = rev;
    Ok((
        prev.clone(),
        WatchEvent::Delete {
            prev,
            revision: rev,
        },
    ))
}

fn apply_compact(tx: &Connection, current: Revision, keep: Revision) -> Result<(), StoreError> {
    if keep > current {
        return Err(StoreError::FutureRevision {
            requested: keep,
            current,
        });
    }
    if keep <= read_meta(tx, "compacted")? {
        return Ok(());
    }
    // Keep each key's value as of `keep` (lists at `keep` and the `prev` of later events
    // need it) and everything after; deletes at or before `keep` need no record.
    let removed = tx
        .execute(
            "DELETE FROM history WHERE revision <= ?1 AND (
                value IS NULL OR revision < (
                    SELECT max(newer.revision) FROM history AS newer
                    WHERE newer.key = history.key AND newer.revision <= ?1))",
            [keep],
        )
        .map_err(sql("delete compacted history"))?;
    tx.execute(
        "UPDATE meta SET value = ?1 WHERE name = 'compacted'",
        [keep],
    )
    .map_err(sql("store the compacted revision"))?;
    tracing::info!(revision = keep, removed, "sqlite store compacted");
    Ok(())
}

/// The pool of read connections.
struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    /// One per connection in use; at most that many connections exist.
    permits: tokio::sync::Semaphore,
    /// Map the database file. Lists read the whole table and gain from it; point reads
    /// lose, since in WAL mode SQLite unmaps the whole file at every read transaction that
    /// follows a write.
    mmap: bool,
}

impl Readers {
    fn take(&self) -> Result<Connection, StoreError> {
        if let Some(conn) = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop()
        {
            return Ok(conn);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql("open a read connection"))?;
        conn.pragma_update(None, "query_only", true)
            .map_err(sql("make a read connection read-only"))?;
        if self.mmap {
            conn.pragma_update(None, "mmap_size", SCANNER_MMAP_BYTES)
                .map_err(sql("set mmap size"))?;
        }
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql("set busy timeout"))?;
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        idle.push(conn);
    }

    /// Runs `f` in a read transaction (one consistent snapshot) on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|e| StoreError::Unavailable(format!("sqlite readers closed: {e}")))?;
        let conn = self.take()?;
        let (conn, result) = tokio::task::spawn_blocking(move || {
            // BEGIN and ROLLBACK as cached statements: rusqlite's transaction() parses both
            // again for every read. A read-only transaction has nothing to lose on rollback.
            let result = conn
                .prepare_cached("BEGIN")
                .and_then(|mut s| s.execute([]))
                .map_err(sql("begin read transaction"))
                .and_then(|_| f(&conn));
            let ended = conn
                .prepare_cached("ROLLBACK")
                .and_then(|mut s| s.execute([]))
                .is_ok();
            (ended.then_some(conn), result)
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("sqlite read task failed: {e}")))?;
        // A connection whose transaction did not end is dropped, not reused.
        if let Some(conn) = conn {
            self.give_back(conn);
        }
        result
    }
}

fn check_revision(tx: &Connection, requested: Revision) -> Result<Revision, StoreError> {
    let current = read_meta(tx, "revision")?;
    let compacted = read_meta(tx, "compacted")?;
    if requested < compacted {
        return Err(StoreError::Compacted {
            requested,
            compacted,
        });
    }
    if requested > current {
        return Err(StoreError::FutureRevision { requested, current });
    }
    Ok(current)
}

fn list_in(tx: &Connection, prefix: &str, opts: &ListOptions) -> Result<ListResult, StoreError> {
    let revision = match opts.revision {
        Some(r) => {
            check_revision(tx, r)?;
            r
        }
        None => read_meta(tx, "revision")?,
    };
    let (start, end) = key_range(prefix);
    let start_after = match &opts.start_after {
        Some(after) if after.as_bytes() >= start.as_slice() => after.as_bytes().to_vec(),
        // Every key under the prefix is > anything smaller than the prefix; the empty key
        // is the smallest and no key is empty.
        _ => Vec::new(),
    };
    let limit = opts.limit.filter(|l| *l > 0);
    // The newest row of each key at `revision`: SQLite takes the bare columns (also in
    // HAVING) from the row holding max(revision); keys deleted by then have no value. Read
    // in key order straight off the (key, revision) index, with no sort.
    let mut stmt = tx
        .prepare_cached(
            "SELECT key, value, create_revision, max(revision) FROM history
             WHERE key >= ?1 AND key < ?2 AND key > ?3 AND revision <= ?4
             GROUP BY key HAVING value IS NOT NULL ORDER BY key LIMIT ?5",
        )
        .map_err(sql("prepare list"))?;
    // One more than asked tells whether there is a next page without counting.
    let fetch = limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX - 1) + 1);
    let mut items = stmt
        .query_map(params![start, end, start_after, revision, fetch], |r| {
            Ok(KeyValue {
                key: key_from_blob(r.get(0)?)?,
                value: r.get::<_, Vec<u8>>(1)?.into(),
                create_revision: r.get(2)?,
                mod_revision: r.get(3)?,
            })
        })
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(sql("list"))?;
    let mut remaining = 0;
    if let Some(limit) = limit
        && items.len() > limit
    {
        items.truncate(limit);
        let last = items.last().map(|kv| kv.key.as_bytes().to_vec());
        remaining = tx
            .prepare_cached(
                "SELECT count(*) FROM (
                    SELECT max(revision) FROM history
                    WHERE key >= ?1 AND key < ?2 AND key > ?3 AND revision <= ?4
                    GROUP BY key HAVING value IS NOT NULL)",
            )
            .and_then(|mut s| {
                s.query_row(params![start, end, last, revision], |r| r.get::<_, i64>(0))
            })
            .map_err(sql("count the rest of a list"))?
            .try_into()
            .unwrap_or(0);
    }
    Ok(ListResult {
        items,
        revision,
        remaining,
    })
}

fn events_in(
    tx: &Connection,
    prefix: &str,
    after: Revision,
    limit: usize,
) -> Result<Vec<WatchEvent>, StoreError> {
    check_revision(tx, after)?;
    let (start, end) = key_range(prefix);
    let mut stmt = tx
        .prepare_cached(
            "SELECT h.revision, h.key, h.create_revision, h.value,
                    p.revision, p.create_revision, p.value
             FROM history AS h LEFT JOIN history AS p ON p.revision = h.prev_revision
             WHERE h.revision > ?1 AND h.key >= ?2 AND h.key < ?3
             ORDER BY h.revision LIMIT ?4",
        )
        .map_err(sql("prepare watch replay"))?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    stmt.query_map(params![after, start, end, limit], |r| {
        let revision: Revision = r.get(0)?;
        let key = key_from_blob(r.get(1)?)?;
        let create_revision: Revision = r.get(2)?;
        let value: Option<Vec<u8>> = r.get(3)?;
        let prev_revision: Option<Revision> = r.get(4)?;
        let prev = match (prev_revision, r.get::<_, Option<Vec<u8>>>(6)?) {
            (Some(mod_revision), Some(prev_value)) => Some(KeyValue {
                key: key.clone(),
                value: prev_value.into(),
                create_revision: r.get(5)?,
                mod_revision,
            }),
            _ => None,
        };
        Ok((revision, key, create_revision, value, prev))
    })
    .and_then(Iterator::collect::<Result<Vec<_>, _>>)
    .map_err(sql("watch replay"))?
    .into_iter()
    .map(
        |(revision, key, create_revision, value, prev)| match value {
            Some(value) => Ok(WatchEvent::Put {
                kv: KeyValue {
                    key,
                    value: value.into(),
                    create_revision,
                    mod_revision: revision,
                },
                prev,
            }),
            None => prev
                .map(|prev| WatchEvent::Delete { prev, revision })
                .ok_or_else(|| {
                    StoreError::Unavailable(format!(
                        "history is missing the value deleted at revision {revision}"
                    ))
                }),
        },
    )
    .collect()
}

#[async_trait]
impl History for Readers {
    async fn events_after(
        &self,
        prefix: &str,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<WatchEvent>, StoreError> {
        let prefix = prefix.to_owned();
        self.read(move |tx| events_in(tx, &prefix, after, limit))
            .await
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let key = key.to_owned();
        self.inner
            .readers
            .read(move |tx| Ok(current(tx, &key)?.map(|c| c.kv)))
            .await
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult, StoreError> {
        check_prefix(prefix)?;
        if let Some(r) = opts.revision
            && r <= 0
        {
            return Err(StoreError::InvalidArgument(format!(
                "list revision {r} is not positive"
            )));
        }
        let prefix = prefix.to_owned();
        self.inner
            .scanners
            .read(move |tx| list_in(tx, &prefix, &opts))
            .await
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        self.write_kv(Op::Create {
            key: key.to_owned(),
            value,
        })
        .await
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        self.write_kv(Op::Update {
            key: key.to_owned(),
            value,
            expected,
        })
        .await
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        self.write_kv(Op::Delete {
            key: key.to_owned(),
            expected,
        })
        .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        check_prefix(prefix)?;
        watch::start(self.inner.readers.clone(), &self.inner.live, prefix, from).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self
            .inner
            .revision
            .load(Ordering::SeqCst)
            .max(INITIAL_REVISION))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.write(Op::Compact { revision }).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_store_on_the_same_file_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let first = SqliteStore::open(&path).unwrap();
        let kv = first.create("/a", Bytes::from_static(b"1")).await.unwrap();
        let err = SqliteStore::open(&path)
            .err()
            .expect("second open must fail");
        assert!(
            matches!(&err, StoreError::Unavailable(m) if m.contains("in use by another store")),
            "{err}"
        );
        drop(first);
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.get("/a").await.unwrap(), Some(kv.clone()));
        assert_eq!(again.current_revision().await.unwrap(), kv.mod_revision);
        let next = again.create("/b", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(
            next.mod_revision,
            kv.mod_revision + 1,
            "revisions continue after reopen"
        );
    }

    #[tokio::test]
    async fn a_file_that_is_not_a_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        std::fs::write(
            &path,
            b"this is not sqlite, just some text that is long enough",
        )
        .unwrap();
        let err = SqliteStore::open(&path).err().expect("open must fail");
        assert!(matches!(err, StoreError::Sqlite { .. }), "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"this is not sqlite, just some text that is long enough",
            "the file is left as it was"
        );
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["store.db"], "nothing else is left behind");
    }

    #[tokio::test]
    async fn writes_from_many_tasks_are_committed_in_groups_with_consecutive_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
        let start = store.current_revision().await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..16 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut revs = Vec::new();
                for i in 0..20 {
                    let kv = store
                        .create(&format!("/g/{t}/{i}"), Bytes::from_static(b"v"))
                        .await
                        .unwrap();
                    revs.push(kv.mod_revision);
                }
                revs
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_unstable();
        let expected: Vec<Revision> = (start + 1..=start + 320).collect();
        assert_eq!(
            all, expected,
            "every write got its own revision, none skipped"
        );
    }
}
