//! From API objects to what the proxy programs: one `PortModel` per Service port with its
//! usable endpoints. Everything that cannot be programmed is dropped here, with a
//! `ProxyEvent` saying why; what remains is valid by construction.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::config::ProxyConfig;
use super::events::ProxyEvent;
use super::state::ServiceKey;

/// Kubernetes' default ClientIP affinity timeout (3 hours).
pub const DEFAULT_AFFINITY_SECONDS: u32 = 10_800;
const MAX_AFFINITY_SECONDS: i32 = 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses a Kubernetes protocol name; absent means TCP.
    pub fn parse(s: Option<&str>) -> Option<Self> {
        match s.unwrap_or("TCP") {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    /// The name iptables uses (`-p tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this node.
    pub local: bool,
    /// The slice said which node it is on; when it did not, the endpoint might be local.
    pub node_known: bool,
}

/// One Service port, ready to be turned into rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortModel {
    /// `namespace/name:port-name` (`namespace/name` for an unnamed port): comments and hashes.
    pub id: String,
    pub protocol: Protocol,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`.
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`.
    pub internal_local: bool,
    /// ClientIP affinity timeout, when affinity is on.
    pub affinity_seconds: Option<u32>,
    /// Endpoints for traffic that may go anywhere in the cluster.
    pub cluster_endpoints: Vec<Endpoint>,
    /// Endpoints on this node.
    pub local_endpoints: Vec<Endpoint>,
    pub health_check_node_port: Option<u16>,
}

