//! Translation of a pod spec into CRI sandbox and container configs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ferrolet_cri::v1;
use k8s_openapi::api::core::v1::{Container, Pod};

use super::observed::labels;

/// Node-level facts the translation needs.
#[derive(Debug, Clone)]
pub struct PodContext {
    pub node_name: String,
    pub root_dir: PathBuf,
    /// Cgroup parent of all pods; each pod gets `<cgroup_root>/pod<uid>`.
    pub cgroup_root: String,
    pub cluster_dns: Vec<IpAddr>,
    pub cluster_domain: String,
    pub resolv_conf: PathBuf,
    pub host_ips: Vec<String>,
    /// Scheme of container IDs in statuses (`containerd`).
    pub runtime_name: String,
    /// The node's allocatable resources: what `resourceFieldRef` reads for a limit a
    /// container does not set.
    pub allocatable: std::collections::BTreeMap<String, crate::config::Quantity>,
}

/// Identity of a pod used everywhere below.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodKey {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodKey {
    pub fn of(pod: &Pod) -> PodKey {
        PodKey {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for PodKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl PodContext {
    /// The pod's own directory (volumes, CNI results) under the agent's root.
    pub fn pod_dir(&self, uid: &str) -> PathBuf {
        self.root_dir.join("pods").join(uid)
    }

    /// Where the runtime writes the pod's container logs.
    pub fn log_dir(&self, key: &PodKey) -> PathBuf {
        self.root_dir
            .join("logs/pods")
            .join(format!("{}_{}_{}", key.namespace, key.name, key.uid))
    }

    pub fn cgroup_parent(&self, uid: &str) -> String {
        format!("{}/pod{uid}", self.cgroup_root.trim_end_matches('/'))
    }
}

fn pod_labels(key: &PodKey) -> HashMap<String, String> {
    HashMap::from([
        (labels::POD_NAME.to_owned(), key.name.clone()),
        (labels::POD_NAMESPACE.to_owned(), key.namespace.clone()),
        (labels::POD_UID.to_owned(), key.uid.clone()),
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        ),
    ])
}

/// Labels that select every sandbox and container of the pod with `uid`.
pub fn uid_selector(uid: &str) -> HashMap<String, String> {
    HashMap::from([(labels::POD_UID.to_owned(), uid.to_owned())])
}

/// Labels that select every sandbox this agent made.
pub fn managed_selector() -> HashMap<String, String> {
    HashMap::from([(
        labels::MANAGED_BY.to_owned(),
        labels::MANAGED_BY_VALUE.to_owned(),
    )])
}

/// Parses resolv.conf text into CRI DNS config.
pub fn parse_resolv_conf(text: &str) -> v1::DnsConfig {
    let mut dns = v1::DnsConfig::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => dns.servers.extend(words.next().map(str::to_owned)),
            Some("search" | "domain") => {
                dns.searches = words.map(str::to_owned).collect();
            }
            Some("options") => dns.options.extend(words.map(str::to_owned)),
            _ => {}
        }
    }
    dns
}

/// DNS per the pod's dnsPolicy: cluster DNS for `ClusterFirst` (when the node has one),
/// the host's resolv.conf for `Default`, only the pod's own `dnsConfig` for `None`.
pub fn dns_config(pod: &Pod, ctx: &PodContext) -> v1::DnsConfig {
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let policy = spec.dns_policy.as_deref().unwrap_or("ClusterFirst");
    let cluster = match policy {
        "ClusterFirst" => !host_network,
        "ClusterFirstWithHostNet" => true,
        _ => false,
    } && !ctx.cluster_dns.is_empty();
    let mut dns = if policy == "None" {
        v1::DnsConfig::default()
    } else if cluster {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let d = &ctx.cluster_domain;
        v1::DnsConfig {
            servers: ctx.cluster_dns.iter().map(ToString::to_string).collect(),
            searches: vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()],
            options: vec!["ndots:5".into()],
        }
    } else {
        parse_resolv_conf(&std::fs::read_to_string(&ctx.resolv_conf).unwrap_or_default())
    };
    if let Some(extra) = &spec.dns_config {
        dns.servers
            .extend(extra.nameservers.iter().flatten().cloned());
        dns.searches
            .extend(extra.searches.iter().flatten().cloned());
        for o in extra.options.iter().flatten() {
            let Some(name) = &o.name else { continue };
            dns.options.push(match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.clone(),
            });
        }
    }
    dns
}

fn protocol(p: Option<&str>) -> i32 {
    match p {
        Some("UDP") => v1::Protocol::Udp as i32,
        Some("SCTP") => v1::Protocol::Sctp as i32,
        _ => v1::Protocol::Tcp as i32,
    }
}

