use std::sync::Arc;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::controllers::client::{ClusterClient, ResourceType};
use crate::controllers::fake::FakeClient;

fn counts(name: &str, replicas: i32, available: i32) -> RsCounts {
    RsCounts {
        name: name.into(),
        replicas,
        available,
        actual: replicas,
    }
}

#[test]
fn surge_and_unavailable_numbers_and_percents() {
    let d = |strategy: Value, replicas: i32| -> Deployment {
        serde_json::from_value(json!({"metadata": {"name": "d"},
            "spec": {"replicas": replicas, "selector": {}, "template": {}, "strategy": strategy}}))
        .unwrap()
    };
    // Defaults 25%/25%: surge rounds up, unavailable down.
    assert_eq!(surge_and_unavailable(&d(json!({}), 10)), (3, 2));
    assert_eq!(
        surge_and_unavailable(&d(
            json!({"rollingUpdate": {"maxSurge": 2, "maxUnavailable": "50%"}}),
            5
        )),
        (2, 2)
    );
    // Both zero would never progress: one may be unavailable.
    assert_eq!(
        surge_and_unavailable(&d(
            json!({"rollingUpdate": {"maxSurge": 0, "maxUnavailable": "10%"}}),
            3
        )),
        (0, 1)
    );
    assert_eq!(
        resolve(Some(&IntOrString::String("bogus".into())), 10, true, "25%"),
        0
    );
}

#[test]
fn rolling_update_first_step_surges() {
    let out = rolling_update(3, 1, 0, &counts("new", 0, 0), &[counts("old", 3, 3)]);
    assert_eq!(out["new"], 1);
    assert_eq!(out["old"], 3, "nothing available to spare yet");
    // With maxUnavailable 1, an old pod goes at once.
    let out = rolling_update(3, 1, 1, &counts("new", 0, 0), &[counts("old", 3, 3)]);
    assert_eq!((out["new"], out["old"]), (1, 2));
}

#[test]
fn rolling_update_removes_unhealthy_old_pods_first() {
    let out = rolling_update(3, 0, 1, &counts("new", 1, 1), &[counts("old", 3, 1)]);
    // total 4, min available 2, new unavailable 0: may remove 2, both unhealthy.
    assert_eq!(out["old"], 1);
}

/// One simulated round: the ReplicaSet controllers converge pods to spec (new pods start
/// unavailable; removed pods go unavailable ones first), then `ready` new pods become available.
fn simulate(replicas: i32, surge: i32, unavailable: i32, old: i32, make_ready: i32) -> Vec<i32> {
    let mut new = counts("new", 0, 0);
    let mut olds = vec![counts("old", old, old)];
    let mut history = Vec::new();
    for _ in 0..200 {
        let target = rolling_update(replicas, surge, unavailable, &new, &olds);
        new.replicas = target["new"];
        for o in &mut olds {
            o.replicas = target[&o.name];
            o.available = o.available.min(o.replicas);
        }
        new.available = new.available.min(new.replicas);
        history.push(new.available + olds.iter().map(|o| o.available).sum::<i32>());
        new.available = (new.available + make_ready).min(new.replicas);
        if new.available == replicas && olds.iter().all(|o| o.replicas == 0) {
            return history;
        }
    }
    panic!("rollout did not finish: new {new:?} olds {olds:?}");
}

#[test]
fn rolling_update_finishes_and_never_drops_below_min_available() {
    for (replicas, surge, unav) in [
        (3, 1, 0),
        (3, 0, 1),
        (10, 3, 2),
        (5, 5, 0),
        (1, 1, 0),
        (4, 0, 4),
    ] {
        let h = simulate(replicas, surge, unav, replicas, 1);
        assert!(
            h.iter().all(|a| *a >= replicas - unav),
            "{replicas}/{surge}/{unav}: {h:?}"
        );
    }
}

proptest! {
    #[test]
    fn rolling_update_invariant(replicas in 1i32..30, surge in 0i32..10, unav in 0i32..10, ready in 1i32..5) {
        let unav = if surge == 0 && unav == 0 { 1 } else { unav.min(replicas) };
        let h = simulate(replicas, surge, unav, replicas, ready);
        prop_assert!(h.iter().all(|a| *a >= replicas - unav), "{:?}", h);
    }

    #[test]
    fn rolling_update_never_exceeds_surge(replicas in 1i32..30, surge in 0i32..10, old in 0i32..30, newr in 0i32..30) {
        let out = rolling_update(replicas, surge, 1, &counts("new", newr.min(replicas), 0), &[counts("old", old, old)]);
        let before = newr.min(replicas) + old;
        let after: i32 = out.values().sum();
        prop_assert!(after <= before.max(replicas + surge));
    }
}

