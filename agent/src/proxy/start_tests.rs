//! `start` with a scripted source, the fake kernel and a recording event sink: lists gate
//! the first sync, watch events become partial syncs, an expired watch relists and drops
//! what vanished, bad input becomes a Warning Event, shutdown ends the task.

use std::collections::HashMap;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use tokio::sync::Mutex as AsyncMutex;

use super::*;
use crate::api::events::RecordingSink;
use crate::api::fake::FakeApi;
use crate::api::{ApiError, ApiResource};
use crate::proxy::fake_kernel::{FakeExec, FakeKernel};
use crate::proxy::run::Timing;
use crate::proxy::source::{ApiSource, Listed, Object, WatchStream, Watched};

type Feed<T> = AsyncMutex<mpsc::UnboundedReceiver<T>>;

/// Answers each list and watch call with what the test sends for that kind, when it
/// sends it; records the revision of every watch.
struct ScriptedSource {
    lists: HashMap<Kind, Feed<Result<Listed, ApiError>>>,
    watches: HashMap<Kind, Feed<WatchStream>>,
    watched_from: StdMutex<Vec<(Kind, String)>>,
}

struct Script {
    lists: HashMap<Kind, mpsc::UnboundedSender<Result<Listed, ApiError>>>,
    watches: HashMap<Kind, mpsc::UnboundedSender<WatchStream>>,
}

impl Script {
    fn list(&self, kind: Kind, objects: Vec<Object>, revision: &str) {
        self.lists[&kind]
            .send(Ok(Listed {
                objects,
                revision: revision.into(),
            }))
            .expect("source alive");
    }

    /// Opens the next watch of `kind`; the returned sender feeds it.
    fn watch(&self, kind: Kind) -> mpsc::UnboundedSender<Result<Watched, ApiError>> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
                .boxed();
        self.watches[&kind].send(stream).expect("source alive");
        tx
    }
}

fn scripted() -> (ScriptedSource, Script) {
    let mut source = ScriptedSource {
        lists: HashMap::new(),
        watches: HashMap::new(),
        watched_from: StdMutex::new(Vec::new()),
    };
    let mut script = Script {
        lists: HashMap::new(),
        watches: HashMap::new(),
    };
    for kind in [Kind::Services, Kind::EndpointSlices, Kind::Node] {
        let (tx, rx) = mpsc::unbounded_channel();
        source.lists.insert(kind, AsyncMutex::new(rx));
        script.lists.insert(kind, tx);
        let (tx, rx) = mpsc::unbounded_channel();
        source.watches.insert(kind, AsyncMutex::new(rx));
        script.watches.insert(kind, tx);
    }
    (source, script)
}

impl ProxySource for ScriptedSource {
    async fn list(&self, kind: Kind) -> Result<Listed, ApiError> {
        let next = self.lists[&kind].lock().await.recv().await;
        match next {
            Some(answer) => answer,
            None => futures::future::pending().await,
        }
    }

    async fn watch(&self, kind: Kind, revision: &str) -> Result<WatchStream, ApiError> {
        self.watched_from
            .lock()
            .expect("lock")
            .push((kind, revision.to_owned()));
        let next = self.watches[&kind].lock().await.recv().await;
        match next {
            Some(stream) => Ok(stream),
            None => futures::future::pending().await,
        }
    }
}

fn svc(name: &str, ip: &str, rv: &str) -> Object {
    let s: Service = serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": name, "uid": format!("uid-{name}"), "resourceVersion": rv},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))
    .expect("service");
    Object::Service(Box::new(s))
}

fn slice(svc: &str, ips: &[&str], rv: &str) -> Object {
    let eps: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "other", "conditions": {"ready": true}}))
        .collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": format!("{svc}-1"), "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .expect("slice");
    Object::Slice(Box::new(s))
}

fn config() -> ProxyConfig {
    let mut c = ProxyConfig::new("node-a");
    c.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr")];
    c.cluster_cidr = Some("10.244.0.0/16".parse().expect("cidr"));
    c.timing = Timing {
        min_sync_interval: Duration::from_millis(10),
        ..Timing::default()
    };
    c
}

