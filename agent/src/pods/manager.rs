//! The pod watch: lists and watches pods bound to this node (`spec.nodeName`), hands each
//! to its own worker task, relists after watch errors or 410 Gone, and tears down sandboxes
//! of pods that no longer exist (deleted while the agent was down).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::api::{Api, ApiError, ListParams, WatchEvent};
use crate::cni::Network;
use crate::cri::Runtime;

use super::observed::labels;
use super::runtime_events::{ContainerEvents, is_unsupported};
use super::spec::managed_selector;
use super::static_pods;
use super::worker::{Deps, PodWorker, teardown};

struct Handle {
    tx: watch::Sender<Option<Pod>>,
    wake: Arc<Notify>,
}

/// How often event-driven workers look at their pod anyway (the safety net).
pub const RELIST: Duration = Duration::from_secs(10);

/// Runs one worker per pod of this node.
pub struct PodManager<A, R, N> {
    deps: Arc<Deps<A, R, N>>,
    workers: Arc<Mutex<HashMap<String, Handle>>>,
    /// Pods already torn down; late events for them start nothing.
    done: Arc<Mutex<HashSet<String>>>,
    /// True while the runtime's event stream is up.
    event_driven: Arc<AtomicBool>,
    relist: Duration,
    /// Static pods running now (they are not in the API's list): namespace and name by uid.
    static_uids: Arc<Mutex<HashMap<String, (String, String)>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<A: Api, R: Runtime, N: Network> PodManager<A, R, N> {
    pub fn new(deps: Arc<Deps<A, R, N>>) -> PodManager<A, R, N> {
        PodManager {
            deps,
            workers: Arc::default(),
            done: Arc::default(),
            event_driven: Arc::default(),
            relist: RELIST,
            static_uids: Arc::default(),
        }
    }

    /// Runs the static pods of `dir` until shutdown: re-reads it every `period`, starts
    /// new manifests, tears down pods whose manifest changed or went away, and keeps a
    /// mirror pod in the API for each.
    pub async fn run_static(
        self: Arc<Self>,
        dir: std::path::PathBuf,
        period: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            self.sync_static(&dir).await;
            if wait_or_shutdown(&mut shutdown, period).await {
                return;
            }
        }
    }

    /// One pass of [`run_static`](Self::run_static).
    pub async fn sync_static(&self, dir: &std::path::Path) {
        let (pods, errors) = static_pods::load_dir(dir, &self.deps.ctx.node_name);
        for e in errors {
            warn!(error = %e, "static pod manifest skipped");
        }
        let now: HashMap<String, (String, String)> = pods
            .iter()
            .map(|p| {
                let key = super::PodKey::of(p);
                (key.uid, (key.namespace, key.name))
            })
            .collect();
        let before = std::mem::replace(&mut *lock(&self.static_uids), now.clone());
        let names: HashSet<&(String, String)> = now.values().collect();
        for (uid, name) in &before {
            if now.contains_key(uid) {
                continue;
            }
            info!(uid = %uid, "static pod manifest gone or changed; tearing the pod down");
            self.gone(uid);
            if !names.contains(name) {
                self.delete_mirror(&name.0, &name.1).await;
            }
        }
        for pod in pods {
            let key = super::PodKey::of(&pod);
            self.ensure_mirror(&pod).await;
            // A manifest put back after its pod was torn down runs again.
            if !lock(&self.workers).contains_key(&key.uid) {
                lock(&self.done).remove(&key.uid);
            }
            self.dispatch(pod);
        }
        // Mirrors of pods no longer in the dir (left by an earlier run) go away.
        let Ok(list) = self
            .deps
            .api
            .list::<Pod>(
                None,
                &ListParams::fields(format!("spec.nodeName={}", self.deps.ctx.node_name)),
            )
            .await
        else {
            return;
        };
        for m in list.items.iter().filter(|p| static_pods::is_mirror(p)) {
            let key = super::PodKey::of(m);
            if !names.contains(&(key.namespace.clone(), key.name.clone())) {
                self.delete_mirror(&key.namespace, &key.name).await;
            }
        }
    }

