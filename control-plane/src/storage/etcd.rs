//! The store on etcd v3, for control planes of several API servers.
//!
//! etcd already has what the trait asks for: one global revision, MVCC history, ranges at a
//! revision, watches from a revision with the previous value, compaction. This module maps
//! it: all keys live under a root prefix (`/registry` by default, so other users of the same
//! etcd are not touched), compare-and-swap is a transaction on `mod_revision`, and etcd's
//! "compacted" and "future revision" answers become [`StoreError::Compacted`] and
//! [`StoreError::FutureRevision`].

use std::collections::VecDeque;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient,
    PutOptions, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};

use super::{
    KeyValue, ListOptions, ListResult, Revision, Store, StoreError, WatchEvent, WatchStream,
    check_key, check_prefix, prefix_end,
};

/// The root prefix used when none is given, as in Kubernetes.
pub const DEFAULT_ROOT: &str = "/registry";

const COMPACTED: &str = "required revision has been compacted";
const FUTURE: &str = "required revision is a future revision";

/// A store on an etcd cluster. Cloning shares the connection.
#[derive(Clone)]
pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
    root: String,
}

/// Responses as large as etcd sends: a list of many objects easily passes the client's
/// default of 4 MiB (10,000 pods of 2 KiB is 20 MiB).
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

fn etcd(context: &'static str) -> impl FnOnce(etcd_client::Error) -> StoreError {
    move |source| StoreError::Etcd { context, source }
}

