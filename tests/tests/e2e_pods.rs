//! Issue 7's pod behaviours end to end, on one node of the real stack (control plane,
//! `ferrolet-shim`, our CNI plugins, the `ferrolet` agent): probes failing and recovering,
//! a crash loop backing off, a failing init container, a graceful delete running its
//! preStop hook, a configMap update reaching a mounted file, `kubectl logs`, image
//! garbage collection, and a projected service account token that the API server accepts.
//! Checked through kubectl as a user would.
//!
//! The pod checks share one cluster: their pods are created together and each is then
//! checked with its own deadline, so the slow ones (backoffs) overlap.
//!
//! Needs root, kubectl, busybox-static, and the workspace binaries built first:
//! `cargo build -p ferrolet -p ferrolet-shim -p ferrolet-control-plane -p ferrolet-cni --bins`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferrolet_oci_image::{ImageFormat, ImageReference, ImageSettings, ImageSpec, Ownership};
use ferrolet_tests::cluster::{Cluster, ClusterOptions, condition, workspace_binary};
use ferrolet_tests::images::{BUSYBOX_IMAGE, PAUSE_IMAGE};
use ferrolet_tests::wait::poll_until;
use serde_json::{Value, json};

fn pod(name: &str, node: &str, grace: i64, spec: Value) -> Value {
    let mut spec = spec;
    spec["nodeName"] = json!(node);
    spec["terminationGracePeriodSeconds"] = json!(grace);
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default"},
        "spec": spec,
    })
}

fn busybox(name: &str, script: &str) -> Value {
    json!({
        "name": name,
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "Never",
        "command": ["sh", "-c", script],
    })
}

fn exec_probe(file: &str) -> Value {
    json!({
        "exec": {"command": ["cat", file]},
        "periodSeconds": 1,
        "failureThreshold": 1,
        "timeoutSeconds": 1,
    })
}

/// The status of the pod's first (app or init) container.
fn first<'a>(pod: &'a Value, field: &str) -> &'a Value {
    &pod["status"][field][0]
}

fn restarts(pod: &Value) -> i64 {
    first(pod, "containerStatuses")["restartCount"]
        .as_i64()
        .unwrap_or(0)
}

fn running(pod: &Value) -> bool {
    first(pod, "containerStatuses")["state"]["running"].is_object()
}

fn waiting_reason(status: &Value) -> Option<&str> {
    status["state"]["waiting"]["reason"].as_str()
}

/// The STATUS column of `kubectl get pod`.
fn kubectl_status(cluster: &Cluster, name: &str) -> String {
    cluster
        .kubectl_ok(&["get", "pod", name, "--no-headers"])
        .ok()
        .and_then(|line| line.split_whitespace().nth(2).map(str::to_owned))
        .unwrap_or_default()
}

/// Reasons of the events in namespace default about the `kind` named `name`.
fn events(cluster: &Cluster, kind: &str, name: &str) -> Vec<String> {
    let text = cluster
        .kubectl_ok(&["get", "events", "-o", "json"])
        .unwrap_or_default();
    let list: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["kind"] == kind && e["involvedObject"]["name"] == name)
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect()
}

/// Polls `kubectl logs` (of a pod's only container) until `cond` holds; returns the logs.
fn wait_logs(
    cluster: &mut Cluster,
    name: &str,
    within: Duration,
    what: &str,
    cond: impl Fn(&str) -> bool,
) -> String {
    let mut last = String::new();
    let ok = poll_until(within, Duration::from_millis(300), || {
        last = cluster.kubectl_ok(&["logs", name]).unwrap_or_default();
        cond(&last)
    });
    assert!(
        ok,
        "logs of {name} not {what} within {within:?}; last:\n{last}\n{}",
        cluster.logs()
    );
    last
}

