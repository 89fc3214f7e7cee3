//! Runs the real `ferrolet-control-plane` binary (API server, scheduler, controllers in one
//! process) on a loopback port with its own data dir, talks to it over HTTPS with its admin
//! credentials, and plays the kubelet of fake nodes: registers Node objects, renews their
//! Leases, marks the pods bound to them Running and Ready, and finishes their deletion.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrolet_control_plane::controllers::client::{
    ClusterClient, DeleteOptions, PatchKind, ResourceType, WatchEvent,
};
use ferrolet_control_plane::controllers::http::HttpClient;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use serde_json::{Value, json};

pub fn pods() -> ResourceType {
    ResourceType::of::<Pod>()
}

pub fn nodes() -> ResourceType {
    ResourceType::of::<Node>()
}

pub fn leases() -> ResourceType {
    ResourceType::of::<Lease>()
}

pub fn events() -> ResourceType {
    ResourceType::of::<Event>()
}

/// Polls `check` until it answers `Ok`, failing with its last answer after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(state) if tokio::time::Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last state: {state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

static POD_IPS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A name unique across this test process and others running beside it.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{}-{n}", std::process::id())
}

/// One control-plane process; killed on drop.
pub struct ControlPlane {
    child: Option<Child>,
    data_dir: PathBuf,
    log: PathBuf,
    args: Vec<String>,
    pub client: Arc<HttpClient>,
}

/// A loopback port free right now; the control plane keeps it across restarts so clients
/// (and the fake kubelet) reconnect to the same address.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(data_dir: &Path, log: &Path, args: &[String]) -> Child {
    std::fs::create_dir_all(data_dir).expect("data dir");
    let _ = std::fs::remove_file(data_dir.join("admin.kubeconfig"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(env!("CARGO_BIN_EXE_ferrolet-control-plane"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start ferrolet-control-plane")
}

impl ControlPlane {
    /// Starts a control plane whose state lives in `dir` (made if missing), with extra flags.
    pub async fn start_in(dir: &Path, args: &[&str]) -> Self {
        let mut args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        args.extend(["--listen".to_owned(), format!("127.0.0.1:{}", free_port())]);
        let data_dir = dir.join("data");
        let log = dir.join("server.log");
        let child = spawn(&data_dir, &log, &args);
        let client = Arc::new(Self::connect(&data_dir, &log).await);
        ControlPlane {
            child: Some(child),
            data_dir,
            log,
            args,
            client,
        }
    }

    async fn connect(data_dir: &Path, log: &Path) -> HttpClient {
        let client = wait_for("admin.kubeconfig", Duration::from_secs(60), || async {
            HttpClient::from_data_dir(data_dir).map_err(|e| e.to_string())
        })
        .await;
        wait_for("the API to answer", Duration::from_secs(30), || async {
            client
                .list(
                    ResourceType::of::<k8s_openapi::api::core::v1::Namespace>(),
                    None,
                )
                .await
                .map(|_| ())
                .map_err(|e| {
                    format!(
                        "{e}; log: {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    )
                })
        })
        .await;
        client
    }

    /// Stops the process (SIGKILL: nothing gets a chance to tidy up).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process and starts it again on the same data dir and flags.
    /// Clients made before keep working: the address and credentials stay the same.
    pub async fn restart(&mut self) {
        self.kill();
        self.child = Some(spawn(&self.data_dir, &self.log, &self.args));
        self.client = Arc::new(Self::connect(&self.data_dir, &self.log).await);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("admin.kubeconfig")
    }

    /// Runs kubectl; returns its output whatever the exit code.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .env("HOME", &self.data_dir)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl")
    }

    /// Runs kubectl, asserts it exits 0, returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.kubectl_output(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of a YAML or JSON document.
    pub fn apply(&self, doc: &str) -> String {
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["apply", "-f", "-"])
            .env("HOME", &self.data_dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(doc.as_bytes())
                .expect("write");
        }
        let out = child.wait_with_output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A temp dir for one test's control plane(s).
pub fn test_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferrolet-cp-test-")
        .tempdir()
        .expect("temp dir")
}

/// A Node as a kubelet registers it: Ready, with room for `cpu` and `pods`.
pub fn node(name: &str, cpu: &str, labels: Value, taints: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"taints": taints},
        "status": {
            "allocatable": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
            "capacity": {"cpu": cpu, "memory": "8Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": now()}],
        },
    })
}

pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn micro_now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The kubelets of fake nodes. Renews each node's Lease every second (until told to stop for
/// a node), marks pods bound to its nodes Running and Ready after `ready_after`, and deletes
/// for good the pods being gracefully deleted. Stops when dropped.
pub struct FakeKubelet {
    stopped_leases: Arc<Mutex<HashSet<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl FakeKubelet {
    /// Registers `nodes` (Node objects as from [`node`]) and starts serving them.
    pub async fn start(
        client: Arc<dyn ClusterClient>,
        nodes_json: Vec<Value>,
        ready_after: Duration,
    ) -> Self {
        let mut names = Vec::new();
        for n in nodes_json {
            names.push(n["metadata"]["name"].as_str().expect("name").to_owned());
            client
                .create(nodes(), None, n)
                .await
                .expect("register node");
        }
        let stopped_leases: Arc<Mutex<HashSet<String>>> = Arc::default();
        let mut tasks = Vec::new();
        {
            let client = Arc::clone(&client);
            let names = names.clone();
            let stopped = Arc::clone(&stopped_leases);
            tasks.push(tokio::spawn(async move {
                loop {
                    for n in &names {
                        if stopped.lock().expect("lock").contains(n) {
                            continue;
                        }
                        if let Err(e) = renew_lease(client.as_ref(), n).await {
                            eprintln!("fake kubelet: renewing lease of {n}: {e}");
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }));
        }
        let ours: HashSet<String> = names.into_iter().collect();
        tasks.push(tokio::spawn(serve_pods(client, ours, ready_after)));
        FakeKubelet {
            stopped_leases,
            tasks,
        }
    }

    /// The node's kubelet "dies": its Lease is no longer renewed.
    pub fn stop_lease(&self, node: &str) {
        self.stopped_leases
            .lock()
            .expect("lock")
            .insert(node.to_owned());
    }
}

async fn renew_lease(client: &dyn ClusterClient, node: &str) -> Result<(), String> {
    let ns = Some("kube-node-lease");
    let patch = json!({"spec": {"renewTime": micro_now(), "holderIdentity": node,
                                "leaseDurationSeconds": 40}});
    match client
        .patch(leases(), ns, node, None, PatchKind::Merge, patch)
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.is_not_found() => {
            let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node, "namespace": "kube-node-lease"},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 40,
                         "renewTime": micro_now()}});
            client
                .create(leases(), ns, lease)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
        Err(e) => Err(e.to_string()),
    }
}

async fn serve_pods(client: Arc<dyn ClusterClient>, ours: HashSet<String>, ready_after: Duration) {
    loop {
        let Ok(list) = client.list(pods(), None).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        for p in list.items {
            handle_pod(&client, &ours, p, ready_after);
        }
        let Ok(mut stream) = client.watch(pods(), None, &list.resource_version).await else {
            continue;
        };
        while let Some(Ok(ev)) = stream.next().await {
            if let WatchEvent::Added(p) | WatchEvent::Modified(p) = ev {
                handle_pod(&client, &ours, p, ready_after);
            }
        }
    }
}

fn handle_pod(
    client: &Arc<dyn ClusterClient>,
    ours: &HashSet<String>,
    p: Value,
    ready_after: Duration,
) {
    let node = p
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !ours.contains(node) {
        return;
    }
    let ns = p["metadata"]["namespace"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let name = p["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let uid = p["metadata"]["uid"].as_str().unwrap_or_default().to_owned();
    let client = Arc::clone(client);
    if p.pointer("/metadata/deletionTimestamp").is_some() {
        tokio::spawn(async move {
            let opts = DeleteOptions {
                grace_period_seconds: Some(0),
                uid: Some(uid),
                ..DeleteOptions::default()
            };
            let _ = client.delete(pods(), Some(&ns), &name, opts).await;
        });
        return;
    }
    if p.pointer("/status/phase").and_then(Value::as_str) == Some("Running") {
        return;
    }
    let n = POD_IPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ip = format!("10.244.{}.{}", n / 250 % 250, n % 250 + 1);
    tokio::spawn(async move {
        tokio::time::sleep(ready_after).await;
        let t = now();
        let patch = json!({"status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "startTime": t,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": t},
                {"type": "Initialized", "status": "True", "lastTransitionTime": t},
                {"type": "ContainersReady", "status": "True", "lastTransitionTime": t},
                {"type": "Ready", "status": "True", "lastTransitionTime": t},
            ],
        }});
        let _ = client
            .patch(
                pods(),
                Some(&ns),
                &name,
                Some("status"),
                PatchKind::Merge,
                patch,
            )
            .await;
    });
}

/// Pods of a namespace by name.
pub async fn pods_in(
    client: &dyn ClusterClient,
    ns: &str,
) -> Result<BTreeMap<String, Value>, String> {
    let list = client
        .list(pods(), Some(ns))
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p,
            )
        })
        .collect())
}

pub fn is_ready(p: &Value) -> bool {
    p.pointer("/metadata/deletionTimestamp").is_none()
        && p.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
}

pub fn node_of(p: &Value) -> Option<&str> {
    p.pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
}

/// Makes a namespace for one test.
pub async fn namespace(client: &dyn ClusterClient, name: &str) {
    client
        .create(
            ResourceType::of::<k8s_openapi::api::core::v1::Namespace>(),
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        )
        .await
        .expect("create namespace");
}
