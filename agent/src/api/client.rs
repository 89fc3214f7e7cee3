//! The real [`Api`]: HTTPS to the API server with reqwest over rustls, trusting only the
//! kubeconfig's CA, authenticating with its client certificate or bearer token.

use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::{
    Api, ApiError, ApiResource, DeleteParams, Kubeconfig, ListParams, ObjectList, Patch,
    WatchEvent, collection_path,
};

/// How long a single non-watch request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Watches end server-side after this long and are resumed; a dead connection is noticed then.
const WATCH_TIMEOUT_SECONDS: u32 = 290;

/// A connection to one API server.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    server: String,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct StatusBody {
    #[serde(default)]
    message: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    code: u16,
}

#[derive(Deserialize)]
#[serde(bound = "K: DeserializeOwned")]
struct ListBody<K> {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default = "Vec::new")]
    items: Vec<K>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ListMeta {
    #[serde(default)]
    resource_version: String,
}

#[derive(Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    object: serde_json::Value,
}

impl Client {
    /// A client for the server the kubeconfig names.
    pub fn new(config: &Kubeconfig) -> Result<Client, ApiError> {
        let mut builder = reqwest::Client::builder()
            .tls_backend_rustls()
            .connect_timeout(Duration::from_secs(10))
            .tcp_keepalive(Duration::from_secs(30))
            .user_agent(concat!("ferrolet/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(ca)
                .map_err(|e| ApiError::Setup(format!("kubeconfig CA: {e}")))?;
            builder = builder.tls_certs_only(certs);
        }
        if config.insecure_skip_tls_verify {
            builder = builder.tls_danger_accept_invalid_certs(true);
        }
        if let Some(identity) = &config.identity_pem {
            let identity = reqwest::Identity::from_pem(identity)
                .map_err(|e| ApiError::Setup(format!("kubeconfig client certificate/key: {e}")))?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| ApiError::Setup(format!("TLS client: {e}")))?;
        Ok(Client {
            http,
            server: config.server.clone(),
            token: config.token.clone(),
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.server))
            .header("Accept", "application/json");
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        req
    }

    async fn send(
        &self,
        method: &'static str,
        path: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes, ApiError> {
        let resp = req.send().await.map_err(|source| ApiError::Transport {
            method,
            path: path.to_owned(),
            source,
        })?;
        let status = resp.status();
        let body = resp.bytes().await.map_err(|source| ApiError::Transport {
            method,
            path: path.to_owned(),
            source,
        })?;
        if status.is_success() {
            return Ok(body);
        }
        Err(status_error(method, path, status.as_u16(), &body))
    }

    /// POSTs `body` to `path` and decodes the answer.
    async fn post<B: serde::Serialize, R: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<R, ApiError> {
        let req = self
            .request(reqwest::Method::POST, path)
            .json(body)
            .timeout(REQUEST_TIMEOUT);
        let answer = self.send("POST", path, req).await?;
        decode(path, &answer)
    }
}

fn status_error(method: &'static str, path: &str, code: u16, body: &[u8]) -> ApiError {
    let parsed: Option<StatusBody> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().map_or_else(
        || String::from_utf8_lossy(body).trim().to_owned(),
        |s| s.message.clone(),
    );
    if code == 410 {
        return ApiError::Gone {
            path: path.to_owned(),
            message,
        };
    }
    ApiError::Status {
        method,
        path: path.to_owned(),
        code,
        reason: parsed.map(|s| s.reason).unwrap_or_default(),
        message,
    }
}

fn decode<T: DeserializeOwned>(path: &str, body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|source| ApiError::Decode {
        path: path.to_owned(),
        source,
    })
}

/// `path?k=v&...` with keys and values percent-encoded.
fn with_query(path: &str, query: &[(&str, String)]) -> String {
    if query.is_empty() {
        return path.to_owned();
    }
    let encode = |s: &str| {
        let mut out = String::with_capacity(s.len());
        for b in s.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    };
    let pairs: Vec<String> = query
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

fn selector_query(params: &ListParams) -> Vec<(&'static str, String)> {
    let mut query = Vec::new();
    if let Some(l) = &params.label_selector {
        query.push(("labelSelector", l.clone()));
    }
    if let Some(f) = &params.field_selector {
        query.push(("fieldSelector", f.clone()));
    }
    query
}

/// Parses one line of a watch stream.
fn parse_event<K: ApiResource>(path: &str, line: &[u8]) -> Result<WatchEvent<K>, ApiError> {
    let raw: RawEvent = decode(path, line)?;
    let object = |v: serde_json::Value| {
        serde_json::from_value::<K>(v).map_err(|source| ApiError::Decode {
            path: path.to_owned(),
            source,
        })
    };
    match raw.kind.as_str() {
        "ADDED" => Ok(WatchEvent::Added(object(raw.object)?)),
        "MODIFIED" => Ok(WatchEvent::Modified(object(raw.object)?)),
        "DELETED" => Ok(WatchEvent::Deleted(object(raw.object)?)),
        "BOOKMARK" => Ok(WatchEvent::Bookmark(
            raw.object
                .pointer("/metadata/resourceVersion")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        )),
        "ERROR" => {
            let status: StatusBody =
                serde_json::from_value(raw.object).map_err(|source| ApiError::Decode {
                    path: path.to_owned(),
                    source,
                })?;
            Err(status_error(
                "WATCH",
                path,
                status.code,
                &serde_json::to_vec(&serde_json::json!({
                    "message": status.message, "reason": status.reason
                }))
                .unwrap_or_default(),
            ))
        }
        other => Err(ApiError::Status {
            method: "WATCH",
            path: path.to_owned(),
            code: 0,
            reason: "UnknownEvent".into(),
            message: format!("watch event type {other:?}"),
        }),
    }
}

impl Api for Client {
    async fn get<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<K>, ApiError> {
        let path = format!("{}/{name}", collection_path::<K>(namespace));
        let req = self
            .request(reqwest::Method::GET, &path)
            .timeout(REQUEST_TIMEOUT);
        match self.send("GET", &path, req).await {
            Ok(body) => decode(&path, &body).map(Some),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        params: &ListParams,
    ) -> Result<ObjectList<K>, ApiError> {
        let path = collection_path::<K>(namespace);
        let req = self
            .request(
                reqwest::Method::GET,
                &with_query(&path, &selector_query(params)),
            )
            .timeout(REQUEST_TIMEOUT);
        let body = self.send("LIST", &path, req).await?;
        let list: ListBody<K> = decode(&path, &body)?;
        Ok(ObjectList {
            items: list.items,
            resource_version: list.metadata.resource_version,
        })
    }

    async fn watch<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        params: &ListParams,
        resource_version: &str,
    ) -> Result<BoxStream<'static, Result<WatchEvent<K>, ApiError>>, ApiError> {
        let path = collection_path::<K>(namespace);
        let mut query = selector_query(params);
        query.push(("watch", "true".into()));
        query.push(("resourceVersion", resource_version.to_owned()));
        query.push(("allowWatchBookmarks", "true".into()));
        query.push(("timeoutSeconds", WATCH_TIMEOUT_SECONDS.to_string()));
        let mut resp = self
            .request(reqwest::Method::GET, &with_query(&path, &query))
            .send()
            .await
            .map_err(|source| ApiError::Transport {
                method: "WATCH",
                path: path.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(status_error("WATCH", &path, status.as_u16(), &body));
        }
        let stream = async_stream(move |tx| async move {
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let chunk = match resp.chunk().await {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(source) => {
                        let _ = tx
                            .send(Err(ApiError::Transport {
                                method: "WATCH",
                                path: path.clone(),
                                source,
                            }))
                            .await;
                        return;
                    }
                };
                buf.extend_from_slice(&chunk);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let line = line.trim_ascii();
                    if line.is_empty() {
                        continue;
                    }
                    let event = parse_event::<K>(&path, line);
                    let stop = event.is_err();
                    if tx.send(event).await.is_err() || stop {
                        return;
                    }
                }
            }
            let rest = buf.trim_ascii();
            if !rest.is_empty() {
                let _ = tx.send(parse_event::<K>(&path, rest)).await;
            }
        });
        Ok(stream)
    }

