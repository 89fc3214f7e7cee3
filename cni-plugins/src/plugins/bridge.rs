//! `bridge`: a Linux bridge on the host, a veth pair per container, addresses from the
//! IPAM plugin named in `ipam`.

use std::collections::HashSet;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::invoke::{Command, Plugin, Request};
use crate::iptables::{
    Iptables, IptablesError, Nft, SystemRunner, chain_name, commented_ids, setup_masquerade,
    teardown_masquerade,
};
use crate::netlink;
use crate::spec::{CniError, CniResult, ErrorCode, Interface, IpConfig, Route, validate_ifname};
use crate::sysctl;

use super::delegate::ipam as exec_delegate;
use super::{in_netns, on_host, optional_netns, required_netns};

pub struct Bridge;

fn default_bridge() -> String {
    "cni0".to_string()
}

/// The keys of a reference `bridge` configuration that this plugin reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BridgeConf {
    #[serde(default = "default_bridge")]
    pub bridge: String,
    #[serde(rename = "isGateway", default)]
    pub is_gateway: bool,
    #[serde(rename = "isDefaultGateway", default)]
    pub is_default_gateway: bool,
    #[serde(rename = "forceAddress", default)]
    pub force_address: bool,
    #[serde(rename = "ipMasq", default)]
    pub ip_masq: bool,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(rename = "hairpinMode", default)]
    pub hairpin_mode: bool,
    #[serde(rename = "promiscMode", default)]
    pub promisc_mode: bool,
    #[serde(default)]
    pub macspoofchk: bool,
    #[serde(default)]
    pub vlan: Option<u32>,
    #[serde(rename = "vlanTrunk", default)]
    pub vlan_trunk: Option<Value>,
}

impl From<IptablesError> for CniError {
    fn from(e: IptablesError) -> Self {
        CniError::new(ErrorCode::Internal, "firewall update failed", e.to_string())
    }
}

fn load(req: &Request) -> Result<(BridgeConf, String), CniError> {
    let mut conf: BridgeConf = req.plugin_conf()?;
    validate_ifname(&conf.bridge)
        .map_err(|e| CniError::new(ErrorCode::InvalidConfig, "invalid bridge name", e.details))?;
    if conf.vlan.is_some_and(|v| v != 0) || conf.vlan_trunk.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(CniError::msg(
            ErrorCode::UnsupportedField,
            "vlan and vlanTrunk are not supported by this bridge plugin",
        ));
    }
    if conf.mtu == Some(0) {
        conf.mtu = None;
    }
    if conf.is_default_gateway {
        conf.is_gateway = true;
    }
    let ipam = req
        .conf
        .ipam
        .as_ref()
        .and_then(|v| v.get("type"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            CniError::msg(
                ErrorCode::InvalidConfig,
                "bridge needs \"ipam\" with a \"type\"",
            )
        })?
        .to_string();
    Ok((conf, ipam))
}

fn masq_chain(req: &Request) -> String {
    chain_name("CNI-", &req.conf.name, &req.container_id)
}

fn masq_comment(req: &Request) -> String {
    format!("name: \"{}\" id: \"{}\"", req.conf.name, req.container_id)
}

fn random_veth_name() -> String {
    format!(
        "veth{:08x}",
        u32::from_ne_bytes(netlink::random_bytes::<4>())
    )
}

fn is_default(dst: &IpNet) -> bool {
    dst.prefix_len() == 0
}

/// What ADD created so far, undone in reverse when a later step fails.
#[derive(Default)]
struct Undo {
    ipam: bool,
    host_veth: Option<String>,
    masq: bool,
    macspoof: bool,
}

impl Undo {
    fn run(self, req: &Request, ipam: &str) {
        if self.macspoof
            && let Err(e) = Nft::new(SystemRunner).remove_macspoof(&masq_chain(req))
        {
            tracing::error!(error = %e, "rollback: removing macspoofchk rule");
        }
        if self.masq {
            for v6 in [false, true] {
                if let Err(e) =
                    teardown_masquerade(&Iptables::new(SystemRunner, v6), &masq_chain(req))
                {
                    tracing::error!(error = %e, "rollback: removing ipMasq rules");
                }
            }
        }
        if let Some(name) = self.host_veth {
            let r = on_host(|h| async move {
                netlink::delete_link_by_name(&h, &name).await?;
                Ok(())
            });
            if let Err(e) = r {
                tracing::error!(error = %e, "rollback: deleting veth");
            }
        }
        if self.ipam
            && let Err(e) = exec_delegate(ipam, Command::Del, req)
        {
            tracing::error!(error = %e, "rollback: IPAM DEL");
        }
    }
}

