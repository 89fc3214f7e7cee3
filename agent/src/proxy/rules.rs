//! From the model to iptables rules, as `iptables-restore` lines.
//!
//! The shape follows kube-proxy's iptables mode with our own chain names, and writes less:
//! an endpoint gets its own chain only when it needs two actions (a hairpin masquerade
//! mark for an endpoint that may be on this node, or an affinity `recent --set`); every
//! other endpoint is a single DNAT rule in its Service's chain. Only the rules that users
//! read first (the dispatch and reject rules) carry comments.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use sha2::{Digest, Sha256};

use super::model::{Endpoint, PortModel, ServiceModel};

pub const PREFIX: &str = "FERRO-";
pub const SERVICES: &str = "FERRO-SERVICES";
pub const EXTERNAL_SERVICES: &str = "FERRO-EXTERNAL-SERVICES";
pub const NODEPORTS: &str = "FERRO-NODEPORTS";
pub const POSTROUTING: &str = "FERRO-POSTROUTING";
pub const MARK_MASQ: &str = "FERRO-MARK-MASQ";
pub const FORWARD: &str = "FERRO-FORWARD";
pub const FIREWALL: &str = "FERRO-FIREWALL";
pub const CANARY: &str = "FERRO-CANARY";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Nat,
    Filter,
}

impl Table {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Filter => "filter",
        }
    }
}

/// A jump from a built-in chain into ours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hook {
    pub table: Table,
    pub builtin: &'static str,
    pub target: &'static str,
    /// Everything between the chain name and `-j target`.
    pub matches: &'static str,
}

impl Hook {
    pub fn rule(&self) -> String {
        format!("{} -j {}", self.matches, self.target)
    }
}

/// Every jump into our chains, in the order they should appear in each built-in chain.
pub const HOOKS: &[Hook] = &[
    Hook {
        table: Table::Nat,
        builtin: "PREROUTING",
        target: SERVICES,
        matches: "-m comment --comment \"ferrolet service portals\"",
    },
    Hook {
        table: Table::Nat,
        builtin: "OUTPUT",
        target: SERVICES,
        matches: "-m comment --comment \"ferrolet service portals\"",
    },
    Hook {
        table: Table::Nat,
        builtin: "POSTROUTING",
        target: POSTROUTING,
        matches: "-m comment --comment \"ferrolet postrouting rules\"",
    },
    Hook {
        table: Table::Filter,
        builtin: "INPUT",
        target: NODEPORTS,
        matches: "-m conntrack --ctstate NEW -m comment --comment \"ferrolet health check node ports\"",
    },
    Hook {
        table: Table::Filter,
        builtin: "INPUT",
        target: EXTERNAL_SERVICES,
        matches: "-m conntrack --ctstate NEW -m comment --comment \"ferrolet externally-visible service portals\"",
    },
    Hook {
        table: Table::Filter,
        builtin: "INPUT",
        target: FIREWALL,
        matches: "-m comment --comment \"ferrolet firewall\"",
    },
    Hook {
        table: Table::Filter,
        builtin: "FORWARD",
        target: FORWARD,
        matches: "-m comment --comment \"ferrolet forwarding rules\"",
    },
    Hook {
        table: Table::Filter,
        builtin: "FORWARD",
        target: SERVICES,
        matches: "-m conntrack --ctstate NEW -m comment --comment \"ferrolet service portals\"",
    },
    Hook {
        table: Table::Filter,
        builtin: "FORWARD",
        target: EXTERNAL_SERVICES,
        matches: "-m conntrack --ctstate NEW -m comment --comment \"ferrolet externally-visible service portals\"",
    },
    Hook {
        table: Table::Filter,
        builtin: "OUTPUT",
        target: SERVICES,
        matches: "-m conntrack --ctstate NEW -m comment --comment \"ferrolet service portals\"",
    },
    Hook {
        table: Table::Filter,
        builtin: "OUTPUT",
        target: FIREWALL,
        matches: "-m comment --comment \"ferrolet firewall\"",
    },
];

/// The chains that exist whatever the Services, per table.
pub fn static_chains(table: Table) -> &'static [&'static str] {
    match table {
        Table::Nat => &[SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, CANARY],
        Table::Filter => &[
            SERVICES,
            EXTERNAL_SERVICES,
            NODEPORTS,
            FORWARD,
            FIREWALL,
            CANARY,
        ],
    }
}

fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    let mut s = String::with_capacity(16);
    for b in &digest[..8] {
        let _ = write!(s, "{b:02X}");
    }
    s
}

