//! One node end to end: the real control plane, `ferrolet-shim`, our CNI plugins and the
//! `ferrolet` agent (see `ferrolet_tests::cluster`). A pod created with kubectl gets an IP,
//! runs, answers HTTP on its pod IP from the host, and on delete is torn down (CNI DEL,
//! sandbox removed) and leaves the API.
//!
//! Needs root, kubectl, busybox-static, and the workspace binaries built first:
//! `cargo build -p ferrolet -p ferrolet-shim -p ferrolet-control-plane -p ferrolet-cni --bins`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ferrolet_cri::v1;
use ferrolet_cri::v1::runtime_service_client::RuntimeServiceClient;
use ferrolet_tests::cluster::{Cluster, ClusterOptions, NodeRuntime, condition, http_get};
use ferrolet_tests::images::BUSYBOX_IMAGE;
use ferrolet_tests::wait::poll_until;
use serde_json::{Value, json};

/// A busybox pod bound to `node` serving `index.html` (holding `greeting`) with httpd on 8080.
fn web_pod(name: &str, node: &str, greeting: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "web",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["sh", "-c", format!(
                    "echo {greeting} > /var/www/index.html; echo serving; exec httpd -f -p 8080 -h /var/www"
                )],
                "ports": [{"containerPort": 8080}],
            }],
        },
    })
}

fn running(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running" && condition(pod, "Ready") == Some("True")
}

fn pod_ip(pod: &Value) -> Option<Ipv4Addr> {
    pod["status"]["podIP"].as_str()?.parse().ok()
}

/// The CRI sandboxes whose pod UID label is `uid`.
/// Creates the pod `web` serving `greeting` on this node and waits for it to be Running and
/// Ready with an IP in the test's subnet; returns the pod, its uid and its IP.
fn run_web_pod(cluster: &mut Cluster, greeting: &str) -> (Value, String, Ipv4Addr) {
    let node = cluster.node_name.clone();
    cluster
        .create(&web_pod("web", &node, greeting))
        .expect("create pod");
    let pod = cluster
        .wait_pod(
            "default",
            "web",
            Duration::from_secs(90),
            "Running and Ready",
            running,
        )
        .expect("pod running");
    let uid = pod["metadata"]["uid"].as_str().expect("uid").to_owned();
    let ip = pod_ip(&pod).expect("pod IP in status");
    assert!(
        cluster.network.contains(ip),
        "pod IP {ip} outside the test's subnet {}",
        cluster.network.cidr()
    );
    (pod, uid, ip)
}

/// The web pod at `ip` answers with `greeting` (httpd may start a moment after the
/// container is reported running).
fn assert_serves(ip: Ipv4Addr, greeting: &str) {
    let addr = SocketAddr::from((ip, 8080));
    let mut answer = None;
    let served = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        answer = http_get(addr, "/index.html").ok();
        answer.as_ref().is_some_and(|(code, _)| *code == 200)
    });
    assert!(served, "no HTTP 200 from {addr}: {answer:?}");
    assert_eq!(answer.unwrap_or_default().1.trim(), greeting);
}

/// Deletes the web pod and checks its sandboxes went with it: the agent's final delete
/// comes after teardown, so nothing is left once the pod is gone from the API.
fn delete_web_pod(cluster: &mut Cluster, uid: &str) {
    cluster
        .kubectl_ok(&["delete", "pod", "web", "--wait=false"])
        .expect("delete pod");
    cluster
        .wait_pod_gone("default", "web", Duration::from_secs(60))
        .expect("pod gone from the API");
    assert!(
        sandboxes_of(&cluster.cri_socket, uid).is_empty(),
        "sandbox left after delete\n{}",
        cluster.logs()
    );
}

