//! The watch cache: recent store events kept in memory and fanned out to API watchers, so
//! any number of `watch=true` requests share ONE store watch.
//!
//! It keeps a window of the latest events. A watch from a revision inside the window replays
//! the events after it and then follows live ones; a revision older than the window is
//! answered with 410 Gone, and the client lists again.
//!
//! It also keeps every current object (primed by one list of the store, then kept by the
//! events), so a full list is served from memory once the cache has caught up with the
//! store's revision. Each object version carries a slot for its JSON as clients see it, filled
//! once by whoever needs it first and then shared by every list and watcher.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;

use futures::StreamExt;
use tokio::sync::broadcast;

use crate::storage::{KeyValue, ListOptions, Revision, Store, StoreError, WatchEvent};

/// How many events the cache keeps for watchers that resume from a past revision.
pub const WINDOW: usize = 10_000;

/// One version of one object.
pub struct CachedObject {
    pub kv: KeyValue,
    /// The object's JSON as clients see it (resourceVersion, apiVersion, kind set).
    json: OnceLock<Bytes>,
}

impl CachedObject {
    pub fn new(kv: KeyValue) -> Self {
        CachedObject {
            kv,
            json: OnceLock::new(),
        }
    }

    /// The client-facing JSON, made by `render` the first time it is asked for.
    pub fn json<E>(&self, render: impl FnOnce(&KeyValue) -> Result<Bytes, E>) -> Result<Bytes, E> {
        if let Some(json) = self.json.get() {
            return Ok(json.clone());
        }
        let json = render(&self.kv)?;
        Ok(self.json.get_or_init(|| json).clone())
    }
}

/// A store event with, for a put, the new object's shared cache entry.
pub struct CacheEvent {
    pub event: WatchEvent,
    pub object: Option<Arc<CachedObject>>,
}

impl CacheEvent {
    pub fn revision(&self) -> Revision {
        self.event.revision()
    }
}

struct Inner {
    events: VecDeque<Arc<CacheEvent>>,
    /// Watches from any revision >= this one can be served from the window.
    oldest: Revision,
    /// The revision of the newest event seen.
    latest: Revision,
    /// Every current object by key; meaningful only while `primed`.
    objects: BTreeMap<String, Arc<CachedObject>>,
    /// Whether `objects` holds the whole store as of `latest`.
    primed: bool,
}

pub struct WatchCache {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Arc<CacheEvent>>,
    /// `latest`, for waiting until the cache has caught up with a revision.
    progress: tokio::sync::watch::Sender<Revision>,
}

/// What a watcher gets: the buffered events after its revision, then the live channel.
pub struct Subscription {
    pub backlog: Vec<Arc<CacheEvent>>,
    pub live: broadcast::Receiver<Arc<CacheEvent>>,
}

