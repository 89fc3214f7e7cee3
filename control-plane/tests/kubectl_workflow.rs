//! The real kubectl against the real server: the "Done when" walk of issue 3.

mod api_support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_support::ControlPlane;

const APP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: shop
data:
  greeting: hello
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: busybox:1.36
        ports:
        - containerPort: 8080
        env:
        - name: MODE
          value: demo
      - name: sidecar
        image: busybox:1.36
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
"#;

fn poll(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn not_found(cp: &ControlPlane, args: &[&str]) -> bool {
    let out = cp.kubectl_output(args, None, &[]);
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound")
}

#[test]
fn kubectl_drives_the_whole_workflow() {
    let cp = ControlPlane::start();

    // apply of a multi-document YAML, with client-side validation on (kubectl's default).
    let out = cp.kubectl_with(&["apply", "-f", "-"], Some(APP), &[]);
    for line in [
        "namespace/shop created",
        "configmap/web-config created",
        "deployment.apps/web created",
        "service/web created",
    ] {
        assert!(out.contains(line), "apply said: {out}");
    }
    let out = cp.kubectl_with(&["apply", "-f", "-"], Some(APP), &[]);
    assert_eq!(
        out.matches("unchanged").count(),
        4,
        "second apply said: {out}"
    );

    let svc = cp.kubectl_json(&["-n", "shop", "get", "service", "web"]);
    let ip = svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(ip.starts_with("10.96.0."), "cluster IP {ip}");
    let node_port = svc["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap_or_default();
    assert!(
        (30000..=32767).contains(&node_port),
        "node port {node_port}"
    );

    // get: table, yaml, json.
    let table = cp.kubectl(&["-n", "shop", "get", "deploy"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]);
    assert!(
        table.lines().nth(1).unwrap_or_default().starts_with("web "),
        "{table}"
    );
    let svc_table = cp.kubectl(&["-n", "shop", "get", "svc"]);
    assert!(
        svc_table.contains(&format!("80:{node_port}/TCP")),
        "{svc_table}"
    );
    let yaml = cp.kubectl(&["-n", "shop", "get", "cm", "web-config", "-o", "yaml"]);
    assert!(
        yaml.contains("greeting: hello") && yaml.contains("kind: ConfigMap"),
        "{yaml}"
    );
    let deploy = cp.kubectl_json(&["-n", "shop", "get", "deployment", "web"]);
    assert_eq!(deploy["metadata"]["generation"], 1);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"],
        "IfNotPresent"
    );
    let uid = deploy["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(uid.len(), 36, "uid {uid}");

    // describe.
    let described = cp.kubectl(&["-n", "shop", "describe", "deployment", "web"]);
    assert!(described.contains("2 desired"), "{described}");
    assert!(
        described.contains("MODE:") && described.contains("demo"),
        "{described}"
    );

    // label and annotate.
    cp.kubectl(&["-n", "shop", "label", "deployment", "web", "tier=frontend"]);
    cp.kubectl(&[
        "-n",
        "shop",
        "annotate",
        "deployment",
        "web",
        "owner=team-a",
    ]);
    let deploy = cp.kubectl_json(&["-n", "shop", "get", "deployment", "web"]);
    assert_eq!(deploy["metadata"]["labels"]["tier"], "frontend");
    assert_eq!(deploy["metadata"]["annotations"]["owner"], "team-a");
    assert_eq!(
        deploy["metadata"]["generation"], 1,
        "metadata changes keep the generation"
    );
    let listed = cp.kubectl(&[
        "-n",
        "shop",
        "get",
        "deploy",
        "-l",
        "tier in (frontend,backend)",
        "-o",
        "name",
    ]);
    assert_eq!(listed.trim(), "deployment.apps/web");
    let none = cp.kubectl(&[
        "-n",
        "shop",
        "get",
        "deploy",
        "-l",
        "tier!=frontend",
        "-o",
        "name",
    ]);
    assert_eq!(none.trim(), "");

    // patch: strategic (merges the container list by name), merge, JSON.
    cp.kubectl(&[
        "-n",
        "shop",
        "patch",
        "deployment",
        "web",
        "--type=strategic",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"busybox:1.37"}]}}}}"#,
    ]);
    let deploy = cp.kubectl_json(&["-n", "shop", "get", "deployment", "web"]);
    let containers = &deploy["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers.as_array().map_or(0, Vec::len), 2, "{containers}");
    assert_eq!(containers[0]["image"], "busybox:1.37");
    assert_eq!(containers[0]["env"][0]["value"], "demo");
    assert_eq!(containers[1]["image"], "busybox:1.36");
    assert_eq!(
        deploy["metadata"]["generation"], 2,
        "spec change bumps the generation"
    );
    cp.kubectl(&[
        "-n",
        "shop",
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"labels":{"tier":null,"patched":"merge"}}}"#,
    ]);
    cp.kubectl(&[
        "-n",
        "shop",
        "patch",
        "deployment",
        "web",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/replicas","value":4}]"#,
    ]);
    let deploy = cp.kubectl_json(&["-n", "shop", "get", "deployment", "web"]);
    assert_eq!(deploy["metadata"]["labels"]["patched"], "merge");
    assert!(deploy["metadata"]["labels"].get("tier").is_none());
    assert_eq!(deploy["spec"]["replicas"], 4);

    // scale.
    cp.kubectl(&["-n", "shop", "scale", "deployment", "web", "--replicas=5"]);
    let deploy = cp.kubectl_json(&["-n", "shop", "get", "deployment", "web"]);
    assert_eq!(deploy["spec"]["replicas"], 5);

    // edit through an editor that is a real program.
    cp.kubectl_with(
        &["-n", "shop", "edit", "configmap", "web-config"],
        None,
        &[(
            "KUBE_EDITOR",
            "sed -i s/greeting:\\ hello/greeting:\\ edited/",
        )],
    );
    let cm = cp.kubectl_json(&["-n", "shop", "get", "configmap", "web-config"]);
    assert_eq!(cm["data"]["greeting"], "edited");

    // api-resources and explain.
    let resources = cp.kubectl(&["api-resources"]);
    for (name, short) in [
        ("pods", "po"),
        ("services", "svc"),
        ("deployments", "deploy"),
        ("replicasets", "rs"),
        ("namespaces", "ns"),
        ("nodes", "no"),
        ("configmaps", "cm"),
        ("endpoints", "ep"),
    ] {
        let line = resources
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name));
        let line =
            line.unwrap_or_else(|| panic!("{name} missing from api-resources:\n{resources}"));
        assert!(line.split_whitespace().nth(1) == Some(short), "{line}");
    }
    let explained = cp.kubectl(&["explain", "pod.spec"]);
    assert!(
        explained.contains("KIND:") && explained.contains("Pod"),
        "{explained}"
    );
    assert!(
        explained.contains("containers") && explained.contains("<[]Container>"),
        "{explained}"
    );
    let explained = cp.kubectl(&["explain", "deployment.spec.replicas"]);
    assert!(explained.contains("<integer>"), "{explained}");

    // delete: default (background) cascade removes the object at once.
    cp.kubectl(&["-n", "shop", "delete", "configmap", "web-config"]);
    assert!(not_found(
        &cp,
        &["-n", "shop", "get", "configmap", "web-config"]
    ));

    // --cascade=orphan and foreground leave the object to the garbage collector's finalizers.
    cp.kubectl(&[
        "-n",
        "shop",
        "delete",
        "deployment",
        "web",
        "--cascade=orphan",
        "--wait=false",
    ]);
    let deploy = cp.kubectl_json(&["-n", "shop", "get", "deployment", "web"]);
    assert!(
        deploy["metadata"]["deletionTimestamp"].is_string(),
        "{deploy}"
    );
    assert_eq!(
        deploy["metadata"]["finalizers"],
        serde_json::json!(["orphan"])
    );
    cp.kubectl(&[
        "-n",
        "shop",
        "delete",
        "service",
        "web",
        "--cascade=foreground",
        "--wait=false",
    ]);
    let svc = cp.kubectl_json(&["-n", "shop", "get", "service", "web"]);
    assert_eq!(
        svc["metadata"]["finalizers"],
        serde_json::json!(["foregroundDeletion"])
    );
    // Removing the finalizer (what the garbage collector will do) finishes the delete and frees
    // the Service's IP and node port for the next Service.
    cp.kubectl(&[
        "-n",
        "shop",
        "patch",
        "service",
        "web",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    assert!(not_found(&cp, &["-n", "shop", "get", "service", "web"]));
    let again = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: again\n  namespace: shop\nspec:\n  type: NodePort\n  clusterIP: {ip}\n  ports:\n  - port: 81\n    nodePort: {node_port}\n"
    );
    cp.kubectl_with(&["apply", "-f", "-"], Some(&again), &[]);
    let dup = again.replace("name: again", "name: dup");
    let out = cp.kubectl_output(&["apply", "-f", "-"], Some(&dup), &[]);
    assert!(!out.status.success(), "a second Service got the same IP");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already allocated"), "{err}");

    // Namespace deletion marks it Terminating until the namespace controller empties it.
    cp.kubectl(&["delete", "namespace", "shop", "--wait=false"]);
    let ns = cp.kubectl_json(&["get", "namespace", "shop"]);
    assert_eq!(ns["status"]["phase"], "Terminating");
    let late = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: late\n  namespace: shop\n";
    let out = cp.kubectl_output(&["create", "-f", "-"], Some(late), &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("configmaps \"late\" is forbidden: unable to create new content in namespace shop because it is being terminated"));
}

