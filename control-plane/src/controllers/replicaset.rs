//! The ReplicaSet controller: keeps `spec.replicas` active pods matching each ReplicaSet,
//! adopting matching orphans, releasing children that stopped matching, and reporting status.
//!
//! [`plan`] is the pure decision; [`ReplicaSetController::reconcile`] carries it out. Creates
//! and deletes are counted in [`Expectations`] so a ReplicaSet is not acted on again until the
//! watch has shown the effects of its last actions: watch lag never causes over-creation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::cache::{Cache, Event, reflect};
use super::client::{ClientError, ClusterClient, DeleteOptions, Typed, key_of, split_key};
use super::events::EventRecorder;
use super::pods::{
    controller_of, controller_ref, deletion_cost_key, is_active, is_available, is_ready,
    seconds_until_available,
};
use super::queue::WorkQueue;
use super::selector;

/// Never create or delete more than this many pods in one pass (upstream's burst limit).
pub const BURST: usize = 500;

/// Pending creates and deletes per controller key.
#[derive(Default)]
pub struct Expectations {
    inner: Mutex<HashMap<String, (i64, i64, Instant)>>,
}

/// Expectations older than this are considered met, so a lost watch event cannot stall a
/// ReplicaSet forever.
const EXPECTATION_TTL: Duration = Duration::from_secs(300);

impl Expectations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (i64, i64, Instant)>> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn expect(&self, key: &str, adds: i64, dels: i64) {
        self.lock()
            .insert(key.to_owned(), (adds, dels, Instant::now()));
    }

    pub fn observed_add(&self, key: &str) {
        if let Some(e) = self.lock().get_mut(key) {
            e.0 -= 1;
        }
    }

    pub fn observed_delete(&self, key: &str) {
        if let Some(e) = self.lock().get_mut(key) {
            e.1 -= 1;
        }
    }

    pub fn satisfied(&self, key: &str) -> bool {
        self.lock()
            .get(key)
            .is_none_or(|(a, d, at)| (*a <= 0 && *d <= 0) || at.elapsed() > EXPECTATION_TTL)
    }

    pub fn forget(&self, key: &str) {
        self.lock().remove(key);
    }
}

/// What one reconcile of a ReplicaSet should do.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Orphans to adopt (name, uid).
    pub adopt: Vec<(String, String)>,
    /// Children to release (name, uid).
    pub release: Vec<(String, String)>,
    pub create: usize,
    /// Children to delete (name, uid), in deletion preference order.
    pub delete: Vec<(String, String)>,
    pub status: ReplicaSetStatus,
    /// When a ready pod becomes available, reconcile again then.
    pub requeue_after: Option<Duration>,
}

fn name_uid(p: &Pod) -> (String, String) {
    (
        p.metadata.name.clone().unwrap_or_default(),
        p.metadata.uid.clone().unwrap_or_default(),
    )
}

/// The pods `rs` owns after adoption and release, and what to change to get there.
pub fn claim<'a>(rs: &ReplicaSet, pods: &'a [Arc<Pod>]) -> (Vec<&'a Pod>, Plan) {
    let mut plan = Plan::default();
    let uid = rs.metadata.uid.as_deref().unwrap_or_default();
    let spec = &rs.spec;
    let deleting = rs.metadata.deletion_timestamp.is_some();
    let mut owned = Vec::new();
    for p in pods {
        let matches = !selector::is_empty(&spec.selector)
            && selector::matches(&spec.selector, p.metadata.labels.as_ref());
        match controller_of(&p.metadata) {
            Some(o) if o.uid == uid => {
                if matches {
                    owned.push(p.as_ref());
                } else if p.metadata.deletion_timestamp.is_none() {
                    plan.release.push(name_uid(p));
                }
            }
            Some(_) => {}
            None => {
                if matches && !deleting && p.metadata.deletion_timestamp.is_none() && is_active(p) {
                    plan.adopt.push(name_uid(p));
                    owned.push(p.as_ref());
                }
            }
        }
    }
    (owned, plan)
}

