//! Periodic compaction, as the Kubernetes API server does it: every interval, drop the
//! history older than the revision seen one interval ago. A watcher that is not more than
//! one interval behind can always resume; history never grows without bound.

use std::sync::Arc;
use std::time::Duration;

use super::{Revision, Store, StoreError};

/// Remembers the revision of the previous tick.
#[derive(Debug, Default)]
pub struct Compactor {
    previous: Option<Revision>,
}

impl Compactor {
    pub fn new() -> Self {
        Self::default()
    }

    /// One step: compacts at the revision seen at the previous step (if any) and remembers
    /// the current one. Returns the revision compacted at.
    pub async fn tick(&mut self, store: &dyn Store) -> Result<Option<Revision>, StoreError> {
        let current = store.current_revision().await?;
        let compacted = match self.previous {
            Some(previous) if previous < current => {
                store.compact(previous).await?;
                Some(previous)
            }
            _ => None,
        };
        self.previous = Some(current);
        Ok(compacted)
    }
}

/// Runs a [`Compactor`] every `interval` until the task is dropped. Errors are logged and
/// the next tick tries again.
pub async fn run(store: Arc<dyn Store>, interval: Duration) {
    let mut compactor = Compactor::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        match compactor.tick(&*store).await {
            Ok(Some(revision)) => tracing::debug!(revision, "store compacted"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "store compaction failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::storage::memory::MemoryStore;
    use crate::storage::{ListOptions, StoreError};

    #[tokio::test]
    async fn each_tick_compacts_what_the_previous_tick_saw() {
        let store = MemoryStore::new();
        let mut compactor = Compactor::new();
        store.create("/a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(
            compactor.tick(&store).await.unwrap(),
            None,
            "first tick only looks"
        );
        let seen = store.current_revision().await.unwrap();
        store.create("/b", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(compactor.tick(&store).await.unwrap(), Some(seen));
        let err = store
            .list(
                "/",
                ListOptions {
                    revision: Some(seen - 1),
                    ..ListOptions::default()
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Compacted { compacted, .. } if compacted == seen));
        // Nothing written since: nothing to do.
        let before = store.current_revision().await.unwrap();
        compactor.tick(&store).await.unwrap();
        assert_eq!(compactor.tick(&store).await.unwrap(), None);
        assert_eq!(store.current_revision().await.unwrap(), before);
    }
}
