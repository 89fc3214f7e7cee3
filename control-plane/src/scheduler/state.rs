//! The scheduler's view of the cluster: nodes, and per node what the pods bound to it (or
//! assumed onto it before the watch confirms) already take. Kept up to date incrementally from
//! watch events so one scheduling decision costs O(nodes), not O(pods).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};

use super::resources::{Resources, pod_requests};
use super::scores::scoring_requests;

/// A host port a pod holds: protocol, host IP (`0.0.0.0` = all), port.
pub type HostPort = (String, String, i32);

/// One node and what is placed on it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node: Arc<Node>,
    pub allocatable: Resources,
    pub requested: Resources,
    pub pod_count: usize,
    /// cpu and memory of placed pods with scoring defaults for zero requests.
    pub non_zero_requested: (i128, i128),
    pub host_ports: HashMap<HostPort, usize>,
    /// Pods per controlling owner uid, for spreading.
    pub owners: HashMap<String, usize>,
}

impl NodeInfo {
    fn new(node: Arc<Node>) -> Self {
        let allocatable = Resources::from_map(
            node.status
                .as_ref()
                .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref())),
        );
        NodeInfo {
            node,
            allocatable,
            requested: Resources::default(),
            pod_count: 0,
            non_zero_requested: (0, 0),
            host_ports: HashMap::new(),
            owners: HashMap::new(),
        }
    }

    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or_default()
    }

    fn account(&mut self, p: &PlacedPod, sign: i64) {
        if sign > 0 {
            self.requested.add(&p.requests);
            self.pod_count += 1;
            self.non_zero_requested.0 += p.non_zero.0;
            self.non_zero_requested.1 += p.non_zero.1;
        } else {
            self.requested.sub(&p.requests);
            self.pod_count = self.pod_count.saturating_sub(1);
            self.non_zero_requested.0 -= p.non_zero.0;
            self.non_zero_requested.1 -= p.non_zero.1;
        }
        for hp in &p.host_ports {
            let e = self.host_ports.entry(hp.clone()).or_insert(0);
            if sign > 0 {
                *e += 1;
            } else {
                *e = e.saturating_sub(1);
                if *e == 0 {
                    self.host_ports.remove(hp);
                }
            }
        }
        if let Some(owner) = &p.owner {
            let e = self.owners.entry(owner.clone()).or_insert(0);
            if sign > 0 {
                *e += 1;
            } else {
                *e = e.saturating_sub(1);
                if *e == 0 {
                    self.owners.remove(owner);
                }
            }
        }
    }
}

/// The uid of the pod's controlling owner, if any.
pub fn controller_uid(pod: &Pod) -> Option<String> {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

/// The host ports a pod asks for.
pub fn pod_host_ports(pod: &Pod) -> Vec<HostPort> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.host_port.is_some_and(|h| h > 0))
        .map(|p| {
            (
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                p.host_ip
                    .clone()
                    .filter(|ip| !ip.is_empty())
                    .unwrap_or_else(|| "0.0.0.0".into()),
                p.host_port.unwrap_or_default(),
            )
        })
        .collect()
}

#[derive(Debug, Clone)]
struct PlacedPod {
    node: String,
    requests: Resources,
    non_zero: (i128, i128),
    host_ports: Vec<HostPort>,
    owner: Option<String>,
}

/// Pods that hold node resources: bound and not finished.
fn holds_resources(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed"))
}

/// All nodes and the pods placed on them, keyed by pod `namespace/name`.
#[derive(Debug, Default)]
pub struct ClusterState {
    nodes: BTreeMap<String, NodeInfo>,
    placed: HashMap<String, PlacedPod>,
    /// Pods bound by us whose binding the watch has not shown yet.
    assumed: HashSet<String>,
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

impl ClusterState {
    pub fn nodes(&self) -> impl Iterator<Item = &NodeInfo> {
        self.nodes.values()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn set_node(&mut self, node: Node) {
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut info = NodeInfo::new(Arc::new(node));
        match self.nodes.remove(&name) {
            // An update (a status heartbeat, a label): what is placed there stays counted,
            // without a walk over every pod in the cluster.
            Some(old) => {
                info.requested = old.requested;
                info.pod_count = old.pod_count;
                info.non_zero_requested = old.non_zero_requested;
                info.host_ports = old.host_ports;
                info.owners = old.owners;
            }
            None => {
                for p in self.placed.values().filter(|p| p.node == name) {
                    info.account(p, 1);
                }
            }
        }
        self.nodes.insert(name, info);
    }

    pub fn remove_node(&mut self, name: &str) {
        self.nodes.remove(name);
    }

    /// Records a pod as seen by the watch: placed if bound and running, else not placed.
    pub fn set_pod(&mut self, pod: &Pod) {
        let key = pod_key(pod);
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        if node.is_empty() {
            // An assumed pod whose watch event still shows it unbound stays assumed.
            if !self.assumed.contains(&key) {
                self.unplace(&key);
            }
            return;
        }
        self.assumed.remove(&key);
        if !holds_resources(pod) {
            self.unplace(&key);
            return;
        }
        if self.placed.get(&key).is_some_and(|p| p.node == node) {
            return;
        }
        self.place(key, pod, node);
    }

    pub fn remove_pod(&mut self, pod: &Pod) {
        let key = pod_key(pod);
        self.assumed.remove(&key);
        self.unplace(&key);
    }

    /// Counts a pod on a node before the API confirms the binding.
    pub fn assume(&mut self, pod: &Pod, node: &str) {
        let key = pod_key(pod);
        self.assumed.insert(key.clone());
        self.place(key, pod, node.to_owned());
    }

    /// Undoes [`ClusterState::assume`] after a failed binding.
    pub fn forget(&mut self, pod: &Pod) {
        let key = pod_key(pod);
        if self.assumed.remove(&key) {
            self.unplace(&key);
        }
    }

    fn place(&mut self, key: String, pod: &Pod, node: String) {
        self.unplace(&key);
        let requests = pod_requests(pod);
        let placed = PlacedPod {
            node,
            non_zero: scoring_requests(&requests),
            requests,
            host_ports: pod_host_ports(pod),
            owner: controller_uid(pod),
        };
        if let Some(info) = self.nodes.get_mut(&placed.node) {
            info.account(&placed, 1);
        }
        self.placed.insert(key, placed);
    }

    fn unplace(&mut self, key: &str) {
        if let Some(old) = self.placed.remove(key)
            && let Some(info) = self.nodes.get_mut(&old.node)
        {
            info.account(&old, -1);
        }
    }
}