/// Decides creates, deletes and status for `rs` given the pods in its namespace.
pub fn plan(rs: &ReplicaSet, pods: &[Arc<Pod>], now: Timestamp, may_scale: bool) -> Plan {
    let (owned, mut plan) = claim(rs, pods);
    let spec = Some(&rs.spec);
    let want = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let mut active: Vec<&Pod> = owned.iter().copied().filter(|p| is_active(p)).collect();
    if may_scale && rs.metadata.deletion_timestamp.is_none() {
        if active.len() < want {
            plan.create = (want - active.len()).min(BURST);
        } else if active.len() > want {
            active.sort_by_key(|p| deletion_cost_key(p));
            plan.delete = active
                .iter()
                .take((active.len() - want).min(BURST))
                .map(|p| name_uid(p))
                .collect();
        }
    }
    let template_labels = spec
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully_labeled = active
        .iter()
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            template_labels
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .count();
    let ready = active.iter().filter(|p| is_ready(p)).count();
    let available = active
        .iter()
        .filter(|p| is_available(p, min_ready, now))
        .count();
    plan.requeue_after = active
        .iter()
        .filter_map(|p| seconds_until_available(p, min_ready, now))
        .min()
        .map(|s| Duration::from_secs(s.max(0) as u64 + 1));
    let old = rs.status.clone().unwrap_or_default();
    plan.status = ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: Some(fully_labeled as i32),
        ready_replicas: Some(ready as i32),
        available_replicas: Some(available as i32),
        observed_generation: rs.metadata.generation,
        conditions: old.conditions,
        ..ReplicaSetStatus::default()
    };
    plan
}