    async fn create<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        object: &K,
    ) -> Result<K, ApiError> {
        self.post(&collection_path::<K>(namespace), object).await
    }

    async fn create_subresource<K: ApiResource, B: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: &B,
    ) -> Result<B, ApiError> {
        let path = format!("{}/{name}/{subresource}", collection_path::<K>(namespace));
        self.post(&path, body).await
    }

    async fn patch<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        patch: &Patch,
    ) -> Result<K, ApiError> {
        let mut path = format!("{}/{name}", collection_path::<K>(namespace));
        if let Some(sub) = subresource {
            path.push('/');
            path.push_str(sub);
        }
        let body = serde_json::to_vec(patch.body()).map_err(|source| ApiError::Decode {
            path: path.clone(),
            source,
        })?;
        let req = self
            .request(reqwest::Method::PATCH, &path)
            .header("Content-Type", patch.content_type())
            .body(body)
            .timeout(REQUEST_TIMEOUT);
        let body = self.send("PATCH", &path, req).await?;
        decode(&path, &body)
    }

    async fn delete<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        params: &DeleteParams,
    ) -> Result<(), ApiError> {
        let path = format!("{}/{name}", collection_path::<K>(namespace));
        let mut options = serde_json::json!({"kind": "DeleteOptions", "apiVersion": "v1"});
        if let Some(grace) = params.grace_period_seconds {
            options["gracePeriodSeconds"] = grace.into();
        }
        if let Some(uid) = &params.uid {
            options["preconditions"] = serde_json::json!({ "uid": uid });
        }
        let req = self
            .request(reqwest::Method::DELETE, &path)
            .json(&options)
            .timeout(REQUEST_TIMEOUT);
        self.send("DELETE", &path, req).await.map(|_| ())
    }
}

