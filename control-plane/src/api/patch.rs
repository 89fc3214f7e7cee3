//! PATCH: JSON patch (RFC 6902), JSON merge patch (RFC 7386) and strategic merge patch, the
//! Kubernetes merge that matches list items by a per-field merge key taken from the OpenAPI
//! definitions (`x-kubernetes-patch-merge-key`).

use serde_json::{Map, Value};

use super::openapi::Definitions;

/// `(definition, field, merge key, patch strategy)`: the built-in types' lists (and the one
/// struct) that strategic merge patch does not simply replace. An empty key is a list of
/// scalars merged as a set.
pub const MERGE_KEYS: &[(&str, &str, &str, &str)] = &[
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "finalizers",
        "",
        "merge",
    ),
    (
        "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
        "ownerReferences",
        "uid",
        "merge",
    ),
    ("io.k8s.api.core.v1.PodSpec", "containers", "name", "merge"),
    (
        "io.k8s.api.core.v1.PodSpec",
        "initContainers",
        "name",
        "merge",
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "ephemeralContainers",
        "name",
        "merge",
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "volumes",
        "name",
        "merge,retainKeys",
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "imagePullSecrets",
        "name",
        "merge",
    ),
    ("io.k8s.api.core.v1.PodSpec", "hostAliases", "ip", "merge"),
    (
        "io.k8s.api.core.v1.PodSpec",
        "schedulingGates",
        "name",
        "merge",
    ),
    (
        "io.k8s.api.core.v1.PodSpec",
        "resourceClaims",
        "name",
        "merge,retainKeys",
    ),
    (
        "io.k8s.api.core.v1.Container",
        "ports",
        "containerPort",
        "merge",
    ),
    ("io.k8s.api.core.v1.Container", "env", "name", "merge"),
    (
        "io.k8s.api.core.v1.Container",
        "volumeMounts",
        "mountPath",
        "merge",
    ),
    (
        "io.k8s.api.core.v1.Container",
        "volumeDevices",
        "devicePath",
        "merge",
    ),
    ("io.k8s.api.core.v1.ServiceSpec", "ports", "port", "merge"),
    (
        "io.k8s.api.core.v1.PodStatus",
        "conditions",
        "type",
        "merge",
    ),
    ("io.k8s.api.core.v1.PodStatus", "podIPs", "ip", "merge"),
    ("io.k8s.api.core.v1.PodStatus", "hostIPs", "ip", "merge"),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "conditions",
        "type",
        "merge",
    ),
    (
        "io.k8s.api.core.v1.NodeStatus",
        "addresses",
        "type",
        "merge",
    ),
    ("io.k8s.api.core.v1.NodeSpec", "podCIDRs", "", "merge"),
    (
        "io.k8s.api.core.v1.NamespaceStatus",
        "conditions",
        "type",
        "merge",
    ),
    (
        "io.k8s.api.apps.v1.DeploymentSpec",
        "strategy",
        "",
        "retainKeys",
    ),
    (
        "io.k8s.api.apps.v1.DeploymentStatus",
        "conditions",
        "type",
        "merge",
    ),
    (
        "io.k8s.api.apps.v1.ReplicaSetStatus",
        "conditions",
        "type",
        "merge",
    ),
    (
        "io.k8s.api.apps.v1.StatefulSetStatus",
        "conditions",
        "type",
        "merge",
    ),
    (
        "io.k8s.api.apps.v1.DaemonSetStatus",
        "conditions",
        "type",
        "merge",
    ),
    (
        "io.k8s.api.apps.v1.DaemonSetSpec",
        "updateStrategy",
        "",
        "retainKeys",
    ),
    (
        "io.k8s.api.batch.v1.JobStatus",
        "conditions",
        "type",
        "merge",
    ),
];

/// The patch formats the server accepts, by `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    Json,
    Merge,
    StrategicMerge,
    /// Server-side apply, reduced: the applied configuration is merged like a strategic merge
    /// patch (no field ownership, so fields dropped from the configuration are not removed).
    Apply,
}

