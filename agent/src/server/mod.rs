//! The kubelet HTTP API (port 10250 by default): HTTPS with a serving certificate of its own,
//! every request authenticated by a client certificate the cluster CA (the kubeconfig's
//! certificate-authority) signed. Bearer tokens are not accepted yet: the API server and
//! operators reach it with client certificates. Any authenticated client may use every
//! endpoint (no per-user authorization).
//!
//! - `/healthz`: `ok`.
//! - `/pods`: a `PodList` of the pods bound to this node.
//! - `/containerLogs/<namespace>/<pod>/<container>`: the container's log from the runtime's
//!   CRI log file, with `follow`, `tailLines`, `sinceSeconds`/`sinceTime`, `timestamps`,
//!   `previous` and `limitBytes` (see [`logs`]). The API server proxies `kubectl logs` here.
//! - `/metrics`: Prometheus text (see [`metrics`]).

pub mod logs;
pub mod metrics;
pub mod request;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use ferrolet_cri::v1;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Response, StatusCode, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::api::{Api, ListParams};
use crate::cri::Runtime;
use crate::pods::PodContext;
use crate::pods::observed::labels;
use crate::pods::spec::PodKey;

use request::{LogOptions, Route};

pub use tls::TlsError;

/// What stops the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("kubelet API TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("kubelet API: listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("kubelet API: tlsCertFile and tlsPrivateKeyFile go together; only {given} is set")]
    HalfTls { given: &'static str },
}

/// Where and how the server listens.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub address: IpAddr,
    pub port: u16,
    pub root_dir: PathBuf,
    pub node_name: String,
    /// Names and IPs the self-signed serving certificate carries besides the node name.
    pub host_ips: Vec<String>,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    /// PEM of the CA whose client certificates are accepted.
    pub client_ca_pem: Option<Vec<u8>>,
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

