//! kubectl on every served resource: server-side Table columns (`kubectl get` prints the
//! usual columns only when the server sends a Table), field selectors, and eviction through
//! `kubectl drain`.

mod api_support;

use api_support::ControlPlane;
use serde_json::json;

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: tables}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm1, namespace: tables}
data: {a: "1", b: "2"}
---
apiVersion: v1
kind: Secret
metadata: {name: s1, namespace: tables}
type: Opaque
stringData: {token: abc}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: sa1, namespace: tables}
---
apiVersion: v1
kind: Service
metadata: {name: svc1, namespace: tables}
spec:
  selector: {app: one}
  ports: [{port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: ep1, namespace: tables}
spec:
  ports: [{port: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: ep1, namespace: tables}
subsets:
- addresses: [{ip: 10.1.0.5}]
  ports: [{port: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d1, namespace: tables}
spec:
  replicas: 2
  selector: {matchLabels: {app: d1}}
  template:
    metadata: {labels: {app: d1}}
    spec: {containers: [{name: c, image: busybox:1.36}]}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: rs1, namespace: tables}
spec:
  replicas: 3
  selector: {matchLabels: {app: rs1}}
  template:
    metadata: {labels: {app: rs1}}
    spec: {containers: [{name: c, image: busybox:1.36}]}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: st1, namespace: tables}
spec:
  replicas: 1
  serviceName: svc1
  selector: {matchLabels: {app: st1}}
  template:
    metadata: {labels: {app: st1}}
    spec: {containers: [{name: c, image: busybox:1.36}]}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ds1, namespace: tables}
spec:
  selector: {matchLabels: {app: ds1}}
  template:
    metadata: {labels: {app: ds1}}
    spec: {containers: [{name: c, image: busybox:1.36}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: j1, namespace: tables}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox:1.36}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: es1, namespace: tables}
addressType: IPv4
endpoints: [{addresses: [10.1.0.6]}]
ports: [{port: 8080, protocol: TCP}]
---
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: l1, namespace: tables}
spec: {holderIdentity: node-x}
---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: tables}
spec:
  nodeSelector: {no-such-label: "true"}
  containers: [{name: c, image: busybox:1.36}]
---
apiVersion: v1
kind: Event
metadata: {name: p1.ev1, namespace: tables}
involvedObject: {kind: Pod, name: p1, namespace: tables}
reason: Tested
message: something happened
type: Normal
"#;

/// The header of `kubectl get` with runs of spaces collapsed, and the row of `name`.
fn table(cp: &ControlPlane, args: &[&str], name: &str) -> (String, String) {
    let out = cp.kubectl(args);
    let collapse = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut lines = out.lines();
    let header = collapse(lines.next().unwrap_or_default());
    let row = lines
        .find(|l| {
            l.split_whitespace()
                .any(|w| w == name || w.ends_with(&format!("/{name}")))
        })
        .unwrap_or_else(|| panic!("no row for {name} in kubectl {args:?}:\n{out}"));
    (header, collapse(row))
}

