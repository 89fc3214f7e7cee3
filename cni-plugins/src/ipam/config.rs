//! The `ipam` section of a host-local configuration.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::spec::Dns;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IpamConfigError {
    #[error("the configuration has no \"ipam\" section")]
    Missing,
    #[error("invalid ipam configuration: {0}")]
    Decode(String),
    #[error("no IP ranges specified")]
    NoRanges,
    #[error("range set {0} is empty")]
    EmptyRangeSet(usize),
    #[error("network {0} too small to allocate from")]
    TooSmall(IpNet),
    #[error("{what} {ip} is not in network {subnet}")]
    OutsideSubnet {
        what: &'static str,
        ip: IpAddr,
        subnet: IpNet,
    },
    #[error("rangeStart {start} is after rangeEnd {end} in {subnet}")]
    StartAfterEnd {
        start: IpAddr,
        end: IpAddr,
        subnet: IpNet,
    },
    #[error("range set {0} mixes IPv4 and IPv6")]
    MixedFamilies(usize),
    #[error("ranges {a} and {b} overlap")]
    Overlap { a: String, b: String },
    #[error("invalid IP {0:?} requested")]
    BadRequestedIp(String),
    #[error("reading resolvConf {path}: {error}")]
    ResolvConf { path: PathBuf, error: String },
}

#[derive(Debug, Clone, Deserialize)]
struct RawRange {
    subnet: IpNet,
    #[serde(rename = "rangeStart", default)]
    range_start: Option<IpAddr>,
    #[serde(rename = "rangeEnd", default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawRoute {
    pub dst: IpNet,
    #[serde(default)]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawIpam {
    #[serde(default)]
    subnet: Option<IpNet>,
    #[serde(rename = "rangeStart", default)]
    range_start: Option<IpAddr>,
    #[serde(rename = "rangeEnd", default)]
    range_end: Option<IpAddr>,
    #[serde(default)]
    gateway: Option<IpAddr>,
    #[serde(default)]
    ranges: Vec<Vec<RawRange>>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(rename = "dataDir", default)]
    data_dir: Option<PathBuf>,
    #[serde(rename = "resolvConf", default)]
    resolv_conf: Option<PathBuf>,
}

/// One allocatable range, canonicalised: start, end and gateway are always known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

pub type RangeSet = Vec<Range>;

pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

/// The address `n` in the family of `like`; callers keep `n` inside that family's range.
pub(crate) fn from_u128(like: IpAddr, n: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(u32::try_from(n).unwrap_or(u32::MAX).into()),
        IpAddr::V6(_) => IpAddr::V6(n.into()),
    }
}

impl Range {
    fn canonicalize(raw: &RawRange) -> Result<Self, IpamConfigError> {
        let subnet = raw.subnet.trunc();
        if subnet.prefix_len() > subnet.max_prefix_len().saturating_sub(2) {
            return Err(IpamConfigError::TooSmall(raw.subnet));
        }
        let inside = |what: &'static str, ip: IpAddr| {
            if subnet.contains(&ip) {
                Ok(ip)
            } else {
                Err(IpamConfigError::OutsideSubnet { what, ip, subnet })
            }
        };
        let network = subnet.network();
        let gateway = match raw.gateway {
            Some(g) => inside("gateway", g)?,
            None => from_u128(network, to_u128(network) + 1),
        };
        let start = match raw.range_start {
            Some(s) => inside("rangeStart", s)?,
            None => from_u128(network, to_u128(network) + 1),
        };
        let end = match raw.range_end {
            Some(e) => inside("rangeEnd", e)?,
            None => {
                let last = to_u128(subnet.broadcast());
                // The IPv4 broadcast address is not a host address.
                from_u128(network, if network.is_ipv4() { last - 1 } else { last })
            }
        };
        if to_u128(start) > to_u128(end) {
            return Err(IpamConfigError::StartAfterEnd { start, end, subnet });
        }
        Ok(Self {
            subnet,
            start,
            end,
            gateway,
        })
    }

    /// Whether `ip` may be handed out from this range (gateway aside).
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.start.is_ipv4()
            && to_u128(ip) >= to_u128(self.start)
            && to_u128(ip) <= to_u128(self.end)
    }

    fn overlaps(&self, other: &Range) -> bool {
        self.start.is_ipv4() == other.start.is_ipv4()
            && to_u128(self.start) <= to_u128(other.end)
            && to_u128(other.start) <= to_u128(self.end)
    }

    fn describe(&self) -> String {
        format!("{}-{}", self.start, self.end)
    }
}