/// Chain names derive from the port's identity so they stay the same across restarts.
pub fn port_chain(kind: &str, port: &PortModel) -> String {
    format!(
        "{PREFIX}{kind}-{}",
        hash16(&format!("{}/{}", port.id, port.protocol.as_str()))
    )
}

pub fn endpoint_chain(port: &PortModel, ep: &Endpoint) -> String {
    format!(
        "{PREFIX}SEP-{}",
        hash16(&format!(
            "{}/{}/{}:{}",
            port.id,
            port.protocol.as_str(),
            ep.ip,
            ep.port
        ))
    )
}

/// What the rule generator needs besides the Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleContext {
    /// The mark bit as `0x4000`.
    pub mark: String,
    /// The pod network; traffic from outside it to a ClusterIP is masqueraded.
    pub local_cidr: Option<Ipv4Net>,
}

/// Every line one Service contributes, split by where it goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceRules {
    /// Lines of nat `FERRO-SERVICES`.
    pub nat_dispatch: String,
    /// Lines of nat `FERRO-NODEPORTS`.
    pub nat_nodeports: String,
    /// The Service's own nat chains and their `-A` lines.
    pub chains: BTreeMap<String, String>,
    /// Lines of filter `FERRO-SERVICES`.
    pub filter_services: String,
    /// Lines of filter `FERRO-EXTERNAL-SERVICES`.
    pub filter_external: String,
    /// Lines of filter `FERRO-NODEPORTS`.
    pub filter_nodeports: String,
}

fn dport(p: &PortModel, port: u16) -> String {
    let proto = p.protocol.as_str();
    format!("-p {proto} -m {proto} --dport {port}")
}

/// Appends the rules that pick one of `eps` to `chain`, adding endpoint chains as needed.
fn endpoint_rules(
    p: &PortModel,
    chain: &str,
    eps: &[Endpoint],
    out: &mut String,
    chains: &mut BTreeMap<String, String>,
) {
    let proto = p.protocol.as_str();
    let needs_own_chain =
        |ep: &Endpoint| p.affinity_seconds.is_some() || ep.local || !ep.node_known;
    if let Some(seconds) = p.affinity_seconds {
        for ep in eps {
            let sep = endpoint_chain(p, ep);
            let _ = writeln!(
                out,
                "-A {chain} -m recent --name {sep} --rcheck --seconds {seconds} --reap -j {sep}"
            );
        }
    }
    let n = eps.len();
    for (i, ep) in eps.iter().enumerate() {
        let _ = write!(out, "-A {chain}");
        if i + 1 < n {
            // Each rule takes an equal share of what the rules before it left over.
            let _ = write!(
                out,
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - i) as f64
            );
        }
        if needs_own_chain(ep) {
            let sep = endpoint_chain(p, ep);
            let _ = writeln!(out, " -j {sep}");
            let mut body = String::new();
            // Hairpin: a pod reaching itself through the Service must see the reply come
            // from the Service, so its own traffic is masqueraded.
            let _ = writeln!(body, "-A {sep} -s {}/32 -j {MARK_MASQ}", ep.ip);
            let _ = write!(body, "-A {sep} -p {proto}");
            if p.affinity_seconds.is_some() {
                let _ = write!(body, " -m recent --name {sep} --set");
            }
            let _ = writeln!(body, " -j DNAT --to-destination {}:{}", ep.ip, ep.port);
            chains.insert(sep, body);
        } else {
            let _ = writeln!(
                out,
                " -p {proto} -j DNAT --to-destination {}:{}",
                ep.ip, ep.port
            );
        }
    }
}

fn reject_line(out: &mut String, chain: &str, matches: &str, comment: &str, verdict: &str) {
    let _ = writeln!(
        out,
        "-A {chain} {matches} -m comment --comment \"{comment}\" -j {verdict}"
    );
}

const REJECT: &str = "REJECT --reject-with icmp-port-unreachable";