/// The gateway of each IP: the IPAM one, else (for `isGateway`) the subnet's first host.
fn gateways(ips: &mut [IpConfig], is_gateway: bool) {
    for ip in ips.iter_mut() {
        if ip.gateway.is_none() && is_gateway {
            let net = ip.address.trunc();
            ip.gateway = net.hosts().next();
        }
    }
}

/// Puts `gw/prefix` on the bridge, as the reference does: the same address is fine,
/// another IPv4 address (or an overlapping IPv6 one) is an error unless `forceAddress`.
/// The common case, the gateway already there, costs a single request.
async fn ensure_bridge_addr(
    h: &rtnetlink::Handle,
    bridge: &netlink::Link,
    want: IpNet,
    force: bool,
) -> Result<(), CniError> {
    if !netlink::add_address_if_missing(h, bridge.index, want).await? {
        return Ok(());
    }
    for have in netlink::addresses(h, bridge.index).await? {
        if have == want || have.addr().is_ipv4() != want.addr().is_ipv4() {
            continue;
        }
        if want.addr().is_ipv4() || have.contains(&want.addr()) || want.contains(&have.addr()) {
            if force {
                netlink::del_address(h, bridge.index, have).await?;
            } else {
                netlink::del_address(h, bridge.index, want).await?;
                return Err(CniError::new(
                    ErrorCode::Internal,
                    format!(
                        "bridge {} already has an IP address different from {want}",
                        bridge.name
                    ),
                    format!("existing address {have}; set forceAddress to replace it"),
                ));
            }
        }
    }
    Ok(())
}

