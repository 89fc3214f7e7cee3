//! The scheduler and the ReplicaSet/Deployment/Endpoints controllers against the real API
//! server (in process, over an SQLite store in a temp dir): a Deployment becomes pods bound to
//! the nodes that fit, and a Service gets endpoints for them.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ferrolet_control_plane::api::Api;
use ferrolet_control_plane::api::allocator::Allocator;
use ferrolet_control_plane::api::handler::REGISTRY_PREFIX;
use ferrolet_control_plane::api::watchcache::WatchCache;
use ferrolet_control_plane::controllers::client::{ClusterClient, ResourceType};
use ferrolet_control_plane::controllers::deployment::DeploymentController;
use ferrolet_control_plane::controllers::local::LocalClient;
use ferrolet_control_plane::controllers::replicaset::ReplicaSetController;
use ferrolet_control_plane::scheduler::{DEFAULT_SCHEDULER_NAME, Scheduler};
use ferrolet_control_plane::storage::Store;
use ferrolet_control_plane::storage::sqlite::SqliteStore;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::{Value, json};

async fn api_server(dir: &tempfile::TempDir) -> Arc<dyn ClusterClient> {
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
    let cache = WatchCache::new(store.current_revision().await.unwrap());
    tokio::spawn(cache.clone().run(store.clone(), REGISTRY_PREFIX.to_owned()));
    let api = Api::new(
        store,
        cache,
        Allocator::new("10.96.0.0/16".parse().unwrap()),
    );
    api.bootstrap().await.unwrap();
    Arc::new(LocalClient::new(Arc::new(api)))
}

fn node(name: &str, cpu: &str, taint: bool) -> Value {
    let mut n = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name},
        "spec": {},
        "status": {"allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
                   "capacity": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
                   "conditions": [{"type": "Ready", "status": "True"}]},
    });
    if taint {
        n["spec"]["taints"] = json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]);
    }
    n
}

async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match check().await {
            Ok(()) => return,
            Err(state) if tokio::time::Instant::now() > deadline => {
                panic!("timed out waiting for {what}; last state: {state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_becomes_pods_bound_only_to_nodes_that_fit() {
    let dir = tempfile::tempdir().unwrap();
    let client = api_server(&dir).await;
    let node_rt = ResourceType::of::<Node>();
    for n in [
        node("small", "100m", false),
        node("tainted", "8", true),
        node("big", "8", false),
    ] {
        client.create(node_rt, None, n).await.unwrap();
    }
    let tasks = vec![
        tokio::spawn(Scheduler::new(client.clone(), DEFAULT_SCHEDULER_NAME).run()),
        tokio::spawn(ReplicaSetController::new(client.clone()).run(2)),
        tokio::spawn(DeploymentController::new(client.clone()).run(2)),
    ];
    let deploy = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "busybox",
                    "resources": {"requests": {"cpu": "500m"}}}]},
            },
        },
    });
    client
        .create(ResourceType::of::<Deployment>(), Some("default"), deploy)
        .await
        .unwrap();
    let pod_rt = ResourceType::of::<Pod>();
    wait_for("3 pods bound", || {
        let client = client.clone();
        async move {
            let pods = client
                .list(pod_rt, Some("default"))
                .await
                .map_err(|e| e.to_string())?;
            let nodes: Vec<String> = pods
                .items
                .iter()
                .map(|p| p["spec"]["nodeName"].as_str().unwrap_or("").to_owned())
                .collect();
            if pods.items.len() == 3 && nodes.iter().all(|n| !n.is_empty()) {
                Ok(())
            } else {
                Err(format!("{nodes:?}"))
            }
        }
    })
    .await;
    let pods = client.list(pod_rt, Some("default")).await.unwrap();
    for p in &pods.items {
        assert_eq!(
            p["spec"]["nodeName"], "big",
            "only big fits 500m untainted: {p}"
        );
        let owner = &p["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "ReplicaSet");
        assert!(p["metadata"]["labels"]["pod-template-hash"].is_string());
    }
    // A pod that fits nowhere gets the reason on its PodScheduled condition.
    let huge = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "huge", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "resources": {"requests": {"cpu": "64"}}}]}});
    client.create(pod_rt, Some("default"), huge).await.unwrap();
    wait_for("huge marked unschedulable", || {
        let client = client.clone();
        async move {
            let p = client.get(pod_rt, Some("default"), "huge").await.map_err(|e| e.to_string())?;
            let conds = p["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let c = conds.iter().find(|c| c["type"] == "PodScheduled");
            match c {
                Some(c) if c["reason"] == "Unschedulable" => {
                    assert_eq!(
                        c["message"],
                        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, 2 Insufficient cpu."
                    );
                    Ok(())
                }
                _ => Err(p["status"].to_string()),
            }
        }
    })
    .await;
    for t in tasks {
        t.abort();
    }
}