#[test]
fn recreate_waits_for_old_pods_to_go() {
    let out = recreate(3, &counts("new", 0, 0), &[counts("old", 3, 3)]);
    assert_eq!((out["old"], out["new"]), (0, 0));
    let mut gone = counts("old", 0, 0);
    gone.actual = 0;
    let out = recreate(3, &counts("new", 0, 0), &[gone]);
    assert_eq!(out["new"], 3);
}

#[test]
fn template_hash_is_stable_safe_and_changes_with_the_template() {
    let t: PodTemplateSpec =
        serde_json::from_value(json!({"metadata": {"labels": {"app": "a"}}})).unwrap();
    let h = template_hash(&t, None);
    assert_eq!(h, template_hash(&t, None));
    assert!(h.bytes().all(|b| SAFE_ALPHABET.contains(&b)), "{h}");
    assert_ne!(h, template_hash(&t, Some(1)));
    let mut t2 = t.clone();
    t2.metadata
        .as_mut()
        .unwrap()
        .labels
        .as_mut()
        .unwrap()
        .insert("v".into(), "2".into());
    assert_ne!(h, template_hash(&t2, None));
    // The hash label itself does not make a template different.
    let mut t3 = t.clone();
    t3.metadata
        .as_mut()
        .unwrap()
        .labels
        .as_mut()
        .unwrap()
        .insert(HASH_LABEL.into(), h.clone());
    assert!(templates_equal(&t, &t3));
}

fn deploy(image: &str, replicas: i32) -> Value {
    json!({
        "metadata": {"name": "web", "namespace": "ns", "uid": "d-uid", "generation": 1},
        "spec": {
            "replicas": replicas,
            "revisionHistoryLimit": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "c", "image": image}]},
            },
        },
    })
}

fn d_rt() -> ResourceType {
    ResourceType::of::<Deployment>()
}

fn rs_rt() -> ResourceType {
    ResourceType::of::<ReplicaSet>()
}

async fn sync(c: &DeploymentController, fake: &FakeClient) {
    let ds = fake.list(d_rt(), None).await.unwrap().items;
    c.on_deployment(Event::Restarted(
        ds.into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect(),
    ));
    let rss = fake.list(rs_rt(), None).await.unwrap().items;
    c.on_replicaset(Event::Restarted(
        rss.into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect(),
    ));
}

/// Plays the ReplicaSet controller and kubelets: every set's pods exist and are available.
async fn make_all_available(fake: &FakeClient) {
    for rs in fake.objects(rs_rt()) {
        let n = rs["spec"]["replicas"].as_i64().unwrap();
        let name = rs["metadata"]["name"].as_str().unwrap().to_owned();
        let st = json!({"status": {"replicas": n, "readyReplicas": n, "availableReplicas": n}});
        fake.patch(
            rs_rt(),
            Some("ns"),
            &name,
            Some("status"),
            crate::controllers::client::PatchKind::Merge,
            st,
        )
        .await
        .unwrap();
    }
}

