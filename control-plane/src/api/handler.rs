//! The API's request handling over the store: create, read, list, watch, update, patch and
//! delete with Kubernetes semantics. Transport-free: takes a parsed request, returns a value
//! or a stream of watch events; `server/` does HTTP.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::admission;
use super::allocator::{AllocError, Allocator};
use super::decode::{self, FieldValidation};
use super::error::{ApiError, FieldError};
use super::logs::{self, LogOptions, LogStream, NodeLogs};
use super::object::{self, metadata_mut};
use super::openapi;
use super::patch::{self, PatchType};
use super::registry::{self, Kind, Resource};
use super::request::{ResourceRoute, Verb};
use super::selectors::{FieldSelector, LabelSelector};
use super::table::{self, IncludeObject};
use super::tokens::{self, TokenIssuer};
use super::validation;
use super::watchcache::{CacheEvent, WatchCache};
use crate::storage::{KeyValue, ListOptions, Revision, Store, StoreError, WatchEvent};

/// A request for a resource path, already routed.
pub struct ResourceRequest {
    pub route: ResourceRoute,
    pub verb: Verb,
    pub query: HashMap<String, String>,
    pub content_type: String,
    /// `Some` when the client asked for `meta.k8s.io/v1` Table output.
    pub table: Option<IncludeObject>,
    pub body: Bytes,
}

/// What the API answers.
pub enum Reply {
    /// One JSON document, with the HTTP status and `Warning` header values.
    Json {
        code: u16,
        body: Value,
        warnings: Vec<String>,
    },
    /// A watch: newline-delimited JSON events until the sender is dropped.
    Watch(mpsc::Receiver<Bytes>),
}

fn ok(body: Value) -> Reply {
    Reply::Json {
        code: 200,
        body,
        warnings: Vec::new(),
    }
}

pub struct Api {
    store: Arc<dyn Store>,
    cache: Arc<WatchCache>,
    alloc: Allocator,
    /// Reaches nodes' agents for `pods/log`; without it log requests answer 503.
    node_logs: Option<Arc<dyn NodeLogs>>,
    /// Signs service account tokens; without it `serviceaccounts/token` answers 503.
    tokens: Option<Arc<TokenIssuer>>,
}

/// Prefix every API object is stored under; the watch cache follows all of it.
pub const REGISTRY_PREFIX: &str = "/registry/";

const SYSTEM_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

fn store_err(r: &Resource, name: &str) -> impl Fn(StoreError) -> ApiError {
    let resource = r.qualified();
    let name = name.to_owned();
    move |e| ApiError::from_store(e, &resource, &name)
}

fn parse_revision(s: &str) -> Result<Revision, ApiError> {
    s.parse::<Revision>()
        .ok()
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "invalid resource version {s:?}: must be a non-negative integer"
            ))
        })
}

/// The object as the client sees it: stored JSON plus its resourceVersion, kind and apiVersion.
fn render(r: &Resource, kv: &KeyValue) -> Result<Value, ApiError> {
    let mut obj: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("stored object {} is not JSON: {e}", kv.key)))?;
    set_rv(&mut obj, kv.mod_revision);
    if let Some(map) = obj.as_object_mut() {
        map.insert("apiVersion".into(), json!(r.api_version()));
        map.insert("kind".into(), json!(r.kind_name));
    }
    Ok(obj)
}

/// [`render`], encoded: what the watch cache keeps once per object version.
fn render_bytes(r: &Resource, kv: &KeyValue) -> Result<Bytes, ApiError> {
    serde_json::to_vec(&render(r, kv)?)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(format!("encoding object {}: {e}", kv.key)))
}

/// How long a list waits for the watch cache to catch up with the store before reading the
/// store itself (only writes from outside this API server can keep it behind that long).
const CACHE_CATCH_UP: Duration = Duration::from_millis(50);

fn set_rv(obj: &mut Value, rev: Revision) {
    metadata_mut(obj).insert("resourceVersion".into(), json!(rev.to_string()));
}

fn to_bytes(obj: &Value) -> Result<Bytes, ApiError> {
    let mut stored = obj.clone();
    metadata_mut(&mut stored).remove("resourceVersion");
    serde_json::to_vec(&stored)
        .map(Bytes::from)
        .map_err(|e| ApiError::Internal(format!("encoding object: {e}")))
}

fn spec_part(obj: &Value) -> Value {
    let mut copy = obj.clone();
    if let Some(map) = copy.as_object_mut() {
        for k in ["metadata", "status", "apiVersion", "kind"] {
            map.remove(k);
        }
    }
    copy
}

fn alloc_err(e: AllocError, r: &Resource, name: &str) -> ApiError {
    match e {
        AllocError::Store(s) => ApiError::from_store(s, &r.qualified(), name),
        AllocError::Taken(what) => ApiError::invalid(
            r.kind_name,
            r.group,
            name,
            vec![FieldError::invalid(
                "spec",
                &what,
                "provided IP or port is already allocated",
            )],
        ),
        AllocError::OutOfRange(ip, range) => ApiError::invalid(
            r.kind_name,
            r.group,
            name,
            vec![FieldError::invalid(
                "spec.clusterIPs",
                &ip,
                &format!(
                    "failed to allocate IP {ip}: the provided IP is not in the valid range ({range})"
                ),
            )],
        ),
        other => ApiError::Internal(other.to_string()),
    }
}

fn node_ports(obj: &Value) -> Vec<u16> {
    obj.pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p.get("nodePort").and_then(Value::as_u64))
                .filter_map(|p| u16::try_from(p).ok())
                .filter(|p| *p != 0)
                .collect()
        })
        .unwrap_or_default()
}

fn needs_node_ports(obj: &Value) -> bool {
    matches!(
        obj.pointer("/spec/type").and_then(Value::as_str),
        Some("NodePort" | "LoadBalancer")
    )
}

fn cluster_ip(obj: &Value) -> Option<String> {
    obj.pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && *s != "None")
        .map(str::to_owned)
}

/// Options of a DELETE, from the body (DeleteOptions) and the query.
struct DeleteOptions {
    grace: Option<i64>,
    propagation: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    dry_run: bool,
}