/// A parsed, validated host-local configuration.
#[derive(Debug, Clone)]
pub struct IpamConfig {
    pub range_sets: Vec<RangeSet>,
    pub routes: Vec<RawRoute>,
    pub data_dir: PathBuf,
    pub dns: Dns,
}

impl IpamConfig {
    /// Reads the `ipam` object of a network configuration.
    pub fn from_netconf(conf: &Value) -> Result<Self, IpamConfigError> {
        let ipam = conf
            .get("ipam")
            .filter(|v| !v.is_null())
            .ok_or(IpamConfigError::Missing)?;
        let raw: RawIpam = serde_json::from_value(ipam.clone())
            .map_err(|e| IpamConfigError::Decode(e.to_string()))?;
        let mut raw_sets = Vec::new();
        if let Some(subnet) = raw.subnet {
            raw_sets.push(vec![RawRange {
                subnet,
                range_start: raw.range_start,
                range_end: raw.range_end,
                gateway: raw.gateway,
            }]);
        }
        raw_sets.extend(raw.ranges);
        if raw_sets.is_empty() {
            return Err(IpamConfigError::NoRanges);
        }
        let mut range_sets: Vec<RangeSet> = Vec::new();
        for (i, set) in raw_sets.iter().enumerate() {
            if set.is_empty() {
                return Err(IpamConfigError::EmptyRangeSet(i));
            }
            let ranges = set
                .iter()
                .map(Range::canonicalize)
                .collect::<Result<Vec<_>, _>>()?;
            if ranges
                .iter()
                .any(|r| r.start.is_ipv4() != ranges[0].start.is_ipv4())
            {
                return Err(IpamConfigError::MixedFamilies(i));
            }
            range_sets.push(ranges);
        }
        let all: Vec<&Range> = range_sets.iter().flatten().collect();
        for (i, a) in all.iter().enumerate() {
            if let Some(b) = all[i + 1..].iter().find(|b| a.overlaps(b)) {
                return Err(IpamConfigError::Overlap {
                    a: a.describe(),
                    b: b.describe(),
                });
            }
        }
        let dns = match &raw.resolv_conf {
            Some(path) => parse_resolv_conf(path)?,
            None => Dns::default(),
        };
        Ok(Self {
            range_sets,
            routes: raw.routes,
            data_dir: raw
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            dns,
        })
    }
}

