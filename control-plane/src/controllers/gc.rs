//! The garbage collector: deletes objects whose owners are all gone (background cascade),
//! deletes the dependents of an owner held by the `foregroundDeletion` finalizer and then
//! releases it, and strips owner references from the dependents of an owner held by the
//! `orphan` finalizer and then releases it.
//!
//! [`plan`] decides from a snapshot of objects; [`GarbageCollector::sweep`] lists the
//! watched types, plans and acts. Level-triggered: a sweep after a restart finishes whatever
//! an earlier one started.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::client::{
    ClientError, ClusterClient, DeleteOptions, PatchKind, Propagation, ResourceType,
};

pub const FOREGROUND: &str = "foregroundDeletion";
pub const ORPHAN: &str = "orphan";

/// What the collector needs to know of one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub rt: ResourceType,
    pub namespace: Option<String>,
    pub name: String,
    pub uid: String,
    /// Owners as (uid, kind).
    pub owners: Vec<(String, String)>,
    pub deleting: bool,
    pub finalizers: Vec<String>,
}

impl Node {
    pub fn from_value(rt: ResourceType, v: &Value) -> Option<Node> {
        let m = v.get("metadata")?;
        let s = |k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
        Some(Node {
            rt,
            namespace: s("namespace").filter(|n| !n.is_empty()),
            name: s("name")?,
            uid: s("uid")?,
            owners: m
                .get("ownerReferences")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|o| {
                    let uid = o.get("uid").and_then(Value::as_str)?;
                    let kind = o.get("kind").and_then(Value::as_str).unwrap_or_default();
                    Some((uid.to_owned(), kind.to_owned()))
                })
                .collect(),
            deleting: m.get("deletionTimestamp").is_some_and(|t| !t.is_null()),
            finalizers: m
                .get("finalizers")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|f| f.as_str().map(str::to_owned))
                .collect(),
        })
    }
}

/// One thing the collector does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Delete a dependent; `Foreground` when its owner is being deleted in the foreground so
    /// the cascade goes on below it.
    Delete {
        target: usize,
        propagation: Propagation,
    },
    /// Remove the owner reference to `owner_uid` from `target`.
    Orphan { target: usize, owner_uid: String },
    /// Remove `finalizer` from `target`: its dependents are handled.
    RemoveFinalizer {
        target: usize,
        finalizer: &'static str,
    },
}

/// Decides over a snapshot of every object of the `watched` kinds. Owners of other kinds are
/// assumed to exist (the collector never deletes on a guess).
pub fn plan(objects: &[Node], watched: &[&str]) -> Vec<Action> {
    let by_uid: HashMap<&str, usize> = objects
        .iter()
        .enumerate()
        .map(|(i, o)| (o.uid.as_str(), i))
        .collect();
    let mut dependents: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, o) in objects.iter().enumerate() {
        for (owner, _) in &o.owners {
            dependents.entry(owner.as_str()).or_default().push(i);
        }
    }
    let mut out = Vec::new();
    let mut deleting_now: HashSet<usize> = HashSet::new();
    for (i, o) in objects.iter().enumerate() {
        if !o.deleting {
            continue;
        }
        let deps = dependents.get(o.uid.as_str()).cloned().unwrap_or_default();
        if o.finalizers.iter().any(|f| f == ORPHAN) {
            for d in &deps {
                out.push(Action::Orphan {
                    target: *d,
                    owner_uid: o.uid.clone(),
                });
            }
            out.push(Action::RemoveFinalizer {
                target: i,
                finalizer: ORPHAN,
            });
        } else if o.finalizers.iter().any(|f| f == FOREGROUND) {
            let live: Vec<usize> = deps
                .iter()
                .copied()
                .filter(|d| !objects[*d].deleting)
                .collect();
            for d in &live {
                deleting_now.insert(*d);
                out.push(Action::Delete {
                    target: *d,
                    propagation: Propagation::Foreground,
                });
            }
            if deps.is_empty() {
                out.push(Action::RemoveFinalizer {
                    target: i,
                    finalizer: FOREGROUND,
                });
            }
        }
    }
    {
        for (i, o) in objects.iter().enumerate() {
            if o.owners.is_empty() || o.deleting || deleting_now.contains(&i) {
                continue;
            }
            // Owners being deleted in the foreground or orphaning are handled above; an owner
            // being deleted in the background is as good as gone.
            let all_gone = o
                .owners
                .iter()
                .all(|(u, kind)| match by_uid.get(u.as_str()) {
                    None => watched.contains(&kind.as_str()),
                    Some(&j) => {
                        let owner = &objects[j];
                        owner.deleting
                            && !owner
                                .finalizers
                                .iter()
                                .any(|f| f == FOREGROUND || f == ORPHAN)
                    }
                });
            if all_gone {
                out.push(Action::Delete {
                    target: i,
                    propagation: Propagation::Background,
                });
            }
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error("listing {rt}: {source}")]
    List {
        rt: ResourceType,
        #[source]
        source: ClientError,
    },
    #[error("garbage collecting {rt} {name}: {source}")]
    Act {
        rt: ResourceType,
        name: String,
        #[source]
        source: ClientError,
    },
}

