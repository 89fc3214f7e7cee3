//! The agent's configuration: a YAML file shaped like the kubelet's `KubeletConfiguration`
//! (same field names where they mean the same thing), overridden by flags named like the
//! kubelet's, resolved into one typed [`AgentConfig`] with working defaults for everything
//! except the kubeconfig.

mod duration;
mod quantity;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use duration::{DurationError, parse_duration};
pub use quantity::{Quantity, QuantityError};

/// What went wrong reading or resolving the configuration; each names the file or field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("config file {path}: kind must be KubeletConfiguration, got {kind:?}")]
    WrongKind { path: PathBuf, kind: String },
    #[error("{field}: {source}")]
    Duration {
        field: &'static str,
        source: DurationError,
    },
    #[error("{field}[{resource}]: {source}")]
    Quantity {
        field: &'static str,
        resource: String,
        source: QuantityError,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no kubeconfig: pass --kubeconfig or set it in the config file")]
    NoKubeconfig,
}

/// The configuration file. Unknown fields are an error, as in the kubelet's strict decoding,
/// so a typo never silently falls back to a default.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub kind: Option<String>,
    pub api_version: Option<String>,
    pub kubeconfig: Option<PathBuf>,
    pub node_name: Option<String>,
    pub container_runtime_endpoint: Option<String>,
    pub root_dir: Option<PathBuf>,
    pub cni_bin_dir: Option<PathBuf>,
    pub cni_conf_dir: Option<PathBuf>,
    #[serde(rename = "clusterDNS")]
    pub cluster_dns: Option<Vec<IpAddr>>,
    pub cluster_domain: Option<String>,
    pub cgroup_root: Option<String>,
    pub max_pods: Option<u32>,
    pub system_reserved: Option<BTreeMap<String, String>>,
    pub kube_reserved: Option<BTreeMap<String, String>>,
    pub address: Option<IpAddr>,
    pub port: Option<u16>,
    pub healthz_port: Option<u16>,
    pub healthz_bind_address: Option<IpAddr>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub static_pod_path: Option<PathBuf>,
    pub sync_frequency: Option<String>,
    pub node_status_update_frequency: Option<String>,
    pub node_status_report_frequency: Option<String>,
    pub node_lease_duration_seconds: Option<u32>,
    pub resolv_conf: Option<PathBuf>,
    pub serialize_image_pulls: Option<bool>,
    #[serde(rename = "imageGCHighThresholdPercent")]
    pub image_gc_high_threshold_percent: Option<u8>,
    #[serde(rename = "imageGCLowThresholdPercent")]
    pub image_gc_low_threshold_percent: Option<u8>,
    #[serde(rename = "imageMinimumGCAge")]
    pub image_minimum_gc_age: Option<String>,
    pub node_labels: Option<BTreeMap<String, String>>,
    pub register_with_taints: Option<Vec<TaintConfig>>,
    pub pod_infra_container_image: Option<String>,
    #[serde(rename = "clusterCIDR")]
    pub cluster_cidr: Option<String>,
    #[serde(rename = "serviceClusterIPRange")]
    pub service_cluster_ip_range: Option<String>,
    /// Run the service proxy (iptables for Services) in the agent; default true.
    pub service_proxy: Option<bool>,
}

/// A taint as written in `registerWithTaints`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TaintConfig {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
    pub effect: String,
}

