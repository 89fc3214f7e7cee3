//! The `pods/log` subresource: a pod's container log, read from the agent (kubelet) of the
//! node the pod is bound to and streamed through to the client unchanged.
//!
//! Everything that decides *what* to ask is pure and tested here: the query's options, the
//! container (the only one, or the one named), the node's address and kubelet port, and the
//! kubelet's `/containerLogs/...` path. *How* it is fetched sits behind [`NodeLogs`], whose
//! real implementation, [`KubeletClient`], speaks HTTPS to the kubelet with the control
//! plane's own client certificate.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use tokio::sync::mpsc;

use super::error::{ApiError, FieldError};

/// The kubelet's port when the Node does not report one.
pub const DEFAULT_KUBELET_PORT: u16 = 10250;

/// How long connecting (TCP + TLS + response headers) to a kubelet may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest error body read back from a kubelet.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The `PodLogOptions` of a `pods/log` request, from its query string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub container: Option<String>,
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<i64>,
    pub since_seconds: Option<i64>,
    pub since_time: Option<String>,
    pub limit_bytes: Option<i64>,
}

fn flag(query: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match query.get(name).map(String::as_str) {
        None | Some("" | "false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(ApiError::BadRequest(format!(
            "{name} must be true or false, not {other:?}"
        ))),
    }
}

fn integer(query: &HashMap<String, String>, name: &str) -> Result<Option<i64>, ApiError> {
    match query.get(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => v
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("{name} must be an integer, not {v:?}"))),
    }
}

impl LogOptions {
    /// Parses and checks the options of a log request for pod `pod`.
    pub fn parse(query: &HashMap<String, String>, pod: &str) -> Result<LogOptions, ApiError> {
        let opts = LogOptions {
            container: query.get("container").filter(|c| !c.is_empty()).cloned(),
            follow: flag(query, "follow")?,
            previous: flag(query, "previous")?,
            timestamps: flag(query, "timestamps")?,
            tail_lines: integer(query, "tailLines")?,
            since_seconds: integer(query, "sinceSeconds")?,
            since_time: query.get("sinceTime").filter(|t| !t.is_empty()).cloned(),
            limit_bytes: integer(query, "limitBytes")?,
        };
        let mut causes = Vec::new();
        if let Some(n) = opts.tail_lines.filter(|n| *n < 0) {
            causes.push(FieldError::invalid(
                "tailLines",
                &n.to_string(),
                "must be greater than or equal to 0",
            ));
        }
        if let Some(n) = opts.since_seconds.filter(|n| *n < 1) {
            causes.push(FieldError::invalid(
                "sinceSeconds",
                &n.to_string(),
                "must be greater than 0",
            ));
        }
        if let Some(n) = opts.limit_bytes.filter(|n| *n < 1) {
            causes.push(FieldError::invalid(
                "limitBytes",
                &n.to_string(),
                "must be greater than 0",
            ));
        }
        if opts.since_seconds.is_some() && opts.since_time.is_some() {
            causes.push(FieldError::forbidden(
                "sinceSeconds",
                "at most one of `sinceTime` or `sinceSeconds` may be specified",
            ));
        }
        if let Some(t) = &opts.since_time
            && super::object::parse_timestamp(t).is_none()
        {
            causes.push(FieldError::invalid(
                "sinceTime",
                t,
                "must be an RFC 3339 time",
            ));
        }
        if !causes.is_empty() {
            return Err(ApiError::invalid("PodLogOptions", "", pod, causes));
        }
        Ok(opts)
    }