fn add(
    req: &Request,
    conf: &BridgeConf,
    ipam: &str,
    undo: &mut Undo,
) -> Result<CniResult, CniError> {
    let ns = required_netns(req)?;
    let mut ipam_result = exec_delegate(ipam, Command::Add, req)?
        .ok_or_else(|| CniError::msg(ErrorCode::Internal, "IPAM returned no result"))?;
    undo.ipam = true;
    tracing::debug!(ips = ipam_result.ips.len(), "IPAM done");
    if ipam_result.ips.is_empty() {
        return Err(CniError::msg(
            ErrorCode::InvalidConfig,
            "IPAM returned no IP addresses",
        ));
    }
    gateways(&mut ipam_result.ips, conf.is_gateway);
    let mut routes = ipam_result.routes.clone();
    if conf.is_default_gateway {
        for ip in &ipam_result.ips {
            let v4 = ip.address.addr().is_ipv4();
            if routes
                .iter()
                .any(|r| is_default(&r.dst) && r.dst.addr().is_ipv4() == v4)
            {
                return Err(CniError::msg(
                    ErrorCode::InvalidConfig,
                    "isDefaultGateway ineffective because IPAM sets a default route",
                ));
            }
            let Some(gw) = ip.gateway else { continue };
            let dst = if v4 { "0.0.0.0/0" } else { "::/0" };
            if let Ok(dst) = dst.parse::<IpNet>()
                && !routes.iter().any(|r| r.dst == dst)
            {
                routes.push(Route {
                    dst,
                    gw: Some(gw),
                    mtu: None,
                    advmss: None,
                    priority: None,
                    table: None,
                    scope: None,
                });
            }
        }
    }

    let host_name_owned = random_veth_name();
    let host_name = host_name_owned.as_str();
    let (host_mac, container_mac) = (netlink::random_mac(), netlink::random_mac());
    let ips = &ipam_result.ips;
    // Host side: the bridge (with gateway addresses) and the veth pair in one request,
    // the host end attached and up, the container end created directly inside the
    // container namespace under its final name.
    let (bridge, ns_fd) = (conf.bridge.as_str(), ns.raw_fd());
    let (bridge_link, created) = on_host(|h| async move {
        let br = netlink::ensure_bridge(&h, bridge, conf.mtu, conf.promisc_mode).await?;
        if conf.is_gateway {
            for ip in ips {
                if let Some(gw) = ip.gateway {
                    let want = IpNet::new(gw, ip.address.prefix_len()).map_err(|e| {
                        CniError::new(ErrorCode::InvalidConfig, "bad gateway", e.to_string())
                    })?;
                    ensure_bridge_addr(&h, &br, want, conf.force_address).await?;
                }
            }
        }
        let pair = netlink::VethPair {
            name: host_name,
            mac: host_mac,
            master: Some(br.index),
            peer: &req.ifname,
            peer_mac: container_mac,
            peer_ns_fd: ns_fd,
            mtu: conf.mtu,
        };
        match netlink::add_veth(&h, &pair).await {
            Ok(()) => {}
            Err(e) if e.errno() == Some(libc::EEXIST) => return Ok((br, false)),
            Err(e) => return Err(e.into()),
        }
        if conf.hairpin_mode {
            let l = netlink::link_by_name(&h, host_name)
                .await?
                .ok_or_else(|| CniError::msg(ErrorCode::Internal, "host veth vanished"))?;
            netlink::set_hairpin(&h, l.index, true).await?;
        }
        Ok((br, true))
    })?;
    if !created {
        return Err(CniError::new(
            ErrorCode::Internal,
            format!("container interface {} already exists", req.ifname),
            format!("in network namespace {}", ns.path().display()),
        ));
    }
    undo.host_veth = Some(host_name_owned.clone());
    tracing::debug!(veth = host_name, "bridge and veth pair ready");

    if conf.is_gateway {
        if ips.iter().any(|i| i.address.addr().is_ipv4()) {
            sysctl::set("net.ipv4.ip_forward", "1")?;
        }
        if ips.iter().any(|i| i.address.addr().is_ipv6()) {
            sysctl::set("net.ipv6.conf.all.forwarding", "1")?;
        }
    }

    // Container side: addresses and routes.
    let ifname = req.ifname.as_str();
    let routes_ref = &routes;
    let mut nl = netlink::Blocking::new(ns.netlink_socket()?);
    let index = nl
        .link_index(ifname)?
        .ok_or_else(|| CniError::msg(ErrorCode::Internal, "container veth vanished"))?;
    nl.set_up(index)?;
    for ip in ips {
        nl.add_address(index, ip.address)?;
    }
    for r in routes_ref {
        let v4 = r.dst.addr().is_ipv4();
        let gw = r.gw.or_else(|| {
            ips.iter()
                .find(|i| i.address.addr().is_ipv4() == v4)
                .and_then(|i| i.gateway)
        });
        nl.add_route(index, r.dst, gw)?;
    }
    let container_mac = netlink::format_mac(&container_mac);
    tracing::debug!("container addresses and routes set");

    if conf.ip_masq {
        undo.masq = true;
        for ip in ips {
            let ipt = Iptables::new(SystemRunner, ip.address.addr().is_ipv6());
            setup_masquerade(&ipt, &masq_chain(req), &masq_comment(req), ip.address)?;
        }
    }
    if conf.macspoofchk {
        undo.macspoof = true;
        Nft::new(SystemRunner).add_macspoof(host_name, &container_mac, &masq_chain(req))?;
    }

    let dns = match &req.conf.dns {
        Some(d) if !d.is_empty() => d.clone(),
        _ => ipam_result.dns.clone(),
    };
    Ok(CniResult {
        cni_version: req.version.to_string(),
        interfaces: vec![
            Interface {
                name: bridge_link.name,
                mac: bridge_link.mac,
                ..Interface::default()
            },
            Interface {
                name: host_name_owned,
                mac: Some(netlink::format_mac(&host_mac)),
                ..Interface::default()
            },
            Interface {
                name: req.ifname.clone(),
                mac: Some(container_mac),
                sandbox: Some(ns.path().display().to_string()),
                ..Interface::default()
            },
        ],
        ips: ipam_result
            .ips
            .iter()
            .map(|i| IpConfig {
                interface: Some(2),
                ..i.clone()
            })
            .collect(),
        routes,
        dns,
    })
}

