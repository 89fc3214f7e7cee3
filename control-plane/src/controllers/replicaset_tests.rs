use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

use super::*;
use crate::controllers::client::{ClusterClient, ResourceType};
use crate::controllers::fake::{Action, FakeClient};

fn rs(replicas: i32) -> Value {
    json!({
        "metadata": {"name": "web", "namespace": "ns", "uid": "rs-uid", "generation": 2},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": "busybox"}]},
            },
        },
    })
}

fn owned_pod(name: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("{name}-uid"),
            "labels": {"app": "web"},
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web",
                "uid": "rs-uid", "controller": true}]},
        "spec": {"containers": [{"name": "c", "image": "busybox"}], "nodeName": "n1"},
        "status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": "True", "lastTransitionTime": "2026-01-01T00:00:10Z"}]},
    })
}

fn set(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, leaf) = pointer.rsplit_once('/').unwrap();
    let target = if parent.is_empty() {
        &mut v
    } else {
        v.pointer_mut(parent).unwrap()
    };
    match target {
        Value::Array(a) => a[leaf.parse::<usize>().unwrap()] = value,
        other => {
            other[leaf] = value;
        }
    }
    v
}

fn typed<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).unwrap()
}

fn pods(vs: Vec<Value>) -> Vec<Arc<Pod>> {
    vs.into_iter().map(|v| Arc::new(typed(v))).collect()
}

fn now() -> Timestamp {
    "2026-01-01T00:10:00Z".parse().unwrap()
}

#[test]
fn creates_the_missing_replicas() {
    let p = plan(&typed(rs(3)), &pods(vec![owned_pod("a")]), now(), true);
    assert_eq!(p.create, 2);
    assert!(p.delete.is_empty());
    assert_eq!(p.status.replicas, 1);
}

#[test]
fn waits_for_expectations_before_scaling() {
    let p = plan(&typed(rs(3)), &[], now(), false);
    assert_eq!(p.create, 0);
}

#[test]
fn deletes_the_least_valuable_pods_first() {
    let unscheduled = set(owned_pod("unscheduled"), "/spec/nodeName", json!(""));
    let not_ready = set(
        owned_pod("not-ready"),
        "/status/conditions/0/status",
        json!("False"),
    );
    let newer = set(
        owned_pod("newer"),
        "/status/conditions/0/lastTransitionTime",
        json!("2026-01-01T00:05:00Z"),
    );
    let all = pods(vec![owned_pod("old"), newer, not_ready, unscheduled]);
    let p = plan(&typed(rs(1)), &all, now(), true);
    let names: Vec<_> = p.delete.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["unscheduled", "not-ready", "newer"]);
}

#[test]
fn adopts_orphans_and_releases_children_that_stopped_matching() {
    let orphan = set(owned_pod("orphan"), "/metadata/ownerReferences", json!([]));
    let other_owner = set(
        owned_pod("theirs"),
        "/metadata/ownerReferences/0/uid",
        json!("someone-else"),
    );
    let relabeled = set(
        owned_pod("relabeled"),
        "/metadata/labels/app",
        json!("debug"),
    );
    let all = pods(vec![orphan, other_owner, relabeled]);
    let p = plan(&typed(rs(1)), &all, now(), true);
    assert_eq!(p.adopt, vec![("orphan".into(), "orphan-uid".into())]);
    assert_eq!(
        p.release,
        vec![("relabeled".into(), "relabeled-uid".into())]
    );
    assert_eq!(p.create, 0, "the adopted orphan counts");
    // A ReplicaSet being deleted adopts nothing.
    let dying = set(
        rs(1),
        "/metadata",
        json!({"name": "web", "namespace": "ns", "uid": "rs-uid",
        "deletionTimestamp": "2026-01-01T00:00:00Z"}),
    );
    let p = plan(
        &typed(dying),
        &pods(vec![set(
            owned_pod("o"),
            "/metadata/ownerReferences",
            json!([]),
        )]),
        now(),
        true,
    );
    assert!(p.adopt.is_empty());
}

#[test]
fn finished_and_terminating_pods_do_not_count() {
    let failed = set(owned_pod("failed"), "/status/phase", json!("Failed"));
    let terminating = set(
        owned_pod("terminating"),
        "/metadata/deletionTimestamp",
        json!("2026-01-01T00:00:00Z"),
    );
    let p = plan(
        &typed(rs(2)),
        &pods(vec![failed, terminating, owned_pod("ok")]),
        now(),
        true,
    );
    assert_eq!(p.create, 1);
    assert_eq!(p.status.replicas, 1);
}

#[test]
fn status_counts_ready_and_available_with_min_ready_seconds() {
    let rs_v = set(rs(2), "/spec/minReadySeconds", json!(60));
    let just_ready = set(
        owned_pod("fresh"),
        "/status/conditions/0/lastTransitionTime",
        json!("2026-01-01T00:09:30Z"),
    );
    let p = plan(
        &typed(rs_v),
        &pods(vec![owned_pod("old"), just_ready]),
        now(),
        true,
    );
    assert_eq!(p.status.replicas, 2);
    assert_eq!(p.status.ready_replicas, Some(2));
    assert_eq!(p.status.available_replicas, Some(1));
    assert_eq!(p.status.observed_generation, Some(2));
    assert_eq!(p.requeue_after, Some(Duration::from_secs(31)));
}

fn rs_rt() -> ResourceType {
    ResourceType::of::<ReplicaSet>()
}

fn pod_rt() -> ResourceType {
    ResourceType::of::<Pod>()
}

