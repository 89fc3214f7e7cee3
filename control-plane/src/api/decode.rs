//! Request bodies: JSON or YAML to a JSON value, unknown-field detection against the OpenAPI
//! definitions, and a round trip through the `k8s-openapi` type that checks every field's type.

use k8s_openapi::api::{apps, batch, coordination, core, discovery};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::openapi::Definitions;
use super::registry::Kind;

/// Bodies larger than this are refused with 413, as upstream does.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// `fieldValidation`: what to do with fields the type does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    Ignore,
    Warn,
    Strict,
}

impl FieldValidation {
    pub fn parse(value: Option<&str>) -> Result<Self, ApiError> {
        match value {
            None | Some("" | "Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(ApiError::BadRequest(format!(
                "fieldValidation must be one of Ignore, Warn or Strict, not {other:?}"
            ))),
        }
    }
}

/// Parses a body as JSON, or YAML when the content type says so.
pub fn parse_body(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    if media == "application/vnd.kubernetes.protobuf" {
        return super::protobuf::decode(body);
    }
    let is_yaml = matches!(
        media,
        "application/yaml" | "application/x-yaml" | "text/yaml"
    );
    if is_yaml {
        let value: Value = serde_yaml::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("error decoding YAML body: {e}")))?;
        return Ok(value);
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("error decoding JSON body: {e}")))
}

/// Paths (`spec.foo`, `spec.containers[0].bar`) of fields the schema does not have.
pub fn unknown_fields(value: &Value, definition: &str, defs: &Definitions) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(schema) = defs.get(definition) {
        walk(value, schema, defs, "", &mut found);
    }
    found
}

fn walk(value: &Value, schema: &Value, defs: &Definitions, path: &str, found: &mut Vec<String>) {
    let schema = defs.resolve(schema);
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                if let Some(prop) = props.and_then(|p| p.get(key)) {
                    walk(child, prop, defs, &child_path, found);
                } else if let Some(additional) = additional {
                    walk(child, additional, defs, &child_path, found);
                } else if props.is_some() {
                    found.push(child_path);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item, item_schema, defs, &format!("{path}[{i}]"), found);
                }
            }
        }
        _ => {}
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(value: Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(value).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// Decodes the object into its Rust type and back: type errors become 400 and fields the type
/// does not know are dropped.
pub fn normalize(kind: Kind, value: Value) -> Result<Value, ApiError> {
    let result = match kind {
        Kind::Namespace => round_trip::<core::v1::Namespace>(value),
        Kind::Node => round_trip::<core::v1::Node>(value),
        Kind::Pod => round_trip::<core::v1::Pod>(value),
        Kind::Service => round_trip::<core::v1::Service>(value),
        Kind::Endpoints => round_trip::<core::v1::Endpoints>(value),
        Kind::ConfigMap => round_trip::<core::v1::ConfigMap>(value),
        Kind::Secret => round_trip::<core::v1::Secret>(value),
        Kind::ServiceAccount => round_trip::<core::v1::ServiceAccount>(value),
        Kind::Event => round_trip::<core::v1::Event>(value),
        Kind::Deployment => round_trip::<apps::v1::Deployment>(value),
        Kind::ReplicaSet => round_trip::<apps::v1::ReplicaSet>(value),
        Kind::StatefulSet => round_trip::<apps::v1::StatefulSet>(value),
        Kind::DaemonSet => round_trip::<apps::v1::DaemonSet>(value),
        Kind::Job => round_trip::<batch::v1::Job>(value),
        Kind::EndpointSlice => round_trip::<discovery::v1::EndpointSlice>(value),
        Kind::Lease => round_trip::<coordination::v1::Lease>(value),
    };
    result.map_err(|e| ApiError::BadRequest(format!("error decoding the object: {e}")))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::openapi::definitions;

    #[test]
    fn unknown_fields_are_found_at_any_depth() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "x", "labels": {"any": "thing"}, "bogus": 1},
            "spec": {"containers": [{"name": "c", "image": "i", "imagePullPolicyy": "x",
                "resources": {"limits": {"cpu": "1"}}}]}});
        let found = unknown_fields(&pod, "io.k8s.api.core.v1.Pod", definitions());
        assert_eq!(
            found,
            ["metadata.bogus", "spec.containers[0].imagePullPolicyy"]
        );
    }

    #[test]
    fn type_errors_are_bad_requests_and_yaml_is_accepted() {
        let bad = json!({"metadata": {"name": "x"}, "spec": {"replicas": "three"}});
        let err = normalize(Kind::Deployment, bad).expect_err("replicas is a number");
        assert_eq!(err.code(), 400);
        let yaml = b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: b\n";
        let value = parse_body(yaml, "application/yaml").expect("yaml parses");
        assert_eq!(value["data"]["a"], "b");
        let err = parse_body(b"{not json", "application/json").expect_err("malformed");
        assert!(
            err.to_string().contains("error decoding JSON body"),
            "{err}"
        );
        assert!(parse_body(b"a: [", "application/yaml").is_err());
    }

    #[test]
    fn field_validation_values() {
        assert_eq!(
            FieldValidation::parse(None).ok(),
            Some(FieldValidation::Warn)
        );
        assert_eq!(
            FieldValidation::parse(Some("Strict")).ok(),
            Some(FieldValidation::Strict)
        );
        assert!(FieldValidation::parse(Some("strict")).is_err());
    }
}
