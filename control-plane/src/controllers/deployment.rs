//! The Deployment controller: one ReplicaSet per pod template revision, named
//! `<deployment>-<pod-template-hash>`, scaled by the RollingUpdate or Recreate strategy, with
//! revision annotations (`kubectl rollout history/undo` read and write them), pause, history
//! cleanup and the Progressing/Available conditions `kubectl rollout status` watches.
//!
//! The arithmetic is pure ([`rolling_update`], [`recreate`], [`status`]) and tested on its own;
//! [`DeploymentController::reconcile`] applies it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::cache::{Cache, Event, reflect};
use super::client::{ClientError, ClusterClient, DeleteOptions, Typed, key_of, split_key};
use super::events::EventRecorder;
use super::pods::{controller_of, controller_ref};
use super::queue::WorkQueue;

pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";

/// Characters that cannot form words, so generated names never spell anything.
const SAFE_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

fn fnv32a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The `pod-template-hash` of a template: FNV-1a of its canonical JSON (plus the collision
/// count), spelled with [`SAFE_ALPHABET`].
pub fn template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut bytes = serde_json::to_vec(template).unwrap_or_default();
    if let Some(c) = collision_count {
        bytes.extend_from_slice(&c.to_le_bytes());
    }
    fnv32a(&bytes)
        .to_string()
        .bytes()
        .map(|d| char::from(SAFE_ALPHABET[usize::from(d) % SAFE_ALPHABET.len()]))
        .collect()
}

/// The template without the hash label, for comparing a ReplicaSet's template with the
/// Deployment's.
fn strip_hash(t: &PodTemplateSpec) -> PodTemplateSpec {
    let mut t = t.clone();
    if let Some(m) = t.metadata.as_mut()
        && let Some(labels) = m.labels.as_mut()
    {
        labels.remove(HASH_LABEL);
        if labels.is_empty() {
            m.labels = None;
        }
    }
    t
}

pub fn templates_equal(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    strip_hash(a) == strip_hash(b)
}

/// Resolves an int-or-percent against `total`; percentages round up for surge, down for
/// unavailable, as upstream does.
pub fn resolve(v: Option<&IntOrString>, total: i32, round_up: bool, default: &str) -> i32 {
    let s = match v {
        Some(IntOrString::Int(i)) => return (*i).max(0),
        Some(IntOrString::String(s)) => s.as_str(),
        None => default,
    };
    let Some(pct) = s.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) else {
        return 0;
    };
    let num = pct.max(0) * i64::from(total);
    let v = if round_up {
        (num + 99) / 100
    } else {
        num / 100
    };
    v as i32
}

/// maxSurge and maxUnavailable as pod counts; both zero would deadlock, so unavailable
/// becomes 1 then.
pub fn surge_and_unavailable(d: &Deployment) -> (i32, i32) {
    let spec = Some(&d.spec);
    let replicas = replicas_of(d);
    let ru = spec
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let surge = resolve(ru.and_then(|r| r.max_surge.as_ref()), replicas, true, "25%");
    let unavailable = resolve(
        ru.and_then(|r| r.max_unavailable.as_ref()),
        replicas,
        false,
        "25%",
    );
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

fn replicas_of(d: &Deployment) -> i32 {
    Some(&d.spec).and_then(|s| s.replicas).unwrap_or(1).max(0)
}

/// The numbers of one ReplicaSet the strategies work with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsCounts {
    pub name: String,
    /// spec.replicas
    pub replicas: i32,
    /// status.availableReplicas
    pub available: i32,
    /// status.replicas: pods that exist
    pub actual: i32,
}

impl RsCounts {
    pub fn of(rs: &ReplicaSet) -> Self {
        let st = rs.status.as_ref();
        RsCounts {
            name: rs.metadata.name.clone().unwrap_or_default(),
            replicas: Some(&rs.spec).and_then(|s| s.replicas).unwrap_or(0),
            available: st.and_then(|s| s.available_replicas).unwrap_or(0),
            actual: st.map_or(0, |s| s.replicas),
        }
    }
}