impl DeleteOptions {
    fn parse(body: &Bytes, query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let opts: Value = if body.is_empty() {
            json!({})
        } else {
            decode::parse_body(body, "application/json")?
        };
        let grace = match query.get("gracePeriodSeconds") {
            Some(g) => Some(g.parse::<i64>().map_err(|_| {
                ApiError::BadRequest(format!("gracePeriodSeconds must be an integer, not {g:?}"))
            })?),
            None => opts.get("gracePeriodSeconds").and_then(Value::as_i64),
        };
        let propagation = query
            .get("propagationPolicy")
            .cloned()
            .or_else(|| {
                opts.get("propagationPolicy")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .or_else(
                || match opts.get("orphanDependents").and_then(Value::as_bool) {
                    Some(true) => Some("Orphan".to_owned()),
                    _ => None,
                },
            );
        if let Some(p) = &propagation
            && !["Orphan", "Background", "Foreground"].contains(&p.as_str())
        {
            return Err(ApiError::BadRequest(format!(
                "propagationPolicy must be Orphan, Background or Foreground, not {p:?}"
            )));
        }
        let pre = opts.get("preconditions");
        let dry_run = query.get("dryRun").is_some_and(|d| d == "All")
            || opts
                .get("dryRun")
                .and_then(Value::as_array)
                .is_some_and(|d| !d.is_empty());
        Ok(DeleteOptions {
            grace,
            propagation,
            uid: pre
                .and_then(|p| p.get("uid"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            resource_version: pre
                .and_then(|p| p.get("resourceVersion"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            dry_run,
        })
    }
}

/// Selectors and paging of a list or watch.
struct ListQuery {
    labels: LabelSelector,
    fields: FieldSelector,
    limit: Option<usize>,
    continue_from: Option<(Revision, String)>,
}

fn allowed_field(kind: Kind, field: &str) -> bool {
    if matches!(field, "metadata.name" | "metadata.namespace") {
        return true;
    }
    match kind {
        Kind::Pod => matches!(
            field,
            "spec.nodeName"
                | "spec.restartPolicy"
                | "spec.schedulerName"
                | "spec.serviceAccountName"
                | "spec.hostNetwork"
                | "status.phase"
                | "status.podIP"
                | "status.nominatedNodeName"
        ),
        Kind::Event => {
            field.starts_with("involvedObject.")
                || matches!(field, "reason" | "reportingComponent" | "source" | "type")
        }
        Kind::Namespace => field == "status.phase",
        Kind::Node => field == "spec.unschedulable",
        Kind::Secret => field == "type",
        Kind::ReplicaSet | Kind::Job => field == "status.replicas" || field == "status.successful",
        _ => false,
    }
}

impl ListQuery {
    fn parse(kind: Kind, query: &HashMap<String, String>) -> Result<Self, ApiError> {
        let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::BadRequest(format!("invalid labelSelector: {e}")))?;
        let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(|e| ApiError::BadRequest(format!("invalid fieldSelector: {e}")))?;
        for term in &fields.0 {
            if !allowed_field(kind, &term.field) {
                return Err(ApiError::BadRequest(format!(
                    "field label not supported: {}",
                    term.field
                )));
            }
        }
        let limit = match query.get("limit").map(String::as_str) {
            None | Some("" | "0") => None,
            Some(l) => Some(l.parse::<usize>().map_err(|_| {
                ApiError::BadRequest(format!("limit must be a non-negative integer, not {l:?}"))
            })?),
        };
        let continue_from = match query.get("continue").filter(|c| !c.is_empty()) {
            None => None,
            Some(token) => Some(decode_continue(token)?),
        };
        Ok(ListQuery {
            labels,
            fields,
            limit,
            continue_from,
        })
    }

    /// Whether every object matches (no label or field selector).
    fn is_everything(&self) -> bool {
        self.labels.0.is_empty() && self.fields.0.is_empty()
    }

    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(&object::labels(obj))
            && self.fields.matches(|f| object::field_string(obj, f))
    }
}

fn encode_continue(rev: Revision, key: &str) -> String {
    hex::encode(format!("{rev}\n{key}"))
}

fn decode_continue(token: &str) -> Result<(Revision, String), ApiError> {
    let bad = || ApiError::BadRequest(format!("invalid continue token {token:?}"));
    let raw = hex::decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (rev, key) = text.split_once('\n').ok_or_else(bad)?;
    Ok((rev.parse().map_err(|_| bad())?, key.to_owned()))
}

impl Api {
    pub fn new(store: Arc<dyn Store>, cache: Arc<WatchCache>, alloc: Allocator) -> Self {
        Api {
            store,
            cache,
            alloc,
            node_logs: None,
            tokens: None,
        }
    }

    /// Serves `serviceaccounts/token` and accepts the tokens it issues.
    pub fn with_token_issuer(mut self, tokens: Arc<TokenIssuer>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// The user a service account token authenticates as: the token must verify (see
    /// [`TokenIssuer::verify`]) and its service account, and the pod it is bound to, must
    /// still exist with the uids it names. `None` for any other token.
    pub async fn authenticate_token(&self, token: &str) -> Option<String> {
        let issuer = self.tokens.as_ref()?;
        let claims = match issuer.verify(token, object::now().timestamp()) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "bearer token refused");
                return None;
            }
        };
        let k = &claims.kubernetes;
        let ns = Some(k.namespace.as_str());
        let uid_of = |kv: &KeyValue, r: &Resource| {
            render(r, kv)
                .ok()
                .map(|o| object::meta_str(&o, "uid").to_owned())
        };
        let sas = registry::by_kind(Kind::ServiceAccount);
        let sa = self.read(sas, ns, &k.serviceaccount.name).await.ok()?;
        if uid_of(&sa, sas).as_deref() != Some(k.serviceaccount.uid.as_str()) {
            tracing::debug!(user = %claims.username(), "token of a service account that is gone");
            return None;
        }
        if let Some(pod) = &k.pod {
            let pods = registry::by_kind(Kind::Pod);
            let current = self.read(pods, ns, &pod.name).await.ok()?;
            if uid_of(&current, pods).as_deref() != Some(pod.uid.as_str()) {
                tracing::debug!(user = %claims.username(), pod = %pod.name, "token of a pod that is gone");
                return None;
            }
        }
        Some(claims.username())
    }

    /// Serves `pods/log` by fetching logs from nodes' agents through `node_logs`.
    pub fn with_node_logs(mut self, node_logs: Arc<dyn NodeLogs>) -> Self {
        self.node_logs = Some(node_logs);
        self
    }

    /// `GET pods/{name}/log`: finds the pod's node and container and streams the log from
    /// the node's agent. Served apart from [`Api::handle`] because its answer is a byte
    /// stream, not JSON.
    pub async fn pod_logs(&self, req: &ResourceRequest) -> Result<LogStream, ApiError> {
        let r = req.route.resource;
        let (ns, name) = (self.namespace(req).unwrap_or("default"), self.name(req));
        if r.kind != Kind::Pod || name.is_empty() {
            return Err(ApiError::NoRoute);
        }
        let opts = LogOptions::parse(&req.query, name)?;
        let pod = render(r, &self.read(r, Some(ns), name).await?)?;
        let node_name = pod["spec"]["nodeName"].as_str().unwrap_or("");
        if node_name.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "pod {name} does not have a host assigned"
            )));
        }
        let container = logs::container_for(&pod, name, opts.container.as_deref())?;
        let nodes = registry::by_kind(Kind::Node);
        let node = render(nodes, &self.read(nodes, None, node_name).await?)?;
        let (host, port) = logs::kubelet_endpoint(&node, node_name)?;
        let client = self.node_logs.as_ref().ok_or_else(|| {
            ApiError::ServiceUnavailable(
                "this API server has no client for nodes' agents, so it cannot serve logs".into(),
            )
        })?;
        let path = opts.kubelet_path(ns, name, &container);
        tracing::debug!(pod = name, namespace = ns, node = node_name, %host, port, %path, "proxying pod log");
        client.get(node_name, &host, port, &path).await
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Creates the namespaces every cluster has.
    pub async fn bootstrap(&self) -> Result<(), ApiError> {
        let r = registry::by_kind(Kind::Namespace);
        for ns in SYSTEM_NAMESPACES {
            let key = r.key(None, ns);
            if self
                .store
                .get(&key)
                .await
                .map_err(store_err(r, ns))?
                .is_some()
            {
                continue;
            }
            let mut obj =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            self.init_metadata(&mut obj);
            validation::default(Kind::Namespace, &mut obj);
            match self.store.create(&key, to_bytes(&obj)?).await {
                Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(store_err(r, ns)(e)),
            }
        }
        if let Err(e) = self.alloc.repair(self.store.as_ref()).await {
            tracing::warn!(error = %e, "freeing IPs and ports of services that do not exist");
        }
        Ok(())
    }

    pub async fn handle(&self, req: ResourceRequest) -> Result<Reply, ApiError> {
        let sub = req.route.subresource.as_deref();
        match (&req.verb, sub) {
            (Verb::Get, Some("scale")) => self.get_scale(&req).await.map(ok),
            (Verb::Get, Some("log")) => Err(ApiError::BadRequest(
                "pod logs are a byte stream: request them over HTTP (Api::pod_logs)".into(),
            )),
            (Verb::Get, _) => self.get(&req).await.map(ok),
            (Verb::List, _) => self.list(&req).await.map(ok),
            (Verb::Watch, _) => self.watch(&req).await,
            (Verb::Create, Some("binding")) => self.bind(&req).await,
            (Verb::Create, Some("eviction")) => self.evict(&req).await,
            (Verb::Create, Some("token")) => self.token_request(&req).await,
            (Verb::Create, _) => self.create(&req).await,
            (Verb::Update, Some("scale")) => self.update_scale(&req, None).await,
            (Verb::Patch(kind), Some("scale")) => self.update_scale(&req, Some(*kind)).await,
            (Verb::Update, _) => self.update(&req).await,
            (Verb::Patch(kind), _) => self.patch(&req, *kind).await,
            (Verb::Delete, None) => self.delete(&req).await,
            (Verb::DeleteCollection, None) => self.delete_collection(&req).await,
            _ => Err(ApiError::MethodNotAllowed(
                "this verb is not supported on this subresource".into(),
            )),
        }
    }

    fn namespace<'a>(&self, req: &'a ResourceRequest) -> Option<&'a str> {
        req.route.namespace.as_deref()
    }

    fn name<'a>(&self, req: &'a ResourceRequest) -> &'a str {
        req.route.name.as_deref().unwrap_or("")
    }

    async fn read(&self, r: &Resource, ns: Option<&str>, name: &str) -> Result<KeyValue, ApiError> {
        self.store
            .get(&r.key(ns, name))
            .await
            .map_err(store_err(r, name))?
            .ok_or_else(|| ApiError::NotFound {
                resource: r.qualified(),
                name: name.to_owned(),
            })
    }

    async fn get(&self, req: &ResourceRequest) -> Result<Value, ApiError> {
        let r = req.route.resource;
        if let Some(rv) = req.query.get("resourceVersion").filter(|s| !s.is_empty()) {
            parse_revision(rv)?;
        }
        let kv = self.read(r, self.namespace(req), self.name(req)).await?;
        let obj = render(r, &kv)?;
        Ok(match req.table {
            Some(include) => table::table(
                r.kind,
                &[obj],
                json!({"resourceVersion": kv.mod_revision.to_string()}),
                include,
                true,
            ),
            None => obj,
        })
    }

    /// A whole, unfiltered list (no selector, limit, continue or Table) as the encoded
    /// response, served from the watch cache's shared per-object JSON without decoding or
    /// re-encoding any object. `None` when the request needs the general path. Consistent
    /// as a store read: unless the client asked for `resourceVersion=0` (any recent state),
    /// the cache first catches up with the store's current revision.
    pub async fn list_json(&self, req: &ResourceRequest) -> Option<Result<Bytes, ApiError>> {
        let r = req.route.resource;
        if req.verb != Verb::List || req.route.subresource.is_some() || req.table.is_some() {
            return None;
        }
        let q = ListQuery::parse(r.kind, &req.query).ok()?;
        if !q.is_everything() || q.limit.is_some() || q.continue_from.is_some() {
            return None;
        }
        if req.query.contains_key("resourceVersionMatch") {
            return None;
        }
        match req.query.get("resourceVersion").map(String::as_str) {
            Some("0") => {}
            None | Some("") => {
                let current = match self.store.current_revision().await {
                    Ok(rev) => rev,
                    Err(e) => return Some(Err(ApiError::from_store(e, &r.qualified(), ""))),
                };
                if !self.cache.wait_for(current, CACHE_CATCH_UP).await {
                    tracing::debug!(current, "watch cache behind the store; listing the store");
                    return None;
                }
            }
            Some(_) => return None,
        }
        let (revision, objects) = self.cache.list(&r.namespace_prefix(self.namespace(req)))?;
        let mut items = Vec::with_capacity(objects.len());
        for object in &objects {
            match object.json(|kv| render_bytes(r, kv)) {
                Ok(json) => items.push(json),
                Err(e) => return Some(Err(e)),
            }
        }
        let head = format!(
            r#"{{"kind":{},"apiVersion":{},"metadata":{{"resourceVersion":"{revision}"}},"items":["#,
            Value::String(r.list_kind()),
            Value::String(r.api_version()),
        );
        let size = head.len() + items.iter().map(|i| i.len() + 1).sum::<usize>() + 2;
        let mut body = Vec::with_capacity(size);
        body.extend_from_slice(head.as_bytes());
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(item);
        }
        body.extend_from_slice(b"]}");
        Some(Ok(Bytes::from(body)))
    }

    async fn list(&self, req: &ResourceRequest) -> Result<Value, ApiError> {
        let r = req.route.resource;
        let q = ListQuery::parse(r.kind, &req.query)?;
        if let Some(rv) = req.query.get("resourceVersion").filter(|s| !s.is_empty()) {
            parse_revision(rv)?;
        }
        let prefix = r.namespace_prefix(self.namespace(req));
        let (mut revision, mut start_after) = match &q.continue_from {
            Some((rev, key)) => (Some(*rev), Some(key.clone())),
            None => (None, None),
        };
        let mut items = Vec::new();
        let mut next = None;
        loop {
            let want = q.limit.map(|l| l.saturating_sub(items.len()).max(1));
            let page = self
                .store
                .list(
                    &prefix,
                    ListOptions {
                        revision,
                        start_after: start_after.clone(),
                        limit: want.map(|w| w.max(50)),
                    },
                )
                .await
                .map_err(|e| match e {
                    StoreError::Compacted { .. } if q.continue_from.is_some() => ApiError::Gone(
                        "The provided continue parameter is too old to display a consistent list \
                         result. You can start a new list without the continue parameter."
                            .into(),
                    ),
                    other => ApiError::from_store(other, &r.qualified(), ""),
                })?;
            revision = Some(page.revision);
            let more = page.more();
            let count = page.items.len();
            for (i, kv) in page.items.iter().enumerate() {
                let obj = render(r, kv)?;
                if q.matches(&obj) {
                    items.push(obj);
                }
                start_after = Some(kv.key.clone());
                if q.limit.is_some_and(|l| items.len() >= l) {
                    if more || i + 1 < count {
                        next = Some(encode_continue(page.revision, &kv.key));
                    }
                    break;
                }
            }
            if next.is_some() || !more || q.limit.is_some_and(|l| items.len() >= l) {
                break;
            }
        }
        let revision = revision.unwrap_or_default();
        let mut meta = json!({"resourceVersion": revision.to_string()});
        if let Some(token) = next {
            meta["continue"] = json!(token);
        }
        Ok(match req.table {
            Some(include) => table::table(r.kind, &items, meta, include, true),
            None => json!({
                "kind": r.list_kind(),
                "apiVersion": r.api_version(),
                "metadata": meta,
                "items": items,
            }),
        })
    }

    /// Decodes and checks a body for `r`: size, syntax, apiVersion/kind, unknown fields.
    fn decode_object(
        &self,
        req: &ResourceRequest,
        r: &Resource,
        definition: &str,
    ) -> Result<(Value, Vec<String>), ApiError> {
        if req.body.len() > decode::MAX_BODY {
            return Err(ApiError::TooLarge {
                limit: decode::MAX_BODY,
            });
        }
        let validation =
            FieldValidation::parse(req.query.get("fieldValidation").map(String::as_str))?;
        let value = decode::parse_body(&req.body, &req.content_type)?;
        if !value.is_object() {
            return Err(ApiError::BadRequest(
                "the request body must be a JSON object".into(),
            ));
        }
        let (want_version, want_kind) = match definition {
            "io.k8s.api.autoscaling.v1.Scale" => ("autoscaling/v1".to_owned(), "Scale"),
            _ => (r.api_version(), r.kind_name),
        };
        let api_version = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
        if !api_version.is_empty() && api_version != want_version {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({api_version}) does not match the expected API version ({want_version})"
            )));
        }
        if !kind.is_empty() && kind != want_kind {
            return Err(ApiError::BadRequest(format!(
                "the kind in the data ({kind}) does not match the expected kind ({want_kind})"
            )));
        }
        let unknown = decode::unknown_fields(&value, definition, openapi::definitions());
        let mut warnings = Vec::new();
        if !unknown.is_empty() {
            match validation {
                FieldValidation::Strict => {
                    let list: Vec<String> = unknown
                        .iter()
                        .map(|f| format!("unknown field {f:?}"))
                        .collect();
                    return Err(ApiError::BadRequest(format!(
                        "strict decoding error: {}",
                        list.join(", ")
                    )));
                }
                FieldValidation::Warn => {
                    warnings.extend(unknown.iter().map(|f| format!("unknown field {f:?}")));
                }
                FieldValidation::Ignore => {}
            }
        }
        Ok((value, warnings))
    }

    fn init_metadata(&self, obj: &mut Value) {
        let meta = metadata_mut(obj);
        meta.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        meta.insert(
            "creationTimestamp".into(),
            json!(object::timestamp(object::now())),
        );
        for k in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            meta.remove(k);
        }
    }

    async fn check_namespace(
        &self,
        r: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<(), ApiError> {
        let Some(ns) = ns.filter(|_| r.namespaced) else {
            return Ok(());
        };
        let nsr = registry::by_kind(Kind::Namespace);
        let kv = self.read(nsr, None, ns).await?;
        let obj = render(nsr, &kv)?;
        if !object::meta_str(&obj, "deletionTimestamp").is_empty() {
            return Err(ApiError::Forbidden(format!(
                "{} {name:?} is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                r.qualified(),
            )));
        }
        Ok(())
    }

    /// ServiceAccount admission of a new pod: mounts its account's token (see
    /// [`admission`]). A missing account is no error here; the node holds such a pod until
    /// the account exists.
    async fn admit_pod(&self, ns: &str, pod: &mut Value) -> Result<(), ApiError> {
        if admission::pod_opts_out(pod) {
            return Ok(());
        }
        let sar = registry::by_kind(Kind::ServiceAccount);
        let account_name = admission::service_account_name(pod).to_owned();
        let account = match self
            .store
            .get(&sar.key(Some(ns), &account_name))
            .await
            .map_err(store_err(sar, &account_name))?
        {
            Some(kv) => Some(render(sar, &kv)?),
            None => None,
        };
        admission::mount_service_account_token(pod, account.as_ref(), &object::random_suffix());
        Ok(())
    }

    fn check(&self, r: &Resource, obj: &Value, old: Option<&Value>) -> Result<(), ApiError> {
        let mut errs = validation::validate(r.kind, obj);
        if let Some(old) = old {
            errs.extend(validation::validate_update(r.kind, old, obj));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(
                r.kind_name,
                r.group,
                object::name(obj),
                errs,
            ))
        }
    }

    async fn create(&self, req: &ResourceRequest) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        if req.route.subresource.is_some() {
            return Err(ApiError::MethodNotAllowed(
                "create is not supported on this subresource".into(),
            ));
        }
        let (value, warnings) = self.decode_object(req, r, r.definition)?;
        let ns = self.namespace(req);
        let mut obj = decode::normalize(r.kind, value)?;
        if let Some(map) = obj.as_object_mut() {
            map.insert("apiVersion".into(), json!(r.api_version()));
            map.insert("kind".into(), json!(r.kind_name));
        }
        let body_ns = object::meta_str(&obj, "namespace").to_owned();
        if r.namespaced {
            let Some(ns) = ns else {
                return Err(ApiError::MethodNotAllowed(format!(
                    "{} must be created in a namespace",
                    r.qualified()
                )));
            };
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::BadRequest(format!(
                    "the namespace of the provided object ({body_ns}) does not match the namespace sent on the request ({ns})"
                )));
            }
            metadata_mut(&mut obj).insert("namespace".into(), json!(ns));
        } else {
            metadata_mut(&mut obj).remove("namespace");
        }
        if object::name(&obj).is_empty() {
            let generate = object::meta_str(&obj, "generateName").to_owned();
            if !generate.is_empty() {
                let base: String = generate.chars().take(58).collect();
                metadata_mut(&mut obj).insert(
                    "name".into(),
                    json!(format!("{base}{}", object::random_suffix())),
                );
            }
        }
        self.init_metadata(&mut obj);
        // Status is the system's to write, except that a node reports its own on registration.
        if r.has_status()
            && r.kind != Kind::Node
            && let Some(map) = obj.as_object_mut()
        {
            map.remove("status");
        }
        if r.tracks_generation() {
            metadata_mut(&mut obj).insert("generation".into(), json!(1));
        }
        validation::default(r.kind, &mut obj);
        if r.kind == Kind::Pod
            && let Some(ns) = ns
        {
            self.admit_pod(ns, &mut obj).await?;
        }
        self.check(r, &obj, None)?;
        let name = object::name(&obj).to_owned();
        self.check_namespace(r, ns, &name).await?;
        let dry_run = req.query.get("dryRun").is_some_and(|d| d == "All");
        let key = r.key(ns, &name);
        if dry_run {
            return Ok(Reply::Json {
                code: 201,
                body: obj,
                warnings,
            });
        }
        if self
            .store
            .get(&key)
            .await
            .map_err(store_err(r, &name))?
            .is_some()
        {
            return Err(ApiError::AlreadyExists {
                resource: r.qualified(),
                name,
            });
        }
        let allocated = if r.kind == Kind::Service {
            self.allocate_service(r, &key, &mut obj, None).await?
        } else {
            Allocated::default()
        };
        match self.store.create(&key, to_bytes(&obj)?).await {
            Ok(kv) => {
                set_rv(&mut obj, kv.mod_revision);
                Ok(Reply::Json {
                    code: 201,
                    body: obj,
                    warnings,
                })
            }
            Err(e) => {
                self.release(&allocated).await;
                Err(store_err(r, &name)(e))
            }
        }
    }

    /// Gives a Service its ClusterIP and node ports; `old` is the stored Service on update.
    async fn allocate_service(
        &self,
        r: &Resource,
        key: &str,
        obj: &mut Value,
        old: Option<&Value>,
    ) -> Result<Allocated, ApiError> {
        let name = object::name(obj).to_owned();
        let store = self.store.as_ref();
        let mut done = Allocated::default();
        let result: Result<(), AllocError> = async {
            let ty = obj
                .pointer("/spec/type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP")
                .to_owned();
            let old_ip = old.and_then(cluster_ip);
            let wants_ip = ty != "ExternalName"
                && obj.pointer("/spec/clusterIP").and_then(Value::as_str) != Some("None");
            if wants_ip {
                let ip = match (cluster_ip(obj), old_ip) {
                    (None, Some(old)) => old,
                    (Some(ip), Some(old)) if ip == old => old,
                    (Some(ip), _) => {
                        self.alloc.claim_ip(store, &ip, key).await?;
                        done.ips.push(ip.clone());
                        ip
                    }
                    (None, None) => {
                        let ip = self.alloc.allocate_ip(store, key).await?;
                        done.ips.push(ip.clone());
                        ip
                    }
                };
                if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                    spec.insert("clusterIP".into(), json!(ip));
                    spec.insert("clusterIPs".into(), json!([ip]));
                }
            }
            let old_ports = old.map(node_ports).unwrap_or_default();
            if needs_node_ports(obj) {
                let old_by_port: HashMap<i64, u16> = old
                    .and_then(|o| o.pointer("/spec/ports").and_then(Value::as_array).cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|p| {
                        Some((
                            p.get("port")?.as_i64()?,
                            u16::try_from(p.get("nodePort")?.as_u64()?).ok()?,
                        ))
                    })
                    .collect();
                let count = obj
                    .pointer("/spec/ports")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                for i in 0..count {
                    let Some(port) = obj.pointer_mut(&format!("/spec/ports/{i}")) else {
                        continue;
                    };
                    let wanted = port
                        .get("nodePort")
                        .and_then(Value::as_u64)
                        .and_then(|p| u16::try_from(p).ok())
                        .filter(|p| *p != 0);
                    let service_port = port.get("port").and_then(Value::as_i64).unwrap_or(0);
                    let chosen = match wanted {
                        Some(p) if old_ports.contains(&p) => p,
                        Some(p) => {
                            self.alloc.claim_port(store, p, key).await?;
                            done.ports.push(p);
                            p
                        }
                        None => match old_by_port.get(&service_port) {
                            Some(p) => *p,
                            None => {
                                let p = self.alloc.allocate_port(store, key).await?;
                                done.ports.push(p);
                                p
                            }
                        },
                    };
                    port["nodePort"] = json!(chosen);
                }
            }
            Ok(())
        }
        .await;
        match result {
            Ok(()) => Ok(done),
            Err(e) => {
                self.release(&done).await;
                Err(alloc_err(e, r, &name))
            }
        }
    }

    async fn release(&self, allocated: &Allocated) {
        let store = self.store.as_ref();
        for ip in &allocated.ips {
            if let Err(e) = self.alloc.release_ip(store, ip).await {
                tracing::warn!(ip, error = %e, "releasing service IP");
            }
        }
        for port in &allocated.ports {
            if let Err(e) = self.alloc.release_port(store, *port).await {
                tracing::warn!(port, error = %e, "releasing node port");
            }
        }
    }

    /// What a stored Service held that the new version no longer does.
    fn service_leftovers(old: &Value, new: Option<&Value>) -> Allocated {
        let mut left = Allocated::default();
        let new_ip = new.and_then(cluster_ip);
        if let Some(ip) = cluster_ip(old)
            && new_ip.as_ref() != Some(&ip)
        {
            left.ips.push(ip);
        }
        let new_ports = new
            .filter(|n| needs_node_ports(n))
            .map(node_ports)
            .unwrap_or_default();
        left.ports = node_ports(old)
            .into_iter()
            .filter(|p| !new_ports.contains(p))
            .collect();
        left
    }

    async fn update(&self, req: &ResourceRequest) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        let (value, warnings) = self.decode_object(req, r, r.definition)?;
        let new = decode::normalize(r.kind, value)?;
        let body_rv = object::meta_str(&new, "resourceVersion").to_owned();
        let expected = if body_rv.is_empty() {
            None
        } else {
            Some(parse_revision(&body_rv)?)
        };
        let name = self.name(req);
        let body_name = object::name(&new);
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let current = self.read(r, self.namespace(req), name).await?;
        let mut obj = self.write_update(req, r, current, new, expected).await?;
        let code = 200;
        if let Some(include) = req.table {
            obj = table::table(r.kind, &[obj], json!({}), include, true);
        }
        Ok(Reply::Json {
            code,
            body: obj,
            warnings,
        })
    }

    /// Merges `new` onto the stored `current` per subresource, checks and stores it.
    async fn write_update(
        &self,
        req: &ResourceRequest,
        r: &Resource,
        current: KeyValue,
        mut new: Value,
        expected: Option<Revision>,
    ) -> Result<Value, ApiError> {
        let name = self.name(req).to_owned();
        if let Some(expected) = expected
            && expected != current.mod_revision
        {
            return Err(ApiError::from_store(
                StoreError::Conflict {
                    key: current.key.clone(),
                    expected,
                    current: current.mod_revision,
                },
                &r.qualified(),
                &name,
            ));
        }
        let old = render(r, &current)?;
        let sub = req.route.subresource.as_deref();
        match sub {
            Some("status") => {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        if let Some(m) = new.as_object_mut() {
                            m.remove("status");
                        }
                    }
                }
            }
            Some("finalize") => {
                let finalizers = new
                    .pointer("/spec/finalizers")
                    .cloned()
                    .unwrap_or(json!([]));
                new = old.clone();
                new["spec"]["finalizers"] = finalizers;
            }
            Some(other) => {
                return Err(ApiError::MethodNotAllowed(format!(
                    "update is not supported on {other}"
                )));
            }
            None => {
                if r.has_status() {
                    match old.get("status") {
                        Some(s) => new["status"] = s.clone(),
                        None => {
                            if let Some(m) = new.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                }
            }
        }
        if let Some(map) = new.as_object_mut() {
            map.insert("apiVersion".into(), json!(r.api_version()));
            map.insert("kind".into(), json!(r.kind_name));
        }
        // Fields only the server sets.
        {
            let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
            let meta = metadata_mut(&mut new);
            for k in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "namespace",
                "name",
                "generation",
            ] {
                match old_meta.get(k) {
                    Some(v) => meta.insert(k.to_owned(), v.clone()),
                    None => meta.remove(k),
                };
            }
        }
        validation::default(r.kind, &mut new);
        if r.tracks_generation() && spec_part(&new) != spec_part(&old) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            metadata_mut(&mut new).insert("generation".into(), json!(generation + 1));
        }
        self.check(r, &new, Some(&old))?;
        // Removing a finalizer that was already being honoured may not add new ones once deleting.
        let deleting = !object::meta_str(&old, "deletionTimestamp").is_empty();
        if deleting {
            let before = object::finalizers(&old);
            if object::finalizers(&new).iter().any(|f| !before.contains(f)) {
                return Err(ApiError::invalid(
                    r.kind_name,
                    r.group,
                    &name,
                    vec![FieldError::forbidden(
                        "metadata.finalizers",
                        "no new finalizers can be added if the object is being deleted",
                    )],
                ));
            }
        }
        let dry_run = req.query.get("dryRun").is_some_and(|d| d == "All");
        if dry_run {
            return Ok(new);
        }
        let allocated = if r.kind == Kind::Service && sub.is_none() {
            self.allocate_service(r, &current.key, &mut new, Some(&old))
                .await?
        } else {
            Allocated::default()
        };
        if deleting && self.finished(r, &new) {
            let kv = self
                .store
                .delete(&current.key, Some(current.mod_revision))
                .await
                .map_err(store_err(r, &name))?;
            self.after_delete(r, &old).await;
            set_rv(&mut new, kv.mod_revision);
            return Ok(new);
        }
        match self
            .store
            .update(&current.key, to_bytes(&new)?, Some(current.mod_revision))
            .await
        {
            Ok(kv) => {
                if r.kind == Kind::Service && sub.is_none() {
                    self.release(&Self::service_leftovers(&old, Some(&new)))
                        .await;
                }
                set_rv(&mut new, kv.mod_revision);
                Ok(new)
            }
            Err(e) => {
                self.release(&allocated).await;
                Err(store_err(r, &name)(e))
            }
        }
    }

    /// Whether an object marked for deletion has nothing left holding it.
    fn finished(&self, r: &Resource, obj: &Value) -> bool {
        if !object::finalizers(obj).is_empty() {
            return false;
        }
        if r.kind == Kind::Namespace {
            return obj
                .pointer("/spec/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        }
        obj.pointer("/metadata/deletionGracePeriodSeconds")
            .and_then(Value::as_i64)
            .unwrap_or(0)
            == 0
    }

    async fn after_delete(&self, r: &Resource, last: &Value) {
        if r.kind == Kind::Service {
            self.release(&Self::service_leftovers(last, None)).await;
        }
    }

    async fn patch(&self, req: &ResourceRequest, kind: PatchType) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        if req.body.len() > decode::MAX_BODY {
            return Err(ApiError::TooLarge {
                limit: decode::MAX_BODY,
            });
        }
        let patch_doc: Value = if kind == PatchType::Apply {
            decode::parse_body(&req.body, "application/yaml")?
        } else {
            serde_json::from_slice(&req.body)
                .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))?
        };
        if kind == PatchType::Apply {
            if req.query.get("fieldManager").is_none_or(String::is_empty) {
                return Err(ApiError::BadRequest(
                    "PATCH with apply requires a fieldManager query parameter".into(),
                ));
            }
            let exists = self
                .store
                .get(&r.key(self.namespace(req), self.name(req)))
                .await
                .map_err(store_err(r, self.name(req)))?
                .is_some();
            if !exists && req.route.subresource.is_none() {
                let create = ResourceRequest {
                    route: ResourceRoute {
                        resource: r,
                        namespace: req.route.namespace.clone(),
                        name: None,
                        subresource: None,
                    },
                    verb: Verb::Create,
                    query: req.query.clone(),
                    content_type: "application/json".into(),
                    table: req.table,
                    body: Bytes::from(patch_doc.to_string()),
                };
                return self.create(&create).await;
            }
        }
        let explicit_rv = match kind {
            PatchType::Json => patch_doc.as_array().is_some_and(|ops| {
                ops.iter().any(|op| {
                    op.get("path").and_then(Value::as_str) == Some("/metadata/resourceVersion")
                })
            }),
            _ => patch_doc
                .pointer("/metadata/resourceVersion")
                .is_some_and(|v| !v.is_null()),
        };
        let name = self.name(req);
        for _ in 0..5 {
            let current = self.read(r, self.namespace(req), name).await?;
            let original = render(r, &current)?;
            let patched = patch::apply(
                kind,
                &original,
                &patch_doc,
                openapi::definitions(),
                r.definition,
            )
            .map_err(|e| match kind {
                PatchType::Json if matches!(e, patch::PatchError::JsonPatchFailed(_)) => {
                    ApiError::invalid(
                        r.kind_name,
                        r.group,
                        name,
                        vec![FieldError::invalid("", "", &e.to_string())],
                    )
                }
                _ => ApiError::BadRequest(e.to_string()),
            })?;
            let validation =
                FieldValidation::parse(req.query.get("fieldValidation").map(String::as_str))?;
            let unknown = decode::unknown_fields(&patched, r.definition, openapi::definitions());
            let mut warnings = Vec::new();
            if !unknown.is_empty() {
                let list: Vec<String> = unknown
                    .iter()
                    .map(|f| format!("unknown field {f:?}"))
                    .collect();
                match validation {
                    FieldValidation::Strict => {
                        return Err(ApiError::BadRequest(format!(
                            "strict decoding error: {}",
                            list.join(", ")
                        )));
                    }
                    FieldValidation::Warn => warnings = list,
                    FieldValidation::Ignore => {}
                }
            }
            let new = decode::normalize(r.kind, patched)?;
            let rv = object::meta_str(&new, "resourceVersion").to_owned();
            let expected = if rv.is_empty() {
                None
            } else {
                Some(parse_revision(&rv)?)
            };
            let expected = if explicit_rv {
                expected
            } else {
                Some(current.mod_revision)
            };
            match self.write_update(req, r, current, new, expected).await {
                Err(ApiError::Conflict { .. }) if !explicit_rv => continue,
                Err(e) => return Err(e),
                Ok(mut obj) => {
                    if let Some(include) = req.table {
                        obj = table::table(r.kind, &[obj], json!({}), include, true);
                    }
                    return Ok(Reply::Json {
                        code: 200,
                        body: obj,
                        warnings,
                    });
                }
            }
        }
        Err(ApiError::Conflict {
            resource: r.qualified(),
            name: name.to_owned(),
            why: "the object kept changing while the patch was applied".into(),
        })
    }

    fn scale_of(&self, r: &Resource, obj: &Value) -> Value {
        let selector = obj
            .pointer("/spec/selector")
            .and_then(validation::selector_from_spec)
            .map(|s| {
                s.0.iter()
                    .filter_map(|req| match req {
                        super::selectors::Requirement::Equals(k, v) => Some(format!("{k}={v}")),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
        let _ = r;
        json!({
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
                "creationTimestamp": meta.get("creationTimestamp"),
            },
            "spec": {"replicas": obj.pointer("/spec/replicas").and_then(Value::as_i64).unwrap_or(0)},
            "status": {
                "replicas": obj.pointer("/status/replicas").and_then(Value::as_i64).unwrap_or(0),
                "selector": selector,
            },
        })
    }

    async fn get_scale(&self, req: &ResourceRequest) -> Result<Value, ApiError> {
        let r = req.route.resource;
        let kv = self.read(r, self.namespace(req), self.name(req)).await?;
        Ok(self.scale_of(r, &render(r, &kv)?))
    }

    async fn update_scale(
        &self,
        req: &ResourceRequest,
        patch: Option<PatchType>,
    ) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        let name = self.name(req);
        let current = self.read(r, self.namespace(req), name).await?;
        let obj = render(r, &current)?;
        let scale = self.scale_of(r, &obj);
        let new_scale = match patch {
            Some(kind) => {
                let doc: Value = serde_json::from_slice(&req.body)
                    .map_err(|e| ApiError::BadRequest(format!("error decoding patch: {e}")))?;
                patch::apply(
                    kind,
                    &scale,
                    &doc,
                    openapi::definitions(),
                    "io.k8s.api.autoscaling.v1.Scale",
                )
                .map_err(|e| ApiError::BadRequest(e.to_string()))?
            }
            None => {
                self.decode_object(req, r, "io.k8s.api.autoscaling.v1.Scale")?
                    .0
            }
        };
        let replicas = new_scale
            .pointer("/spec/replicas")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if replicas < 0 {
            return Err(ApiError::invalid(
                "Scale",
                "autoscaling",
                name,
                vec![FieldError::invalid(
                    "spec.replicas",
                    &replicas.to_string(),
                    "must be greater than or equal to 0",
                )],
            ));
        }
        let rv = new_scale
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let expected = if rv.is_empty() || patch.is_some() {
            None
        } else {
            Some(parse_revision(rv)?)
        };
        let mut new = obj.clone();
        new["spec"]["replicas"] = json!(replicas);
        let main = ResourceRequest {
            route: ResourceRoute {
                resource: r,
                namespace: req.route.namespace.clone(),
                name: req.route.name.clone(),
                subresource: None,
            },
            verb: Verb::Update,
            query: req.query.clone(),
            content_type: String::new(),
            table: None,
            body: Bytes::new(),
        };
        let stored = self.write_update(&main, r, current, new, expected).await?;
        Ok(ok(self.scale_of(r, &stored)))
    }

    async fn bind(&self, req: &ResourceRequest) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        let name = self.name(req);
        let binding = decode::parse_body(&req.body, &req.content_type)?;
        let node = binding
            .pointer("/target/name")
            .and_then(Value::as_str)
            .unwrap_or("");
        if node.is_empty() {
            return Err(ApiError::invalid(
                "Binding",
                "",
                name,
                vec![FieldError::required("target.name")],
            ));
        }
        let current = self.read(r, self.namespace(req), name).await?;
        let mut pod = render(r, &current)?;
        let assigned = object::field_string(&pod, "spec.nodeName");
        if !assigned.is_empty() {
            return Err(ApiError::Conflict {
                resource: r.qualified(),
                name: name.to_owned(),
                why: format!("pod {name} is already assigned to node {assigned:?}"),
            });
        }
        if !object::meta_str(&pod, "deletionTimestamp").is_empty() {
            return Err(ApiError::Conflict {
                resource: r.qualified(),
                name: name.to_owned(),
                why: "pod is being deleted, cannot be assigned to a host".into(),
            });
        }
        pod["spec"]["nodeName"] = json!(node);
        let cond = json!({"type": "PodScheduled", "status": "True", "lastTransitionTime": object::timestamp(object::now())});
        let conditions = pod["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut conditions: Vec<Value> = conditions
            .into_iter()
            .filter(|c| c["type"] != "PodScheduled")
            .collect();
        conditions.push(cond);
        pod["status"]["conditions"] = json!(conditions);
        self.store
            .update(&current.key, to_bytes(&pod)?, Some(current.mod_revision))
            .await
            .map_err(store_err(r, name))?;
        Ok(Reply::Json {
            code: 201,
            body: success_status(),
            warnings: Vec::new(),
        })
    }

    /// `POST serviceaccounts/{name}/token`: a signed token for the service account,
    /// bound to a pod when the request names one (which must exist, with the uid given).
    async fn token_request(&self, req: &ResourceRequest) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        let (ns, name) = (self.namespace(req).unwrap_or("default"), self.name(req));
        let issuer = self.tokens.as_ref().ok_or_else(|| {
            ApiError::ServiceUnavailable(
                "this API server has no service account signing key".into(),
            )
        })?;
        let body = decode::parse_body(&req.body, &req.content_type)?;
        let spec = tokens::parse_request(&body, name)?;
        let sa = render(r, &self.read(r, Some(ns), name).await?)?;
        let pod = match &spec.bound {
            None => None,
            Some(bound) => {
                let pods = registry::by_kind(Kind::Pod);
                let pod = render(pods, &self.read(pods, Some(ns), &bound.name).await?)?;
                let uid = object::meta_str(&pod, "uid").to_owned();
                if bound.uid.as_ref().is_some_and(|want| *want != uid) {
                    return Err(ApiError::Conflict {
                        resource: pods.qualified(),
                        name: bound.name.clone(),
                        why: format!(
                            "the uid in the bound object reference ({}) does not match the pod's ({uid}): it may have been deleted and created again",
                            bound.uid.as_deref().unwrap_or_default()
                        ),
                    });
                }
                Some(tokens::ObjectRef {
                    name: bound.name.clone(),
                    uid,
                })
            }
        };
        let now = object::now();
        let iat = now.timestamp();
        let exp = iat + spec.expiration_seconds;
        let claims = tokens::Claims {
            iss: tokens::API_AUDIENCE.into(),
            sub: format!("system:serviceaccount:{ns}:{name}"),
            aud: spec.audiences.clone(),
            exp,
            iat,
            nbf: iat,
            kubernetes: tokens::KubernetesClaims {
                namespace: ns.to_owned(),
                serviceaccount: tokens::ObjectRef {
                    name: name.to_owned(),
                    uid: object::meta_str(&sa, "uid").to_owned(),
                },
                pod,
            },
        };
        let expires = chrono::DateTime::from_timestamp(exp, 0).unwrap_or(now);
        let mut answer = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": ns, "creationTimestamp": object::timestamp(now)},
            "spec": {"audiences": spec.audiences, "expirationSeconds": spec.expiration_seconds},
            "status": {"token": issuer.sign(&claims), "expirationTimestamp": object::timestamp(expires)},
        });
        if let Some(b) = body["spec"].get("boundObjectRef") {
            answer["spec"]["boundObjectRef"] = b.clone();
        }
        Ok(Reply::Json {
            code: 201,
            body: answer,
            warnings: Vec::new(),
        })
    }

    async fn evict(&self, req: &ResourceRequest) -> Result<Reply, ApiError> {
        let delete = ResourceRequest {
            route: ResourceRoute {
                resource: req.route.resource,
                namespace: req.route.namespace.clone(),
                name: req.route.name.clone(),
                subresource: None,
            },
            verb: Verb::Delete,
            query: HashMap::new(),
            content_type: String::new(),
            table: None,
            body: Bytes::new(),
        };
        let eviction = decode::parse_body(&req.body, &req.content_type)?;
        let delete = ResourceRequest {
            body: eviction
                .get("deleteOptions")
                .map_or_else(Bytes::new, |o| Bytes::from(o.to_string())),
            ..delete
        };
        self.delete(&delete).await?;
        Ok(Reply::Json {
            code: 201,
            body: success_status(),
            warnings: Vec::new(),
        })
    }

    async fn delete(&self, req: &ResourceRequest) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        let opts = DeleteOptions::parse(&req.body, &req.query)?;
        let name = self.name(req);
        for _ in 0..5 {
            let current = self.read(r, self.namespace(req), name).await?;
            let mut obj = render(r, &current)?;
            if let Some(uid) = &opts.uid
                && uid != object::meta_str(&obj, "uid")
            {
                return Err(ApiError::Conflict {
                    resource: r.qualified(),
                    name: name.to_owned(),
                    why: format!(
                        "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                        object::meta_str(&obj, "uid")
                    ),
                });
            }
            if let Some(rv) = &opts.resource_version
                && *rv != current.mod_revision.to_string()
            {
                return Err(ApiError::Conflict {
                    resource: r.qualified(),
                    name: name.to_owned(),
                    why: format!(
                        "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {}",
                        current.mod_revision
                    ),
                });
            }
            let now = object::now();
            let grace = if r.kind == Kind::Pod {
                let unbound = object::field_string(&obj, "spec.nodeName").is_empty();
                let phase = object::field_string(&obj, "status.phase");
                if unbound || phase == "Succeeded" || phase == "Failed" {
                    0
                } else {
                    opts.grace
                        .unwrap_or_else(|| {
                            obj.pointer("/spec/terminationGracePeriodSeconds")
                                .and_then(Value::as_i64)
                                .unwrap_or(30)
                        })
                        .max(0)
                }
            } else {
                0
            };
            let mut finalizers = object::finalizers(&obj);
            let added = match opts.propagation.as_deref() {
                Some("Orphan") => Some("orphan"),
                Some("Foreground") => Some("foregroundDeletion"),
                _ => None,
            };
            if let Some(f) = added
                && object::meta_str(&obj, "deletionTimestamp").is_empty()
                && !finalizers.iter().any(|x| x == f)
            {
                finalizers.push(f.to_owned());
            }
            let namespace_pending = r.kind == Kind::Namespace && !self.finished(r, &obj);
            let already = !object::meta_str(&obj, "deletionTimestamp").is_empty();
            let immediate = grace == 0 && finalizers.is_empty() && !namespace_pending;
            if opts.dry_run {
                return Ok(ok(obj));
            }
            if immediate {
                match self
                    .store
                    .delete(&current.key, Some(current.mod_revision))
                    .await
                {
                    Ok(kv) => {
                        self.after_delete(r, &obj).await;
                        set_rv(&mut obj, kv.mod_revision.max(current.mod_revision));
                        return Ok(ok(obj));
                    }
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(store_err(r, name)(e)),
                }
            }
            // Graceful: mark the object; whoever holds it (agent, finalizer owner) finishes.
            let current_grace = obj
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64);
            if already && current_grace.is_some_and(|g| g <= grace) && added.is_none() {
                return Ok(ok(obj));
            }
            {
                let meta = metadata_mut(&mut obj);
                let when = now + chrono::Duration::seconds(grace);
                if !already || grace < current_grace.unwrap_or(i64::MAX) {
                    meta.insert("deletionTimestamp".into(), json!(object::timestamp(when)));
                    meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
                }
                if !finalizers.is_empty() {
                    meta.insert("finalizers".into(), json!(finalizers));
                }
            }
            if r.kind == Kind::Namespace {
                obj["status"]["phase"] = json!("Terminating");
            }
            match self
                .store
                .update(&current.key, to_bytes(&obj)?, Some(current.mod_revision))
                .await
            {
                Ok(kv) => {
                    set_rv(&mut obj, kv.mod_revision);
                    return Ok(Reply::Json {
                        code: 200,
                        body: obj,
                        warnings: Vec::new(),
                    });
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(store_err(r, name)(e)),
            }
        }
        Err(ApiError::Conflict {
            resource: r.qualified(),
            name: name.to_owned(),
            why: "the object kept changing while it was being deleted".into(),
        })
    }

    async fn delete_collection(&self, req: &ResourceRequest) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        let list_req = ResourceRequest {
            route: ResourceRoute {
                resource: r,
                namespace: req.route.namespace.clone(),
                name: None,
                subresource: None,
            },
            verb: Verb::List,
            query: req.query.clone(),
            content_type: String::new(),
            table: None,
            body: Bytes::new(),
        };
        let list = self.list(&list_req).await?;
        let mut deleted = Vec::new();
        for item in list["items"].as_array().cloned().unwrap_or_default() {
            let one = ResourceRequest {
                route: ResourceRoute {
                    resource: r,
                    namespace: item
                        .pointer("/metadata/namespace")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    name: Some(object::name(&item).to_owned()),
                    subresource: None,
                },
                verb: Verb::Delete,
                query: req.query.clone(),
                content_type: String::new(),
                table: None,
                body: req.body.clone(),
            };
            match self.delete(&one).await {
                Ok(_) | Err(ApiError::NotFound { .. }) => deleted.push(item),
                Err(e) => return Err(e),
            }
        }
        Ok(ok(json!({
            "kind": r.list_kind(),
            "apiVersion": r.api_version(),
            "metadata": {},
            "items": deleted,
        })))
    }

    async fn watch(&self, req: &ResourceRequest) -> Result<Reply, ApiError> {
        let r = req.route.resource;
        let q = ListQuery::parse(r.kind, &req.query)?;
        let prefix = r.namespace_prefix(self.namespace(req));
        let rv = req.query.get("resourceVersion").map_or("", String::as_str);
        let bookmarks = req
            .query
            .get("allowWatchBookmarks")
            .is_some_and(|b| b == "true");
        let timeout = match req.query.get("timeoutSeconds") {
            Some(t) => Some(Duration::from_secs(t.parse::<u64>().map_err(|_| {
                ApiError::BadRequest(format!(
                    "timeoutSeconds must be a non-negative integer, not {t:?}"
                ))
            })?)),
            None => None,
        };
        let mut initial = Vec::new();
        let from = if rv.is_empty() || rv == "0" {
            let mut start_after = None;
            let mut revision = None;
            loop {
                let page = self
                    .store
                    .list(
                        &prefix,
                        ListOptions {
                            revision,
                            start_after: start_after.clone(),
                            limit: Some(500),
                        },
                    )
                    .await
                    .map_err(|e| ApiError::from_store(e, &r.qualified(), ""))?;
                revision = Some(page.revision);
                for kv in &page.items {
                    let obj = render(r, kv)?;
                    if q.matches(&obj) {
                        initial.push(obj);
                    }
                    start_after = Some(kv.key.clone());
                }
                if !page.more() {
                    break;
                }
            }
            revision.unwrap_or_default()
        } else {
            parse_revision(rv)?
        };
        let Some(sub) = self.cache.subscribe(from) else {
            return Err(ApiError::Gone(format!("too old resource version: {from}")));
        };
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let cache = self.cache.clone();
        let table = req.table;
        tokio::spawn(async move {
            let mut w = Watcher {
                r,
                q,
                prefix,
                table,
                tx,
                last: from,
                first: true,
            };
            for obj in initial {
                if !w.send("ADDED", obj).await {
                    return;
                }
            }
            for event in sub.backlog {
                if !w.event(&event).await {
                    return;
                }
            }
            let mut live = sub.live;
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            let mut ticker = tokio::time::interval(Duration::from_secs(5));
            ticker.tick().await;
            loop {
                let sleep = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = sleep => return,
                    () = w.tx.closed() => return,
                    _ = ticker.tick(), if bookmarks => {
                        let rev = cache.latest().max(w.last);
                        let mut obj = json!({"kind": r.kind_name, "apiVersion": r.api_version(), "metadata": {}});
                        set_rv(&mut obj, rev);
                        if !w.raw("BOOKMARK", obj).await { return; }
                    }
                    got = live.recv() => match got {
                        Ok(event) => if !w.event(&event).await { return; },
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            let status = ApiError::Gone("the watcher fell too far behind; list again".into()).status();
                            let _ = w.raw("ERROR", status).await;
                            return;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Reply::Watch(rx))
    }
}

#[derive(Default)]
struct Allocated {
    ips: Vec<String>,
    ports: Vec<u16>,
}

fn success_status() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})
}

