//! [`ClusterClient`] over the API server's request handler in the same process: the
//! scheduler and controllers go through exactly the validation, defaulting, admission and
//! watch code that HTTP clients do, without TLS and serialisation round trips.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{Value, json};

use super::client::{
    ClientError, ClusterClient, DeleteOptions, ObjectList, PatchKind, ResourceType, WatchEvent,
    WatchStream,
};
use crate::api::patch::PatchType;
use crate::api::registry::{self, Resource};
use crate::api::request::{ResourceRoute, Verb};
use crate::api::{Api, ApiError, Reply, ResourceRequest};

/// The in-process client.
#[derive(Clone)]
pub struct LocalClient {
    api: Arc<Api>,
}

impl LocalClient {
    pub fn new(api: Arc<Api>) -> Self {
        LocalClient { api }
    }
}

fn resource(rt: ResourceType) -> Result<&'static Resource, ClientError> {
    registry::find(rt.group, rt.version, rt.plural).ok_or_else(|| ClientError::Api {
        code: 404,
        message: format!("the server does not serve {rt}"),
    })
}

fn map_err(e: ApiError, rt: ResourceType, name: &str) -> ClientError {
    let message = e.to_string();
    match e.code() {
        404 => ClientError::NotFound {
            resource: rt.to_string(),
            name: name.to_owned(),
        },
        409 if matches!(e, ApiError::AlreadyExists { .. }) => ClientError::AlreadyExists {
            resource: rt.to_string(),
            name: name.to_owned(),
        },
        409 => ClientError::Conflict {
            resource: rt.to_string(),
            name: name.to_owned(),
            message,
        },
        410 => ClientError::Gone(message),
        422 => ClientError::Invalid {
            resource: rt.to_string(),
            name: name.to_owned(),
            message,
        },
        code => ClientError::Api { code, message },
    }
}

pub(crate) fn status_error(code: u16, body: &Value, rt: ResourceType, name: &str) -> ClientError {
    let message = body
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    match code {
        404 => ClientError::NotFound {
            resource: rt.to_string(),
            name: name.to_owned(),
        },
        409 if body.get("reason").and_then(Value::as_str) == Some("AlreadyExists") => {
            ClientError::AlreadyExists {
                resource: rt.to_string(),
                name: name.to_owned(),
            }
        }
        409 => ClientError::Conflict {
            resource: rt.to_string(),
            name: name.to_owned(),
            message,
        },
        410 => ClientError::Gone(message),
        code => ClientError::Api { code, message },
    }
}

impl LocalClient {
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: Option<&str>,
        subresource: Option<&str>,
        verb: Verb,
        query: HashMap<String, String>,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        let r = resource(rt)?;
        let body = match body {
            Some(v) => {
                Bytes::from(serde_json::to_vec(v).map_err(|source| ClientError::Decode {
                    what: "request body".into(),
                    source,
                })?)
            }
            None => Bytes::new(),
        };
        let req = ResourceRequest {
            route: ResourceRoute {
                resource: r,
                namespace: namespace.filter(|_| rt.namespaced).map(str::to_owned),
                name: name.map(str::to_owned),
                subresource: subresource.map(str::to_owned),
            },
            verb,
            query,
            content_type: content_type.to_owned(),
            table: None,
            body,
        };
        self.api
            .handle(req)
            .await
            .map_err(|e| map_err(e, rt, name.unwrap_or_default()))
    }

    #[allow(clippy::too_many_arguments)]
    async fn json(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: Option<&str>,
        subresource: Option<&str>,
        verb: Verb,
        query: HashMap<String, String>,
        content_type: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        match self
            .call(
                rt,
                namespace,
                name,
                subresource,
                verb,
                query,
                content_type,
                body,
            )
            .await?
        {
            Reply::Json { code, body, .. } if code < 300 => Ok(body),
            Reply::Json { code, body, .. } => {
                Err(status_error(code, &body, rt, name.unwrap_or_default()))
            }
            Reply::Watch(_) => Err(ClientError::Transport("unexpected watch reply".into())),
        }
    }
}

const JSON: &str = "application/json";