/// New replica counts by ReplicaSet name for one RollingUpdate step: scale the new set up
/// within `replicas + maxSurge`, then scale old sets down while at least
/// `replicas - maxUnavailable` pods stay available, removing unhealthy old pods first.
pub fn rolling_update(
    replicas: i32,
    surge: i32,
    unavailable: i32,
    new: &RsCounts,
    olds: &[RsCounts],
) -> BTreeMap<String, i32> {
    let mut out = BTreeMap::new();
    let old_total: i32 = olds.iter().map(|o| o.replicas).sum();
    let new_replicas = if new.replicas > replicas {
        replicas
    } else {
        let room = (replicas + surge - new.replicas - old_total).max(0);
        new.replicas + room.min(replicas - new.replicas)
    };
    out.insert(new.name.clone(), new_replicas);
    let min_available = replicas - unavailable;
    let new_unavailable = (new_replicas - new.available).max(0);
    let max_down = new_replicas + old_total - min_available - new_unavailable;
    let mut olds = olds.to_vec();
    if max_down > 0 {
        // Unhealthy old pods first: removing them costs no availability.
        let mut cleaned = 0;
        for o in &mut olds {
            let unhealthy = (o.replicas - o.available).max(0);
            let cut = unhealthy.min(max_down - cleaned);
            o.replicas -= cut;
            cleaned += cut;
        }
        // Then healthy ones, as far as availability above the minimum allows.
        let available = new.available
            + olds
                .iter()
                .map(|o| o.available.min(o.replicas))
                .sum::<i32>();
        let mut left = (available - min_available).min(max_down - cleaned).max(0);
        for o in &mut olds {
            let cut = o.replicas.min(left);
            o.replicas -= cut;
            left -= cut;
        }
    }
    for o in olds {
        out.insert(o.name, o.replicas);
    }
    out
}

/// One Recreate step: old sets to zero, and the new set up only once no old pod exists.
pub fn recreate(replicas: i32, new: &RsCounts, olds: &[RsCounts]) -> BTreeMap<String, i32> {
    let mut out = BTreeMap::new();
    for o in olds {
        out.insert(o.name.clone(), 0);
    }
    let olds_gone = olds.iter().all(|o| o.actual == 0);
    out.insert(
        new.name.clone(),
        if olds_gone { replicas } else { new.replicas },
    );
    out
}

/// The revision number a ReplicaSet carries.
pub fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn condition(conds: &[DeploymentCondition], type_: &str) -> Option<DeploymentCondition> {
    conds
        .iter()
        .find(|c| c.type_.as_deref() == Some(type_))
        .cloned()
}

fn set_condition(
    conds: &mut Vec<DeploymentCondition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    now: Timestamp,
) {
    let old = condition(conds, type_);
    let transition = match &old {
        Some(o) if o.status.as_deref() == Some(status) => o.last_transition_time.clone(),
        _ => Some(Time(now)),
    };
    // lastUpdateTime moves only when something is said differently, so the progress deadline
    // counts from the last real progress.
    let update = match &old {
        Some(o)
            if o.status.as_deref() == Some(status)
                && o.reason.as_deref() == Some(reason)
                && o.message.as_deref() == Some(&message) =>
        {
            o.last_update_time.clone()
        }
        _ => Some(Time(now)),
    };
    conds.retain(|c| c.type_.as_deref() != Some(type_));
    conds.push(DeploymentCondition {
        type_: Some(type_.to_owned()),
        status: Some(status.to_owned()),
        reason: Some(reason.to_owned()),
        message: Some(message),
        last_transition_time: transition,
        last_update_time: update,
    });
    conds.sort_by(|a, b| a.type_.cmp(&b.type_));
}