    /// The kubelet path serving this log: `/containerLogs/{namespace}/{pod}/{container}?...`.
    pub fn kubelet_path(&self, namespace: &str, pod: &str, container: &str) -> String {
        let mut query = Vec::new();
        if self.follow {
            query.push("follow=true".to_owned());
        }
        if self.previous {
            query.push("previous=true".to_owned());
        }
        if self.timestamps {
            query.push("timestamps=true".to_owned());
        }
        if let Some(n) = self.tail_lines {
            query.push(format!("tailLines={n}"));
        }
        if let Some(n) = self.since_seconds {
            query.push(format!("sinceSeconds={n}"));
        }
        if let Some(t) = &self.since_time {
            query.push(format!("sinceTime={}", percent_encode(t)));
        }
        if let Some(n) = self.limit_bytes {
            query.push(format!("limitBytes={n}"));
        }
        let mut path = format!(
            "/containerLogs/{}/{}/{}",
            percent_encode(namespace),
            percent_encode(pod),
            percent_encode(container)
        );
        if !query.is_empty() {
            path.push('?');
            path.push_str(&query.join("&"));
        }
        path
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn container_names(pod: &Value, field: &str) -> Vec<String> {
    pod["spec"][field]
        .as_array()
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The container whose log is wanted: the one named, or the pod's only container. Errors
/// are worded as upstream's so scripts matching them keep working.
pub fn container_for(
    pod: &Value,
    pod_name: &str,
    requested: Option<&str>,
) -> Result<String, ApiError> {
    let containers = container_names(pod, "containers");
    let init = container_names(pod, "initContainers");
    let ephemeral = container_names(pod, "ephemeralContainers");
    match requested {
        Some(name) => {
            if containers
                .iter()
                .chain(&init)
                .chain(&ephemeral)
                .any(|c| c == name)
            {
                Ok(name.to_owned())
            } else {
                let mut message = format!("container {name} is not valid for pod {pod_name}");
                if !containers.is_empty() {
                    message = format!(
                        "container {name} is not valid for pod {pod_name}, choose one of: [{}]",
                        containers.join(" ")
                    );
                }
                Err(ApiError::BadRequest(message))
            }
        }
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => {
            let mut message = format!(
                "a container name must be specified for pod {pod_name}, choose one of: [{}]",
                containers.join(" ")
            );
            if !init.is_empty() {
                message.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init.join(" ")
                ));
            }
            Err(ApiError::BadRequest(message))
        }
    }
}

/// Where a node's kubelet listens: its InternalIP (else ExternalIP) and the port it reports
/// in `status.daemonEndpoints.kubeletEndpoint.Port` (10250 when it reports none).
pub fn kubelet_endpoint(node: &Value, node_name: &str) -> Result<(String, u16), ApiError> {
    let addresses = node["status"]["addresses"].as_array();
    let address_of = |kind: &str| {
        addresses.and_then(|list| {
            list.iter()
                .find(|a| a["type"] == kind)
                .and_then(|a| a["address"].as_str())
                .filter(|a| !a.is_empty())
                .map(str::to_owned)
        })
    };
    let host = address_of("InternalIP")
        .or_else(|| address_of("ExternalIP"))
        .ok_or_else(|| {
            ApiError::ServiceUnavailable(format!(
                "node {node_name} reports no InternalIP or ExternalIP address, so its agent \
                 cannot be reached"
            ))
        })?;
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .filter(|p| (1..=u64::from(u16::MAX)).contains(p))
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(DEFAULT_KUBELET_PORT);
    Ok((host, port))
}

/// A log being streamed from a node: its content type and its bytes as they arrive.
pub struct LogStream {
    pub content_type: String,
    pub body: mpsc::Receiver<Bytes>,
}

/// Fetches a path from a node's agent.
#[async_trait::async_trait]
pub trait NodeLogs: Send + Sync {
    /// GETs `path` from the agent at `host:port`; a non-2xx answer is an error carrying the
    /// agent's status code and message.
    async fn get(
        &self,
        node: &str,
        host: &str,
        port: u16,
        path: &str,
    ) -> Result<LogStream, ApiError>;
}

/// Accepts whatever certificate the kubelet presents (still checking the handshake's
/// signatures). Kubelets serve self-signed certificates by default; verifying them against
/// a cluster CA is future work.
#[derive(Debug)]
struct AnyServerCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// HTTPS to kubelets, authenticated with the control plane's kubelet-client certificate.
pub struct KubeletClient {
    tls: tokio_rustls::TlsConnector,
}

impl KubeletClient {
    /// A client presenting the certificate chain and key in these PEM files.
    pub fn new(cert: &Path, key: &Path) -> Result<KubeletClient, ApiError> {
        let setup =
            |what: &str, e: String| ApiError::Internal(format!("kubelet client {what}: {e}"));
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| setup("certificate", format!("{}: {e}", cert.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| setup("certificate", format!("{}: {e}", cert.display())))?;
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| setup("key", format!("{}: {e}", key.display())))?;
        let provider = CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| setup("TLS", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServerCertificate(provider)))
            .with_client_auth_cert(chain, key)
            .map_err(|e| setup("TLS", e.to_string()))?;
        Ok(KubeletClient {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    async fn connect(
        &self,
        node: &str,
        host: &str,
        port: u16,
        path: &str,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ApiError> {
        let unreachable = |why: String| {
            ApiError::ServiceUnavailable(format!(
                "the agent of node {node} at {host}:{port} is unreachable: {why}"
            ))
        };
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| unreachable(format!("bad address: {e}")))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| unreachable(format!("HTTP: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "kubelet connection ended");
            }
        });
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .body(Empty::<Bytes>::new())
            .map_err(|e| ApiError::Internal(format!("building the kubelet request: {e}")))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| ApiError::BadGateway(format!("the agent of node {node} failed: {e}")))
    }
}

/// The agent's own status as the API's error: its code, and its message (a Status body's
/// `message`, or the plain text it answered).
fn agent_error(code: u16, body: &[u8]) -> ApiError {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    ApiError::Upstream { code, message }
}

#[async_trait::async_trait]
impl NodeLogs for KubeletClient {
    async fn get(
        &self,
        node: &str,
        host: &str,
        port: u16,
        path: &str,
    ) -> Result<LogStream, ApiError> {
        let response = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(node, host, port, path))
            .await
            .map_err(|_| {
                ApiError::ServiceUnavailable(format!(
                    "the agent of node {node} at {host}:{port} is unreachable: no answer within {CONNECT_TIMEOUT:?}"
                ))
            })??;
        let status = response.status();
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("text/plain")
            .to_owned();
        let mut body = response.into_body();
        if !status.is_success() {
            let limited = http_body_util::Limited::new(body, MAX_ERROR_BODY);
            let bytes = tokio::time::timeout(CONNECT_TIMEOUT, limited.collect())
                .await
                .ok()
                .and_then(Result::ok)
                .map(http_body_util::Collected::to_bytes)
                .unwrap_or_default();
            return Err(agent_error(status.as_u16(), &bytes));
        }
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    () = tx.closed() => return,
                    frame = body.frame() => frame,
                };
                match frame {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data()
                            && !data.is_empty()
                            && tx.send(data).await.is_err()
                        {
                            return;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "kubelet log stream ended");
                        return;
                    }
                    None => return,
                }
            }
        });
        Ok(LogStream {
            content_type,
            body: rx,
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn query(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn options_become_the_kubelet_query() {
        let opts = LogOptions::parse(
            &query(&[
                ("container", "app"),
                ("follow", "true"),
                ("tailLines", "10"),
                ("timestamps", "true"),
                ("limitBytes", "500"),
            ]),
            "web",
        )
        .expect("valid");
        assert_eq!(
            opts.kubelet_path("ns1", "web", "app"),
            "/containerLogs/ns1/web/app?follow=true&timestamps=true&tailLines=10&limitBytes=500"
        );
        let plain = LogOptions::parse(&query(&[]), "web").expect("valid");
        assert_eq!(plain.kubelet_path("a", "b", "c"), "/containerLogs/a/b/c");
        let since = LogOptions::parse(&query(&[("sinceTime", "2026-01-02T03:04:05Z")]), "w")
            .expect("valid");
        assert!(
            since
                .kubelet_path("a", "b", "c")
                .ends_with("?sinceTime=2026-01-02T03%3A04%3A05Z")
        );
    }

    #[test]
    fn bad_options_are_refused_with_the_field() {
        let err = LogOptions::parse(&query(&[("tailLines", "ten")]), "web").expect_err("text");
        assert_eq!(err.code(), 400);
        assert!(err.to_string().contains("tailLines"), "{err}");
        let err = LogOptions::parse(&query(&[("tailLines", "-1")]), "web").expect_err("negative");
        assert_eq!(err.code(), 422);
        assert!(
            err.to_string().contains("tailLines: Invalid value"),
            "{err}"
        );
        let err = LogOptions::parse(&query(&[("follow", "yes")]), "web").expect_err("flag");
        assert!(err.to_string().contains("follow"), "{err}");
        let err = LogOptions::parse(
            &query(&[("sinceSeconds", "5"), ("sinceTime", "2026-01-02T03:04:05Z")]),
            "web",
        )
        .expect_err("both");
        assert!(err.to_string().contains("at most one"), "{err}");
        let err = LogOptions::parse(&query(&[("limitBytes", "0")]), "web").expect_err("zero");
        assert!(err.to_string().contains("limitBytes"), "{err}");
    }

    #[test]
    fn the_container_is_the_only_one_or_the_named_one() {
        let one = json!({"spec": {"containers": [{"name": "app"}]}});
        assert_eq!(container_for(&one, "p", None).expect("only"), "app");
        let two = json!({"spec": {
            "initContainers": [{"name": "setup"}],
            "containers": [{"name": "app"}, {"name": "sidecar"}],
        }});
        let err = container_for(&two, "p", None).expect_err("ambiguous");
        assert_eq!(err.code(), 400);
        assert_eq!(
            err.to_string(),
            "a container name must be specified for pod p, choose one of: [app sidecar] \
             or one of the init containers: [setup]"
        );
        assert_eq!(
            container_for(&two, "p", Some("setup")).expect("init"),
            "setup"
        );
        let err = container_for(&two, "p", Some("nope")).expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "container nope is not valid for pod p, choose one of: [app sidecar]"
        );
    }

    #[test]
    fn the_kubelet_is_found_by_internal_ip_and_reported_port() {
        let node = json!({"status": {
            "addresses": [{"type": "Hostname", "address": "n1"}, {"type": "InternalIP", "address": "10.0.0.5"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10350}},
        }});
        assert_eq!(
            kubelet_endpoint(&node, "n1").expect("found"),
            ("10.0.0.5".to_owned(), 10350)
        );
        let no_port =
            json!({"status": {"addresses": [{"type": "ExternalIP", "address": "192.0.2.1"}]}});
        assert_eq!(
            kubelet_endpoint(&no_port, "n1").expect("found"),
            ("192.0.2.1".to_owned(), DEFAULT_KUBELET_PORT)
        );
        let err = kubelet_endpoint(&json!({"status": {}}), "n1").expect_err("no address");
        assert_eq!(err.code(), 503);
        assert!(err.to_string().contains("node n1"), "{err}");
    }

    #[test]
    fn agent_errors_keep_their_code_and_message() {
        let err = agent_error(404, br#"{"kind":"Status","message":"container gone"}"#);
        assert_eq!(err.code(), 404);
        assert_eq!(err.to_string(), "container gone");
        let err = agent_error(500, b"boom\n");
        assert_eq!(err.to_string(), "boom");
    }
}