/// Flags; each overrides the file's field of the same meaning.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Flags {
    /// KubeletConfiguration-style YAML file.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Kubeconfig with the API server address and this node's credentials.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Name of this Node (default: the host name, lowercased).
    #[arg(long, alias = "hostname-override")]
    pub node_name: Option<String>,
    /// CRI endpoint, e.g. unix:///run/ferrolet/shim.sock.
    #[arg(long)]
    pub container_runtime_endpoint: Option<String>,
    /// Where the agent keeps its state (pod volumes, CNI results, certificates).
    #[arg(long)]
    pub root_dir: Option<PathBuf>,
    /// Directory of CNI plugin executables.
    #[arg(long)]
    pub cni_bin_dir: Option<PathBuf>,
    /// Directory of CNI network configuration (the first conflist by name is used).
    #[arg(long)]
    pub cni_conf_dir: Option<PathBuf>,
    /// Cluster DNS server IPs, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub cluster_dns: Vec<IpAddr>,
    /// Cluster DNS domain.
    #[arg(long)]
    pub cluster_domain: Option<String>,
    /// Cgroup parent of all pods.
    #[arg(long)]
    pub cgroup_root: Option<String>,
    /// Most pods this node runs.
    #[arg(long)]
    pub max_pods: Option<u32>,
    /// Resources reserved for the system, e.g. cpu=100m,memory=256Mi.
    #[arg(long)]
    pub system_reserved: Option<String>,
    /// Resources reserved for Kubernetes daemons, e.g. cpu=100m,memory=128Mi.
    #[arg(long)]
    pub kube_reserved: Option<String>,
    /// Address of the kubelet HTTP API.
    #[arg(long)]
    pub address: Option<IpAddr>,
    /// Port of the kubelet HTTP API.
    #[arg(long)]
    pub port: Option<u16>,
    /// Directory of static pod manifests.
    #[arg(long, alias = "pod-manifest-path")]
    pub static_pod_path: Option<PathBuf>,
    /// Extra node labels, e.g. zone=a,tier=web.
    #[arg(long)]
    pub node_labels: Option<String>,
    /// Taints to register the node with, e.g. key=value:NoSchedule.
    #[arg(long, value_delimiter = ',')]
    pub register_with_taints: Vec<String>,
    /// Image of the pod infra (pause) container, for runtimes that ask.
    #[arg(long)]
    pub pod_infra_container_image: Option<String>,
    /// IPv4 range of every pod IP in the cluster, e.g. 10.244.0.0/16: the agent routes the
    /// other nodes' pod ranges inside it (none without it), and the proxy masquerades traffic
    /// from outside it to a Service.
    #[arg(long)]
    pub cluster_cidr: Option<String>,
    /// The API server's Service range(s), comma-separated: ClusterIPs outside are refused.
    #[arg(long)]
    pub service_cluster_ip_range: Option<String>,
    /// Whether the agent programs iptables for Services (`--service-proxy=false` leaves it to
    /// another proxy).
    #[arg(long)]
    pub service_proxy: Option<bool>,
}

/// A taint to register the node with, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: Option<String>,
    pub effect: TaintEffect,
}

/// The three taint effects Kubernetes knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub fn as_str(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// The resolved configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub kubeconfig: PathBuf,
    pub node_name: String,
    pub container_runtime_endpoint: String,
    pub root_dir: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub cluster_dns: Vec<IpAddr>,
    pub cluster_domain: String,
    pub cgroup_root: String,
    pub max_pods: u32,
    pub system_reserved: BTreeMap<String, Quantity>,
    pub kube_reserved: BTreeMap<String, Quantity>,
    pub address: IpAddr,
    pub port: u16,
    pub healthz_bind_address: IpAddr,
    pub healthz_port: u16,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub static_pod_path: Option<PathBuf>,
    pub sync_frequency: Duration,
    pub node_status_update_frequency: Duration,
    pub node_status_report_frequency: Duration,
    pub node_lease_duration_seconds: u32,
    pub resolv_conf: PathBuf,
    pub serialize_image_pulls: bool,
    pub image_gc_high_threshold_percent: u8,
    pub image_gc_low_threshold_percent: u8,
    /// An image first seen less than this long ago is never garbage collected.
    pub image_minimum_gc_age: Duration,
    pub node_labels: BTreeMap<String, String>,
    pub register_with_taints: Vec<Taint>,
    pub pod_infra_container_image: String,
    pub cluster_cidr: Option<String>,
    pub service_cluster_ip_range: Option<String>,
    pub service_proxy: bool,
}

