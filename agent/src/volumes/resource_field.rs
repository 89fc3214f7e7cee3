//! `resourceFieldRef`: a container's limits and requests as numbers, for env vars and for
//! downwardAPI (and projected downwardAPI) volume files alike. A limit the container does
//! not set (or sets to zero) reads as the node's allocatable amount, as the kubelet merges
//! it; an unset request reads as 0. The value is divided by `divisor` and rounded up.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, ResourceFieldSelector};

use crate::config::Quantity;

/// Why a `resourceFieldRef` has no value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceFieldError {
    #[error(
        "resource {0:?} is not supported (limits.cpu, limits.memory, limits.ephemeral-storage, requests.cpu, requests.memory, requests.ephemeral-storage)"
    )]
    UnknownResource(String),
    #[error("divisor {divisor:?} of {resource}: {why}")]
    BadDivisor {
        resource: String,
        divisor: String,
        why: String,
    },
    #[error("resourceFieldRef {0:?}: containerName is required in a volume")]
    NoContainerName(String),
    #[error("resourceFieldRef {resource:?}: container {container:?} is not in the pod")]
    NoSuchContainer { resource: String, container: String },
    #[error("{resource} of container {container:?}: {why}")]
    BadQuantity {
        resource: String,
        container: String,
        why: String,
    },
}

/// Divisors upstream accepts for CPU (`1m`, `1`), in thousandths.
const CPU_DIVISORS: &[&str] = &["1m", "1"];
/// Divisors upstream accepts for memory and ephemeral storage.
const BYTE_DIVISORS: &[&str] = &[
    "1", "1k", "1M", "1G", "1T", "1P", "1E", "1Ki", "1Mi", "1Gi", "1Ti", "1Pi", "1Ei",
];

fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

