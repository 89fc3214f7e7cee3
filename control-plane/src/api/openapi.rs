//! OpenAPI v3 documents for the served resources, generated from the `k8s-openapi` types'
//! schemas (their `schemars` implementations carry upstream's descriptions).
//!
//! kubectl reads these for `explain`, to compute apply patches, and to find out whether the
//! server validates fields itself (the `fieldValidation` parameter on each PATCH operation).
//! The same definitions drive this server's unknown-field detection and strategic merge.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::OnceLock;

use k8s_openapi::api::{apps, batch, coordination, core, discovery};
use schemars::generate::{SchemaGenerator, SchemaSettings};
use serde_json::{Map, Value, json};

use super::discovery::{KUBE_MAJOR, KUBE_MINOR};
use super::patch::MERGE_KEYS;
use super::registry::{GROUPS, RESOURCES, Resource};

/// Every schema definition, by name (`io.k8s.api.core.v1.PodSpec`).
pub struct Definitions(pub Map<String, Value>);

impl Definitions {
    /// The definition a schema refers to with `$ref` (directly or through `allOf`), if any.
    pub fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        let mut current = schema;
        for _ in 0..8 {
            let reference = current
                .get("$ref")
                .or_else(|| current.get("allOf").and_then(|a| a.get(0)?.get("$ref")));
            match reference
                .and_then(Value::as_str)
                .and_then(|r| r.rsplit('/').next())
                .and_then(|name| self.0.get(name))
            {
                Some(next) => current = next,
                None => break,
            }
        }
        current
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name)
    }
}

fn generate_definitions() -> Map<String, Value> {
    let mut generator = SchemaGenerator::new(SchemaSettings::openapi3());
    generator.subschema_for::<core::v1::Namespace>();
    generator.subschema_for::<core::v1::Node>();
    generator.subschema_for::<core::v1::Pod>();
    generator.subschema_for::<core::v1::Service>();
    generator.subschema_for::<core::v1::Endpoints>();
    generator.subschema_for::<core::v1::ConfigMap>();
    generator.subschema_for::<core::v1::Secret>();
    generator.subschema_for::<core::v1::ServiceAccount>();
    generator.subschema_for::<core::v1::Event>();
    generator.subschema_for::<core::v1::Binding>();
    generator.subschema_for::<apps::v1::Deployment>();
    generator.subschema_for::<apps::v1::ReplicaSet>();
    generator.subschema_for::<apps::v1::StatefulSet>();
    generator.subschema_for::<apps::v1::DaemonSet>();
    generator.subschema_for::<batch::v1::Job>();
    generator.subschema_for::<discovery::v1::EndpointSlice>();
    generator.subschema_for::<coordination::v1::Lease>();
    generator.subschema_for::<k8s_openapi::api::autoscaling::v1::Scale>();
    generator.subschema_for::<k8s_openapi::api::policy::v1::Eviction>();
    let mut definitions = generator.take_definitions(true);

    for r in RESOURCES {
        if let Some(Value::Object(def)) = definitions.get_mut(r.definition) {
            def.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": r.group, "version": r.version, "kind": r.kind_name}]),
            );
        }
    }
    for (definition, field, key, strategy) in MERGE_KEYS {
        let property = definitions
            .get_mut(*definition)
            .and_then(|d| d.get_mut("properties"))
            .and_then(|p| p.get_mut(*field));
        if let Some(Value::Object(property)) = property {
            if !key.is_empty() {
                property.insert("x-kubernetes-patch-merge-key".into(), json!(key));
            }
            property.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
        }
    }
    definitions
}

pub fn definitions() -> &'static Definitions {
    static DEFS: OnceLock<Definitions> = OnceLock::new();
    DEFS.get_or_init(|| Definitions(generate_definitions()))
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn query(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string"}, "uniqueItems": true})
}

fn operation(r: &Resource, action: &str, id: &str, body: Option<&str>, write: bool) -> Value {
    let gvk = json!({"group": r.group, "version": r.version, "kind": r.kind_name});
    let mut params = vec![query("pretty")];
    if write {
        params.push(query("dryRun"));
        params.push(query("fieldManager"));
        params.push(query("fieldValidation"));
    }
    if action == "list" {
        for name in [
            "labelSelector",
            "fieldSelector",
            "limit",
            "continue",
            "resourceVersion",
            "watch",
        ] {
            params.push(query(name));
        }
    }
    let response = body.map_or_else(|| json!({"type": "object"}), schema_ref);
    let mut op = json!({
        "operationId": id,
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": gvk,
        "parameters": params,
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": response}}}},
    });
    if write && let Some(body) = body {
        let content_types: &[&str] = if action == "patch" {
            &[
                "application/json-patch+json",
                "application/merge-patch+json",
                "application/strategic-merge-patch+json",
                "application/apply-patch+yaml",
            ]
        } else {
            &["application/json"]
        };
        let mut content = Map::new();
        for ct in content_types {
            let schema = if action == "patch" {
                json!({"type": "object"})
            } else {
                schema_ref(body)
            };
            content.insert((*ct).to_owned(), json!({"schema": schema}));
        }
        op["requestBody"] = json!({"required": true, "content": content});
    }
    op
}

fn base_path(r: &Resource) -> String {
    if r.group.is_empty() {
        format!("/api/{}", r.version)
    } else {
        format!("/apis/{}/{}", r.group, r.version)
    }
}

