//! An in-memory [`ClusterClient`] that records every write, for unit tests of the scheduler and
//! the controllers. It keeps just enough API semantics for them to be meaningful: a global
//! revision as resourceVersion, optimistic concurrency on update, uid and creationTimestamp on
//! create, `generateName`, merge patches, status subresources that touch only `status`, bindings,
//! and watches that resume from a revision.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::client::{
    ClientError, ClusterClient, DeleteOptions, ObjectList, PatchKind, ResourceType, WatchEvent,
    WatchStream,
};

/// One recorded write.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Create {
        resource: String,
        namespace: Option<String>,
        name: String,
    },
    Update {
        resource: String,
        namespace: Option<String>,
        name: String,
        subresource: Option<String>,
    },
    Patch {
        resource: String,
        namespace: Option<String>,
        name: String,
        subresource: Option<String>,
        patch: Value,
    },
    Delete {
        resource: String,
        namespace: Option<String>,
        name: String,
        opts: DeleteOptions,
    },
    Post {
        resource: String,
        namespace: Option<String>,
        name: String,
        subresource: String,
        body: Value,
    },
}

type Key = (String, String, String);

#[derive(Default)]
struct State {
    revision: u64,
    objects: BTreeMap<Key, Value>,
    actions: Vec<Action>,
    uid: u64,
    /// Events of every revision so a watch can resume; `compacted` and below are gone.
    history: Vec<(u64, String, WatchEvent)>,
    compacted: u64,
    fail_creates: usize,
}

/// The fake; clone it freely, clones share state.
#[derive(Clone)]
pub struct FakeClient {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<(u64, String, WatchEvent)>,
}

impl Default for FakeClient {
    fn default() -> Self {
        Self::new()
    }
}

fn ns_of(rt: ResourceType, namespace: Option<&str>) -> String {
    if rt.namespaced {
        namespace.unwrap_or_default().to_owned()
    } else {
        String::new()
    }
}

