use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::controllers::client::{ClusterClient, ResourceType};
use crate::controllers::fake::{Action, FakeClient};

fn node(name: &str, cpu: &str, mem: &str) -> Value {
    json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {},
        "status": {
            "allocatable": {"cpu": cpu, "memory": mem, "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    })
}

fn pod(name: &str, cpu: &str) -> Value {
    json!({
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "i",
            "resources": {"requests": {"cpu": cpu, "memory": "64Mi"}}}]},
    })
}

fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    let (parent, leaf) = pointer.rsplit_once('/').unwrap();
    let mut cur = &mut v;
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        if cur.get(part).is_none() {
            cur[part] = json!({});
        }
        cur = cur.get_mut(part).unwrap();
    }
    cur[leaf] = value;
    v
}

fn cluster(nodes: &[Value], pods: &[Value]) -> ClusterState {
    let mut c = ClusterState::default();
    for n in nodes {
        c.set_node(serde_json::from_value::<Node>(n.clone()).unwrap());
    }
    for p in pods {
        c.set_pod(&serde_json::from_value::<Pod>(p.clone()).unwrap());
    }
    c
}

fn decide(p: &Value, c: &ClusterState) -> Decision {
    schedule(&serde_json::from_value::<Pod>(p.clone()).unwrap(), c)
}

/// Two nodes, identical except for the property under test: the pod must land on `good`.
fn assert_lands_on_good(bad: Value, good: Value, p: Value) {
    // Put the bad node first by name so a filter that does nothing would choose it.
    let bad = with(bad, "/metadata/name", json!("a-bad"));
    let good = with(good, "/metadata/name", json!("b-good"));
    assert_eq!(
        decide(&p, &cluster(&[bad.clone(), good], &[])),
        Decision::Bind("b-good".into())
    );
    match decide(&p, &cluster(&[bad], &[])) {
        Decision::Unschedulable(_) => {}
        other => panic!("pod must not land on the bad node, got {other:?}"),
    }
}

#[test]
fn not_ready_node_is_filtered() {
    let bad = with(
        node("x", "4", "8Gi"),
        "/status/conditions",
        json!([{"type": "Ready", "status": "False"}]),
    );
    assert_lands_on_good(bad, node("y", "4", "8Gi"), pod("p", "100m"));
    // A node with no Ready condition yet counts as unreachable.
    let unknown = with(node("x", "4", "8Gi"), "/status/conditions", json!([]));
    assert_lands_on_good(unknown, node("y", "4", "8Gi"), pod("p", "100m"));
}

#[test]
fn cordoned_node_is_filtered() {
    let bad = with(node("x", "4", "8Gi"), "/spec/unschedulable", json!(true));
    assert_lands_on_good(bad, node("y", "4", "8Gi"), pod("p", "100m"));
}

#[test]
fn untolerated_taints_are_filtered_and_tolerated_ones_are_not() {
    for effect in ["NoSchedule", "NoExecute"] {
        let bad = with(
            node("x", "4", "8Gi"),
            "/spec/taints",
            json!([{"key": "dedicated", "value": "gpu", "effect": effect}]),
        );
        assert_lands_on_good(bad.clone(), node("y", "4", "8Gi"), pod("p", "100m"));
        // Equal with the right value, and Exists, both tolerate it.
        for tol in [
            json!([{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": effect}]),
            json!([{"key": "dedicated", "operator": "Exists"}]),
            json!([{"operator": "Exists"}]),
        ] {
            let p = with(pod("p", "100m"), "/spec/tolerations", tol.clone());
            let c = cluster(&[with(bad.clone(), "/metadata/name", json!("a"))], &[]);
            assert_eq!(decide(&p, &c), Decision::Bind("a".into()), "{tol}");
        }
        // The wrong value does not.
        let p = with(
            pod("p", "100m"),
            "/spec/tolerations",
            json!([{"key": "dedicated", "value": "cpu", "effect": effect}]),
        );
        assert_lands_on_good(bad, node("y", "4", "8Gi"), p);
    }
    // PreferNoSchedule never filters.
    let soft = with(
        node("a", "4", "8Gi"),
        "/spec/taints",
        json!([{"key": "k", "effect": "PreferNoSchedule"}]),
    );
    assert_eq!(
        decide(&pod("p", "100m"), &cluster(&[soft], &[])),
        Decision::Bind("a".into())
    );
}

#[test]
fn node_selector_is_honoured() {
    let good = with(node("y", "4", "8Gi"), "/metadata/labels/disk", json!("ssd"));
    let p = with(
        pod("p", "100m"),
        "/spec/nodeSelector",
        json!({"disk": "ssd"}),
    );
    assert_lands_on_good(node("x", "4", "8Gi"), good, p);
}

fn affinity(op: &str, values: Value) -> Value {
    let mut expr = json!({"key": "zone", "operator": op});
    if !values.is_null() {
        expr["values"] = values;
    }
    with(
        pod("p", "100m"),
        "/spec/affinity",
        json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [expr]}]}}}),
    )
}