fn sandboxes_of(socket: &Path, uid: &str) -> Vec<v1::PodSandbox> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let channel = ferrolet_cri::connect_unix(socket)
            .await
            .expect("connecting to the shim");
        let mut client = RuntimeServiceClient::new(channel);
        client
            .list_pod_sandbox(v1::ListPodSandboxRequest {
                filter: Some(v1::PodSandboxFilter {
                    label_selector: [("io.kubernetes.pod.uid".to_owned(), uid.to_owned())].into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("ListPodSandbox")
            .into_inner()
            .items
    })
}

#[test]
fn pod_runs_serves_on_its_ip_and_is_torn_down_on_delete() {
    let mut cluster = Cluster::start(ClusterOptions::default()).expect("cluster");
    let (pod, uid, ip) = run_web_pod(&mut cluster, "hello-from-web");
    assert_eq!(pod["status"]["hostIP"], "127.0.0.1", "{:#}", pod["status"]);
    let status = &pod["status"]["containerStatuses"][0];
    assert_eq!(status["name"], "web");
    assert_eq!(status["restartCount"], 0);
    assert!(status["state"]["running"].is_object(), "{status:#}");
    assert!(
        status["containerID"]
            .as_str()
            .is_some_and(|id| id.contains("://")),
        "{status:#}"
    );
    assert_eq!(cluster.allocated_ips(), vec![ip]);
    assert_eq!(
        cluster.network.bridge_ports().len(),
        1,
        "one veth on the bridge"
    );
    let sandboxes = sandboxes_of(&cluster.cri_socket, &uid);
    assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");

    assert_serves(ip, "hello-from-web");
    delete_web_pod(&mut cluster, &uid);
    assert!(
        cluster.allocated_ips().is_empty(),
        "CNI DEL did not release the IP: {:?}",
        cluster.allocated_ips()
    );
    assert!(
        cluster.network.bridge_ports().is_empty(),
        "veth left on the bridge: {:?}",
        cluster.network.bridge_ports()
    );
    let addr = SocketAddr::from((ip, 8080));
    assert!(
        http_get(addr, "/index.html").is_err(),
        "{addr} still answers after the delete"
    );
    cluster.ensure_running().expect("daemons alive");
}

/// The CRI containers of the pod with `uid`, as `(id, attempt, state)`.
fn containers_of(socket: &Path, uid: &str) -> Vec<(String, u32, i32)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let channel = ferrolet_cri::connect_unix(socket)
            .await
            .expect("connecting to the shim");
        let mut client = RuntimeServiceClient::new(channel);
        client
            .list_containers(v1::ListContainersRequest {
                filter: Some(v1::ContainerFilter {
                    label_selector: [("io.kubernetes.pod.uid".to_owned(), uid.to_owned())].into(),
                    ..Default::default()
                }),
            })
            .await
            .expect("ListContainers")
            .into_inner()
            .containers
            .into_iter()
            .map(|c| (c.id, c.metadata.map_or(0, |m| m.attempt), c.state))
            .collect()
    })
}

fn uid_of(pod: &Value) -> String {
    pod["metadata"]["uid"].as_str().expect("uid").to_owned()
}

