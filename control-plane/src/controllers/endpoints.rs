//! The Endpoints and EndpointSlice controllers: for every Service with a selector, the
//! addresses of the pods it selects, ready ones apart from not-ready ones (unless the Service
//! publishes not-ready addresses), with the Service's ports resolved by number or by the name
//! of a container port.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
    ServicePort,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointPort as SlicePort, EndpointSlice,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::cache::{Cache, Event, reflect};
use super::client::{ClientError, ClusterClient, DeleteOptions, Typed, key_of, split_key};
use super::pods::{controller_ref, is_ready};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

/// Ports as resolved on one pod: (name, number, protocol) per Service port.
type PortKey = Vec<(Option<String>, i32, String)>;

/// The container port a Service port targets on one pod; `None` when a named port is absent.
fn target_port(sp: &ServicePort, pod: &Pod) -> Option<i32> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => {
            let protocol = sp.protocol.as_deref().unwrap_or("TCP");
            pod.spec
                .as_ref()?
                .containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .find_map(|p| {
                    (p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol)
                        .then_some(p.container_port)
                })
        }
    }
}

fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
}

/// Pods that a Service selects and that can have an address.
fn selected<'a>(svc: &Service, pods: &'a [Arc<Pod>]) -> Vec<&'a Pod> {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return Vec::new();
    };
    let mut out: Vec<&Pod> = pods
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
                && pod_ip(p).is_some()
                && p.metadata.deletion_timestamp.is_none()
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
        })
        .collect();
    out.sort_by(|a, b| pod_ip(a).cmp(&pod_ip(b)));
    out
}

fn pod_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

fn publish_not_ready(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        == Some(true)
}

/// The Endpoints object a Service should have. Pods are grouped into subsets by the port
/// numbers they resolve to, since a named port can mean different numbers on different pods.
pub fn desired_endpoints(svc: &Service, pods: &[Arc<Pod>]) -> Endpoints {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut groups: BTreeMap<PortKey, EndpointSubset> = BTreeMap::new();
    for pod in selected(svc, pods) {
        let resolved: PortKey = ports
            .iter()
            .filter_map(|sp| {
                target_port(sp, pod).map(|n| {
                    (
                        sp.name.clone(),
                        n,
                        sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    )
                })
            })
            .collect();
        // A headless Service without ports still lists addresses.
        if resolved.is_empty() && !ports.is_empty() {
            continue;
        }
        let subset = groups
            .entry(resolved.clone())
            .or_insert_with(|| EndpointSubset {
                ports: (!resolved.is_empty()).then(|| {
                    resolved
                        .iter()
                        .map(|(name, port, protocol)| EndpointPort {
                            name: name.clone(),
                            port: *port,
                            protocol: Some(protocol.clone()),
                            ..EndpointPort::default()
                        })
                        .collect()
                }),
                ..EndpointSubset::default()
            });
        let address = EndpointAddress {
            ip: pod_ip(pod).unwrap_or_default().to_owned(),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(pod_ref(pod)),
            hostname: None,
        };
        if is_ready(pod) || publish_not_ready(svc) {
            subset.addresses.get_or_insert_with(Vec::new).push(address);
        } else {
            subset
                .not_ready_addresses
                .get_or_insert_with(Vec::new)
                .push(address);
        }
    }
    Endpoints {
        metadata: ObjectMeta {
            name: svc.metadata.name.clone(),
            namespace: svc.metadata.namespace.clone(),
            labels: svc.metadata.labels.clone(),
            ..ObjectMeta::default()
        },
        subsets: (!groups.is_empty()).then(|| groups.into_values().collect()),
    }
}

