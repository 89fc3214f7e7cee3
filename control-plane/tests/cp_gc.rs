//! The garbage collector inside the real `ferrolet-control-plane` binary, driven by
//! `kubectl delete --cascade=background|foreground|orphan` on Deployments whose ReplicaSets and
//! pods the controllers made.

mod cp_support;

use std::sync::Arc;
use std::time::Duration;

use cp_support::{
    ControlPlane, FakeKubelet, is_ready, namespace, node, pods, pods_in, test_dir, unique, wait_for,
};
use ferrolet_control_plane::controllers::client::{
    ClientError, ClusterClient, PatchKind, ResourceType,
};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(90);
const HOLD: &str = "example.com/hold";

fn deployment(ns: &str) -> String {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            },
        },
    })
    .to_string()
}

async fn list(client: &dyn ClusterClient, rt: ResourceType, ns: &str) -> Vec<Value> {
    client.list(rt, Some(ns)).await.expect("list").items
}

async fn deployed(cp: &ControlPlane, client: &dyn ClusterClient, ns: &str) {
    namespace(client, ns).await;
    cp.apply(&deployment(ns));
    wait_for("2 ready pods", LONG, || async {
        let pods = pods_in(client, ns).await?;
        (pods.len() == 2 && pods.values().all(is_ready))
            .then_some(())
            .ok_or_else(|| format!("{:?}", pods.keys()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_delete_cascades_in_the_background_foreground_or_orphans() {
    let dir = test_dir();
    let cp = ControlPlane::start_in(dir.path(), &["--garbage-collector-period=1s"]).await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    let prefix = unique("gc");
    let _kubelet = FakeKubelet::start(
        Arc::clone(&client),
        vec![
            node(&format!("{prefix}-1"), "4", json!({}), json!([])),
            node(&format!("{prefix}-2"), "4", json!({}), json!([])),
        ],
        Duration::from_millis(100),
    )
    .await;
    let deployments = ResourceType::of::<Deployment>();
    let replicasets = ResourceType::of::<ReplicaSet>();

    // Background: the Deployment goes at once, its ReplicaSet and pods after.
    let ns = unique("bg");
    deployed(&cp, client.as_ref(), &ns).await;
    cp.kubectl(&[
        "-n",
        &ns,
        "delete",
        "deployment",
        "web",
        "--cascade=background",
    ]);
    let err = client
        .get(deployments, Some(&ns), "web")
        .await
        .expect_err("gone");
    assert!(err.is_not_found(), "{err}");
    wait_for("ReplicaSet and pods collected", LONG, || async {
        let rs = list(client.as_ref(), replicasets, &ns).await;
        let pods = list(client.as_ref(), pods(), &ns).await;
        (rs.is_empty() && pods.is_empty())
            .then_some(())
            .ok_or_else(|| format!("{} replicasets, {} pods", rs.len(), pods.len()))
    })
    .await;

    // Foreground: the Deployment waits, deleting, until every dependent is gone. One pod holds
    // a finalizer of its own, so the wait is observable.
    let ns = unique("fg");
    deployed(&cp, client.as_ref(), &ns).await;
    let held = pods_in(client.as_ref(), &ns)
        .await
        .expect("pods")
        .into_keys()
        .next()
        .expect("a pod");
    client
        .patch(
            pods(),
            Some(&ns),
            &held,
            None,
            PatchKind::Merge,
            json!({"metadata": {"finalizers": [HOLD]}}),
        )
        .await
        .expect("hold the pod");
    cp.kubectl(&[
        "-n",
        &ns,
        "delete",
        "deployment",
        "web",
        "--cascade=foreground",
        "--wait=false",
    ]);
    wait_for("the held pod to be deleting", LONG, || async {
        let p = client
            .get(pods(), Some(&ns), &held)
            .await
            .map_err(|e| e.to_string())?;
        p.pointer("/metadata/deletionTimestamp")
            .map(|_| ())
            .ok_or_else(|| format!("{}", p["metadata"]))
    })
    .await;
    wait_for("every other pod gone", LONG, || async {
        let n = list(client.as_ref(), pods(), &ns).await.len();
        (n == 1).then_some(()).ok_or_else(|| format!("{n} pods"))
    })
    .await;
    let d = client
        .get(deployments, Some(&ns), "web")
        .await
        .expect("still there");
    assert!(d.pointer("/metadata/deletionTimestamp").is_some(), "{d}");
    assert_eq!(
        d["metadata"]["finalizers"],
        json!(["foregroundDeletion"]),
        "{d}"
    );
    let rs = list(client.as_ref(), replicasets, &ns).await;
    assert_eq!(rs.len(), 1, "the ReplicaSet waits for its pod too");
    assert!(rs[0].pointer("/metadata/deletionTimestamp").is_some());
    client
        .patch(
            pods(),
            Some(&ns),
            &held,
            None,
            PatchKind::Merge,
            json!({"metadata": {"finalizers": null}}),
        )
        .await
        .expect("release the pod");
    wait_for("Deployment, ReplicaSet and pods gone", LONG, || async {
        let d = client.get(deployments, Some(&ns), "web").await;
        let rs = list(client.as_ref(), replicasets, &ns).await;
        let pods = list(client.as_ref(), pods(), &ns).await;
        (d.as_ref().is_err_and(ClientError::is_not_found) && rs.is_empty() && pods.is_empty())
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "deployment {:?}, {} rs, {} pods",
                    d.is_ok(),
                    rs.len(),
                    pods.len()
                )
            })
    })
    .await;

    // Orphan: the Deployment goes, its ReplicaSet stays without an owner and keeps its pods.
    let ns = unique("orphan");
    deployed(&cp, client.as_ref(), &ns).await;
    let before = pods_in(client.as_ref(), &ns).await.expect("pods");
    cp.kubectl(&["-n", &ns, "delete", "deployment", "web", "--cascade=orphan"]);
    wait_for(
        "the Deployment gone and its ReplicaSet orphaned",
        LONG,
        || async {
            let d = client.get(deployments, Some(&ns), "web").await;
            let rs = list(client.as_ref(), replicasets, &ns).await;
            let orphaned = rs.len() == 1
                && rs[0]
                    .pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_none_or(Vec::is_empty);
            (d.is_err() && orphaned)
                .then_some(())
                .ok_or_else(|| format!("{rs:?}"))
        },
    )
    .await;
    let after = pods_in(client.as_ref(), &ns).await.expect("pods");
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>(),
        "the pods stay"
    );
    assert!(after.values().all(is_ready));
    // The orphaned ReplicaSet still works: a pod deleted by hand is replaced.
    let victim = after.keys().next().expect("pod").clone();
    cp.kubectl(&["-n", &ns, "delete", "pod", &victim]);
    wait_for(
        "a replacement from the orphaned ReplicaSet",
        LONG,
        || async {
            let pods = pods_in(client.as_ref(), &ns).await?;
            (pods.len() == 2 && !pods.contains_key(&victim) && pods.values().all(is_ready))
                .then_some(())
                .ok_or_else(|| format!("{:?}", pods.keys()))
        },
    )
    .await;
}