#[test]
fn required_node_affinity_operators() {
    let zone = |z: &str| with(node("n", "4", "8Gi"), "/metadata/labels/zone", json!(z));
    let bare = node("n", "4", "8Gi");
    assert_lands_on_good(zone("b"), zone("a"), affinity("In", json!(["a"])));
    assert_lands_on_good(zone("a"), zone("b"), affinity("NotIn", json!(["a"])));
    assert_lands_on_good(bare.clone(), zone("a"), affinity("Exists", Value::Null));
    assert_lands_on_good(zone("a"), bare, affinity("DoesNotExist", Value::Null));
    assert_lands_on_good(zone("3"), zone("9"), affinity("Gt", json!(["5"])));
    assert_lands_on_good(zone("9"), zone("3"), affinity("Lt", json!(["5"])));
}

#[test]
fn insufficient_resources_are_filtered() {
    assert_lands_on_good(node("x", "1", "8Gi"), node("y", "4", "8Gi"), pod("p", "2"));
    // What bound pods request counts against allocatable.
    let bound = with(pod("old", "3500m"), "/spec/nodeName", json!("a-bad"));
    let c = cluster(
        &[
            with(node("x", "4", "8Gi"), "/metadata/name", json!("a-bad")),
            with(node("y", "4", "8Gi"), "/metadata/name", json!("b-good")),
        ],
        &[bound],
    );
    assert_eq!(decide(&pod("p", "1"), &c), Decision::Bind("b-good".into()));
    // A finished pod holds nothing.
    let done = with(
        with(pod("old", "3500m"), "/spec/nodeName", json!("a")),
        "/status/phase",
        json!("Succeeded"),
    );
    let c = cluster(
        &[with(node("x", "4", "8Gi"), "/metadata/name", json!("a"))],
        &[done],
    );
    assert_eq!(decide(&pod("p", "1"), &c), Decision::Bind("a".into()));
}

#[test]
fn max_pods_is_a_limit() {
    let full = with(
        node("x", "4", "8Gi"),
        "/status/allocatable/pods",
        json!("1"),
    );
    let bound = with(pod("old", "10m"), "/spec/nodeName", json!("a-bad"));
    let c = cluster(
        &[
            with(full, "/metadata/name", json!("a-bad")),
            with(node("y", "4", "8Gi"), "/metadata/name", json!("b-good")),
        ],
        std::slice::from_ref(&bound),
    );
    assert_eq!(
        decide(&pod("p", "10m"), &c),
        Decision::Bind("b-good".into())
    );
}

