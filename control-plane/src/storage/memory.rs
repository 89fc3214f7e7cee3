//! An in-process store with the full semantics of [`Store`]: the reference model the real
//! stores are checked against, and the store of the API server's unit tests.
//!
//! Everything lives under one mutex; history grows until `compact` is called.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::broadcast;

use super::watch::{self, Batch, History};
use super::{
    INITIAL_REVISION, KeyValue, ListOptions, ListResult, Revision, Store, StoreError, WatchEvent,
    WatchStream, check_key, check_prefix,
};

/// One value a key had; `value: None` marks a delete.
#[derive(Clone, Debug)]
struct Version {
    revision: Revision,
    create_revision: Revision,
    value: Option<Bytes>,
}

#[derive(Debug)]
struct State {
    revision: Revision,
    compacted: Revision,
    /// Each key's versions in revision order.
    keys: BTreeMap<String, Vec<Version>>,
    /// Every event with a revision above `compacted`, in revision order.
    log: VecDeque<WatchEvent>,
}

struct Inner {
    state: Mutex<State>,
    live: broadcast::Sender<Batch>,
}

/// The in-memory store. Cloning gives another handle to the same data.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    revision: INITIAL_REVISION,
                    compacted: 0,
                    keys: BTreeMap::new(),
                    log: VecDeque::new(),
                }),
                live: watch::live_channel(),
            }),
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves whole versions only (each write pushes after
        // all checks), so the data is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records one write: appends its event to the log and publishes it. Done under the lock
    /// so events reach the live channel in revision order.
    fn publish(&self, state: &mut State, event: WatchEvent) {
        state.log.push_back(event.clone());
        let batch: Batch = Arc::new([event]);
        // No receivers is not an error: nobody is watching.
        let _ = self.live.send(batch);
    }
}

impl State {
    fn current(&self, key: &str) -> Option<KeyValue> {
        let version = self.keys.get(key)?.last()?;
        version_to_kv(key, version)
    }

    fn check_revision(&self, requested: Revision) -> Result<(), StoreError> {
        if requested < self.compacted {
            return Err(StoreError::Compacted {
                requested,
                compacted: self.compacted,
            });
        }
        if requested > self.revision {
            return Err(StoreError::FutureRevision {
                requested,
                current: self.revision,
            });
        }
        Ok(())
    }
}

fn version_to_kv(key: &str, version: &Version) -> Option<KeyValue> {
    Some(KeyValue {
        key: key.to_owned(),
        value: version.value.clone()?,
        create_revision: version.create_revision,
        mod_revision: version.revision,
    })
}

