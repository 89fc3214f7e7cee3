use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::Version;

/// A plugin result in the 1.1.0 shape. Parsing accepts any supported version (the
/// pre-1.0 `ips[].version` field is ignored); [`CniResult::to_version`] writes the
/// shape of the version the runtime asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty()
            && self.domain.is_none()
            && self.search.is_empty()
            && self.options.is_empty()
    }
}

const FIELDS_NEW_IN_1_1_INTERFACE: [&str; 3] = ["mtu", "socketPath", "pciID"];
const FIELDS_NEW_IN_1_1_ROUTE: [&str; 5] = ["mtu", "advmss", "priority", "table", "scope"];

impl CniResult {
    /// The JSON of this result in the shape of `version`.
    pub fn to_version(&self, version: Version) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        let Some(obj) = v.as_object_mut() else {
            return v;
        };
        obj.insert("cniVersion".into(), Value::String(version.as_str().into()));
        if version < Version::V1_1_0 {
            strip(obj, "interfaces", &FIELDS_NEW_IN_1_1_INTERFACE);
            strip(obj, "routes", &FIELDS_NEW_IN_1_1_ROUTE);
        }
        if version < Version::V1_0_0
            && let Some(Value::Array(ips)) = obj.get_mut("ips")
        {
            for (ip, parsed) in ips.iter_mut().zip(&self.ips) {
                if let Some(ip) = ip.as_object_mut() {
                    let family = if parsed.address.addr().is_ipv4() {
                        "4"
                    } else {
                        "6"
                    };
                    ip.insert("version".into(), Value::String(family.into()));
                }
            }
        }
        v
    }
}

fn strip(obj: &mut Map<String, Value>, list: &str, fields: &[&str]) {
    if let Some(Value::Array(items)) = obj.get_mut(list) {
        for item in items.iter_mut().filter_map(Value::as_object_mut) {
            for f in fields {
                item.remove(*f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            cni_version: "1.1.0".into(),
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: Some("0a:00:00:00:00:01".into()),
                mtu: Some(1400),
                sandbox: Some("/run/netns/x".into()),
                ..Interface::default()
            }],
            ips: vec![
                IpConfig {
                    interface: Some(0),
                    address: "10.1.0.5/24".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                },
                IpConfig {
                    interface: Some(0),
                    address: "fd00::5/64".parse().unwrap(),
                    gateway: None,
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
                mtu: Some(1300),
                advmss: None,
                priority: None,
                table: None,
                scope: None,
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn pre_1_0_results_carry_ip_version_and_no_new_fields() {
        let v = sample().to_version(Version::V0_4_0);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["ips"][0]["version"], "4");
        assert_eq!(v["ips"][1]["version"], "6");
        assert!(v["interfaces"][0].get("mtu").is_none());
        assert!(v["routes"][0].get("mtu").is_none());
        assert_eq!(v["ips"][0]["address"], "10.1.0.5/24");
    }

    #[test]
    fn current_results_keep_new_fields_and_drop_version() {
        let v = sample().to_version(Version::V1_1_0);
        assert!(v["ips"][0].get("version").is_none());
        assert_eq!(v["interfaces"][0]["mtu"], 1400);
        assert_eq!(v["routes"][0]["mtu"], 1300);
        let v = sample().to_version(Version::V1_0_0);
        assert!(v["ips"][0].get("version").is_none());
        assert!(v["interfaces"][0].get("mtu").is_none());
    }

    #[test]
    fn old_results_parse() {
        let r: CniResult = serde_json::from_str(
            r#"{"cniVersion":"0.3.1","interfaces":[{"name":"eth0","sandbox":"/x"}],
               "ips":[{"version":"4","address":"10.0.0.2/16","gateway":"10.0.0.1","interface":0}],
               "dns":{}}"#,
        )
        .unwrap();
        assert_eq!(r.ips[0].address, "10.0.0.2/16".parse::<IpNet>().unwrap());
        let back: CniResult = serde_json::from_value(r.to_version(Version::V0_3_1)).unwrap();
        assert_eq!(back, r);
    }
}
