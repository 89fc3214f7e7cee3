//! What the proxy knows about the cluster: Services, EndpointSlices and its own Node, kept
//! up to date by watch events. The agent feeds it from its watches; tests feed it directly.
//! It remembers which Services changed since the last sync so a sync can rewrite only those.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label an EndpointSlice carries to name the Service it belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A Service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One watch event, as the proxy consumes it.
#[derive(Clone, Debug)]
pub enum Change {
    ServiceUpserted(Box<Service>),
    ServiceDeleted(ServiceKey),
    SliceUpserted(Box<EndpointSlice>),
    /// Namespace and name of the EndpointSlice.
    SliceDeleted {
        namespace: String,
        name: String,
    },
    NodeUpserted(Box<Node>),
}

/// The watch-fed cache.
#[derive(Debug, Default)]
pub struct ProxyState {
    services: BTreeMap<ServiceKey, Service>,
    /// Slices by (namespace, slice name).
    slices: HashMap<(String, String), EndpointSlice>,
    /// Slice names per Service, so a Service's endpoints are found without a scan.
    slices_by_service: HashMap<ServiceKey, BTreeSet<String>>,
    node: Option<Node>,
    dirty: BTreeSet<ServiceKey>,
    node_changed: bool,
}

impl ProxyState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one event and marks the Services it touches as changed.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::ServiceUpserted(svc) => {
                let key = ServiceKey::new(
                    svc.metadata.namespace.clone().unwrap_or_default(),
                    svc.metadata.name.clone().unwrap_or_default(),
                );
                self.dirty.insert(key.clone());
                self.services.insert(key, *svc);
            }
            Change::ServiceDeleted(key) => {
                self.services.remove(&key);
                self.dirty.insert(key);
            }
            Change::SliceUpserted(slice) => {
                let namespace = slice.metadata.namespace.clone().unwrap_or_default();
                let name = slice.metadata.name.clone().unwrap_or_default();
                self.remove_slice(&namespace, &name);
                if let Some(owner) = slice_owner(&slice) {
                    self.slices_by_service
                        .entry(owner.clone())
                        .or_default()
                        .insert(name.clone());
                    self.dirty.insert(owner);
                }
                self.slices.insert((namespace, name), *slice);
            }
            Change::SliceDeleted { namespace, name } => self.remove_slice(&namespace, &name),
            Change::NodeUpserted(node) => {
                self.node = Some(*node);
                self.node_changed = true;
            }
        }
    }

    fn remove_slice(&mut self, namespace: &str, name: &str) {
        let Some(old) = self.slices.remove(&(namespace.to_owned(), name.to_owned())) else {
            return;
        };
        if let Some(owner) = slice_owner(&old) {
            if let Some(names) = self.slices_by_service.get_mut(&owner) {
                names.remove(name);
                if names.is_empty() {
                    self.slices_by_service.remove(&owner);
                }
            }
            self.dirty.insert(owner);
        }
    }

    pub fn services(&self) -> impl Iterator<Item = (&ServiceKey, &Service)> {
        self.services.iter()
    }

    pub fn service(&self, key: &ServiceKey) -> Option<&Service> {
        self.services.get(key)
    }

    /// The slices that name `key` as their Service, in name order.
    pub fn slices_for(&self, key: &ServiceKey) -> Vec<&EndpointSlice> {
        self.slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(key.namespace.clone(), name.clone())))
            .collect()
    }

    /// The uid of a Service or an EndpointSlice we hold, for Events about it.
    pub fn uid(&self, kind: &str, namespace: &str, name: &str) -> Option<String> {
        let meta = match kind {
            "Service" => {
                &self
                    .services
                    .get(&ServiceKey::new(namespace, name))?
                    .metadata
            }
            "EndpointSlice" => {
                &self
                    .slices
                    .get(&(namespace.to_owned(), name.to_owned()))?
                    .metadata
            }
            _ => return None,
        };
        meta.uid.clone()
    }

    pub fn node(&self) -> Option<&Node> {
        self.node.as_ref()
    }

    /// The Services changed since the last call, and whether the Node changed.
    pub fn take_changes(&mut self) -> (BTreeSet<ServiceKey>, bool) {
        let node = std::mem::take(&mut self.node_changed);
        (std::mem::take(&mut self.dirty), node)
    }

    pub fn has_changes(&self) -> bool {
        !self.dirty.is_empty() || self.node_changed
    }
}

fn slice_owner(slice: &EndpointSlice) -> Option<ServiceKey> {
    let service = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(ServiceKey::new(
        slice.metadata.namespace.clone().unwrap_or_default(),
        service.clone(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn slice(ns: &str, name: &str, svc: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some([(SERVICE_NAME_LABEL.to_owned(), svc.to_owned())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: None,
            ports: None,
        }
    }

    #[test]
    fn slices_follow_their_service_label_and_mark_it_changed() {
        let mut st = ProxyState::new();
        st.apply(Change::SliceUpserted(Box::new(slice("ns", "a-1", "a"))));
        st.apply(Change::SliceUpserted(Box::new(slice("ns", "a-2", "a"))));
        let key = ServiceKey::new("ns", "a");
        assert_eq!(st.slices_for(&key).len(), 2);
        let (dirty, node) = st.take_changes();
        assert_eq!(dirty.into_iter().collect::<Vec<_>>(), vec![key.clone()]);
        assert!(!node);

        // Relabeling a slice moves it to the other Service and dirties both.
        st.apply(Change::SliceUpserted(Box::new(slice("ns", "a-2", "b"))));
        assert_eq!(st.slices_for(&key).len(), 1);
        assert_eq!(st.slices_for(&ServiceKey::new("ns", "b")).len(), 1);
        assert_eq!(st.take_changes().0.len(), 2);

        st.apply(Change::SliceDeleted {
            namespace: "ns".into(),
            name: "a-1".into(),
        });
        assert!(st.slices_for(&key).is_empty());
        assert!(st.has_changes());
    }
}
