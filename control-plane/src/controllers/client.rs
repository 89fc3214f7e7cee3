//! The narrow view of the API that the scheduler and the controllers use. They are clients like
//! any other: everything goes through [`ClusterClient`], so their logic runs unchanged against
//! the real API server or against the recording in-memory fake in [`super::fake`].
//!
//! The trait speaks JSON keyed by [`ResourceType`] so it stays object safe (`Arc<dyn
//! ClusterClient>`); [`Typed`] puts k8s-openapi types on top.

use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::{ClusterResourceScope, Metadata, NamespaceResourceScope, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// What a client call can fail with, shaped like the API's `Status` answers so callers can
/// branch on conflict, not-found and gone.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{resource} {name:?} not found")]
    NotFound { resource: String, name: String },
    #[error("{resource} {name:?} already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("conflict on {resource} {name:?}: {message}")]
    Conflict {
        resource: String,
        name: String,
        message: String,
    },
    #[error("resource version {0} is too old (410 Gone)")]
    Gone(String),
    #[error("{resource} {name:?} is invalid: {message}")]
    Invalid {
        resource: String,
        name: String,
        message: String,
    },
    #[error("decoding {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("API request failed with {code}: {message}")]
    Api { code: u16, message: String },
    #[error("talking to the API server: {0}")]
    Transport(String),
}

impl ClientError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, ClientError::NotFound { .. })
    }

    pub fn is_conflict(&self) -> bool {
        matches!(self, ClientError::Conflict { .. })
    }

    pub fn is_already_exists(&self) -> bool {
        matches!(self, ClientError::AlreadyExists { .. })
    }
}

/// Where a kind of object lives in the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
}

impl ResourceType {
    pub fn of<K: Resource>() -> Self
    where
        K::Scope: Scope,
    {
        ResourceType {
            group: K::GROUP,
            version: K::VERSION,
            plural: K::URL_PATH_SEGMENT,
            kind: K::KIND,
            namespaced: <K::Scope as Scope>::NAMESPACED,
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The REST path of the collection (`/api/v1/namespaces/ns/pods`), the form the HTTP
    /// implementation needs.
    pub fn collection_path(&self, namespace: Option<&str>) -> String {
        let root = if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        };
        match namespace.filter(|_| self.namespaced) {
            Some(ns) => format!("{root}/namespaces/{ns}/{}", self.plural),
            None => format!("{root}/{}", self.plural),
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.group.is_empty() {
            f.write_str(self.plural)
        } else {
            write!(f, "{}.{}", self.plural, self.group)
        }
    }
}

/// Whether a k8s-openapi scope is namespaced; lets [`ResourceType::of`] be computed from types.
pub trait Scope {
    const NAMESPACED: bool;
}

impl Scope for NamespaceResourceScope {
    const NAMESPACED: bool = true;
}

impl Scope for ClusterResourceScope {
    const NAMESPACED: bool = false;
}

/// A list answer: the items and the resourceVersion to watch from.
#[derive(Debug, Clone, Default)]
pub struct ObjectList {
    pub items: Vec<Value>,
    pub resource_version: String,
}

/// One watch event with the object as JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    Added(Value),
    Modified(Value),
    Deleted(Value),
    /// A progress marker carrying only a resourceVersion.
    Bookmark(String),
}

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, ClientError>> + Send>>;

/// How a PATCH body is to be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// RFC 7386 JSON merge patch.
    Merge,
    /// RFC 6902 JSON patch.
    Json,
}

/// `propagationPolicy` of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Propagation {
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    pub fn as_str(self) -> &'static str {
        match self {
            Propagation::Background => "Background",
            Propagation::Foreground => "Foreground",
            Propagation::Orphan => "Orphan",
        }
    }
}

/// Options of a delete; `uid` is a precondition so a controller never deletes a same-named
/// object that replaced the one it decided about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteOptions {
    pub propagation: Option<Propagation>,
    pub uid: Option<String>,
    pub grace_period_seconds: Option<i64>,
}

