//! Node lifecycle: a node whose Lease (in `kube-node-lease`) has not been renewed within the
//! grace period is marked Ready=Unknown and tainted `node.kubernetes.io/unreachable`
//! (NoSchedule and NoExecute); its pods are evicted once their toleration of that taint runs
//! out, so their controllers replace them elsewhere. A renewed lease lifts the taints.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::cache::Cache;
use super::client::{ClientError, ClusterClient, DeleteOptions, Typed};

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// Timing knobs; flags make them short for tests.
#[derive(Debug, Clone, Copy)]
pub struct LifecycleConfig {
    /// `--node-monitor-grace-period`
    pub grace_period: Duration,
    /// How long pods without their own toleration stay on an unreachable node.
    pub default_toleration: Duration,
    pub check_every: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            grace_period: Duration::from_secs(40),
            default_toleration: Duration::from_secs(300),
            check_every: Duration::from_secs(5),
        }
    }
}

/// What a node needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeVerdict {
    Healthy,
    /// Mark Unknown and taint.
    Unreachable,
    /// Was unreachable, lease renewed: lift the taints.
    Recovered,
}

fn unreachable_taint(node: &Node) -> Option<&Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .and_then(|ts| {
            ts.iter()
                .find(|t| t.key == UNREACHABLE && t.effect == "NoExecute")
        })
}

/// When the node last showed a sign of life: its lease renewal, else its Ready heartbeat,
/// else its creation.
pub fn last_heartbeat(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    let lease_time = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let ready_time = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
    [lease_time, ready_time, created]
        .into_iter()
        .flatten()
        .max()
}

pub fn verdict(node: &Node, lease: Option<&Lease>, now: Timestamp, grace: Duration) -> NodeVerdict {
    let stale = last_heartbeat(node, lease)
        .is_none_or(|t| now.as_second() - t.as_second() > grace.as_secs() as i64);
    match (stale, unreachable_taint(node).is_some()) {
        (true, false) => NodeVerdict::Unreachable,
        (false, true) => NodeVerdict::Recovered,
        _ => NodeVerdict::Healthy,
    }
}

/// How long `pod` may stay on a node tainted unreachable since `tainted_at`; `None` = forever.
pub fn eviction_due(pod: &Pod, tainted_at: Timestamp, default: Duration) -> Option<Timestamp> {
    let taint = Taint {
        key: UNREACHABLE.into(),
        effect: "NoExecute".into(),
        ..Taint::default()
    };
    let tols: Vec<_> = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| crate::scheduler::filters::tolerates(t, &taint))
        .collect();
    let secs = if tols.is_empty() {
        default.as_secs() as i64
    } else if tols.iter().any(|t| t.toleration_seconds.is_none()) {
        return None;
    } else {
        tols.iter()
            .filter_map(|t| t.toleration_seconds)
            .min()
            .unwrap_or(0)
            .max(0)
    };
    Timestamp::from_second(tainted_at.as_second() + secs).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error("node {node}: {action}: {source}")]
    Api {
        node: String,
        action: &'static str,
        #[source]
        source: ClientError,
    },
}

pub struct NodeLifecycleController {
    client: Arc<dyn ClusterClient>,
    pub nodes: Cache<Node>,
    pub leases: Cache<Lease>,
    pub pods: Cache<Pod>,
    config: LifecycleConfig,
}

impl NodeLifecycleController {
    pub fn new(client: Arc<dyn ClusterClient>, config: LifecycleConfig) -> Self {
        NodeLifecycleController {
            client,
            nodes: Cache::new(),
            leases: Cache::new(),
            pods: Cache::new(),
            config,
        }
    }