impl PatchType {
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        match content_type.split(';').next().unwrap_or("").trim() {
            "application/json-patch+json" => Some(PatchType::Json),
            "application/merge-patch+json" => Some(PatchType::Merge),
            "application/strategic-merge-patch+json" => Some(PatchType::StrategicMerge),
            "application/apply-patch+yaml" => Some(PatchType::Apply),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("the JSON patch is not a list of operations: {0}")]
    BadJsonPatch(String),
    #[error("the JSON patch could not be applied: {0}")]
    JsonPatchFailed(String),
    #[error("the patch must be a JSON object")]
    NotAnObject,
    #[error("invalid strategic merge patch: {0}")]
    BadDirective(String),
}

/// Applies `patch` to `original`. `definition` names the OpenAPI definition of the object's
/// kind (needed only by strategic merge).
pub fn apply(
    kind: PatchType,
    original: &Value,
    patch: &Value,
    defs: &Definitions,
    definition: &str,
) -> Result<Value, PatchError> {
    match kind {
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| PatchError::BadJsonPatch(e.to_string()))?;
            let mut doc = original.clone();
            json_patch::patch(&mut doc, &ops)
                .map_err(|e| PatchError::JsonPatchFailed(e.to_string()))?;
            Ok(doc)
        }
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(PatchError::NotAnObject);
            }
            let mut doc = original.clone();
            json_patch::merge(&mut doc, patch);
            Ok(doc)
        }
        PatchType::StrategicMerge | PatchType::Apply => {
            if !patch.is_object() {
                return Err(PatchError::NotAnObject);
            }
            let schema = defs.get(definition).cloned().unwrap_or(Value::Null);
            Ok(merge_value(original, patch, &schema, defs)?.unwrap_or(Value::Null))
        }
    }
}

/// The schema of `field` inside an object described by `schema`.
fn field_schema<'a>(schema: &'a Value, field: &str, defs: &'a Definitions) -> &'a Value {
    let resolved = defs.resolve(schema);
    resolved
        .get("properties")
        .and_then(|p| p.get(field))
        .or_else(|| resolved.get("additionalProperties"))
        .unwrap_or(&Value::Null)
}

fn strategy(schema: &Value) -> (&str, &str) {
    let key = schema
        .get("x-kubernetes-patch-merge-key")
        .and_then(Value::as_str)
        .unwrap_or("");
    let strategy = schema
        .get("x-kubernetes-patch-strategy")
        .and_then(Value::as_str)
        .unwrap_or("");
    (key, strategy)
}

/// Merges `patch` into `original`; `None` means the value is deleted (`$patch: delete`).
fn merge_value(
    original: &Value,
    patch: &Value,
    schema: &Value,
    defs: &Definitions,
) -> Result<Option<Value>, PatchError> {
    let Value::Object(patch_map) = patch else {
        return Ok(Some(patch.clone()));
    };
    match patch_map.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = patch_map.clone();
            replaced.remove("$patch");
            return Ok(Some(Value::Object(replaced)));
        }
        Some("delete") => return Ok(None),
        Some(other) => {
            return Err(PatchError::BadDirective(format!(
                "unknown $patch {other:?}"
            )));
        }
        None => {}
    }
    let mut result = match original {
        Value::Object(map) => map.clone(),
        _ => Map::new(),
    };
    let mut orders: Vec<(String, Vec<Value>)> = Vec::new();
    for (key, value) in patch_map {
        if key == "$retainKeys" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            orders.push((
                field.to_owned(),
                value.as_array().cloned().unwrap_or_default(),
            ));
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = value.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = result.get_mut(field) {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if value.is_null() {
            result.remove(key);
            continue;
        }
        let sub_schema = field_schema(schema, key, defs);
        let merged = match (result.get(key), value) {
            (Some(Value::Array(old)), Value::Array(new)) => {
                Some(merge_list(old, new, sub_schema, defs)?)
            }
            (Some(old @ Value::Object(_)), Value::Object(_)) => {
                let merged = merge_value(old, value, sub_schema, defs)?;
                apply_retain_keys(merged, value)
            }
            (_, Value::Object(_)) => {
                let merged = merge_value(&Value::Null, value, sub_schema, defs)?;
                apply_retain_keys(merged, value)
            }
            (_, Value::Array(new)) => Some(merge_list(&[], new, sub_schema, defs)?),
            _ => Some(value.clone()),
        };
        match merged {
            Some(v) => {
                result.insert(key.clone(), v);
            }
            None => {
                result.remove(key);
            }
        }
    }
    for (field, order) in orders {
        let (merge_key, _) = strategy(field_schema(schema, &field, defs));
        if let Some(Value::Array(items)) = result.get_mut(&field) {
            sort_by_order(items, &order, merge_key);
        }
    }
    Ok(Some(Value::Object(result)))
}