#[test]
fn host_port_conflicts_are_filtered() {
    let ports = |ip: Option<&str>| {
        let mut port = json!({"containerPort": 80, "hostPort": 8080});
        if let Some(ip) = ip {
            port["hostIP"] = json!(ip);
        }
        let mut p = pod("p", "10m");
        p["spec"]["containers"][0]["ports"] = json!([port]);
        p
    };
    let holder = with(
        with(ports(None), "/metadata/name", json!("holder")),
        "/spec/nodeName",
        json!("a-bad"),
    );
    let nodes = [
        with(node("x", "4", "8Gi"), "/metadata/name", json!("a-bad")),
        with(node("y", "4", "8Gi"), "/metadata/name", json!("b-good")),
    ];
    let c = cluster(&nodes, std::slice::from_ref(&holder));
    assert_eq!(decide(&ports(None), &c), Decision::Bind("b-good".into()));
    // 0.0.0.0 conflicts with every address.
    assert_eq!(
        decide(&ports(Some("10.0.0.1")), &c),
        Decision::Bind("b-good".into())
    );
    // A different protocol does not conflict.
    let mut udp = ports(None);
    udp["spec"]["containers"][0]["ports"][0]["protocol"] = json!("UDP");
    let only_holder_node = cluster(&nodes[..1], std::slice::from_ref(&holder));
    assert_eq!(
        decide(&udp, &only_holder_node),
        Decision::Bind("a-bad".into())
    );
    assert!(matches!(
        decide(&ports(None), &only_holder_node),
        Decision::Unschedulable(m) if m.contains("didn't have free ports")
    ));
}

#[test]
fn the_message_counts_reasons_per_node() {
    let taint = with(
        node("c", "4", "8Gi"),
        "/spec/taints",
        json!([{"key": "node-role", "value": "master", "effect": "NoSchedule"}]),
    );
    let c = cluster(&[node("a", "1", "8Gi"), node("b", "1", "8Gi"), taint], &[]);
    assert_eq!(
        decide(&pod("p", "2"), &c),
        Decision::Unschedulable(
            "0/3 nodes are available: 1 node(s) had untolerated taint {node-role: master}, \
             2 Insufficient cpu."
                .into()
        )
    );
    assert_eq!(
        decide(&pod("p", "1"), &cluster(&[], &[])),
        Decision::Unschedulable("0/0 nodes are available.".into())
    );
}

#[test]
fn least_allocated_prefers_the_emptier_node() {
    let busy = with(pod("old", "3"), "/spec/nodeName", json!("a"));
    let c = cluster(&[node("a", "4", "8Gi"), node("b", "4", "8Gi")], &[busy]);
    assert_eq!(decide(&pod("p", "100m"), &c), Decision::Bind("b".into()));
}

#[test]
fn pods_of_one_owner_spread_over_nodes() {
    let owned = |name: &str| {
        with(
            pod(name, "10m"),
            "/metadata/ownerReferences",
            json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs",
                "uid": "rs-uid", "controller": true}]),
        )
    };
    let mut c = cluster(
        &[
            node("a", "64", "64Gi"),
            node("b", "64", "64Gi"),
            node("c", "64", "64Gi"),
        ],
        &[],
    );
    let mut counts = HashMap::new();
    for i in 0..9 {
        let p: Pod = serde_json::from_value(owned(&format!("p{i}"))).unwrap();
        let Decision::Bind(n) = schedule(&p, &c) else {
            panic!("must fit")
        };
        c.assume(&p, &n);
        *counts.entry(n).or_insert(0) += 1;
    }
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![3, 3, 3],
        "{counts:?}"
    );
}

proptest! {
    /// Whatever is bound, the scheduler never overcommits a node's cpu.
    #[test]
    fn never_overcommits(requests in proptest::collection::vec(1u32..2000, 1..40)) {
        let mut c = cluster(&[node("a", "4", "64Gi"), node("b", "2", "64Gi")], &[]);
        let mut used = HashMap::<String, u32>::new();
        for (i, m) in requests.iter().enumerate() {
            let p: Pod = serde_json::from_value(pod(&format!("p{i}"), &format!("{m}m"))).unwrap();
            if let Decision::Bind(n) = schedule(&p, &c) {
                c.assume(&p, &n);
                *used.entry(n).or_insert(0) += m;
            }
        }
        prop_assert!(used.get("a").copied().unwrap_or(0) <= 4000);
        prop_assert!(used.get("b").copied().unwrap_or(0) <= 2000);
    }
}

