//! How the proxy is set up on this node.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use super::iptables::BackendChoice;
use super::run::Timing;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{field} {value:?} is not an IPv4 CIDR: {reason}")]
    BadCidr {
        field: &'static str,
        value: String,
        reason: String,
    },
}

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
    /// Which iptables to drive (`Auto`: whatever `iptables` on the PATH is).
    pub backend: BackendChoice,
    /// How often the loop syncs, resyncs and checks for flushed chains.
    pub timing: Timing,
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
            backend: BackendChoice::Auto,
            timing: Timing::default(),
        }
    }

    /// The configuration of the agent's settings: `cluster_cidr` (the pod network) and
    /// `service_ranges` (the API server's `--service-cluster-ip-range`, comma-separated),
    /// as the agent's config file spells them. IPv6 entries are left to an IPv6 proxy.
    pub fn for_node(
        node_name: impl Into<String>,
        cluster_cidr: Option<&str>,
        service_ranges: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let mut cfg = Self::new(node_name);
        cfg.cluster_cidr = parse_v4_cidrs("clusterCIDR", cluster_cidr.unwrap_or(""))?
            .into_iter()
            .next();
        cfg.service_cidrs = parse_v4_cidrs("serviceClusterIPRange", service_ranges.unwrap_or(""))?;
        Ok(cfg)
    }

    pub(crate) fn masquerade_mark(&self) -> String {
        format!("{:#x}", 1u32 << self.masquerade_bit.min(31))
    }

    pub(crate) fn in_service_range(&self, ip: Ipv4Addr) -> bool {
        self.service_cidrs.is_empty() || self.service_cidrs.iter().any(|n| n.contains(&ip))
    }
}

fn parse_v4_cidrs(field: &'static str, text: &str) -> Result<Vec<Ipv4Net>, ConfigError> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.parse::<ipnet::IpNet>() {
            Ok(ipnet::IpNet::V4(n)) => out.push(n),
            Ok(ipnet::IpNet::V6(_)) => {}
            Err(e) => {
                return Err(ConfigError::BadCidr {
                    field,
                    value: part.to_owned(),
                    reason: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_settings_become_ranges_and_bad_ones_are_named() {
        let cfg = ProxyConfig::for_node(
            "n1",
            Some("10.244.0.0/16"),
            Some("10.96.0.0/12, fd00::/108"),
        )
        .expect("config");
        assert_eq!(
            cfg.cluster_cidr,
            Some("10.244.0.0/16".parse().expect("cidr"))
        );
        assert_eq!(
            cfg.service_cidrs,
            vec!["10.96.0.0/12".parse::<Ipv4Net>().expect("cidr")]
        );
        let none = ProxyConfig::for_node("n1", None, None).expect("config");
        assert!(none.cluster_cidr.is_none() && none.service_cidrs.is_empty());

        let err = ProxyConfig::for_node("n1", None, Some("10.96.0.0/33")).expect_err("bad");
        assert!(
            err.to_string()
                .contains("serviceClusterIPRange \"10.96.0.0/33\""),
            "{err}"
        );
    }
}
