//! A de-duplicating work queue of object keys. A key added many times before a worker takes it
//! is processed once; a key added while it is being processed is processed again afterwards,
//! never by two workers at once.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Default)]
struct Inner {
    queue: VecDeque<String>,
    queued: HashSet<String>,
    active: HashSet<String>,
    /// Added while active: goes back in the queue when done.
    again: HashSet<String>,
}

#[derive(Clone, Default)]
pub struct WorkQueue {
    inner: Arc<Mutex<Inner>>,
    notify: Arc<Notify>,
}

impl WorkQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn add(&self, key: impl Into<String>) {
        let key = key.into();
        let mut q = self.lock();
        if q.active.contains(&key) {
            q.again.insert(key);
            return;
        }
        if q.queued.insert(key.clone()) {
            q.queue.push_back(key);
            drop(q);
            self.notify.notify_one();
        }
    }

    /// Adds the key after `delay` (retries, minReadySeconds, deadlines).
    pub fn add_after(&self, key: impl Into<String>, delay: Duration) {
        let key = key.into();
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            me.add(key);
        });
    }

    /// Takes the next key without waiting.
    pub fn try_next(&self) -> Option<String> {
        let mut q = self.lock();
        let key = q.queue.pop_front()?;
        q.queued.remove(&key);
        q.active.insert(key.clone());
        Some(key)
    }

    /// Waits for the next key. Call [`WorkQueue::done`] when finished with it.
    pub async fn next(&self) -> String {
        loop {
            let notified = self.notify.notified();
            if let Some(k) = self.try_next() {
                return k;
            }
            notified.await;
        }
    }

    pub fn done(&self, key: &str) {
        let mut q = self.lock();
        q.active.remove(key);
        if q.again.remove(key) && q.queued.insert(key.to_owned()) {
            q.queue.push_back(key.to_owned());
            drop(q);
            self.notify.notify_one();
        }
    }

    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_collapse() {
        let q = WorkQueue::new();
        q.add("a");
        q.add("b");
        q.add("a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.try_next().as_deref(), Some("a"));
        assert_eq!(q.try_next().as_deref(), Some("b"));
        assert_eq!(q.try_next(), None);
    }

    #[test]
    fn a_key_added_while_active_comes_back_once_after_done() {
        let q = WorkQueue::new();
        q.add("a");
        let k = q.try_next().unwrap();
        q.add("a");
        q.add("a");
        assert_eq!(
            q.try_next(),
            None,
            "never handed to a second worker while active"
        );
        q.done(&k);
        assert_eq!(q.try_next().as_deref(), Some("a"));
        q.done("a");
        assert_eq!(q.try_next(), None);
    }

    #[tokio::test]
    async fn next_waits_for_an_add() {
        let q = WorkQueue::new();
        let q2 = q.clone();
        let waiter = tokio::spawn(async move { q2.next().await });
        tokio::task::yield_now().await;
        q.add("x");
        assert_eq!(waiter.await.unwrap(), "x");
    }
}