fn check_expected(
    key: &str,
    current: &KeyValue,
    expected: Option<Revision>,
) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != current.mod_revision => Err(StoreError::Conflict {
            key: key.to_owned(),
            expected,
            current: current.mod_revision,
        }),
        _ => Ok(()),
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        Ok(self.inner.lock().current(key))
    }

    async fn list(&self, prefix: &str, opts: ListOptions) -> Result<ListResult, StoreError> {
        check_prefix(prefix)?;
        let state = self.inner.lock();
        let revision = match opts.revision {
            Some(r) if r <= 0 => {
                return Err(StoreError::InvalidArgument(format!(
                    "list revision {r} is not positive"
                )));
            }
            Some(r) => {
                state.check_revision(r)?;
                r
            }
            None => state.revision,
        };
        let start = match &opts.start_after {
            Some(after) if after.as_str() >= prefix => Bound::Excluded(after.clone()),
            _ => Bound::Included(prefix.to_owned()),
        };
        let limit = opts.limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut remaining = 0u64;
        for (key, versions) in state.keys.range((start, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            let Some(version) = versions.iter().rev().find(|v| v.revision <= revision) else {
                continue;
            };
            let Some(kv) = version_to_kv(key, version) else {
                continue;
            };
            if items.len() < limit {
                items.push(kv);
            } else {
                remaining += 1;
            }
        }
        Ok(ListResult {
            items,
            revision,
            remaining,
        })
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        let mut state = self.inner.lock();
        if state.current(key).is_some() {
            return Err(StoreError::AlreadyExists {
                key: key.to_owned(),
            });
        }
        let revision = state.revision + 1;
        state.revision = revision;
        state.keys.entry(key.to_owned()).or_default().push(Version {
            revision,
            create_revision: revision,
            value: Some(value.clone()),
        });
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: revision,
            mod_revision: revision,
        };
        self.inner.publish(
            &mut state,
            WatchEvent::Put {
                kv: kv.clone(),
                prev: None,
            },
        );
        Ok(kv)
    }

    async fn update(
        &self,
        key: &str,
        value: Bytes,
        expected: Option<Revision>,
    ) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        let mut state = self.inner.lock();
        let Some(prev) = state.current(key) else {
            return Err(StoreError::NotFound {
                key: key.to_owned(),
            });
        };
        check_expected(key, &prev, expected)?;
        let revision = state.revision + 1;
        state.revision = revision;
        state.keys.entry(key.to_owned()).or_default().push(Version {
            revision,
            create_revision: prev.create_revision,
            value: Some(value.clone()),
        });
        let kv = KeyValue {
            key: key.to_owned(),
            value,
            create_revision: prev.create_revision,
            mod_revision: revision,
        };
        self.inner.publish(
            &mut state,
            WatchEvent::Put {
                kv: kv.clone(),
                prev: Some(prev),
            },
        );
        Ok(kv)
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        let mut state = self.inner.lock();
        let Some(prev) = state.current(key) else {
            return Err(StoreError::NotFound {
                key: key.to_owned(),
            });
        };
        check_expected(key, &prev, expected)?;
        let revision = state.revision + 1;
        state.revision = revision;
        state.keys.entry(key.to_owned()).or_default().push(Version {
            revision,
            create_revision: prev.create_revision,
            value: None,
        });
        self.inner.publish(
            &mut state,
            WatchEvent::Delete {
                prev: prev.clone(),
                revision,
            },
        );
        Ok(prev)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        check_prefix(prefix)?;
        watch::start(self.inner.clone(), &self.inner.live, prefix, from).await
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.lock().revision)
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut state = self.inner.lock();
        if revision > state.revision {
            return Err(StoreError::FutureRevision {
                requested: revision,
                current: state.revision,
            });
        }
        if revision <= state.compacted {
            return Ok(());
        }
        state.keys.retain(|_, versions| {
            // Keep the value each key had at `revision` (lists at `revision` still work), and
            // everything after it; a delete at or before `revision` needs no record.
            let keep_from = versions
                .iter()
                .rposition(|v| v.revision <= revision)
                .map_or(0, |i| {
                    if versions[i].value.is_some() {
                        i
                    } else {
                        i + 1
                    }
                });
            versions.drain(..keep_from);
            !versions.is_empty()
        });
        while state.log.front().is_some_and(|e| e.revision() <= revision) {
            state.log.pop_front();
        }
        state.compacted = revision;
        Ok(())
    }
}

#[async_trait]
impl History for Inner {
    async fn events_after(
        &self,
        prefix: &str,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<WatchEvent>, StoreError> {
        let state = self.lock();
        state.check_revision(after)?;
        let start = state.log.partition_point(|e| e.revision() <= after);
        Ok(state
            .log
            .range(start..)
            .filter(|e| e.key().starts_with(prefix))
            .take(limit)
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn history_is_trimmed_by_compaction() {
        let store = MemoryStore::new();
        let a = store.create("/a", Bytes::from_static(b"1")).await.unwrap();
        store
            .update("/a", Bytes::from_static(b"2"), Some(a.mod_revision))
            .await
            .unwrap();
        store.create("/b", Bytes::from_static(b"1")).await.unwrap();
        store.delete("/b", None).await.unwrap();
        let rev = store.current_revision().await.unwrap();
        store.compact(rev).await.unwrap();
        let state = store.inner.lock();
        assert_eq!(state.keys.len(), 1, "deleted key /b has no history left");
        assert_eq!(
            state.keys["/a"].len(),
            1,
            "only the value at the compaction is kept"
        );
        assert!(state.log.is_empty());
    }
}
