//! `portmap`: the `portMappings` capability as iptables DNAT rules, laid out like the
//! reference plugin's chains so the two can replace each other on a node:
//!
//! - `CNI-HOSTPORT-DNAT`, jumped to from PREROUTING and OUTPUT for local destinations,
//!   holds one jump per container and protocol (with a `dnat name: .. id: ..` comment)
//!   to the container's own `CNI-DN-<hash>` chain;
//! - `CNI-DN-<hash>` marks hairpin and localhost traffic for masquerading and DNATs;
//! - `CNI-HOSTPORT-SETMARK` sets the masquerade mark, `CNI-HOSTPORT-MASQ` (from
//!   POSTROUTING) masquerades marked packets.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::invoke::{Plugin, Request};
use crate::iptables::{
    Iptables, IptablesError, Runner, SystemRunner, chain_name, commented_ids, rule,
};
use crate::spec::{CniError, CniResult, ErrorCode};
use crate::sysctl;

pub struct Portmap;

const TABLE: &str = "nat";
pub const DNAT_CHAIN: &str = "CNI-HOSTPORT-DNAT";
pub const SETMARK_CHAIN: &str = "CNI-HOSTPORT-SETMARK";
pub const MASQ_CHAIN: &str = "CNI-HOSTPORT-MASQ";
const DEFAULT_MASQ_BIT: u32 = 13;

/// One entry of `runtimeConfig.portMappings`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(rename = "hostIP", default)]
    pub host_ip: Option<String>,
}

fn default_protocol() -> String {
    "tcp".to_string()
}

#[derive(Debug, Clone, Default, Deserialize)]
struct RuntimeConfig {
    #[serde(rename = "portMappings", default)]
    port_mappings: Vec<PortMapping>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PortmapConf {
    #[serde(default)]
    snat: Option<bool>,
    #[serde(rename = "masqAll", default)]
    masq_all: bool,
    #[serde(rename = "markMasqBit", default)]
    mark_masq_bit: Option<u32>,
    #[serde(rename = "externalSetMarkChain", default)]
    external_set_mark_chain: Option<String>,
    #[serde(rename = "conditionsV4", default)]
    conditions_v4: Option<Vec<String>>,
    #[serde(rename = "conditionsV6", default)]
    conditions_v6: Option<Vec<String>>,
    #[serde(rename = "runtimeConfig", default)]
    runtime_config: Option<RuntimeConfig>,
}

/// A validated mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    host_port: u16,
    container_port: u16,
    protocol: String,
    host_ip: Option<IpAddr>,
}

/// The configuration after validation.
#[derive(Debug, Clone)]
struct Settings {
    snat: bool,
    masq_all: bool,
    mark: String,
    setmark_chain: String,
    external_setmark: bool,
    conditions_v4: Vec<String>,
    conditions_v6: Vec<String>,
    mappings: Vec<Mapping>,
}

fn invalid(msg: &str, details: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidConfig, msg, details)
}

fn load(req: &Request) -> Result<Settings, CniError> {
    let conf: PortmapConf = req.plugin_conf()?;
    let bit = conf.mark_masq_bit.unwrap_or(DEFAULT_MASQ_BIT);
    if bit > 31 {
        return Err(invalid(
            "markMasqBit must be between 0 and 31",
            bit.to_string(),
        ));
    }
    if conf.mark_masq_bit.is_some() && conf.external_set_mark_chain.is_some() {
        return Err(invalid(
            "markMasqBit and externalSetMarkChain are mutually exclusive",
            "",
        ));
    }
    let mut mappings = Vec::new();
    for m in conf.runtime_config.unwrap_or_default().port_mappings {
        let protocol = m.protocol.to_ascii_lowercase();
        if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
            return Err(invalid("unsupported port mapping protocol", m.protocol));
        }
        if m.host_port == 0 || m.container_port == 0 {
            return Err(invalid(
                "port mappings need non-zero hostPort and containerPort",
                format!("{m:?}"),
            ));
        }
        let host_ip = match m.host_ip.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| invalid("invalid hostIP", s))?,
            ),
        };
        // An unspecified address means every address, as if hostIP were absent.
        let host_ip = host_ip.filter(|ip| !ip.is_unspecified());
        mappings.push(Mapping {
            host_port: m.host_port,
            container_port: m.container_port,
            protocol,
            host_ip,
        });
    }
    let mark = format!("{:#x}/{:#x}", 1u32 << bit, 1u32 << bit);
    let (setmark_chain, external_setmark) = match conf.external_set_mark_chain {
        Some(c) if !c.is_empty() => (c, true),
        _ => (SETMARK_CHAIN.to_string(), false),
    };
    Ok(Settings {
        snat: conf.snat.unwrap_or(true),
        masq_all: conf.masq_all,
        mark,
        setmark_chain,
        external_setmark,
        conditions_v4: conf.conditions_v4.unwrap_or_default(),
        conditions_v6: conf.conditions_v6.unwrap_or_default(),
        mappings,
    })
}