/// The EndpointSlices a Service should have: one per distinct port set, named
/// `<service>-<index>`, with the Service's name label and our managed-by label.
pub fn desired_slices(svc: &Service, pods: &[Arc<Pod>]) -> Vec<EndpointSlice> {
    let name = svc.metadata.name.clone().unwrap_or_default();
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let family = svc
        .spec
        .as_ref()
        .and_then(|s| s.ip_families.as_ref())
        .and_then(|f| f.first().cloned())
        .unwrap_or_else(|| "IPv4".into());
    let mut groups: BTreeMap<PortKey, Vec<Endpoint>> = BTreeMap::new();
    for pod in selected(svc, pods) {
        let resolved: Vec<_> = ports
            .iter()
            .filter_map(|sp| {
                target_port(sp, pod).map(|n| {
                    (
                        sp.name.clone(),
                        n,
                        sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    )
                })
            })
            .collect();
        if resolved.is_empty() && !ports.is_empty() {
            continue;
        }
        let ready = is_ready(pod);
        groups.entry(resolved).or_default().push(Endpoint {
            addresses: vec![pod_ip(pod).unwrap_or_default().to_owned()],
            conditions: Some(EndpointConditions {
                ready: Some(ready || publish_not_ready(svc)),
                serving: Some(ready),
                terminating: Some(false),
            }),
            node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(pod_ref(pod)),
            ..Endpoint::default()
        });
    }
    if groups.is_empty() {
        groups.insert(Vec::new(), Vec::new());
    }
    let mut labels = svc.metadata.labels.clone().unwrap_or_default();
    labels.insert(SERVICE_NAME_LABEL.into(), name.clone());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (ports, endpoints))| EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{name}-{i}")),
                namespace: svc.metadata.namespace.clone(),
                labels: Some(labels.clone()),
                owner_references: Some(vec![controller_ref("v1", "Service", &svc.metadata)]),
                ..ObjectMeta::default()
            },
            address_type: family.clone(),
            endpoints: Some(endpoints),
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, port, protocol)| SlicePort {
                        name,
                        port: Some(port),
                        protocol: Some(protocol),
                        app_protocol: None,
                    })
                    .collect(),
            ),
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    #[error("Service {key}: {action}: {source}")]
    Api {
        key: String,
        action: &'static str,
        #[source]
        source: ClientError,
    },
}

#[derive(Clone)]
pub struct EndpointsController {
    client: Arc<dyn ClusterClient>,
    pub services: Cache<Service>,
    pub pods: Cache<Pod>,
    pub endpoints: Cache<Endpoints>,
    pub slices: Cache<EndpointSlice>,
    pub queue: super::queue::WorkQueue,
}

impl EndpointsController {
    pub fn new(client: Arc<dyn ClusterClient>) -> Self {
        EndpointsController {
            client,
            services: Cache::new(),
            pods: Cache::new(),
            endpoints: Cache::new(),
            slices: Cache::new(),
            queue: super::queue::WorkQueue::new(),
        }
    }

    pub fn on_service(&self, ev: Event<Service>) {
        for k in self.services.apply(&ev) {
            self.queue.add(k);
        }
    }