/// The Deployment's status from its ReplicaSets. `progressed` says whether this pass changed
/// replica counts (which counts as progress).
pub fn status(
    d: &Deployment,
    new: Option<&ReplicaSet>,
    all: &[&ReplicaSet],
    progressed: bool,
    now: Timestamp,
) -> DeploymentStatus {
    let replicas = replicas_of(d);
    let (_, max_unavailable) = surge_and_unavailable(d);
    let sum = |f: &dyn Fn(&ReplicaSet) -> i32| all.iter().map(|r| f(r)).sum::<i32>();
    let actual = sum(&|r| r.status.as_ref().map_or(0, |s| s.replicas));
    let ready = sum(&|r| {
        r.status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0)
    });
    let available = sum(&|r| {
        r.status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0)
    });
    let updated = new.map_or(0, |r| r.status.as_ref().map_or(0, |s| s.replicas));
    let old = d.status.clone().unwrap_or_default();
    let mut conds = old.conditions.clone().unwrap_or_default();
    if available >= replicas - max_unavailable {
        set_condition(
            &mut conds,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            now,
        );
    } else {
        set_condition(
            &mut conds,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            now,
        );
    }
    let new_name = new
        .and_then(|r| r.metadata.name.clone())
        .unwrap_or_default();
    let new_available = new.map_or(0, |r| {
        r.status
            .as_ref()
            .and_then(|s| s.available_replicas)
            .unwrap_or(0)
    });
    let complete =
        new.is_some() && updated == replicas && actual == replicas && new_available == replicas;
    let paused = Some(&d.spec).and_then(|s| s.paused) == Some(true);
    let deadline = Some(&d.spec)
        .and_then(|s| s.progress_deadline_seconds)
        .unwrap_or(600);
    if paused {
        set_condition(
            &mut conds,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".into(),
            now,
        );
    } else if complete {
        set_condition(
            &mut conds,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            now,
        );
    } else if progressed
        || condition(&conds, "Progressing").is_none_or(|c| {
            c.reason.as_deref() == Some("DeploymentPaused")
                || c.reason.as_deref() == Some("NewReplicaSetAvailable")
        })
    {
        set_condition(
            &mut conds,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{new_name}\" is progressing."),
            now,
        );
    } else if let Some(c) = condition(&conds, "Progressing")
        && c.status.as_deref() == Some("True")
        && c.last_update_time
            .as_ref()
            .is_some_and(|t| now.as_second() - t.0.as_second() > i64::from(deadline))
    {
        set_condition(
            &mut conds,
            "Progressing",
            "False",
            "ProgressDeadlineExceeded",
            format!("ReplicaSet \"{new_name}\" has timed out progressing."),
            now,
        );
    }
    DeploymentStatus {
        replicas: Some(actual),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((replicas - available).max(0)),
        observed_generation: d.metadata.generation,
        conditions: Some(conds),
        collision_count: old.collision_count,
        ..DeploymentStatus::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    #[error("Deployment {key}: {action}: {source}")]
    Api {
        key: String,
        action: &'static str,
        #[source]
        source: ClientError,
    },
}

#[derive(Clone)]
pub struct DeploymentController {
    client: Arc<dyn ClusterClient>,
    pub deployments: Cache<Deployment>,
    pub replicasets: Cache<ReplicaSet>,
    pub queue: WorkQueue,
    events: EventRecorder,
}

fn new_rs_for(d: &Deployment, hash: &str, revision: i64, replicas: i32) -> ReplicaSet {
    let spec = d.spec.clone();
    let mut template = spec.template.clone();
    let tmeta = template.metadata.get_or_insert_with(ObjectMeta::default);
    tmeta
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let mut selector: LabelSelector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let name = d.metadata.name.clone().unwrap_or_default();
    let (surge, _) = surge_and_unavailable(d);
    let mut annotations = d.metadata.annotations.clone().unwrap_or_default();
    annotations.retain(|k, _| !k.starts_with("kubectl.kubernetes.io/last-applied"));
    annotations.insert(REVISION.into(), revision.to_string());
    annotations.insert(DESIRED_REPLICAS.into(), replicas_of(d).to_string());
    annotations.insert(MAX_REPLICAS.into(), (replicas_of(d) + surge).to_string());
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}")),
            namespace: d.metadata.namespace.clone(),
            labels: tmeta.labels.clone(),
            annotations: Some(annotations),
            owner_references: Some(vec![controller_ref("apps/v1", "Deployment", &d.metadata)]),
            ..ObjectMeta::default()
        },
        spec: ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        },
        status: None,
    }
}