impl PortModel {
    /// Traffic arrives from outside the cluster network (NodePort or external IPs).
    pub fn has_external(&self) -> bool {
        self.node_port.is_some() || !self.external_ips.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceModel {
    pub key: ServiceKey,
    pub ports: Vec<PortModel>,
}

/// Something one Service asks for that another Service may also ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Claim {
    Cluster(Ipv4Addr, u16, Protocol),
    NodePort(u16, Protocol),
    External(Ipv4Addr, u16, Protocol),
}

#[derive(Clone, Debug)]
struct ParsedPort {
    name: String,
    protocol: Protocol,
    port: u16,
    node_port: Option<u16>,
}

#[derive(Clone, Debug)]
struct ParsedService {
    cluster_ip: Ipv4Addr,
    ports: Vec<ParsedPort>,
    external_ips: Vec<Ipv4Addr>,
    external_local: bool,
    internal_local: bool,
    affinity_seconds: Option<u32>,
    health_check_node_port: Option<u16>,
}

fn service_event(key: &ServiceKey, reason: &'static str, message: String) -> ProxyEvent {
    ProxyEvent {
        kind: "Service",
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        uid: None,
        reason,
        message,
    }
}

fn port_number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

/// Reads a Service's spec. `None` when there is nothing to program: headless and
/// ExternalName Services silently, broken ones with an event.
fn parse_service(
    key: &ServiceKey,
    svc: &Service,
    cfg: &ProxyConfig,
    problems: &mut Vec<ProxyEvent>,
) -> Option<ParsedService> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let raw_ip = spec.cluster_ip.as_deref().unwrap_or("");
    if raw_ip.is_empty() || raw_ip == "None" {
        return None;
    }
    let cluster_ip = match raw_ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(ip)) => ip,
        Ok(IpAddr::V6(_)) => {
            tracing::debug!(service = %key, cluster_ip = raw_ip, "IPv6 Service: not programmed by the IPv4 proxy");
            return None;
        }
        Err(_) => {
            problems.push(service_event(
                key,
                "InvalidClusterIP",
                format!("clusterIP {raw_ip:?} is not an IP address"),
            ));
            return None;
        }
    };
    if !cfg.in_service_range(cluster_ip) {
        let ranges: Vec<String> = cfg.service_cidrs.iter().map(ToString::to_string).collect();
        problems.push(service_event(
            key,
            "ClusterIPOutOfRange",
            format!(
                "clusterIP {cluster_ip} is outside the service ranges {}",
                ranges.join(",")
            ),
        ));
        return None;
    }

    let mut ports = Vec::new();
    let mut seen_ports: BTreeSet<(u16, Protocol)> = BTreeSet::new();
    let mut seen_names: BTreeSet<String> = BTreeSet::new();
    for sp in spec.ports.iter().flatten() {
        let name = sp.name.clone().unwrap_or_default();
        let Some(protocol) = Protocol::parse(sp.protocol.as_deref()) else {
            problems.push(service_event(
                key,
                "UnsupportedProtocol",
                format!("port {name:?}: protocol {:?} is not supported", sp.protocol),
            ));
            continue;
        };
        let Some(port) = port_number(sp.port) else {
            problems.push(service_event(
                key,
                "InvalidPort",
                format!("port {name:?}: {} is not a valid port number", sp.port),
            ));
            continue;
        };
        if !seen_ports.insert((port, protocol)) || !seen_names.insert(name.clone()) {
            problems.push(service_event(
                key,
                "PortCollision",
                format!(
                    "port {name:?} ({port}/{}) collides with an earlier port of this Service",
                    protocol.as_str()
                ),
            ));
            continue;
        }
        let node_port = match sp.node_port {
            None | Some(0) => None,
            Some(n) => match port_number(n) {
                Some(p) => Some(p),
                None => {
                    problems.push(service_event(
                        key,
                        "InvalidNodePort",
                        format!("port {name:?}: nodePort {n} is not a valid port number"),
                    ));
                    None
                }
            },
        };
        ports.push(ParsedPort {
            name,
            protocol,
            port,
            node_port,
        });
    }

    let mut external_ips = Vec::new();
    for raw in spec.external_ips.iter().flatten() {
        match raw.parse::<Ipv4Addr>() {
            Ok(ip) if !external_ips.contains(&ip) => external_ips.push(ip),
            Ok(_) => {}
            Err(_) => problems.push(service_event(
                key,
                "InvalidExternalIP",
                format!("externalIP {raw:?} is not an IPv4 address"),
            )),
        }
    }

    let affinity_seconds = if spec.session_affinity.as_deref() == Some("ClientIP") {
        let t = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match t {
            None => Some(DEFAULT_AFFINITY_SECONDS),
            Some(t) if (1..=MAX_AFFINITY_SECONDS).contains(&t) => u32::try_from(t).ok(),
            Some(t) => {
                problems.push(service_event(
                    key,
                    "InvalidAffinityTimeout",
                    format!(
                        "sessionAffinity timeoutSeconds {t} is outside 1..={MAX_AFFINITY_SECONDS}; using {DEFAULT_AFFINITY_SECONDS}"
                    ),
                ));
                Some(DEFAULT_AFFINITY_SECONDS)
            }
        }
    } else {
        None
    };

    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let health_check_node_port = if external_local {
        spec.health_check_node_port.and_then(port_number)
    } else {
        None
    };
    Some(ParsedService {
        cluster_ip,
        ports,
        external_ips,
        external_local,
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        affinity_seconds,
        health_check_node_port,
    })
}

/// What a Service asks for that must be unique across Services, and the order in which
/// Services get what they ask for (oldest first, then by name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceClaims {
    pub order: (Option<String>, ServiceKey),
    pub claims: Vec<Claim>,
}

pub fn service_claims(key: &ServiceKey, svc: &Service, cfg: &ProxyConfig) -> ServiceClaims {
    let mut claims = Vec::new();
    if let Some(p) = parse_service(key, svc, cfg, &mut Vec::new()) {
        for port in &p.ports {
            claims.push(Claim::Cluster(p.cluster_ip, port.port, port.protocol));
            if let Some(np) = port.node_port {
                claims.push(Claim::NodePort(np, port.protocol));
            }
            for ip in &p.external_ips {
                claims.push(Claim::External(*ip, port.port, port.protocol));
            }
        }
    }
    let created = svc
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| format!("{:020}", t.0.as_second()));
    ServiceClaims {
        order: (created, key.clone()),
        claims,
    }
}