/// The container chain of this attachment.
pub fn container_chain(network: &str, container_id: &str) -> String {
    chain_name("CNI-DN-", network, container_id)
}

fn dnat_comment(network: &str, container_id: &str) -> String {
    format!("dnat name: \"{network}\" id: \"{container_id}\"")
}

/// The container addresses from prevResult: those on sandbox interfaces, or all.
fn container_ips(prev: &CniResult) -> Vec<IpNet> {
    prev.ips
        .iter()
        .filter(|ip| match ip.interface {
            Some(i) => prev
                .interfaces
                .get(i)
                .is_none_or(|iface| iface.sandbox.is_some()),
            None => true,
        })
        .map(|ip| ip.address)
        .collect()
}

/// Programs one address family for the container at `cip`.
fn setup_family<R: Runner>(
    ipt: &Iptables<R>,
    s: &Settings,
    req: &Request,
    cip: IpNet,
) -> Result<(), IptablesError> {
    let v4 = cip.addr().is_ipv4();
    let maps: Vec<&Mapping> = s
        .mappings
        .iter()
        .filter(|m| m.host_ip.is_none_or(|h| h.is_ipv4() == v4))
        .collect();
    if maps.is_empty() {
        return Ok(());
    }
    if s.snat && !s.external_setmark {
        ipt.ensure_chain(TABLE, SETMARK_CHAIN)?;
        ipt.append_unique(
            TABLE,
            SETMARK_CHAIN,
            &rule(&[
                "-m",
                "comment",
                "--comment",
                "CNI portfwd masquerade mark",
                "-j",
                "MARK",
                "--set-xmark",
                &s.mark,
            ]),
        )?;
        ipt.ensure_chain(TABLE, MASQ_CHAIN)?;
        ipt.append_unique(
            TABLE,
            MASQ_CHAIN,
            &rule(&["-m", "mark", "--mark", &s.mark, "-j", "MASQUERADE"]),
        )?;
        // First in POSTROUTING, ahead of ipMasq rules that would otherwise claim the packet.
        ipt.insert_unique(
            TABLE,
            "POSTROUTING",
            &rule(&[
                "-m",
                "comment",
                "--comment",
                "CNI portfwd requiring masquerade",
                "-j",
                MASQ_CHAIN,
            ]),
        )?;
    }
    ipt.ensure_chain(TABLE, DNAT_CHAIN)?;
    let entry = rule(&["-m", "addrtype", "--dst-type", "LOCAL", "-j", DNAT_CHAIN]);
    ipt.append_unique(TABLE, "PREROUTING", &entry)?;
    ipt.append_unique(TABLE, "OUTPUT", &entry)?;

    let chain = container_chain(&req.conf.name, &req.container_id);
    // A chain left by an interrupted ADD is rebuilt from scratch.
    teardown_family(ipt, &chain)?;
    ipt.ensure_chain(TABLE, &chain)?;
    let cnet = cip.trunc().to_string();
    let caddr = cip.addr();
    let everyone = if v4 { "0.0.0.0/0" } else { "::/0" };
    for m in &maps {
        let mut base = rule(&["-p", &m.protocol, "--dport", &m.host_port.to_string()]);
        if let Some(h) = m.host_ip {
            base.extend(rule(&["-d", &h.to_string()]));
        }
        let with = |extra: &[&str]| {
            let mut r = base.clone();
            r.extend(rule(extra));
            r
        };
        if s.snat {
            // Hairpin traffic (or, with masqAll, all traffic) is masqueraded so that
            // replies come back through this host.
            let source = if s.masq_all { everyone } else { cnet.as_str() };
            ipt.append(
                TABLE,
                &chain,
                &with(&["-s", source, "-j", &s.setmark_chain]),
            )?;
            if v4 && !s.masq_all {
                ipt.append(
                    TABLE,
                    &chain,
                    &with(&["-s", "127.0.0.1", "-j", &s.setmark_chain]),
                )?;
            }
        }
        let to = if v4 {
            format!("{caddr}:{}", m.container_port)
        } else {
            format!("[{caddr}]:{}", m.container_port)
        };
        ipt.append(
            TABLE,
            &chain,
            &with(&["-j", "DNAT", "--to-destination", &to]),
        )?;
    }
    let comment = dnat_comment(&req.conf.name, &req.container_id);
    let conditions = if v4 {
        &s.conditions_v4
    } else {
        &s.conditions_v6
    };
    let mut protocols: Vec<&str> = maps.iter().map(|m| m.protocol.as_str()).collect();
    protocols.sort_unstable();
    protocols.dedup();
    for p in protocols {
        let ports: Vec<String> = maps
            .iter()
            .filter(|m| m.protocol == p)
            .map(|m| m.host_port.to_string())
            .collect();
        // multiport takes at most 15 ports per rule.
        for group in ports.chunks(15) {
            let mut r = rule(&[
                "-m",
                "comment",
                "--comment",
                &comment,
                "-m",
                "multiport",
                "-p",
                p,
                "--destination-ports",
                &group.join(","),
            ]);
            r.extend(conditions.iter().cloned());
            r.extend(rule(&["-j", &chain]));
            ipt.append_unique(TABLE, DNAT_CHAIN, &r)?;
        }
    }
    Ok(())
}