/// The value of `selector` for the pod. `default_container` is the container an env var
/// belongs to (a volume has none: its items must name theirs); `allocatable` is the
/// node's, by resource name.
pub fn value(
    pod: &Pod,
    default_container: Option<&str>,
    selector: &ResourceFieldSelector,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<String, ResourceFieldError> {
    let resource = selector.resource.as_str();
    let unknown = || ResourceFieldError::UnknownResource(resource.to_owned());
    let (which, name) = resource.split_once('.').ok_or_else(unknown)?;
    let divisors = match name {
        "cpu" => CPU_DIVISORS,
        "memory" | "ephemeral-storage" => BYTE_DIVISORS,
        _ => return Err(unknown()),
    };
    if !matches!(which, "limits" | "requests") {
        return Err(unknown());
    }
    let container_name = selector
        .container_name
        .as_deref()
        .filter(|n| !n.is_empty())
        .or(default_container)
        .ok_or_else(|| ResourceFieldError::NoContainerName(resource.to_owned()))?;
    let c = container(pod, container_name).ok_or_else(|| ResourceFieldError::NoSuchContainer {
        resource: resource.to_owned(),
        container: container_name.to_owned(),
    })?;

    let divisor_text = selector.divisor.as_ref().map_or("1", |d| d.0.as_str());
    let bad_divisor = |why: String| ResourceFieldError::BadDivisor {
        resource: resource.to_owned(),
        divisor: divisor_text.to_owned(),
        why,
    };
    let divisor = Quantity::parse(divisor_text).map_err(|e| bad_divisor(e.to_string()))?;
    let allowed = divisors
        .iter()
        .any(|d| Quantity::parse(d).is_ok_and(|q| q == divisor));
    if !allowed {
        return Err(bad_divisor(format!(
            "must be one of {} for {name}",
            divisors.join(", ")
        )));
    }

    let resources = c.resources.as_ref();
    let list = match which {
        "limits" => resources.and_then(|r| r.limits.as_ref()),
        _ => resources.and_then(|r| r.requests.as_ref()),
    };
    let set = match list.and_then(|l| l.get(name)) {
        None => None,
        Some(q) => Some(
            Quantity::parse(&q.0).map_err(|e| ResourceFieldError::BadQuantity {
                resource: resource.to_owned(),
                container: container_name.to_owned(),
                why: e.to_string(),
            })?,
        ),
    };
    let amount = match set {
        Some(q) if q.millis() > 0 => q,
        _ if which == "limits" => allocatable.get(name).copied().unwrap_or_default(),
        _ => Quantity::default(),
    };
    Ok(amount.millis().div_ceil(divisor.millis()).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity as ApiQuantity;
    use serde_json::json;

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {
                "initContainers": [{"name": "init", "resources": {"limits": {"memory": "64Mi"}}}],
                "containers": [
                    {"name": "app", "resources": {
                        "limits": {"cpu": "1500m", "memory": "128Mi", "ephemeral-storage": "1Gi"},
                        "requests": {"cpu": "250m", "memory": "100M"}}},
                    {"name": "bare"},
                    {"name": "zero", "resources": {"limits": {"cpu": "0"}}},
                ],
            },
        }))
        .expect("pod")
    }

    fn node() -> BTreeMap<String, Quantity> {
        BTreeMap::from([
            ("cpu".to_owned(), Quantity::from_units(4)),
            ("memory".to_owned(), Quantity::from_units(8 << 30)),
            (
                "ephemeral-storage".to_owned(),
                Quantity::from_units(100 << 30),
            ),
        ])
    }

    fn sel(
        resource: &str,
        container: Option<&str>,
        divisor: Option<&str>,
    ) -> ResourceFieldSelector {
        ResourceFieldSelector {
            resource: resource.into(),
            container_name: container.map(str::to_owned),
            divisor: divisor.map(|d| ApiQuantity(d.into())),
        }
    }

    #[test]
    fn limits_and_requests_are_divided_and_rounded_up() {
        let p = pod();
        let v = |r: &str, d: Option<&str>| value(&p, Some("app"), &sel(r, None, d), &node());
        assert_eq!(v("limits.cpu", None).as_deref(), Ok("2"));
        assert_eq!(v("limits.cpu", Some("1m")).as_deref(), Ok("1500"));
        assert_eq!(v("requests.cpu", Some("1m")).as_deref(), Ok("250"));
        assert_eq!(v("requests.cpu", None).as_deref(), Ok("1"));
        assert_eq!(v("limits.memory", None).as_deref(), Ok("134217728"));
        assert_eq!(v("limits.memory", Some("1Mi")).as_deref(), Ok("128"));
        assert_eq!(v("requests.memory", Some("1Mi")).as_deref(), Ok("96"));
        assert_eq!(
            v("limits.ephemeral-storage", Some("1Gi")).as_deref(),
            Ok("1")
        );
        assert_eq!(v("requests.ephemeral-storage", None).as_deref(), Ok("0"));
    }

    #[test]
    fn an_unset_or_zero_limit_is_the_node_allocatable_and_a_named_container_is_used() {
        let p = pod();
        let n = node();
        let bare = |r: &str, d: Option<&str>| value(&p, None, &sel(r, Some("bare"), d), &n);
        assert_eq!(bare("limits.cpu", None).as_deref(), Ok("4"));
        assert_eq!(bare("limits.memory", Some("1Gi")).as_deref(), Ok("8"));
        assert_eq!(
            bare("limits.ephemeral-storage", Some("1Gi")).as_deref(),
            Ok("100")
        );
        assert_eq!(bare("requests.memory", None).as_deref(), Ok("0"));
        let zero = value(&p, None, &sel("limits.cpu", Some("zero"), Some("1m")), &n);
        assert_eq!(zero.as_deref(), Ok("4000"));
        let init = value(
            &p,
            None,
            &sel("limits.memory", Some("init"), Some("1Mi")),
            &n,
        );
        assert_eq!(init.as_deref(), Ok("64"));
        // containerName wins over the env var's own container.
        let named = value(
            &p,
            Some("bare"),
            &sel("limits.memory", Some("app"), Some("1Mi")),
            &n,
        );
        assert_eq!(named.as_deref(), Ok("128"));
    }

    #[test]
    fn bad_selectors_are_named_in_the_error() {
        let p = pod();
        let n = node();
        let err = |s: ResourceFieldSelector, default: Option<&str>| {
            value(&p, default, &s, &n).expect_err("must fail")
        };
        for resource in [
            "limits.gpu",
            "limits",
            "cpu",
            "capacity.cpu",
            "limits.hugepages-2Mi",
            "",
        ] {
            assert_eq!(
                err(sel(resource, Some("app"), None), None),
                ResourceFieldError::UnknownResource(resource.into())
            );
        }
        for divisor in ["0", "abc", "-1", "2", "1Ki"] {
            let e = err(sel("limits.cpu", Some("app"), Some(divisor)), None);
            assert!(
                matches!(e, ResourceFieldError::BadDivisor { .. }),
                "{divisor}: {e}"
            );
        }
        let e = err(sel("limits.memory", Some("app"), Some("1m")), None);
        assert!(e.to_string().contains("must be one of 1, 1k"), "{e}");
        assert_eq!(
            err(sel("limits.memory", None, None), None),
            ResourceFieldError::NoContainerName("limits.memory".into())
        );
        assert_eq!(
            err(sel("limits.memory", Some(""), None), None),
            ResourceFieldError::NoContainerName("limits.memory".into())
        );
        assert_eq!(
            err(sel("limits.memory", Some("ghost"), None), None),
            ResourceFieldError::NoSuchContainer {
                resource: "limits.memory".into(),
                container: "ghost".into(),
            }
        );
    }
}