impl DeploymentController {
    pub fn new(client: Arc<dyn ClusterClient>) -> Self {
        DeploymentController {
            events: EventRecorder::new(Arc::clone(&client), "deployment-controller"),
            client,
            deployments: Cache::new(),
            replicasets: Cache::new(),
            queue: WorkQueue::new(),
        }
    }

    pub fn on_deployment(&self, ev: Event<Deployment>) {
        for k in self.deployments.apply(&ev) {
            self.queue.add(k);
        }
    }

    pub fn on_replicaset(&self, ev: Event<ReplicaSet>) {
        let owner = |rs: &ReplicaSet| {
            controller_of(&rs.metadata)
                .filter(|o| o.kind == "Deployment")
                .map(|o| {
                    format!(
                        "{}/{}",
                        rs.metadata.namespace.as_deref().unwrap_or_default(),
                        o.name
                    )
                })
        };
        match &ev {
            Event::Applied(rs) | Event::Deleted(rs) => {
                if let Some(k) = owner(rs) {
                    self.queue.add(k);
                }
            }
            Event::Restarted(all) => {
                for k in all.iter().filter_map(owner) {
                    self.queue.add(k);
                }
            }
        }
        self.replicasets.apply(&ev);
    }

    fn owned(&self, d: &Deployment) -> Vec<Arc<ReplicaSet>> {
        let uid = d.metadata.uid.as_deref().unwrap_or_default();
        self.replicasets
            .list_namespace(d.metadata.namespace.as_deref().unwrap_or_default())
            .into_iter()
            .filter(|rs| controller_of(&rs.metadata).is_some_and(|o| o.uid == uid))
            .collect()
    }