/// Defaults for the fields a user does not give.
pub mod defaults {
    pub const CONTAINER_RUNTIME_ENDPOINT: &str = "unix:///run/ferrolet/shim.sock";
    pub const ROOT_DIR: &str = "/var/lib/ferrolet";
    pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
    pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
    pub const CLUSTER_DOMAIN: &str = "cluster.local";
    /// Under the project's own parent, never beside other software's cgroups.
    pub const CGROUP_ROOT: &str = "/ferrolet/pods";
    pub const MAX_PODS: u32 = 110;
    pub const PORT: u16 = 10250;
    pub const HEALTHZ_PORT: u16 = 10248;
    pub const SYNC_FREQUENCY: &str = "1m";
    pub const NODE_STATUS_UPDATE_FREQUENCY: &str = "10s";
    pub const NODE_STATUS_REPORT_FREQUENCY: &str = "5m";
    pub const NODE_LEASE_DURATION_SECONDS: u32 = 40;
    pub const RESOLV_CONF: &str = "/etc/resolv.conf";
    pub const IMAGE_GC_HIGH: u8 = 85;
    pub const IMAGE_GC_LOW: u8 = 80;
    pub const IMAGE_MINIMUM_GC_AGE: &str = "2m";
    pub const POD_INFRA_CONTAINER_IMAGE: &str = "ferrolet.local/pause:latest";
}

impl FileConfig {
    /// Reads and strictly parses a config file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        FileConfig::parse(&text, path)
    }

    /// Parses config text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
        if text.trim().is_empty() {
            return Ok(FileConfig::default());
        }
        let file: FileConfig = serde_yaml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        if let Some(kind) = &file.kind
            && kind != "KubeletConfiguration"
        {
            return Err(ConfigError::WrongKind {
                path: path.to_path_buf(),
                kind: kind.clone(),
            });
        }
        Ok(file)
    }
}

impl AgentConfig {
    /// Loads the file named by `--config` (if any) and applies the flags over it.
    pub fn from_flags(flags: &Flags) -> Result<AgentConfig, ConfigError> {
        let file = match &flags.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        AgentConfig::resolve(file, flags, &default_node_name())
    }

    /// Merges file and flags (flags win) and fills in defaults. `host_name` is the fallback
    /// node name.
    pub fn resolve(
        file: FileConfig,
        flags: &Flags,
        host_name: &str,
    ) -> Result<AgentConfig, ConfigError> {
        let kubeconfig = flags
            .kubeconfig
            .clone()
            .or(file.kubeconfig)
            .ok_or(ConfigError::NoKubeconfig)?;
        let node_name = flags
            .node_name
            .clone()
            .or(file.node_name)
            .unwrap_or_else(|| host_name.to_ascii_lowercase());
        validate_node_name(&node_name)?;

        let duration = |field: &'static str, value: Option<String>, default: &str| {
            let text = value.unwrap_or_else(|| default.to_owned());
            parse_duration(&text).map_err(|source| ConfigError::Duration { field, source })
        };

        let system_reserved = match &flags.system_reserved {
            Some(text) => {
                parse_resource_list("systemReserved", &parse_key_values(text, "systemReserved")?)?
            }
            None => {
                parse_resource_list("systemReserved", &file.system_reserved.unwrap_or_default())?
            }
        };
        let kube_reserved = match &flags.kube_reserved {
            Some(text) => {
                parse_resource_list("kubeReserved", &parse_key_values(text, "kubeReserved")?)?
            }
            None => parse_resource_list("kubeReserved", &file.kube_reserved.unwrap_or_default())?,
        };

        let mut node_labels = file.node_labels.unwrap_or_default();
        if let Some(text) = &flags.node_labels {
            node_labels.extend(parse_key_values(text, "nodeLabels")?);
        }

        let register_with_taints = if flags.register_with_taints.is_empty() {
            file.register_with_taints
                .unwrap_or_default()
                .into_iter()
                .map(|t| taint_from_parts(t.key, t.value, &t.effect))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            flags
                .register_with_taints
                .iter()
                .map(|t| parse_taint(t))
                .collect::<Result<Vec<_>, _>>()?
        };