#[test]
fn agent_killed_and_restarted_keeps_running_pods_and_catches_up() {
    let mut cluster = Cluster::start(ClusterOptions::default()).expect("cluster");
    let node = cluster.node_name.clone();
    for (name, greeting) in [("keep", "kept"), ("doomed", "bye"), ("forced", "gone")] {
        cluster
            .create(&web_pod(name, &node, greeting))
            .expect("create pod");
    }
    let mut before = std::collections::HashMap::new();
    for name in ["keep", "doomed", "forced"] {
        let pod = cluster
            .wait_pod("default", name, Duration::from_secs(90), "Running", running)
            .expect("pod running");
        before.insert(name, pod);
    }
    let keep_uid = uid_of(&before["keep"]);
    let keep_id = before["keep"]["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .expect("containerID")
        .to_owned();
    let keep_ip = pod_ip(&before["keep"]).expect("keep IP");
    let doomed_uid = uid_of(&before["doomed"]);
    let forced_uid = uid_of(&before["forced"]);
    let doomed_ip = pod_ip(&before["doomed"]).expect("doomed IP");
    let forced_ip = pod_ip(&before["forced"]).expect("forced IP");
    let runtime_before = containers_of(&cluster.cri_socket, &keep_uid);
    assert_eq!(runtime_before.len(), 1, "{runtime_before:?}");

    cluster.kill_agent();
    // While the agent is down: a graceful delete (the pod waits in the API for its node),
    // a forced one (the pod is gone from the API at once) and a new pod.
    cluster
        .kubectl_ok(&["delete", "pod", "doomed", "--wait=false"])
        .expect("delete doomed");
    cluster
        .kubectl_ok(&["delete", "pod", "forced", "--grace-period=0", "--force"])
        .expect("force delete");
    cluster
        .create(&web_pod("newcomer", &node, "hello-again"))
        .expect("create newcomer");
    // Nothing acted on them meanwhile.
    assert_eq!(sandboxes_of(&cluster.cri_socket, &doomed_uid).len(), 1);
    assert_eq!(sandboxes_of(&cluster.cri_socket, &forced_uid).len(), 1);

    cluster.start_agent().expect("restart the agent");
    let newcomer = cluster
        .wait_pod(
            "default",
            "newcomer",
            Duration::from_secs(90),
            "Running",
            running,
        )
        .expect("newcomer runs");
    cluster
        .wait_pod_gone("default", "doomed", Duration::from_secs(60))
        .expect("doomed finished deleting");
    let torn_down = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        sandboxes_of(&cluster.cri_socket, &doomed_uid).is_empty()
            && sandboxes_of(&cluster.cri_socket, &forced_uid).is_empty()
            && !cluster.allocated_ips().contains(&doomed_ip)
            && !cluster.allocated_ips().contains(&forced_ip)
    });
    assert!(
        torn_down,
        "deleted pods not torn down (sandboxes {:?} {:?}, IPs {:?})\n{}",
        sandboxes_of(&cluster.cri_socket, &doomed_uid),
        sandboxes_of(&cluster.cri_socket, &forced_uid),
        cluster.allocated_ips(),
        cluster.logs()
    );

    let keep = cluster
        .wait_pod(
            "default",
            "keep",
            Duration::from_secs(30),
            "Running",
            running,
        )
        .expect("keep still runs");
    let status = &keep["status"]["containerStatuses"][0];
    assert_eq!(
        status["containerID"].as_str(),
        Some(keep_id.as_str()),
        "{status:#}"
    );
    assert_eq!(status["restartCount"], 0, "{status:#}");
    assert_eq!(
        containers_of(&cluster.cri_socket, &keep_uid),
        runtime_before,
        "the runtime ran no new container for keep"
    );
    assert_eq!(pod_ip(&keep), Some(keep_ip));
    let (code, body) =
        http_get(SocketAddr::from((keep_ip, 8080)), "/index.html").expect("keep answers");
    assert_eq!((code, body.trim()), (200, "kept"));
    let new_ip = pod_ip(&newcomer).expect("newcomer IP");
    let mut answer = None;
    let served = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        answer = http_get(SocketAddr::from((new_ip, 8080)), "/index.html").ok();
        answer.as_ref().is_some_and(|(code, _)| *code == 200)
    });
    assert!(served, "newcomer does not answer: {answer:?}");
    let mut ips = cluster.allocated_ips();
    ips.sort();
    let mut want = vec![keep_ip, new_ip];
    want.sort();
    assert_eq!(ips, want, "only the two live pods hold IPs");
    cluster.ensure_running().expect("daemons alive");
}

