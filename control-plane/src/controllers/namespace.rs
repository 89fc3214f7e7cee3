//! Namespace lifecycle: every active namespace gets a `default` ServiceAccount and, when
//! the cluster CA is known, the `kube-root-ca.crt` ConfigMap with it under `ca.crt` (upstream's
//! root CA publisher, which pods' projected service account volumes read); a namespace
//! being deleted has everything in it deleted, then its `kubernetes` finalizer removed so the
//! API server can remove it.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{
    ConfigMap, Endpoints, Event as CoreEvent, Namespace, PersistentVolumeClaim, Pod, Secret,
    Service, ServiceAccount,
};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use super::cache::{Cache, Event, reflect};
use super::client::{ClientError, ClusterClient, DeleteOptions, Propagation, ResourceType, Typed};
use super::queue::WorkQueue;

/// The namespaced types a namespace deletion empties, workloads first so their controllers
/// stop replacing pods.
pub fn namespaced_types() -> Vec<ResourceType> {
    vec![
        ResourceType::of::<Deployment>(),
        ResourceType::of::<DaemonSet>(),
        ResourceType::of::<StatefulSet>(),
        ResourceType::of::<CronJob>(),
        ResourceType::of::<Job>(),
        ResourceType::of::<ReplicaSet>(),
        ResourceType::of::<Pod>(),
        ResourceType::of::<Service>(),
        ResourceType::of::<Endpoints>(),
        ResourceType::of::<EndpointSlice>(),
        ResourceType::of::<ConfigMap>(),
        ResourceType::of::<Secret>(),
        ResourceType::of::<PersistentVolumeClaim>(),
        ResourceType::of::<Lease>(),
        ResourceType::of::<CoreEvent>(),
        ResourceType::of::<ServiceAccount>(),
    ]
}

pub const NAMESPACE_FINALIZER: &str = "kubernetes";
/// The ConfigMap every namespace gets with the cluster CA.
pub const ROOT_CA_CONFIG_MAP: &str = "kube-root-ca.crt";
/// Its key.
pub const ROOT_CA_KEY: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace {namespace}: {action}: {source}")]
    Api {
        namespace: String,
        action: String,
        #[source]
        source: ClientError,
    },
}

#[derive(Clone)]
pub struct NamespaceController {
    client: Arc<dyn ClusterClient>,
    pub namespaces: Cache<Namespace>,
    pub service_accounts: Cache<ServiceAccount>,
    /// Only the `kube-root-ca.crt` ConfigMaps.
    pub root_ca_maps: Cache<ConfigMap>,
    /// The cluster CA in PEM; `None` publishes nothing.
    root_ca: Option<String>,
    pub queue: WorkQueue,
}

impl NamespaceController {
    pub fn new(client: Arc<dyn ClusterClient>) -> Self {
        NamespaceController {
            client,
            namespaces: Cache::new(),
            service_accounts: Cache::new(),
            root_ca_maps: Cache::new(),
            root_ca: None,
            queue: WorkQueue::new(),
        }
    }

    /// Publishes `pem` as `kube-root-ca.crt` in every active namespace.
    #[must_use]
    pub fn with_root_ca(mut self, pem: String) -> Self {
        self.root_ca = Some(pem);
        self
    }

    pub fn on_config_map(&self, ev: Event<ConfigMap>) {
        let ours = |c: &ConfigMap| c.metadata.name.as_deref() == Some(ROOT_CA_CONFIG_MAP);
        let ev = match ev {
            Event::Applied(c) if ours(&c) => Event::Applied(c),
            Event::Deleted(c) if ours(&c) => Event::Deleted(c),
            Event::Restarted(items) => Event::Restarted(items.into_iter().filter(ours).collect()),
            _ => return,
        };
        for k in self.root_ca_maps.apply(&ev) {
            if let Some((ns, _)) = k.split_once('/') {
                self.queue.add(ns.to_owned());
            }
        }
    }