/// `$retainKeys` in a patch object keeps only the listed fields of the merged object.
fn apply_retain_keys(merged: Option<Value>, patch: &Value) -> Option<Value> {
    let Some(retain) = patch.get("$retainKeys").and_then(Value::as_array) else {
        return merged;
    };
    let mut merged = merged?;
    if let Value::Object(map) = &mut merged {
        map.retain(|k, _| retain.iter().any(|r| r.as_str() == Some(k)));
    }
    Some(merged)
}

fn sort_by_order(items: &mut [Value], order: &[Value], merge_key: &str) {
    let position = |item: &Value| {
        let id = if merge_key.is_empty() {
            item
        } else {
            item.get(merge_key).unwrap_or(&Value::Null)
        };
        let probe = |o: &Value| {
            if merge_key.is_empty() {
                o == id
            } else {
                o.get(merge_key) == Some(id)
            }
        };
        order.iter().position(probe).unwrap_or(usize::MAX)
    };
    items.sort_by_key(position);
}

fn merge_list(
    original: &[Value],
    patch: &[Value],
    schema: &Value,
    defs: &Definitions,
) -> Result<Value, PatchError> {
    let (merge_key, strategy) = strategy(schema);
    if !strategy.split(',').any(|s| s == "merge") {
        return Ok(Value::Array(strip_directives(patch)));
    }
    if patch
        .iter()
        .any(|item| item.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        return Ok(Value::Array(strip_directives(patch)));
    }
    let mut result: Vec<Value> = original.to_vec();
    if merge_key.is_empty() {
        for item in patch {
            if !result.contains(item) {
                result.push(item.clone());
            }
        }
        return Ok(Value::Array(result));
    }
    let items_schema = defs.resolve(schema).get("items").unwrap_or(&Value::Null);
    for item in patch {
        let Some(id) = item.get(merge_key) else {
            return Err(PatchError::BadDirective(format!(
                "list item {item} has no merge key {merge_key:?}"
            )));
        };
        let found = result.iter().position(|o| o.get(merge_key) == Some(id));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            result.retain(|o| o.get(merge_key) != Some(id));
            continue;
        }
        match found {
            Some(i) => match merge_value(&result[i], item, items_schema, defs)? {
                Some(merged) => result[i] = merged,
                None => {
                    result.remove(i);
                }
            },
            None => {
                if let Some(new) = merge_value(&Value::Null, item, items_schema, defs)? {
                    result.push(new);
                }
            }
        }
    }
    Ok(Value::Array(result))
}

