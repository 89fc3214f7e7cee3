//! Discovery documents: `/version`, `/api`, `/apis`, `/api/v1`, `/apis/<group>/<version>`.

use serde_json::{Value, json};

use super::registry::{self, GROUPS, Resource};

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The Kubernetes release whose API this server follows.
pub const KUBE_MAJOR: &str = "1";
pub const KUBE_MINOR: &str = "32";

pub fn version() -> Value {
    json!({
        "major": KUBE_MAJOR,
        "minor": KUBE_MINOR,
        "gitVersion": format!("v{KUBE_MAJOR}.{KUBE_MINOR}.0-ferrolet.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "none",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

/// `/api`: the core group's versions.
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
    })
}

fn group_entry(group: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/v1"), "version": "v1"});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

/// `/apis`: every named group.
pub fn groups() -> Value {
    let groups: Vec<Value> = GROUPS.iter().map(|g| group_entry(g)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, or `None` when the group isn't served.
pub fn group(group: &str) -> Option<Value> {
    GROUPS.contains(&group).then(|| {
        let mut entry = group_entry(group);
        entry["kind"] = json!("APIGroup");
        entry["apiVersion"] = json!("v1");
        entry
    })
}

fn subresource_entry(r: &Resource, sub: &str) -> Value {
    let (kind, group, version, verbs): (&str, &str, &str, &[&str]) = match sub {
        "scale" => ("Scale", "autoscaling", "v1", &["get", "patch", "update"]),
        "binding" => ("Binding", "", "v1", &["create"]),
        "eviction" => ("Eviction", "policy", "v1", &["create"]),
        "token" => ("TokenRequest", "authentication.k8s.io", "v1", &["create"]),
        "log" => (r.kind_name, "", "v1", &["get"]),
        "finalize" => (r.kind_name, "", "v1", &["update"]),
        _ => (r.kind_name, "", "", &["get", "patch", "update"]),
    };
    let mut entry = json!({
        "name": format!("{}/{sub}", r.plural),
        "singularName": "",
        "namespaced": r.namespaced,
        "kind": kind,
        "verbs": verbs,
    });
    if !group.is_empty() {
        entry["group"] = json!(group);
    }
    if !version.is_empty() {
        entry["version"] = json!(version);
    }
    entry
}

/// `/api/v1` or `/apis/<group>/<version>`, or `None` when not served.
pub fn resources(group: &str, version: &str) -> Option<Value> {
    let served: Vec<&Resource> = registry::in_group_version(group, version).collect();
    if served.is_empty() {
        return None;
    }
    let mut list = Vec::new();
    for r in &served {
        let mut entry = json!({
            "name": r.plural,
            "singularName": r.singular,
            "namespaced": r.namespaced,
            "kind": r.kind_name,
            "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            entry["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            entry["categories"] = json!(r.categories);
        }
        list.push(entry);
        for sub in r.subresources {
            list.push(subresource_entry(r, sub));
        }
    }
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": list,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_list_has_pods_with_short_name_and_subresources() {
        let doc = resources("", "v1").expect("core served");
        let items = doc["resources"].as_array().cloned().unwrap_or_default();
        let pods = items
            .iter()
            .find(|r| r["name"] == "pods")
            .expect("pods listed");
        assert_eq!(pods["shortNames"], json!(["po"]));
        assert!(items.iter().any(|r| r["name"] == "pods/status"));
        let binding = items
            .iter()
            .find(|r| r["name"] == "pods/binding")
            .expect("binding");
        assert_eq!(binding["verbs"], json!(["create"]));
    }

    #[test]
    fn unknown_groups_are_not_served() {
        assert!(resources("example.com", "v1").is_none());
        assert!(group("example.com").is_none());
        assert!(group("apps").is_some());
    }
}
