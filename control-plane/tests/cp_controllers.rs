//! The controllers running inside the real `ferrolet-control-plane` binary, driven over HTTPS
//! and with kubectl, with a fake kubelet playing the nodes: each converges from a fresh start,
//! after a restart of the control plane mid-rollout, after a pod or ReplicaSet is deleted by
//! hand and after a node goes away; a rolling update keeps `replicas - maxUnavailable` pods
//! ready at every step.

mod cp_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cp_support::{
    ControlPlane, FakeKubelet, is_ready, namespace, node, node_of, nodes, pods, pods_in, test_dir,
    unique, wait_for,
};
use ferrolet_control_plane::controllers::client::{ClusterClient, ResourceType, WatchEvent};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Endpoints, Namespace, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(90);

fn deployments() -> ResourceType {
    ResourceType::of::<Deployment>()
}

fn replicasets() -> ResourceType {
    ResourceType::of::<ReplicaSet>()
}

fn deployment(ns: &str, name: &str, replicas: i32, image: &str) -> String {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image,
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "resources": {"requests": {"cpu": "100m"}}}]},
            },
        },
    })
    .to_string()
}

fn three_nodes(prefix: &str) -> Vec<Value> {
    (1..=3)
        .map(|i| node(&format!("{prefix}-{i}"), "4", json!({}), json!([])))
        .collect()
}

fn image_of(p: &Value) -> &str {
    p.pointer("/spec/containers/0/image")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn live(pods: &BTreeMap<String, Value>) -> Vec<&Value> {
    pods.values()
        .filter(|p| p.pointer("/metadata/deletionTimestamp").is_none())
        .collect()
}

/// Waits until the namespace holds exactly `n` pods, none terminating, all Ready, bound and
/// running `image`; returns them.
async fn wait_settled(
    client: &dyn ClusterClient,
    ns: &str,
    n: usize,
    image: &str,
) -> BTreeMap<String, Value> {
    wait_for(
        &format!("{n} ready pods running {image} in {ns}"),
        LONG,
        || async {
            let pods = pods_in(client, ns).await?;
            let ok = pods.len() == n
                && pods
                    .values()
                    .all(|p| is_ready(p) && node_of(p).is_some() && image_of(p) == image);
            let summary: Vec<String> = pods
                .values()
                .map(|p| {
                    format!(
                        "{} ready={} node={:?} image={} deleting={}",
                        p["metadata"]["name"],
                        is_ready(p),
                        node_of(p),
                        image_of(p),
                        p.pointer("/metadata/deletionTimestamp").is_some()
                    )
                })
                .collect();
            if ok {
                Ok(pods)
            } else {
                Err(summary.join("; "))
            }
        },
    )
    .await
}

/// Watches the namespace's pods and records, after every event, how many are Ready and not
/// terminating: the minimum seen and the number of events.
struct ReadyTracker {
    seen: Arc<Mutex<(usize, usize)>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyTracker {
    async fn start(client: Arc<dyn ClusterClient>, ns: &str) -> Self {
        let list = client.list(pods(), Some(ns)).await.expect("list pods");
        let mut state: BTreeMap<String, Value> = list
            .items
            .into_iter()
            .map(|p| (p["metadata"]["name"].as_str().unwrap_or("").to_owned(), p))
            .collect();
        let ready = |s: &BTreeMap<String, Value>| s.values().filter(|p| is_ready(p)).count();
        let seen = Arc::new(Mutex::new((ready(&state), 0)));
        let mut stream = client
            .watch(pods(), Some(ns), &list.resource_version)
            .await
            .expect("watch pods");
        let out = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Some(ev) = stream.next().await {
                let ev = ev.expect("the pod watch of the tracker must not fail");
                let (p, gone) = match ev {
                    WatchEvent::Added(p) | WatchEvent::Modified(p) => (p, false),
                    WatchEvent::Deleted(p) => (p, true),
                    WatchEvent::Bookmark(_) => continue,
                };
                let name = p["metadata"]["name"].as_str().unwrap_or("").to_owned();
                if gone {
                    state.remove(&name);
                } else {
                    state.insert(name, p);
                }
                let mut s = out.lock().expect("lock");
                s.0 = s.0.min(ready(&state));
                s.1 += 1;
            }
        });
        ReadyTracker { seen, task }
    }

    /// (minimum ready pods seen, events seen)
    fn stop(self) -> (usize, usize) {
        self.task.abort();
        *self.seen.lock().expect("lock")
    }
}