#[test]
fn probes_crash_loops_init_failures_pre_stop_config_maps_and_logs_on_a_real_node() {
    let mut cluster = Cluster::start(ClusterOptions::default()).expect("cluster");
    let node = cluster.node_name.clone();
    let host_dir = cluster.dir.join("prestop");
    let host_path = host_dir.to_string_lossy().into_owned();

    cluster
        .create(&json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "greeting", "namespace": "default"},
            "data": {"message": "first-version"},
        }))
        .expect("configMap");
    let mut live = busybox(
        "app",
        "touch /tmp/alive; sleep 3; rm /tmp/alive; exec sleep 3600",
    );
    live["livenessProbe"] = exec_probe("/tmp/alive");
    let mut ready = busybox(
        "app",
        "sleep 12; touch /tmp/ready; echo now-ready; exec sleep 3600",
    );
    ready["readinessProbe"] = exec_probe("/tmp/ready");
    let mut stopping = busybox(
        "app",
        "trap 'echo got-sigterm >> /host/out; exit 0' TERM; while true; do sleep 1; done",
    );
    stopping["volumeMounts"] = json!([{"name": "host", "mountPath": "/host"}]);
    stopping["lifecycle"] = json!({"preStop": {"exec": {"command":
        ["sh", "-c", "echo pre-stop-ran >> /host/out"]}}});
    let mut reader = busybox(
        "app",
        "while true; do echo \"message=$(cat /etc/greeting/message)\"; sleep 1; done",
    );
    reader["volumeMounts"] = json!([{"name": "cfg", "mountPath": "/etc/greeting"}]);

    let pods = [
        pod("liveness", &node, 1, json!({"containers": [live]})),
        pod("readiness", &node, 1, json!({"containers": [ready]})),
        pod(
            "crashloop",
            &node,
            1,
            json!({"containers": [busybox("app", "echo crashing; exit 1")]}),
        ),
        pod(
            "initfail",
            &node,
            1,
            json!({
                "initContainers": [busybox("init", "echo init failing; exit 1")],
                "containers": [busybox("app", "echo app-started; exec sleep 3600")],
            }),
        ),
        pod(
            "prestop",
            &node,
            10,
            json!({
                "containers": [stopping],
                "volumes": [{"name": "host", "hostPath":
                    {"path": host_path, "type": "DirectoryOrCreate"}}],
            }),
        ),
        pod(
            "configmap",
            &node,
            1,
            json!({
                "containers": [reader],
                "volumes": [{"name": "cfg", "configMap": {"name": "greeting"}}],
            }),
        ),
        pod(
            "logs",
            &node,
            1,
            json!({"containers": [busybox("app", "echo line-one; echo line-two; exec sleep 3600")]}),
        ),
    ];
    for p in &pods {
        cluster.create(p).expect("create pod");
    }

    // Readiness first: its failing phase lasts only the container's first 12 seconds.
    let pod = cluster
        .wait_pod(
            "default",
            "readiness",
            Duration::from_secs(11),
            "running but not Ready",
            |p| running(p) && condition(p, "Ready") == Some("False"),
        )
        .expect("readiness failing");
    assert_eq!(first(&pod, "containerStatuses")["ready"], false);
    assert_eq!(condition(&pod, "ContainersReady"), Some("False"));
    let pod = cluster
        .wait_pod(
            "default",
            "readiness",
            Duration::from_secs(30),
            "Ready after its probe passes",
            |p| condition(p, "Ready") == Some("True"),
        )
        .expect("readiness recovered");
    assert_eq!(first(&pod, "containerStatuses")["ready"], true);
    assert_eq!(restarts(&pod), 0, "readiness never restarts a container");

    // Liveness: the probe fails 3s in, and the container is killed and started again.
    let pod = cluster
        .wait_pod(
            "default",
            "liveness",
            Duration::from_secs(30),
            "restarted by its liveness probe",
            |p| restarts(p) >= 1,
        )
        .expect("liveness restart");
    assert!(
        first(&pod, "containerStatuses")["lastState"]["terminated"].is_object(),
        "{:#}",
        pod["status"]
    );
    let unhealthy = events(&cluster, "Pod", "liveness");
    assert!(
        unhealthy.iter().any(|r| r == "Unhealthy"),
        "events of the liveness pod: {unhealthy:?}"
    );

    // Crash loop: backoff shown as CrashLoopBackOff, restarts keep coming (10s, then 20s).
    let pod = cluster
        .wait_pod(
            "default",
            "crashloop",
            Duration::from_secs(30),
            "in CrashLoopBackOff after a restart",
            |p| {
                restarts(p) >= 1
                    && waiting_reason(first(p, "containerStatuses")) == Some("CrashLoopBackOff")
            },
        )
        .expect("crash loop");
    let seen = restarts(&pod);
    let last = &first(&pod, "containerStatuses")["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 1, "{:#}", pod["status"]);
    assert_eq!(kubectl_status(&cluster, "crashloop"), "CrashLoopBackOff");
    cluster
        .wait_pod(
            "default",
            "crashloop",
            Duration::from_secs(40),
            "restarted again after its backoff",
            |p| restarts(p) > seen,
        )
        .expect("crash loop restarts grow");

    // A failing init container: retried with backoff, the app container never starts.
    let pod = cluster
        .wait_pod(
            "default",
            "initfail",
            Duration::from_secs(30),
            "shown as a failed init",
            |p| {
                let init = first(p, "initContainerStatuses");
                init["restartCount"].as_i64().unwrap_or(0) >= 1
                    && (init["lastState"]["terminated"]["exitCode"] == 1
                        || init["state"]["terminated"]["exitCode"] == 1)
            },
        )
        .expect("init failing");
    let app = first(&pod, "containerStatuses");
    assert_eq!(waiting_reason(app), Some("PodInitializing"), "{app:#}");
    assert_eq!(app["restartCount"], 0);
    assert_eq!(condition(&pod, "Initialized"), Some("False"));
    assert_eq!(pod["status"]["phase"], "Pending");
    // kubectl's STATUS column alternates between the two as the backoff runs.
    let mut shown = String::new();
    let failed_init = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        shown = kubectl_status(&cluster, "initfail");
        shown == "Init:Error" || shown == "Init:CrashLoopBackOff"
    });
    assert!(
        failed_init,
        "kubectl shows {shown:?}; pod status {:#}",
        cluster
            .pod("default", "initfail")
            .ok()
            .flatten()
            .unwrap_or_default()["status"]
    );
    let app_logs = cluster
        .kubectl(&["logs", "initfail", "-c", "app"])
        .expect("kubectl logs");
    assert!(
        !String::from_utf8_lossy(&app_logs.stdout).contains("app-started"),
        "the app container ran"
    );

    // kubectl logs: the container's output, whole and tailed.
    wait_logs(
        &mut cluster,
        "logs",
        Duration::from_secs(30),
        "both lines",
        |l| l == "line-one\nline-two\n",
    );
    let tail = cluster
        .kubectl_ok(&["logs", "logs", "--tail=1"])
        .expect("kubectl logs --tail");
    assert_eq!(tail, "line-two\n");

    // A configMap update reaches the mounted file.
    wait_logs(
        &mut cluster,
        "configmap",
        Duration::from_secs(30),
        "showing the first version",
        |l| l.contains("message=first-version"),
    );
    let changed = cluster.dir.join("greeting-v2.json");
    fs::write(
        &changed,
        serde_json::to_vec(&json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "greeting", "namespace": "default"},
            "data": {"message": "second-version"},
        }))
        .expect("json"),
    )
    .expect("write configMap");
    cluster
        .kubectl_ok(&["apply", "-f", &changed.to_string_lossy()])
        .expect("kubectl apply");
    wait_logs(
        &mut cluster,
        "configmap",
        Duration::from_secs(90),
        "showing the updated file",
        |l| l.contains("message=second-version"),
    );

    // Graceful delete: preStop runs, then the container gets SIGTERM, and the pod goes.
    cluster
        .wait_pod(
            "default",
            "prestop",
            Duration::from_secs(30),
            "running",
            running,
        )
        .expect("prestop pod running");
    cluster
        .kubectl_ok(&["delete", "pod", "prestop", "--wait=false"])
        .expect("kubectl delete");
    cluster
        .wait_pod_gone("default", "prestop", Duration::from_secs(30))
        .expect("prestop pod gone");
    let out = fs::read_to_string(host_dir.join("out")).unwrap_or_default();
    assert_eq!(
        out, "pre-stop-ran\ngot-sigterm\n",
        "the hook, then SIGTERM, each once"
    );
}