fn pod_rt() -> ResourceType {
    ResourceType::of::<Pod>()
}

#[tokio::test]
async fn binds_through_the_api_and_marks_unschedulable_pods() {
    let fake = FakeClient::new();
    let client: Arc<dyn ClusterClient> = Arc::new(fake.clone());
    let mut s = Scheduler::new(client, DEFAULT_SCHEDULER_NAME);
    s.on_node(Event::Restarted(vec![
        serde_json::from_value(node("a", "1", "8Gi")).unwrap(),
    ]));
    fake.seed(pod_rt(), pod("fits", "500m"));
    fake.seed(pod_rt(), pod("huge", "2"));
    let other = with(
        pod("other", "10m"),
        "/spec/schedulerName",
        json!("someone-else"),
    );
    fake.seed(pod_rt(), other);
    let pods = fake.list(pod_rt(), None).await.unwrap();
    s.on_pod(Event::Restarted(
        pods.items
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect(),
    ));
    assert_eq!(s.schedule_pending().await, 1);
    let fits = fake.get(pod_rt(), Some("default"), "fits").await.unwrap();
    assert_eq!(fits["spec"]["nodeName"], "a");
    let huge = fake.get(pod_rt(), Some("default"), "huge").await.unwrap();
    let cond = &huge["status"]["conditions"][0];
    assert_eq!(cond["type"], "PodScheduled");
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "Unschedulable");
    assert_eq!(
        cond["message"],
        "0/1 nodes are available: 1 Insufficient cpu."
    );
    let other = fake.get(pod_rt(), Some("default"), "other").await.unwrap();
    assert!(
        other["spec"].get("nodeName").is_none(),
        "another scheduler's pod is left alone"
    );
    let events = fake.objects(ResourceType::of::<k8s_openapi::api::core::v1::Event>());
    assert!(
        events.iter().any(|e| e["reason"] == "FailedScheduling"
            && e["involvedObject"]["name"] == "huge"
            && e["type"] == "Warning"),
        "{events:?}"
    );
    assert_eq!(s.waiting(), 1);

    // Nothing changed: a retry does not patch again.
    fake.clear_actions();
    s.retry_waiting();
    s.schedule_pending().await;
    assert!(
        !fake
            .actions()
            .iter()
            .any(|a| matches!(a, Action::Patch { .. })),
        "{:?}",
        fake.actions()
    );

    // A bigger node arrives: the waiting pod is retried and bound there.
    s.on_node(Event::Applied(
        serde_json::from_value(node("big", "8", "8Gi")).unwrap(),
    ));
    assert_eq!(s.schedule_pending().await, 1);
    let huge = fake.get(pod_rt(), Some("default"), "huge").await.unwrap();
    assert_eq!(huge["spec"]["nodeName"], "big");
}

#[tokio::test]
async fn assumed_pods_count_before_the_watch_confirms() {
    let fake = FakeClient::new();
    let client: Arc<dyn ClusterClient> = Arc::new(fake.clone());
    let mut s = Scheduler::new(client, DEFAULT_SCHEDULER_NAME);
    s.on_node(Event::Applied(
        serde_json::from_value(node("a", "1", "8Gi")).unwrap(),
    ));
    for name in ["p1", "p2"] {
        fake.seed(pod_rt(), pod(name, "600m"));
        let p = fake.get(pod_rt(), Some("default"), name).await.unwrap();
        s.on_pod(Event::Applied(serde_json::from_value(p).unwrap()));
    }
    assert_eq!(
        s.schedule_pending().await,
        1,
        "only one 600m pod fits in 1 cpu"
    );
}