/// Removes the jumps to `chain` from CNI-HOSTPORT-DNAT and the chain itself.
fn teardown_family<R: Runner>(ipt: &Iptables<R>, chain: &str) -> Result<(), IptablesError> {
    if let Some(rules) = ipt.list(TABLE, DNAT_CHAIN)? {
        let target = format!("-j {chain}");
        for line in rules
            .iter()
            .filter(|l| l.ends_with(&target) || l.contains(&format!("{target} ")))
        {
            ipt.delete_listed(TABLE, line)?;
        }
    }
    ipt.delete_chain(TABLE, chain)
}

/// Drops conntrack entries for the mapped UDP host ports: a client that sent to the
/// port before the mapping existed would otherwise keep its stale flow (to the host)
/// and never reach the container. Best effort: `conntrack` reports failure when there
/// was nothing to delete, and a missing tool only costs that cleanup.
fn flush_udp_conntrack<R: Runner>(runner: &R, mappings: &[Mapping], v4: bool, v6: bool) {
    let families = [("ipv4", v4), ("ipv6", v6)];
    for m in mappings.iter().filter(|m| m.protocol == "udp") {
        for (family, _) in families.iter().filter(|(_, on)| *on) {
            let args = rule(&[
                "-D",
                "-f",
                family,
                "-p",
                "udp",
                "--dport",
                &m.host_port.to_string(),
            ]);
            if let Err(e) = runner.run("conntrack", &args) {
                tracing::warn!(error = %e, "conntrack unavailable; stale UDP flows kept");
                return;
            }
        }
    }
}

fn families() -> [Iptables<SystemRunner>; 2] {
    [
        Iptables::new(SystemRunner, false),
        Iptables::new(SystemRunner, true),
    ]
}