#[test]
fn kubectl_get_prints_the_usual_columns_for_every_resource() {
    let cp = ControlPlane::start();
    cp.kubectl_with(&["apply", "-f", "-"], Some(OBJECTS), &[]);
    cp.kubectl_with(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Node\nmetadata: {name: node-t}\n"),
        &[],
    );
    let ns = ["-n", "tables", "get"];
    let cases: &[(&str, &str, &str, &[&str])] = &[
        ("configmaps", "cm1", "NAME DATA AGE", &["cm1", "2"]),
        (
            "secrets",
            "s1",
            "NAME TYPE DATA AGE",
            &["s1", "Opaque", "1"],
        ),
        ("serviceaccounts", "sa1", "NAME SECRETS AGE", &["sa1", "0"]),
        (
            "services",
            "svc1",
            "NAME TYPE CLUSTER-IP EXTERNAL-IP PORT(S) AGE",
            &["svc1", "ClusterIP", "<none>", "80/TCP"],
        ),
        (
            "endpoints",
            "ep1",
            "NAME ENDPOINTS AGE",
            &["ep1", "10.1.0.5:8080"],
        ),
        (
            "deployments",
            "d1",
            "NAME READY UP-TO-DATE AVAILABLE AGE",
            &["d1", "0/2"],
        ),
        (
            "replicasets",
            "rs1",
            "NAME DESIRED CURRENT READY AGE",
            &["rs1", "3"],
        ),
        ("statefulsets", "st1", "NAME READY AGE", &["st1", "0/1"]),
        (
            "daemonsets",
            "ds1",
            "NAME DESIRED CURRENT READY UP-TO-DATE AVAILABLE NODE SELECTOR AGE",
            &["ds1", "<none>"],
        ),
        (
            "jobs",
            "j1",
            "NAME STATUS COMPLETIONS DURATION AGE",
            &["j1", "0/1"],
        ),
        (
            "endpointslices",
            "es1",
            "NAME ADDRESSTYPE PORTS ENDPOINTS AGE",
            &["es1", "IPv4", "8080", "10.1.0.6"],
        ),
        ("leases", "l1", "NAME HOLDER AGE", &["l1", "node-x"]),
        (
            "pods",
            "p1",
            "NAME READY STATUS RESTARTS AGE",
            &["p1", "0/1", "Pending", "0"],
        ),
        (
            "events",
            "Tested",
            "LAST SEEN TYPE REASON OBJECT MESSAGE",
            &["Normal", "Tested", "pod/p1", "something", "happened"],
        ),
    ];
    for (resource, name, header, cells) in cases {
        let mut args = ns.to_vec();
        args.push(resource);
        let (got_header, row) = table(&cp, &args, name);
        assert_eq!(&got_header, header, "kubectl get {resource}");
        let words: Vec<&str> = row.split(' ').collect();
        for cell in *cells {
            assert!(
                words.contains(cell),
                "kubectl get {resource}: {cell:?} not in {row:?}"
            );
        }
    }
    let (header, row) = table(&cp, &["get", "namespaces"], "tables");
    assert_eq!(header, "NAME STATUS AGE");
    assert!(row.contains("Active"), "{row}");
    let (header, row) = table(&cp, &["get", "nodes"], "node-t");
    assert_eq!(header, "NAME STATUS ROLES AGE VERSION");
    assert!(row.starts_with("node-t "), "{row}");
    // -o wide adds the priority columns.
    let (header, row) = table(&cp, &["-n", "tables", "get", "pods", "-o", "wide"], "p1");
    assert!(
        header.starts_with("NAME READY STATUS RESTARTS AGE IP NODE"),
        "{header}"
    );
    assert!(row.contains("<none>"), "{row}");
}

#[test]
fn kubectl_field_selectors_pick_by_phase_node_and_involved_object() {
    let cp = ControlPlane::start();
    // Only the namespace, the lone pod and its event: no controller makes more pods.
    let few: Vec<&str> = OBJECTS
        .split("---")
        .filter(|d| {
            ["Namespace", "Pod", "Event"]
                .iter()
                .any(|k| d.contains(&format!("kind: {k}\n")))
        })
        .collect();
    cp.kubectl_with(&["apply", "-f", "-"], Some(&few.join("---")), &[]);
    let names = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["-n", "tables", "get", "-o", "name"];
        all.extend_from_slice(args);
        let out = cp.kubectl(&all);
        out.lines().map(str::to_owned).collect()
    };
    assert_eq!(
        names(&["pods", "--field-selector", "status.phase=Pending"]),
        ["pod/p1"]
    );
    assert!(names(&["pods", "--field-selector", "status.phase=Running"]).is_empty());
    assert_eq!(
        names(&["pods", "--field-selector", "spec.nodeName="]),
        ["pod/p1"]
    );
    assert_eq!(
        names(&[
            "events",
            "--field-selector",
            "involvedObject.kind=Pod,involvedObject.name=p1,reason=Tested"
        ]),
        ["event/p1.ev1"]
    );
    assert!(
        names(&["events", "--field-selector", "involvedObject.name=p1"])
            .contains(&"event/p1.ev1".to_owned())
    );
    assert!(names(&["events", "--field-selector", "involvedObject.name=other"]).is_empty());
    let out = cp.kubectl_output(
        &[
            "-n",
            "tables",
            "get",
            "pods",
            "--field-selector",
            "spec.image=x",
        ],
        None,
        &[],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("spec.image"), "{stderr}");
}