#[async_trait]
impl ClusterClient for LocalClient {
    async fn get(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ClientError> {
        self.json(
            rt,
            namespace,
            Some(name),
            None,
            Verb::Get,
            HashMap::new(),
            JSON,
            None,
        )
        .await
    }

    async fn list(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
    ) -> Result<ObjectList, ClientError> {
        let v = self
            .json(
                rt,
                namespace,
                None,
                None,
                Verb::List,
                HashMap::new(),
                JSON,
                None,
            )
            .await?;
        let resource_version = v
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("0")
            .to_owned();
        let items = match v.get("items") {
            Some(Value::Array(items)) => items.clone(),
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
        let query = HashMap::from([
            ("resourceVersion".to_owned(), resource_version.to_owned()),
            ("allowWatchBookmarks".to_owned(), "true".to_owned()),
        ]);
        let rx = match self
            .call(rt, namespace, None, None, Verb::Watch, query, JSON, None)
            .await?
        {
            Reply::Watch(rx) => rx,
            Reply::Json { code, body, .. } => return Err(status_error(code, &body, rt, "")),
        };
        let stream =
            futures::stream::unfold((rx, Vec::<u8>::new()), |(mut rx, mut buf)| async move {
                loop {
                    if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=pos).collect();
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        return Some((parse_event(&line), (rx, buf)));
                    }
                    match rx.recv().await {
                        Some(chunk) => buf.extend_from_slice(&chunk),
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
        match self
            .call(
                rt,
                namespace,
                None,
                None,
                Verb::Create,
                HashMap::new(),
                JSON,
                Some(&obj),
            )
            .await?
        {
            Reply::Json { code, body, .. } if code < 300 => Ok(body),
            Reply::Json { code, body, .. } => Err(status_error(code, &body, rt, &name)),
            Reply::Watch(_) => Err(ClientError::Transport("unexpected watch reply".into())),
        }
    }

    async fn update(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        obj: Value,
    ) -> Result<Value, ClientError> {
        self.json(
            rt,
            namespace,
            Some(name),
            subresource,
            Verb::Update,
            HashMap::new(),
            JSON,
            Some(&obj),
        )
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
        let (pt, ct) = match kind {
            PatchKind::Merge => (PatchType::Merge, "application/merge-patch+json"),
            PatchKind::Json => (PatchType::Json, "application/json-patch+json"),
        };
        self.json(
            rt,
            namespace,
            Some(name),
            subresource,
            Verb::Patch(pt),
            HashMap::new(),
            ct,
            Some(&patch),
        )
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
        self.json(
            rt,
            namespace,
            Some(name),
            None,
            Verb::Delete,
            HashMap::new(),
            JSON,
            Some(&body),
        )
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
        self.json(
            rt,
            namespace,
            Some(name),
            Some(subresource),
            Verb::Create,
            HashMap::new(),
            JSON,
            Some(&body),
        )
        .await
    }
}

/// One watch line: `{"type": "ADDED", "object": {...}}`.
pub fn parse_event(line: &[u8]) -> Result<WatchEvent, ClientError> {
    let v: Value = serde_json::from_slice(line).map_err(|source| ClientError::Decode {
        what: "watch event".into(),
        source,
    })?;
    let object = v.get("object").cloned().unwrap_or(Value::Null);
    match v.get("type").and_then(Value::as_str) {
        Some("ADDED") => Ok(WatchEvent::Added(object)),
        Some("MODIFIED") => Ok(WatchEvent::Modified(object)),
        Some("DELETED") => Ok(WatchEvent::Deleted(object)),
        Some("BOOKMARK") => Ok(WatchEvent::Bookmark(
            object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
        )),
        Some("ERROR") => {
            let code = object.get("code").and_then(Value::as_u64).unwrap_or(500) as u16;
            let message = object
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            Err(if code == 410 {
                ClientError::Gone(message)
            } else {
                ClientError::Api { code, message }
            })
        }
        other => Err(ClientError::Transport(format!(
            "unknown watch event type {other:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_lines_parse() {
        let ev = parse_event(br#"{"type":"ADDED","object":{"metadata":{"name":"a"}}}"#).unwrap();
        assert!(matches!(ev, WatchEvent::Added(v) if v["metadata"]["name"] == "a"));
        let gone = parse_event(
            br#"{"type":"ERROR","object":{"kind":"Status","code":410,"message":"too old"}}"#,
        );
        assert!(matches!(gone, Err(ClientError::Gone(m)) if m == "too old"));
        let bm =
            parse_event(br#"{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"42"}}}"#)
                .unwrap();
        assert_eq!(bm, WatchEvent::Bookmark("42".into()));
        assert!(parse_event(b"not json").is_err());
        assert!(parse_event(br#"{"type":"WHAT"}"#).is_err());
    }
}
