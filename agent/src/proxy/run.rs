//! The proxy's loop: apply watch events as they come, sync at most every
//! `min_sync_interval`, resync everything every `full_sync_interval`, and check the canary
//! every `canary_interval`. Syncs run on the blocking pool: they wait for `iptables-restore`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::health::HealthServer;
use super::proxier::{Proxier, SyncError, SyncReport};
use super::state::Change;

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    pub min_sync_interval: Duration,
    pub full_sync_interval: Duration,
    pub canary_interval: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            min_sync_interval: Duration::from_secs(1),
            full_sync_interval: Duration::from_secs(3600),
            canary_interval: Duration::from_secs(30),
        }
    }
}

pub(super) fn lock(p: &Mutex<Proxier>) -> std::sync::MutexGuard<'_, Proxier> {
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn blocking<T: Send + 'static>(
    p: &Arc<Mutex<Proxier>>,
    f: impl FnOnce(&mut Proxier) -> T + Send + 'static,
) -> Option<T> {
    let p = p.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&p)))
        .await
        .ok()
}

/// Runs until `shutdown` turns true or the change channel closes. `synced` receives every
/// sync's outcome (the agent logs or exports it; tests wait on it).
pub async fn run(
    proxier: Arc<Mutex<Proxier>>,
    mut changes: mpsc::Receiver<Change>,
    timing: Timing,
    mut health: Option<HealthServer>,
    mut shutdown: watch::Receiver<bool>,
    synced: Option<mpsc::UnboundedSender<Result<SyncReport, String>>>,
) {
    let mut last_sync: Option<Instant> = None;
    let mut next_full = Instant::now() + timing.full_sync_interval;
    let mut next_canary = Instant::now() + timing.canary_interval;
    loop {
        let wants_sync = lock(&proxier).needs_sync();
        let sync_at = match (wants_sync, last_sync) {
            (false, _) => None,
            (true, None) => Some(Instant::now()),
            (true, Some(t)) => Some(t + timing.min_sync_interval),
        };
        let wake = [sync_at, Some(next_full), Some(next_canary)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_full);
        tokio::select! {
            r = shutdown.changed() => {
                // A dropped sender stops the loop too (else `changed` fails at once, forever).
                if r.is_err() || *shutdown.borrow() { return; }
            }
            change = changes.recv() => {
                let Some(change) = change else { return };
                let mut p = lock(&proxier);
                p.apply(change);
                while let Ok(more) = changes.try_recv() {
                    p.apply(more);
                }
            }
            () = tokio::time::sleep_until(wake) => {
                let now = Instant::now();
                if now >= next_canary {
                    next_canary = now + timing.canary_interval;
                    if let Some(Err(e)) = blocking(&proxier, Proxier::check_canary).await {
                        tracing::warn!(error = %e, "canary check failed");
                    }
                }
                if now >= next_full {
                    next_full = now + timing.full_sync_interval;
                    lock(&proxier).request_full_sync();
                }
                if !lock(&proxier).needs_sync() || sync_at.is_some_and(|t| t > now) {
                    continue;
                }
                last_sync = Some(now);
                let result: Option<Result<SyncReport, SyncError>> = blocking(&proxier, Proxier::sync).await;
                let Some(result) = result else { continue };
                if let Some(h) = health.as_mut() {
                    let checks = lock(&proxier).health_checks();
                    for e in h.update(&checks) {
                        tracing::warn!(error = %e, "health check node port");
                    }
                }
                if let Some(tx) = &synced {
                    let _ = tx.send(result.map_err(|e| e.to_string()));
                }
            }
        }
    }
}