/// The IPs a runtime asked for, from `CNI_ARGS` `IP=`, `args.cni.ips` and
/// `runtimeConfig.ips` (the `ips` capability); prefixes are ignored.
pub fn requested_ips(
    conf: &Value,
    cni_args_ip: Option<&str>,
) -> Result<Vec<IpAddr>, IpamConfigError> {
    let mut texts: Vec<String> = Vec::new();
    if let Some(list) = cni_args_ip {
        texts.extend(
            list.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
    }
    for ptr in ["/args/cni/ips", "/runtimeConfig/ips"] {
        if let Some(v) = conf.pointer(ptr).filter(|v| !v.is_null()) {
            let list = v
                .as_array()
                .ok_or_else(|| IpamConfigError::BadRequestedIp(v.to_string()))?;
            for item in list {
                let s = item
                    .as_str()
                    .ok_or_else(|| IpamConfigError::BadRequestedIp(item.to_string()))?;
                texts.push(s.to_string());
            }
        }
    }
    let mut out: Vec<IpAddr> = Vec::new();
    for t in texts {
        let t = t.trim();
        let ip = t
            .parse::<IpAddr>()
            .or_else(|_| t.parse::<IpNet>().map(|n| n.addr()))
            .map_err(|_| IpamConfigError::BadRequestedIp(t.to_string()))?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

fn parse_resolv_conf(path: &std::path::Path) -> Result<Dns, IpamConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| IpamConfigError::ResolvConf {
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    let mut dns = Dns::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.nameservers.extend(words.next().map(str::to_string)),
            Some("domain") => dns.domain = words.next().map(str::to_string),
            Some("search") => dns.search.extend(words.map(str::to_string)),
            Some("options") => dns.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    Ok(dns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(ipam: Value) -> Result<IpamConfig, IpamConfigError> {
        IpamConfig::from_netconf(&json!({ "ipam": ipam }))
    }

    #[test]
    fn defaults_follow_the_reference() {
        let c = conf(json!({"type":"host-local","subnet":"10.1.2.0/24"})).unwrap();
        let r = &c.range_sets[0][0];
        assert_eq!(r.start, "10.1.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(r.end, "10.1.2.254".parse::<IpAddr>().unwrap());
        assert_eq!(r.gateway, "10.1.2.1".parse::<IpAddr>().unwrap());
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let c = conf(json!({"ranges":[[{"subnet":"fd00::/120"}]]})).unwrap();
        assert_eq!(
            c.range_sets[0][0].end,
            "fd00::ff".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn legacy_subnet_comes_first() {
        let c = conf(json!({"subnet":"10.0.0.0/24","ranges":[[{"subnet":"fd00::/64"}]]})).unwrap();
        assert_eq!(c.range_sets.len(), 2);
        assert!(c.range_sets[0][0].start.is_ipv4());
    }

    #[test]
    fn bad_ranges_are_refused() {
        assert_eq!(conf(json!({})).unwrap_err(), IpamConfigError::NoRanges);
        assert!(matches!(
            conf(json!({"subnet":"10.0.0.0/31"})),
            Err(IpamConfigError::TooSmall(_))
        ));
        assert!(matches!(
            conf(json!({"subnet":"10.0.0.0/99"})),
            Err(IpamConfigError::Decode(_))
        ));
        assert!(matches!(
            conf(json!({"subnet":"banana"})),
            Err(IpamConfigError::Decode(_))
        ));
        assert!(matches!(
            conf(json!({"subnet":"10.0.0.0/24","gateway":"10.0.1.1"})),
            Err(IpamConfigError::OutsideSubnet { .. })
        ));
        assert!(matches!(
            conf(json!({"subnet":"10.0.0.0/24","rangeStart":"10.0.0.9","rangeEnd":"10.0.0.3"})),
            Err(IpamConfigError::StartAfterEnd { .. })
        ));
        assert!(matches!(
            conf(json!({"ranges":[[{"subnet":"10.0.0.0/24"},{"subnet":"fd00::/64"}]]})),
            Err(IpamConfigError::MixedFamilies(0))
        ));
        assert!(matches!(
            conf(json!({"ranges":[[{"subnet":"10.0.0.0/24"}],[{"subnet":"10.0.0.0/25"}]]})),
            Err(IpamConfigError::Overlap { .. })
        ));
        assert!(matches!(
            conf(json!({"ranges":[[]]})),
            Err(IpamConfigError::EmptyRangeSet(0))
        ));
        assert_eq!(
            IpamConfig::from_netconf(&json!({})).unwrap_err(),
            IpamConfigError::Missing
        );
    }

    #[test]
    fn requested_ips_from_all_sources() {
        let c = json!({"args":{"cni":{"ips":["10.0.0.7"]}},"runtimeConfig":{"ips":["fd00::7/64"]}});
        let ips = requested_ips(&c, Some("10.0.0.5,10.0.0.7")).unwrap();
        assert_eq!(ips.len(), 3);
        assert!(requested_ips(&json!({}), Some("10.0.0.300")).is_err());
        assert!(requested_ips(&json!({"runtimeConfig":{"ips":"x"}}), None).is_err());
    }

    #[test]
    fn resolv_conf_is_parsed() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("resolv.conf");
        std::fs::write(
            &p,
            "nameserver 10.0.0.10\nsearch a.local b.local\ndomain a.local\noptions ndots:5\n",
        )
        .unwrap();
        let c = conf(json!({"subnet":"10.0.0.0/24","resolvConf":p})).unwrap();
        assert_eq!(c.dns.nameservers, vec!["10.0.0.10"]);
        assert_eq!(c.dns.search, vec!["a.local", "b.local"]);
        assert_eq!(c.dns.options, vec!["ndots:5"]);
        assert!(conf(json!({"subnet":"10.0.0.0/24","resolvConf":"/nonexistent/x"})).is_err());
    }
}