/// Builds a one-file image `reference` as an OCI archive in `dir`.
fn tiny_image(dir: &Path, reference: &str) -> std::path::PathBuf {
    let layer = dir.join("spare-layer");
    fs::create_dir_all(&layer).expect("layer dir");
    fs::write(layer.join("spare.txt"), "only for image GC\n").expect("layer file");
    let archive = dir.join("spare.tar");
    ferrolet_oci_image::build_image(
        &ImageSpec {
            reference: ImageReference::parse(reference).expect("reference"),
            layers: vec![layer],
            settings: ImageSettings::default(),
            ownership: Ownership::Fixed { uid: 0, gid: 0 },
        },
        ImageFormat::OciArchive,
        &archive,
    )
    .expect("building the spare image");
    archive
}

/// `ferrolet-shim images <args> --root <the cluster's>`; its stdout.
fn shim_images(cluster: &Cluster, args: &[&str]) -> String {
    let out = Command::new(workspace_binary("ferrolet-shim").expect("shim binary"))
        .arg("images")
        .args(args)
        .arg("--root")
        .arg(&cluster.shim_root)
        .output()
        .expect("running ferrolet-shim images");
    assert!(
        out.status.success(),
        "ferrolet-shim images {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn has_image(listing: &str, name: &str) -> bool {
    listing.lines().any(|l| {
        l.split_whitespace()
            .nth(2)
            .is_some_and(|tags| tags.split(',').any(|t| t == name))
    })
}

#[test]
fn image_gc_removes_an_unused_image_and_keeps_those_in_use() {
    const SPARE: &str = "ferrolet.local/spare:gc";
    let mut cluster = Cluster::start(ClusterOptions::default()).expect("cluster");
    let node = cluster.node_name.clone();
    cluster
        .create(&pod(
            "user",
            &node,
            1,
            json!({"containers": [busybox("app", "exec sleep 3600")]}),
        ))
        .expect("create pod");
    let before = cluster
        .wait_pod(
            "default",
            "user",
            Duration::from_secs(30),
            "running",
            running,
        )
        .expect("pod running");
    let container_id = first(&before, "containerStatuses")["containerID"].clone();

    let archive = tiny_image(&cluster.dir, SPARE);
    shim_images(&cluster, &["import", &archive.to_string_lossy()]);
    assert!(has_image(&shim_images(&cluster, &["list"]), SPARE));

    // Restarted with thresholds that always collect (no image is too young): usage can
    // never reach 0%, so the GC removes all it may and reports that it freed too little.
    cluster.kill_agent();
    let config = cluster.dir.join("gc-config.yaml");
    fs::write(
        &config,
        "imageGCHighThresholdPercent: 0\nimageGCLowThresholdPercent: 0\nimageMinimumGCAge: 0s\n",
    )
    .expect("config file");
    cluster
        .options
        .agent_args
        .extend(["--config".to_owned(), config.to_string_lossy().into_owned()]);
    cluster.start_agent().expect("agent restart");

    let mut listing = String::new();
    let gone = poll_until(Duration::from_secs(40), Duration::from_millis(500), || {
        listing = shim_images(&cluster, &["list"]);
        !has_image(&listing, SPARE)
    });
    if !gone {
        cluster.ensure_running().expect("the cluster's daemons");
    }
    assert!(gone, "{SPARE} still there:\n{listing}\n{}", cluster.logs());
    assert!(
        has_image(&listing, BUSYBOX_IMAGE),
        "busybox (in use) removed:\n{listing}"
    );
    assert!(
        has_image(&listing, PAUSE_IMAGE),
        "the pause image removed:\n{listing}"
    );

    let mut reasons = Vec::new();
    let reported = poll_until(Duration::from_secs(20), Duration::from_millis(500), || {
        reasons = events(&cluster, "Node", &node);
        reasons.iter().any(|r| r == "FreeDiskSpaceFailed")
    });
    assert!(
        reported,
        "no FreeDiskSpaceFailed event on the node: {reasons:?}"
    );

    let after = cluster.pod("default", "user").expect("get").expect("pod");
    assert!(running(&after), "{:#}", after["status"]);
    assert_eq!(
        first(&after, "containerStatuses")["containerID"],
        container_id
    );
    assert_eq!(restarts(&after), 0);
}

/// kubectl as a client holding only `token`: no client certificate, the cluster's CA.
fn kubectl_with_token(cluster: &Cluster, token: &str, args: &[&str]) -> std::process::Output {
    let admin = fs::read_to_string(&cluster.kubeconfig).expect("kubeconfig");
    let server = admin
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: "))
        .expect("server in kubeconfig")
        .to_owned();
    let empty = cluster.dir.join("token-only.kubeconfig");
    fs::write(&empty, "apiVersion: v1\nkind: Config\n").expect("empty kubeconfig");
    let ca = cluster.dir.join("cp/pki/ca.crt");
    Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&empty)
        .arg("--server")
        .arg(&server)
        .arg("--certificate-authority")
        .arg(&ca)
        .arg("--token")
        .arg(token)
        .args(args)
        .output()
        .expect("kubectl")
}