/// A stream fed by a spawned task through a small channel, so the HTTP body is read ahead
/// while the consumer works.
fn async_stream<T, F, Fut>(body: F) -> BoxStream<'static, T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn watch_lines_parse_into_events_and_410_into_gone() {
        let added = br#"{"type":"ADDED","object":{"metadata":{"name":"p","resourceVersion":"5"}}}"#;
        match parse_event::<Pod>("/p", added).expect("event") {
            WatchEvent::Added(p) => assert_eq!(p.metadata.name.as_deref(), Some("p")),
            other => panic!("{other:?}"),
        }
        let bookmark = br#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}"#;
        assert!(matches!(
            parse_event::<Pod>("/p", bookmark),
            Ok(WatchEvent::Bookmark(rv)) if rv == "9"
        ));
        let gone = br#"{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired","message":"too old resource version: 1 (5)"}}"#;
        let err = parse_event::<Pod>("/p", gone).expect_err("ERROR event");
        assert!(matches!(err, ApiError::Gone { .. }), "{err:?}");
        assert!(err.to_string().contains("too old"), "{err}");
        let junk = parse_event::<Pod>("/p", b"{not json").expect_err("junk");
        assert!(matches!(junk, ApiError::Decode { .. }), "{junk:?}");
        let wrong = br#"{"type":"ADDED","object":{"kind":"Node","metadata":{}}}"#;
        assert!(parse_event::<Pod>("/p", wrong).is_err());
    }

    #[test]
    fn query_strings_are_percent_encoded() {
        assert_eq!(with_query("/p", &[]), "/p");
        assert_eq!(
            with_query(
                "/p",
                &[
                    ("fieldSelector", "spec.nodeName=a b".into()),
                    ("watch", "true".into())
                ]
            ),
            "/p?fieldSelector=spec.nodeName%3Da%20b&watch=true"
        );
    }

    #[test]
    fn status_bodies_become_specific_errors() {
        let err = status_error(
            "GET",
            "/api/v1/nodes/x",
            404,
            br#"{"kind":"Status","message":"nodes \"x\" not found","reason":"NotFound","code":404}"#,
        );
        assert!(err.is_not_found());
        assert!(err.to_string().contains("nodes \"x\" not found"), "{err}");
        let plain = status_error("GET", "/x", 500, b"boom\n");
        assert_eq!(plain.code(), Some(500));
        assert!(plain.to_string().contains("boom"), "{plain}");
    }
}
