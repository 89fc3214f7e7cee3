//! Watch streams for stores that keep their own history (memory, SQLite).
//!
//! Writers publish each committed batch of events once, on a bounded broadcast channel; a
//! watcher filters it by prefix. Memory stays bounded whatever the watchers do: a watcher that
//! falls more than the channel's capacity behind is not buffered for, it drops back to reading
//! its missing events from the store's history, a page at a time, and then rejoins the live
//! channel. Only when that history has been compacted meanwhile does the watch fail
//! (`Compacted`), and the client lists again.

use std::collections::VecDeque;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{Revision, StoreError, WatchEvent, WatchStream};

/// How many committed batches the live channel holds for the slowest watcher.
pub(crate) const LIVE_CAPACITY: usize = 1024;

/// How many events a lagging watcher reads from history at a time.
const REPLAY_PAGE: usize = 512;

/// A batch of events committed together, shared by all watchers.
pub(crate) type Batch = Arc<[WatchEvent]>;

/// Where a watcher reads the events it missed.
#[async_trait]
pub(crate) trait History: Send + Sync + 'static {
    /// Up to `limit` events under `prefix` with a revision greater than `after`, in revision
    /// order. Fails with `Compacted` if history after `after` is gone, `FutureRevision` if
    /// `after` is newer than the current revision.
    async fn events_after(
        &self,
        prefix: &str,
        after: Revision,
        limit: usize,
    ) -> Result<Vec<WatchEvent>, StoreError>;
}

pub(crate) fn live_channel() -> broadcast::Sender<Batch> {
    broadcast::channel(LIVE_CAPACITY).0
}

struct Watcher<H> {
    history: Arc<H>,
    prefix: String,
    /// Revision of the last event handed out (or the watch's start).
    last: Revision,
    live: broadcast::Receiver<Batch>,
    pending: VecDeque<WatchEvent>,
    replaying: bool,
    done: bool,
}

/// Starts a watch of `prefix` from `from`. Subscribes to `live` BEFORE reading history, so
/// every event committed after the history read is on the channel; duplicates are dropped by
/// revision. The first page is read here so that a bad `from` fails the call itself.
pub(crate) async fn start<H: History>(
    history: Arc<H>,
    live: &broadcast::Sender<Batch>,
    prefix: &str,
    from: Revision,
) -> Result<WatchStream, StoreError> {
    if from < 0 {
        return Err(StoreError::InvalidArgument(format!(
            "watch revision {from} is negative"
        )));
    }
    let rx = live.subscribe();
    let first = history.events_after(prefix, from, REPLAY_PAGE).await?;
    let watcher = Watcher {
        history,
        prefix: prefix.to_owned(),
        last: from,
        live: rx,
        replaying: first.len() >= REPLAY_PAGE,
        pending: first.into(),
        done: false,
    };
    Ok(Box::pin(futures::stream::unfold(watcher, |mut w| async {
        let item = w.next().await?;
        Some((item, w))
    })))
}

impl<H: History> Watcher<H> {
    async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.last = event.revision();
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if self.replaying {
                match self
                    .history
                    .events_after(&self.prefix, self.last, REPLAY_PAGE)
                    .await
                {
                    Ok(events) => {
                        self.replaying = events.len() >= REPLAY_PAGE;
                        self.pending.extend(events);
                        continue;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
            }
            match self.live.recv().await {
                Ok(batch) => {
                    let last = self.last;
                    self.pending.extend(
                        batch
                            .iter()
                            .filter(|e| e.revision() > last && e.key().starts_with(&self.prefix))
                            .cloned(),
                    );
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(
                        prefix = %self.prefix,
                        missed,
                        after = self.last,
                        "watcher fell behind the live channel, reading history"
                    );
                    self.replaying = true;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.done = true;
                    return Some(Err(StoreError::Unavailable(
                        "the store was closed".to_owned(),
                    )));
                }
            }
        }
    }
}