#[test]
fn kubectl_get_watch_prints_new_objects() {
    let cp = ControlPlane::start();
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["-n", "default", "get", "configmaps", "-w"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kubectl get -w");
    let seen = Arc::new(Mutex::new(String::new()));
    let mut stdout = watch.stdout.take().expect("stdout");
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = sink.lock() {
                s.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    let text = || seen.lock().map(|s| s.clone()).unwrap_or_default();
    let cm = |name: &str, data: &str| {
        format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata: {data}\n")
    };
    cp.kubectl_with(
        &["-n", "default", "create", "-f", "-"],
        Some(&cm("first", "{a: '1'}")),
        &[],
    );
    poll("the watch to show the first configmap", || {
        text().contains("first")
    });
    cp.kubectl_with(
        &["-n", "default", "create", "-f", "-"],
        Some(&cm("second", "{a: '1', b: '2'}")),
        &[],
    );
    poll("the watch to show the second configmap", || {
        text().contains("second")
    });
    let _ = watch.kill();
    let _ = watch.wait();
    let _ = reader.join();
    let out = text();
    let second = out
        .lines()
        .find(|l| l.starts_with("second"))
        .unwrap_or_default();
    let cells: Vec<&str> = second.split_whitespace().collect();
    assert_eq!(
        cells.get(1),
        Some(&"2"),
        "DATA column of {second:?} in:\n{out}"
    );

    // A pod that is not bound to a node goes at once; a bound one waits for its agent.
    let pod = |name: &str, node: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  {node}containers:\n  - name: c\n    image: busybox\n"
        )
    };
    cp.kubectl_with(&["apply", "-f", "-"], Some(&pod("loose", "")), &[]);
    cp.kubectl(&["delete", "pod", "loose"]);
    assert!(
        !cp.kubectl_output(&["get", "pod", "loose"], None, &[])
            .status
            .success()
    );
    cp.kubectl_with(
        &["apply", "-f", "-"],
        Some(&pod("bound", "nodeName: n1\n  ")),
        &[],
    );
    cp.kubectl(&["delete", "pod", "bound", "--wait=false"]);
    let p = cp.kubectl_json(&["get", "pod", "bound"]);
    assert_eq!(p["metadata"]["deletionGracePeriodSeconds"], 30);
    let table = cp.kubectl(&["get", "pod", "bound"]);
    assert!(table.contains("Terminating"), "{table}");
    // The agent's final delete uses grace period 0.
    cp.kubectl(&["delete", "pod", "bound", "--grace-period=0", "--force"]);
    assert!(
        !cp.kubectl_output(&["get", "pod", "bound"], None, &[])
            .status
            .success()
    );
}