/// All rules of one Service.
pub fn service_rules(model: &ServiceModel, ctx: &RuleContext) -> ServiceRules {
    let mut r = ServiceRules::default();
    let mut health_done = false;
    for p in &model.ports {
        let svc = port_chain("SVC", p);
        let uses_local = p.internal_local || (p.external_local && p.has_external());
        let svl = port_chain("SVL", p);
        let ext = port_chain("EXT", p);

        // Dispatch.
        let internal_target = if p.internal_local { &svl } else { &svc };
        let _ = writeln!(
            r.nat_dispatch,
            "-A {SERVICES} -d {}/32 {} -m comment --comment \"{} cluster IP\" -j {internal_target}",
            p.cluster_ip,
            dport(p, p.port),
            p.id
        );
        for ip in &p.external_ips {
            let _ = writeln!(
                r.nat_dispatch,
                "-A {SERVICES} -d {ip}/32 {} -m comment --comment \"{} external IP\" -j {ext}",
                dport(p, p.port),
                p.id
            );
        }
        if let Some(np) = p.node_port {
            let _ = writeln!(
                r.nat_nodeports,
                "-A {NODEPORTS} {} -m comment --comment \"{} node port\" -j {ext}",
                dport(p, np),
                p.id
            );
        }

        // The cluster-wide chain.
        let mut body = String::new();
        if let Some(cidr) = ctx.local_cidr
            && !p.cluster_endpoints.is_empty()
        {
            let _ = writeln!(body, "-A {svc} ! -s {cidr} -j {MARK_MASQ}");
        }
        endpoint_rules(p, &svc, &p.cluster_endpoints, &mut body, &mut r.chains);
        r.chains.insert(svc.clone(), body);

        if uses_local {
            let mut body = String::new();
            endpoint_rules(p, &svl, &p.local_endpoints, &mut body, &mut r.chains);
            r.chains.insert(svl.clone(), body);
        }

        if p.has_external() {
            let mut body = String::new();
            if p.external_local {
                // Pods and the node itself may reach the Service through its external
                // addresses; only traffic from outside is held to local endpoints.
                if let Some(cidr) = ctx.local_cidr {
                    let _ = writeln!(body, "-A {ext} -s {cidr} -j {svc}");
                }
                let _ = writeln!(body, "-A {ext} -m addrtype --src-type LOCAL -j {MARK_MASQ}");
                let _ = writeln!(body, "-A {ext} -m addrtype --src-type LOCAL -j {svc}");
                let _ = writeln!(body, "-A {ext} -j {svl}");
            } else {
                let _ = writeln!(body, "-A {ext} -j {MARK_MASQ}");
                let _ = writeln!(body, "-A {ext} -j {svc}");
            }
            r.chains.insert(ext, body);
        }

        // Filter: reject what has nowhere to go, drop what policy keeps on this node.
        let external_verdict = if p.cluster_endpoints.is_empty() {
            Some(("has no endpoints", REJECT))
        } else if p.external_local && p.local_endpoints.is_empty() {
            Some(("has no local endpoints", "DROP"))
        } else {
            None
        };
        if p.cluster_endpoints.is_empty() {
            reject_line(
                &mut r.filter_services,
                SERVICES,
                &format!("-d {}/32 {}", p.cluster_ip, dport(p, p.port)),
                &format!("{} has no endpoints", p.id),
                REJECT,
            );
        } else if p.internal_local && p.local_endpoints.is_empty() {
            reject_line(
                &mut r.filter_services,
                SERVICES,
                &format!("-d {}/32 {}", p.cluster_ip, dport(p, p.port)),
                &format!("{} has no local endpoints", p.id),
                "DROP",
            );
        }
        if let Some((why, verdict)) = external_verdict {
            for ip in &p.external_ips {
                reject_line(
                    &mut r.filter_external,
                    EXTERNAL_SERVICES,
                    &format!("-d {ip}/32 {}", dport(p, p.port)),
                    &format!("{} {why}", p.id),
                    verdict,
                );
            }
            if let Some(np) = p.node_port {
                reject_line(
                    &mut r.filter_external,
                    EXTERNAL_SERVICES,
                    &format!("-m addrtype --dst-type LOCAL {}", dport(p, np)),
                    &format!("{} {why}", p.id),
                    verdict,
                );
            }
        }
        if let Some(hc) = p.health_check_node_port
            && !health_done
        {
            health_done = true;
            let _ = writeln!(
                r.filter_nodeports,
                "-A {NODEPORTS} -p tcp -m tcp --dport {hc} -m comment --comment \"{} health check node port\" -j ACCEPT",
                model.key
            );
        }
    }
    r
}

/// Where NodePort traffic is accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortMatch {
    AllLocal {
        localhost: bool,
    },
    Addresses {
        addrs: Vec<Ipv4Addr>,
        localhost: bool,
    },
}