struct Started {
    kernel: Arc<FakeKernel>,
    sink: Arc<RecordingSink>,
    synced: mpsc::UnboundedReceiver<Result<SyncReport, String>>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn start_fake<S: ProxySource>(source: S) -> Started {
    let kernel = FakeKernel::new();
    let sink = Arc::new(RecordingSink::default());
    let (synced_tx, synced) = mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let host = ProxyHost {
        exec: Arc::new(FakeExec(kernel.clone())),
        binder: Arc::new(HostBinder),
        synced: Some(synced_tx),
    };
    let task = start_on(source, sink.clone(), config(), host, shutdown_rx).expect("start");
    Started {
        kernel,
        sink,
        synced,
        shutdown,
        task,
    }
}

async fn next_sync(s: &mut Started) -> SyncReport {
    tokio::time::timeout(Duration::from_secs(10), s.synced.recv())
        .await
        .expect("a sync within 10 s")
        .expect("loop alive")
        .expect("sync succeeded")
}

fn dispatch(k: &FakeKernel) -> Vec<String> {
    k.chain("nat", "FERRO-SERVICES").unwrap_or_default()
}

async fn wait_for_watch(watched: &StdMutex<Vec<(Kind, String)>>, want: (Kind, &str)) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if watched
            .lock()
            .expect("lock")
            .iter()
            .any(|(k, rv)| *k == want.0 && rv == want.1)
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no watch of {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn lists_gate_the_first_sync_then_watches_drive_partial_syncs() {
    let (source, script) = scripted();
    let source = Arc::new(source);
    let mut s = start_fake(SharedSource(source.clone()));

    script.list(
        Kind::Services,
        vec![
            svc("web", "10.96.0.10", "5"),
            svc("outside", "192.0.2.1", "6"),
            svc("db", "10.96.0.11", "7"),
        ],
        "10",
    );
    let svc_watch = script.watch(Kind::Services);
    // The Services are in; the proxy must still wait for the EndpointSlices.
    wait_for_watch(&source.watched_from, (Kind::Services, "10")).await;
    script.list(
        Kind::EndpointSlices,
        vec![slice("web", &["10.244.1.1", "10.244.2.1"], "8")],
        "11",
    );
    let slice_watch = script.watch(Kind::EndpointSlices);

    let first = next_sync(&mut s).await;
    assert!(first.full);
    let restores = s.kernel.restores();
    assert!(
        restores[0].contains("--to-destination 10.244.2.1:8080"),
        "the first sync already has the listed endpoints: {}",
        restores[0]
    );
    assert!(
        dispatch(&s.kernel)
            .iter()
            .any(|r| r.contains("10.96.0.10/32"))
    );
    assert!(!dispatch(&s.kernel).iter().any(|r| r.contains("192.0.2.1")));

    // The Service outside the range is reported as a Warning Event about it.
    let events = s.sink.events();
    let bad = events
        .iter()
        .find(|e| e.reason == "ClusterIPOutOfRange")
        .unwrap_or_else(|| panic!("{:?}", s.sink.reasons()));
    assert_eq!(bad.type_, "Warning");
    assert_eq!(bad.object.kind.as_deref(), Some("Service"));
    assert_eq!(bad.object.api_version.as_deref(), Some("v1"));
    assert_eq!(bad.object.namespace.as_deref(), Some("ns"));
    assert_eq!(bad.object.name.as_deref(), Some("outside"));
    assert_eq!(bad.object.uid.as_deref(), Some("uid-outside"));
    assert!(bad.message.contains("192.0.2.1"), "{}", bad.message);

    // A watched endpoint change: a partial sync that writes only web's chain.
    slice_watch
        .send(Ok(Watched::Upserted(slice(
            "web",
            &["10.244.1.1", "10.244.2.1", "10.244.3.1"],
            "12",
        ))))
        .expect("watch open");
    let r = next_sync(&mut s).await;
    assert!(!r.full && r.services_rebuilt == 1, "{r:?}");
    let last = s.kernel.restores().pop().expect("a restore");
    assert!(last.contains("10.244.3.1:8080"), "{last}");
    assert!(
        !last.contains("FERRO-SERVICES"),
        "dispatch untouched: {last}"
    );

    // The Services watch expires; the relist no longer has db: it is removed.
    svc_watch
        .send(Err(ApiError::Gone {
            path: "/api/v1/services".into(),
            message: "too old".into(),
        }))
        .expect("watch open");
    script.list(
        Kind::Services,
        vec![
            svc("web", "10.96.0.10", "5"),
            svc("outside", "192.0.2.1", "6"),
        ],
        "20",
    );
    let _svc_watch = script.watch(Kind::Services);
    // The relist's upserts and deletion may land in one sync or two.
    while dispatch(&s.kernel).iter().any(|r| r.contains("10.96.0.11")) {
        let r = next_sync(&mut s).await;
        assert!(!r.full, "{r:?}");
    }
    assert!(dispatch(&s.kernel).iter().any(|r| r.contains("10.96.0.10")));
    wait_for_watch(&source.watched_from, (Kind::Services, "20")).await;

    s.shutdown.send(true).expect("send");
    tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .expect("stops on shutdown")
        .expect("no panic");
}

/// Lets the test keep a handle on the source it gives away.
struct SharedSource(Arc<ScriptedSource>);

impl ProxySource for SharedSource {
    async fn list(&self, kind: Kind) -> Result<Listed, ApiError> {
        self.0.list(kind).await
    }

    async fn watch(&self, kind: Kind, revision: &str) -> Result<WatchStream, ApiError> {
        self.0.watch(kind, revision).await
    }
}

fn store<K: ApiResource>(api: &FakeApi, ns: Option<&str>, v: serde_json::Value) {
    let o: K = serde_json::from_value(v).expect("object");
    api.insert(ns, &o);
}

#[tokio::test]
async fn the_api_client_source_feeds_services_slices_and_only_this_node() {
    let api = Arc::new(FakeApi::new());
    store::<Service>(
        &api,
        Some("ns"),
        json!({"metadata": {"namespace": "ns", "name": "web"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]}}),
    );
    store::<EndpointSlice>(
        &api,
        Some("ns"),
        json!({"metadata": {"namespace": "ns", "name": "web-1",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.244.1.1"], "nodeName": "node-a"}],
               "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
    );
    for (name, cidr) in [("node-a", "10.244.1.0/24"), ("node-b", "10.244.2.0/24")] {
        store::<Node>(
            &api,
            None,
            json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr}}),
        );
    }
    let source = ApiSource::new(api.clone(), "node-a");
    let listed = source.list(Kind::Services).await.expect("list");
    assert!(
        matches!(&listed.objects[..], [Object::Service(s)] if s.metadata.name.as_deref() == Some("web"))
    );

    let mut cfg_less = start_fake(ApiSource::new(api, "node-a"));
    let r = next_sync(&mut cfg_less).await;
    assert!(r.full);
    let restores = cfg_less.kernel.restores();
    assert!(restores[0].contains("10.244.1.1:8080"), "{}", restores[0]);
    // The endpoint is on node-a, this node: it gets its hairpin chain.
    assert!(restores[0].contains("-s 10.244.1.1/32 -j FERRO-MARK-MASQ"));
    cfg_less.shutdown.send(true).expect("send");
    tokio::time::timeout(Duration::from_secs(10), cfg_less.task)
        .await
        .expect("stops")
        .expect("no panic");
}

#[tokio::test]
async fn a_missing_iptables_fails_start_with_the_tool_named() {
    struct NoTools;
    impl Exec for NoTools {
        fn run(
            &self,
            program: &str,
            _args: &[&str],
            _stdin: Option<&[u8]>,
        ) -> std::io::Result<crate::proxy::iptables::ExecOutput> {
            Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{program}: not found"),
            ))
        }
    }
    let (source, _script) = scripted();
    let (_tx, rx) = watch::channel(false);
    let host = ProxyHost {
        exec: Arc::new(NoTools),
        binder: Arc::new(HostBinder),
        synced: None,
    };
    let err = start_on(
        source,
        Arc::new(RecordingSink::default()),
        config(),
        host,
        rx,
    )
    .expect_err("no iptables");
    assert!(err.to_string().contains("cannot run iptables"), "{err}");
}
