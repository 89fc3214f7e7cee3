//! Watch-fed caches. [`reflect`] lists a type, then watches from the list's resourceVersion,
//! and lists again when the watch fails or answers 410 Gone; it hands typed [`Event`]s to a
//! callback. [`Cache`] is a map those events keep current and that tests feed directly.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;

use super::client::{
    ClientError, ClusterClient, Object, ResourceType, Scope, WatchEvent, from_value, key_of,
};

/// What a reflector reports.
#[derive(Debug, Clone)]
pub enum Event<K> {
    /// Created or changed.
    Applied(K),
    Deleted(K),
    /// A fresh list: everything not in it is gone.
    Restarted(Vec<K>),
}

/// Lists and watches `K` forever (until the callback's receiver side stops the task),
/// reporting each change. Errors are logged and answered with a relist after `backoff`.
pub async fn reflect<K: Object>(
    client: Arc<dyn ClusterClient>,
    namespace: Option<String>,
    backoff: Duration,
    mut emit: impl FnMut(Event<K>) + Send,
) where
    K::Scope: Scope,
{
    let rt = ResourceType::of::<K>();
    loop {
        if let Err(e) = list_and_watch(client.as_ref(), rt, namespace.as_deref(), &mut emit).await {
            tracing::warn!(resource = %rt, error = %e, "list/watch ended; listing again");
            tokio::time::sleep(backoff).await;
        }
    }
}

async fn list_and_watch<K: Object>(
    client: &dyn ClusterClient,
    rt: ResourceType,
    namespace: Option<&str>,
    emit: &mut (impl FnMut(Event<K>) + Send),
) -> Result<(), ClientError>
where
    K::Scope: Scope,
{
    let list = client.list(rt, namespace).await?;
    let items = list
        .items
        .into_iter()
        .map(|v| from_value::<K>(K::KIND, v))
        .collect::<Result<Vec<_>, _>>()?;
    emit(Event::Restarted(items));
    let mut rv = list.resource_version;
    loop {
        let mut stream = client.watch(rt, namespace, &rv).await?;
        while let Some(ev) = stream.next().await {
            let (obj, deleted) = match ev? {
                WatchEvent::Added(v) | WatchEvent::Modified(v) => (v, false),
                WatchEvent::Deleted(v) => (v, true),
                WatchEvent::Bookmark(b) => {
                    rv = b;
                    continue;
                }
            };
            let obj: K = from_value(K::KIND, obj)?;
            if let Some(v) = obj.metadata().resource_version.clone() {
                rv = v;
            }
            emit(if deleted {
                Event::Deleted(obj)
            } else {
                Event::Applied(obj)
            });
        }
        // The server closed the watch (timeout): resume from where we are.
    }
}

/// A shared map of objects by `namespace/name`, kept current by reflector events.
pub struct Cache<K> {
    inner: Arc<RwLock<BTreeMap<String, Arc<K>>>>,
}

impl<K> Clone for Cache<K> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<K> Default for Cache<K> {
    fn default() -> Self {
        Cache {
            inner: Arc::default(),
        }
    }
}

impl<K: Object> Cache<K>
where
    K::Scope: Scope,
{
    pub fn new() -> Self {
        Self::default()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<K>>> {
        self.inner
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<K>>> {
        self.inner
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one event and returns the keys it touched (for the work queue).
    pub fn apply(&self, ev: &Event<K>) -> Vec<String> {
        let mut map = self.write();
        match ev {
            Event::Applied(o) => {
                let key = key_of(o.metadata());
                map.insert(key.clone(), Arc::new(o.clone()));
                vec![key]
            }
            Event::Deleted(o) => {
                let key = key_of(o.metadata());
                map.remove(&key);
                vec![key]
            }
            Event::Restarted(items) => {
                let mut touched: Vec<String> = map.keys().cloned().collect();
                map.clear();
                for o in items {
                    let key = key_of(o.metadata());
                    touched.push(key.clone());
                    map.insert(key, Arc::new(o.clone()));
                }
                touched.sort();
                touched.dedup();
                touched
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<K>> {
        self.read().get(key).cloned()
    }

    pub fn list(&self) -> Vec<Arc<K>> {
        self.read().values().cloned().collect()
    }

    /// Objects of one namespace.
    pub fn list_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        let prefix = format!("{namespace}/");
        self.read()
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| Arc::clone(v))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::fake::FakeClient;
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    fn cm(name: &str) -> serde_json::Value {
        json!({"metadata": {"name": name, "namespace": "ns"}})
    }

    #[tokio::test]
    async fn reflector_lists_then_watches_and_relists_after_gone() {
        let fake = FakeClient::new();
        let rt = ResourceType::of::<ConfigMap>();
        fake.seed(rt, cm("a"));
        let cache: Cache<ConfigMap> = Cache::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let c2 = cache.clone();
        let client: Arc<dyn ClusterClient> = Arc::new(fake.clone());
        let task = tokio::spawn(reflect::<ConfigMap>(
            client,
            None,
            Duration::from_millis(10),
            move |ev| {
                c2.apply(&ev);
                let _ = tx.send(matches!(ev, Event::Restarted(_)));
            },
        ));
        assert!(rx.recv().await.unwrap(), "first event is the list");
        assert!(cache.get("ns/a").is_some());
        fake.seed(rt, cm("b"));
        assert!(!rx.recv().await.unwrap());
        assert!(cache.get("ns/b").is_some());
        assert_eq!(cache.list_namespace("ns").len(), 2);
        assert!(cache.list_namespace("n").is_empty());
        task.abort();
    }

    #[tokio::test]
    async fn a_watch_from_a_compacted_revision_is_gone() {
        let fake = FakeClient::new();
        let rt = ResourceType::of::<ConfigMap>();
        fake.seed(rt, cm("a"));
        fake.seed(rt, cm("b"));
        fake.compact();
        let Err(err) = fake.watch(rt, None, "1").await else {
            panic!("watch from a compacted revision must fail")
        };
        assert!(matches!(err, ClientError::Gone(_)), "{err}");
    }

    #[test]
    fn restart_drops_what_the_new_list_lacks() {
        let cache: Cache<ConfigMap> = Cache::new();
        let a: ConfigMap = serde_json::from_value(cm("a")).unwrap();
        let b: ConfigMap = serde_json::from_value(cm("b")).unwrap();
        cache.apply(&Event::Applied(a));
        let touched = cache.apply(&Event::Restarted(vec![b]));
        assert_eq!(touched, vec!["ns/a".to_owned(), "ns/b".to_owned()]);
        assert!(cache.get("ns/a").is_none());
        assert_eq!(cache.len(), 1);
    }
}