    /// Creates or corrects the namespace's `kube-root-ca.crt`.
    async fn publish_root_ca(&self, namespace: &str, pem: &str) -> Result<(), ClientError> {
        let want = std::collections::BTreeMap::from([(ROOT_CA_KEY.to_owned(), pem.to_owned())]);
        let typed = Typed::<ConfigMap>::new(self.client.as_ref());
        match self
            .root_ca_maps
            .get(&format!("{namespace}/{ROOT_CA_CONFIG_MAP}"))
        {
            Some(current) if current.data.as_ref() == Some(&want) => Ok(()),
            Some(current) => {
                let mut fixed = current.as_ref().clone();
                fixed.data = Some(want);
                fixed.binary_data = None;
                let stored = typed.update(&fixed).await?;
                self.root_ca_maps.apply(&Event::Applied(stored));
                Ok(())
            }
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(ROOT_CA_CONFIG_MAP.into()),
                        namespace: Some(namespace.to_owned()),
                        annotations: Some(std::collections::BTreeMap::from([(
                            "kubernetes.io/description".to_owned(),
                            "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.".to_owned(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(want),
                    ..ConfigMap::default()
                };
                match typed.create(&cm).await {
                    Ok(created) => {
                        self.root_ca_maps.apply(&Event::Applied(created));
                        Ok(())
                    }
                    Err(e) if e.is_already_exists() => Ok(()),
                    Err(e) => Err(e),
                }
            }
        }
    }

    pub fn on_namespace(&self, ev: Event<Namespace>) {
        for k in self.namespaces.apply(&ev) {
            self.queue.add(k);
        }
    }

    pub fn on_service_account(&self, ev: Event<ServiceAccount>) {
        for k in self.service_accounts.apply(&ev) {
            if let Some((ns, _)) = k.split_once('/') {
                self.queue.add(ns.to_owned());
            }
        }
    }

    pub async fn reconcile(&self, name: &str) -> Result<Option<Duration>, NamespaceError> {
        let Some(ns) = self.namespaces.get(name) else {
            return Ok(None);
        };
        let err = |action: String| {
            let namespace = name.to_owned();
            move |source| NamespaceError::Api {
                namespace: namespace.clone(),
                action,
                source,
            }
        };
        if ns.metadata.deletion_timestamp.is_none() {
            if self
                .service_accounts
                .get(&format!("{name}/default"))
                .is_none()
            {
                let sa = ServiceAccount {
                    metadata: ObjectMeta {
                        name: Some("default".into()),
                        namespace: Some(name.to_owned()),
                        ..ObjectMeta::default()
                    },
                    ..ServiceAccount::default()
                };
                match Typed::<ServiceAccount>::new(self.client.as_ref())
                    .create(&sa)
                    .await
                {
                    Ok(created) => {
                        self.service_accounts.apply(&Event::Applied(created));
                    }
                    Err(e) if e.is_already_exists() => {}
                    // Created between our read and write: terminating namespaces refuse it.
                    Err(e) => return Err(err("creating the default ServiceAccount".into())(e)),
                }
            }
            if let Some(pem) = &self.root_ca {
                match self.publish_root_ca(name, pem).await {
                    Ok(()) => {}
                    Err(e) if e.is_conflict() => return Ok(Some(Duration::from_millis(100))),
                    // A namespace that started terminating meanwhile refuses new objects.
                    Err(ClientError::Api { code: 403, .. }) => {}
                    Err(e) => return Err(err(format!("publishing {ROOT_CA_CONFIG_MAP}"))(e)),
                }
            }
            return Ok(None);
        }
        // Terminating: delete what is left, then release the namespace.
        let mut remaining = 0;
        for rt in namespaced_types() {
            let list = match self.client.list(rt, Some(name)).await {
                Ok(l) => l,
                // A type this API server does not serve holds nothing.
                Err(ClientError::NotFound { .. }) => continue,
                Err(ClientError::Api { code: 404, .. }) => continue,
                Err(e) => return Err(err(format!("listing {rt}"))(e)),
            };
            for item in list.items {
                remaining += 1;
                if item.pointer("/metadata/deletionTimestamp").is_some() {
                    continue;
                }
                let obj_name = item
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                let opts = DeleteOptions {
                    propagation: Some(Propagation::Background),
                    ..DeleteOptions::default()
                };
                match self.client.delete(rt, Some(name), obj_name, opts).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(err(format!("deleting {rt} {obj_name}"))(e)),
                }
            }
        }
        if remaining > 0 {
            return Ok(Some(Duration::from_secs(1)));
        }
        let finalizers: Vec<String> = ns
            .spec
            .as_ref()
            .and_then(|s| s.finalizers.clone())
            .unwrap_or_default();
        if finalizers.iter().any(|f| f == NAMESPACE_FINALIZER) {
            let mut body = serde_json::to_value(ns.as_ref()).map_err(|e| NamespaceError::Api {
                namespace: name.to_owned(),
                action: "encoding".into(),
                source: ClientError::Decode {
                    what: "Namespace".into(),
                    source: e,
                },
            })?;
            body["spec"]["finalizers"] = json!(
                finalizers
                    .iter()
                    .filter(|f| *f != NAMESPACE_FINALIZER)
                    .collect::<Vec<_>>()
            );
            body["apiVersion"] = json!("v1");
            body["kind"] = json!("Namespace");
            match self
                .client
                .update(
                    ResourceType::of::<Namespace>(),
                    None,
                    name,
                    Some("finalize"),
                    body,
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) if e.is_conflict() => return Ok(Some(Duration::from_millis(100))),
                Err(e) => return Err(err("removing the namespace finalizer".into())(e)),
            }
        }
        Ok(None)
    }

    pub async fn run(self, workers: usize) {
        let backoff = Duration::from_secs(1);
        let me = self.clone();
        tokio::spawn(reflect::<Namespace>(
            Arc::clone(&self.client),
            None,
            backoff,
            move |ev| {
                me.on_namespace(ev);
            },
        ));
        let me = self.clone();
        tokio::spawn(reflect::<ServiceAccount>(
            Arc::clone(&self.client),
            None,
            backoff,
            move |ev| me.on_service_account(ev),
        ));
        if self.root_ca.is_some() {
            let me = self.clone();
            tokio::spawn(reflect::<ConfigMap>(
                Arc::clone(&self.client),
                None,
                backoff,
                move |ev| me.on_config_map(ev),
            ));
        }
        super::run_workers(self.queue.clone(), workers, move |key| {
            let me = self.clone();
            async move { me.reconcile(&key).await }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::fake::FakeClient;

    fn ns(deleting: bool) -> Namespace {
        let mut v = json!({"metadata": {"name": "team"}, "spec": {"finalizers": ["kubernetes"]}});
        if deleting {
            v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(v).unwrap()
    }

    #[tokio::test]
    async fn an_active_namespace_gets_a_default_service_account_once() {
        let fake = FakeClient::new();
        let c = NamespaceController::new(Arc::new(fake.clone()));
        c.on_namespace(Event::Applied(ns(false)));
        c.reconcile("team").await.unwrap();
        c.reconcile("team").await.unwrap();
        let sas = fake.objects(ResourceType::of::<ServiceAccount>());
        assert_eq!(sas.len(), 1);
        assert_eq!(sas[0]["metadata"]["name"], "default");
        assert_eq!(sas[0]["metadata"]["namespace"], "team");
    }

    #[tokio::test]
    async fn every_active_namespace_gets_the_root_ca_and_a_changed_one_is_put_back() {
        let fake = FakeClient::new();
        let c = NamespaceController::new(Arc::new(fake.clone())).with_root_ca("PEM-1".into());
        c.on_namespace(Event::Applied(ns(false)));
        c.reconcile("team").await.unwrap();
        c.reconcile("team").await.unwrap();
        let maps = fake.objects(ResourceType::of::<ConfigMap>());
        assert_eq!(maps.len(), 1, "{maps:?}");
        assert_eq!(maps[0]["metadata"]["name"], ROOT_CA_CONFIG_MAP);
        assert_eq!(maps[0]["metadata"]["namespace"], "team");
        assert_eq!(maps[0]["data"]["ca.crt"], "PEM-1");
        // Someone edits it: the watch brings the change and the next pass restores it.
        let mut edited: ConfigMap = serde_json::from_value(maps[0].clone()).unwrap();
        edited.data = Some([("ca.crt".to_owned(), "tampered".to_owned())].into());
        c.on_config_map(Event::Applied(edited));
        c.reconcile("team").await.unwrap();
        let maps = fake.objects(ResourceType::of::<ConfigMap>());
        assert_eq!(maps[0]["data"]["ca.crt"], "PEM-1");
        // Other ConfigMaps are not the publisher's business.
        c.on_config_map(Event::Applied(
            serde_json::from_value(json!({"metadata": {"name": "app", "namespace": "team"}}))
                .unwrap(),
        ));
        assert!(c.root_ca_maps.get("team/app").is_none());
    }

    #[tokio::test]
    async fn without_a_root_ca_nothing_is_published() {
        let fake = FakeClient::new();
        let c = NamespaceController::new(Arc::new(fake.clone()));
        c.on_namespace(Event::Applied(ns(false)));
        c.reconcile("team").await.unwrap();
        assert!(fake.objects(ResourceType::of::<ConfigMap>()).is_empty());
    }

    #[tokio::test]
    async fn a_terminating_namespace_is_emptied_then_released() {
        let fake = FakeClient::new();
        fake.seed(
            ResourceType::of::<Namespace>(),
            serde_json::to_value(ns(true)).unwrap(),
        );
        for (rt, name) in [
            (ResourceType::of::<Pod>(), "p"),
            (ResourceType::of::<ConfigMap>(), "cm"),
            (ResourceType::of::<Deployment>(), "d"),
        ] {
            fake.seed(rt, json!({"metadata": {"name": name, "namespace": "team"}}));
        }
        fake.seed(
            ResourceType::of::<ConfigMap>(),
            json!({"metadata": {"name": "elsewhere", "namespace": "other"}}),
        );
        let c = NamespaceController::new(Arc::new(fake.clone()));
        c.on_namespace(Event::Applied(ns(true)));
        assert!(
            c.reconcile("team").await.unwrap().is_some(),
            "comes back to check"
        );
        assert!(fake.objects(ResourceType::of::<Pod>()).is_empty());
        assert_eq!(
            fake.objects(ResourceType::of::<ConfigMap>()).len(),
            1,
            "other namespaces untouched"
        );
        assert_eq!(c.reconcile("team").await.unwrap(), None);
        // With its finalizer gone the namespace itself is removed.
        let gone = fake
            .get(ResourceType::of::<Namespace>(), None, "team")
            .await;
        assert!(gone.unwrap_err().is_not_found());
    }
}