/// One watch connection's filter and output.
struct Watcher {
    r: &'static Resource,
    q: ListQuery,
    prefix: String,
    table: Option<IncludeObject>,
    tx: mpsc::Sender<Bytes>,
    last: Revision,
    first: bool,
}

impl Watcher {
    async fn raw(&mut self, kind: &str, object: Value) -> bool {
        let mut line = json!({"type": kind, "object": object}).to_string();
        line.push('\n');
        self.tx.send(Bytes::from(line)).await.is_ok()
    }

    async fn send(&mut self, kind: &str, obj: Value) -> bool {
        let object = match self.table {
            Some(include) => {
                let t = table::table(self.r.kind, &[obj], json!({}), include, self.first);
                self.first = false;
                t
            }
            None => obj,
        };
        self.raw(kind, object).await
    }

    async fn event(&mut self, cached: &CacheEvent) -> bool {
        let event = &cached.event;
        let rev = event.revision();
        if rev <= self.last || !event.key().starts_with(&self.prefix) {
            return true;
        }
        self.last = rev;
        // Unfiltered, not a Table: the object's shared JSON goes out as it is.
        if let (WatchEvent::Put { prev, .. }, Some(object), None, true) =
            (event, &cached.object, self.table, self.q.is_everything())
        {
            let Ok(json) = object.json(|kv| render_bytes(self.r, kv)) else {
                return true;
            };
            let kind = if prev.is_some() { "MODIFIED" } else { "ADDED" };
            let mut line = Vec::with_capacity(json.len() + 32);
            line.extend_from_slice(br#"{"type":""#);
            line.extend_from_slice(kind.as_bytes());
            line.extend_from_slice(br#"","object":"#);
            line.extend_from_slice(&json);
            line.extend_from_slice(b"}\n");
            return self.tx.send(Bytes::from(line)).await.is_ok();
        }
        let decode = |kv: &KeyValue| render(self.r, kv).ok();
        let (kind, obj) = match event {
            WatchEvent::Put { kv, prev } => {
                let Some(new) = decode(kv) else { return true };
                let old_matches = prev
                    .as_ref()
                    .and_then(decode)
                    .is_some_and(|o| self.q.matches(&o));
                let new_matches = self.q.matches(&new);
                match (prev.is_some() && old_matches, new_matches) {
                    (false, true) => ("ADDED", new),
                    (true, true) => ("MODIFIED", new),
                    (true, false) => ("DELETED", new),
                    (false, false) => return true,
                }
            }
            WatchEvent::Delete { prev, revision } => {
                let Some(mut old) = decode(prev) else {
                    return true;
                };
                if !self.q.matches(&old) {
                    return true;
                }
                set_rv(&mut old, *revision);
                ("DELETED", old)
            }
        };
        self.send(kind, obj).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::{self, Route};
    use crate::storage::memory::MemoryStore;

    async fn api() -> Api {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let cache = WatchCache::new(store.current_revision().await.expect("revision"));
        let api = Api::new(
            store,
            cache,
            Allocator::new("10.0.0.0/29".parse().expect("cidr")),
        );
        api.bootstrap().await.expect("bootstrap");
        api
    }

    async fn call(
        api: &Api,
        method: &str,
        path_query: &str,
        ct: &str,
        body: Value,
    ) -> Result<Value, ApiError> {
        let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
        let Ok(Route::Resource(route)) = request::route(path) else {
            panic!("{path} is not a resource path");
        };
        let query = request::parse_query(Some(query));
        let method: http::Method = method.parse().expect("method");
        let verb = request::verb(&method, &route, &query, ct)?;
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let req = ResourceRequest {
            route,
            verb,
            query,
            content_type: ct.to_owned(),
            table: None,
            body,
        };
        match api.handle(req).await? {
            Reply::Json { body, .. } => Ok(body),
            Reply::Watch(_) => panic!("unexpected watch"),
        }
    }

    fn deployment(replicas: i64) -> Value {
        json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}},
                    "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}})
    }

    const DEPLOYS: &str = "/apis/apps/v1/namespaces/default/deployments";
    const JSON: &str = "application/json";

    const SAS: &str = "/api/v1/namespaces/default/serviceaccounts";

    #[tokio::test]
    async fn token_requests_give_tokens_that_authenticate_while_their_objects_exist() {
        let api = api()
            .await
            .with_token_issuer(Arc::new(TokenIssuer::from_secret(&[7; 32])));
        call(
            &api,
            "POST",
            SAS,
            JSON,
            json!({"metadata": {"name": "robot"}}),
        )
        .await
        .expect("service account");
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        let pod = call(&api, "POST", "/api/v1/namespaces/default/pods", JSON, pod)
            .await
            .expect("pod");
        let pod_uid = pod["metadata"]["uid"].as_str().expect("uid").to_owned();
        let request = |bound_uid: &str| {
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"audiences": [], "expirationSeconds": 600,
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": bound_uid}}})
        };
        let answer = call(
            &api,
            "POST",
            &format!("{SAS}/robot/token"),
            JSON,
            request(&pod_uid),
        )
        .await
        .expect("token");
        assert_eq!(answer["kind"], "TokenRequest");
        assert_eq!(answer["spec"]["audiences"], json!([tokens::API_AUDIENCE]));
        let token = answer["status"]["token"]
            .as_str()
            .expect("token")
            .to_owned();
        assert!(!answer["status"]["expirationTimestamp"].is_null());
        assert_eq!(
            api.authenticate_token(&token).await.as_deref(),
            Some("system:serviceaccount:default:robot")
        );
        let mut tampered = token.clone();
        tampered.pop();
        tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(api.authenticate_token(&tampered).await, None);

        // Bad requests: no such account, a pod uid that is not the pod's, too short a life.
        let missing = call(
            &api,
            "POST",
            &format!("{SAS}/nobody/token"),
            JSON,
            request(&pod_uid),
        )
        .await
        .expect_err("missing account");
        assert_eq!(missing.code(), 404);
        let stale = call(
            &api,
            "POST",
            &format!("{SAS}/robot/token"),
            JSON,
            request("old-uid"),
        )
        .await
        .expect_err("stale pod uid");
        assert_eq!(stale.code(), 409);
        let short = call(
            &api,
            "POST",
            &format!("{SAS}/robot/token"),
            JSON,
            json!({"spec": {"expirationSeconds": 60}}),
        )
        .await
        .expect_err("short");
        assert_eq!(short.code(), 422);

        // The pod goes: its token stops working.
        call(
            &api,
            "DELETE",
            "/api/v1/namespaces/default/pods/web?gracePeriodSeconds=0",
            JSON,
            Value::Null,
        )
        .await
        .expect("delete pod");
        assert_eq!(api.authenticate_token(&token).await, None);
        // An unbound token dies with its service account.
        let answer = call(
            &api,
            "POST",
            &format!("{SAS}/robot/token"),
            JSON,
            json!({"spec": {}}),
        )
        .await
        .expect("unbound token");
        let unbound = answer["status"]["token"]
            .as_str()
            .expect("token")
            .to_owned();
        assert!(api.authenticate_token(&unbound).await.is_some());
        call(&api, "DELETE", &format!("{SAS}/robot"), JSON, Value::Null)
            .await
            .expect("delete account");
        assert_eq!(api.authenticate_token(&unbound).await, None);
    }

    #[tokio::test]
    async fn without_a_signing_key_token_requests_are_unavailable() {
        let api = api().await;
        call(
            &api,
            "POST",
            SAS,
            JSON,
            json!({"metadata": {"name": "robot"}}),
        )
        .await
        .expect("service account");
        let err = call(
            &api,
            "POST",
            &format!("{SAS}/robot/token"),
            JSON,
            json!({"spec": {}}),
        )
        .await
        .expect_err("no key");
        assert_eq!(err.code(), 503);
    }

    #[tokio::test]
    async fn unfiltered_lists_from_the_cache_match_lists_from_the_store() {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let cache = WatchCache::new(store.current_revision().await.expect("revision"));
        let feeder = tokio::spawn(cache.clone().run(store.clone(), REGISTRY_PREFIX.to_owned()));
        let api = Api::new(
            store,
            cache,
            Allocator::new("10.0.0.0/29".parse().expect("cidr")),
        );
        api.bootstrap().await.expect("bootstrap");
        for i in 0..3 {
            let mut d = deployment(i);
            d["metadata"]["name"] = json!(format!("web-{i}"));
            call(&api, "POST", DEPLOYS, JSON, d).await.expect("create");
        }
        call(
            &api,
            "DELETE",
            &format!("{DEPLOYS}/web-1"),
            JSON,
            Value::Null,
        )
        .await
        .expect("delete");
        let request = |path_query: &str| {
            let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
            let Ok(Route::Resource(route)) = request::route(path) else {
                panic!("{path} is not a resource path");
            };
            let query = request::parse_query(Some(query));
            let verb = request::verb(&http::Method::GET, &route, &query, JSON).expect("verb");
            ResourceRequest {
                route,
                verb,
                query,
                content_type: JSON.to_owned(),
                table: None,
                body: Bytes::new(),
            }
        };
        for path in [DEPLOYS, "/apis/apps/v1/deployments", "/api/v1/namespaces"] {
            let fast = api
                .list_json(&request(path))
                .await
                .expect("served from the cache")
                .expect("list");
            let fast: Value = serde_json::from_slice(&fast).expect("JSON");
            let slow = call(&api, "GET", path, JSON, Value::Null)
                .await
                .expect("list");
            assert_eq!(fast, slow, "{path}");
        }
        let names: Vec<&str> = serde_json::from_slice::<Value>(
            &api.list_json(&request(DEPLOYS))
                .await
                .expect("cached")
                .expect("list"),
        )
        .map(|v| {
            v["items"]
                .as_array()
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|i| i["metadata"]["name"].as_str())
                        .map(|n| if n == "web-0" { "web-0" } else { "other" })
                        .collect()
                })
                .unwrap_or_default()
        })
        .expect("JSON");
        assert_eq!(names, ["web-0", "other"]);
        // Selectors, limits and Tables take the general path.
        for path in [
            &format!("{DEPLOYS}?labelSelector=app%3Dweb") as &str,
            &format!("{DEPLOYS}?limit=1"),
            &format!("{DEPLOYS}?resourceVersion=1&resourceVersionMatch=NotOlderThan"),
        ] {
            assert!(api.list_json(&request(path)).await.is_none(), "{path}");
        }
        feeder.abort();
    }

    #[tokio::test]
    async fn generation_moves_with_spec_and_status_only_through_its_subresource() {
        let api = api().await;
        let mut with_status = deployment(1);
        with_status["status"] = json!({"replicas": 5});
        let created = call(&api, "POST", DEPLOYS, JSON, with_status)
            .await
            .expect("create");
        assert_eq!(created["metadata"]["generation"], 1);
        assert!(
            created.get("status").is_none(),
            "status taken from a create: {created}"
        );
        let item = format!("{DEPLOYS}/web");
        let labelled = call(
            &api,
            "PATCH",
            &item,
            "application/merge-patch+json",
            json!({"metadata": {"labels": {"x": "y"}}, "status": {"replicas": 9}}),
        )
        .await
        .expect("patch");
        assert_eq!(labelled["metadata"]["generation"], 1);
        assert!(
            labelled.get("status").is_none(),
            "status written through the main resource: {labelled}"
        );
        let scaled = call(
            &api,
            "PATCH",
            &item,
            "application/merge-patch+json",
            json!({"spec": {"replicas": 3}}),
        )
        .await
        .expect("patch");
        assert_eq!(scaled["metadata"]["generation"], 2);
        let status = call(
            &api,
            "PATCH",
            &format!("{item}/status"),
            "application/merge-patch+json",
            json!({"spec": {"replicas": 7}, "status": {"replicas": 3}}),
        )
        .await
        .expect("status");
        assert_eq!(status["status"]["replicas"], 3);
        assert_eq!(status["spec"]["replicas"], 3, "spec written through status");
        assert_eq!(status["metadata"]["generation"], 2);
        let scale = call(&api, "GET", &format!("{item}/scale"), "", Value::Null)
            .await
            .expect("scale");
        assert_eq!(scale["spec"]["replicas"], 3);
        assert_eq!(scale["status"]["selector"], "app=web");
    }

    #[tokio::test]
    async fn finalizers_hold_a_deleted_object_until_removed() {
        let api = api().await;
        let mut d = deployment(1);
        d["metadata"]["finalizers"] = json!(["example.com/hold"]);
        call(&api, "POST", DEPLOYS, JSON, d).await.expect("create");
        let item = format!("{DEPLOYS}/web");
        let deleted = call(&api, "DELETE", &item, JSON, Value::Null)
            .await
            .expect("delete");
        assert!(deleted["metadata"]["deletionTimestamp"].is_string());
        let err = call(
            &api,
            "PATCH",
            &item,
            "application/merge-patch+json",
            json!({"metadata": {"finalizers": ["example.com/hold", "new"]}}),
        )
        .await
        .expect_err("new finalizer");
        assert_eq!(err.code(), 422);
        call(
            &api,
            "PATCH",
            &item,
            "application/merge-patch+json",
            json!({"metadata": {"finalizers": null}}),
        )
        .await
        .expect("release");
        let gone = call(&api, "GET", &item, "", Value::Null)
            .await
            .expect_err("gone");
        assert_eq!(gone.code(), 404);
    }

    #[tokio::test]
    async fn service_ips_come_back_when_services_go() {
        let api = api().await;
        let svcs = "/api/v1/namespaces/default/services";
        let svc = |name: &str| {
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"ports": [{"port": 80}]}})
        };
        // A /29 has 6 usable addresses.
        let mut ips = Vec::new();
        for i in 0..6 {
            let s = call(&api, "POST", svcs, JSON, svc(&format!("s{i}")))
                .await
                .expect("create");
            ips.push(
                s["spec"]["clusterIP"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            );
        }
        ips.sort();
        ips.dedup();
        assert_eq!(ips.len(), 6);
        let full = call(&api, "POST", svcs, JSON, svc("s6"))
            .await
            .expect_err("range full");
        assert_eq!(full.code(), 500);
        assert!(
            call(&api, "GET", &format!("{svcs}/s6"), "", Value::Null)
                .await
                .is_err()
        );
        call(&api, "DELETE", &format!("{svcs}/s0"), JSON, Value::Null)
            .await
            .expect("delete");
        call(&api, "POST", svcs, JSON, svc("s6"))
            .await
            .expect("an IP was freed");
    }

    #[tokio::test]
    async fn apply_creates_then_merges() {
        let api = api().await;
        let item = format!("{DEPLOYS}/web?fieldManager=test");
        let yaml = "application/apply-patch+yaml";
        let created = call(&api, "PATCH", &item, yaml, deployment(2))
            .await
            .expect("apply creates");
        assert_eq!(created["spec"]["replicas"], 2);
        let mut again = deployment(4);
        again["metadata"]["labels"] = json!({"applied": "yes"});
        let merged = call(&api, "PATCH", &item, yaml, again)
            .await
            .expect("apply merges");
        assert_eq!(merged["spec"]["replicas"], 4);
        assert_eq!(merged["metadata"]["labels"]["applied"], "yes");
        assert_eq!(merged["metadata"]["uid"], created["metadata"]["uid"]);
        let err = call(
            &api,
            "PATCH",
            &format!("{DEPLOYS}/web"),
            yaml,
            deployment(1),
        )
        .await
        .expect_err("no field manager");
        assert_eq!(err.code(), 400);
    }

    #[tokio::test]
    async fn binding_assigns_a_node_once() {
        let api = api().await;
        let pods = "/api/v1/namespaces/default/pods";
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "web-"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
        let created = call(&api, "POST", pods, JSON, pod).await.expect("create");
        let name = created["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
            "target": {"kind": "Node", "name": "n1"}});
        let path = format!("{pods}/{name}/binding");
        call(&api, "POST", &path, JSON, binding.clone())
            .await
            .expect("bind");
        let again = call(&api, "POST", &path, JSON, binding)
            .await
            .expect_err("bound twice");
        assert_eq!(again.code(), 409);
        let pod = call(&api, "GET", &format!("{pods}/{name}"), "", Value::Null)
            .await
            .expect("get");
        assert_eq!(pod["spec"]["nodeName"], "n1");
        let moved = call(
            &api,
            "PATCH",
            &format!("{pods}/{name}"),
            "application/merge-patch+json",
            json!({"spec": {"nodeName": "n2"}}),
        )
        .await
        .expect_err("immutable");
        assert_eq!(moved.code(), 422);
    }

    #[test]
    fn continue_tokens_round_trip_and_garbage_is_rejected() {
        let token = encode_continue(42, "/registry/core/pods/default/web");
        assert_eq!(
            decode_continue(&token).ok(),
            Some((42, "/registry/core/pods/default/web".to_owned()))
        );
        assert!(decode_continue("zz").is_err());
        assert!(decode_continue(&hex::encode("nonumber\nkey")).is_err());
    }

    #[test]
    fn resource_versions_must_be_numbers() {
        assert_eq!(parse_revision("17").ok(), Some(17));
        for bad in ["abc", "-1", "1.5", ""] {
            let err = parse_revision(bad).expect_err(bad);
            assert_eq!(err.code(), 400);
        }
    }

    #[test]
    fn unsupported_field_selectors_are_refused() {
        let mut q = HashMap::new();
        q.insert("fieldSelector".to_owned(), "spec.nodeName=n1".to_owned());
        assert!(ListQuery::parse(Kind::Pod, &q).is_ok());
        let err = ListQuery::parse(Kind::ConfigMap, &q)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("field label not supported: spec.nodeName")
        );
    }
}