fn message_of(e: &etcd_client::Error) -> Option<&str> {
    match e {
        etcd_client::Error::GRpcStatus(status) => Some(status.message()),
        _ => None,
    }
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (e.g. `http://127.0.0.1:2379`), keeping all keys under
    /// `root`.
    pub async fn connect(endpoints: &[String], root: &str) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidArgument(
                "no etcd endpoints given".to_owned(),
            ));
        }
        if root.is_empty() || !root.starts_with('/') || root.ends_with('/') {
            return Err(StoreError::InvalidArgument(format!(
                "etcd root prefix {root:?} must start with '/' and not end with it"
            )));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(etcd("connect"))?;
        let store = EtcdStore {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES),
            root: root.to_owned(),
        };
        // Fail now rather than at the first request if nothing answers.
        store.current_revision().await?;
        Ok(store)
    }

    fn full_key(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.root.len() + key.len());
        full.extend_from_slice(self.root.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    /// Where the keys under `prefix` start in etcd. All keys start with '/', so "all keys"
    /// is `<root>/`, which leaves out other keys that merely begin like the root
    /// (`/registryX`).
    fn range_start(&self, prefix: &str) -> Vec<u8> {
        self.full_key(if prefix.is_empty() { "/" } else { prefix })
    }

    fn range_end(&self, prefix: &str) -> Vec<u8> {
        // The start ends in a UTF-8 byte, never 0xff, so there always is an end.
        prefix_end(&self.range_start(prefix)).unwrap_or_else(|| vec![0])
    }

    fn to_kv(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
        Ok(KeyValue {
            key: self.strip(kv.key())?,
            value: Bytes::copy_from_slice(kv.value()),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
        })
    }

    fn strip(&self, full: &[u8]) -> Result<String, StoreError> {
        full.strip_prefix(self.root.as_bytes())
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_owned)
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "etcd returned key {:?} outside root {}",
                    String::from_utf8_lossy(full),
                    self.root
                ))
            })
    }

    /// Maps etcd's revision errors; needs the current and compacted revisions to say so.
    async fn revision_error(
        &self,
        e: etcd_client::Error,
        requested: Revision,
        context: &'static str,
    ) -> StoreError {
        match message_of(&e) {
            Some(m) if m.contains(COMPACTED) => match self.compacted_revision().await {
                Ok(compacted) => StoreError::Compacted {
                    requested,
                    compacted,
                },
                Err(e) => e,
            },
            Some(m) if m.contains(FUTURE) => match self.current_revision().await {
                Ok(current) => StoreError::FutureRevision { requested, current },
                Err(e) => e,
            },
            _ => StoreError::Etcd { context, source: e },
        }
    }

    /// etcd tells the compacted revision only to a watcher that starts before it: start one
    /// at revision 1 and read its cancellation.
    async fn compacted_revision(&self) -> Result<Revision, StoreError> {
        let mut client = self.watch.clone();
        let key = self.range_start("");
        let options = WatchOptions::new()
            .with_range(self.range_end(""))
            .with_start_revision(1);
        let mut stream = client
            .watch(key, Some(options))
            .await
            .map_err(etcd("probe the compacted revision"))?;
        while let Some(response) = stream
            .message()
            .await
            .map_err(etcd("probe the compacted revision"))?
        {
            if response.compact_revision() > 0 {
                return Ok(response.compact_revision());
            }
            if response.canceled() || !response.events().is_empty() {
                break;
            }
        }
        Err(StoreError::Unavailable(
            "etcd reported a compacted revision but no compaction point".to_owned(),
        ))
    }

    /// Runs a compare-and-swap transaction: `op` when `guard` holds, else a read of `key` to
    /// say why not.
    async fn cas(
        &self,
        key: &str,
        guard: Compare,
        op: TxnOp,
        context: &'static str,
    ) -> Result<(bool, Revision, Vec<TxnOpResponse>), StoreError> {
        let full = self.full_key(key);
        let txn = Txn::new()
            .when([guard])
            .and_then([op])
            .or_else([TxnOp::get(full, None)]);
        let response = self.kv.clone().txn(txn).await.map_err(etcd(context))?;
        let revision = response
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        Ok((response.succeeded(), revision, response.op_responses()))
    }

    /// The error for a failed guard: the key is missing, or was changed.
    fn guard_failed(
        &self,
        key: &str,
        expected: Option<Revision>,
        responses: &[TxnOpResponse],
    ) -> StoreError {
        let current = responses.iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs().first().map(etcd_client::KeyValue::mod_revision),
            _ => None,
        });
        match (current, expected) {
            (Some(current), Some(expected)) => StoreError::Conflict {
                key: key.to_owned(),
                expected,
                current,
            },
            _ => StoreError::NotFound {
                key: key.to_owned(),
            },
        }
    }

    /// The guard of an update or delete: the key exists (and is at `expected`).
    fn exists_guard(&self, key: &str, expected: Option<Revision>) -> Compare {
        match expected {
            Some(expected) => Compare::mod_revision(self.full_key(key), CompareOp::Equal, expected),
            None => Compare::version(self.full_key(key), CompareOp::Greater, 0),
        }
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let response = self
            .kv
            .clone()
            .get(self.full_key(key), None)
            .await
            .map_err(etcd("get"))?;
        response.kvs().first().map(|kv| self.to_kv(kv)).transpose()
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult, StoreError> {
        check_prefix(prefix)?;
        let mut options = GetOptions::new().with_range(self.range_end(prefix));
        if let Some(revision) = opts.revision {
            if revision <= 0 {
                return Err(StoreError::InvalidArgument(format!(
                    "list revision {revision} is not positive"
                )));
            }
            options = options.with_revision(revision);
        }
        if let Some(limit) = opts.limit.filter(|l| *l > 0) {
            options = options.with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let start = match &opts.start_after {
            // The smallest key after `after` is `after` followed by a NUL byte.
            Some(after) if after.as_str() >= prefix => {
                let mut start = self.full_key(after);
                start.push(0);
                start
            }
            _ => self.range_start(prefix),
        };
        let response = match self.kv.clone().get(start, Some(options)).await {
            Ok(response) => response,
            Err(e) => {
                return Err(self
                    .revision_error(e, opts.revision.unwrap_or(0), "list")
                    .await);
            }
        };
        let items = response
            .kvs()
            .iter()
            .map(|kv| self.to_kv(kv))
            .collect::<Result<Vec<_>, _>>()?;
        let revision = opts.revision.unwrap_or_else(|| {
            response
                .header()
                .map_or(0, etcd_client::ResponseHeader::revision)
        });
        let total = u64::try_from(response.count()).unwrap_or(0);
        Ok(ListResult {
            remaining: total.saturating_sub(items.len() as u64),
            items,
            revision,
        })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        let guard = Compare::create_revision(self.full_key(key), CompareOp::Equal, 0);
        let put = TxnOp::put(self.full_key(key), value.to_vec(), None);
        let (ok, revision, _) = self.cas(key, guard, put, "create").await?;
        if !ok {
            return Err(StoreError::AlreadyExists {
                key: key.to_owned(),
            });
        }
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: revision,
            mod_revision: revision,
        })
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        let guard = self.exists_guard(key, expected);
        let put = TxnOp::put(
            self.full_key(key),
            value.to_vec(),
            Some(PutOptions::new().with_prev_key()),
        );
        let (ok, revision, responses) = self.cas(key, guard, put, "update").await?;
        if !ok {
            return Err(self.guard_failed(key, expected, &responses));
        }
        let create_revision = responses
            .iter()
            .find_map(|r| match r {
                TxnOpResponse::Put(put) => {
                    put.prev_key().map(etcd_client::KeyValue::create_revision)
                }
                _ => None,
            })
            .ok_or_else(|| {
                StoreError::Unavailable(format!(
                    "etcd update of {key:?} returned no previous value"
                ))
            })?;
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision,
            mod_revision: revision,
        })
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        let guard = self.exists_guard(key, expected);
        let delete = TxnOp::delete(
            self.full_key(key),
            Some(DeleteOptions::new().with_prev_key()),
        );
        let (ok, _, responses) = self.cas(key, guard, delete, "delete").await?;
        if !ok {
            return Err(self.guard_failed(key, expected, &responses));
        }
        let prev = responses.iter().find_map(|r| match r {
            TxnOpResponse::Delete(delete) => delete.prev_kvs().first().cloned(),
            _ => None,
        });
        match prev {
            Some(prev) => self.to_kv(&prev),
            None => Err(StoreError::Unavailable(format!(
                "etcd delete of {key:?} returned no previous value"
            ))),
        }
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        check_prefix(prefix)?;
        if from < 0 {
            return Err(StoreError::InvalidArgument(format!(
                "watch revision {from} is negative"
            )));
        }
        // A range at `from` fails exactly when a watch from `from` cannot be served
        // (compacted, or in the future), and etcd's watch itself only says so later.
        if from > 0 {
            let probe = GetOptions::new()
                .with_range(self.range_end(prefix))
                .with_revision(from)
                .with_count_only();
            if let Err(e) = self
                .kv
                .clone()
                .get(self.range_start(prefix), Some(probe))
                .await
            {
                return Err(self.revision_error(e, from, "watch").await);
            }
        }
        let options = WatchOptions::new()
            .with_range(self.range_end(prefix))
            .with_start_revision(from + 1)
            .with_prev_key();
        let stream = self
            .watch
            .clone()
            .watch(self.range_start(prefix), Some(options))
            .await
            .map_err(etcd("start watch"))?;
        let watcher = EtcdWatcher {
            store: self.clone(),
            stream,
            pending: VecDeque::new(),
            last: from,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(watcher, |mut w| async {
            let item = w.next().await?;
            Some((item, w))
        })))
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let response = self
            .kv
            .clone()
            .get(self.full_key(""), Some(GetOptions::new().with_count_only()))
            .await
            .map_err(etcd("read the current revision"))?;
        response
            .header()
            .map(etcd_client::ResponseHeader::revision)
            .ok_or_else(|| StoreError::Unavailable("etcd response without a header".to_owned()))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let options = etcd_client::CompactionOptions::new().with_physical();
        match self.kv.clone().compact(revision, Some(options)).await {
            Ok(_) => Ok(()),
            // Already compacted at or past it: nothing to do.
            Err(e) if message_of(&e).is_some_and(|m| m.contains(COMPACTED)) => Ok(()),
            Err(e) => Err(self.revision_error(e, revision, "compact").await),
        }
    }
}

