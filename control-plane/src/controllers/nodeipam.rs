//! Node IPAM: gives every node a `spec.podCIDR` carved out of `--cluster-cidr`, and takes it
//! back when the node is deleted. After a restart the ranges in use are learnt from the nodes
//! before anything is handed out, so no range is given twice.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use serde_json::json;

use super::cache::{Event, reflect};
use super::client::{ClientError, ClusterClient, Typed};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("invalid cluster CIDR {0:?}: expected an IPv4 network such as 10.244.0.0/16")]
    BadClusterCidr(String),
    #[error(
        "node CIDR mask /{size} must be within 1..=30 and longer than the cluster CIDR /{cluster}"
    )]
    BadMaskSize { size: u8, cluster: u8 },
    #[error("cluster CIDR {0} is full: no free node range left")]
    Full(Ipv4Net),
}

/// Hands out fixed-size subnets of one cluster network.
#[derive(Debug, Clone)]
pub struct CidrAllocator {
    cluster: Ipv4Net,
    size: u8,
    used: BTreeSet<u32>,
}

impl CidrAllocator {
    pub fn new(cluster: &str, size: u8) -> Result<Self, IpamError> {
        let net: Ipv4Net = cluster
            .parse()
            .map_err(|_| IpamError::BadClusterCidr(cluster.to_owned()))?;
        if size == 0 || size > 30 || size <= net.prefix_len() {
            return Err(IpamError::BadMaskSize {
                size,
                cluster: net.prefix_len(),
            });
        }
        Ok(CidrAllocator {
            cluster: net.trunc(),
            size,
            used: BTreeSet::new(),
        })
    }

    fn count(&self) -> u32 {
        1u32 << (self.size - self.cluster.prefix_len())
    }

    fn index_of(&self, net: &Ipv4Net) -> Option<u32> {
        if net.prefix_len() != self.size || !self.cluster.contains(net) {
            return None;
        }
        let offset = u32::from(net.network()) - u32::from(self.cluster.network());
        Some(offset >> (32 - self.size))
    }

    fn net_at(&self, i: u32) -> Ipv4Net {
        let base = u32::from(self.cluster.network()) + (i << (32 - self.size));
        Ipv4Net::new(Ipv4Addr::from(base), self.size).unwrap_or(self.cluster)
    }

    /// Marks a range as taken; false if it is not one of ours.
    pub fn occupy(&mut self, cidr: &str) -> bool {
        match cidr.parse::<Ipv4Net>().ok().and_then(|n| self.index_of(&n)) {
            Some(i) => {
                self.used.insert(i);
                true
            }
            None => false,
        }
    }

    pub fn release(&mut self, cidr: &str) {
        if let Some(i) = cidr.parse::<Ipv4Net>().ok().and_then(|n| self.index_of(&n)) {
            self.used.remove(&i);
        }
    }

    /// The lowest free range.
    pub fn allocate(&mut self) -> Result<Ipv4Net, IpamError> {
        let free = (0..self.count())
            .find(|i| !self.used.contains(i))
            .ok_or(IpamError::Full(self.cluster))?;
        self.used.insert(free);
        Ok(self.net_at(free))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeIpamError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("setting podCIDR of node {node}: {source}")]
    Api {
        node: String,
        #[source]
        source: ClientError,
    },
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .filter(|c| !c.is_empty())
}

/// The controller state: the allocator and which node holds which range.
pub struct NodeIpamController {
    client: Arc<dyn ClusterClient>,
    state: Mutex<(CidrAllocator, HashMap<String, String>)>,
}