fn strip_directives(items: &[Value]) -> Vec<Value> {
    items
        .iter()
        .filter(|item| item.get("$patch").is_none())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::openapi::definitions;

    fn smp(original: Value, patch: Value, definition: &str) -> Value {
        apply(
            PatchType::StrategicMerge,
            &original,
            &patch,
            definitions(),
            definition,
        )
        .expect("patch applies")
    }

    #[test]
    fn containers_merge_by_name_and_keep_the_others() {
        let original = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}});
        let patch = json!({"spec": {"containers": [{"name": "b", "image": "b:2"}]}});
        let merged = smp(original, patch, "io.k8s.api.core.v1.Pod");
        assert_eq!(
            merged["spec"]["containers"],
            json!([{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:2"}])
        );
    }

    #[test]
    fn nested_template_env_merges_by_name_and_delete_directive_removes() {
        let original = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]}]}}}});
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "a", "env": [{"name": "X", "$patch": "delete"}, {"name": "Z", "value": "3"}]}]}}}});
        let merged = smp(original, patch, "io.k8s.api.apps.v1.Deployment");
        assert_eq!(
            merged["spec"]["template"]["spec"]["containers"][0]["env"],
            json!([{"name": "Y", "value": "2"}, {"name": "Z", "value": "3"}])
        );
    }

    #[test]
    fn lists_without_merge_key_are_replaced_and_null_deletes() {
        let original = json!({"metadata": {"labels": {"a": "1", "b": "2"}},
            "spec": {"tolerations": [{"key": "x"}]}});
        let patch =
            json!({"metadata": {"labels": {"a": null}}, "spec": {"tolerations": [{"key": "y"}]}});
        let merged = smp(original, patch, "io.k8s.api.core.v1.Pod");
        assert_eq!(merged["metadata"]["labels"], json!({"b": "2"}));
        assert_eq!(merged["spec"]["tolerations"], json!([{"key": "y"}]));
    }

    #[test]
    fn finalizers_merge_as_a_set_and_delete_from_primitive_list() {
        let original = json!({"metadata": {"finalizers": ["a", "b"]}});
        let merged = smp(
            original,
            json!({"metadata": {"finalizers": ["b", "c"], "$deleteFromPrimitiveList/finalizers": ["a"]}}),
            "io.k8s.api.core.v1.Pod",
        );
        assert_eq!(merged["metadata"]["finalizers"], json!(["b", "c"]));
    }

    #[test]
    fn set_element_order_reorders_merged_list() {
        let original = json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        let patch =
            json!({"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}]}});
        let merged = smp(original, patch, "io.k8s.api.core.v1.Pod");
        assert_eq!(
            merged["spec"]["containers"],
            json!([{"name": "b"}, {"name": "a"}])
        );
    }

    #[test]
    fn retain_keys_drops_the_other_strategy_fields() {
        let original = json!({"spec": {"strategy": {"type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"spec": {"strategy": {"type": "Recreate", "$retainKeys": ["type"]}}});
        let merged = smp(original, patch, "io.k8s.api.apps.v1.Deployment");
        assert_eq!(merged["spec"]["strategy"], json!({"type": "Recreate"}));
    }

    #[test]
    fn json_and_merge_patches() {
        let defs = definitions();
        let original = json!({"metadata": {"labels": {"a": "1"}}, "spec": {"replicas": 1}});
        let ops = json!([{"op": "replace", "path": "/spec/replicas", "value": 3}]);
        let patched = apply(PatchType::Json, &original, &ops, defs, "").expect("json patch");
        assert_eq!(patched["spec"]["replicas"], 3);
        let merged = apply(
            PatchType::Merge,
            &original,
            &json!({"metadata": {"labels": null}}),
            defs,
            "",
        )
        .expect("merge patch");
        assert_eq!(merged["metadata"], json!({}));
        let bad = apply(PatchType::Json, &original, &json!({"op": "x"}), defs, "");
        assert!(matches!(bad, Err(PatchError::BadJsonPatch(_))));
        let failing = json!([{"op": "remove", "path": "/spec/nothing"}]);
        assert!(matches!(
            apply(PatchType::Json, &original, &failing, defs, ""),
            Err(PatchError::JsonPatchFailed(_))
        ));
    }

    #[test]
    fn list_item_without_merge_key_is_rejected() {
        let result = apply(
            PatchType::StrategicMerge,
            &json!({"spec": {"containers": []}}),
            &json!({"spec": {"containers": [{"image": "x"}]}}),
            definitions(),
            "io.k8s.api.core.v1.Pod",
        );
        assert!(matches!(result, Err(PatchError::BadDirective(_))));
    }
}