/// The API operations the control loops need. `namespace` is ignored for cluster-scoped types.
#[async_trait]
pub trait ClusterClient: Send + Sync {
    async fn get(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ClientError>;

    /// Lists every object of the type, across namespaces when `namespace` is `None`.
    async fn list(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
    ) -> Result<ObjectList, ClientError>;

    /// Watches from `resource_version` (exclusive); a too-old version fails with
    /// [`ClientError::Gone`], the caller relists.
    async fn watch(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        resource_version: &str,
    ) -> Result<WatchStream, ClientError>;

    async fn create(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        obj: Value,
    ) -> Result<Value, ClientError>;

    /// PUT of the object or of a subresource (`status`); a stale resourceVersion in the body
    /// fails with [`ClientError::Conflict`].
    async fn update(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        obj: Value,
    ) -> Result<Value, ClientError>;

    async fn patch(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        kind: PatchKind,
        patch: Value,
    ) -> Result<Value, ClientError>;

    async fn delete(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        opts: DeleteOptions,
    ) -> Result<(), ClientError>;

    /// POST to a subresource of an object: `pods/binding`, `pods/eviction`.
    async fn post_subresource(
        &self,
        rt: ResourceType,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: Value,
    ) -> Result<Value, ClientError>;
}

/// A k8s-openapi type the control loops read and write.
pub trait Object:
    Resource + Metadata<Ty = ObjectMeta> + Serialize + DeserializeOwned + Clone + Send + Sync + 'static
where
    Self::Scope: Scope,
{
}

impl<K> Object for K
where
    K: Resource
        + Metadata<Ty = ObjectMeta>
        + Serialize
        + DeserializeOwned
        + Clone
        + Send
        + Sync
        + 'static,
    K::Scope: Scope,
{
}

pub fn from_value<K: DeserializeOwned>(what: &str, v: Value) -> Result<K, ClientError> {
    serde_json::from_value(v).map_err(|source| ClientError::Decode {
        what: what.to_owned(),
        source,
    })
}

/// Serializes `obj` with its `apiVersion` and `kind` filled in.
pub fn to_value<K: Object>(obj: &K) -> Result<Value, ClientError>
where
    K::Scope: Scope,
{
    let mut v = serde_json::to_value(obj).map_err(|source| ClientError::Decode {
        what: K::KIND.to_owned(),
        source,
    })?;
    if let Some(map) = v.as_object_mut() {
        map.insert(
            "apiVersion".into(),
            Value::String(K::API_VERSION.to_owned()),
        );
        map.insert("kind".into(), Value::String(K::KIND.to_owned()));
    }
    Ok(v)
}

/// Typed calls for one kind over any [`ClusterClient`].
pub struct Typed<'a, K> {
    client: &'a dyn ClusterClient,
    _kind: PhantomData<fn() -> K>,
}

impl<'a, K: Object> Typed<'a, K>
where
    K::Scope: Scope,
{
    pub fn new(client: &'a dyn ClusterClient) -> Self {
        Typed {
            client,
            _kind: PhantomData,
        }
    }

    fn rt() -> ResourceType {
        ResourceType::of::<K>()
    }

    pub async fn get(&self, namespace: Option<&str>, name: &str) -> Result<K, ClientError> {
        from_value(K::KIND, self.client.get(Self::rt(), namespace, name).await?)
    }

    pub async fn list(&self, namespace: Option<&str>) -> Result<(Vec<K>, String), ClientError> {
        let list = self.client.list(Self::rt(), namespace).await?;
        let items = list
            .items
            .into_iter()
            .map(|v| from_value(K::KIND, v))
            .collect::<Result<Vec<K>, _>>()?;
        Ok((items, list.resource_version))
    }

    pub async fn create(&self, obj: &K) -> Result<K, ClientError> {
        let ns = obj.metadata().namespace.clone();
        from_value(
            K::KIND,
            self.client
                .create(Self::rt(), ns.as_deref(), to_value(obj)?)
                .await?,
        )
    }

    pub async fn update(&self, obj: &K) -> Result<K, ClientError> {
        self.put(obj, None).await
    }

    pub async fn update_status(&self, obj: &K) -> Result<K, ClientError> {
        self.put(obj, Some("status")).await
    }

    async fn put(&self, obj: &K, sub: Option<&str>) -> Result<K, ClientError> {
        let meta = obj.metadata();
        let name = meta.name.as_deref().unwrap_or_default();
        let v = self
            .client
            .update(
                Self::rt(),
                meta.namespace.as_deref(),
                name,
                sub,
                to_value(obj)?,
            )
            .await?;
        from_value(K::KIND, v)
    }

    pub async fn merge_patch(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        patch: Value,
    ) -> Result<K, ClientError> {
        let v = self
            .client
            .patch(
                Self::rt(),
                namespace,
                name,
                subresource,
                PatchKind::Merge,
                patch,
            )
            .await?;
        from_value(K::KIND, v)
    }

    pub async fn delete(
        &self,
        namespace: Option<&str>,
        name: &str,
        opts: DeleteOptions,
    ) -> Result<(), ClientError> {
        self.client.delete(Self::rt(), namespace, name, opts).await
    }
}

/// `namespace/name` (or `name` for cluster objects): the key of caches and work queues.
pub fn key_of(meta: &ObjectMeta) -> String {
    match &meta.namespace {
        Some(ns) if !ns.is_empty() => format!("{ns}/{}", meta.name.as_deref().unwrap_or_default()),
        _ => meta.name.clone().unwrap_or_default(),
    }
}

/// Splits a key made by [`key_of`].
pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, key),
    }
}