/// Allows DNAT to the container of traffic addressed to 127.0.0.1 on the host side:
/// route_localnet on every host interface of the attachment (the bridge among them).
fn enable_localnet(prev: &CniResult) -> Result<(), CniError> {
    for iface in prev.interfaces.iter().filter(|i| i.sandbox.is_none()) {
        if std::path::Path::new("/proc/sys/net/ipv4/conf")
            .join(&iface.name)
            .exists()
        {
            sysctl::set_iface("ipv4", &iface.name, "route_localnet", "1")?;
        }
    }
    Ok(())
}

impl Plugin for Portmap {
    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let s = load(req)?;
        let prev = req.prev_result.clone().ok_or_else(|| {
            invalid(
                "portmap must be called as a chained plugin",
                "prevResult is missing",
            )
        })?;
        if s.mappings.is_empty() {
            return Ok(prev);
        }
        let ips = container_ips(&prev);
        let v4 = ips.iter().find(|i| i.addr().is_ipv4()).copied();
        let v6 = ips.iter().find(|i| i.addr().is_ipv6()).copied();
        if v4.is_none() && v6.is_none() {
            return Err(invalid(
                "prevResult has no container address to map ports to",
                "",
            ));
        }
        let [ipt4, ipt6] = families();
        let chain = container_chain(&req.conf.name, &req.container_id);
        let attempt = || -> Result<(), CniError> {
            if let Some(ip) = v4 {
                setup_family(&ipt4, &s, req, ip)?;
                if s.snat {
                    enable_localnet(&prev)?;
                }
            }
            if let Some(ip) = v6 {
                setup_family(&ipt6, &s, req, ip)?;
            }
            Ok(())
        };
        if let Err(e) = attempt() {
            for ipt in [&ipt4, &ipt6] {
                if let Err(t) = teardown_family(ipt, &chain) {
                    tracing::error!(error = %t, "rollback: removing port mappings");
                }
            }
            return Err(e);
        }
        flush_udp_conntrack(&SystemRunner, &s.mappings, v4.is_some(), v6.is_some());
        Ok(prev)
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        load(req)?;
        let chain = container_chain(&req.conf.name, &req.container_id);
        let mut errors = Vec::new();
        for ipt in families() {
            if let Err(e) = teardown_family(&ipt, &chain) {
                errors.push(e.to_string());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Internal,
                "removing port mappings failed",
                errors.join("; "),
            ))
        }
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let s = load(req)?;
        let prev = req
            .prev_result
            .as_ref()
            .ok_or_else(|| invalid("CHECK needs prevResult", ""))?;
        if s.mappings.is_empty() {
            return Ok(());
        }
        let chain = container_chain(&req.conf.name, &req.container_id);
        let [ipt4, ipt6] = families();
        for ip in container_ips(prev) {
            let ipt = if ip.addr().is_ipv4() { &ipt4 } else { &ipt6 };
            let rules = ipt.list(TABLE, &chain)?.ok_or_else(|| {
                CniError::new(
                    ErrorCode::Internal,
                    "port mapping chain is missing",
                    chain.clone(),
                )
            })?;
            for m in s
                .mappings
                .iter()
                .filter(|m| m.host_ip.is_none_or(|h| h.is_ipv4() == ip.addr().is_ipv4()))
            {
                let port = format!("--dport {}", m.host_port);
                let found = rules
                    .iter()
                    .any(|r| r.contains(&port) && r.contains("-j DNAT"));
                if !found {
                    return Err(CniError::new(
                        ErrorCode::Internal,
                        "port mapping rule is missing",
                        format!("{} {} in {chain}", m.protocol, m.host_port),
                    ));
                }
            }
        }
        Ok(())
    }

    fn status(&self, _req: &Request) -> Result<(), CniError> {
        let ok = SystemRunner
            .run("iptables", &rule(&["--version"]))
            .is_ok_and(|o| o.success);
        if ok {
            Ok(())
        } else {
            Err(CniError::msg(
                ErrorCode::PluginNotAvailable,
                "iptables is not usable",
            ))
        }
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        load(req)?;
        let valid: HashSet<String> = req
            .valid_attachments()?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let prefix = format!("dnat name: \"{}\" id: \"", req.conf.name);
        let mut errors = Vec::new();
        for ipt in families() {
            let Some(rules) = ipt.list(TABLE, DNAT_CHAIN)? else {
                continue;
            };
            let stale = commented_ids(&rules, &prefix)
                .into_iter()
                .filter(|id| !valid.contains(id));
            for id in stale {
                if let Err(e) = teardown_family(&ipt, &container_chain(&req.conf.name, &id)) {
                    errors.push(e.to_string());
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Internal,
                "gc could not remove every port mapping",
                errors.join("; "),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::iptables::Output;

    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>);

    impl Runner for &Recorder {
        fn run(&self, _program: &str, args: &[String]) -> Result<Output, std::io::Error> {
            let line = args[1..].join(" ");
            let exists = args.get(3).is_some_and(|a| a == "-S" || a == "-C");
            self.0.borrow_mut().push(line);
            Ok(Output {
                success: !exists,
                ..Output::default()
            })
        }
    }

    fn request(conf: serde_json::Value) -> Request {
        let env = |k: &str| {
            Some(
                match k {
                    "CNI_COMMAND" => "ADD",
                    "CNI_CONTAINERID" => "ctr1",
                    "CNI_NETNS" => "/run/netns/x",
                    "CNI_IFNAME" => "eth0",
                    "CNI_PATH" => "/x",
                    _ => return None,
                }
                .to_string(),
            )
        };
        Request::parse(&env, conf.to_string().as_bytes())
            .unwrap()
            .unwrap()
    }

    fn conf(mappings: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "net", "type": "portmap",
            "runtimeConfig": {"portMappings": mappings},
            "prevResult": {"cniVersion":"1.0.0","interfaces":[{"name":"br"},{"name":"eth0","sandbox":"/x"}],
                           "ips":[{"address":"10.0.0.2/24","interface":1}]}
        })
    }

    fn setup(conf: serde_json::Value, cip: &str, v6: bool) -> (Vec<String>, String) {
        let req = request(conf);
        let s = load(&req).unwrap();
        let rec = Recorder::default();
        setup_family(&Iptables::new(&rec, v6), &s, &req, cip.parse().unwrap()).unwrap();
        (rec.0.take(), container_chain("net", "ctr1"))
    }

    fn has(calls: &[String], want: &str) -> bool {
        calls.iter().any(|c| c == want)
    }

    #[test]
    fn rules_match_the_reference_layout() {
        let (calls, chain) = setup(
            conf(serde_json::json!([
                {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
                {"hostPort": 8081, "containerPort": 81, "protocol": "tcp", "hostIP": "192.168.1.1"}
            ])),
            "10.0.0.2/24",
            false,
        );
        let expected = [
            format!("-t nat -A {chain} -p tcp --dport 8080 -s 10.0.0.0/24 -j CNI-HOSTPORT-SETMARK"),
            format!("-t nat -A {chain} -p tcp --dport 8080 -s 127.0.0.1 -j CNI-HOSTPORT-SETMARK"),
            format!("-t nat -A {chain} -p tcp --dport 8080 -j DNAT --to-destination 10.0.0.2:80"),
            format!(
                "-t nat -A {chain} -p tcp --dport 8081 -d 192.168.1.1 -j DNAT --to-destination 10.0.0.2:81"
            ),
            format!(
                "-t nat -A CNI-HOSTPORT-DNAT -m comment --comment dnat name: \"net\" id: \"ctr1\" -m multiport -p tcp --destination-ports 8080,8081 -j {chain}"
            ),
            "-t nat -A CNI-HOSTPORT-SETMARK -m comment --comment CNI portfwd masquerade mark -j MARK --set-xmark 0x2000/0x2000".to_string(),
            "-t nat -A CNI-HOSTPORT-MASQ -m mark --mark 0x2000/0x2000 -j MASQUERADE".to_string(),
            "-t nat -I POSTROUTING 1 -m comment --comment CNI portfwd requiring masquerade -j CNI-HOSTPORT-MASQ".to_string(),
            "-t nat -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT".to_string(),
            "-t nat -A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT".to_string(),
        ];
        for want in &expected {
            assert!(has(&calls, want), "missing {want:?} in {calls:#?}");
        }
    }

    #[test]
    fn masq_all_and_no_snat() {
        let mut c = conf(serde_json::json!([{"hostPort": 8080, "containerPort": 80}]));
        c["masqAll"] = serde_json::json!(true);
        c["conditionsV4"] = serde_json::json!(["-s", "192.0.2.0/24"]);
        let (calls, chain) = setup(c, "10.0.0.2/24", false);
        assert!(has(
            &calls,
            &format!("-t nat -A {chain} -p tcp --dport 8080 -s 0.0.0.0/0 -j CNI-HOSTPORT-SETMARK")
        ));
        assert!(!calls.iter().any(|c| c.contains("127.0.0.1")));
        assert!(
            calls
                .iter()
                .any(|c| c.contains("--destination-ports 8080 -s 192.0.2.0/24 -j CNI-DN-"))
        );
        let mut c = conf(serde_json::json!([{"hostPort": 8080, "containerPort": 80}]));
        c["snat"] = serde_json::json!(false);
        let (calls, _) = setup(c, "10.0.0.2/24", false);
        assert!(
            !calls
                .iter()
                .any(|c| c.contains("SETMARK") || c.contains("MASQ")),
            "{calls:#?}"
        );
    }

    #[test]
    fn ipv6_mappings_use_brackets_and_skip_localhost() {
        let mut c = conf(serde_json::json!([{"hostPort": 8080, "containerPort": 80}]));
        c["snat"] = serde_json::json!(true);
        let req = request(c);
        let s = load(&req).unwrap();
        let rec = Recorder::default();
        setup_family(
            &Iptables::new(&rec, true),
            &s,
            &req,
            "fd00::2/64".parse().unwrap(),
        )
        .unwrap();
        let calls = rec.0.borrow();
        assert!(
            calls
                .iter()
                .any(|c| c.ends_with("-j DNAT --to-destination [fd00::2]:80"))
        );
        assert!(!calls.iter().any(|c| c.contains("127.0.0.1")));
    }

    #[test]
    fn bad_mappings_are_invalid_config() {
        for m in [
            serde_json::json!([{"hostPort": 0, "containerPort": 80}]),
            serde_json::json!([{"hostPort": 70000, "containerPort": 80}]),
            serde_json::json!([{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]),
            serde_json::json!([{"hostPort": 80, "containerPort": 80, "hostIP": "nope"}]),
        ] {
            let e = load(&request(conf(m))).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidConfig);
        }
        let mut c = conf(serde_json::json!([]));
        c["markMasqBit"] = serde_json::json!(40);
        assert_eq!(
            load(&request(c)).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
    }

    #[test]
    fn udp_mappings_flush_conntrack_for_each_family() {
        struct Log(RefCell<Vec<String>>);
        impl Runner for &Log {
            fn run(&self, program: &str, args: &[String]) -> Result<Output, std::io::Error> {
                self.0
                    .borrow_mut()
                    .push(format!("{program} {}", args.join(" ")));
                Ok(Output::default())
            }
        }
        let req = request(conf(serde_json::json!([
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp"},
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
        ])));
        let s = load(&req).unwrap();
        let log = Log(RefCell::new(Vec::new()));
        flush_udp_conntrack(&&log, &s.mappings, true, true);
        assert_eq!(
            *log.0.borrow(),
            [
                "conntrack -D -f ipv4 -p udp --dport 5353",
                "conntrack -D -f ipv6 -p udp --dport 5353"
            ]
        );
    }
}