/// The sandbox config of `pod`, attempt `attempt`.
pub fn sandbox_config(pod: &Pod, attempt: u32, ctx: &PodContext) -> v1::PodSandboxConfig {
    let key = PodKey::of(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let hostname = if host_network {
        String::new()
    } else {
        let mut h = spec.hostname.clone().unwrap_or_else(|| key.name.clone());
        h.truncate(63);
        h.trim_end_matches(['-', '.']).to_owned()
    };
    let port_mappings = spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let host_port = p.host_port.filter(|hp| *hp > 0)?;
            Some(v1::PortMapping {
                protocol: protocol(p.protocol.as_deref()),
                container_port: p.container_port,
                host_port,
                host_ip: p.host_ip.clone().unwrap_or_default(),
            })
        })
        .collect();
    let mut annotations: HashMap<String, String> = pod
        .metadata
        .annotations
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    annotations.insert(
        labels::GRACE_PERIOD.into(),
        spec.termination_grace_period_seconds
            .unwrap_or(30)
            .to_string(),
    );
    let mut all_labels: HashMap<String, String> = pod
        .metadata
        .labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    all_labels.extend(pod_labels(&key));
    let mode = |host: bool| {
        if host {
            v1::NamespaceMode::Node as i32
        } else {
            v1::NamespaceMode::Pod as i32
        }
    };
    v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: key.name.clone(),
            uid: key.uid.clone(),
            namespace: key.namespace.clone(),
            attempt,
        }),
        hostname,
        log_directory: ctx.log_dir(&key).display().to_string(),
        dns_config: Some(dns_config(pod, ctx)),
        port_mappings,
        labels: all_labels,
        annotations,
        linux: Some(v1::LinuxPodSandboxConfig {
            cgroup_parent: ctx.cgroup_parent(&key.uid),
            security_context: Some(v1::LinuxSandboxSecurityContext {
                namespace_options: Some(v1::NamespaceOption {
                    network: mode(host_network),
                    pid: if spec.host_pid.unwrap_or(false) {
                        v1::NamespaceMode::Node as i32
                    } else if spec.share_process_namespace.unwrap_or(false) {
                        v1::NamespaceMode::Pod as i32
                    } else {
                        v1::NamespaceMode::Container as i32
                    },
                    ipc: mode(spec.host_ipc.unwrap_or(false)),
                    ..Default::default()
                }),
                run_as_user: spec
                    .security_context
                    .as_ref()
                    .and_then(|s| s.run_as_user)
                    .map(|value| v1::Int64Value { value }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A volume made ready on the host, for container mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVolume {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The container config of `container` in `pod`, attempt `attempt`, with resolved `env`,
/// the host paths of the pod's volumes and those of `subPath` mounts (by mount path).
pub fn container_config(
    pod: &Pod,
    container: &Container,
    init: bool,
    attempt: u32,
    env: Vec<(String, String)>,
    volumes: &HashMap<String, HostVolume>,
    sub_paths: &HashMap<String, PathBuf>,
) -> v1::ContainerConfig {
    let key = PodKey::of(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let mut all_labels = pod_labels(&key);
    all_labels.insert(labels::CONTAINER_NAME.into(), container.name.clone());
    let annotations = HashMap::from([
        (labels::RESTART_COUNT.to_owned(), attempt.to_string()),
        (labels::INIT_CONTAINER.to_owned(), init.to_string()),
    ]);
    let vars: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let expand_all = |list: &Option<Vec<String>>| {
        list.iter()
            .flatten()
            .map(|s| expand(s, &vars))
            .collect::<Vec<_>>()
    };
    let mounts = container
        .volume_mounts
        .iter()
        .flatten()
        .filter_map(|m| {
            let volume = volumes.get(&m.name)?;
            let host_path = sub_paths
                .get(&m.mount_path)
                .cloned()
                .unwrap_or_else(|| volume.path.clone());
            Some(v1::Mount {
                container_path: m.mount_path.clone(),
                host_path: host_path.display().to_string(),
                readonly: volume.read_only || m.read_only.unwrap_or(false),
                ..Default::default()
            })
        })
        .collect();
    let sc = container.security_context.as_ref();
    let pod_sc = spec.security_context.as_ref();
    let resources = container_resources(container);
    v1::ContainerConfig {
        metadata: Some(v1::ContainerMetadata {
            name: container.name.clone(),
            attempt,
        }),
        image: Some(v1::ImageSpec {
            image: container.image.clone().unwrap_or_default(),
            ..Default::default()
        }),
        command: expand_all(&container.command),
        args: expand_all(&container.args),
        working_dir: container.working_dir.clone().unwrap_or_default(),
        envs: env
            .iter()
            .map(|(k, v)| v1::KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        mounts,
        labels: all_labels,
        annotations,
        log_path: format!("{}/{attempt}.log", container.name),
        stdin: container.stdin.unwrap_or(false),
        stdin_once: container.stdin_once.unwrap_or(false),
        tty: container.tty.unwrap_or(false),
        linux: Some(v1::LinuxContainerConfig {
            resources: Some(resources),
            security_context: Some(v1::LinuxContainerSecurityContext {
                privileged: sc.and_then(|s| s.privileged).unwrap_or(false),
                run_as_user: sc
                    .and_then(|s| s.run_as_user)
                    .or_else(|| pod_sc.and_then(|s| s.run_as_user))
                    .map(|value| v1::Int64Value { value }),
                run_as_group: sc
                    .and_then(|s| s.run_as_group)
                    .or_else(|| pod_sc.and_then(|s| s.run_as_group))
                    .map(|value| v1::Int64Value { value }),
                readonly_rootfs: sc
                    .and_then(|s| s.read_only_root_filesystem)
                    .unwrap_or(false),
                capabilities: sc
                    .and_then(|s| s.capabilities.as_ref())
                    .map(|c| v1::Capability {
                        add_capabilities: c.add.clone().unwrap_or_default(),
                        drop_capabilities: c.drop.clone().unwrap_or_default(),
                        ..Default::default()
                    }),
                namespace_options: Some(v1::NamespaceOption {
                    network: if spec.host_network.unwrap_or(false) {
                        v1::NamespaceMode::Node as i32
                    } else {
                        v1::NamespaceMode::Pod as i32
                    },
                    pid: if spec.host_pid.unwrap_or(false) {
                        v1::NamespaceMode::Node as i32
                    } else if spec.share_process_namespace.unwrap_or(false) {
                        v1::NamespaceMode::Pod as i32
                    } else {
                        v1::NamespaceMode::Container as i32
                    },
                    ipc: if spec.host_ipc.unwrap_or(false) {
                        v1::NamespaceMode::Node as i32
                    } else {
                        v1::NamespaceMode::Pod as i32
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

/// CPU shares, quota and memory limit from the container's requests and limits, computed as
/// the kubelet does (shares = millicores * 1024 / 1000, min 2; quota over a 100ms period).
pub fn container_resources(container: &Container) -> v1::LinuxContainerResources {
    use crate::config::Quantity;
    let get = |list: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
               name: &str| {
        list.and_then(|l| l.get(name))
            .and_then(|q| Quantity::parse(&q.0).ok())
    };
    let res = container.resources.as_ref();
    let requests = res.and_then(|r| r.requests.as_ref());
    let limits = res.and_then(|r| r.limits.as_ref());
    let cpu_request = get(requests, "cpu").or_else(|| get(limits, "cpu"));
    let cpu_limit = get(limits, "cpu");
    let memory_limit = get(limits, "memory");
    let shares = cpu_request.map_or(2, |q| (q.millis() * 1024 / 1000).max(2));
    let period: i64 = 100_000;
    v1::LinuxContainerResources {
        cpu_shares: i64::try_from(shares).unwrap_or(i64::MAX),
        cpu_period: if cpu_limit.is_some() { period } else { 0 },
        cpu_quota: cpu_limit.map_or(0, |q| {
            i64::try_from((q.millis() * 100_000 / 1000).max(1000)).unwrap_or(i64::MAX)
        }),
        memory_limit_in_bytes: memory_limit
            .map_or(0, |q| i64::try_from(q.units_ceil()).unwrap_or(i64::MAX)),
        ..Default::default()
    }
}

/// Expands `$(VAR)` from `vars`; `$$` escapes; unknown references stay as written, as the
/// kubelet does.
pub fn expand(text: &str, vars: &HashMap<&str, &str>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(')
            && let Some(end) = body.find(')')
        {
            let name = &body[..end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// Whether `path` is inside `dir` after normalising `..` lexically.
pub fn is_within(dir: &Path, path: &Path) -> bool {
    let mut parts: Vec<std::path::Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                if parts.pop().is_none() {
                    return false;
                }
            }
            std::path::Component::CurDir => {}
            other => parts.push(other),
        }
    }
    parts.iter().collect::<PathBuf>().starts_with(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_replaces_known_vars_keeps_unknown_and_unescapes() {
        let vars = HashMap::from([("A", "1"), ("B", "two")]);
        assert_eq!(expand("x$(A)y$(B)", &vars), "x1ytwo");
        assert_eq!(expand("$(C) $$(A) $", &vars), "$(C) $(A) $");
        assert_eq!(expand("$(A", &vars), "$(A");
    }

    #[test]
    fn resolv_conf_parses_servers_search_and_options() {
        let dns = parse_resolv_conf(
            "# c\nnameserver 10.0.0.1\nnameserver 10.0.0.2\nsearch a b\noptions ndots:2 edns0\n",
        );
        assert_eq!(dns.servers, ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(dns.searches, ["a", "b"]);
        assert_eq!(dns.options, ["ndots:2", "edns0"]);
    }

    #[test]
    fn paths_escaping_a_dir_are_caught() {
        let d = Path::new("/v/pods/u");
        assert!(is_within(d, Path::new("/v/pods/u/vol/a")));
        assert!(!is_within(d, Path::new("/v/pods/u/vol/../../../etc")));
        assert!(!is_within(d, Path::new("/v/pods/u/../u2")));
    }
}