async fn replicasets_of(client: &dyn ClusterClient, ns: &str) -> Vec<Value> {
    client
        .list(replicasets(), Some(ns))
        .await
        .expect("list replicasets")
        .items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_rolls_out_updates_and_undoes_without_dropping_below_min_ready() {
    let dir = test_dir();
    let cp = ControlPlane::start_in(dir.path(), &[]).await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    let _kubelet = FakeKubelet::start(
        Arc::clone(&client),
        three_nodes(&unique("roll")),
        Duration::from_millis(300),
    )
    .await;
    let ns = unique("roll");
    namespace(client.as_ref(), &ns).await;
    cp.apply(&deployment(&ns, "web", 4, "busybox:1"));
    let first = wait_settled(client.as_ref(), &ns, 4, "busybox:1").await;
    let spread: std::collections::BTreeSet<&str> = first.values().filter_map(node_of).collect();
    assert_eq!(spread.len(), 3, "4 pods of one owner spread over 3 nodes");
    cp.kubectl(&[
        "-n",
        &ns,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=60s",
    ]);

    // A Service over the pods: Endpoints and an EndpointSlice with every ready pod's IP.
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": ns},
            "spec": {"selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}})
        .to_string(),
    );
    let want_ips: std::collections::BTreeSet<String> = first
        .values()
        .map(|p| p["status"]["podIP"].as_str().unwrap_or("").to_owned())
        .collect();
    wait_for(
        "Endpoints and EndpointSlice of the Service",
        LONG,
        || async {
            let ep = client
                .get(ResourceType::of::<Endpoints>(), Some(&ns), "web")
                .await
                .map_err(|e| e.to_string())?;
            let ips: std::collections::BTreeSet<String> = ep
                .pointer("/subsets/0/addresses")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|a| a["ip"].as_str().unwrap_or("").to_owned())
                .collect();
            let port = ep
                .pointer("/subsets/0/ports/0/port")
                .and_then(Value::as_i64);
            let slices = client
                .list(ResourceType::of::<EndpointSlice>(), Some(&ns))
                .await
                .map_err(|e| e.to_string())?;
            let slice_ips: std::collections::BTreeSet<String> = slices
                .items
                .iter()
                .filter(|s| {
                    s.pointer("/metadata/labels/kubernetes.io~1service-name") == Some(&json!("web"))
                })
                .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                .filter(|e| e.pointer("/conditions/ready") == Some(&json!(true)))
                .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                .map(|a| a.as_str().unwrap_or("").to_owned())
                .collect();
            if ips == want_ips && slice_ips == want_ips && port == Some(8080) {
                Ok(())
            } else {
                Err(format!(
                    "endpoints {ips:?} port {port:?}, slices {slice_ips:?}, want {want_ips:?}"
                ))
            }
        },
    )
    .await;

    let tracker = ReadyTracker::start(Arc::clone(&client), &ns).await;
    cp.kubectl(&["-n", &ns, "set", "image", "deployment/web", "app=busybox:2"]);
    cp.kubectl(&[
        "-n",
        &ns,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=90s",
    ]);
    let second = wait_settled(client.as_ref(), &ns, 4, "busybox:2").await;
    assert!(
        second.keys().all(|k| !first.contains_key(k)),
        "every pod was replaced"
    );
    let history = cp.kubectl(&["-n", &ns, "rollout", "history", "deployment/web"]);
    assert!(
        history.contains('1') && history.contains('2'),
        "two revisions: {history}"
    );
    cp.kubectl(&["-n", &ns, "rollout", "undo", "deployment/web"]);
    cp.kubectl(&[
        "-n",
        &ns,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=90s",
    ]);
    wait_settled(client.as_ref(), &ns, 4, "busybox:1").await;
    let (min_ready, events) = tracker.stop();
    assert!(
        events >= 16,
        "the tracker saw both rollouts ({events} pod events)"
    );
    assert!(
        min_ready >= 3,
        "replicas 4 - maxUnavailable 1 = 3 pods must stay ready at every step; saw {min_ready}"
    );
    let rss = replicasets_of(client.as_ref(), &ns).await;
    assert_eq!(rss.len(), 2, "undo reuses the first ReplicaSet: {rss:?}");
    let d = client
        .get(deployments(), Some(&ns), "web")
        .await
        .expect("deployment");
    assert_eq!(d["status"]["readyReplicas"], 4, "{d}");
    assert_eq!(d["status"]["updatedReplicas"], 4, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_interrupted_by_a_control_plane_restart_finishes_without_extra_pods() {
    let dir = test_dir();
    let mut cp = ControlPlane::start_in(dir.path(), &[]).await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    // Slow readiness so that the rollout is still going when the control plane dies.
    let _kubelet = FakeKubelet::start(
        Arc::clone(&client),
        three_nodes(&unique("restart")),
        Duration::from_millis(1500),
    )
    .await;
    let ns = unique("restart");
    namespace(client.as_ref(), &ns).await;
    cp.apply(&deployment(&ns, "web", 4, "busybox:1"));
    wait_settled(client.as_ref(), &ns, 4, "busybox:1").await;
    cp.kubectl(&["-n", &ns, "set", "image", "deployment/web", "app=busybox:2"]);
    wait_for("the rollout to be under way", LONG, || async {
        let pods = pods_in(client.as_ref(), &ns).await?;
        let new = pods.values().filter(|p| image_of(p) == "busybox:2").count();
        let new_ready = pods
            .values()
            .filter(|p| image_of(p) == "busybox:2" && is_ready(p))
            .count();
        if new >= 1 && new_ready < 4 {
            Ok(())
        } else {
            Err(format!("{new} new pods, {new_ready} ready"))
        }
    })
    .await;
    cp.restart().await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    cp.kubectl(&[
        "-n",
        &ns,
        "rollout",
        "status",
        "deployment/web",
        "--timeout=90s",
    ]);
    wait_settled(client.as_ref(), &ns, 4, "busybox:2").await;
    let rss = replicasets_of(client.as_ref(), &ns).await;
    assert_eq!(rss.len(), 2, "no ReplicaSet duplicated across the restart");
    let sizes: Vec<i64> = rss
        .iter()
        .map(|r| r["spec"]["replicas"].as_i64().unwrap_or(-1))
        .collect();
    assert!(sizes.contains(&4) && sizes.contains(&0), "{sizes:?}");
    // Settled means settled: nothing more is created afterwards.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pods = pods_in(client.as_ref(), &ns).await.expect("pods");
    assert_eq!(live(&pods).len(), 4, "{:?}", pods.keys());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_and_replicasets_deleted_by_hand_are_replaced() {
    let dir = test_dir();
    let cp = ControlPlane::start_in(dir.path(), &[]).await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    let _kubelet = FakeKubelet::start(
        Arc::clone(&client),
        three_nodes(&unique("byhand")),
        Duration::from_millis(200),
    )
    .await;
    let ns = unique("byhand");
    namespace(client.as_ref(), &ns).await;
    cp.apply(&deployment(&ns, "web", 3, "busybox:1"));
    let before = wait_settled(client.as_ref(), &ns, 3, "busybox:1").await;
    let victim = before.keys().next().expect("a pod").clone();
    cp.kubectl(&["-n", &ns, "delete", "pod", &victim]);
    let after = wait_settled(client.as_ref(), &ns, 3, "busybox:1").await;
    assert!(!after.contains_key(&victim), "the deleted pod stays gone");
    assert_eq!(
        after.keys().filter(|k| !before.contains_key(*k)).count(),
        1,
        "exactly one replacement"
    );

    let rs = replicasets_of(client.as_ref(), &ns).await;
    assert_eq!(rs.len(), 1);
    let rs_name = rs[0]["metadata"]["name"].as_str().expect("name").to_owned();
    let rs_uid = rs[0]["metadata"]["uid"].as_str().expect("uid").to_owned();
    cp.kubectl(&["-n", &ns, "delete", "replicaset", &rs_name]);
    wait_for("a new ReplicaSet with fresh pods", LONG, || async {
        let rs = replicasets_of(client.as_ref(), &ns).await;
        let pods = pods_in(client.as_ref(), &ns).await?;
        let fresh = rs.len() == 1
            && rs[0]["metadata"]["uid"].as_str() != Some(rs_uid.as_str())
            && rs[0]["metadata"]["name"].as_str() == Some(rs_name.as_str());
        let new_pods = pods.len() == 3
            && pods
                .iter()
                .all(|(k, p)| !after.contains_key(k) && is_ready(p));
        if fresh && new_pods {
            Ok(())
        } else {
            Err(format!("replicasets {rs:?}; pods {:?}", pods.keys()))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_node_that_stops_renewing_its_lease_are_replaced_elsewhere() {
    let dir = test_dir();
    let cp = ControlPlane::start_in(
        dir.path(),
        &[
            "--node-monitor-grace-period=3s",
            "--node-monitor-period=1s",
            "--pod-eviction-timeout=2s",
        ],
    )
    .await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    let prefix = unique("lost");
    let (doomed, survivor) = (format!("{prefix}-a"), format!("{prefix}-b"));
    let kubelet = FakeKubelet::start(
        Arc::clone(&client),
        vec![
            node(&doomed, "4", json!({}), json!([])),
            node(&survivor, "4", json!({}), json!([])),
        ],
        Duration::from_millis(200),
    )
    .await;
    let ns = unique("lost");
    namespace(client.as_ref(), &ns).await;
    cp.apply(&deployment(&ns, "web", 2, "busybox:1"));
    let before = wait_settled(client.as_ref(), &ns, 2, "busybox:1").await;
    let on_doomed: Vec<String> = before
        .iter()
        .filter(|(_, p)| node_of(p) == Some(doomed.as_str()))
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(on_doomed.len(), 1, "one pod per node");

    kubelet.stop_lease(&doomed);
    wait_for("the lost node to be unreachable", LONG, || async {
        let n = client
            .get(nodes(), None, &doomed)
            .await
            .map_err(|e| e.to_string())?;
        let ready = n
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
            .map(|c| c["status"].clone());
        let tainted = n
            .pointer("/spec/taints")
            .and_then(Value::as_array)
            .is_some_and(|ts| {
                ts.iter().any(|t| {
                    t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute"
                })
            });
        if ready == Some(json!("Unknown")) && tainted {
            Ok(())
        } else {
            Err(format!("{n}"))
        }
    })
    .await;
    wait_for("the pod to be replaced on the live node", LONG, || async {
        let pods = pods_in(client.as_ref(), &ns).await?;
        let live_ready: Vec<&Value> = live(&pods).into_iter().filter(|p| is_ready(p)).collect();
        let evicted = pods
            .get(&on_doomed[0])
            .is_none_or(|p| p.pointer("/metadata/deletionTimestamp").is_some());
        if evicted
            && live_ready.len() == 2
            && live_ready
                .iter()
                .all(|p| node_of(p) == Some(survivor.as_str()))
        {
            Ok(())
        } else {
            Err(format!("{pods:?}"))
        }
    })
    .await;
    // The healthy node was left alone.
    let n = client.get(nodes(), None, &survivor).await.expect("node");
    assert!(
        n.pointer("/spec/taints")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty),
        "{n}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_get_a_service_account_and_are_emptied_on_delete_and_nodes_get_pod_cidrs() {
    let dir = test_dir();
    let cp = ControlPlane::start_in(
        dir.path(),
        &["--cluster-cidr=10.200.0.0/16", "--node-cidr-mask-size=24"],
    )
    .await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    let prefix = unique("ipam");
    let _kubelet = FakeKubelet::start(
        Arc::clone(&client),
        three_nodes(&prefix),
        Duration::from_millis(100),
    )
    .await;
    let cidrs = wait_for("a pod CIDR for every node", LONG, || async {
        let mut cidrs = BTreeMap::new();
        for i in 1..=3 {
            let name = format!("{prefix}-{i}");
            let n = client
                .get(nodes(), None, &name)
                .await
                .map_err(|e| e.to_string())?;
            let cidr = n
                .pointer("/spec/podCIDR")
                .and_then(Value::as_str)
                .ok_or(format!("{name} has none"))?;
            cidrs.insert(name, cidr.to_owned());
        }
        Ok(cidrs)
    })
    .await;
    let distinct: std::collections::BTreeSet<&String> = cidrs.values().collect();
    assert_eq!(distinct.len(), 3, "{cidrs:?}");
    for c in cidrs.values() {
        assert!(c.starts_with("10.200.") && c.ends_with("/24"), "{c}");
    }
    // A deleted node's range goes to the next node.
    let freed = cidrs[&format!("{prefix}-2")].clone();
    cp.kubectl(&["delete", "node", &format!("{prefix}-2")]);
    let late = format!("{prefix}-late");
    client
        .create(nodes(), None, node(&late, "1", json!({}), json!([])))
        .await
        .expect("node");
    wait_for("the late node to get the freed range", LONG, || async {
        let n = client
            .get(nodes(), None, &late)
            .await
            .map_err(|e| e.to_string())?;
        match n.pointer("/spec/podCIDR").and_then(Value::as_str) {
            Some(c) if c == freed => Ok(()),
            other => Err(format!("{other:?}, freed {freed}")),
        }
    })
    .await;

    let ns = unique("gone");
    cp.kubectl(&["create", "namespace", &ns]);
    wait_for("the default ServiceAccount", LONG, || async {
        client
            .get(ResourceType::of::<ServiceAccount>(), Some(&ns), "default")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    cp.apply(&deployment(&ns, "web", 2, "busybox:1"));
    cp.kubectl(&[
        "-n",
        &ns,
        "create",
        "configmap",
        "settings",
        "--from-literal=a=b",
    ]);
    wait_settled(client.as_ref(), &ns, 2, "busybox:1").await;
    cp.kubectl(&["delete", "namespace", &ns, "--timeout=90s"]);
    let out = cp.kubectl_output(&["get", "namespace", &ns]);
    assert!(!out.status.success(), "the namespace is gone");
    for rt in [pods(), deployments(), replicasets()] {
        let left = client.list(rt, Some(&ns)).await.expect("list").items;
        assert!(
            left.is_empty(),
            "{rt} left in a deleted namespace: {left:?}"
        );
    }
    let err = client
        .get(ResourceType::of::<Namespace>(), None, &ns)
        .await
        .expect_err("namespace deleted");
    assert!(err.is_not_found(), "{err}");
}
