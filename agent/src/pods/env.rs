//! Container environment: `envFrom` sources first, then `env` entries (values with `$(VAR)`
//! references to earlier ones, configMap and secret keys, pod fields, container resources).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};

use crate::api::Api;
use crate::config::Quantity;
use crate::volumes::{field_value, resource_field};

use super::PodError;
use super::spec::expand;

async fn config_map<A: Api>(
    api: &A,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, PodError> {
    let cm: Option<ConfigMap> = api.get(Some(namespace), name).await?;
    Ok(cm.map(|c| c.data.unwrap_or_default()))
}

async fn secret<A: Api>(
    api: &A,
    namespace: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, String>>, PodError> {
    let s: Option<Secret> = api.get(Some(namespace), name).await?;
    Ok(s.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v.0).into_owned()))
            .collect()
    }))
}

fn missing(container: &str, what: String) -> PodError {
    PodError::Config(format!("container {container}: {what}"))
}

/// The resolved environment of `container`, in order, later names overriding earlier ones.
/// `allocatable` is the node's, for `resourceFieldRef` limits the container does not set.
pub async fn resolve<A: Api>(
    api: &A,
    pod: &Pod,
    container: &Container,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<Vec<(String, String)>, PodError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut out: Vec<(String, String)> = Vec::new();
    let set = |out: &mut Vec<(String, String)>, k: String, v: String| {
        if let Some(slot) = out.iter_mut().find(|(name, _)| *name == k) {
            slot.1 = v;
        } else {
            out.push((k, v));
        }
    };
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let (data, optional, what) = if let Some(r) = &source.config_map_ref {
            (
                config_map(api, namespace, &r.name).await?,
                r.optional.unwrap_or(false),
                format!("configmap {namespace}/{}", r.name),
            )
        } else if let Some(r) = &source.secret_ref {
            (
                secret(api, namespace, &r.name).await?,
                r.optional.unwrap_or(false),
                format!("secret {namespace}/{}", r.name),
            )
        } else {
            continue;
        };
        match data {
            Some(data) => {
                for (k, v) in data {
                    set(&mut out, format!("{prefix}{k}"), v);
                }
            }
            None if optional => {}
            None => {
                return Err(missing(
                    &container.name,
                    format!("envFrom {what} not found"),
                ));
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = if let Some(from) = &var.value_from {
            if let Some(f) = &from.field_ref {
                field_value(pod, &f.field_path).ok_or_else(|| {
                    missing(
                        &container.name,
                        format!("env {}: fieldRef {:?} unsupported", var.name, f.field_path),
                    )
                })?
            } else if let Some(r) = &from.config_map_key_ref {
                let data = config_map(api, namespace, &r.name).await?;
                match data.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => v,
                    None if r.optional.unwrap_or(false) => continue,
                    None => {
                        return Err(missing(
                            &container.name,
                            format!(
                                "env {}: key {:?} of configmap {namespace}/{} not found",
                                var.name, r.key, r.name
                            ),
                        ));
                    }
                }
            } else if let Some(r) = &from.secret_key_ref {
                let data = secret(api, namespace, &r.name).await?;
                match data.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => v,
                    None if r.optional.unwrap_or(false) => continue,
                    None => {
                        return Err(missing(
                            &container.name,
                            format!(
                                "env {}: key {:?} of secret {namespace}/{} not found",
                                var.name, r.key, r.name
                            ),
                        ));
                    }
                }
            } else if let Some(r) = &from.resource_field_ref {
                resource_field::value(pod, Some(&container.name), r, allocatable)
                    .map_err(|e| missing(&container.name, format!("env {}: {e}", var.name)))?
            } else {
                String::new()
            }
        } else {
            let vars: HashMap<&str, &str> =
                out.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            expand(var.value.as_deref().unwrap_or_default(), &vars)
        };
        set(&mut out, var.name.clone(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::fake::FakeApi;

    #[tokio::test]
    async fn resource_field_refs_share_the_volume_code_divisor_and_node_fallback() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"containers": [
                {"name": "app", "resources": {"limits": {"memory": "256Mi"}},
                 "env": [
                    {"name": "MEM_MB", "valueFrom": {"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}},
                    {"name": "CPU", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu"}}},
                    {"name": "SIDE_MEM", "valueFrom": {"resourceFieldRef": {"containerName": "side", "resource": "requests.memory"}}},
                 ]},
                {"name": "side", "resources": {"requests": {"memory": "10"}}},
            ]},
        }))
        .expect("pod");
        let node = BTreeMap::from([("cpu".to_owned(), Quantity::from_units(2))]);
        let api = FakeApi::new();
        let app = &pod.spec.as_ref().expect("spec").containers[0];
        let env = resolve(&api, &pod, app, &node).await.expect("env");
        assert_eq!(
            env,
            [
                ("MEM_MB".to_owned(), "256".to_owned()),
                ("CPU".to_owned(), "2".to_owned()),
                ("SIDE_MEM".to_owned(), "10".to_owned()),
            ]
        );
        let mut bad = app.clone();
        bad.env = Some(vec![serde_json::from_value(serde_json::json!(
            {"name": "X", "valueFrom": {"resourceFieldRef": {"resource": "limits.cpu", "divisor": "2"}}}
        ))
        .expect("var")]);
        let err = resolve(&api, &pod, &bad, &node)
            .await
            .expect_err("bad divisor");
        assert!(
            err.to_string()
                .starts_with("container app: env X: divisor \"2\""),
            "{err}"
        );
    }
}