#[tokio::test]
async fn the_run_loop_binds_pods_that_arrive_later() {
    let fake = FakeClient::new();
    let client: Arc<dyn ClusterClient> = Arc::new(fake.clone());
    fake.seed(ResourceType::of::<Node>(), node("a", "4", "8Gi"));
    let task = tokio::spawn(Scheduler::new(client, DEFAULT_SCHEDULER_NAME).run());
    fake.seed(pod_rt(), pod("late", "100m"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let p = fake.get(pod_rt(), Some("default"), "late").await.unwrap();
        if p["spec"]["nodeName"] == "a" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pod never bound: {p}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task.abort();
}

#[test]
fn big_clusters_are_sampled_small_ones_are_not() {
    assert_eq!(nodes_to_find(0), 0);
    assert_eq!(nodes_to_find(3), 3);
    assert_eq!(nodes_to_find(100), 100);
    assert_eq!(nodes_to_find(200), 100, "never fewer than 100");
    assert_eq!(nodes_to_find(1_000), 420, "42% of 1,000 as upstream");
    assert_eq!(nodes_to_find(10_000), 500, "at least 5%");
}

#[test]
fn successive_pods_look_at_the_nodes_in_turn() {
    let nodes: Vec<Value> = (0..300)
        .map(|i| node(&format!("n{i:03}"), "4", "8Gi"))
        .collect();
    let c = cluster(&nodes, &[]);
    let p: Pod = serde_json::from_value(pod("p", "100m")).unwrap();
    let enough = nodes_to_find(300);
    assert!(enough < 300);
    let (first, looked) = schedule_from(&p, &c, 0);
    assert_eq!(looked, enough, "stops once enough nodes fit");
    let (second, _) = schedule_from(&p, &c, looked);
    assert_eq!(first, Decision::Bind("n000".into()));
    assert_eq!(
        second,
        Decision::Bind(format!("n{enough:03}")),
        "the next pod starts where the last stopped"
    );
    // Wrapping around: a start past the end comes back to the front.
    let (third, _) = schedule_from(&p, &c, 250);
    assert_eq!(third, Decision::Bind("n250".into()));
    // When nothing fits, every node is looked at and counted in the message.
    let huge: Pod = serde_json::from_value(pod("huge", "64")).unwrap();
    let (d, looked) = schedule_from(&huge, &c, 42);
    assert_eq!(looked, 300);
    assert_eq!(
        d,
        Decision::Unschedulable("0/300 nodes are available: 300 Insufficient cpu.".into())
    );
}

#[test]
fn a_node_update_keeps_what_is_placed_on_it() {
    let mut c = cluster(
        &[node("a", "1", "8Gi")],
        &[with(pod("p", "600m"), "/spec/nodeName", json!("a"))],
    );
    let mut updated: Node = serde_json::from_value(node("a", "1", "8Gi")).unwrap();
    updated
        .metadata
        .labels
        .get_or_insert_default()
        .insert("new".into(), "label".into());
    c.set_node(updated);
    assert_eq!(c.node("a").unwrap().pod_count, 1);
    assert_eq!(
        decide(&pod("q", "600m"), &c),
        Decision::Unschedulable("0/1 nodes are available: 1 Insufficient cpu.".into())
    );
}

#[tokio::test]
async fn many_pods_are_bound_concurrently_and_all_counted() {
    let fake = FakeClient::new();
    let client: Arc<dyn ClusterClient> = Arc::new(fake.clone());
    let mut s = Scheduler::new(client, DEFAULT_SCHEDULER_NAME);
    s.on_node(Event::Applied(
        serde_json::from_value(node("a", "100", "800Gi")).unwrap(),
    ));
    // More than one window of bindings in flight, within the node's 110 pods.
    let n = BINDS_IN_FLIGHT + 36;
    let mut pods = Vec::new();
    for i in 0..n {
        fake.seed(pod_rt(), pod(&format!("p{i}"), "100m"));
        let p = fake
            .get(pod_rt(), Some("default"), &format!("p{i}"))
            .await
            .unwrap();
        pods.push(serde_json::from_value(p).unwrap());
    }
    s.on_pod(Event::Restarted(pods));
    assert_eq!(s.schedule_pending().await, n);
    let bound = fake
        .list(pod_rt(), None)
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "a")
        .count();
    assert_eq!(bound, n);
    assert_eq!(s.cluster().node("a").unwrap().pod_count, n);
}
