//! The scheduler inside the real `ferrolet-control-plane` binary: each filter keeps pods off
//! the node they must not land on (a node the scores would otherwise prefer); a pod that fits
//! nowhere is marked Unschedulable with the upstream message and an Event, and is bound as soon
//! as a node that fits appears.

mod cp_support;

use std::sync::Arc;
use std::time::Duration;

use cp_support::{
    ControlPlane, events, namespace, node, node_of, nodes, pods, test_dir, unique, wait_for,
};
use ferrolet_control_plane::controllers::client::{ClusterClient, PatchKind};
use serde_json::{Value, json};

const LONG: Duration = Duration::from_secs(60);

fn pod(ns: &str, name: &str, spec_extra: Value) -> Value {
    let mut p = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"containers": [{"name": "c", "image": "busybox",
                                 "resources": {"requests": {"cpu": "100m"}}}]},
    });
    if let (Some(spec), Some(extra)) = (p["spec"].as_object_mut(), spec_extra.as_object()) {
        for (k, v) in extra {
            spec.insert(k.clone(), v.clone());
        }
    }
    p
}

fn with_container(ns: &str, name: &str, container: Value, extra: Value) -> Value {
    let mut p = pod(ns, name, extra);
    p["spec"]["containers"] = json!([container]);
    p
}

fn required_affinity(key: &str, operator: &str, values: &[&str]) -> Value {
    let mut expr = json!({"key": key, "operator": operator});
    if !values.is_empty() {
        expr["values"] = json!(values);
    }
    json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [expr]}]}}}})
}

/// One filter's case: the node `a` (bigger, first by name, so preferred by the scores) must
/// be refused, `b` taken.
struct Case {
    name: &'static str,
    bad: Value,
    good: Value,
    /// Pods already on `a` (bound by name, not by the scheduler).
    on_bad: Vec<Value>,
    pod_spec: Value,
    container: Option<Value>,
}

