//! This node in the API: registration (labels, taints), status (capacity, allocatable,
//! addresses, nodeInfo, conditions) reported on change and at least every report period,
//! and the Lease in `kube-node-lease` renewed every 10 seconds.

pub mod image_gc;
pub mod routes;
pub mod sysinfo;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity as ApiQuantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{Api, ApiError, Patch};
use crate::cni::Network;
use crate::config::{AgentConfig, Quantity};
use crate::cri::Runtime;

pub use sysinfo::SystemInfo;

/// A failed node registration or report.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("node {node}: {source}")]
    Api { node: String, source: ApiError },
}

/// The lease namespace, as upstream.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// How often the lease is renewed.
pub const LEASE_RENEW: Duration = Duration::from_secs(10);
/// Below this much available memory the node reports MemoryPressure.
const MEMORY_PRESSURE_BYTES: u64 = 100 * 1024 * 1024;
/// Below this share of free disk the node reports DiskPressure.
const DISK_PRESSURE_PERCENT: u64 = 10;
/// Above this share of pid_max in use the node reports PIDPressure.
const PID_PRESSURE_PERCENT: u64 = 90;

/// What the node's labels, taints and status are built from.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub max_pods: u32,
    pub reserved: BTreeMap<String, Quantity>,
    pub host_ips: Vec<String>,
    pub hostname: String,
    pub lease_duration_seconds: u32,
    pub update_frequency: Duration,
    pub report_frequency: Duration,
    pub root_dir: std::path::PathBuf,
    /// Port of the kubelet HTTP API, reported in `status.daemonEndpoints`.
    pub kubelet_port: u16,
}

impl NodeSettings {
    /// Settings from the agent config; `host_ips` are the node's addresses.
    pub fn from_config(config: &AgentConfig, host_ips: Vec<String>) -> NodeSettings {
        let mut reserved = config.system_reserved.clone();
        for (k, v) in &config.kube_reserved {
            let sum = reserved.get(k).copied().unwrap_or_default().millis() + v.millis();
            reserved.insert(
                k.clone(),
                Quantity::from_millis(u64::try_from(sum).unwrap_or(u64::MAX)),
            );
        }
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| config.node_name.clone(), |s| s.trim().to_owned());
        NodeSettings {
            name: config.node_name.clone(),
            labels: config.node_labels.clone(),
            taints: config
                .register_with_taints
                .iter()
                .map(|t| Taint {
                    key: t.key.clone(),
                    value: t.value.clone(),
                    effect: t.effect.as_str().to_owned(),
                    time_added: None,
                })
                .collect(),
            max_pods: config.max_pods,
            reserved,
            host_ips,
            hostname,
            lease_duration_seconds: config.node_lease_duration_seconds,
            update_frequency: config.node_status_update_frequency,
            report_frequency: config.node_status_report_frequency,
            root_dir: config.root_dir.clone(),
            kubelet_port: config.port,
        }
    }
}

/// The kernel architecture as Kubernetes names it.
pub fn kube_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// The labels a node registers with: the well-known ones plus the configured ones.
pub fn node_labels(settings: &NodeSettings) -> BTreeMap<String, String> {
    let mut labels = settings.labels.clone();
    labels.insert("kubernetes.io/hostname".into(), settings.name.clone());
    labels.insert("kubernetes.io/os".into(), "linux".into());
    labels.insert("kubernetes.io/arch".into(), kube_arch().into());
    labels.insert("beta.kubernetes.io/os".into(), "linux".into());
    labels.insert("beta.kubernetes.io/arch".into(), kube_arch().into());
    labels
}

/// The Node object to create.
pub fn node_object(settings: &NodeSettings) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(settings.name.clone()),
            labels: Some(node_labels(settings)),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: (!settings.taints.is_empty()).then(|| settings.taints.clone()),
            ..Default::default()
        }),
        status: None,
    }
}

fn q(text: String) -> ApiQuantity {
    ApiQuantity(text)
}

/// Capacity and allocatable (capacity minus system and kube reserved, never negative).
pub fn resources(
    settings: &NodeSettings,
    info: &SystemInfo,
) -> (BTreeMap<String, ApiQuantity>, BTreeMap<String, ApiQuantity>) {
    let capacity_raw: [(&str, u128); 4] = [
        ("cpu", u128::from(info.cpus) * 1000),
        ("memory", u128::from(info.memory_bytes) * 1000),
        ("ephemeral-storage", u128::from(info.disk_bytes) * 1000),
        ("pods", u128::from(settings.max_pods) * 1000),
    ];
    let fmt = |name: &str, millis: u128| -> ApiQuantity {
        if name == "cpu" && !millis.is_multiple_of(1000) {
            q(format!("{millis}m"))
        } else {
            q((millis / 1000).to_string())
        }
    };
    let mut capacity = BTreeMap::new();
    let mut allocatable = BTreeMap::new();
    for (name, millis) in capacity_raw {
        capacity.insert(name.to_owned(), fmt(name, millis));
        let reserved = settings.reserved.get(name).map_or(0, |r| r.millis());
        allocatable.insert(name.to_owned(), fmt(name, millis.saturating_sub(reserved)));
    }
    (capacity, allocatable)
}