fn rs_by_image(fake: &FakeClient) -> Vec<(String, i64, String)> {
    let mut v: Vec<_> = fake
        .objects(rs_rt())
        .iter()
        .map(|r| {
            (
                r["spec"]["template"]["spec"]["containers"][0]["image"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                r["spec"]["replicas"].as_i64().unwrap(),
                r["metadata"]["annotations"][REVISION]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn rollout_then_undo_through_the_api() {
    let fake = FakeClient::new();
    fake.seed(d_rt(), deploy("v1", 2));
    let c = DeploymentController::new(Arc::new(fake.clone()) as Arc<dyn ClusterClient>);
    sync(&c, &fake).await;
    c.reconcile("ns/web").await.unwrap();
    let rss = fake.objects(rs_rt());
    assert_eq!(rss.len(), 1);
    let hash = rss[0]["metadata"]["labels"][HASH_LABEL]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(rss[0]["metadata"]["name"], format!("web-{hash}"));
    assert_eq!(
        rss[0]["spec"]["selector"]["matchLabels"][HASH_LABEL],
        hash.as_str()
    );
    assert_eq!(rss[0]["spec"]["replicas"], 2);
    assert_eq!(rss[0]["metadata"]["ownerReferences"][0]["uid"], "d-uid");
    make_all_available(&fake).await;
    sync(&c, &fake).await;
    c.reconcile("ns/web").await.unwrap();
    let d = fake.get(d_rt(), Some("ns"), "web").await.unwrap();
    assert_eq!(d["status"]["updatedReplicas"], 2);
    assert_eq!(d["status"]["availableReplicas"], 2);
    assert_eq!(d["metadata"]["annotations"][REVISION], "1");

    // New image: roll step by step, never fewer than 2 available (maxUnavailable 0).
    fake.update(d_rt(), Some("ns"), "web", None, deploy("v2", 2))
        .await
        .unwrap();
    for _ in 0..10 {
        sync(&c, &fake).await;
        c.reconcile("ns/web").await.unwrap();
        let avail: i64 = fake
            .objects(rs_rt())
            .iter()
            .map(|r| {
                r["status"]["availableReplicas"]
                    .as_i64()
                    .unwrap_or(0)
                    .min(r["spec"]["replicas"].as_i64().unwrap())
            })
            .sum();
        assert!(avail >= 2, "availability dropped: {:?}", rs_by_image(&fake));
        make_all_available(&fake).await;
    }
    assert_eq!(
        rs_by_image(&fake),
        vec![("v1".into(), 0, "1".into()), ("v2".into(), 2, "2".into())]
    );

    // kubectl rollout undo puts the v1 template back: the v1 set becomes revision 3.
    fake.update(d_rt(), Some("ns"), "web", None, deploy("v1", 2))
        .await
        .unwrap();
    for _ in 0..10 {
        sync(&c, &fake).await;
        c.reconcile("ns/web").await.unwrap();
        make_all_available(&fake).await;
    }
    assert_eq!(
        rs_by_image(&fake),
        vec![("v1".into(), 2, "3".into()), ("v2".into(), 0, "2".into())]
    );
    let d = fake.get(d_rt(), Some("ns"), "web").await.unwrap();
    assert_eq!(d["metadata"]["annotations"][REVISION], "3");
    let progressing = d["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .unwrap()
        .clone();
    assert_eq!(progressing["reason"], "NewReplicaSetAvailable");

    // A third template: with revisionHistoryLimit 1 the oldest scaled-down set is removed.
    fake.update(d_rt(), Some("ns"), "web", None, deploy("v3", 2))
        .await
        .unwrap();
    for _ in 0..10 {
        sync(&c, &fake).await;
        c.reconcile("ns/web").await.unwrap();
        make_all_available(&fake).await;
    }
    let images: Vec<String> = rs_by_image(&fake).into_iter().map(|(i, _, _)| i).collect();
    assert_eq!(images, ["v1", "v3"]);
}

#[tokio::test]
async fn paused_deployments_do_not_roll() {
    let fake = FakeClient::new();
    fake.seed(d_rt(), deploy("v1", 2));
    let c = DeploymentController::new(Arc::new(fake.clone()) as Arc<dyn ClusterClient>);
    sync(&c, &fake).await;
    c.reconcile("ns/web").await.unwrap();
    let mut paused = deploy("v2", 3);
    paused["spec"]["paused"] = json!(true);
    fake.update(d_rt(), Some("ns"), "web", None, paused)
        .await
        .unwrap();
    sync(&c, &fake).await;
    c.reconcile("ns/web").await.unwrap();
    assert_eq!(
        rs_by_image(&fake),
        vec![("v1".into(), 3, "1".into())],
        "scaled, not rolled"
    );
    let d = fake.get(d_rt(), Some("ns"), "web").await.unwrap();
    let progressing = d["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Progressing")
        .unwrap()
        .clone();
    assert_eq!(progressing["reason"], "DeploymentPaused");
}

#[test]
fn progress_deadline_is_reported() {
    let mut d: Deployment = serde_json::from_value(deploy("v1", 2)).unwrap();
    d.spec.progress_deadline_seconds = Some(60);
    let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
    let rs: ReplicaSet = serde_json::from_value(json!({"metadata": {"name": "web-x"},
        "spec": {"replicas": 2, "selector": {}}, "status": {"replicas": 2, "availableReplicas": 0}})).unwrap();
    let st = status(&d, Some(&rs), &[&rs], true, t0);
    d.status = Some(st);
    let later: Timestamp = "2026-01-01T00:02:00Z".parse().unwrap();
    let st = status(&d, Some(&rs), &[&rs], false, later);
    let p = st
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_.as_deref() == Some("Progressing"))
        .unwrap();
    assert_eq!(
        (p.status.as_deref().unwrap(), p.reason.as_deref()),
        ("False", Some("ProgressDeadlineExceeded"))
    );
}