#[test]
fn kubelet_api_serves_pods_logs_and_metrics_to_clients_of_the_cluster_ca() {
    let mut cluster = Cluster::start(ClusterOptions::default()).expect("cluster");
    let node = cluster.node_name.clone();
    let node_json: Value = serde_json::from_str(
        &cluster
            .kubectl_ok(&["get", "node", &node, "-o", "json"])
            .expect("get node"),
    )
    .expect("node json");
    assert_eq!(
        node_json["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"], cluster.kubelet_port,
        "{:#}",
        node_json["status"]
    );
    cluster
        .create(&web_pod("web", &node, "hi"))
        .expect("create pod");
    cluster
        .wait_pod(
            "default",
            "web",
            Duration::from_secs(90),
            "Running",
            running,
        )
        .expect("pod running");

    // No client certificate: refused in HTTP, on every endpoint.
    for path in [
        "/healthz",
        "/pods",
        "/metrics",
        "/containerLogs/default/web/web",
    ] {
        let (code, body) = cluster.kubelet_get(path, false).expect("curl");
        assert_eq!(code, 401, "{path}: {body}");
    }
    assert_eq!(
        cluster.kubelet_get("/healthz", true).expect("healthz"),
        (200, "ok\n".to_owned())
    );
    let (code, body) = cluster.kubelet_get("/pods", true).expect("pods");
    assert_eq!(code, 200, "{body}");
    let pods: Value = serde_json::from_str(&body).expect("PodList json");
    assert_eq!(pods["kind"], "PodList");
    assert_eq!(pods["items"][0]["metadata"]["name"], "web", "{pods:#}");

    let path = "/containerLogs/default/web/web";
    let mut last = None;
    let logged = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        last = cluster.kubelet_get(path, true).ok();
        last.as_ref()
            .is_some_and(|(code, body)| *code == 200 && body == "serving\n")
    });
    assert!(logged, "container log: {last:?}");
    let (code, body) = cluster
        .kubelet_get(&format!("{path}?timestamps=true&tailLines=1"), true)
        .expect("timestamps");
    assert_eq!(code, 200);
    assert!(
        body.ends_with(" serving\n") && body.contains('T'),
        "{body:?}"
    );
    let (code, body) = cluster
        .kubelet_get(&format!("{path}?limitBytes=3"), true)
        .expect("limit");
    assert_eq!((code, body.as_str()), (200, "ser"));
    let (code, body) = cluster
        .kubelet_get(&format!("{path}?previous=true"), true)
        .expect("previous");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("previous terminated container"), "{body}");
    let (code, body) = cluster
        .kubelet_get(&format!("{path}?tailLines=-3"), true)
        .expect("bad tail");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("tailLines"), "{body}");
    let (code, body) = cluster
        .kubelet_get("/containerLogs/default/nope/web", true)
        .expect("no pod");
    assert_eq!(code, 404, "{body}");

    let (code, body) = cluster.kubelet_get("/metrics", true).expect("metrics");
    assert_eq!(code, 200);
    assert!(body.contains("kubelet_running_pods 1\n"), "{body}");
    assert!(
        body.contains("kubelet_running_containers{container_state=\"running\"} 1\n"),
        "{body}"
    );
    assert!(body.contains("process_resident_memory_bytes "), "{body}");

    // kubectl logs goes through the API server, which proxies to this endpoint.
    let logs = cluster.kubectl_ok(&["logs", "web"]).expect("kubectl logs");
    assert_eq!(logs, "serving\n");
    let logs = cluster
        .kubectl_ok(&["logs", "web", "-c", "web", "--tail=1"])
        .expect("kubectl logs --tail");
    assert_eq!(logs, "serving\n");
    cluster.ensure_running().expect("daemons alive");
}

/// The same node on containerd 1.6 + runc (the agent benchmark's peer): containerd wires the
/// pod's network itself with the reference plugins on the test's bridge and subnet, the agent
/// takes the IP from the sandbox status, and the pod serves on it until deleted.
#[test]
fn node_on_containerd_runs_a_pod_that_serves_on_its_ip() {
    let mut cluster = Cluster::start(ClusterOptions {
        runtime: NodeRuntime::Containerd,
        ..ClusterOptions::default()
    })
    .expect("cluster on containerd");
    let (_, uid, ip) = run_web_pod(&mut cluster, "hello-from-containerd");
    assert_eq!(sandboxes_of(&cluster.cri_socket, &uid).len(), 1);

    assert_serves(ip, "hello-from-containerd");
    delete_web_pod(&mut cluster, &uid);
}