#[test]
fn eviction_deletes_the_pod_and_kubectl_drain_uses_it() {
    let cp = ControlPlane::start();
    cp.kubectl_with(
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: Node\nmetadata: {name: node-d}\n"),
        &[],
    );
    let pod = |name: &str, node: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  \
             nodeName: {node}\n  containers: [{{name: c, image: busybox:1.36}}]\n"
        )
    };
    cp.kubectl_with(&["apply", "-f", "-"], Some(&pod("e1", "node-d")), &[]);
    cp.kubectl_with(&["apply", "-f", "-"], Some(&pod("e2", "node-d")), &[]);

    // The eviction subresource, as a client library sends it.
    let eviction = json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "e1", "namespace": "default"},
        "deleteOptions": {"gracePeriodSeconds": 0},
    });
    let (code, body) = cp.request(
        "POST",
        "/api/v1/namespaces/default/pods/e1/eviction",
        "application/json",
        eviction.to_string().as_bytes(),
    );
    assert_eq!(code, 201, "{body}");
    let (code, _) = cp.get("/api/v1/namespaces/default/pods/e1");
    assert_eq!(code, 404, "the evicted pod is gone");
    let (code, body) = cp.request(
        "POST",
        "/api/v1/namespaces/default/pods/e1/eviction",
        "application/json",
        eviction.to_string().as_bytes(),
    );
    assert_eq!(code, 404, "{body}");
    let (code, body) = cp.request(
        "POST",
        "/api/v1/namespaces/default/pods/e2/eviction",
        "application/json",
        b"{not json",
    );
    assert_eq!(code, 400, "{body}");
    let (code, _) = cp.get("/api/v1/namespaces/default/pods/e2");
    assert_eq!(code, 200, "a bad eviction leaves the pod alone");

    // kubectl drain: cordons the node and evicts what runs there.
    cp.kubectl(&[
        "drain",
        "node-d",
        "--force",
        "--grace-period=0",
        "--timeout=60s",
    ]);
    let node = cp.kubectl_json(&["get", "node", "node-d"]);
    assert_eq!(node["spec"]["unschedulable"], true, "{node}");
    let (code, _) = cp.get("/api/v1/namespaces/default/pods/e2");
    assert_eq!(code, 404, "drain evicted the pod");
    cp.kubectl(&["uncordon", "node-d"]);
    let node = cp.kubectl_json(&["get", "node", "node-d"]);
    assert!(node["spec"]["unschedulable"] != true, "{node}");
}