/// The last rules of nat `FERRO-SERVICES`: hand traffic to local addresses to the NodePorts.
pub fn nodeport_jumps(m: &NodePortMatch) -> String {
    let mut out = String::new();
    match m {
        NodePortMatch::AllLocal { localhost: true } => {
            let _ = writeln!(
                out,
                "-A {SERVICES} -m addrtype --dst-type LOCAL -m comment --comment \"ferrolet node ports; must be last\" -j {NODEPORTS}"
            );
        }
        NodePortMatch::AllLocal { localhost: false } => {
            let _ = writeln!(
                out,
                "-A {SERVICES} ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -m comment --comment \"ferrolet node ports; must be last\" -j {NODEPORTS}"
            );
        }
        NodePortMatch::Addresses { addrs, localhost } => {
            let lo = Ipv4Addr::LOCALHOST;
            for ip in addrs.iter().chain(localhost.then_some(&lo)) {
                let _ = writeln!(
                    out,
                    "-A {SERVICES} -d {ip}/32 -m comment --comment \"ferrolet node ports\" -j {NODEPORTS}"
                );
            }
        }
    }
    out
}

/// The fixed rules of our nat chains (all but the dispatch chains).
pub fn nat_fixed(mark: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "-A {MARK_MASQ} -j MARK --or-mark {mark}");
    let _ = writeln!(
        out,
        "-A {POSTROUTING} -m mark ! --mark {mark}/{mark} -j RETURN"
    );
    // Clear the bit so a packet that is encapsulated and comes back is not masqueraded twice.
    let _ = writeln!(out, "-A {POSTROUTING} -j MARK --xor-mark {mark}");
    let _ = writeln!(
        out,
        "-A {POSTROUTING} -m comment --comment \"ferrolet service traffic requiring SNAT\" -j MASQUERADE --random-fully"
    );
    let _ = writeln!(out, "-A {CANARY} -j RETURN");
    out
}