        let max_pods = flags
            .max_pods
            .or(file.max_pods)
            .unwrap_or(defaults::MAX_PODS);
        if max_pods == 0 {
            return Err(ConfigError::Invalid {
                field: "maxPods",
                message: "must be at least 1".into(),
            });
        }
        let gc_high = file
            .image_gc_high_threshold_percent
            .unwrap_or(defaults::IMAGE_GC_HIGH);
        let gc_low = file
            .image_gc_low_threshold_percent
            .unwrap_or(defaults::IMAGE_GC_LOW);
        if gc_high > 100 || gc_low > gc_high {
            return Err(ConfigError::Invalid {
                field: "imageGCHighThresholdPercent",
                message: format!(
                    "need imageGCLowThresholdPercent ({gc_low}) <= imageGCHighThresholdPercent ({gc_high}) <= 100"
                ),
            });
        }
        let cgroup_root = flags
            .cgroup_root
            .clone()
            .or(file.cgroup_root)
            .unwrap_or_else(|| defaults::CGROUP_ROOT.into());
        if !cgroup_root.starts_with('/') || cgroup_root.split('/').any(|part| part == "..") {
            return Err(ConfigError::Invalid {
                field: "cgroupRoot",
                message: format!("{cgroup_root:?} must be an absolute cgroup path without `..`"),
            });
        }
        let endpoint = flags
            .container_runtime_endpoint
            .clone()
            .or(file.container_runtime_endpoint)
            .unwrap_or_else(|| defaults::CONTAINER_RUNTIME_ENDPOINT.into());
        runtime_socket_path(&endpoint)?;
        let lease = file
            .node_lease_duration_seconds
            .unwrap_or(defaults::NODE_LEASE_DURATION_SECONDS);
        if lease == 0 {
            return Err(ConfigError::Invalid {
                field: "nodeLeaseDurationSeconds",
                message: "must be at least 1".into(),
            });
        }

        let cluster_cidr = flags.cluster_cidr.clone().or(file.cluster_cidr);
        if let Some(cidr) = &cluster_cidr {
            parse_cluster_cidr(cidr)?;
        }

        Ok(AgentConfig {
            kubeconfig,
            node_name,
            container_runtime_endpoint: endpoint,
            root_dir: flags
                .root_dir
                .clone()
                .or(file.root_dir)
                .unwrap_or_else(|| defaults::ROOT_DIR.into()),
            cni_bin_dir: flags
                .cni_bin_dir
                .clone()
                .or(file.cni_bin_dir)
                .unwrap_or_else(|| defaults::CNI_BIN_DIR.into()),
            cni_conf_dir: flags
                .cni_conf_dir
                .clone()
                .or(file.cni_conf_dir)
                .unwrap_or_else(|| defaults::CNI_CONF_DIR.into()),
            cluster_dns: if flags.cluster_dns.is_empty() {
                file.cluster_dns.unwrap_or_default()
            } else {
                flags.cluster_dns.clone()
            },
            cluster_domain: flags
                .cluster_domain
                .clone()
                .or(file.cluster_domain)
                .unwrap_or_else(|| defaults::CLUSTER_DOMAIN.into()),
            cgroup_root,
            max_pods,
            system_reserved,
            kube_reserved,
            address: flags
                .address
                .or(file.address)
                .unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port: flags.port.or(file.port).unwrap_or(defaults::PORT),
            healthz_bind_address: file
                .healthz_bind_address
                .unwrap_or(IpAddr::from([127, 0, 0, 1])),
            healthz_port: file.healthz_port.unwrap_or(defaults::HEALTHZ_PORT),
            tls_cert_file: file.tls_cert_file,
            tls_private_key_file: file.tls_private_key_file,
            static_pod_path: flags.static_pod_path.clone().or(file.static_pod_path),
            sync_frequency: duration(
                "syncFrequency",
                file.sync_frequency,
                defaults::SYNC_FREQUENCY,
            )?,
            node_status_update_frequency: duration(
                "nodeStatusUpdateFrequency",
                file.node_status_update_frequency,
                defaults::NODE_STATUS_UPDATE_FREQUENCY,
            )?,
            node_status_report_frequency: duration(
                "nodeStatusReportFrequency",
                file.node_status_report_frequency,
                defaults::NODE_STATUS_REPORT_FREQUENCY,
            )?,
            node_lease_duration_seconds: lease,
            resolv_conf: file
                .resolv_conf
                .unwrap_or_else(|| defaults::RESOLV_CONF.into()),
            serialize_image_pulls: file.serialize_image_pulls.unwrap_or(false),
            image_gc_high_threshold_percent: gc_high,
            image_gc_low_threshold_percent: gc_low,
            image_minimum_gc_age: duration(
                "imageMinimumGCAge",
                file.image_minimum_gc_age,
                defaults::IMAGE_MINIMUM_GC_AGE,
            )?,
            node_labels,
            register_with_taints,
            pod_infra_container_image: flags
                .pod_infra_container_image
                .clone()
                .or(file.pod_infra_container_image)
                .unwrap_or_else(|| defaults::POD_INFRA_CONTAINER_IMAGE.into()),
            cluster_cidr,
            service_cluster_ip_range: flags
                .service_cluster_ip_range
                .clone()
                .or(file.service_cluster_ip_range),
            service_proxy: flags.service_proxy.or(file.service_proxy).unwrap_or(true),
        })
    }

    /// The filesystem path of the CRI socket.
    pub fn runtime_socket(&self) -> PathBuf {
        runtime_socket_path(&self.container_runtime_endpoint).unwrap_or_default()
    }
}