impl Plugin for Bridge {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let (conf, ipam) = load(req)?;
        let mut undo = Undo::default();
        match add(req, &conf, &ipam, &mut undo) {
            Ok(r) => Ok(r),
            Err(e) => {
                undo.run(req, &ipam);
                Err(e)
            }
        }
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let (conf, ipam) = load(req)?;
        // Teardown goes on after a failure and reports the first error at the end.
        let mut first_err: Option<CniError> = None;
        let mut note = |r: Result<(), CniError>| {
            if let Err(e) = r {
                tracing::warn!(error = %e, "DEL step failed");
                first_err.get_or_insert(e);
            }
        };
        note(
            exec_delegate(&ipam, Command::Del, req)
                .map(drop)
                .map_err(Into::into),
        );
        let ifname = req.ifname.as_str();
        note(optional_netns(req).and_then(|ns| match ns {
            None => Ok(()),
            Some(ns) => {
                netlink::Blocking::new(ns.netlink_socket()?).delete_link_by_name(ifname)?;
                Ok(())
            }
        }));
        if conf.ip_masq {
            for v6 in [false, true] {
                note(
                    teardown_masquerade(&Iptables::new(SystemRunner, v6), &masq_chain(req))
                        .map_err(Into::into),
                );
            }
        }
        if conf.macspoofchk {
            note(
                Nft::new(SystemRunner)
                    .remove_macspoof(&masq_chain(req))
                    .map_err(Into::into),
            );
        }
        first_err.map_or(Ok(()), Err)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let (conf, ipam) = load(req)?;
        let prev = req
            .prev_result
            .as_ref()
            .ok_or_else(|| CniError::msg(ErrorCode::InvalidConfig, "CHECK needs prevResult"))?;
        exec_delegate(&ipam, Command::Check, req)?;
        let ns = required_netns(req)?;
        let ifname = req.ifname.as_str();
        let want_iface = prev
            .interfaces
            .iter()
            .position(|i| i.name == ifname && i.sandbox.is_some())
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    "prevResult lacks the container interface",
                    ifname,
                )
            })?;
        let want_mac = prev.interfaces[want_iface].mac.clone();
        let missing = |what: String| CniError::new(ErrorCode::Internal, "CHECK failed", what);
        in_netns(&ns, |h| async move {
            let link = netlink::link_by_name(&h, ifname)
                .await?
                .ok_or_else(|| missing(format!("interface {ifname} is missing")))?;
            if let (Some(want), Some(have)) = (&want_mac, &link.mac)
                && !want.eq_ignore_ascii_case(have)
            {
                return Err(missing(format!(
                    "interface {ifname} has MAC {have}, expected {want}"
                )));
            }
            let addrs = netlink::addresses(&h, link.index).await?;
            for ip in prev.ips.iter().filter(|i| i.interface == Some(want_iface)) {
                if !addrs.contains(&ip.address) {
                    return Err(missing(format!(
                        "address {} is missing on {ifname}",
                        ip.address
                    )));
                }
            }
            let routes = netlink::routes(&h).await?;
            for r in &prev.routes {
                let found = routes
                    .iter()
                    .any(|have| have.dst == r.dst.trunc() && (r.gw.is_none() || have.gw == r.gw));
                if !found {
                    return Err(missing(format!(
                        "route to {} via {:?} is missing",
                        r.dst, r.gw
                    )));
                }
            }
            Ok::<(), CniError>(())
        })?;
        let bridge = conf.bridge.clone();
        let host_veths: Vec<String> = prev
            .interfaces
            .iter()
            .filter(|i| i.sandbox.is_none() && i.name != bridge)
            .map(|i| i.name.clone())
            .collect();
        on_host(|h| async move {
            let br = netlink::link_by_name(&h, &bridge)
                .await?
                .ok_or_else(|| missing(format!("bridge {bridge} is missing")))?;
            for name in &host_veths {
                let l = netlink::link_by_name(&h, name)
                    .await?
                    .ok_or_else(|| missing(format!("host veth {name} is missing")))?;
                if l.master != Some(br.index) {
                    return Err(missing(format!(
                        "host veth {name} is not attached to {bridge}"
                    )));
                }
            }
            Ok(())
        })?;
        if conf.ip_masq {
            for ip in &prev.ips {
                let ipt = Iptables::new(SystemRunner, ip.address.addr().is_ipv6());
                if !ipt.chain_exists("nat", &masq_chain(req))? {
                    return Err(missing(format!(
                        "ipMasq chain {} is missing",
                        masq_chain(req)
                    )));
                }
            }
        }
        if conf.macspoofchk && !Nft::new(SystemRunner).has_macspoof(&masq_chain(req))? {
            return Err(missing("macspoofchk rule is missing".into()));
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        let (_, ipam) = load(req)?;
        exec_delegate(&ipam, Command::Status, req)?;
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let (conf, ipam) = load(req)?;
        exec_delegate(&ipam, Command::Gc, req)?;
        if conf.ip_masq {
            let valid: HashSet<String> = req
                .valid_attachments()?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            let prefix = format!("name: \"{}\" id: \"", req.conf.name);
            for v6 in [false, true] {
                let ipt = Iptables::new(SystemRunner, v6);
                let Some(rules) = ipt.list("nat", "POSTROUTING")? else {
                    continue;
                };
                for id in commented_ids(&rules, &prefix) {
                    if !valid.contains(&id) {
                        tracing::info!(container = %id, "gc removes ipMasq rules");
                        teardown_masquerade(&ipt, &chain_name("CNI-", &req.conf.name, &id))?;
                    }
                }
            }
        }
        Ok(())
    }
}
