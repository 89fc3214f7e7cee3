//! Parsing an HTTP request line into what the API is asked to do, with no I/O.

use std::collections::HashMap;

use super::error::ApiError;
use super::patch::PatchType;
use super::registry::{self, Resource};

/// What a path names.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    GroupResources { group: String, version: String },
    OpenApiV3Root,
    OpenApiV3Doc(String),
    OpenApiV2,
    Healthz,
    Resource(ResourceRoute),
}

/// A path that names a resource collection, an object, or an object's subresource.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceRoute {
    pub resource: &'static Resource,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// The action the method and route ask for.
#[derive(Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch(PatchType),
    Delete,
    DeleteCollection,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Query parameters, decoded; the last value of a repeated key wins.
pub fn parse_query(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn no_route() -> ApiError {
    ApiError::NoRoute
}

/// Parses the path of a request.
pub fn route(path: &str) -> Result<Route, ApiError> {
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    match segments.as_slice() {
        ["version"] => Ok(Route::Version),
        ["healthz" | "livez" | "readyz", ..] => Ok(Route::Healthz),
        ["openapi", "v2"] => Ok(Route::OpenApiV2),
        ["openapi", "v3"] => Ok(Route::OpenApiV3Root),
        ["openapi", "v3", rest @ ..] => Ok(Route::OpenApiV3Doc(rest.join("/"))),
        ["api"] => Ok(Route::CoreVersions),
        ["apis"] => Ok(Route::Groups),
        ["apis", group] => Ok(Route::Group((*group).to_owned())),
        ["api", version] => Ok(Route::GroupResources {
            group: String::new(),
            version: (*version).to_owned(),
        }),
        ["apis", group, version] => Ok(Route::GroupResources {
            group: (*group).to_owned(),
            version: (*version).to_owned(),
        }),
        ["api", version, rest @ ..] => resource_route("", version, rest),
        ["apis", group, version, rest @ ..] => resource_route(group, version, rest),
        _ => Err(no_route()),
    }
}

fn resource_route(group: &str, version: &str, rest: &[&str]) -> Result<Route, ApiError> {
    let find = |plural: &str| registry::find(group, version, plural).ok_or_else(no_route);
    let owned = |s: &&str| Some((*s).to_owned());
    let (resource, namespace, name, sub) = match rest {
        // The namespaces resource itself and its subresources.
        ["namespaces"] => (find("namespaces")?, None, None, None),
        ["namespaces", name] => (find("namespaces")?, None, owned(name), None),
        ["namespaces", name, sub @ ("status" | "finalize")] => {
            (find("namespaces")?, None, owned(name), owned(sub))
        }
        ["namespaces", ns, plural, tail @ ..] => {
            let r = find(plural)?;
            if !r.namespaced {
                return Err(no_route());
            }
            match tail {
                [] => (r, owned(ns), None, None),
                [name] => (r, owned(ns), owned(name), None),
                [name, sub] => (r, owned(ns), owned(name), owned(sub)),
                _ => return Err(no_route()),
            }
        }
        [plural] => (find(plural)?, None, None, None),
        [plural, name] => {
            let r = find(plural)?;
            if r.namespaced {
                return Err(no_route());
            }
            (r, None, owned(name), None)
        }
        [plural, name, sub] => {
            let r = find(plural)?;
            if r.namespaced {
                return Err(no_route());
            }
            (r, None, owned(name), owned(sub))
        }
        _ => return Err(no_route()),
    };
    if let Some(sub) = &sub
        && !resource.has_subresource(sub)
    {
        return Err(no_route());
    }
    Ok(Route::Resource(ResourceRoute {
        resource,
        namespace,
        name,
        subresource: sub,
    }))
}

/// The verb for `method` on `route`, given the query and `Content-Type`.
pub fn verb(
    method: &http::Method,
    route: &ResourceRoute,
    query: &HashMap<String, String>,
    content_type: &str,
) -> Result<Verb, ApiError> {
    let is_item = route.name.is_some();
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let not_allowed =
        || ApiError::MethodNotAllowed(format!("{method} is not supported on this path"));
    match (method.as_str(), is_item) {
        ("GET", false) if watch => Ok(Verb::Watch),
        ("GET", false) => Ok(Verb::List),
        ("GET", true) => Ok(Verb::Get),
        ("POST", false) => Ok(Verb::Create),
        // Subresources created with POST on an object path (binding, eviction).
        ("POST", true) if route.subresource.is_some() => Ok(Verb::Create),
        ("PUT", true) => Ok(Verb::Update),
        ("PATCH", true) => PatchType::from_content_type(content_type)
            .map(Verb::Patch)
            .ok_or_else(|| {
                ApiError::UnsupportedMediaType(format!(
                    "the body of the request was in an unknown format - accepted media types \
                     include: application/json-patch+json, application/merge-patch+json, \
                     application/strategic-merge-patch+json, application/apply-patch+yaml \
                     (got {content_type:?})"
                ))
            }),
        ("DELETE", true) => Ok(Verb::Delete),
        ("DELETE", false) => Ok(Verb::DeleteCollection),
        _ => Err(not_allowed()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resource(path: &str) -> ResourceRoute {
        match route(path) {
            Ok(Route::Resource(r)) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn namespaced_and_cluster_paths() {
        let r = resource("/api/v1/namespaces/default/pods/web/status");
        assert_eq!(r.resource.plural, "pods");
        assert_eq!(r.namespace.as_deref(), Some("default"));
        assert_eq!(r.name.as_deref(), Some("web"));
        assert_eq!(r.subresource.as_deref(), Some("status"));

        let r = resource("/api/v1/namespaces/kube-system");
        assert_eq!(
            (r.resource.plural, r.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );

        let r = resource("/apis/apps/v1/deployments");
        assert_eq!((r.resource.plural, r.namespace), ("deployments", None));

        let r = resource("/api/v1/nodes/n1/status");
        assert_eq!(r.subresource.as_deref(), Some("status"));
    }

    #[test]
    fn unknown_paths_and_subresources_are_not_found() {
        for path in [
            "/api/v1/namespaces/default/widgets",
            "/api/v1/namespaces/default/configmaps/x/status",
            "/apis/apps/v2/deployments",
            "/api/v1/namespaces/default/nodes/x",
            "/api/v1/pods/x",
            "/nothing",
        ] {
            assert!(matches!(route(path), Err(ApiError::NoRoute)), "{path}");
        }
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let q = parse_query(Some("labelSelector=app%3Dweb%2Ctier+in+(a)&watch=true&x"));
        assert_eq!(q["labelSelector"], "app=web,tier in (a)");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["x"], "");
        let q = parse_query(Some("a=%zz&b=%4"));
        assert_eq!(q["a"], "%zz");
        assert_eq!(q["b"], "%4");
    }

    #[test]
    fn verbs_follow_method_and_watch() {
        let r = resource("/api/v1/namespaces/default/pods");
        let mut q = HashMap::new();
        assert_eq!(verb(&http::Method::GET, &r, &q, "").ok(), Some(Verb::List));
        q.insert("watch".to_owned(), "true".to_owned());
        assert_eq!(verb(&http::Method::GET, &r, &q, "").ok(), Some(Verb::Watch));
        let item = resource("/api/v1/namespaces/default/pods/x");
        let patch = verb(
            &http::Method::PATCH,
            &item,
            &q,
            "application/merge-patch+json",
        );
        assert_eq!(patch.ok(), Some(Verb::Patch(PatchType::Merge)));
        let bad = verb(&http::Method::PATCH, &item, &q, "text/plain");
        assert!(matches!(bad, Err(ApiError::UnsupportedMediaType(_))));
    }
}
