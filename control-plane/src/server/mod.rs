//! The HTTPS front of the API server: TLS with client certificates, bearer tokens,
//! routing of discovery and OpenAPI paths, and hand-off of resource requests to [`Api`].

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ipnet::IpNet;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::api::allocator::Allocator;
use crate::api::decode::MAX_BODY;
use crate::api::handler::REGISTRY_PREFIX;
use crate::api::logs::KubeletClient;
use crate::api::request::{self, Route};
use crate::api::table::IncludeObject;
use crate::api::tokens::TokenIssuer;
use crate::api::watchcache::WatchCache;
use crate::api::{Api, ApiError, Reply, ResourceRequest, discovery, openapi};
use crate::certs::{self, CertError};
use crate::storage::{Store, StoreError};

pub type Body = BoxBody<Bytes, Infallible>;

/// How the API server is run.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub service_cluster_ip_range: IpNet,
    pub cluster_cidr: Option<IpNet>,
    /// A CSV of `token,user,uid[,"group1,group2"]`; when absent one is made under the data dir.
    pub token_auth_file: Option<PathBuf>,
    /// The key service account tokens are signed with (64 hex digits); when absent one is
    /// made under the data dir. API servers sharing a store must share this key.
    pub service_account_key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Certs(#[from] CertError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    ServiceAccountKey(#[from] crate::api::tokens::TokenError),
    #[error("token file {path}: {why}")]
    Tokens { path: PathBuf, why: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("starting the API: {0}")]
    Api(#[from] ApiError),
}

/// A user known by bearer token.
#[derive(Clone, Debug)]
pub struct TokenUser {
    pub name: String,
    pub uid: String,
}

/// Reads a static token file (`token,user,uid[,groups]` per line; `#` comments).
pub fn load_tokens(path: &Path) -> Result<HashMap<String, TokenUser>, ServerError> {
    let err = |why: String| ServerError::Tokens {
        path: path.to_owned(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut tokens = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.splitn(4, ',').map(str::trim).collect();
        if fields.len() < 3 || fields[0].is_empty() || fields[1].is_empty() {
            return Err(err(format!(
                "line {}: expected token,user,uid[,groups]",
                i + 1
            )));
        }
        tokens.insert(
            fields[0].to_owned(),
            TokenUser {
                name: fields[1].to_owned(),
                uid: fields[2].to_owned(),
            },
        );
    }
    Ok(tokens)
}

fn ensure_token_file(data_dir: &Path) -> Result<PathBuf, ServerError> {
    use rand::Rng;
    let path = data_dir.join("tokens.csv");
    if !path.exists() {
        let token: String = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(40)
            .map(char::from)
            .collect();
        let err = |e: std::io::Error| ServerError::Tokens {
            path: path.clone(),
            why: e.to_string(),
        };
        std::fs::write(&path, format!("{token},admin,admin,system:masters\n")).map_err(err)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(path)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

fn tls_config(paths: &certs::CertPaths) -> Result<rustls::ServerConfig, ServerError> {
    let tls = |e: String| ServerError::Tls(e);
    let ca = CertificateDer::from_pem_file(&paths.ca_cert)
        .map_err(|e| tls(format!("{}: {e}", paths.ca_cert.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).map_err(|e| tls(e.to_string()))?;
    let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(e.to_string()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&paths.serving_cert)
        .map_err(|e| tls(format!("{}: {e}", paths.serving_cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_file(&paths.serving_key)
        .map_err(|e| tls(format!("{}: {e}", paths.serving_key.display())))?;
    let mut config = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

struct Shared {
    api: Arc<Api>,
    tokens: HashMap<String, TokenUser>,
}

/// The cluster CA certificate (PEM) clients verify this server with: what the
/// `kube-root-ca.crt` ConfigMaps publish.
fn read_ca(paths: &certs::CertPaths) -> Result<String, ServerError> {
    std::fs::read_to_string(&paths.ca_cert)
        .map_err(|e| ServerError::Tls(format!("{}: {e}", paths.ca_cert.display())))
}

/// Binds, prepares certificates and the kubeconfig, and serves until the process ends.
pub async fn run(config: Config, store: Arc<dyn Store>) -> Result<(), ServerError> {
    prepare(config, store).await?.serve().await
}

/// A bound listener with its certificates, tokens and [`Api`], ready to serve; the
/// in-process scheduler and controllers take the [`Api`] from here.
pub struct Prepared {
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shared: Arc<Shared>,
    root_ca_pem: String,
}

impl Prepared {
    pub fn api(&self) -> Arc<Api> {
        Arc::clone(&self.shared.api)
    }

    /// The cluster CA certificate in PEM, for the root CA publisher.
    pub fn root_ca_pem(&self) -> &str {
        &self.root_ca_pem
    }

    /// Serves until the process ends.
    pub async fn serve(self) -> Result<(), ServerError> {
        let Prepared {
            listener,
            tls,
            shared,
            ..
        } = self;
        serve(listener, tls, shared).await
    }
}

/// Binds, prepares certificates, the kubeconfig and the [`Api`] without serving yet.
pub async fn prepare(config: Config, store: Arc<dyn Store>) -> Result<Prepared, ServerError> {
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;
    let mut sans = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let listen_ip = config.listen.ip();
    if !listen_ip.is_unspecified() && !sans.contains(&listen_ip.to_string()) {
        sans.push(listen_ip.to_string());
    }
    let host = hostname();
    if !host.is_empty() && !sans.contains(&host) {
        sans.push(host);
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| ServerError::Tls(format!("creating {}: {e}", config.data_dir.display())))?;
    let paths = certs::ensure(&config.data_dir, &sans)?;
    let tls = tls_config(&paths)?;
    let token_path = match &config.token_auth_file {
        Some(p) => p.clone(),
        None => ensure_token_file(&config.data_dir)?,
    };
    let tokens = load_tokens(&token_path)?;
    let key_path = config
        .service_account_key_file
        .clone()
        .unwrap_or_else(|| config.data_dir.join("service-account.key"));
    let issuer = Arc::new(TokenIssuer::load_or_create(&key_path)?);
    let root_ca_pem = read_ca(&paths)?;

    let revision = store.current_revision().await?;
    let cache = WatchCache::new(revision);
    tokio::spawn(cache.clone().run(store.clone(), REGISTRY_PREFIX.to_owned()));
    let api = Api::new(
        store,
        cache,
        Allocator::new(config.service_cluster_ip_range),
    )
    .with_node_logs(Arc::new(KubeletClient::new(
        &paths.kubelet_client_cert,
        &paths.kubelet_client_key,
    )?))
    .with_token_issuer(issuer);
    api.bootstrap().await?;

    let server_ip = match local.ip() {
        ip if ip.is_unspecified() => IpAddr::from([127, 0, 0, 1]),
        ip => ip,
    };
    let url = format!("https://{}", SocketAddr::new(server_ip, local.port()));
    certs::write_kubeconfig(&paths, &url)?;
    tracing::info!(%url, kubeconfig = %paths.kubeconfig.display(), "API server listening");

    let shared = Arc::new(Shared {
        api: Arc::new(api),
        tokens,
    });
    Ok(Prepared {
        listener,
        tls,
        shared,
        root_ca_pem,
    })
}

async fn serve(
    listener: TcpListener,
    tls: rustls::ServerConfig,
    shared: Arc<Shared>,
) -> Result<(), ServerError> {
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                continue;
            }
        };
        send_writes_at_once(&tcp, peer);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
            };
            let has_cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req, has_cert).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
}

/// Turns Nagle's algorithm off on an accepted connection. With it on, a watch event written
/// while the client has not yet acknowledged the previous one waits for that ACK, and a watch
/// connection carries no request bytes back to bring it early: the client's delayed ACK
/// (up to 40 ms on Linux) set watch delivery p99 at about 40 ms.
fn send_writes_at_once(tcp: &tokio::net::TcpStream, peer: SocketAddr) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(%peer, error = %e, "setting TCP_NODELAY; watch events may be delayed");
    }
}

fn full(body: Bytes) -> Body {
    Full::new(body).boxed()
}

fn json_response(code: u16, body: &Value, warnings: &[String]) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for w in warnings {
        if let Ok(v) = HeaderValue::from_str(&format!("299 - {}", Value::String(w.clone()))) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

/// Streams each chunk to the client as it arrives (watch events, followed logs).
fn stream_response(rx: tokio::sync::mpsc::Receiver<Bytes>, content_type: &str) -> Response<Body> {
    let stream = ReceiverStream::new(rx).map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let mut resp = Response::new(BodyExt::boxed(StreamBody::new(stream)));
    let content_type = HeaderValue::from_str(content_type)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code(), &err.status(), &[])
}

/// A client certificate signed by the cluster CA, a static token, or a service account
/// token that still holds.
async fn authenticated(shared: &Shared, req: &Request<Incoming>, has_cert: bool) -> bool {
    if has_cert {
        return true;
    }
    let Some(token) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
    else {
        return false;
    };
    shared.tokens.contains_key(token) || shared.api.authenticate_token(token).await.is_some()
}

fn wants_table(req: &Request<Incoming>, query: &HashMap<String, String>) -> Option<IncludeObject> {
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    accept
        .split(',')
        .any(|part| part.contains("as=Table") && part.contains("g=meta.k8s.io"))
        .then(|| IncludeObject::parse(query.get("includeObject").map(String::as_str)))
}

async fn handle(shared: &Shared, req: Request<Incoming>, has_cert: bool) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let response = respond(shared, req, has_cert).await;
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    response
}

async fn respond(shared: &Shared, req: Request<Incoming>, has_cert: bool) -> Response<Body> {
    if !authenticated(shared, &req, has_cert).await {
        return error_response(&ApiError::Unauthorized);
    }
    let route = match request::route(req.uri().path()) {
        Ok(route) => route,
        Err(e) => return error_response(&e),
    };
    let simple = |doc: Option<Value>| match doc {
        Some(doc) => json_response(200, &doc, &[]),
        None => error_response(&ApiError::NoRoute),
    };
    match route {
        Route::Version => simple(Some(discovery::version())),
        Route::Healthz => {
            let mut resp = Response::new(full(Bytes::from_static(b"ok")));
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            resp
        }
        Route::CoreVersions => simple(Some(discovery::core_versions())),
        Route::Groups => simple(Some(discovery::groups())),
        Route::Group(g) => simple(discovery::group(&g)),
        Route::GroupResources { group, version } => simple(discovery::resources(&group, &version)),
        Route::OpenApiV3Root => simple(Some(openapi::root())),
        Route::OpenApiV3Doc(gv) => simple(openapi::group_version_document(&gv).cloned()),
        Route::OpenApiV2 => error_response(&ApiError::NoRoute),
        Route::Resource(route) => {
            let query = request::parse_query(req.uri().query());
            let content_type = req
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/json")
                .to_owned();
            let verb = match request::verb(req.method(), &route, &query, &content_type) {
                Ok(v) => v,
                Err(e) => return error_response(&e),
            };
            let table = wants_table(&req, &query);
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        return error_response(&ApiError::TooLarge { limit: MAX_BODY });
                    }
                    return error_response(&ApiError::BadRequest(format!("reading the body: {e}")));
                }
            };
            let request = ResourceRequest {
                route,
                verb,
                query,
                content_type,
                table,
                body,
            };
            if request.verb == request::Verb::Get
                && request.route.subresource.as_deref() == Some("log")
            {
                return match shared.api.pod_logs(&request).await {
                    Ok(log) => stream_response(log.body, &log.content_type),
                    Err(e) => error_response(&e),
                };
            }
            if let Some(list) = shared.api.list_json(&request).await {
                return match list {
                    Ok(body) => {
                        let mut resp = Response::new(full(body));
                        resp.headers_mut().insert(
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("application/json"),
                        );
                        resp
                    }
                    Err(e) => error_response(&e),
                };
            }
            match shared.api.handle(request).await {
                Ok(Reply::Json {
                    code,
                    body,
                    warnings,
                }) => json_response(code, &body, &warnings),
                Ok(Reply::Watch(rx)) => stream_response(rx, "application/json"),
                Err(e) => error_response(&e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_send_without_nagle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tcp, peer) = listener.accept().await.expect("accept");
        assert!(!tcp.nodelay().expect("read TCP_NODELAY"), "off by default");
        send_writes_at_once(&tcp, peer);
        assert!(tcp.nodelay().expect("read TCP_NODELAY"));
    }

    #[test]
    fn token_file_lines_are_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens.csv");
        std::fs::write(
            &path,
            "# admins\nabc,admin,1,\"system:masters\"\n\nxyz,node1,2\n",
        )
        .expect("write");
        let tokens = load_tokens(&path).expect("valid");
        assert_eq!(tokens["abc"].name, "admin");
        assert_eq!(tokens["xyz"].uid, "2");
        std::fs::write(&path, "onlytoken\n").expect("write");
        let err = load_tokens(&path).expect_err("missing user");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn a_generated_token_file_is_kept_across_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = ensure_token_file(dir.path()).expect("made");
        let first = std::fs::read_to_string(&path).expect("read");
        ensure_token_file(dir.path()).expect("kept");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), first);
        assert_eq!(load_tokens(&path).expect("valid").len(), 1);
    }
}