fn paths_for(r: &Resource, paths: &mut Map<String, Value>) {
    let base = base_path(r);
    let scope = if r.namespaced {
        "/namespaces/{namespace}"
    } else {
        ""
    };
    let collection = format!("{base}{scope}/{}", r.plural);
    let item = format!("{collection}/{{name}}");
    let k = r.kind_name;
    let def = Some(r.definition);
    paths.insert(
        collection,
        json!({
            "get": operation(r, "list", &format!("list{k}"), None, false),
            "post": operation(r, "post", &format!("create{k}"), def, true),
        }),
    );
    paths.insert(
        item,
        json!({
            "get": operation(r, "get", &format!("read{k}"), def, false),
            "put": operation(r, "put", &format!("replace{k}"), def, true),
            "patch": operation(r, "patch", &format!("patch{k}"), def, true),
            "delete": operation(r, "delete", &format!("delete{k}"), None, false),
        }),
    );
    for sub in r
        .subresources
        .iter()
        .filter(|s| matches!(**s, "status" | "scale"))
    {
        let (sub_def, title) = if *sub == "scale" {
            (Some("io.k8s.api.autoscaling.v1.Scale"), "Scale")
        } else {
            (def, "Status")
        };
        let path = format!("{base}{scope}/{}/{{name}}/{sub}", r.plural);
        paths.insert(
            path,
            json!({
                "get": operation(r, "get", &format!("read{k}{title}"), sub_def, false),
                "put": operation(r, "put", &format!("replace{k}{title}"), sub_def, true),
            }),
        );
    }
}

/// Collects `name` and every definition it refers to, transitively.
fn collect_refs(defs: &Definitions, name: &str, out: &mut BTreeMap<String, Value>) {
    if out.contains_key(name) {
        return;
    }
    let Some(def) = defs.get(name) else { return };
    out.insert(name.to_owned(), def.clone());
    let mut refs = Vec::new();
    find_refs(def, &mut refs);
    for r in refs {
        collect_refs(defs, &r, out);
    }
}

fn find_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    if let Some(name) = v.as_str().and_then(|s| s.rsplit('/').next()) {
                        out.push(name.to_owned());
                    }
                } else {
                    find_refs(v, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| find_refs(v, out)),
        _ => {}
    }
}

/// The v3 document of one group version (`api/v1`, `apis/apps/v1`), or `None` if not served.
pub fn group_version_document(path: &str) -> Option<&'static Value> {
    static DOCS: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    DOCS.get_or_init(build_documents).get(path)
}

fn build_documents() -> BTreeMap<String, Value> {
    let defs = definitions();
    let mut docs = BTreeMap::new();
    let mut gvs: Vec<(&str, &str)> = vec![("", "v1")];
    gvs.extend(GROUPS.iter().map(|g| (*g, "v1")));
    for (group, version) in gvs {
        let mut paths = Map::new();
        let mut schemas = BTreeMap::new();
        for r in RESOURCES
            .iter()
            .filter(|r| r.group == group && r.version == version)
        {
            paths_for(r, &mut paths);
            collect_refs(defs, r.definition, &mut schemas);
            if r.has_subresource("scale") {
                collect_refs(defs, "io.k8s.api.autoscaling.v1.Scale", &mut schemas);
            }
        }
        let key = if group.is_empty() {
            format!("api/{version}")
        } else {
            format!("apis/{group}/{version}")
        };
        let schemas: Map<String, Value> = schemas.into_iter().collect();
        docs.insert(
            key,
            json!({
                "openapi": "3.0.0",
                "info": {"title": "Kubernetes", "version": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0")},
                "paths": paths,
                "components": {"schemas": schemas},
            }),
        );
    }
    docs
}

/// `/openapi/v3`: where each group version's document is, with a hash so clients can cache.
pub fn root() -> Value {
    let mut paths = Map::new();
    let mut gvs = vec!["api/v1".to_owned()];
    gvs.extend(GROUPS.iter().map(|g| format!("apis/{g}/v1")));
    for gv in gvs {
        let hash = group_version_document(&gv).map_or(0, |doc| {
            let mut hasher = DefaultHasher::new();
            doc.to_string().hash(&mut hasher);
            hasher.finish()
        });
        paths.insert(
            gv.clone(),
            json!({"serverRelativeURL": format!("/openapi/v3/{gv}?hash={hash:016X}")}),
        );
    }
    json!({"paths": paths})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_definition_carries_its_group_version_kind_and_merge_keys() {
        let defs = definitions();
        let pod = defs.get("io.k8s.api.core.v1.Pod").expect("pod schema");
        assert_eq!(pod["x-kubernetes-group-version-kind"][0]["kind"], "Pod");
        let spec = defs
            .get("io.k8s.api.core.v1.PodSpec")
            .expect("pod spec schema");
        assert_eq!(
            spec["properties"]["containers"]["x-kubernetes-patch-merge-key"],
            "name"
        );
        assert!(
            spec["description"]
                .as_str()
                .unwrap_or_default()
                .contains("pod")
        );
    }

    #[test]
    fn every_patch_operation_offers_field_validation() {
        let doc = group_version_document("apis/apps/v1").expect("apps document");
        let path = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"];
        let params = path["patch"]["parameters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(params.iter().any(|p| p["name"] == "fieldValidation"));
        assert_eq!(
            path["patch"]["x-kubernetes-group-version-kind"]["kind"],
            "Deployment"
        );
        let schemas = doc["components"]["schemas"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        assert!(schemas.contains_key("io.k8s.api.core.v1.PodSpec"));
    }

    #[test]
    fn root_lists_core_and_groups() {
        let root = root();
        assert!(root["paths"]["api/v1"]["serverRelativeURL"].is_string());
        assert!(root["paths"]["apis/batch/v1"]["serverRelativeURL"].is_string());
    }
}
