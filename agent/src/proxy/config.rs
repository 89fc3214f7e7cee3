//! How the proxy is set up on this node.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

/// Which addresses accept NodePort traffic.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// Every address local to the node (kube-proxy's default).
    #[default]
    AllLocal,
    /// Only the addresses in the Node's status (InternalIP and ExternalIP).
    NodeAddresses,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// This node's name: endpoints whose `nodeName` matches are local.
    pub node_name: String,
    /// The ranges ClusterIPs are allocated from; a Service outside them is not programmed.
    /// Empty accepts any IPv4 ClusterIP.
    pub service_cidrs: Vec<Ipv4Net>,
    /// The pod network. Traffic to a ClusterIP from outside it is masqueraded. When unset,
    /// the Node's `spec.podCIDR` is used; when that is unset too, nothing is masqueraded
    /// for ClusterIP traffic.
    pub cluster_cidr: Option<Ipv4Net>,
    /// The packet mark bit that asks POSTROUTING to masquerade (kube-proxy uses 14).
    pub masquerade_bit: u8,
    pub node_port_addresses: NodePortAddresses,
    /// Accept NodePort connections on 127.0.0.1 (sets `route_localnet`).
    pub localhost_node_ports: bool,
}

impl ProxyConfig {
    pub fn new(node_name: impl Into<String>) -> Self {
        Self {
            node_name: node_name.into(),
            service_cidrs: Vec::new(),
            cluster_cidr: None,
            masquerade_bit: 14,
            node_port_addresses: NodePortAddresses::AllLocal,
            localhost_node_ports: true,
        }
    }

    pub(crate) fn masquerade_mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit.min(31))
    }

    pub(crate) fn in_service_range(&self, ip: Ipv4Addr) -> bool {
        self.service_cidrs.is_empty() || self.service_cidrs.iter().any(|n| n.contains(&ip))
    }
}