fn cases(prefix: &str) -> Vec<Case> {
    let a = |case: &str| format!("{prefix}-{case}-a");
    let b = |case: &str| format!("{prefix}-{case}-b");
    let plain = |case: &str| {
        (
            node(&a(case), "16", json!({}), json!([])),
            node(&b(case), "4", json!({}), json!([])),
        )
    };
    let mut out = Vec::new();
    {
        let (mut bad, good) = plain("notready");
        bad["status"]["conditions"][0]["status"] = json!("False");
        out.push(Case {
            name: "notready",
            bad,
            good,
            on_bad: vec![],
            pod_spec: json!({}),
            container: None,
        });
    }
    {
        let (mut bad, good) = plain("cordon");
        bad["spec"]["unschedulable"] = json!(true);
        out.push(Case {
            name: "cordon",
            bad,
            good,
            on_bad: vec![],
            pod_spec: json!({}),
            container: None,
        });
    }
    for effect in ["NoSchedule", "NoExecute"] {
        let case = if effect == "NoSchedule" {
            "noschedule"
        } else {
            "noexecute"
        };
        let bad = node(
            &a(case),
            "16",
            json!({}),
            json!([{"key": "dedicated", "value": "db", "effect": effect}]),
        );
        let good = node(&b(case), "4", json!({}), json!([]));
        // A toleration of another taint does not help.
        let pod_spec = json!({"tolerations": [{"key": "other", "operator": "Exists"}]});
        out.push(Case {
            name: case,
            bad,
            good,
            on_bad: vec![],
            pod_spec,
            container: None,
        });
    }
    {
        let bad = node(&a("selector"), "16", json!({"disk": "hdd"}), json!([]));
        let good = node(&b("selector"), "4", json!({"disk": "ssd"}), json!([]));
        out.push(Case {
            name: "selector",
            bad,
            good,
            on_bad: vec![],
            pod_spec: json!({"nodeSelector": {"disk": "ssd"}}),
            container: None,
        });
    }
    for (case, op, values, bad_labels, good_labels) in [
        (
            "in",
            "In",
            vec!["z1"],
            json!({"zone": "z2"}),
            json!({"zone": "z1"}),
        ),
        (
            "notin",
            "NotIn",
            vec!["z2"],
            json!({"zone": "z2"}),
            json!({"zone": "z1"}),
        ),
        ("exists", "Exists", vec![], json!({}), json!({"gpu": "yes"})),
        (
            "doesnotexist",
            "DoesNotExist",
            vec![],
            json!({"spot": "yes"}),
            json!({}),
        ),
    ] {
        let bad = node(&a(case), "16", bad_labels, json!([]));
        let good = node(&b(case), "4", good_labels, json!([]));
        out.push(Case {
            name: case,
            bad,
            good,
            on_bad: vec![],
            pod_spec: required_affinity(
                if case == "exists" {
                    "gpu"
                } else if case == "doesnotexist" {
                    "spot"
                } else {
                    "zone"
                },
                op,
                &values,
            ),
            container: None,
        });
    }
    {
        // 2 cpus of which 1.8 are taken by a pod already there: 500m no longer fits, though
        // allocatable alone would take it; the 1-cpu node fits.
        let bad = node(&a("cpu"), "2", json!({}), json!([]));
        let good = node(&b("cpu"), "1", json!({}), json!([]));
        let hog =
            json!({"name": "hog", "image": "busybox", "resources": {"requests": {"cpu": "1800m"}}});
        let container =
            json!({"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "500m"}}});
        out.push(Case {
            name: "cpu",
            bad,
            good,
            on_bad: vec![hog],
            pod_spec: json!({}),
            container: Some(container),
        });
    }
    {
        let bad = node(&a("hostport"), "16", json!({}), json!([]));
        let good = node(&b("hostport"), "4", json!({}), json!([]));
        let port = json!({"name": "c", "image": "busybox", "ports": [{"containerPort": 80, "hostPort": 8080}]});
        out.push(Case {
            name: "hostport",
            bad,
            good,
            on_bad: vec![port.clone()],
            pod_spec: json!({}),
            container: Some(port),
        });
    }
    {
        let mut bad = node(&a("maxpods"), "16", json!({}), json!([]));
        bad["status"]["allocatable"]["pods"] = json!("1");
        let good = node(&b("maxpods"), "4", json!({}), json!([]));
        let filler = json!({"name": "c", "image": "busybox"});
        out.push(Case {
            name: "maxpods",
            bad,
            good,
            on_bad: vec![filler],
            pod_spec: json!({}),
            container: None,
        });
    }
    out
}

async fn cordon(client: &dyn ClusterClient, name: &str) {
    client
        .patch(
            nodes(),
            None,
            name,
            None,
            PatchKind::Merge,
            json!({"spec": {"unschedulable": true}}),
        )
        .await
        .expect("cordon");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_filter_keeps_pods_off_the_node_it_must_not_land_on() {
    let dir = test_dir();
    let cp = ControlPlane::start_in(dir.path(), &[]).await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    let prefix = unique("f");
    let ns = unique("filters");
    namespace(client.as_ref(), &ns).await;

    // Control: without a constraint, the bigger node wins, so each case below proves its
    // filter rather than the scores.
    {
        let a = format!("{prefix}-control-a");
        let b = format!("{prefix}-control-b");
        client
            .create(nodes(), None, node(&a, "16", json!({}), json!([])))
            .await
            .expect("node");
        client
            .create(nodes(), None, node(&b, "4", json!({}), json!([])))
            .await
            .expect("node");
        client
            .create(pods(), Some(&ns), pod(&ns, "control", json!({})))
            .await
            .expect("pod");
        let landed = wait_bound(client.as_ref(), &ns, "control").await;
        assert_eq!(landed, a, "the bigger node is preferred");
        cordon(client.as_ref(), &a).await;
        cordon(client.as_ref(), &b).await;
    }

    for case in cases(&prefix) {
        let bad = case.bad["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let good = case.good["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        client
            .create(nodes(), None, case.bad.clone())
            .await
            .expect("bad node");
        client
            .create(nodes(), None, case.good.clone())
            .await
            .expect("good node");
        for (i, c) in case.on_bad.iter().enumerate() {
            let mut p = with_container(
                &ns,
                &format!("{}-there-{i}", case.name),
                c.clone(),
                json!({}),
            );
            p["spec"]["nodeName"] = json!(bad);
            client
                .create(pods(), Some(&ns), p)
                .await
                .expect("pod already on the node");
        }
        let count = if case.on_bad.is_empty() { 3 } else { 1 };
        for i in 0..count {
            let name = format!("{}-{i}", case.name);
            let p = match &case.container {
                Some(c) => with_container(&ns, &name, c.clone(), case.pod_spec.clone()),
                None => pod(&ns, &name, case.pod_spec.clone()),
            };
            client.create(pods(), Some(&ns), p).await.expect("pod");
        }
        for i in 0..count {
            let name = format!("{}-{i}", case.name);
            let landed = wait_bound(client.as_ref(), &ns, &name).await;
            assert_eq!(
                landed, good,
                "filter {}: pod {name} must not land on {bad}",
                case.name
            );
        }
        // Out of the way of the next case.
        cordon(client.as_ref(), &bad).await;
        cordon(client.as_ref(), &good).await;
    }
}

async fn wait_bound(client: &dyn ClusterClient, ns: &str, name: &str) -> String {
    wait_for(&format!("pod {name} to be bound"), LONG, || async {
        let p = client
            .get(pods(), Some(ns), name)
            .await
            .map_err(|e| e.to_string())?;
        node_of(&p)
            .map(str::to_owned)
            .ok_or_else(|| format!("{}", p["status"]))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_fits_nowhere_is_told_why_and_placed_once_a_node_fits() {
    let dir = test_dir();
    let cp = ControlPlane::start_in(dir.path(), &[]).await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    let prefix = unique("nowhere");
    for n in [
        node(&format!("{prefix}-1"), "1", json!({}), json!([])),
        node(&format!("{prefix}-2"), "1", json!({}), json!([])),
        node(
            &format!("{prefix}-3"),
            "8",
            json!({}),
            json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
        ),
    ] {
        client.create(nodes(), None, n).await.expect("node");
    }
    let ns = unique("nowhere");
    namespace(client.as_ref(), &ns).await;
    let big = json!({"name": "c", "image": "busybox", "resources": {"requests": {"cpu": "2"}}});
    client
        .create(
            pods(),
            Some(&ns),
            with_container(&ns, "big", big, json!({})),
        )
        .await
        .expect("pod");
    let want = "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, 2 Insufficient cpu.";
    wait_for("the Unschedulable condition", LONG, || async {
        let p = client
            .get(pods(), Some(&ns), "big")
            .await
            .map_err(|e| e.to_string())?;
        let cond = p
            .pointer("/status/conditions")
            .and_then(Value::as_array)
            .and_then(|cs| cs.iter().find(|c| c["type"] == "PodScheduled"))
            .cloned()
            .unwrap_or(Value::Null);
        if cond["status"] == "False" && cond["reason"] == "Unschedulable" && cond["message"] == want
        {
            Ok(())
        } else {
            Err(format!("{cond}"))
        }
    })
    .await;
    wait_for("the FailedScheduling event", LONG, || async {
        let evs = client
            .list(events(), Some(&ns))
            .await
            .map_err(|e| e.to_string())?;
        evs.items
            .iter()
            .find(|e| {
                e["reason"] == "FailedScheduling"
                    && e["type"] == "Warning"
                    && e["message"] == want
                    && e["involvedObject"]["name"] == "big"
            })
            .map(|_| ())
            .ok_or_else(|| format!("{:?}", evs.items))
    })
    .await;
    // kubectl describe shows it as users look for it.
    let described = cp.kubectl(&["-n", &ns, "describe", "pod", "big"]);
    assert!(described.contains("FailedScheduling"), "{described}");
    assert!(node_of(&client.get(pods(), Some(&ns), "big").await.expect("pod")).is_none());

    // A node that fits arrives: the pod is retried and bound there.
    let roomy = format!("{prefix}-roomy");
    client
        .create(nodes(), None, node(&roomy, "4", json!({}), json!([])))
        .await
        .expect("node");
    assert_eq!(wait_bound(client.as_ref(), &ns, "big").await, roomy);
    wait_for("the Scheduled event", LONG, || async {
        let evs = client
            .list(events(), Some(&ns))
            .await
            .map_err(|e| e.to_string())?;
        evs.items
            .iter()
            .any(|e| e["reason"] == "Scheduled" && e["involvedObject"]["name"] == "big")
            .then_some(())
            .ok_or_else(|| "no Scheduled event yet".to_owned())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_scheduler_turned_off_nothing_is_bound() {
    let dir = test_dir();
    let cp = ControlPlane::start_in(dir.path(), &["--scheduler=false", "--controllers=none"]).await;
    let client: Arc<dyn ClusterClient> = cp.client.clone();
    let n = unique("idle");
    client
        .create(nodes(), None, node(&n, "4", json!({}), json!([])))
        .await
        .expect("node");
    let ns = unique("idle");
    namespace(client.as_ref(), &ns).await;
    client
        .create(pods(), Some(&ns), pod(&ns, "p", json!({})))
        .await
        .expect("pod");
    // A pod with schedulerName set to ours but nobody scheduling: after the control plane
    // has handled later writes (a marker object round trip), the pod is still unbound.
    for i in 0..20 {
        client
            .create(
                ferrolet_control_plane::controllers::client::ResourceType::of::<k8s_openapi::api::core::v1::ConfigMap>(),
                Some(&ns),
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("m{i}")}}),
            )
            .await
            .expect("configmap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = client.get(pods(), Some(&ns), "p").await.expect("pod");
    assert!(node_of(&p).is_none(), "{p}");
    let sa = client
        .get(
            ferrolet_control_plane::controllers::client::ResourceType::of::<
                k8s_openapi::api::core::v1::ServiceAccount,
            >(),
            Some(&ns),
            "default",
        )
        .await;
    assert!(
        sa.is_err(),
        "no namespace controller, no default ServiceAccount"
    );
    // Bad flag values are refused with a message naming them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrolet-control-plane"))
        .args(["--controllers=*,cronjob", "--data-dir"])
        .arg(dir.path().join("other"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"cronjob\""), "{err}");
    assert!(
        !dir.path().join("other").join("state.db").exists(),
        "nothing made on bad flags"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferrolet-control-plane"))
        .args(["--node-monitor-grace-period=40", "--data-dir"])
        .arg(dir.path().join("other"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing unit"), "{err}");
}