/// The fixed rules of our filter chains.
pub fn filter_fixed(mark: &str, localhost_node_ports: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "-A {FORWARD} -m conntrack --ctstate INVALID -j DROP");
    let _ = writeln!(
        out,
        "-A {FORWARD} -m mark --mark {mark}/{mark} -m comment --comment \"ferrolet forwarding rules\" -j ACCEPT"
    );
    let _ = writeln!(
        out,
        "-A {FORWARD} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    );
    if localhost_node_ports {
        // route_localnet lets 127.0.0.1 NodePorts work; never let it route martians.
        let _ = writeln!(
            out,
            "-A {FIREWALL} ! -s 127.0.0.0/8 -d 127.0.0.0/8 -m comment --comment \"block incoming localnet connections\" -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
        );
    }
    let _ = writeln!(out, "-A {CANARY} -j RETURN");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::Protocol;

    fn ep(last: u8, local: bool) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::new(10, 244, 1, last),
            port: 8080,
            local,
            node_known: true,
        }
    }

    fn port(eps: Vec<Endpoint>) -> PortModel {
        PortModel {
            id: "ns/web:http".into(),
            protocol: Protocol::Tcp,
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            node_port: None,
            external_ips: vec![],
            external_local: false,
            internal_local: false,
            affinity_seconds: None,
            local_endpoints: eps.iter().filter(|e| e.local).copied().collect(),
            cluster_endpoints: eps,
            health_check_node_port: None,
        }
    }

    fn ctx() -> RuleContext {
        RuleContext {
            mark: "0x4000".into(),
            local_cidr: Some("10.244.0.0/16".parse().unwrap()),
        }
    }

    fn model(p: PortModel) -> ServiceModel {
        ServiceModel {
            key: crate::proxy::state::ServiceKey::new("ns", "web"),
            ports: vec![p],
        }
    }

    #[test]
    fn udp_and_sctp_ports_match_and_dnat_with_their_protocol() {
        for (proto, name) in [(Protocol::Udp, "udp"), (Protocol::Sctp, "sctp")] {
            let mut p = port(vec![ep(1, false), ep(2, false)]);
            p.protocol = proto;
            let r = service_rules(&model(p.clone()), &ctx());
            assert!(
                r.nat_dispatch
                    .contains(&format!("-p {name} -m {name} --dport 80")),
                "{}",
                r.nat_dispatch
            );
            let body = &r.chains[&port_chain("SVC", &p)];
            assert!(
                body.contains(&format!(
                    "-p {name} -j DNAT --to-destination 10.244.1.2:8080"
                )),
                "{body}"
            );
        }
    }

    #[test]
    fn chain_names_are_stable_and_fit_iptables() {
        let p = port(vec![ep(1, false)]);
        let a = port_chain("SVC", &p);
        assert_eq!(a, port_chain("SVC", &p.clone()));
        assert!(a.len() <= 28, "{a}");
        assert!(endpoint_chain(&p, &p.cluster_endpoints[0]).len() <= 28);
        let mut q = p.clone();
        q.protocol = Protocol::Udp;
        assert_ne!(a, port_chain("SVC", &q));
    }

    #[test]
    fn equal_weights_split_remaining_probability() {
        let p = port(vec![ep(1, false), ep(2, false), ep(3, false), ep(4, false)]);
        let r = service_rules(&model(p.clone()), &ctx());
        let body = &r.chains[&port_chain("SVC", &p)];
        let probs: Vec<&str> = body
            .lines()
            .filter_map(|l| l.split("--probability ").nth(1))
            .map(|s| s.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(probs, ["0.2500000000", "0.3333333333", "0.5000000000"]);
        // Remote endpoints are DNATed in place; the last has no statistic match.
        let last = body.lines().last().unwrap();
        assert_eq!(
            last,
            format!(
                "-A {} -p tcp -j DNAT --to-destination 10.244.1.4:8080",
                port_chain("SVC", &p)
            )
        );
        assert!(body.starts_with(&format!(
            "-A {} ! -s 10.244.0.0/16 -j FERRO-MARK-MASQ",
            port_chain("SVC", &p)
        )));
        assert!(r.filter_services.is_empty());
    }

    #[test]
    fn local_endpoints_get_a_hairpin_chain() {
        let p = port(vec![ep(1, true), ep(2, false)]);
        let r = service_rules(&model(p.clone()), &ctx());
        let sep = endpoint_chain(&p, &p.cluster_endpoints[0]);
        assert_eq!(
            r.chains[&sep],
            format!(
                "-A {sep} -s 10.244.1.1/32 -j FERRO-MARK-MASQ\n-A {sep} -p tcp -j DNAT --to-destination 10.244.1.1:8080\n"
            )
        );
        assert_eq!(r.chains.len(), 2);
    }

    #[test]
    fn affinity_checks_recent_lists_before_choosing() {
        let mut p = port(vec![ep(1, false), ep(2, false)]);
        p.affinity_seconds = Some(30);
        let r = service_rules(&model(p.clone()), &ctx());
        let svc = &r.chains[&port_chain("SVC", &p)];
        let sep1 = endpoint_chain(&p, &p.cluster_endpoints[0]);
        assert!(svc.contains(&format!(
            "-A {} -m recent --name {sep1} --rcheck --seconds 30 --reap -j {sep1}",
            port_chain("SVC", &p)
        )));
        assert!(r.chains[&sep1].contains(&format!("-m recent --name {sep1} --set -j DNAT")));
    }

    #[test]
    fn no_endpoints_rejects_in_filter_and_leaves_service_chain_empty() {
        let mut p = port(vec![]);
        p.node_port = Some(30080);
        p.external_ips = vec![Ipv4Addr::new(192, 0, 2, 7)];
        let r = service_rules(&model(p.clone()), &ctx());
        assert_eq!(r.chains[&port_chain("SVC", &p)], "");
        assert!(r.filter_services.contains(
            "-d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \"ns/web:http has no endpoints\" -j REJECT --reject-with icmp-port-unreachable"
        ));
        assert_eq!(r.filter_external.lines().count(), 2);
        assert!(r.nat_nodeports.contains("--dport 30080"));
    }

    #[test]
    fn external_local_holds_outside_traffic_to_local_endpoints() {
        let mut p = port(vec![ep(1, true), ep(2, false)]);
        p.node_port = Some(30080);
        p.external_local = true;
        p.health_check_node_port = Some(31000);
        let r = service_rules(&model(p.clone()), &ctx());
        let ext = &r.chains[&port_chain("EXT", &p)];
        assert!(!ext.contains(&format!("-A {} -j {MARK_MASQ}", port_chain("EXT", &p))));
        assert!(ext.ends_with(&format!("-j {}\n", port_chain("SVL", &p))));
        let svl = &r.chains[&port_chain("SVL", &p)];
        assert_eq!(svl.lines().count(), 1);
        assert!(r.filter_nodeports.contains("--dport 31000"));

        p.local_endpoints.clear();
        let r = service_rules(&model(p), &ctx());
        assert!(
            r.filter_external
                .contains("has no local endpoints\" -j DROP")
        );
    }

    #[test]
    fn internal_local_dispatches_to_the_local_chain() {
        let mut p = port(vec![ep(1, true), ep(2, false)]);
        p.internal_local = true;
        let r = service_rules(&model(p.clone()), &ctx());
        assert!(
            r.nat_dispatch
                .ends_with(&format!("-j {}\n", port_chain("SVL", &p)))
        );
        p.local_endpoints.clear();
        let r = service_rules(&model(p), &ctx());
        assert!(
            r.filter_services
                .contains("has no local endpoints\" -j DROP")
        );
    }
}
