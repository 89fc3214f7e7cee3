//! An in-memory [`Api`] for tests that exercise the agent without an API server: objects as JSON by path, merge patches applied,
//! every write recorded, watches fed from a broadcast channel.

use std::collections::BTreeMap;
use std::sync::Mutex;

use futures::StreamExt as _;
use futures::stream::BoxStream;

use super::{
    Api, ApiError, ApiResource, DeleteParams, ListParams, ObjectList, Patch, WatchEvent,
    collection_path,
};

/// One write the code under test made.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    Create {
        path: String,
    },
    Patch {
        path: String,
        body: serde_json::Value,
    },
    Delete {
        path: String,
        params: DeleteParams,
    },
}

#[derive(Default)]
pub struct FakeApi {
    objects: Mutex<BTreeMap<String, serde_json::Value>>,
    writes: Mutex<Vec<Write>>,
    revision: Mutex<u64>,
    /// Answers of subresource POSTs, by path.
    replies: Mutex<BTreeMap<String, serde_json::Value>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn not_found(path: &str) -> ApiError {
    ApiError::Status {
        method: "GET",
        path: path.to_owned(),
        code: 404,
        reason: "NotFound".into(),
        message: format!("{path} not found"),
    }
}

/// RFC 7386 merge.
pub fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => {
            if p.is_object() {
                *t = serde_json::Value::Object(serde_json::Map::new());
                merge(t, p);
            } else {
                *t = p.clone();
            }
        }
    }
}

impl FakeApi {
    pub fn new() -> FakeApi {
        FakeApi::default()
    }

    /// Stores `object` as if someone else created it.
    pub fn insert<K: ApiResource>(&self, namespace: Option<&str>, object: &K) {
        let name = object_name(object);
        let path = format!("{}/{name}", collection_path::<K>(namespace));
        let value = serde_json::to_value(object).unwrap_or_default();
        lock(&self.objects).insert(path, value);
    }

    pub fn object<K: ApiResource>(&self, namespace: Option<&str>, name: &str) -> Option<K> {
        let path = format!("{}/{name}", collection_path::<K>(namespace));
        lock(&self.objects)
            .get(&path)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    pub fn writes(&self) -> Vec<Write> {
        lock(&self.writes).clone()
    }

    /// What a POST to `subresource` of the object `name` of kind `K` answers, merged over
    /// the request body (e.g. a TokenRequest's `status`).
    pub fn set_reply<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        reply: serde_json::Value,
    ) {
        let path = format!("{}/{name}/{subresource}", collection_path::<K>(namespace));
        lock(&self.replies).insert(path, reply);
    }

    fn bump(&self) -> String {
        let mut r = lock(&self.revision);
        *r += 1;
        r.to_string()
    }
}

/// Whether the object stored at `path` belongs to the list of `K` in `namespace`; with no
/// namespace, a namespaced kind is listed across all namespaces, as the API server does.
fn in_collection<K: ApiResource>(path: &str, namespace: Option<&str>) -> bool {
    let prefix = format!("{}/", collection_path::<K>(namespace));
    if let Some(name) = path.strip_prefix(&prefix) {
        return !name.contains('/');
    }
    if namespace.is_some() {
        return false;
    }
    let all = collection_path::<K>(Some("*"));
    let Some((base, _)) = all.split_once("/namespaces/") else {
        return false;
    };
    let Some(rest) = path
        .strip_prefix(base)
        .and_then(|r| r.strip_prefix("/namespaces/"))
    else {
        return false;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    matches!(parts.as_slice(), [_, plural, _] if *plural == K::URL_PATH_SEGMENT)
}

fn object_name<K: ApiResource>(object: &K) -> String {
    serde_json::to_value(object)
        .ok()
        .and_then(|v| {
            v.pointer("/metadata/name")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

impl Api for FakeApi {
    async fn get<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<K>, ApiError> {
        Ok(self.object(namespace, name))
    }

    async fn list<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        _params: &ListParams,
    ) -> Result<ObjectList<K>, ApiError> {
        let items = lock(&self.objects)
            .iter()
            .filter(|(k, _)| in_collection::<K>(k, namespace))
            .filter_map(|(_, v)| serde_json::from_value(v.clone()).ok())
            .collect();
        Ok(ObjectList {
            items,
            resource_version: lock(&self.revision).to_string(),
        })
    }

    async fn watch<K: ApiResource>(
        &self,
        _namespace: Option<&str>,
        _params: &ListParams,
        _resource_version: &str,
    ) -> Result<BoxStream<'static, Result<WatchEvent<K>, ApiError>>, ApiError> {
        Ok(futures::stream::pending().boxed())
    }

    async fn create<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        object: &K,
    ) -> Result<K, ApiError> {
        let name = object_name(object);
        let path = format!("{}/{name}", collection_path::<K>(namespace));
        let mut value = serde_json::to_value(object).map_err(|source| ApiError::Decode {
            path: path.clone(),
            source,
        })?;
        {
            let mut objects = lock(&self.objects);
            if objects.contains_key(&path) {
                return Err(ApiError::Status {
                    method: "POST",
                    path,
                    code: 409,
                    reason: "AlreadyExists".into(),
                    message: format!("{name} already exists"),
                });
            }
            value["metadata"]["resourceVersion"] = self.bump().into();
            value["metadata"]["uid"] = format!("uid-{name}").into();
            objects.insert(path.clone(), value.clone());
        }
        lock(&self.writes).push(Write::Create { path: path.clone() });
        serde_json::from_value(value).map_err(|source| ApiError::Decode { path, source })
    }

    /// Answers with what [`FakeApi::set_reply`] set for this subresource path (merged over
    /// the request), 404 when the parent object does not exist.
    async fn create_subresource<K: ApiResource, B: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: &str,
        body: &B,
    ) -> Result<B, ApiError> {
        let parent = format!("{}/{name}", collection_path::<K>(namespace));
        let path = format!("{parent}/{subresource}");
        let mut value = serde_json::to_value(body).map_err(|source| ApiError::Decode {
            path: path.clone(),
            source,
        })?;
        {
            let objects = lock(&self.objects);
            if !objects.contains_key(&parent) {
                return Err(not_found(&parent));
            }
            if let Some(reply) = lock(&self.replies).get(&path) {
                merge(&mut value, reply);
            }
        }
        lock(&self.writes).push(Write::Create { path: path.clone() });
        serde_json::from_value(value).map_err(|source| ApiError::Decode { path, source })
    }

    async fn patch<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        subresource: Option<&str>,
        patch: &Patch,
    ) -> Result<K, ApiError> {
        let path = format!("{}/{name}", collection_path::<K>(namespace));
        let full = match subresource {
            Some(s) => format!("{path}/{s}"),
            None => path.clone(),
        };
        lock(&self.writes).push(Write::Patch {
            path: full,
            body: patch.body().clone(),
        });
        let mut objects = lock(&self.objects);
        let value = objects.get_mut(&path).ok_or_else(|| not_found(&path))?;
        merge(value, patch.body());
        serde_json::from_value(value.clone()).map_err(|source| ApiError::Decode { path, source })
    }

    async fn delete<K: ApiResource>(
        &self,
        namespace: Option<&str>,
        name: &str,
        params: &DeleteParams,
    ) -> Result<(), ApiError> {
        let path = format!("{}/{name}", collection_path::<K>(namespace));
        lock(&self.writes).push(Write::Delete {
            path: path.clone(),
            params: params.clone(),
        });
        lock(&self.objects)
            .remove(&path)
            .map(|_| ())
            .ok_or_else(|| not_found(&path))
    }
}