/// Allocatable resources as quantities, by name, for `resourceFieldRef` limits a container
/// leaves unset.
pub fn allocatable(settings: &NodeSettings, info: &SystemInfo) -> BTreeMap<String, Quantity> {
    resources(settings, info)
        .1
        .into_iter()
        .filter_map(|(name, q)| Some((name, Quantity::parse(&q.0).ok()?)))
        .collect()
}

/// Condition (type, status, reason, message) tuples from the runtime and host state.
pub fn condition_states(
    info: &SystemInfo,
    runtime_ready: Result<(), String>,
) -> Vec<(&'static str, bool, &'static str, String)> {
    let memory = info.memory_available_bytes < MEMORY_PRESSURE_BYTES;
    let disk = info.disk_bytes > 0
        && info.disk_available_bytes * 100 < info.disk_bytes * DISK_PRESSURE_PERCENT;
    let pids = info.pid_max > 0 && info.processes * 100 > info.pid_max * PID_PRESSURE_PERCENT;
    let (ready, ready_reason, ready_message) = match runtime_ready {
        Ok(()) => (
            true,
            "KubeletReady",
            "ferrolet is posting ready status".to_owned(),
        ),
        Err(m) => (false, "KubeletNotReady", m),
    };
    vec![
        (
            "MemoryPressure",
            memory,
            if memory {
                "KubeletHasInsufficientMemory"
            } else {
                "KubeletHasSufficientMemory"
            },
            format!("{} bytes available", info.memory_available_bytes),
        ),
        (
            "DiskPressure",
            disk,
            if disk {
                "KubeletHasDiskPressure"
            } else {
                "KubeletHasNoDiskPressure"
            },
            format!("{} bytes available", info.disk_available_bytes),
        ),
        (
            "PIDPressure",
            pids,
            if pids {
                "KubeletHasInsufficientPID"
            } else {
                "KubeletHasSufficientPID"
            },
            format!("{} of {} PIDs in use", info.processes, info.pid_max),
        ),
        ("Ready", ready, ready_reason, ready_message),
    ]
}