/// A pod for `rs` from its template.
pub fn pod_from_template(rs: &ReplicaSet) -> Pod {
    let template = rs.spec.template.clone().unwrap_or_default();
    let tmeta = template.metadata.unwrap_or_default();
    let name = rs.metadata.name.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{name}-")),
            namespace: rs.metadata.namespace.clone(),
            labels: tmeta.labels,
            annotations: tmeta.annotations,
            finalizers: tmeta.finalizers,
            owner_references: Some(vec![controller_ref("apps/v1", "ReplicaSet", &rs.metadata)]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaSetError {
    #[error("ReplicaSet {key}: {action}: {source}")]
    Api {
        key: String,
        action: &'static str,
        #[source]
        source: ClientError,
    },
}

/// The controller: caches, queue, expectations, and the client to act through.
#[derive(Clone)]
pub struct ReplicaSetController {
    client: Arc<dyn ClusterClient>,
    pub pods: Cache<Pod>,
    pub replicasets: Cache<ReplicaSet>,
    pub queue: WorkQueue,
    expectations: Arc<Expectations>,
    events: EventRecorder,
}

impl ReplicaSetController {
    pub fn new(client: Arc<dyn ClusterClient>) -> Self {
        ReplicaSetController {
            events: EventRecorder::new(Arc::clone(&client), "replicaset-controller"),
            client,
            pods: Cache::new(),
            replicasets: Cache::new(),
            queue: WorkQueue::new(),
            expectations: Arc::default(),
        }
    }

    /// Feeds a pod event: updates the cache, counts expectations, queues affected owners.
    pub fn on_pod(&self, ev: Event<Pod>) {
        let owner_key = |p: &Pod| {
            controller_of(&p.metadata)
                .filter(|o| o.kind == "ReplicaSet")
                .map(|o| {
                    format!(
                        "{}/{}",
                        p.metadata.namespace.as_deref().unwrap_or_default(),
                        o.name
                    )
                })
        };
        match &ev {
            Event::Applied(p) => {
                let key = key_of(&p.metadata);
                let old = self.pods.get(&key);
                if old.is_none()
                    && let Some(k) = owner_key(p)
                {
                    self.expectations.observed_add(&k);
                }
                // Owner changes: tell the old owner too.
                if let Some(k) = old.as_deref().and_then(owner_key) {
                    self.queue.add(k);
                }
                self.enqueue_for_pod(p, owner_key(p));
            }
            Event::Deleted(p) => {
                if let Some(k) = owner_key(p) {
                    self.expectations.observed_delete(&k);
                    self.queue.add(k);
                }
            }
            Event::Restarted(_) => {
                for rs in self.replicasets.list() {
                    self.queue.add(key_of(&rs.metadata));
                }
            }
        }
        self.pods.apply(&ev);
    }

    fn enqueue_for_pod(&self, p: &Pod, owner: Option<String>) {
        match owner {
            Some(k) => self.queue.add(k),
            // An orphan: any ReplicaSet whose selector matches may adopt it.
            None => {
                let ns = p.metadata.namespace.as_deref().unwrap_or_default();
                for rs in self.replicasets.list_namespace(ns) {
                    let s = &rs.spec;
                    if !selector::is_empty(&s.selector)
                        && selector::matches(&s.selector, p.metadata.labels.as_ref())
                    {
                        self.queue.add(key_of(&rs.metadata));
                    }
                }
            }
        }
    }

    pub fn on_replicaset(&self, ev: Event<ReplicaSet>) {
        for key in self.replicasets.apply(&ev) {
            self.queue.add(key);
        }
    }

    /// Brings one ReplicaSet to its desired state.
    pub async fn reconcile(&self, key: &str) -> Result<Option<Duration>, ReplicaSetError> {
        let Some(rs) = self.replicasets.get(key) else {
            self.expectations.forget(key);
            return Ok(None);
        };
        let (ns, name) = split_key(key);
        let err = |action: &'static str| {
            let key = key.to_owned();
            move |source| ReplicaSetError::Api {
                key: key.clone(),
                action,
                source,
            }
        };
        let pods = self.pods.list_namespace(ns.unwrap_or_default());
        let may_scale = self.expectations.satisfied(key);
        let plan = plan(&rs, &pods, super::pods::now(), may_scale);
        let pod_api = Typed::<Pod>::new(self.client.as_ref());
        let our_ref = controller_ref("apps/v1", "ReplicaSet", &rs.metadata);
        for (pod, uid) in &plan.adopt {
            let mut refs: Vec<_> = self
                .pods
                .get(&format!("{}/{pod}", ns.unwrap_or_default()))
                .and_then(|p| p.metadata.owner_references.clone())
                .unwrap_or_default();
            refs.push(our_ref.clone());
            let patch = json!({"metadata": {"ownerReferences": refs, "uid": uid}});
            match pod_api.merge_patch(ns, pod, None, patch).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(err("adopting pod")(e)),
            }
        }
        for (pod, uid) in &plan.release {
            let refs: Vec<_> = self
                .pods
                .get(&format!("{}/{pod}", ns.unwrap_or_default()))
                .and_then(|p| p.metadata.owner_references.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|o| o.uid != our_ref.uid)
                .collect();
            let patch = json!({"metadata": {"ownerReferences": refs, "uid": uid}});
            match pod_api.merge_patch(ns, pod, None, patch).await {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(err("releasing pod")(e)),
            }
        }
        if plan.create > 0 {
            self.expectations.expect(key, plan.create as i64, 0);
            let template = pod_from_template(&rs);
            let mut created = 0;
            for _ in 0..plan.create {
                match pod_api.create(&template).await {
                    Ok(_) => created += 1,
                    Err(e) => {
                        // The creates that did not happen will never be observed.
                        for _ in created..plan.create {
                            self.expectations.observed_add(key);
                        }
                        self.events
                            .warning(rs.as_ref(), "FailedCreate", &format!("Error creating: {e}"))
                            .await;
                        return Err(err("creating pod")(e));
                    }
                }
            }
            self.events
                .normal(
                    rs.as_ref(),
                    "SuccessfulCreate",
                    &format!("Created {created} pod(s)"),
                )
                .await;
        }
        if !plan.delete.is_empty() {
            self.expectations.expect(key, 0, plan.delete.len() as i64);
            for (pod, uid) in &plan.delete {
                let opts = DeleteOptions {
                    uid: Some(uid.clone()),
                    ..DeleteOptions::default()
                };
                match pod_api.delete(ns, pod, opts).await {
                    Ok(()) => {
                        self.events
                            .normal(
                                rs.as_ref(),
                                "SuccessfulDelete",
                                &format!("Deleted pod: {pod}"),
                            )
                            .await;
                    }
                    Err(e) if e.is_not_found() || e.is_conflict() => {
                        self.expectations.observed_delete(key);
                    }
                    Err(e) => {
                        self.expectations.observed_delete(key);
                        return Err(err("deleting pod")(e));
                    }
                }
            }
        }
        if rs.status.as_ref() != Some(&plan.status) {
            let patch = json!({"status": plan.status});
            match Typed::<ReplicaSet>::new(self.client.as_ref())
                .merge_patch(ns, name, Some("status"), patch)
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(err("updating status")(e)),
            }
        }
        Ok(plan.requeue_after)
    }

    /// Runs the controller: watches, and `workers` reconcile loops.
    pub async fn run(self, workers: usize) {
        // Until the first list of pods is in the cache, an owner would seem to own none
        // and be reconciled from nothing (after a restart: every replica made again).
        let (listed_tx, mut listed) = tokio::sync::watch::channel(false);
        let me = self.clone();
        tokio::spawn(reflect::<Pod>(
            Arc::clone(&self.client),
            None,
            Duration::from_secs(1),
            move |ev| {
                let full_list = matches!(ev, Event::Restarted(_));
                me.on_pod(ev);
                if full_list {
                    listed_tx.send_replace(true);
                }
            },
        ));
        let me = self.clone();
        tokio::spawn(reflect::<ReplicaSet>(
            Arc::clone(&self.client),
            None,
            Duration::from_secs(1),
            move |ev| me.on_replicaset(ev),
        ));
        if listed.wait_for(|l| *l).await.is_err() {
            return;
        }
        super::run_workers(self.queue.clone(), workers, move |key| {
            let me = self.clone();
            async move { me.reconcile(&key).await }
        })
        .await;
    }
}

#[cfg(test)]
#[path = "replicaset_tests.rs"]
mod tests;