struct EtcdWatcher {
    store: EtcdStore,
    stream: etcd_client::WatchStream,
    pending: VecDeque<WatchEvent>,
    last: Revision,
    done: bool,
}

impl EtcdWatcher {
    async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.last = event.revision();
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            let response = match self.stream.message().await {
                Ok(Some(response)) => response,
                Ok(None) => {
                    self.done = true;
                    return Some(Err(StoreError::Unavailable(
                        "etcd closed the watch stream".to_owned(),
                    )));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(StoreError::Etcd {
                        context: "watch",
                        source: e,
                    }));
                }
            };
            if response.canceled() {
                self.done = true;
                return Some(Err(if response.compact_revision() > 0 {
                    StoreError::Compacted {
                        requested: self.last,
                        compacted: response.compact_revision(),
                    }
                } else {
                    StoreError::Unavailable(format!(
                        "etcd canceled the watch: {}",
                        response.cancel_reason()
                    ))
                }));
            }
            for event in response.events() {
                match self.convert(event) {
                    Ok(event) => self.pending.push_back(event),
                    Err(e) => {
                        self.done = true;
                        self.pending.clear();
                        return Some(Err(e));
                    }
                }
            }
        }
    }

    fn convert(&self, event: &etcd_client::Event) -> Result<WatchEvent, StoreError> {
        let kv = event
            .kv()
            .ok_or_else(|| StoreError::Unavailable("etcd watch event without a key".to_owned()))?;
        let prev = event.prev_kv().map(|p| self.store.to_kv(p)).transpose()?;
        // etcd leaves out the previous value when it was compacted away; the watcher can't
        // tell an update from a create then, so it must start over like any compacted one.
        let prev_lost = || StoreError::Compacted {
            requested: self.last,
            compacted: kv.mod_revision(),
        };
        match event.event_type() {
            EventType::Put => {
                if prev.is_none() && kv.version() > 1 {
                    return Err(prev_lost());
                }
                Ok(WatchEvent::Put {
                    kv: self.store.to_kv(kv)?,
                    prev,
                })
            }
            EventType::Delete => Ok(WatchEvent::Delete {
                prev: prev.ok_or_else(prev_lost)?,
                revision: kv.mod_revision(),
            }),
        }
    }
}