/// Gives each claim to the first Service (in claim order) asking for it; returns what every
/// other Service is denied.
pub fn resolve_claims<'a>(
    all: impl Iterator<Item = (&'a ServiceKey, &'a ServiceClaims)>,
) -> HashMap<ServiceKey, BTreeSet<Claim>> {
    let mut ordered: Vec<_> = all.collect();
    ordered.sort_by(|a, b| a.1.order.cmp(&b.1.order));
    let mut owner: HashMap<Claim, &ServiceKey> = HashMap::new();
    let mut denied: HashMap<ServiceKey, BTreeSet<Claim>> = HashMap::new();
    for (key, sc) in ordered {
        for c in &sc.claims {
            match owner.get(c) {
                Some(o) if *o != key => {
                    denied.entry(key.clone()).or_default().insert(*c);
                }
                _ => {
                    owner.insert(*c, key);
                }
            }
        }
    }
    denied
}

/// One endpoint as read from a slice, before its port is known.
struct SliceEndpoint {
    ip: Ipv4Addr,
    ready: bool,
    serving_terminating: bool,
    local: bool,
    node_known: bool,
}

/// Builds the model of one Service. `denied` are the claims another Service holds.
pub fn build_service(
    key: &ServiceKey,
    svc: &Service,
    slices: &[&EndpointSlice],
    cfg: &ProxyConfig,
    denied: &BTreeSet<Claim>,
    problems: &mut Vec<ProxyEvent>,
) -> ServiceModel {
    let mut model = ServiceModel {
        key: key.clone(),
        ports: Vec::new(),
    };
    let Some(parsed) = parse_service(key, svc, cfg, problems) else {
        return model;
    };

    // Read every slice's endpoints once, whatever the port.
    let mut per_slice: Vec<(&EndpointSlice, Vec<SliceEndpoint>)> = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let slice_name = slice.metadata.name.clone().unwrap_or_default();
        let mut eps = Vec::new();
        for ep in slice.endpoints.iter().flatten() {
            let Some(addr) = ep.addresses.first() else {
                problems.push(ProxyEvent {
                    kind: "EndpointSlice",
                    namespace: key.namespace.clone(),
                    name: slice_name.clone(),
                    uid: None,
                    reason: "EndpointWithoutAddress",
                    message: format!(
                        "an endpoint of Service {key} (node {:?}) has no addresses; skipped",
                        ep.node_name.as_deref().unwrap_or("")
                    ),
                });
                continue;
            };
            let Ok(ip) = addr.parse::<Ipv4Addr>() else {
                problems.push(ProxyEvent {
                    kind: "EndpointSlice",
                    namespace: key.namespace.clone(),
                    name: slice_name.clone(),
                    uid: None,
                    reason: "InvalidEndpointIP",
                    message: format!(
                        "endpoint address {addr:?} of Service {key} is not an IPv4 address; skipped"
                    ),
                });
                continue;
            };
            let cond = ep.conditions.clone().unwrap_or_default();
            let ready = cond.ready.unwrap_or(true);
            let serving = cond.serving.unwrap_or(ready);
            let terminating = cond.terminating.unwrap_or(false);
            eps.push(SliceEndpoint {
                ip,
                ready,
                serving_terminating: serving && terminating,
                local: ep.node_name.as_deref() == Some(cfg.node_name.as_str()),
                node_known: ep.node_name.is_some(),
            });
        }
        per_slice.push((slice, eps));
    }

    for port in &parsed.ports {
        let id = if port.name.is_empty() {
            key.to_string()
        } else {
            format!("{key}:{}", port.name)
        };
        if denied.contains(&Claim::Cluster(parsed.cluster_ip, port.port, port.protocol)) {
            problems.push(service_event(
                key,
                "PortCollision",
                format!(
                    "{}:{}/{} is already used by another Service; port {:?} skipped",
                    parsed.cluster_ip,
                    port.port,
                    port.protocol.as_str(),
                    port.name
                ),
            ));
            continue;
        }
        let mut node_port = port.node_port;
        if let Some(np) = node_port
            && denied.contains(&Claim::NodePort(np, port.protocol))
        {
            problems.push(service_event(
                key,
                "NodePortCollision",
                format!(
                    "nodePort {np}/{} of port {:?} is already used by another Service; not opened",
                    port.protocol.as_str(),
                    port.name
                ),
            ));
            node_port = None;
        }
        let mut external_ips = parsed.external_ips.clone();
        external_ips.retain(|ip| {
            let taken = denied.contains(&Claim::External(*ip, port.port, port.protocol));
            if taken {
                problems.push(service_event(
                    key,
                    "ExternalIPCollision",
                    format!(
                        "externalIP {ip}:{}/{} is already used by another Service; skipped",
                        port.port,
                        port.protocol.as_str()
                    ),
                ));
            }
            !taken
        });

        let mut all: Vec<(Endpoint, bool, bool)> = Vec::new();
        for (slice, eps) in &per_slice {
            // The slice's own number for this port: named target ports differ per slice.
            let slice_port = slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or("") == port.name
                    && Protocol::parse(p.protocol.as_deref()) == Some(port.protocol)
            });
            let Some(number) = slice_port.and_then(|p| p.port).and_then(port_number) else {
                continue;
            };
            for e in eps {
                let ep = Endpoint {
                    ip: e.ip,
                    port: number,
                    local: e.local,
                    node_known: e.node_known,
                };
                if !all
                    .iter()
                    .any(|(x, _, _)| x.ip == ep.ip && x.port == ep.port)
                {
                    all.push((ep, e.ready, e.serving_terminating));
                }
            }
        }
        let pick = |local_only: bool| -> Vec<Endpoint> {
            let candidates = all.iter().filter(|(e, _, _)| !local_only || e.local);
            let mut ready: Vec<Endpoint> = candidates
                .clone()
                .filter(|(_, r, _)| *r)
                .map(|(e, _, _)| *e)
                .collect();
            if ready.is_empty() {
                // Like kube-proxy: when nothing is ready, terminating endpoints that still
                // serve keep connections working during a rollout.
                ready = candidates
                    .filter(|(_, _, st)| *st)
                    .map(|(e, _, _)| *e)
                    .collect();
            }
            ready.sort();
            ready
        };
        let cluster_endpoints = pick(false);
        let local_endpoints = pick(true);

        model.ports.push(PortModel {
            id,
            protocol: port.protocol,
            cluster_ip: parsed.cluster_ip,
            port: port.port,
            node_port,
            external_ips,
            external_local: parsed.external_local,
            internal_local: parsed.internal_local,
            affinity_seconds: parsed.affinity_seconds,
            cluster_endpoints,
            local_endpoints,
            health_check_node_port: parsed.health_check_node_port,
        });
    }
    model
}

/// The pod network for masquerade decisions: the configured one, else the Node's podCIDR.
pub fn local_cidr(
    cfg: &ProxyConfig,
    node: Option<&k8s_openapi::api::core::v1::Node>,
) -> Option<Ipv4Net> {
    cfg.cluster_cidr.or_else(|| {
        node?
            .spec
            .as_ref()?
            .pod_cidr
            .as_deref()?
            .parse::<Ipv4Net>()
            .ok()
    })
}

/// The Node's own IPv4 addresses (InternalIP and ExternalIP), sorted.
pub fn node_addresses(node: Option<&k8s_openapi::api::core::v1::Node>) -> Vec<Ipv4Addr> {
    let mut out: Vec<Ipv4Addr> = node
        .and_then(|n| n.status.as_ref())
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect();
    out.sort();
    out.dedup();
    out
}