#[test]
fn kubectl_scales_statefulsets_and_validates_fields_strictly() {
    let cp = ControlPlane::start();
    cp.kubectl_with(&["apply", "-f", "-"], Some(OBJECTS), &[]);
    cp.kubectl(&[
        "-n",
        "tables",
        "scale",
        "statefulset",
        "st1",
        "--replicas=3",
    ]);
    let st = cp.kubectl_json(&["-n", "tables", "get", "statefulset", "st1"]);
    assert_eq!(st["spec"]["replicas"], 3, "{st}");
    let scale = cp.get("/apis/apps/v1/namespaces/tables/statefulsets/st1/scale");
    assert_eq!(scale.0, 200, "{}", scale.1);
    assert_eq!(scale.1["kind"], "Scale");
    assert_eq!(scale.1["spec"]["replicas"], 3);

    // kubectl validates strictly by default: an unknown field fails and stores nothing.
    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: typo, namespace: tables}\ndatta: {a: b}\n";
    let out = cp.kubectl_output(&["apply", "-f", "-"], Some(typo), &[]);
    assert!(!out.status.success(), "an unknown field was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown field") && stderr.contains("datta"),
        "{stderr}"
    );
    let (code, _) = cp.get("/api/v1/namespaces/tables/configmaps/typo");
    assert_eq!(code, 404, "nothing stored");
    // --validate=warn stores it and prints the server's warning; =false (Ignore) is silent.
    let out = cp.kubectl_output(&["apply", "--validate=warn", "-f", "-"], Some(typo), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("datta"), "{stderr}");
    let other = typo.replace("name: typo", "name: typo2");
    let out = cp.kubectl_output(&["apply", "--validate=false", "-f", "-"], Some(&other), &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("datta"));
}

/// ServiceAccount admission: a new pod gets a projected token volume mounted read-only where
/// in-cluster clients look, unless the pod or its account opts out or the pod mounts
/// something there itself.
#[test]
fn new_pods_get_their_service_account_token_mounted_unless_they_opt_out() {
    let cp = ControlPlane::start();
    let path = "/var/run/secrets/kubernetes.io/serviceaccount";
    let manifests = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: sa}}\n---\n\
apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: quiet, namespace: sa}}\nautomountServiceAccountToken: false\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {{name: plain, namespace: sa}}\nspec:\n  initContainers: [{{name: init, image: busybox}}]\n  containers: [{{name: a, image: busybox}}, {{name: b, image: busybox}}]\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {{name: optout, namespace: sa}}\nspec:\n  automountServiceAccountToken: false\n  containers: [{{name: a, image: busybox}}]\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {{name: quietaccount, namespace: sa}}\nspec:\n  serviceAccountName: quiet\n  containers: [{{name: a, image: busybox}}]\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {{name: own, namespace: sa}}\nspec:\n  containers:\n  - name: a\n    image: busybox\n    volumeMounts: [{{name: mine, mountPath: {path}}}]\n  volumes: [{{name: mine, emptyDir: {{}}}}]\n"
    );
    cp.kubectl_with(&["apply", "-f", "-"], Some(&manifests), &[]);

    let plain = cp.kubectl_json(&["-n", "sa", "get", "pod", "plain"]);
    let volumes = plain["spec"]["volumes"].as_array().expect("volumes");
    assert_eq!(volumes.len(), 1, "{plain}");
    let name = volumes[0]["name"].as_str().unwrap();
    assert!(name.starts_with("kube-api-access-"), "{name}");
    let sources = &volumes[0]["projected"]["sources"];
    assert_eq!(sources[0]["serviceAccountToken"]["path"], "token");
    assert_eq!(sources[1]["configMap"]["name"], "kube-root-ca.crt");
    assert_eq!(
        sources[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    for c in ["initContainers", "containers"]
        .iter()
        .flat_map(|k| plain["spec"][k].as_array().unwrap())
    {
        assert_eq!(
            c["volumeMounts"],
            json!([{"name": name, "mountPath": path, "readOnly": true}]),
            "{c}"
        );
    }
    assert_eq!(plain["spec"]["serviceAccountName"], "default");

    for opted_out in ["optout", "quietaccount"] {
        let pod = cp.kubectl_json(&["-n", "sa", "get", "pod", opted_out]);
        assert!(pod["spec"]["volumes"].is_null(), "{pod}");
        assert!(
            pod["spec"]["containers"][0]["volumeMounts"].is_null(),
            "{pod}"
        );
    }
    let own = cp.kubectl_json(&["-n", "sa", "get", "pod", "own"]);
    assert_eq!(
        own["spec"]["volumes"].as_array().map(Vec::len),
        Some(1),
        "{own}"
    );
    assert_eq!(own["spec"]["volumes"][0]["name"], "mine");
}