    /// A pod change touches every Service in its namespace whose selector matches it before or
    /// after the change.
    pub fn on_pod(&self, ev: Event<Pod>) {
        let mut touched: Vec<Pod> = Vec::new();
        match &ev {
            Event::Applied(p) | Event::Deleted(p) => {
                if let Some(old) = self.pods.get(&key_of(&p.metadata)) {
                    touched.push((*old).clone());
                }
                touched.push(p.clone());
            }
            Event::Restarted(_) => {
                for s in self.services.list() {
                    self.queue.add(key_of(&s.metadata));
                }
            }
        }
        self.pods.apply(&ev);
        for p in touched {
            let ns = p.metadata.namespace.as_deref().unwrap_or_default();
            for svc in self.services.list_namespace(ns) {
                let sel = svc.spec.as_ref().and_then(|s| s.selector.as_ref());
                if sel.is_some_and(|sel| {
                    sel.iter()
                        .all(|(k, v)| p.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
                }) {
                    self.queue.add(key_of(&svc.metadata));
                }
            }
        }
    }

    pub async fn reconcile(&self, key: &str) -> Result<Option<Duration>, EndpointsError> {
        let (ns, name) = split_key(key);
        let err = |action: &'static str| {
            let key = key.to_owned();
            move |source| EndpointsError::Api {
                key: key.clone(),
                action,
                source,
            }
        };
        let ep_api = Typed::<Endpoints>::new(self.client.as_ref());
        let slice_api = Typed::<EndpointSlice>::new(self.client.as_ref());
        let svc = self.services.get(key);
        let has_selector = svc.as_ref().is_some_and(|s| {
            s.spec
                .as_ref()
                .and_then(|sp| sp.selector.as_ref())
                .is_some()
        });
        let existing_slices: Vec<_> = self
            .slices
            .list_namespace(ns.unwrap_or_default())
            .into_iter()
            .filter(|s| {
                s.metadata.labels.as_ref().is_some_and(|l| {
                    l.get(SERVICE_NAME_LABEL).map(String::as_str) == Some(name)
                        && l.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
                })
            })
            .collect();
        let Some(svc) = svc.filter(|_| has_selector) else {
            // Without a selector, Endpoints are the user's; we only clean up our slices.
            for s in existing_slices {
                let n = s.metadata.name.clone().unwrap_or_default();
                match slice_api.delete(ns, &n, DeleteOptions::default()).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(err("deleting EndpointSlice")(e)),
                }
            }
            if self.services.get(key).is_none() && self.endpoints.get(key).is_some() {
                match ep_api.delete(ns, name, DeleteOptions::default()).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(err("deleting Endpoints")(e)),
                }
            }
            return Ok(None);
        };
        let pods = self.pods.list_namespace(ns.unwrap_or_default());
        let want = desired_endpoints(&svc, &pods);
        match self.endpoints.get(key) {
            Some(cur)
                if cur.subsets == want.subsets && cur.metadata.labels == want.metadata.labels => {}
            Some(cur) => {
                let mut next = want.clone();
                next.metadata.resource_version = cur.metadata.resource_version.clone();
                let updated = ep_api
                    .update(&next)
                    .await
                    .map_err(err("updating Endpoints"))?;
                self.endpoints.apply(&Event::Applied(updated));
            }
            None => match ep_api.create(&want).await {
                Ok(created) => {
                    self.endpoints.apply(&Event::Applied(created));
                }
                // The cache is behind; the watch brings it and we come back.
                Err(e) if e.is_already_exists() => return Ok(Some(Duration::from_millis(200))),
                Err(e) => return Err(err("creating Endpoints")(e)),
            },
        }
        let want_slices = desired_slices(&svc, &pods);
        for want in &want_slices {
            let want_name = want.metadata.name.clone().unwrap_or_default();
            match existing_slices
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(&want_name))
            {
                Some(cur)
                    if cur.endpoints == want.endpoints
                        && cur.ports == want.ports
                        && cur.address_type == want.address_type => {}
                Some(cur) => {
                    let mut next = want.clone();
                    next.metadata.resource_version = cur.metadata.resource_version.clone();
                    let updated = slice_api
                        .update(&next)
                        .await
                        .map_err(err("updating EndpointSlice"))?;
                    self.slices.apply(&Event::Applied(updated));
                }
                None => match slice_api.create(want).await {
                    Ok(created) => {
                        self.slices.apply(&Event::Applied(created));
                    }
                    Err(e) if e.is_already_exists() => return Ok(Some(Duration::from_millis(200))),
                    Err(e) => return Err(err("creating EndpointSlice")(e)),
                },
            }
        }
        for extra in existing_slices.iter().filter(|s| {
            !want_slices
                .iter()
                .any(|w| w.metadata.name == s.metadata.name)
        }) {
            let n = extra.metadata.name.clone().unwrap_or_default();
            match slice_api.delete(ns, &n, DeleteOptions::default()).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(err("deleting EndpointSlice")(e)),
            }
        }
        Ok(None)
    }

    pub async fn run(self, workers: usize) {
        let c = Arc::clone(&self.client);
        let backoff = Duration::from_secs(1);
        let me = self.clone();
        tokio::spawn(reflect::<Service>(
            Arc::clone(&c),
            None,
            backoff,
            move |ev| me.on_service(ev),
        ));
        let me = self.clone();
        tokio::spawn(reflect::<Pod>(Arc::clone(&c), None, backoff, move |ev| {
            me.on_pod(ev);
        }));
        let me = self.clone();
        tokio::spawn(reflect::<Endpoints>(
            Arc::clone(&c),
            None,
            backoff,
            move |ev| {
                for k in me.endpoints.apply(&ev) {
                    me.queue.add(k);
                }
            },
        ));
        let me = self.clone();
        tokio::spawn(reflect::<EndpointSlice>(c, None, backoff, move |ev| {
            me.slices.apply(&ev);
        }));
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
    use crate::controllers::client::ResourceType;
    use crate::controllers::fake::FakeClient;
    use serde_json::{Value, json};

    fn svc(extra: Value) -> Service {
        let mut v = json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "svc-uid"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "port": 80, "targetPort": "http"},
                {"name": "metrics", "port": 9090, "targetPort": 9100}]},
        });
        json_patch::merge(&mut v, &extra);
        serde_json::from_value(v).unwrap()
    }

    fn pod(name: &str, ip: &str, ready: bool, http_port: i32) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                    "ports": [{"name": "http", "containerPort": http_port}]}]},
                "status": {"podIP": ip, "phase": "Running",
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn ready_and_not_ready_addresses_with_named_ports() {
        let pods = vec![
            pod("a", "10.0.0.2", true, 8080),
            pod("b", "10.0.0.1", false, 8080),
            pod("c", "", true, 8080),
        ];
        let ep = desired_endpoints(&svc(json!({})), &pods);
        let subsets = ep.subsets.unwrap();
        assert_eq!(subsets.len(), 1);
        let s = &subsets[0];
        let ips = |a: &Option<Vec<EndpointAddress>>| {
            a.iter().flatten().map(|x| x.ip.clone()).collect::<Vec<_>>()
        };
        assert_eq!(ips(&s.addresses), ["10.0.0.2"]);
        assert_eq!(
            ips(&s.not_ready_addresses),
            ["10.0.0.1"],
            "a pod without an IP is left out"
        );
        let ports: Vec<_> = s
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.port))
            .collect();
        assert_eq!(ports, [("http".into(), 8080), ("metrics".into(), 9100)]);
    }

    #[test]
    fn pods_resolving_named_ports_differently_get_separate_subsets() {
        let pods = vec![
            pod("a", "10.0.0.1", true, 8080),
            pod("b", "10.0.0.2", true, 8081),
        ];
        assert_eq!(
            desired_endpoints(&svc(json!({})), &pods)
                .subsets
                .unwrap()
                .len(),
            2
        );
        assert_eq!(desired_slices(&svc(json!({})), &pods).len(), 2);
    }

    #[test]
    fn publish_not_ready_addresses_counts_everyone_ready() {
        let pods = vec![pod("b", "10.0.0.1", false, 8080)];
        let s = svc(json!({"spec": {"publishNotReadyAddresses": true}}));
        let subsets = desired_endpoints(&s, &pods).subsets.unwrap();
        assert_eq!(subsets[0].addresses.as_ref().unwrap().len(), 1);
        assert!(subsets[0].not_ready_addresses.is_none());
        let slices = desired_slices(&s, &pods);
        let cond = slices[0].endpoints.as_ref().unwrap()[0]
            .conditions
            .clone()
            .unwrap();
        assert_eq!((cond.ready, cond.serving), (Some(true), Some(false)));
    }

    #[test]
    fn headless_service_without_ports_lists_addresses() {
        let s = svc(json!({"spec": {"clusterIP": "None", "ports": null}}));
        let ep = desired_endpoints(&s, &[pod("a", "10.0.0.1", true, 80)]);
        let subsets = ep.subsets.unwrap();
        assert!(subsets[0].ports.is_none());
        assert_eq!(subsets[0].addresses.as_ref().unwrap()[0].ip, "10.0.0.1");
    }

    #[tokio::test]
    async fn reconcile_writes_endpoints_and_slices_and_follows_changes() {
        let fake = FakeClient::new();
        let c = EndpointsController::new(Arc::new(fake.clone()) as Arc<dyn ClusterClient>);
        c.on_service(Event::Applied(svc(json!({}))));
        c.on_pod(Event::Applied((*pod("a", "10.0.0.1", true, 8080)).clone()));
        c.reconcile("ns/web").await.unwrap();
        let ep = fake
            .get(ResourceType::of::<Endpoints>(), Some("ns"), "web")
            .await
            .unwrap();
        assert_eq!(ep["subsets"][0]["addresses"][0]["ip"], "10.0.0.1");
        let slices = fake.objects(ResourceType::of::<EndpointSlice>());
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0]["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
        assert_eq!(slices[0]["endpoints"][0]["addresses"][0], "10.0.0.1");
        for s in &slices {
            c.slices
                .apply(&Event::Applied(serde_json::from_value(s.clone()).unwrap()));
        }
        // The pod goes away: both follow.
        c.on_pod(Event::Deleted((*pod("a", "10.0.0.1", true, 8080)).clone()));
        c.reconcile("ns/web").await.unwrap();
        let ep = fake
            .get(ResourceType::of::<Endpoints>(), Some("ns"), "web")
            .await
            .unwrap();
        assert!(ep.get("subsets").is_none_or(Value::is_null), "{ep}");
        let slices = fake.objects(ResourceType::of::<EndpointSlice>());
        assert_eq!(slices[0]["endpoints"], json!([]));
        // The Service goes away: its Endpoints and slices too.
        for s in &slices {
            c.slices
                .apply(&Event::Applied(serde_json::from_value(s.clone()).unwrap()));
        }
        c.on_service(Event::Deleted(svc(json!({}))));
        c.reconcile("ns/web").await.unwrap();
        assert!(fake.objects(ResourceType::of::<Endpoints>()).is_empty());
        assert!(fake.objects(ResourceType::of::<EndpointSlice>()).is_empty());
    }
}