impl WatchCache {
    /// An empty cache whose window starts at `revision`.
    pub fn new(revision: Revision) -> Arc<Self> {
        let (live, _) = broadcast::channel(WINDOW);
        Arc::new(WatchCache {
            inner: Mutex::new(Inner {
                events: VecDeque::new(),
                oldest: revision,
                latest: revision,
                objects: BTreeMap::new(),
                primed: false,
            }),
            live,
            progress: tokio::sync::watch::Sender::new(revision),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds one event (in revision order) and hands it to the live watchers.
    pub fn push(&self, event: WatchEvent) {
        let object = match &event {
            WatchEvent::Put { kv, .. } => Some(Arc::new(CachedObject::new(kv.clone()))),
            WatchEvent::Delete { .. } => None,
        };
        let event = Arc::new(CacheEvent { event, object });
        let mut inner = self.lock();
        inner.latest = inner.latest.max(event.revision());
        if inner.primed {
            let key = event.event.key().to_owned();
            match &event.object {
                Some(object) => {
                    inner.objects.insert(key, object.clone());
                }
                None => {
                    inner.objects.remove(&key);
                }
            }
        }
        inner.events.push_back(event.clone());
        while inner.events.len() > WINDOW {
            if let Some(dropped) = inner.events.pop_front() {
                inner.oldest = dropped.revision();
            }
        }
        // Sent under the lock so a subscriber never misses or doubles an event.
        let _ = self.live.send(event);
        let latest = inner.latest;
        drop(inner);
        self.progress.send_replace(latest);
    }

    /// Forgets everything before `revision` (after the store watch had to restart).
    pub fn reset(&self, revision: Revision) {
        let mut inner = self.lock();
        inner.events.clear();
        inner.objects.clear();
        inner.primed = false;
        inner.oldest = revision;
        inner.latest = inner.latest.max(revision);
    }

    /// Takes `objects`, the whole store under the watched prefix at the cache's latest
    /// revision, as the current state.
    pub fn prime(&self, objects: Vec<KeyValue>) {
        let mut inner = self.lock();
        inner.objects = objects
            .into_iter()
            .map(|kv| (kv.key.clone(), Arc::new(CachedObject::new(kv))))
            .collect();
        inner.primed = true;
    }

    /// Every current object under `prefix` and the revision they are current at; `None`
    /// until the cache is primed.
    pub fn list(&self, prefix: &str) -> Option<(Revision, Vec<Arc<CachedObject>>)> {
        let inner = self.lock();
        if !inner.primed {
            return None;
        }
        let items = inner
            .objects
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, object)| object.clone())
            .collect();
        Some((inner.latest, items))
    }

    /// Waits until the cache has seen `revision` (true), or `timeout` passes (false).
    pub async fn wait_for(&self, revision: Revision, timeout: Duration) -> bool {
        let mut progress = self.progress.subscribe();
        tokio::time::timeout(timeout, progress.wait_for(|latest| *latest >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Lists the store at the cache's latest revision and primes the cache with it.
    async fn load(&self, store: &dyn Store, prefix: &str) -> Result<(), StoreError> {
        let revision = self.latest();
        let mut items = Vec::new();
        let mut start_after = None;
        loop {
            let page = store
                .list(
                    prefix,
                    ListOptions {
                        revision: Some(revision),
                        start_after: start_after.take(),
                        limit: Some(1000),
                    },
                )
                .await?;
            let more = page.more();
            start_after = page.items.last().map(|kv| kv.key.clone());
            items.extend(page.items);
            if !more {
                break;
            }
        }
        self.prime(items);
        Ok(())
    }

    pub fn latest(&self) -> Revision {
        self.lock().latest
    }

    /// Events with a revision greater than `from` under `prefix`, then live ones; `None` if
    /// `from` is older than the window (410 Gone).
    pub fn subscribe(&self, from: Revision) -> Option<Subscription> {
        let inner = self.lock();
        if from < inner.oldest {
            return None;
        }
        let backlog = inner
            .events
            .iter()
            .filter(|e| e.revision() > from)
            .cloned()
            .collect();
        Some(Subscription {
            backlog,
            live: self.live.subscribe(),
        })
    }

    /// Feeds the cache from the store's watch of `prefix` until the store fails for good;
    /// restarts the store watch at the current revision when it ends (compaction, hiccup).
    pub async fn run(self: Arc<Self>, store: Arc<dyn Store>, prefix: String) {
        loop {
            if !self.lock().primed {
                match self.load(store.as_ref(), &prefix).await {
                    Ok(()) => {}
                    Err(StoreError::Compacted { .. }) => {
                        match store.current_revision().await {
                            Ok(rev) => self.reset(rev),
                            Err(e) => tracing::warn!(error = %e, "watch cache: reading revision"),
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watch cache: listing the store; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            let from = self.latest();
            let stream = match store.watch(&prefix, from).await {
                Ok(s) => s,
                Err(StoreError::Compacted { .. }) => {
                    match store.current_revision().await {
                        Ok(rev) => self.reset(rev),
                        Err(e) => tracing::warn!(error = %e, "watch cache: reading revision"),
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "watch cache: store watch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut stream = stream;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => self.push(event),
                    Err(e) => {
                        tracing::warn!(error = %e, "watch cache: store watch ended");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::storage::KeyValue;

    fn put(key: &str, rev: Revision) -> WatchEvent {
        WatchEvent::Put {
            kv: KeyValue {
                key: key.to_owned(),
                value: Bytes::from_static(b"{}"),
                create_revision: rev,
                mod_revision: rev,
            },
            prev: None,
        }
    }

    #[test]
    fn backlog_holds_only_events_after_the_revision() {
        let cache = WatchCache::new(1);
        for rev in 2..=5 {
            cache.push(put("/a", rev));
        }
        let sub = cache.subscribe(3).expect("in window");
        let revs: Vec<Revision> = sub.backlog.iter().map(|e| e.revision()).collect();
        assert_eq!(revs, [4, 5]);
        assert_eq!(cache.latest(), 5);
    }

    #[test]
    fn revisions_older_than_the_window_are_gone() {
        let cache = WatchCache::new(10);
        assert!(cache.subscribe(9).is_none());
        assert!(cache.subscribe(10).is_some());
        cache.reset(20);
        assert!(cache.subscribe(15).is_none());
    }

    #[test]
    fn a_primed_cache_lists_the_current_objects_under_a_prefix() {
        let cache = WatchCache::new(1);
        assert!(cache.list("/a/").is_none(), "not primed yet");
        let kv = |key: &str| KeyValue {
            key: key.to_owned(),
            value: Bytes::from_static(b"{}"),
            create_revision: 1,
            mod_revision: 1,
        };
        cache.prime(vec![kv("/a/1"), kv("/a/2"), kv("/ab/1"), kv("/b/1")]);
        cache.push(put("/a/3", 2));
        cache.push(WatchEvent::Delete {
            prev: kv("/a/1"),
            revision: 3,
        });
        let (rev, items) = cache.list("/a/").expect("primed");
        assert_eq!(rev, 3);
        let keys: Vec<&str> = items.iter().map(|o| o.kv.key.as_str()).collect();
        assert_eq!(keys, ["/a/2", "/a/3"]);
        cache.reset(10);
        assert!(cache.list("/a/").is_none(), "a reset needs a new prime");
    }

    #[test]
    fn an_objects_json_is_made_once() {
        let object = CachedObject::new(KeyValue {
            key: "/a".to_owned(),
            value: Bytes::from_static(b"{}"),
            create_revision: 1,
            mod_revision: 1,
        });
        let first = object.json(|_| Ok::<_, ()>(Bytes::from_static(b"one")));
        let second = object.json(|_| Ok::<_, ()>(Bytes::from_static(b"two")));
        assert_eq!(first, Ok(Bytes::from_static(b"one")));
        assert_eq!(second, Ok(Bytes::from_static(b"one")));
    }

    #[tokio::test]
    async fn waiting_for_a_revision_ends_when_the_cache_has_it() {
        let cache = WatchCache::new(1);
        assert!(cache.wait_for(1, Duration::from_secs(5)).await);
        let pusher = {
            let cache = cache.clone();
            tokio::spawn(async move { cache.push(put("/a", 2)) })
        };
        assert!(cache.wait_for(2, Duration::from_secs(30)).await);
        pusher.await.expect("pusher");
        assert!(!cache.wait_for(3, Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn live_events_reach_subscribers() {
        let cache = WatchCache::new(1);
        let mut sub = cache.subscribe(1).expect("in window");
        cache.push(put("/a", 2));
        let got = sub.live.recv().await.expect("live event");
        assert_eq!(got.revision(), 2);
    }
}
