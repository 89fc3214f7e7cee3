//! `kubectl logs` against the real server, which proxies `pods/log` to the node's agent.
//! The agent here is a small HTTPS server standing in for the kubelet's `/containerLogs`
//! endpoint (the peer of this proxy); it requires a client certificate signed by the control
//! plane's CA, so the test also shows the server authenticates itself to the agent.

mod api_support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api_support::ControlPlane;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::{Notify, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// One request the fake agent received.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    query: HashMap<String, String>,
}

/// A fake kubelet serving `/containerLogs/{ns}/{pod}/{container}` over HTTPS on loopback.
struct FakeKubelet {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Lets a followed log go on with its next line.
    more: Arc<Notify>,
    _runtime: tokio::runtime::Runtime,
}

type Body = BoxBody<Bytes, Infallible>;

fn lines_of(container: &str) -> Option<Vec<String>> {
    match container {
        "app" => Some((1..=3).map(|i| format!("app line {i}\n")).collect()),
        "sidecar" => Some(vec!["sidecar says hi\n".to_owned()]),
        _ => None,
    }
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn answer(
    req: &hyper::Request<hyper::body::Incoming>,
    seen: &Mutex<Vec<Seen>>,
    more: &Arc<Notify>,
) -> hyper::Response<Body> {
    let query = parse_query(req.uri().query());
    seen.lock().expect("lock").push(Seen {
        path: req.uri().path().to_owned(),
        query: query.clone(),
    });
    let parts: Vec<&str> = req.uri().path().split('/').collect();
    let text = |code: u16, body: String| {
        let mut resp = hyper::Response::new(Full::new(Bytes::from(body)).boxed());
        *resp.status_mut() = hyper::StatusCode::from_u16(code).expect("code");
        resp
    };
    let ["", "containerLogs", _ns, _pod, container] = parts.as_slice() else {
        return text(404, "no such path".to_owned());
    };
    let Some(mut lines) = lines_of(container) else {
        return text(404, format!("container {container:?} not found in the pod"));
    };
    if let Some(n) = query.get("tailLines").and_then(|n| n.parse::<usize>().ok()) {
        lines = lines.split_off(lines.len().saturating_sub(n));
    }
    if query.get("follow").map(String::as_str) != Some("true") {
        return text(200, lines.concat());
    }
    // Followed: what there is now, then one more line each time the test says so, and the
    // stream stays open until the client goes away.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let more = more.clone();
    tokio::spawn(async move {
        if tx.send(Bytes::from(lines.concat())).await.is_err() {
            return;
        }
        for i in 1.. {
            tokio::select! {
                () = more.notified() => {}
                () = tx.closed() => return,
            }
            if tx
                .send(Bytes::from(format!("followed line {i}\n")))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    hyper::Response::new(StreamBody::new(stream).boxed())
}

impl FakeKubelet {
    /// Serves with a self-signed certificate, accepting only clients signed by `client_ca`.
    fn start(client_ca: &std::path::Path) -> FakeKubelet {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let serving = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
            .expect("self-signed cert");
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(client_ca).expect("CA"))
            .expect("add CA");
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .expect("verifier");
        let key = PrivateKeyDer::from_pem_slice(serving.signing_key.serialize_pem().as_bytes())
            .expect("key");
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![serving.cert.der().clone()], key)
            .expect("TLS config");
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let more = Arc::new(Notify::new());
        let (seen2, more2) = (seen.clone(), more.clone());
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, more) = (acceptor.clone(), seen2.clone(), more2.clone());
                tokio::spawn(async move {
                    // A client without a certificate from the CA fails the handshake here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let resp = answer(&req, &seen, &more);
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        FakeKubelet {
            port,
            seen,
            more,
            _runtime: runtime,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Node whose status points at the fake agent, and pods bound to it.
fn cluster(cp: &ControlPlane, node: &str, kubelet_port: u16) {
    cp.kubectl_with(
        &["apply", "-f", "-"],
        Some(&format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {node}\n"
        )),
        &[],
    );
    let status = serde_json::json!({"status": {
        "addresses": [{"type": "Hostname", "address": node}, {"type": "InternalIP", "address": "127.0.0.1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
    }});
    let (code, body) = cp.request(
        "PATCH",
        &format!("/api/v1/nodes/{node}/status"),
        "application/merge-patch+json",
        status.to_string().as_bytes(),
    );
    assert_eq!(code, 200, "{body}");
}

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: default}
spec:
  nodeName: NODE
  containers:
  - {name: app, image: busybox:1.36}
  - {name: sidecar, image: busybox:1.36}
---
apiVersion: v1
kind: Pod
metadata: {name: solo, namespace: default}
spec:
  nodeName: NODE
  containers:
  - {name: app, image: busybox:1.36}
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: default}
spec:
  nodeSelector: {no-such-label: "true"}
  containers:
  - {name: app, image: busybox:1.36}
"#;

#[test]
fn kubectl_logs_reads_the_nodes_agent() {
    let cp = ControlPlane::start();
    let kubelet = FakeKubelet::start(&cp.data_dir().join("pki/ca.crt"));
    cluster(&cp, "node-logs", kubelet.port);
    cp.kubectl_with(
        &["apply", "-f", "-"],
        Some(&PODS.replace("NODE", "node-logs")),
        &[],
    );

    let out = cp.kubectl(&["logs", "solo"]);
    assert_eq!(out, "app line 1\napp line 2\napp line 3\n");
    let first = kubelet
        .seen()
        .last()
        .cloned()
        .expect("a request reached the agent");
    assert_eq!(first.path, "/containerLogs/default/solo/app");

    let out = cp.kubectl(&["logs", "solo", "--tail=1", "--timestamps"]);
    assert_eq!(out, "app line 3\n");
    let tail = kubelet.seen().last().cloned().expect("request");
    assert_eq!(tail.query.get("tailLines").map(String::as_str), Some("1"));
    assert_eq!(
        tail.query.get("timestamps").map(String::as_str),
        Some("true")
    );

    let out = cp.kubectl(&["logs", "web", "-c", "sidecar"]);
    assert_eq!(out, "sidecar says hi\n");
    assert_eq!(
        kubelet.seen().last().expect("request").path,
        "/containerLogs/default/web/sidecar"
    );

    // -f streams: the second line reaches kubectl only after the agent sends it, while the
    // same response is still open.
    let mut follow = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(cp.kubeconfig())
        .args(["logs", "-f", "solo"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl logs -f");
    let mut stdout = follow.stdout.take().expect("stdout");
    let got = Arc::new(Mutex::new(String::new()));
    let reader = {
        let got = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.lock()
                    .expect("lock")
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    wait_for("the log so far", Duration::from_secs(20), || {
        got.lock().expect("lock").contains("app line 3\n")
    });
    assert!(!got.lock().expect("lock").contains("followed line"));
    kubelet.more.notify_one();
    wait_for("a followed line", Duration::from_secs(20), || {
        got.lock().expect("lock").contains("followed line 1\n")
    });
    assert!(
        follow.try_wait().expect("try_wait").is_none(),
        "kubectl logs -f ended while the log was still open"
    );
    let followed = kubelet
        .seen()
        .into_iter()
        .rev()
        .find(|s| s.query.contains_key("follow"))
        .expect("the followed request");
    assert_eq!(
        followed.query.get("follow").map(String::as_str),
        Some("true")
    );
    let _ = follow.kill();
    let _ = follow.wait();
    reader.join().expect("reader");
}

#[test]
fn log_requests_that_cannot_be_served_say_why() {
    let cp = ControlPlane::start();
    let kubelet = FakeKubelet::start(&cp.data_dir().join("pki/ca.crt"));
    cluster(&cp, "node-a", kubelet.port);
    // A node whose agent is not listening: a port that was free a moment ago.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    cluster(&cp, "node-gone", closed);
    cp.kubectl_with(
        &["apply", "-f", "-"],
        Some(&PODS.replace("NODE", "node-a")),
        &[],
    );
    cp.kubectl_with(
        &["apply", "-f", "-"],
        Some(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: lost, namespace: default}\nspec:\n  \
             nodeName: node-gone\n  containers:\n  - {name: app, image: busybox:1.36}\n",
        ),
        &[],
    );
    let before = kubelet.seen().len();

    let (code, body) = cp.get("/api/v1/namespaces/default/pods/nope/log");
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["message"], "pods \"nope\" not found");

    let (code, body) = cp.get("/api/v1/namespaces/default/pods/pending/log");
    assert_eq!(code, 400, "{body}");
    assert_eq!(body["message"], "pod pending does not have a host assigned");

    let (code, body) = cp.get("/api/v1/namespaces/default/pods/web/log");
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        body["message"],
        "a container name must be specified for pod web, choose one of: [app sidecar]"
    );

    let (code, body) = cp.get("/api/v1/namespaces/default/pods/web/log?container=db");
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("container db is not valid for pod web")),
        "{body}"
    );

    let (code, body) = cp.get("/api/v1/namespaces/default/pods/web/log?container=app&tailLines=-3");
    assert_eq!(code, 422, "{body}");
    let (code, body) = cp.get("/api/v1/namespaces/default/pods/web/log?container=app&tailLines=x");
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("tailLines"))
    );
    assert_eq!(
        kubelet.seen().len(),
        before,
        "bad requests must not reach the agent"
    );

    let (code, body) = cp.get("/api/v1/namespaces/default/pods/lost/log");
    assert_eq!(code, 503, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("node-gone") && message.contains("unreachable"),
        "{body}"
    );

    // kubectl shows the same reasons.
    let out = cp.kubectl_output(&["logs", "pending"], None, &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not have a host assigned"), "{stderr}");
}