fn respond(code: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = code;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

fn text(code: u16, message: impl Into<String>) -> Response<Body> {
    let mut message = message.into();
    if !message.ends_with('\n') {
        message.push('\n');
    }
    respond(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "text/plain; charset=utf-8",
        message,
    )
}

/// The request handlers, apart from transport.
pub struct KubeletApi<A, R> {
    pub api: Arc<A>,
    pub runtime: Arc<R>,
    pub ctx: PodContext,
}

/// The container a log request is for.
struct LogTarget {
    id: String,
    path: PathBuf,
}

impl<A: Api, R: Runtime> KubeletApi<A, R> {
    /// Answers one request; `authenticated` says the client showed a certificate the CA signed.
    pub async fn handle(
        &self,
        method: &str,
        path: &str,
        query: Option<&str>,
        authenticated: bool,
    ) -> Response<Body> {
        if !authenticated {
            return text(
                401,
                "Unauthorized: the kubelet API needs a client certificate signed by the cluster CA",
            );
        }
        let route = match request::parse(method, path, query) {
            Ok(r) => r,
            Err(e) => return text(e.status(), e.to_string()),
        };
        match route {
            Route::Healthz => text(200, "ok"),
            Route::Pods => self.pods().await,
            Route::Metrics => self.metrics().await,
            Route::ContainerLogs {
                namespace,
                pod,
                container,
                options,
            } => self.logs(&namespace, &pod, &container, &options).await,
        }
    }

    async fn pods(&self) -> Response<Body> {
        let params = ListParams::fields(format!("spec.nodeName={}", self.ctx.node_name));
        match self.api.list::<Pod>(None, &params).await {
            Ok(list) => {
                let body = serde_json::json!({
                    "kind": "PodList",
                    "apiVersion": "v1",
                    "metadata": {},
                    "items": list.items,
                });
                respond(StatusCode::OK, "application/json", body.to_string())
            }
            Err(e) => text(503, format!("listing this node's pods: {e}")),
        }
    }

    async fn metrics(&self) -> Response<Body> {
        let mut snapshot = metrics::Snapshot {
            node_name: self.ctx.node_name.clone(),
            process: metrics::ProcessStats::read(),
            ..Default::default()
        };
        let managed = HashMap::from([(
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        )]);
        match self.runtime.list_pod_sandboxes(managed.clone()).await {
            Ok(sandboxes) => {
                snapshot.running_pods = sandboxes
                    .iter()
                    .filter(|s| s.state == v1::PodSandboxState::SandboxReady as i32)
                    .count() as u64;
            }
            Err(e) => return text(503, format!("asking the runtime for sandboxes: {e}")),
        }
        match self.runtime.list_containers(None, managed).await {
            Ok(containers) => {
                let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
                for c in containers {
                    let state = match v1::ContainerState::try_from(c.state) {
                        Ok(v1::ContainerState::ContainerRunning) => "running",
                        Ok(v1::ContainerState::ContainerExited) => "exited",
                        Ok(v1::ContainerState::ContainerCreated) => "created",
                        _ => "unknown",
                    };
                    *by_state.entry(state).or_default() += 1;
                }
                snapshot.containers = by_state;
            }
            Err(e) => return text(503, format!("asking the runtime for containers: {e}")),
        }
        respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics::render(&snapshot),
        )
    }

    /// Finds the container instance (current or previous) and its log file.
    async fn log_target(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        previous: bool,
    ) -> Result<LogTarget, (u16, String)> {
        let runtime_error = |e: crate::cri::CriError| (503, format!("container runtime: {e}"));
        let sandboxes = self
            .runtime
            .list_pod_sandboxes(HashMap::from([
                (labels::POD_NAMESPACE.to_owned(), namespace.to_owned()),
                (labels::POD_NAME.to_owned(), pod.to_owned()),
            ]))
            .await
            .map_err(runtime_error)?;
        let Some(uid) = sandboxes
            .iter()
            .max_by_key(|s| s.created_at)
            .and_then(|s| s.labels.get(labels::POD_UID))
        else {
            return Err((
                404,
                format!(
                    "pod {namespace}/{pod} not found on node {}",
                    self.ctx.node_name
                ),
            ));
        };
        let mut instances = self
            .runtime
            .list_containers(
                None,
                HashMap::from([
                    (labels::POD_UID.to_owned(), uid.clone()),
                    (labels::CONTAINER_NAME.to_owned(), container.to_owned()),
                ]),
            )
            .await
            .map_err(runtime_error)?;
        instances.sort_by_key(|c| {
            std::cmp::Reverse((c.metadata.as_ref().map_or(0, |m| m.attempt), c.created_at))
        });
        let chosen = instances.get(usize::from(previous)).ok_or_else(|| {
            let message = if previous {
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found")
            } else {
                format!(
                    "container \"{container}\" in pod \"{pod}\" is waiting to start or does not exist"
                )
            };
            (400, message)
        })?;
        let status = self
            .runtime
            .container_status(&chosen.id)
            .await
            .map_err(runtime_error)?;
        let attempt = chosen.metadata.as_ref().map_or(0, |m| m.attempt);
        let path = status
            .map(|s| PathBuf::from(s.log_path))
            .filter(|p| p.is_absolute())
            .unwrap_or_else(|| {
                let key = PodKey {
                    namespace: namespace.to_owned(),
                    name: pod.to_owned(),
                    uid: uid.clone(),
                };
                self.ctx
                    .log_dir(&key)
                    .join(container)
                    .join(format!("{attempt}.log"))
            });
        Ok(LogTarget {
            id: chosen.id.clone(),
            path,
        })
    }

    async fn logs(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        options: &LogOptions,
    ) -> Response<Body> {
        let target = match self
            .log_target(namespace, pod, container, options.previous)
            .await
        {
            Ok(t) => t,
            Err((code, message)) => return text(code, message),
        };
        let plain = "text/plain; charset=utf-8";
        if !options.follow {
            return match tokio::fs::read(&target.path).await {
                Ok(data) => respond(
                    StatusCode::OK,
                    plain,
                    logs::render(&data, options, crate::api::now()),
                ),
                Err(e) => text(
                    404,
                    format!(
                        "log of container \"{container}\" in pod \"{pod}\" ({}): {e}",
                        target.path.display()
                    ),
                ),
            };
        }
        if let Err(e) = tokio::fs::metadata(&target.path).await {
            return text(
                404,
                format!(
                    "log of container \"{container}\" in pod \"{pod}\" ({}): {e}",
                    target.path.display()
                ),
            );
        }
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let runtime = self.runtime.clone();
        let options = options.clone();
        let id = target.id.clone();
        tokio::spawn(async move {
            let running = move || {
                let runtime = runtime.clone();
                let id = id.clone();
                async move {
                    matches!(
                        runtime.container_status(&id).await,
                        Ok(Some(s)) if s.state == v1::ContainerState::ContainerRunning as i32
                    )
                }
            };
            if let Err(e) = logs::follow(&target.path, &options, tx, running).await {
                debug!(path = %target.path.display(), error = %e, "following a log ended");
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        });
        let mut resp = Response::new(StreamBody::new(stream.boxed()).boxed_unsync());
        if let Ok(v) = header::HeaderValue::from_str(plain) {
            resp.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        resp
    }
}

/// A bound listener with its TLS acceptor, ready to serve.
pub struct Bound {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    pub local_addr: SocketAddr,
}

/// Prepares certificates and binds the port, so that a bad setting fails the agent's start.
pub async fn bind(settings: &ServerSettings) -> Result<Bound, ServerError> {
    let serving = match (&settings.tls_cert_file, &settings.tls_private_key_file) {
        (Some(cert), Some(key)) => tls::ServingCert {
            cert: cert.clone(),
            key: key.clone(),
        },
        (None, None) => {
            let mut names = vec![settings.node_name.clone(), "localhost".to_owned()];
            for ip in settings
                .host_ips
                .iter()
                .cloned()
                .chain(["127.0.0.1".to_owned()])
            {
                if !names.contains(&ip) {
                    names.push(ip);
                }
            }
            tls::ensure_self_signed(&settings.root_dir, &settings.node_name, &names)?
        }
        (Some(_), None) => {
            return Err(ServerError::HalfTls {
                given: "tlsCertFile",
            });
        }
        (None, Some(_)) => {
            return Err(ServerError::HalfTls {
                given: "tlsPrivateKeyFile",
            });
        }
    };
    let config = tls::server_config(&serving, settings.client_ca_pem.as_deref())?;
    let addr = SocketAddr::new(settings.address, settings.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| ServerError::Listen { addr, source })?;
    Ok(Bound {
        listener,
        acceptor: TlsAcceptor::from(Arc::new(config)),
        local_addr,
    })
}

/// Serves until `shutdown` turns true.
pub async fn serve<A: Api, R: Runtime>(
    bound: Bound,
    handler: Arc<KubeletApi<A, R>>,
    mut shutdown: watch::Receiver<bool>,
) {
    info!(addr = %bound.local_addr, "kubelet API listening");
    loop {
        let accepted = tokio::select! {
            a = bound.listener.accept() => a,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "kubelet API: accepting a connection");
                // Out of descriptors and the like: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        // `kubectl logs -f` gets each line as one small write; with Nagle on, a line that
        // follows another within the client's delayed ACK (up to 40 ms) waited for it.
        if let Err(e) = tcp.set_nodelay(true) {
            debug!(%peer, error = %e, "kubelet API: setting TCP_NODELAY");
        }
        let acceptor = bound.acceptor.clone();
        let handler = handler.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    debug!(%peer, error = %e, "kubelet API: TLS handshake failed");
                    return;
                }
            };
            let authenticated = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let handler = handler.clone();
                async move {
                    let uri = req.uri();
                    let resp = handler
                        .handle(
                            req.method().as_str(),
                            uri.path(),
                            uri.query(),
                            authenticated,
                        )
                        .await;
                    debug!(%peer, method = %req.method(), path = %uri.path(), status = resp.status().as_u16(), "kubelet API request");
                    Ok::<_, Infallible>(resp)
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                debug!(%peer, error = %e, "kubelet API: connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests;