#[test]
fn a_pod_reads_its_service_account_token_and_namespace_and_the_token_authenticates() {
    let mut cluster = Cluster::start(ClusterOptions::default()).expect("cluster");
    let node = cluster.node_name.clone();
    // The namespace controller gives default its account and the cluster CA.
    let mut ca = String::new();
    let published = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
        ca = cluster
            .kubectl_ok(&[
                "get",
                "configmap",
                "kube-root-ca.crt",
                "-o",
                "jsonpath={.data.ca\\.crt}",
            ])
            .unwrap_or_default();
        !ca.is_empty()
            && cluster
                .kubectl_ok(&["get", "serviceaccount", "default"])
                .is_ok()
    });
    assert!(published, "kube-root-ca.crt or the default account missing");
    assert_eq!(
        ca,
        fs::read_to_string(cluster.dir.join("cp/pki/ca.crt")).expect("ca")
    );

    let dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let kube_api_access = |account_path: &str| {
        json!({"name": "kube-api-access", "projected": {"sources": [
            {"serviceAccountToken": {"path": account_path, "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {"downwardAPI": {"items": [{"path": "namespace",
                "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
        ]}})
    };
    let mut reader = busybox(
        "app",
        &format!(
            "echo \"uid=$(id -u)\"; echo \"ns=$(cat {dir}/namespace)\"; \
             echo \"mode=$(stat -L -c %a {dir}/token)\"; \
             echo \"mem=$(cat /etc/info/mem)\"; grep -c CERTIFICATE {dir}/ca.crt; \
             echo \"token=$(cat {dir}/token)\"; exec sleep 3600"
        ),
    );
    reader["resources"] = json!({"limits": {"memory": "64Mi"}});
    // Not root: the 0600 token must be the pod user's.
    reader["securityContext"] = json!({"runAsUser": 1000});
    reader["volumeMounts"] = json!([
        {"name": "kube-api-access", "mountPath": dir, "readOnly": true},
        {"name": "info", "mountPath": "/etc/info"},
    ]);
    let info = json!({"name": "info", "downwardAPI": {"items": [{"path": "mem",
        "resourceFieldRef": {"containerName": "app", "resource": "limits.memory", "divisor": "1Mi"}}]}});
    let mut orphan = busybox("app", "echo started; exec sleep 3600");
    orphan["volumeMounts"] = json!([{"name": "kube-api-access", "mountPath": dir}]);
    let mut orphan_spec = json!({
        "serviceAccountName": "ghost",
        "containers": [orphan],
        "volumes": [kube_api_access("token")],
    });
    orphan_spec["nodeName"] = json!(node);
    cluster
        .create(&pod(
            "token-reader",
            &node,
            1,
            json!({"containers": [reader], "volumes": [kube_api_access("token"), info]}),
        ))
        .expect("reader pod");
    cluster
        .create(&pod("no-account", &node, 1, orphan_spec))
        .expect("pod of a missing account");
    // A pod that lists no volume gets the same one from ServiceAccount admission.
    let auto = busybox(
        "app",
        &format!(
            "echo \"auto-ns=$(cat {dir}/namespace)\"; echo \"auto-ca=$(grep -c CERTIFICATE {dir}/ca.crt)\"; \
             echo \"auto-token=$(cut -c1-2 {dir}/token)\"; exec sleep 3600"
        ),
    );
    cluster
        .create(&pod("auto-token", &node, 1, json!({"containers": [auto]})))
        .expect("pod with an admitted token volume");

    let logs = wait_logs(
        &mut cluster,
        "token-reader",
        Duration::from_secs(20),
        "showing the token",
        |l| l.contains("token=ey"),
    );
    assert!(logs.contains("uid=1000\n"), "{logs}");
    assert!(logs.contains("ns=default\n"), "{logs}");
    assert!(logs.contains("mode=600\n"), "{logs}");
    assert!(logs.contains("mem=64\n"), "{logs}");
    let auto_logs = wait_logs(
        &mut cluster,
        "auto-token",
        Duration::from_secs(20),
        "reading its admitted token",
        |l| l.contains("auto-token="),
    );
    assert!(auto_logs.contains("auto-ns=default\n"), "{auto_logs}");
    assert!(auto_logs.contains("auto-token=ey\n"), "{auto_logs}");
    assert!(!auto_logs.contains("auto-ca=0\n"), "{auto_logs}");
    let token = logs
        .lines()
        .find_map(|l| l.strip_prefix("token="))
        .expect("token line")
        .to_owned();

    // The mounted token is a credential the API server takes: the pod reads itself.
    let out = kubectl_with_token(
        &cluster,
        &token,
        &["get", "pod", "token-reader", "-n", "default", "-o", "name"],
    );
    assert!(
        out.status.success(),
        "token refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "pod/token-reader"
    );
    // One character changed in the signature: 401.
    let mut tampered = token.clone();
    let last = tampered.pop().expect("non-empty");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let out = kubectl_with_token(
        &cluster,
        &tampered,
        &["get", "pod", "token-reader", "-n", "default"],
    );
    assert!(!out.status.success(), "tampered token accepted");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthorized"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `kubectl create token` (protobuf TokenRequest) works too; a token for another
    // audience is not one the API server takes.
    let made = cluster
        .kubectl_ok(&["create", "token", "default", "--duration", "10m"])
        .expect("kubectl create token");
    let out = kubectl_with_token(&cluster, made.trim(), &["get", "serviceaccount", "default"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vault = cluster
        .kubectl_ok(&["create", "token", "default", "--audience", "vault"])
        .expect("kubectl create token --audience");
    let out = kubectl_with_token(
        &cluster,
        vault.trim(),
        &["get", "serviceaccount", "default"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Unauthorized"),
        "a token for vault was taken: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No such account: the container never starts and the pod says why.
    let pod = cluster
        .wait_pod(
            "default",
            "no-account",
            Duration::from_secs(10),
            "held for its missing service account",
            |p| {
                first(p, "containerStatuses")["state"]["waiting"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("serviceaccount default/ghost not found"))
            },
        )
        .expect("missing account reported");
    assert_eq!(
        waiting_reason(first(&pod, "containerStatuses")),
        Some("ContainerCreating")
    );
    let mut reasons = Vec::new();
    let reported = poll_until(Duration::from_secs(5), Duration::from_millis(200), || {
        reasons = events(&cluster, "Pod", "no-account");
        reasons.iter().any(|r| r == "FailedMount")
    });
    assert!(reported, "events of the pod: {reasons:?}");
    assert!(
        cluster
            .kubectl_ok(&["logs", "no-account"])
            .unwrap_or_default()
            .is_empty(),
        "the container of a pod without its account ran"
    );
}