    async fn delete_mirror(&self, namespace: &str, name: &str) {
        let params = crate::api::DeleteParams {
            grace_period_seconds: Some(0),
            uid: None,
        };
        match self
            .deps
            .api
            .delete::<Pod>(Some(namespace), name, &params)
            .await
        {
            Ok(()) => info!(pod = %name, "mirror pod deleted"),
            Err(e) if e.is_not_found() => {}
            Err(e) => warn!(pod = %name, error = %e, "deleting a mirror pod failed"),
        }
    }

    /// Creates the mirror of static pod `pod`, replacing one of an older manifest.
    async fn ensure_mirror(&self, pod: &Pod) {
        let key = super::PodKey::of(pod);
        let hash = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(static_pods::HASH))
            .cloned();
        match self
            .deps
            .api
            .get::<Pod>(Some(&key.namespace), &key.name)
            .await
        {
            Ok(Some(existing)) => {
                let same = existing
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(static_pods::MIRROR))
                    .cloned()
                    == hash;
                if same {
                    return;
                }
                self.delete_mirror(&key.namespace, &key.name).await;
            }
            Ok(None) => {}
            Err(e) => {
                warn!(pod = %key, error = %e, "looking up a mirror pod failed");
                return;
            }
        }
        match self
            .deps
            .api
            .create(Some(&key.namespace), &static_pods::mirror_of(pod))
            .await
        {
            Ok(_) => info!(pod = %key, "mirror pod created"),
            Err(e) => warn!(pod = %key, error = %e, "creating a mirror pod failed"),
        }
    }

    /// Sets how often event-driven workers look on their own (tests make it long, to see
    /// that events alone wake them).
    pub fn with_relist(mut self, relist: Duration) -> Self {
        self.relist = relist;
        self
    }

    /// Whether the runtime's event stream is driving the workers now.
    pub fn event_driven(&self) -> bool {
        self.event_driven.load(Ordering::Relaxed)
    }

    /// Wakes the worker of the pod with `uid` for a sync now.
    pub fn wake(&self, uid: &str) {
        if let Some(h) = lock(&self.workers).get(uid) {
            h.wake.notify_one();
        }
    }

    /// Wakes every worker.
    pub fn wake_all(&self) {
        for h in lock(&self.workers).values() {
            h.wake.notify_one();
        }
    }

    /// Follows the runtime's container events until shutdown, waking the worker of each
    /// event's pod. Returns at once if the runtime has no event stream (workers poll
    /// then); re-subscribes after errors, waking everyone so nothing missed is lost.
    pub async fn watch_runtime<E: ContainerEvents>(
        self: Arc<Self>,
        source: Arc<E>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            if *shutdown.borrow() {
                return;
            }
            let mut stream = match source.subscribe().await {
                Ok(s) => s,
                Err(e) if is_unsupported(&e) => {
                    info!("the runtime has no container event stream; pod workers poll");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "subscribing to runtime events failed; retrying");
                    if wait_or_shutdown(&mut shutdown, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            info!("following the runtime's container events");
            self.event_driven.store(true, Ordering::Relaxed);
            self.wake_all();
            loop {
                let next = tokio::select! {
                    n = stream.next() => n,
                    _ = shutdown.changed() => return,
                };
                match next {
                    Some(Ok(ev)) => match ev.pod_uid {
                        Some(uid) => self.wake(&uid),
                        None => self.wake_all(),
                    },
                    Some(Err(e)) => {
                        warn!(error = %e, "runtime event stream failed");
                        break;
                    }
                    None => break,
                }
            }
            self.event_driven.store(false, Ordering::Relaxed);
            self.wake_all();
        }
    }

    /// Number of pods with a worker.
    pub fn worker_count(&self) -> usize {
        lock(&self.workers).len()
    }

    /// Hands the newest version of `pod` to its worker, starting one if needed.
    pub fn dispatch(&self, pod: Pod) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        // A mirror stands for a static pod that runs from its manifest.
        if static_pods::is_mirror(&pod) {
            return;
        }
        if lock(&self.done).contains(&uid) {
            return;
        }
        let mut workers = lock(&self.workers);
        if let Some(h) = workers.get(&uid) {
            h.tx.send_replace(Some(pod));
            return;
        }
        let (tx, rx) = watch::channel(Some(pod.clone()));
        let mut worker = PodWorker::new(self.deps.clone(), pod);
        worker.set_event_driven(self.event_driven.clone(), self.relist);
        workers.insert(
            uid.clone(),
            Handle {
                tx,
                wake: worker.waker(),
            },
        );
        let all = self.workers.clone();
        let done = self.done.clone();
        tokio::spawn(async move {
            worker.run(rx).await;
            lock(&all).remove(&uid);
            lock(&done).insert(uid);
        });
    }

    /// The pod with `uid` is gone from the API.
    pub fn gone(&self, uid: &str) {
        if let Some(h) = lock(&self.workers).get(uid) {
            h.tx.send_replace(None);
        }
    }

    /// Tears down sandboxes this agent made for pods not in `known` and without a worker.
    pub async fn remove_orphans(&self, known: &HashSet<String>) {
        let sandboxes = match self
            .deps
            .runtime
            .list_pod_sandboxes(managed_selector())
            .await
        {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "listing sandboxes for orphans");
                return;
            }
        };
        let orphans: HashSet<String> = sandboxes
            .iter()
            .filter_map(|s| s.labels.get(labels::POD_UID).cloned())
            .filter(|uid| !known.contains(uid) && !lock(&self.workers).contains_key(uid))
            .collect();
        for uid in orphans {
            info!(uid = %uid, "tearing down the sandbox of a pod that no longer exists");
            let deps = self.deps.clone();
            tokio::spawn(async move {
                let pod = Pod::default();
                if let Err(e) = teardown(&deps, &pod, &uid, 0).await {
                    warn!(uid = %uid, error = %e, "orphan teardown failed");
                }
            });
        }
    }

    /// Lists, then watches, forever (until `shutdown` turns true).
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let params = ListParams::fields(format!("spec.nodeName={}", self.deps.ctx.node_name));
        loop {
            if *shutdown.borrow() {
                return;
            }
            let rv = match self.relist(&params).await {
                Ok(rv) => rv,
                Err(e) => {
                    warn!(error = %e, "listing pods failed; retrying");
                    if wait_or_shutdown(&mut shutdown, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            let stream = match self.deps.api.watch::<Pod>(None, &params, &rv).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "watching pods failed; relisting");
                    if wait_or_shutdown(&mut shutdown, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            let mut stream = stream;
            loop {
                let next = tokio::select! {
                    n = stream.next() => n,
                    _ = shutdown.changed() => return,
                };
                match next {
                    Some(Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod))) => {
                        self.dispatch(pod);
                    }
                    Some(Ok(WatchEvent::Deleted(pod))) => {
                        if let Some(uid) = &pod.metadata.uid {
                            self.gone(uid);
                        }
                    }
                    Some(Ok(WatchEvent::Bookmark(_))) => {}
                    Some(Err(ApiError::Gone { .. })) => {
                        info!("pod watch expired (410); relisting");
                        break;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "pod watch failed; relisting");
                        break;
                    }
                    None => break,
                }
            }
        }
    }

    async fn relist(&self, params: &ListParams) -> Result<String, ApiError> {
        let list = self.deps.api.list::<Pod>(None, params).await?;
        let mut known: HashSet<String> = list
            .items
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        known.extend(lock(&self.static_uids).keys().cloned());
        // Static pods started since `known` was made are not stale either.
        let statics = lock(&self.static_uids).clone();
        let stale: Vec<String> = lock(&self.workers)
            .keys()
            .filter(|uid| !known.contains(*uid) && !statics.contains_key(*uid))
            .cloned()
            .collect();
        for uid in stale {
            self.gone(&uid);
        }
        for pod in list.items {
            self.dispatch(pod);
        }
        self.remove_orphans(&known).await;
        Ok(list.resource_version)
    }
}

/// Sleeps for `d`; true if shutdown was requested meanwhile.
async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        () = tokio::time::sleep(d) => *shutdown.borrow(),
    }
}