/// `clusterCIDR` as an IPv4 network; host bits must be zero, so a typo is not silently
/// widened or narrowed.
pub fn parse_cluster_cidr(text: &str) -> Result<ipnet::Ipv4Net, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        field: "clusterCIDR",
        message,
    };
    let net: ipnet::Ipv4Net = text
        .parse()
        .map_err(|_| invalid(format!("{text:?} is not an IPv4 CIDR like 10.244.0.0/16")))?;
    if net.trunc() != net {
        return Err(invalid(format!(
            "{text:?} has host bits set; did you mean {}?",
            net.trunc()
        )));
    }
    Ok(net)
}

/// The socket path of a `unix://` endpoint (a bare absolute path is accepted too, as the
/// kubelet does).
pub fn runtime_socket_path(endpoint: &str) -> Result<PathBuf, ConfigError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(ConfigError::Invalid {
            field: "containerRuntimeEndpoint",
            message: format!("{endpoint:?} is not unix:///absolute/path"),
        })
    }
}

fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |s| s.trim().to_owned())
}

/// Node names are DNS-1123 subdomains.
fn validate_node_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            field: "nodeName",
            message: format!("{name:?} is not a lowercase DNS-1123 subdomain"),
        })
    }
}

/// `a=1,b=2` into a map; an entry without `=` is an error.
fn parse_key_values(
    text: &str,
    field: &'static str,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            return Err(ConfigError::Invalid {
                field,
                message: format!("{item:?} is not key=value"),
            });
        };
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

fn parse_resource_list(
    field: &'static str,
    list: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, Quantity>, ConfigError> {
    list.iter()
        .map(|(resource, value)| {
            let q = Quantity::parse(value).map_err(|source| ConfigError::Quantity {
                field,
                resource: resource.clone(),
                source,
            })?;
            Ok((resource.clone(), q))
        })
        .collect()
}

/// `key[=value]:Effect`, as the kubelet's `--register-with-taints`.
fn parse_taint(text: &str) -> Result<Taint, ConfigError> {
    let Some((kv, effect)) = text.rsplit_once(':') else {
        return Err(ConfigError::Invalid {
            field: "registerWithTaints",
            message: format!("{text:?} is not key[=value]:Effect"),
        });
    };
    let (key, value) = match kv.split_once('=') {
        Some((k, v)) => (k.to_owned(), Some(v.to_owned())),
        None => (kv.to_owned(), None),
    };
    taint_from_parts(key, value, effect)
}

fn taint_from_parts(
    key: String,
    value: Option<String>,
    effect: &str,
) -> Result<Taint, ConfigError> {
    let effect = match effect {
        "NoSchedule" => TaintEffect::NoSchedule,
        "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
        "NoExecute" => TaintEffect::NoExecute,
        other => {
            return Err(ConfigError::Invalid {
                field: "registerWithTaints",
                message: format!(
                    "effect {other:?} is not NoSchedule, PreferNoSchedule or NoExecute"
                ),
            });
        }
    };
    if key.is_empty() {
        return Err(ConfigError::Invalid {
            field: "registerWithTaints",
            message: "taint key is empty".into(),
        });
    }
    Ok(Taint {
        key,
        value: value.filter(|v| !v.is_empty()),
        effect,
    })
}

#[cfg(test)]
mod tests;
