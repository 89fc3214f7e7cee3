//! A small Kubernetes API client: the calls the agent makes (get, list, watch, create, patch,
//! delete) on upstream `k8s-openapi` types, behind the [`Api`] trait so pod and node logic is
//! unit-tested against an in-memory fake.

mod client;
pub mod events;
pub mod kubeconfig;

pub mod fake;

use std::future::Future;

use futures::stream::BoxStream;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use client::Client;
pub use kubeconfig::{Kubeconfig, KubeconfigError};

/// What went wrong talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("building the API client: {0}")]
    Setup(String),
    #[error("{method} {path}: {source}")]
    Transport {
        method: &'static str,
        path: String,
        source: reqwest::Error,
    },
    /// The server answered with a non-success status; `message` is its `Status.message`.
    #[error("{method} {path}: {code} {reason}: {message}")]
    Status {
        method: &'static str,
        path: String,
        code: u16,
        reason: String,
        message: String,
    },
    /// The resourceVersion a watch or list asked for is compacted away: relist.
    #[error("{path}: resource version too old (410 Gone): {message}")]
    Gone { path: String, message: String },
    #[error("{path}: decoding the response: {source}")]
    Decode {
        path: String,
        source: serde_json::Error,
    },
}

impl ApiError {
    /// The HTTP status code the server answered with, if it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            ApiError::Status { code, .. } => Some(*code),
            ApiError::Gone { .. } => Some(410),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.code() == Some(404)
    }

    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
}

/// Everything the client can fetch and send: upstream API types.
pub trait ApiResource:
    k8s_openapi::Resource + Serialize + DeserializeOwned + Clone + Send + Sync + 'static
{
}
impl<T> ApiResource for T where
    T: k8s_openapi::Resource + Serialize + DeserializeOwned + Clone + Send + Sync + 'static
{
}

/// Selectors of a list or watch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListParams {
    pub label_selector: Option<String>,
    pub field_selector: Option<String>,
}

impl ListParams {
    pub fn fields(selector: impl Into<String>) -> ListParams {
        ListParams {
            field_selector: Some(selector.into()),
            label_selector: None,
        }
    }
}

/// One page of a list, with the revision to watch from.
#[derive(Debug, Clone)]
pub struct ObjectList<K> {
    pub items: Vec<K>,
    pub resource_version: String,
}

/// One event of a watch.
#[derive(Debug, Clone)]
pub enum WatchEvent<K> {
    Added(K),
    Modified(K),
    Deleted(K),
    /// A progress notification: only the resourceVersion moved.
    Bookmark(String),
}

/// The three PATCH content types of the API.
#[derive(Debug, Clone, PartialEq)]
pub enum Patch {
    /// `application/merge-patch+json` (RFC 7386).
    Merge(serde_json::Value),
    /// `application/strategic-merge-patch+json`.
    Strategic(serde_json::Value),
    /// `application/json-patch+json` (RFC 6902).
    Json(serde_json::Value),
}

impl Patch {
    pub fn content_type(&self) -> &'static str {
        match self {
            Patch::Merge(_) => "application/merge-patch+json",
            Patch::Strategic(_) => "application/strategic-merge-patch+json",
            Patch::Json(_) => "application/json-patch+json",
        }
    }

    pub fn body(&self) -> &serde_json::Value {
        match self {
            Patch::Merge(v) | Patch::Strategic(v) | Patch::Json(v) => v,
        }
    }
}

/// Options of a DELETE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeleteParams {
    pub grace_period_seconds: Option<i64>,
    /// Only delete the object with this uid (a newer object of the same name is kept).
    pub uid: Option<String>,
}

/// The calls the agent makes on the API. Namespaced kinds take `Some(namespace)`.
pub trait Api: Send + Sync + 'static {
    /// The object, or `None` if it does not exist.
    fn get<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> impl Future<Output = Result<Option<K>, ApiError>> + Send;

    fn list<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        params: &ListParams,
    ) -> impl Future<Output = Result<ObjectList<K>, ApiError>> + Send;

    /// Events after `resource_version`. A too-old version gives [`ApiError::Gone`], either
    /// at once or as an item of the stream.
    fn watch<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        params: &ListParams,
        resource_version: &str,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<WatchEvent<K>, ApiError>>, ApiError>> + Send;

    fn create<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        object: &K,
    ) -> impl Future<Output = Result<K, ApiError>> + Send;

    /// POSTs `body` to the `subresource` of the object `name` of kind `K` (a TokenRequest to
    /// `serviceaccounts/{name}/token`) and returns the answer.
    fn create_subresource<K: ApiResource, B: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: &B,
    ) -> impl Future<Output = Result<B, ApiError>> + Send;

    /// Patches the object, or its `subresource` (e.g. `status`).
    fn patch<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        patch: &Patch,
    ) -> impl Future<Output = Result<K, ApiError>> + Send;

    /// Deletes the object; a missing object is [`ApiError::Status`] with code 404.
    fn delete<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        params: &DeleteParams,
    ) -> impl Future<Output = Result<(), ApiError>> + Send;
}

/// The current time as the API's timestamp type (jiff's own clock needs a feature
/// k8s-openapi does not enable).
pub fn now() -> k8s_openapi::jiff::Timestamp {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::try_from(nanos).unwrap_or(0))
        .unwrap_or(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)
}

/// `/api/v1/namespaces/ns/pods` or `/apis/group/version/leases`, without the name.
pub fn collection_path<K: k8s_openapi::Resource>(namespace: Option<&str>) -> String {
    let mut path = if K::GROUP.is_empty() {
        format!("/api/{}", K::VERSION)
    } else {
        format!("/apis/{}/{}", K::GROUP, K::VERSION)
    };
    if let Some(ns) = namespace {
        path.push_str("/namespaces/");
        path.push_str(ns);
    }
    path.push('/');
    path.push_str(K::URL_PATH_SEGMENT);
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{Node, Pod};

    #[test]
    fn collection_paths_follow_group_version_and_scope() {
        assert_eq!(
            collection_path::<Pod>(Some("default")),
            "/api/v1/namespaces/default/pods"
        );
        assert_eq!(collection_path::<Node>(None), "/api/v1/nodes");
        assert_eq!(
            collection_path::<Lease>(Some("kube-node-lease")),
            "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases"
        );
    }
}
