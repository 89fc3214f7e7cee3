//! The watch cache: recent store events kept in memory and fanned out to API watchers, so
//! any number of `watch=true` requests share ONE store watch.
//!
//! It keeps a window of the latest events. A watch from a revision inside the window replays
//! the events after it and then follows live ones; a revision older than the window is
//! answered with 410 Gone, and the client lists again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use tokio::sync::broadcast;

use crate::storage::{Revision, Store, StoreError, WatchEvent};

/// How many events the cache keeps for watchers that resume from a past revision.
pub const WINDOW: usize = 10_000;

struct Inner {
    events: VecDeque<Arc<WatchEvent>>,
    /// Watches from any revision >= this one can be served from the window.
    oldest: Revision,
    /// The revision of the newest event seen.
    latest: Revision,
}

pub struct WatchCache {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Arc<WatchEvent>>,
}

/// What a watcher gets: the buffered events after its revision, then the live channel.
pub struct Subscription {
    pub backlog: Vec<Arc<WatchEvent>>,
    pub live: broadcast::Receiver<Arc<WatchEvent>>,
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
            }),
            live,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds one event (in revision order) and hands it to the live watchers.
    pub fn push(&self, event: WatchEvent) {
        let event = Arc::new(event);
        let mut inner = self.lock();
        inner.latest = inner.latest.max(event.revision());
        inner.events.push_back(event.clone());
        while inner.events.len() > WINDOW {
            if let Some(dropped) = inner.events.pop_front() {
                inner.oldest = dropped.revision();
            }
        }
        // Sent under the lock so a subscriber never misses or doubles an event.
        let _ = self.live.send(event);
    }

    /// Forgets everything before `revision` (after the store watch had to restart).
    pub fn reset(&self, revision: Revision) {
        let mut inner = self.lock();
        inner.events.clear();
        inner.oldest = revision;
        inner.latest = inner.latest.max(revision);
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
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
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
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
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

    #[tokio::test]
    async fn live_events_reach_subscribers() {
        let cache = WatchCache::new(1);
        let mut sub = cache.subscribe(1).expect("in window");
        cache.push(put("/a", 2));
        let got = sub.live.recv().await.expect("live event");
        assert_eq!(got.revision(), 2);
    }
}
