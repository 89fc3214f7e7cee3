//! [`ClusterClient`] over HTTPS, for control loops (and tests and benchmarks) that run outside
//! the API server's process: one HTTP/2 connection with the admin client certificate, many
//! requests multiplexed on it, reconnected when it breaks.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_rustls::TlsConnector;

use super::client::{
    ClientError, ClusterClient, DeleteOptions, ObjectList, PatchKind, ResourceType, WatchStream,
};
use super::local::{parse_event, status_error};
use crate::certs::CertPaths;

/// The HTTPS client.
#[derive(Clone)]
pub struct HttpClient {
    inner: Arc<Inner>,
}

struct Inner {
    authority: String,
    host: String,
    tls: TlsConnector,
    conn: Mutex<Option<SendRequest<Full<Bytes>>>>,
}

fn transport(what: &str, e: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(format!("{what}: {e}"))
}

impl HttpClient {
    /// A client of the server at `url` (`https://host:port`) trusting `ca_pem` and presenting
    /// `cert_pem`/`key_pem`.
    pub fn new(
        url: &str,
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
    ) -> Result<Self, ClientError> {
        let authority = url
            .strip_prefix("https://")
            .ok_or_else(|| transport("server URL", format!("{url:?} is not https://host:port")))?
            .trim_end_matches('/')
            .to_owned();
        let host = match authority.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
            None => authority.clone(),
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(ca_pem) {
            roots
                .add(ca.map_err(|e| transport("CA certificate", e))?)
                .map_err(|e| transport("CA certificate", e))?;
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| transport("client certificate", e))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| transport("client key", e))?;
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| transport("client certificate", e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(HttpClient {
            inner: Arc::new(Inner {
                authority,
                host,
                tls: TlsConnector::from(Arc::new(config)),
                conn: Mutex::new(None),
            }),
        })
    }

    /// A client of the control plane whose `--data-dir` is `data_dir`, with its admin
    /// credentials and the server URL from its `admin.kubeconfig`.
    pub fn from_data_dir(data_dir: &Path) -> Result<Self, ClientError> {
        let paths = CertPaths::new(data_dir);
        let read = |p: &Path| std::fs::read(p).map_err(|e| transport(&p.display().to_string(), e));
        let kubeconfig = read(&paths.kubeconfig)?;
        let config: Value = serde_yaml::from_slice(&kubeconfig)
            .map_err(|e| transport(&paths.kubeconfig.display().to_string(), e))?;
        let url = config
            .pointer("/clusters/0/cluster/server")
            .and_then(Value::as_str)
            .ok_or_else(|| transport("kubeconfig", "no clusters[0].cluster.server"))?;
        Self::new(
            url,
            &read(&paths.ca_cert)?,
            &read(&paths.admin_cert)?,
            &read(&paths.admin_key)?,
        )
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let tcp = tokio::net::TcpStream::connect(&self.inner.authority)
            .await
            .map_err(|e| transport(&format!("connecting to {}", self.inner.authority), e))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.inner.host.clone())
            .map_err(|e| transport("server name", e))?;
        let tls = self
            .inner
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| transport("TLS handshake", e))?;
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| transport("HTTP/2 handshake", e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "API connection ended");
            }
        });
        Ok(send)
    }

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let mut conn = self.inner.conn.lock().await;
        if let Some(send) = conn.as_ref().filter(|s| !s.is_closed()) {
            return Ok(send.clone());
        }
        let send = self.connect().await?;
        *conn = Some(send.clone());
        Ok(send)
    }

    async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let bytes = match body {
            Some(v) => {
                Bytes::from(serde_json::to_vec(v).map_err(|source| ClientError::Decode {
                    what: "request body".into(),
                    source,
                })?)
            }
            None => Bytes::new(),
        };
        let uri = format!("https://{}{path_and_query}", self.inner.authority);
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, content_type)
            .header(header::ACCEPT, "application/json")
            .body(Full::new(bytes))
            .map_err(|e| transport("building the request", e))?;
        let mut send = self.sender().await?;
        send.ready()
            .await
            .map_err(|e| transport("API connection", e))?;
        send.send_request(req)
            .await
            .map_err(|e| transport(&format!("request {path_and_query}"), e))
    }

    async fn json(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<&Value>,
        rt: ResourceType,
        name: &str,
    ) -> Result<Value, ClientError> {
        let resp = self.send(method, path, content_type, body).await?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| transport(&format!("reading {path}"), e))?
            .to_bytes();
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
                what: format!("answer to {path}"),
                source,
            })?
        };
        if status.is_success() {
            Ok(value)
        } else {
            Err(status_error(status.as_u16(), &value, rt, name))
        }
    }
}