    /// Checks every node once at `now`.
    pub async fn check(&self, now: Timestamp) -> Result<(), LifecycleError> {
        let node_api = Typed::<Node>::new(self.client.as_ref());
        for node in self.nodes.list() {
            let name = node.metadata.name.clone().unwrap_or_default();
            let err = |action: &'static str| {
                let node = name.clone();
                move |source| LifecycleError::Api {
                    node: node.clone(),
                    action,
                    source,
                }
            };
            let lease = self.leases.get(&format!("{NODE_LEASE_NAMESPACE}/{name}"));
            let others: Vec<Taint> = node
                .spec
                .as_ref()
                .and_then(|s| s.taints.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|t| t.key != UNREACHABLE)
                .collect();
            match verdict(&node, lease.as_deref(), now, self.config.grace_period) {
                NodeVerdict::Unreachable => {
                    tracing::warn!(node = %name, "node stopped renewing its lease; marking unreachable");
                    let conditions: Vec<_> = node
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.clone())
                        .unwrap_or_default()
                        .into_iter()
                        .map(|mut c| {
                            if c.status != "Unknown" {
                                c.status = "Unknown".into();
                                c.reason = Some("NodeStatusUnknown".into());
                                c.message = Some("Kubelet stopped posting node status.".into());
                                c.last_transition_time = Some(Time(now));
                            }
                            c
                        })
                        .collect();
                    let patch = json!({"status": {"conditions": conditions}});
                    node_api
                        .merge_patch(None, &name, Some("status"), patch)
                        .await
                        .map_err(err("marking Ready=Unknown"))?;
                    let mut taints = others.clone();
                    for effect in ["NoSchedule", "NoExecute"] {
                        taints.push(Taint {
                            key: UNREACHABLE.into(),
                            effect: effect.into(),
                            time_added: Some(Time(now)),
                            value: None,
                        });
                    }
                    let updated = node_api
                        .merge_patch(None, &name, None, json!({"spec": {"taints": taints}}))
                        .await
                        .map_err(err("tainting unreachable"))?;
                    self.nodes.apply(&super::cache::Event::Applied(updated));
                }
                NodeVerdict::Recovered => {
                    tracing::info!(node = %name, "node renewed its lease again");
                    let updated = node_api
                        .merge_patch(None, &name, None, json!({"spec": {"taints": others}}))
                        .await
                        .map_err(err("lifting the unreachable taint"))?;
                    self.nodes.apply(&super::cache::Event::Applied(updated));
                }
                NodeVerdict::Healthy => {}
            }
            let Some(node) = self.nodes.get(&name) else {
                continue;
            };
            let Some(tainted_at) = unreachable_taint(&node)
                .and_then(|t| t.time_added.as_ref())
                .map(|t| t.0)
            else {
                continue;
            };
            for pod in self.pods.list() {
                let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(&name);
                if !on_node || pod.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let due = eviction_due(&pod, tainted_at, self.config.default_toleration);
                if due.is_some_and(|d| d <= now) {
                    let pod_name = pod.metadata.name.clone().unwrap_or_default();
                    tracing::info!(node = %name, pod = %pod_name, "evicting pod from unreachable node");
                    match Typed::<Pod>::new(self.client.as_ref())
                        .delete(
                            pod.metadata.namespace.as_deref(),
                            &pod_name,
                            DeleteOptions {
                                uid: pod.metadata.uid.clone(),
                                ..DeleteOptions::default()
                            },
                        )
                        .await
                    {
                        Ok(()) => {}
                        Err(e) if e.is_not_found() || e.is_conflict() => {}
                        Err(e) => return Err(err("evicting pod")(e)),
                    }
                }
            }
        }
        Ok(())
    }

    pub async fn run(self: Arc<Self>) {
        let backoff = Duration::from_secs(1);
        let c = Arc::clone(&self.client);
        let nodes = self.nodes.clone();
        tokio::spawn(super::cache::reflect::<Node>(
            Arc::clone(&c),
            None,
            backoff,
            move |ev| {
                nodes.apply(&ev);
            },
        ));
        let leases = self.leases.clone();
        tokio::spawn(super::cache::reflect::<Lease>(
            Arc::clone(&c),
            Some(NODE_LEASE_NAMESPACE.into()),
            backoff,
            move |ev| {
                leases.apply(&ev);
            },
        ));
        let pods = self.pods.clone();
        tokio::spawn(super::cache::reflect::<Pod>(c, None, backoff, move |ev| {
            pods.apply(&ev);
        }));
        loop {
            tokio::time::sleep(self.config.check_every).await;
            if let Err(e) = self.check(super::pods::now()).await {
                tracing::warn!(error = %e, "node lifecycle check failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::cache::Event;
    use crate::controllers::client::ResourceType;
    use crate::controllers::fake::FakeClient;
    use serde_json::Value;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn node() -> Value {
        json!({"metadata": {"name": "n1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}})
    }

    fn lease(renew: &str) -> Lease {
        serde_json::from_value(
            json!({"metadata": {"name": "n1", "namespace": NODE_LEASE_NAMESPACE},
            "spec": {"holderIdentity": "n1", "renewTime": renew}}),
        )
        .unwrap()
    }

    fn pod(name: &str, tolerate: Option<i64>) -> Value {
        let mut v = json!({"metadata": {"name": name, "namespace": "ns", "uid": format!("{name}-uid")},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]}});
        if let Some(s) = tolerate {
            v["spec"]["tolerations"] = json!([{"key": UNREACHABLE, "operator": "Exists",
                "effect": "NoExecute", "tolerationSeconds": s}]);
        }
        v
    }

    #[test]
    fn verdicts_follow_the_lease() {
        let n: Node = serde_json::from_value(node()).unwrap();
        let g = Duration::from_secs(40);
        let l = lease("2026-01-01T00:10:00Z");
        assert_eq!(
            verdict(&n, Some(&l), ts("2026-01-01T00:10:30Z"), g),
            NodeVerdict::Healthy
        );
        assert_eq!(
            verdict(&n, Some(&l), ts("2026-01-01T00:10:41Z"), g),
            NodeVerdict::Unreachable
        );
    }

    #[test]
    fn eviction_waits_for_the_toleration() {
        let at = ts("2026-01-01T00:00:00Z");
        let d = Duration::from_secs(300);
        let p = |t| serde_json::from_value::<Pod>(pod("p", t)).unwrap();
        assert_eq!(
            eviction_due(&p(None), at, d),
            Some(ts("2026-01-01T00:05:00Z"))
        );
        assert_eq!(
            eviction_due(&p(Some(10)), at, d),
            Some(ts("2026-01-01T00:00:10Z"))
        );
        let mut forever: Pod = p(None);
        forever.spec.as_mut().unwrap().tolerations = Some(vec![
            serde_json::from_value(json!({"operator": "Exists"})).unwrap(),
        ]);
        assert_eq!(eviction_due(&forever, at, d), None);
    }

    #[tokio::test]
    async fn a_silent_node_is_tainted_its_pods_evicted_and_a_renewed_lease_lifts_the_taint() {
        let fake = FakeClient::new();
        let node_rt = ResourceType::of::<Node>();
        let pod_rt = ResourceType::of::<Pod>();
        fake.seed(node_rt, node());
        fake.seed(pod_rt, pod("quick", Some(10)));
        fake.seed(pod_rt, pod("default", None));
        let c = NodeLifecycleController::new(Arc::new(fake.clone()), LifecycleConfig::default());
        let sync_nodes = |c: &NodeLifecycleController, fake: &FakeClient| {
            let all = fake
                .objects(node_rt)
                .into_iter()
                .map(|v| serde_json::from_value(v).unwrap())
                .collect();
            c.nodes.apply(&Event::Restarted(all));
            let pods = fake
                .objects(pod_rt)
                .into_iter()
                .map(|v| serde_json::from_value(v).unwrap())
                .collect();
            c.pods.apply(&Event::Restarted(pods));
        };
        sync_nodes(&c, &fake);
        c.leases
            .apply(&Event::Applied(lease("2026-01-01T00:10:00Z")));
        let t0 = ts("2026-01-01T00:11:00Z");
        c.check(t0).await.unwrap();
        let n = fake.get(node_rt, None, "n1").await.unwrap();
        assert_eq!(n["status"]["conditions"][0]["status"], "Unknown");
        let taints = n["spec"]["taints"].as_array().unwrap();
        assert!(
            taints
                .iter()
                .any(|t| t["key"] == UNREACHABLE && t["effect"] == "NoExecute")
        );
        assert!(
            taints
                .iter()
                .any(|t| t["key"] == UNREACHABLE && t["effect"] == "NoSchedule")
        );
        assert_eq!(fake.objects(pod_rt).len(), 2, "nothing evicted at once");

        sync_nodes(&c, &fake);
        c.check(ts("2026-01-01T00:11:11Z")).await.unwrap();
        let left: Vec<_> = fake
            .objects(pod_rt)
            .iter()
            .map(|p| p["metadata"]["name"].clone())
            .collect();
        assert_eq!(left, [json!("default")], "the 10s toleration ran out");
        sync_nodes(&c, &fake);
        c.check(ts("2026-01-01T00:16:01Z")).await.unwrap();
        assert!(fake.objects(pod_rt).is_empty(), "the default 300s ran out");

        c.leases
            .apply(&Event::Applied(lease("2026-01-01T00:16:00Z")));
        sync_nodes(&c, &fake);
        c.check(ts("2026-01-01T00:16:05Z")).await.unwrap();
        let n = fake.get(node_rt, None, "n1").await.unwrap();
        assert_eq!(n["spec"]["taints"], json!([]));
    }
}