    pub async fn reconcile(&self, key: &str) -> Result<Option<Duration>, DeploymentError> {
        let Some(d) = self.deployments.get(key) else {
            return Ok(None);
        };
        if d.metadata.deletion_timestamp.is_some() {
            return Ok(None);
        }
        let (ns, name) = split_key(key);
        let err = |action: &'static str| {
            let key = key.to_owned();
            move |source| DeploymentError::Api {
                key: key.clone(),
                action,
                source,
            }
        };
        let rs_api = Typed::<ReplicaSet>::new(self.client.as_ref());
        let spec = d.spec.clone();
        let replicas = replicas_of(&d);
        let paused = spec.paused == Some(true);
        let mut owned = self.owned(&d);
        owned.sort_by_key(|r| revision_of(r));
        let max_revision = owned.iter().map(|r| revision_of(r)).max().unwrap_or(0);
        let existing_new = owned
            .iter()
            .find(|r| {
                Some(&r.spec)
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| templates_equal(t, &spec.template))
            })
            .cloned();
        let mut progressed = false;
        let new_rs: Option<Arc<ReplicaSet>> = match existing_new {
            Some(rs) => {
                // An old template coming back (rollout undo) becomes the newest revision.
                if revision_of(&rs) < max_revision && !paused {
                    let patch = json!({"metadata": {"annotations": {REVISION: (max_revision + 1).to_string()}}});
                    let updated = rs_api
                        .merge_patch(
                            ns,
                            rs.metadata.name.as_deref().unwrap_or_default(),
                            None,
                            patch,
                        )
                        .await
                        .map_err(err("bumping revision"))?;
                    self.replicasets.apply(&Event::Applied(updated.clone()));
                    progressed = true;
                    Some(Arc::new(updated))
                } else {
                    Some(rs)
                }
            }
            None if paused => None,
            None => {
                let collision = d.status.as_ref().and_then(|s| s.collision_count);
                let hash = template_hash(&spec.template, collision);
                let start = if owned.is_empty() { replicas } else { 0 };
                let rs = new_rs_for(&d, &hash, max_revision + 1, start);
                match rs_api.create(&rs).await {
                    Ok(created) => {
                        self.events
                            .normal(
                                d.as_ref(),
                                "ScalingReplicaSet",
                                &format!(
                                    "Scaled up replica set {} from 0 to {start}",
                                    created.metadata.name.as_deref().unwrap_or_default()
                                ),
                            )
                            .await;
                        self.replicasets.apply(&Event::Applied(created.clone()));
                        progressed = true;
                        Some(Arc::new(created))
                    }
                    Err(e) if e.is_already_exists() => {
                        // A same-named set with another template: bump the collision count so
                        // the next pass hashes differently.
                        let count = collision.unwrap_or(0) + 1;
                        let patch = json!({"status": {"collisionCount": count}});
                        Typed::<Deployment>::new(self.client.as_ref())
                            .merge_patch(ns, name, Some("status"), patch)
                            .await
                            .map_err(err("bumping collision count"))?;
                        return Ok(Some(Duration::from_millis(10)));
                    }
                    Err(e) => return Err(err("creating ReplicaSet")(e)),
                }
            }
        };
        let olds: Vec<&Arc<ReplicaSet>> = owned
            .iter()
            .filter(|r| {
                new_rs
                    .as_ref()
                    .is_none_or(|n| n.metadata.uid != r.metadata.uid)
            })
            .collect();
        if !paused && let Some(new) = new_rs.as_ref() {
            let new_counts = RsCounts::of(new);
            let old_counts: Vec<RsCounts> = olds.iter().map(|r| RsCounts::of(r)).collect();
            let target = match spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) {
                Some("Recreate") => recreate(replicas, &new_counts, &old_counts),
                _ => {
                    let (surge, unavailable) = surge_and_unavailable(&d);
                    rolling_update(replicas, surge, unavailable, &new_counts, &old_counts)
                }
            };
            for rs in std::iter::once(new).chain(olds.iter().copied()) {
                let rs_name = rs.metadata.name.clone().unwrap_or_default();
                let current = Some(&rs.spec).and_then(|s| s.replicas).unwrap_or(0);
                let Some(&want) = target.get(&rs_name) else {
                    continue;
                };
                if want == current {
                    continue;
                }
                let (surge, _) = surge_and_unavailable(&d);
                let patch = json!({
                    "metadata": {"annotations": {
                        DESIRED_REPLICAS: replicas.to_string(),
                        MAX_REPLICAS: (replicas + surge).to_string(),
                    }},
                    "spec": {"replicas": want},
                });
                let updated = rs_api
                    .merge_patch(ns, &rs_name, None, patch)
                    .await
                    .map_err(err("scaling ReplicaSet"))?;
                self.replicasets.apply(&Event::Applied(updated));
                let verb = if want > current { "up" } else { "down" };
                self.events
                    .normal(
                        d.as_ref(),
                        "ScalingReplicaSet",
                        &format!("Scaled {verb} replica set {rs_name} from {current} to {want}"),
                    )
                    .await;
                progressed = true;
            }
        } else if paused {
            // Paused: follow scale changes on the active set only, roll nothing.
            let active: Vec<_> = owned
                .iter()
                .filter(|r| Some(&r.spec).and_then(|s| s.replicas).unwrap_or(0) > 0)
                .collect();
            if let [only] = active.as_slice() {
                let rs_name = only.metadata.name.clone().unwrap_or_default();
                if Some(&only.spec).and_then(|s| s.replicas) != Some(replicas) {
                    let updated = rs_api
                        .merge_patch(ns, &rs_name, None, json!({"spec": {"replicas": replicas}}))
                        .await
                        .map_err(err("scaling ReplicaSet"))?;
                    self.replicasets.apply(&Event::Applied(updated));
                }
            }
        }
        // History: keep at most revisionHistoryLimit old sets that are fully scaled down.
        let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
        let mut dead: Vec<&Arc<ReplicaSet>> = olds
            .iter()
            .copied()
            .filter(|r| {
                Some(&r.spec).and_then(|s| s.replicas).unwrap_or(0) == 0
                    && r.status.as_ref().is_none_or(|s| s.replicas == 0)
                    && r.metadata.deletion_timestamp.is_none()
            })
            .collect();
        if dead.len() > limit {
            dead.sort_by_key(|r| revision_of(r));
            for rs in &dead[..dead.len() - limit] {
                let opts = DeleteOptions {
                    uid: rs.metadata.uid.clone(),
                    ..DeleteOptions::default()
                };
                match rs_api
                    .delete(ns, rs.metadata.name.as_deref().unwrap_or_default(), opts)
                    .await
                {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() || e.is_conflict() => {}
                    Err(e) => return Err(err("deleting old ReplicaSet")(e)),
                }
            }
        }
        // Status, from what the caches hold now.
        let all_now = self.owned(&d);
        let all_refs: Vec<&ReplicaSet> = all_now.iter().map(AsRef::as_ref).collect();
        let new_now = new_rs
            .as_ref()
            .and_then(|n| all_now.iter().find(|r| r.metadata.uid == n.metadata.uid));
        let st = status(
            &d,
            new_now.map(AsRef::as_ref),
            &all_refs,
            progressed,
            super::pods::now(),
        );
        let rev = new_now.map(|r| revision_of(r));
        let annotation_stale = rev.is_some_and(|r| {
            d.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REVISION))
                != Some(&r.to_string())
        });
        if annotation_stale && let Some(r) = rev {
            let patch = json!({"metadata": {"annotations": {REVISION: r.to_string()}}});
            Typed::<Deployment>::new(self.client.as_ref())
                .merge_patch(ns, name, None, patch)
                .await
                .map_err(err("annotating revision"))?;
        }
        if !status_equal(d.status.as_ref(), &st) {
            Typed::<Deployment>::new(self.client.as_ref())
                .merge_patch(ns, name, Some("status"), json!({"status": st}))
                .await
                .map_err(err("updating status"))?;
        }
        // Come back to check the progress deadline and minReadySeconds.
        let complete = st.updated_replicas == Some(replicas)
            && st.available_replicas == Some(replicas)
            && st.replicas == Some(replicas);
        Ok((!complete && !paused).then(|| Duration::from_secs(5)))
    }

    pub async fn run(self, workers: usize) {
        let me = self.clone();
        tokio::spawn(reflect::<Deployment>(
            Arc::clone(&self.client),
            None,
            Duration::from_secs(1),
            move |ev| me.on_deployment(ev),
        ));
        // Until the first list of ReplicaSets is in the cache, an owner would seem to own none
        // and be reconciled from nothing (after a restart: every replica made again).
        let (listed_tx, mut listed) = tokio::sync::watch::channel(false);
        let me = self.clone();
        tokio::spawn(reflect::<ReplicaSet>(
            Arc::clone(&self.client),
            None,
            Duration::from_secs(1),
            move |ev| {
                let full_list = matches!(ev, Event::Restarted(_));
                me.on_replicaset(ev);
                if full_list {
                    listed_tx.send_replace(true);
                }
            },
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

/// Status equality ignoring condition timestamps that did not move.
fn status_equal(old: Option<&DeploymentStatus>, new: &DeploymentStatus) -> bool {
    old == Some(new)
}

pub fn key(d: &Deployment) -> String {
    key_of(&d.metadata)
}

#[cfg(test)]
#[path = "deployment_tests.rs"]
mod tests;