impl NodeIpamController {
    pub fn new(client: Arc<dyn ClusterClient>, allocator: CidrAllocator) -> Self {
        NodeIpamController {
            client,
            state: Mutex::new((allocator, HashMap::new())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (CidrAllocator, HashMap<String, String>)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one node event; returns the nodes that still need a range.
    pub fn observe(&self, ev: &Event<Node>) -> Vec<String> {
        let mut st = self.lock();
        let (alloc, owners) = &mut *st;
        let mut need = Vec::new();
        let mut see =
            |n: &Node, alloc: &mut CidrAllocator, owners: &mut HashMap<String, String>| {
                let name = n.metadata.name.clone().unwrap_or_default();
                match pod_cidr(n) {
                    Some(c) => {
                        alloc.occupy(c);
                        owners.insert(name, c.to_owned());
                    }
                    None => need.push(name),
                }
            };
        match ev {
            Event::Applied(n) => see(n, alloc, owners),
            Event::Deleted(n) => {
                let name = n.metadata.name.clone().unwrap_or_default();
                if let Some(c) = owners.remove(&name) {
                    alloc.release(&c);
                }
            }
            Event::Restarted(all) => {
                // Learn every range in use before handing any out.
                for (_, c) in owners.drain() {
                    alloc.release(&c);
                }
                for n in all.iter().filter(|n| pod_cidr(n).is_some()) {
                    see(n, alloc, owners);
                }
                for n in all.iter().filter(|n| pod_cidr(n).is_none()) {
                    see(n, alloc, owners);
                }
            }
        }
        need
    }

    /// Gives `node` a range and writes it to the node.
    pub async fn assign(&self, node: &str) -> Result<(), NodeIpamError> {
        let cidr = {
            let mut st = self.lock();
            if st.1.contains_key(node) {
                return Ok(());
            }
            let c = st.0.allocate()?;
            st.1.insert(node.to_owned(), c.to_string());
            c
        };
        let patch = json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
        match Typed::<Node>::new(self.client.as_ref())
            .merge_patch(None, node, None, patch)
            .await
        {
            Ok(_) => {
                tracing::info!(node, %cidr, "assigned pod CIDR");
                Ok(())
            }
            Err(source) => {
                let mut st = self.lock();
                st.1.remove(node);
                st.0.release(&cidr.to_string());
                if source.is_not_found() {
                    return Ok(());
                }
                Err(NodeIpamError::Api {
                    node: node.to_owned(),
                    source,
                })
            }
        }
    }

    pub async fn run(self: Arc<Self>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let me = Arc::clone(&self);
        tokio::spawn(reflect::<Node>(
            Arc::clone(&self.client),
            None,
            Duration::from_secs(1),
            move |ev| {
                for n in me.observe(&ev) {
                    let _ = tx.send(n);
                }
            },
        ));
        while let Some(node) = rx.recv().await {
            if let Err(e) = self.assign(&node).await {
                tracing::warn!(node, error = %e, "assigning pod CIDR failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::client::ResourceType;
    use crate::controllers::fake::FakeClient;
    use proptest::prelude::*;

    #[test]
    fn hands_out_distinct_ranges_and_reuses_released_ones() {
        let mut a = CidrAllocator::new("10.244.0.0/16", 24).unwrap();
        assert_eq!(a.allocate().unwrap().to_string(), "10.244.0.0/24");
        assert_eq!(a.allocate().unwrap().to_string(), "10.244.1.0/24");
        a.release("10.244.0.0/24");
        assert_eq!(a.allocate().unwrap().to_string(), "10.244.0.0/24");
        assert!(a.occupy("10.244.7.0/24"));
        assert!(!a.occupy("10.245.0.0/24"), "outside the cluster CIDR");
        assert!(!a.occupy("10.244.8.0/25"), "wrong size");
    }

    #[test]
    fn bad_configuration_is_rejected() {
        assert_eq!(
            CidrAllocator::new("10.244.0.0", 24).unwrap_err(),
            IpamError::BadClusterCidr("10.244.0.0".into())
        );
        assert!(matches!(
            CidrAllocator::new("10.244.0.0/24", 16),
            Err(IpamError::BadMaskSize { .. })
        ));
        let mut full = CidrAllocator::new("10.0.0.0/23", 24).unwrap();
        full.allocate().unwrap();
        full.allocate().unwrap();
        assert!(matches!(full.allocate(), Err(IpamError::Full(_))));
    }

    proptest! {
        #[test]
        fn allocations_never_overlap(n in 1usize..64) {
            let mut a = CidrAllocator::new("10.0.0.0/18", 24).unwrap();
            let nets: Vec<_> = (0..n).map(|_| a.allocate().unwrap()).collect();
            for (i, x) in nets.iter().enumerate() {
                for y in &nets[i + 1..] {
                    prop_assert!(!x.contains(y) && !y.contains(x));
                }
            }
        }
    }

    #[tokio::test]
    async fn a_restart_keeps_existing_ranges_and_fills_new_nodes() {
        let fake = FakeClient::new();
        let rt = ResourceType::of::<Node>();
        fake.seed(
            rt,
            json!({"metadata": {"name": "old"}, "spec": {"podCIDR": "10.244.0.0/24"}}),
        );
        fake.seed(rt, json!({"metadata": {"name": "new"}, "spec": {}}));
        let c = NodeIpamController::new(
            Arc::new(fake.clone()),
            CidrAllocator::new("10.244.0.0/16", 24).unwrap(),
        );
        let nodes: Vec<Node> = fake
            .objects(rt)
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect();
        let need = c.observe(&Event::Restarted(nodes));
        assert_eq!(need, ["new"]);
        c.assign("new").await.unwrap();
        let n = fake.get(rt, None, "new").await.unwrap();
        assert_eq!(n["spec"]["podCIDR"], "10.244.1.0/24");
        assert_eq!(n["spec"]["podCIDRs"], json!(["10.244.1.0/24"]));
        // Deleting a node frees its range for the next one.
        let old: Node = serde_json::from_value(fake.get(rt, None, "old").await.unwrap()).unwrap();
        c.observe(&Event::Deleted(old));
        fake.seed(rt, json!({"metadata": {"name": "third"}, "spec": {}}));
        c.assign("third").await.unwrap();
        assert_eq!(
            fake.get(rt, None, "third").await.unwrap()["spec"]["podCIDR"],
            "10.244.0.0/24"
        );
    }
}