fn meta(v: &Value, field: &str) -> Option<String> {
    v.pointer(&format!("/metadata/{field}"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn set_meta(v: &mut Value, field: &str, value: Value) {
    if let Some(map) = v.as_object_mut() {
        let m = map.entry("metadata").or_insert_with(|| json!({}));
        if let Some(m) = m.as_object_mut() {
            m.insert(field.to_owned(), value);
        }
    }
}

impl FakeClient {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(4096);
        FakeClient {
            state: Arc::new(Mutex::new(State::default())),
            events,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every write so far, in order.
    pub fn actions(&self) -> Vec<Action> {
        self.lock().actions.clone()
    }

    pub fn clear_actions(&self) {
        self.lock().actions.clear();
    }

    /// Makes the next `n` creates fail with a server error.
    pub fn fail_next_creates(&self, n: usize) {
        self.lock().fail_creates = n;
    }

    /// Forgets watch history at or below the current revision, so older watches get 410.
    pub fn compact(&self) {
        let mut s = self.lock();
        s.compacted = s.revision;
        s.history.clear();
    }

    /// The stored objects of one type, for assertions.
    pub fn objects(&self, rt: ResourceType) -> Vec<Value> {
        self.lock()
            .objects
            .iter()
            .filter(|((p, _, _), _)| p == rt.plural)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Puts an object in place without recording an action (test setup).
    pub fn seed(&self, rt: ResourceType, obj: Value) {
        let mut s = self.lock();
        self.store(&mut s, rt, obj, true);
    }

    fn store(&self, s: &mut State, rt: ResourceType, mut obj: Value, created: bool) -> Value {
        s.revision += 1;
        let rev = s.revision;
        if created {
            s.uid += 1;
            if meta(&obj, "uid").is_none() {
                set_meta(&mut obj, "uid", json!(format!("uid-{}", s.uid)));
            }
            if meta(&obj, "creationTimestamp").is_none() {
                let ts =
                    chrono::DateTime::<chrono::Utc>::from_timestamp(1_700_000_000 + rev as i64, 0)
                        .unwrap_or_default();
                set_meta(
                    &mut obj,
                    "creationTimestamp",
                    json!(ts.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
                );
            }
        }
        set_meta(&mut obj, "resourceVersion", json!(rev.to_string()));
        if let Some(map) = obj.as_object_mut() {
            map.insert("apiVersion".into(), json!(rt.api_version()));
            map.insert("kind".into(), json!(rt.kind));
        }
        let ns = ns_of(rt, meta(&obj, "namespace").as_deref());
        if !ns.is_empty() {
            set_meta(&mut obj, "namespace", json!(ns));
        }
        let key = (
            rt.plural.to_owned(),
            ns,
            meta(&obj, "name").unwrap_or_default(),
        );
        s.objects.insert(key, obj.clone());
        let ev = if created {
            WatchEvent::Added(obj.clone())
        } else {
            WatchEvent::Modified(obj.clone())
        };
        self.publish(s, rev, rt, ev);
        obj
    }

    fn publish(&self, s: &mut State, rev: u64, rt: ResourceType, ev: WatchEvent) {
        s.history.push((rev, rt.plural.to_owned(), ev.clone()));
        let _ = self.events.send((rev, rt.plural.to_owned(), ev));
    }

    fn get_locked(
        s: &State,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ClientError> {
        s.objects
            .get(&(rt.plural.to_owned(), ns_of(rt, namespace), name.to_owned()))
            .cloned()
            .ok_or_else(|| ClientError::NotFound {
                resource: rt.to_string(),
                name: name.to_owned(),
            })
    }

    fn remove_locked(&self, s: &mut State, rt: ResourceType, namespace: Option<&str>, name: &str) {
        let key = (rt.plural.to_owned(), ns_of(rt, namespace), name.to_owned());
        if let Some(mut old) = s.objects.remove(&key) {
            s.revision += 1;
            let rev = s.revision;
            set_meta(&mut old, "resourceVersion", json!(rev.to_string()));
            self.publish(s, rev, rt, WatchEvent::Deleted(old));
        }
    }

    /// Writes `new` over the stored object, keeping either only its status or only the rest.
    fn replace(
        &self,
        s: &mut State,
        rt: ResourceType,
        old: Value,
        mut new: Value,
        subresource: Option<&str>,
    ) -> Result<Value, ClientError> {
        let name = meta(&old, "name").unwrap_or_default();
        if let Some(rv) = meta(&new, "resourceVersion")
            && Some(&rv) != meta(&old, "resourceVersion").as_ref()
        {
            return Err(ClientError::Conflict {
                resource: rt.to_string(),
                name,
                message: "the object has been modified; please apply your changes to the latest version and try again".into(),
            });
        }
        let merged = match subresource {
            Some("status") => {
                let mut out = old.clone();
                if let Some(map) = out.as_object_mut() {
                    map.insert(
                        "status".into(),
                        new.get("status").cloned().unwrap_or(Value::Null),
                    );
                }
                out
            }
            _ => {
                if let (Some(map), Some(status)) = (new.as_object_mut(), old.get("status")) {
                    map.insert("status".into(), status.clone());
                }
                for f in ["uid", "creationTimestamp", "namespace", "name"] {
                    if let Some(v) = old.pointer(&format!("/metadata/{f}")) {
                        set_meta(&mut new, f, v.clone());
                    }
                }
                new
            }
        };
        Ok(self.finish_write(s, rt, merged))
    }

    /// A write that empties the finalizers of an object being deleted removes it.
    fn finish_write(&self, s: &mut State, rt: ResourceType, obj: Value) -> Value {
        let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
        let finalizers_empty = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty);
        if deleting && finalizers_empty {
            let ns = meta(&obj, "namespace");
            let name = meta(&obj, "name").unwrap_or_default();
            self.remove_locked(s, rt, ns.as_deref(), &name);
            return obj;
        }
        self.store(s, rt, obj, false)
    }
}

#[async_trait]
impl ClusterClient for FakeClient {
    async fn get(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ClientError> {
        Self::get_locked(&self.lock(), rt, namespace, name)
    }

    async fn list(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
    ) -> Result<ObjectList, ClientError> {
        let s = self.lock();
        let items = s
            .objects
            .iter()
            .filter(|((p, ns, _), _)| p == rt.plural && namespace.is_none_or(|want| want == ns))
            .map(|(_, v)| v.clone())
            .collect();
        Ok(ObjectList {
            items,
            resource_version: s.revision.to_string(),
        })
    }

    async fn watch(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        resource_version: &str,
    ) -> Result<WatchStream, ClientError> {
        let from: u64 = resource_version.parse().map_err(|_| ClientError::Api {
            code: 400,
            message: format!("invalid resource version {resource_version:?}"),
        })?;
        let (backlog, rx) = {
            let s = self.lock();
            if from < s.compacted {
                return Err(ClientError::Gone(resource_version.to_owned()));
            }
            let backlog: Vec<_> = s
                .history
                .iter()
                .filter(|(r, _, _)| *r > from)
                .cloned()
                .collect();
            (backlog, self.events.subscribe())
        };
        let plural = rt.plural.to_owned();
        let namespace = namespace.map(str::to_owned);
        let wanted = move |p: &str, ev: &WatchEvent| {
            p == plural
                && namespace.as_deref().is_none_or(|want| match ev {
                    WatchEvent::Added(v) | WatchEvent::Modified(v) | WatchEvent::Deleted(v) => {
                        meta(v, "namespace").as_deref() == Some(want)
                    }
                    WatchEvent::Bookmark(_) => true,
                })
        };
        let last = backlog.last().map_or(from, |(r, _, _)| *r);
        let first: Vec<_> = backlog
            .into_iter()
            .filter(|(_, p, ev)| wanted(p, ev))
            .map(|(_, _, ev)| Ok(ev))
            .collect();
        let live = futures::stream::unfold((rx, wanted), move |(mut rx, wanted)| async move {
            loop {
                match rx.recv().await {
                    Ok((rev, p, ev)) if rev > last && wanted(&p, &ev) => {
                        return Some((Ok(ev), (rx, wanted)));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        return Some((
                            Err(ClientError::Gone("watch fell behind".into())),
                            (rx, wanted),
                        ));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Ok(Box::pin(futures::StreamExt::chain(
            futures::stream::iter(first),
            live,
        )))
    }

    async fn create(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        mut obj: Value,
    ) -> Result<Value, ClientError> {
        let mut s = self.lock();
        if s.fail_creates > 0 {
            s.fail_creates -= 1;
            return Err(ClientError::Api {
                code: 500,
                message: "injected create failure".into(),
            });
        }
        if rt.namespaced {
            set_meta(&mut obj, "namespace", json!(ns_of(rt, namespace)));
        }
        if meta(&obj, "name").is_none_or(|n| n.is_empty()) {
            let Some(prefix) = meta(&obj, "generateName") else {
                return Err(ClientError::Invalid {
                    resource: rt.to_string(),
                    name: String::new(),
                    message: "metadata.name or metadata.generateName is required".into(),
                });
            };
            let name = format!("{prefix}{:05x}", s.uid + 1);
            set_meta(&mut obj, "name", json!(name));
        }
        let name = meta(&obj, "name").unwrap_or_default();
        if Self::get_locked(&s, rt, namespace, &name).is_ok() {
            return Err(ClientError::AlreadyExists {
                resource: rt.to_string(),
                name,
            });
        }
        s.actions.push(Action::Create {
            resource: rt.plural.to_owned(),
            namespace: rt.namespaced.then(|| ns_of(rt, namespace)),
            name,
        });
        if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        Ok(self.store(&mut s, rt, obj, true))
    }

    async fn update(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        obj: Value,
    ) -> Result<Value, ClientError> {
        let mut s = self.lock();
        let old = Self::get_locked(&s, rt, namespace, name)?;
        let out = self.replace(&mut s, rt, old, obj, subresource)?;
        s.actions.push(Action::Update {
            resource: rt.plural.to_owned(),
            namespace: rt.namespaced.then(|| ns_of(rt, namespace)),
            name: name.to_owned(),
            subresource: subresource.map(str::to_owned),
        });
        Ok(out)
    }

    async fn patch(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        kind: PatchKind,
        patch: Value,
    ) -> Result<Value, ClientError> {
        let mut s = self.lock();
        let old = Self::get_locked(&s, rt, namespace, name)?;
        let mut new = old.clone();
        match kind {
            PatchKind::Merge => json_patch::merge(&mut new, &patch),
            PatchKind::Json => {
                let ops: json_patch::Patch =
                    serde_json::from_value(patch.clone()).map_err(|source| {
                        ClientError::Decode {
                            what: "JSON patch".into(),
                            source,
                        }
                    })?;
                json_patch::patch(&mut new, &ops).map_err(|e| ClientError::Invalid {
                    resource: rt.to_string(),
                    name: name.to_owned(),
                    message: e.to_string(),
                })?;
            }
        }
        // A patch is never stale: it applies to whatever is stored.
        if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        let out = self.replace(&mut s, rt, old, new, subresource)?;
        s.actions.push(Action::Patch {
            resource: rt.plural.to_owned(),
            namespace: rt.namespaced.then(|| ns_of(rt, namespace)),
            name: name.to_owned(),
            subresource: subresource.map(str::to_owned),
            patch,
        });
        Ok(out)
    }

    async fn delete(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        opts: DeleteOptions,
    ) -> Result<(), ClientError> {
        let mut s = self.lock();
        let mut old = Self::get_locked(&s, rt, namespace, name)?;
        if let Some(uid) = &opts.uid
            && meta(&old, "uid").as_ref() != Some(uid)
        {
            return Err(ClientError::Conflict {
                resource: rt.to_string(),
                name: name.to_owned(),
                message: format!("precondition failed: uid {uid}"),
            });
        }
        s.actions.push(Action::Delete {
            resource: rt.plural.to_owned(),
            namespace: rt.namespaced.then(|| ns_of(rt, namespace)),
            name: name.to_owned(),
            opts: opts.clone(),
        });
        let mut finalizers: Vec<Value> = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        match opts.propagation {
            Some(super::client::Propagation::Foreground) => {
                finalizers.push(json!("foregroundDeletion"));
            }
            Some(super::client::Propagation::Orphan) => finalizers.push(json!("orphan")),
            _ => {}
        }
        if finalizers.is_empty() {
            self.remove_locked(&mut s, rt, namespace, name);
        } else if old.pointer("/metadata/deletionTimestamp").is_none() {
            set_meta(&mut old, "finalizers", Value::Array(finalizers));
            set_meta(
                &mut old,
                "deletionTimestamp",
                json!(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            );
            self.store(&mut s, rt, old, false);
        }
        Ok(())
    }

    async fn post_subresource(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: Value,
    ) -> Result<Value, ClientError> {
        let mut s = self.lock();
        let mut pod = Self::get_locked(&s, rt, namespace, name)?;
        s.actions.push(Action::Post {
            resource: rt.plural.to_owned(),
            namespace: rt.namespaced.then(|| ns_of(rt, namespace)),
            name: name.to_owned(),
            subresource: subresource.to_owned(),
            body: body.clone(),
        });
        match subresource {
            "binding" => {
                if pod
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .is_some_and(|n| !n.is_empty())
                {
                    return Err(ClientError::Conflict {
                        resource: rt.to_string(),
                        name: name.to_owned(),
                        message: "pod is already assigned to a node".into(),
                    });
                }
                let node = body.pointer("/target/name").cloned().unwrap_or(Value::Null);
                if let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.insert("nodeName".into(), node);
                }
                let out = self.store(&mut s, rt, pod, false);
                Ok(out)
            }
            "eviction" => {
                self.remove_locked(&mut s, rt, namespace, name);
                Ok(json!({"kind": "Status", "status": "Success"}))
            }
            other => Err(ClientError::Api {
                code: 404,
                message: format!("the fake has no {other} subresource"),
            }),
        }
    }
}