/// Builds the node status; transition times are kept from `old` when a condition did not
/// change.
pub fn node_status(
    settings: &NodeSettings,
    info: &SystemInfo,
    runtime_ready: Result<(), String>,
    runtime_version: &str,
    old: Option<&NodeStatus>,
    now: Timestamp,
) -> NodeStatus {
    let (capacity, allocatable) = resources(settings, info);
    let conditions = condition_states(info, runtime_ready)
        .into_iter()
        .map(|(kind, on, reason, message)| {
            let status = if on { "True" } else { "False" };
            let previous = old
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == kind));
            NodeCondition {
                type_: kind.to_owned(),
                status: status.to_owned(),
                reason: Some(reason.to_owned()),
                message: Some(message),
                last_heartbeat_time: Some(Time(now)),
                last_transition_time: match previous {
                    Some(p) if p.status == status => p.last_transition_time.clone(),
                    _ => Some(Time(now)),
                },
            }
        })
        .collect();
    let mut addresses: Vec<NodeAddress> = settings
        .host_ips
        .iter()
        .map(|ip| NodeAddress {
            type_: "InternalIP".into(),
            address: ip.clone(),
        })
        .collect();
    addresses.push(NodeAddress {
        type_: "Hostname".into(),
        address: settings.hostname.clone(),
    });
    NodeStatus {
        capacity: Some(capacity),
        allocatable: Some(allocatable),
        conditions: Some(conditions),
        addresses: Some(addresses),
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(settings.kubelet_port),
            }),
        }),
        node_info: Some(NodeSystemInfo {
            architecture: kube_arch().into(),
            boot_id: info.boot_id.clone(),
            container_runtime_version: runtime_version.to_owned(),
            kernel_version: info.kernel_version.clone(),
            kube_proxy_version: String::new(),
            kubelet_version: concat!("v", env!("CARGO_PKG_VERSION"), "-ferrolet").into(),
            machine_id: info.machine_id.clone(),
            operating_system: "linux".into(),
            os_image: info.os_image.clone(),
            system_uuid: info.system_uuid.clone(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether `new` says something `old` did not, ignoring heartbeat times and small changes of
/// the numbers in condition messages.
pub fn status_changed(old: Option<&NodeStatus>, new: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        for c in s.conditions.iter_mut().flatten() {
            c.last_heartbeat_time = None;
            c.message = None;
        }
        s
    };
    old.is_none_or(|o| strip(o) != strip(new))
}

/// Registers the node and keeps its status and lease fresh.
pub struct NodeAgent<A, R, N> {
    pub api: Arc<A>,
    pub runtime: Arc<R>,
    pub network: Arc<N>,
    pub settings: NodeSettings,
}

impl<A: Api, R: Runtime, N: Network> NodeAgent<A, R, N> {
    fn err(&self, source: ApiError) -> NodeError {
        NodeError::Api {
            node: self.settings.name.clone(),
            source,
        }
    }

    /// Creates the Node, or makes an existing one carry our labels (and taints if it has
    /// none).
    pub async fn register(&self) -> Result<Node, NodeError> {
        let node = node_object(&self.settings);
        match self.api.create(None, &node).await {
            Ok(n) => {
                info!(node = %self.settings.name, "node registered");
                Ok(n)
            }
            Err(e) if e.is_conflict() => {
                let mut patch = serde_json::json!({
                    "metadata": {"labels": node_labels(&self.settings)}
                });
                if !self.settings.taints.is_empty() {
                    patch["spec"] = serde_json::json!({"taints": self.settings.taints});
                }
                let n = self
                    .api
                    .patch(None, &self.settings.name, None, &Patch::Merge(patch))
                    .await
                    .map_err(|e| self.err(e))?;
                info!(node = %self.settings.name, "node existed; labels reconciled");
                Ok(n)
            }
            Err(e) => Err(self.err(e)),
        }
    }

    async fn runtime_state(&self) -> (Result<(), String>, String) {
        let version = match self.runtime.version().await {
            Ok(v) => format!("{}://{}", v.runtime_name, v.runtime_version),
            Err(e) => {
                return (
                    Err(format!("container runtime is down: {e}")),
                    String::new(),
                );
            }
        };
        let ready = match self.runtime.status().await {
            Ok(conditions) => {
                let is = |kind: &str| conditions.iter().any(|c| c.r#type == kind && c.status);
                if !is("RuntimeReady") {
                    Err("container runtime is not ready".to_owned())
                } else if !is("NetworkReady") && !self.network.ready() {
                    Err("container runtime network not ready: no CNI configuration".to_owned())
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(format!("container runtime status check failed: {e}")),
        };
        (ready, version)
    }

    /// Patches the node status if it changed or `force`; returns the status reported.
    pub async fn report(
        &self,
        last: Option<&NodeStatus>,
        force: bool,
    ) -> Result<Option<NodeStatus>, NodeError> {
        let info = SystemInfo::read(&self.settings.root_dir);
        let (ready, version) = self.runtime_state().await;
        let status = node_status(
            &self.settings,
            &info,
            ready,
            &version,
            last,
            crate::api::now(),
        );
        if !force && !status_changed(last, &status) {
            return Ok(None);
        }
        let _: Node = self
            .api
            .patch(
                None,
                &self.settings.name,
                Some("status"),
                &Patch::Merge(serde_json::json!({ "status": status })),
            )
            .await
            .map_err(|e| self.err(e))?;
        Ok(Some(status))
    }

    /// Creates or renews this node's Lease.
    pub async fn renew_lease(&self, node_uid: Option<&str>) -> Result<(), NodeError> {
        let now = MicroTime(crate::api::now());
        let name = &self.settings.name;
        let patch = serde_json::json!({
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": self.settings.lease_duration_seconds,
                "renewTime": now,
            }
        });
        let patched: Result<Lease, ApiError> = self
            .api
            .patch(Some(LEASE_NAMESPACE), name, None, &Patch::Merge(patch))
            .await;
        match patched {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        namespace: Some(LEASE_NAMESPACE.into()),
                        owner_references: node_uid.map(|uid| {
                            vec![OwnerReference {
                                api_version: "v1".into(),
                                kind: "Node".into(),
                                name: name.clone(),
                                uid: uid.into(),
                                ..Default::default()
                            }]
                        }),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(name.clone()),
                        lease_duration_seconds: i32::try_from(self.settings.lease_duration_seconds)
                            .ok(),
                        renew_time: Some(now),
                        ..Default::default()
                    }),
                };
                self.api
                    .create(Some(LEASE_NAMESPACE), &lease)
                    .await
                    .map(|_| ())
                    .map_err(|e| self.err(e))
            }
            Err(e) => Err(self.err(e)),
        }
    }

    /// Registers (retrying), then renews the lease and reports status until shutdown.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let node = loop {
            match self.register().await {
                Ok(n) => break n,
                Err(e) => warn!(error = %e, "node registration failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        };
        let uid = node.metadata.uid.clone();
        let mut last: Option<NodeStatus> = None;
        let mut last_report = Instant::now();
        let mut next_lease = Instant::now();
        let mut next_status = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_lease {
                if let Err(e) = self.renew_lease(uid.as_deref()).await {
                    warn!(error = %e, "lease renewal failed");
                }
                next_lease = now + LEASE_RENEW;
            }
            if now >= next_status {
                let force = last.is_none()
                    || now.duration_since(last_report) >= self.settings.report_frequency;
                match self.report(last.as_ref(), force).await {
                    Ok(Some(s)) => {
                        last = Some(s);
                        last_report = now;
                    }
                    Ok(None) => {}
                    Err(e) => warn!(error = %e, "node status update failed"),
                }
                next_status = now + self.settings.update_frequency;
            }
            let wake = next_lease.min(next_status);
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests;