/// The types the collector follows by default: everything the controllers here own or create.
pub fn default_types() -> Vec<ResourceType> {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    vec![
        ResourceType::of::<Deployment>(),
        ResourceType::of::<ReplicaSet>(),
        ResourceType::of::<DaemonSet>(),
        ResourceType::of::<StatefulSet>(),
        ResourceType::of::<CronJob>(),
        ResourceType::of::<Job>(),
        ResourceType::of::<Pod>(),
        ResourceType::of::<Service>(),
        ResourceType::of::<EndpointSlice>(),
        ResourceType::of::<ConfigMap>(),
        ResourceType::of::<Secret>(),
    ]
}

pub struct GarbageCollector {
    client: Arc<dyn ClusterClient>,
    /// Every type that can be an owner or a dependent; an owner reference to a type outside
    /// this list is never treated as dangling.
    types: Vec<ResourceType>,
}

impl GarbageCollector {
    pub fn new(client: Arc<dyn ClusterClient>, types: Vec<ResourceType>) -> Self {
        GarbageCollector { client, types }
    }

    /// One full pass; returns how many actions it took. Errors of single actions are logged
    /// and the pass goes on, reporting the first at the end.
    pub async fn sweep(&self) -> Result<usize, GcError> {
        let mut objects = Vec::new();
        for rt in &self.types {
            let list = match self.client.list(*rt, None).await {
                Ok(l) => l,
                Err(ClientError::Api { code: 404, .. }) => continue,
                Err(source) => return Err(GcError::List { rt: *rt, source }),
            };
            objects.extend(list.items.iter().filter_map(|v| Node::from_value(*rt, v)));
        }
        let kinds: Vec<&str> = self.types.iter().map(|t| t.kind).collect();
        let actions = plan(&objects, &kinds);
        let mut first_err = None;
        let count = actions.len();
        for a in actions {
            if let Err(e) = self.act(&objects, &a).await {
                tracing::warn!(error = %e, "garbage collection step failed");
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(count),
        }
    }

    async fn act(&self, objects: &[Node], a: &Action) -> Result<(), GcError> {
        let (target, result) = match a {
            Action::Delete {
                target,
                propagation,
            } => {
                let o = &objects[*target];
                let opts = DeleteOptions {
                    propagation: Some(*propagation),
                    uid: Some(o.uid.clone()),
                    grace_period_seconds: None,
                };
                (
                    o,
                    self.client
                        .delete(o.rt, o.namespace.as_deref(), &o.name, opts)
                        .await,
                )
            }
            Action::Orphan { target, owner_uid } => {
                let o = &objects[*target];
                let current = self.client.get(o.rt, o.namespace.as_deref(), &o.name).await;
                let result = match current {
                    Ok(v) => {
                        let refs: Vec<Value> = v
                            .pointer("/metadata/ownerReferences")
                            .and_then(Value::as_array)
                            .into_iter()
                            .flatten()
                            .filter(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid))
                            .cloned()
                            .collect();
                        let patch = json!({"metadata": {"ownerReferences": refs}});
                        self.client
                            .patch(
                                o.rt,
                                o.namespace.as_deref(),
                                &o.name,
                                None,
                                PatchKind::Merge,
                                patch,
                            )
                            .await
                            .map(|_| ())
                    }
                    Err(e) => Err(e),
                };
                (o, result)
            }
            Action::RemoveFinalizer { target, finalizer } => {
                let o = &objects[*target];
                let rest: Vec<&String> = o.finalizers.iter().filter(|f| f != finalizer).collect();
                let patch = json!({"metadata": {"finalizers": rest}});
                (
                    o,
                    self.client
                        .patch(
                            o.rt,
                            o.namespace.as_deref(),
                            &o.name,
                            None,
                            PatchKind::Merge,
                            patch,
                        )
                        .await
                        .map(|_| ()),
                )
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() || e.is_conflict() => Ok(()),
            Err(source) => Err(GcError::Act {
                rt: target.rt,
                name: target.name.clone(),
                source,
            }),
        }
    }

    /// Sweeps every `interval` forever.
    pub async fn run(self, interval: Duration) {
        loop {
            if let Err(e) = self.sweep().await {
                tracing::warn!(error = %e, "garbage collection sweep failed");
            }
            tokio::time::sleep(interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::fake::FakeClient;
    use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
    use k8s_openapi::api::core::v1::Pod;

    fn obj(name: &str, uid: &str, owner: Option<(&str, &str)>) -> Value {
        let mut v = json!({"metadata": {"name": name, "namespace": "ns", "uid": uid}});
        if let Some((kind, o)) = owner {
            v["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": kind, "name": "o", "uid": o, "controller": true}]);
        }
        v
    }

    fn types() -> Vec<ResourceType> {
        vec![
            ResourceType::of::<Deployment>(),
            ResourceType::of::<ReplicaSet>(),
            ResourceType::of::<Pod>(),
        ]
    }

    fn setup() -> (FakeClient, GarbageCollector) {
        let fake = FakeClient::new();
        fake.seed(ResourceType::of::<Deployment>(), obj("d", "d-uid", None));
        fake.seed(
            ResourceType::of::<ReplicaSet>(),
            obj("rs", "rs-uid", Some(("Deployment", "d-uid"))),
        );
        fake.seed(
            ResourceType::of::<Pod>(),
            obj("p", "p-uid", Some(("ReplicaSet", "rs-uid"))),
        );
        fake.seed(
            ResourceType::of::<Pod>(),
            obj("stray", "s-uid", Some(("Widget", "w-uid"))),
        );
        let gc = GarbageCollector::new(Arc::new(fake.clone()), types());
        (fake, gc)
    }

    async fn sweep_until_quiet(gc: &GarbageCollector) {
        for _ in 0..10 {
            if gc.sweep().await.unwrap() == 0 {
                return;
            }
        }
        panic!("garbage collection never settled");
    }

    fn names(fake: &FakeClient) -> Vec<String> {
        let mut v: Vec<String> = types()
            .into_iter()
            .flat_map(|rt| fake.objects(rt))
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn background_deletion_cascades() {
        let (fake, gc) = setup();
        fake.delete(
            ResourceType::of::<Deployment>(),
            Some("ns"),
            "d",
            DeleteOptions::default(),
        )
        .await
        .unwrap();
        sweep_until_quiet(&gc).await;
        assert_eq!(
            names(&fake),
            ["stray"],
            "an owner of an unwatched kind is never presumed gone"
        );
    }

    #[tokio::test]
    async fn foreground_deletion_removes_dependents_before_the_owner() {
        let (fake, gc) = setup();
        fake.delete(
            ResourceType::of::<Deployment>(),
            Some("ns"),
            "d",
            DeleteOptions {
                propagation: Some(Propagation::Foreground),
                ..DeleteOptions::default()
            },
        )
        .await
        .unwrap();
        gc.sweep().await.unwrap();
        // The owner waits while a dependent exists.
        assert!(names(&fake).contains(&"d".to_owned()));
        sweep_until_quiet(&gc).await;
        let left = names(&fake);
        assert!(
            !left.contains(&"d".to_owned())
                && !left.contains(&"rs".to_owned())
                && !left.contains(&"p".to_owned()),
            "{left:?}"
        );
    }

    #[tokio::test]
    async fn orphan_deletion_keeps_dependents_without_the_reference() {
        let (fake, gc) = setup();
        fake.delete(
            ResourceType::of::<Deployment>(),
            Some("ns"),
            "d",
            DeleteOptions {
                propagation: Some(Propagation::Orphan),
                ..DeleteOptions::default()
            },
        )
        .await
        .unwrap();
        sweep_until_quiet(&gc).await;
        let rs = fake
            .get(ResourceType::of::<ReplicaSet>(), Some("ns"), "rs")
            .await
            .unwrap();
        assert_eq!(rs["metadata"]["ownerReferences"], json!([]));
        assert!(
            fake.get(ResourceType::of::<Pod>(), Some("ns"), "p")
                .await
                .is_ok()
        );
        assert!(
            fake.get(ResourceType::of::<Deployment>(), Some("ns"), "d")
                .await
                .is_err()
        );
    }

    #[test]
    fn unknown_owner_kinds_are_never_collected() {
        let n = Node::from_value(
            ResourceType::of::<Pod>(),
            &obj("p", "p", Some(("Widget", "x"))),
        )
        .unwrap();
        assert!(plan(std::slice::from_ref(&n), &["Pod"]).is_empty());
        assert_eq!(plan(&[n], &["Pod", "Widget"]).len(), 1);
    }
}