fn object_path(rt: ResourceType, namespace: Option<&str>, name: &str, sub: Option<&str>) -> String {
    let mut path = format!("{}/{name}", rt.collection_path(namespace));
    if let Some(sub) = sub {
        path.push('/');
        path.push_str(sub);
    }
    path
}

fn query(params: &HashMap<&str, &str>) -> String {
    let mut parts: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.sort();
    parts.join("&")
}

const JSON: &str = "application/json";

#[async_trait]
impl ClusterClient for HttpClient {
    async fn get(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ClientError> {
        let path = object_path(rt, namespace, name, None);
        self.json(Method::GET, &path, JSON, None, rt, name).await
    }

    async fn list(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
    ) -> Result<ObjectList, ClientError> {
        let path = rt.collection_path(namespace);
        let mut v = self.json(Method::GET, &path, JSON, None, rt, "").await?;
        let resource_version = v
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("0")
            .to_owned();
        let items = match v.get_mut("items").map(Value::take) {
            Some(Value::Array(items)) => items,
            _ => Vec::new(),
        };
        Ok(ObjectList {
            items,
            resource_version,
        })
    }

    async fn watch(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        resource_version: &str,
    ) -> Result<WatchStream, ClientError> {
        let params = HashMap::from([
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
        ]);
        let path = format!("{}?{}", rt.collection_path(namespace), query(&params));
        let resp = self.send(Method::GET, &path, JSON, None).await?;
        if resp.status() != StatusCode::OK {
            let code = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(status_error(code, &body, rt, ""));
        }
        let body = resp.into_body();
        let stream =
            futures::stream::unfold((body, Vec::<u8>::new()), |(mut body, mut buf)| async move {
                loop {
                    if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        return Some((parse_event(&line), (body, buf)));
                    }
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                buf.extend_from_slice(&data);
                            }
                        }
                        Some(Err(e)) => {
                            return Some((Err(transport("watch stream", e)), (body, Vec::new())));
                        }
                        None => return None,
                    }
                }
            });
        Ok(Box::pin(stream))
    }

    async fn create(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        obj: Value,
    ) -> Result<Value, ClientError> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let path = rt.collection_path(namespace);
        self.json(Method::POST, &path, JSON, Some(&obj), rt, &name)
            .await
    }

    async fn update(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        obj: Value,
    ) -> Result<Value, ClientError> {
        let path = object_path(rt, namespace, name, subresource);
        self.json(Method::PUT, &path, JSON, Some(&obj), rt, name)
            .await
    }

    async fn patch(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        kind: PatchKind,
        patch: Value,
    ) -> Result<Value, ClientError> {
        let ct = match kind {
            PatchKind::Merge => "application/merge-patch+json",
            PatchKind::Json => "application/json-patch+json",
        };
        let path = object_path(rt, namespace, name, subresource);
        self.json(Method::PATCH, &path, ct, Some(&patch), rt, name)
            .await
    }

    async fn delete(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        opts: DeleteOptions,
    ) -> Result<(), ClientError> {
        let mut body = json!({"apiVersion": "v1", "kind": "DeleteOptions"});
        if let Some(p) = opts.propagation {
            body["propagationPolicy"] = json!(p.as_str());
        }
        if let Some(uid) = &opts.uid {
            body["preconditions"] = json!({"uid": uid});
        }
        if let Some(g) = opts.grace_period_seconds {
            body["gracePeriodSeconds"] = json!(g);
        }
        let path = object_path(rt, namespace, name, None);
        self.json(Method::DELETE, &path, JSON, Some(&body), rt, name)
            .await
            .map(|_| ())
    }

    async fn post_subresource(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: Value,
    ) -> Result<Value, ClientError> {
        let path = object_path(rt, namespace, name, Some(subresource));
        self.json(Method::POST, &path, JSON, Some(&body), rt, name)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_and_credentials_must_parse() {
        let err = HttpClient::new("http://127.0.0.1:1", b"", b"", b"")
            .err()
            .expect("plain http is refused");
        assert!(err.to_string().contains("not https"), "{err}");
        let err = HttpClient::new("https://127.0.0.1:1", b"", b"", b"garbage")
            .err()
            .expect("a key that is not PEM is refused");
        assert!(err.to_string().contains("client key"), "{err}");
    }

    #[test]
    fn paths_name_the_object_and_subresource() {
        let pods = ResourceType::of::<k8s_openapi::api::core::v1::Pod>();
        assert_eq!(
            object_path(pods, Some("ns"), "p", Some("binding")),
            "/api/v1/namespaces/ns/pods/p/binding"
        );
        let nodes = ResourceType::of::<k8s_openapi::api::core::v1::Node>();
        assert_eq!(object_path(nodes, Some("ns"), "n", None), "/api/v1/nodes/n");
    }
}