/// Feeds the controller what the watch would have shown.
async fn sync_caches(c: &ReplicaSetController, fake: &FakeClient) {
    let ps = fake.list(pod_rt(), None).await.unwrap().items;
    for p in ps {
        c.on_pod(Event::Applied(typed(p)));
    }
    let rss = fake.list(rs_rt(), None).await.unwrap().items;
    c.on_replicaset(Event::Restarted(rss.into_iter().map(typed).collect()));
}

fn creates(fake: &FakeClient) -> usize {
    fake.actions()
        .iter()
        .filter(|a| matches!(a, Action::Create { resource, .. } if resource == "pods"))
        .count()
}

#[tokio::test]
async fn reconcile_creates_owned_pods_once_despite_watch_lag() {
    let fake = FakeClient::new();
    fake.seed(rs_rt(), rs(3));
    let c = ReplicaSetController::new(Arc::new(fake.clone()) as Arc<dyn ClusterClient>);
    c.on_replicaset(Event::Restarted(vec![typed(
        fake.get(rs_rt(), Some("ns"), "web").await.unwrap(),
    )]));
    c.reconcile("ns/web").await.unwrap();
    assert_eq!(creates(&fake), 3);
    // The pod cache has not seen the creates yet: a second pass must not create more.
    c.reconcile("ns/web").await.unwrap();
    assert_eq!(creates(&fake), 3, "over-created during watch lag");
    sync_caches(&c, &fake).await;
    c.reconcile("ns/web").await.unwrap();
    assert_eq!(creates(&fake), 3);
    let pods = fake.objects(pod_rt());
    assert_eq!(pods.len(), 3);
    for p in &pods {
        assert!(p["metadata"]["name"].as_str().unwrap().starts_with("web-"));
        assert_eq!(p["metadata"]["labels"]["app"], "web");
        let owner = &p["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], "rs-uid");
        assert_eq!(owner["controller"], true);
    }
    let stored = fake.get(rs_rt(), Some("ns"), "web").await.unwrap();
    assert_eq!(stored["status"]["replicas"], 3);
    assert_eq!(stored["status"]["observedGeneration"], 2);
}

#[tokio::test]
async fn reconcile_scales_down_and_replaces_a_deleted_pod() {
    let fake = FakeClient::new();
    fake.seed(rs_rt(), rs(2));
    for n in ["a", "b", "c"] {
        fake.seed(pod_rt(), owned_pod(n));
    }
    let c = ReplicaSetController::new(Arc::new(fake.clone()) as Arc<dyn ClusterClient>);
    sync_caches(&c, &fake).await;
    c.reconcile("ns/web").await.unwrap();
    assert_eq!(fake.objects(pod_rt()).len(), 2);
    let deleted: Vec<_> = fake
        .actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Delete { name, opts, .. } => Some((name, opts.uid)),
            _ => None,
        })
        .collect();
    assert_eq!(deleted.len(), 1);
    assert_eq!(
        deleted[0].1.as_deref(),
        Some(format!("{}-uid", deleted[0].0).as_str()),
        "uid precondition"
    );
    // Watch shows the delete; then someone deletes another pod by hand.
    let gone = fake.objects(pod_rt());
    c.on_pod(Event::Deleted(typed(owned_pod(&deleted[0].0))));
    let victim: Pod = typed(gone[0].clone());
    fake.delete(
        pod_rt(),
        Some("ns"),
        victim.metadata.name.as_deref().unwrap(),
        Default::default(),
    )
    .await
    .unwrap();
    c.on_pod(Event::Deleted(victim));
    fake.clear_actions();
    c.reconcile("ns/web").await.unwrap();
    assert_eq!(creates(&fake), 1);
    assert_eq!(fake.objects(pod_rt()).len(), 2);
}

#[tokio::test]
async fn reconcile_adopts_an_orphan_instead_of_creating() {
    let fake = FakeClient::new();
    fake.seed(rs_rt(), rs(1));
    fake.seed(
        pod_rt(),
        set(owned_pod("orphan"), "/metadata/ownerReferences", json!([])),
    );
    let c = ReplicaSetController::new(Arc::new(fake.clone()) as Arc<dyn ClusterClient>);
    sync_caches(&c, &fake).await;
    c.reconcile("ns/web").await.unwrap();
    assert_eq!(creates(&fake), 0);
    let p = fake.get(pod_rt(), Some("ns"), "orphan").await.unwrap();
    assert_eq!(p["metadata"]["ownerReferences"][0]["uid"], "rs-uid");
}

#[tokio::test]
async fn a_failed_create_is_retried_not_stalled() {
    let fake = FakeClient::new();
    fake.seed(rs_rt(), rs(2));
    fake.fail_next_creates(1);
    let c = ReplicaSetController::new(Arc::new(fake.clone()) as Arc<dyn ClusterClient>);
    sync_caches(&c, &fake).await;
    assert!(c.reconcile("ns/web").await.is_err());
    c.reconcile("ns/web").await.unwrap();
    assert_eq!(fake.objects(pod_rt()).len(), 2);
}

#[tokio::test]
async fn the_run_loop_converges_through_watches() {
    let fake = FakeClient::new();
    fake.seed(rs_rt(), rs(4));
    let c = ReplicaSetController::new(Arc::new(fake.clone()) as Arc<dyn ClusterClient>);
    let task = tokio::spawn(c.run(2));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = fake.get(rs_rt(), Some("ns"), "web").await.unwrap();
        if fake.objects(pod_rt()).len() == 4 && st["status"]["replicas"] == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never converged: {st}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
    assert_eq!(fake.objects(pod_rt()).len(), 4);
}
