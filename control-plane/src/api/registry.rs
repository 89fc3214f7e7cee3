//! The resources this server serves: names, scope, subresources, and where they are stored.

/// The kinds the server knows; per-kind behaviour (defaults, validation, columns) matches on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Namespace,
    Node,
    Pod,
    Service,
    Endpoints,
    ConfigMap,
    Secret,
    ServiceAccount,
    Event,
    Deployment,
    ReplicaSet,
    StatefulSet,
    DaemonSet,
    Job,
    EndpointSlice,
    Lease,
}

/// One served resource.
#[derive(Debug, PartialEq, Eq)]
pub struct Resource {
    pub kind: Kind,
    /// `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub kind_name: &'static str,
    pub plural: &'static str,
    pub singular: &'static str,
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
    pub subresources: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// The OpenAPI definition name of the kind, e.g. `io.k8s.api.core.v1.Pod`.
    pub definition: &'static str,
}

const ALL: &[&str] = &["all"];

/// Every served resource, in the order discovery lists them.
pub static RESOURCES: &[Resource] = &[
    Resource {
        kind: Kind::Namespace,
        group: "",
        version: "v1",
        kind_name: "Namespace",
        plural: "namespaces",
        singular: "namespace",
        short_names: &["ns"],
        namespaced: false,
        subresources: &["status", "finalize"],
        categories: &[],
        definition: "io.k8s.api.core.v1.Namespace",
    },
    Resource {
        kind: Kind::Node,
        group: "",
        version: "v1",
        kind_name: "Node",
        plural: "nodes",
        singular: "node",
        short_names: &["no"],
        namespaced: false,
        subresources: &["status"],
        categories: &[],
        definition: "io.k8s.api.core.v1.Node",
    },
    Resource {
        kind: Kind::Pod,
        group: "",
        version: "v1",
        kind_name: "Pod",
        plural: "pods",
        singular: "pod",
        short_names: &["po"],
        namespaced: true,
        subresources: &["status", "binding", "eviction", "log"],
        categories: ALL,
        definition: "io.k8s.api.core.v1.Pod",
    },
    Resource {
        kind: Kind::Service,
        group: "",
        version: "v1",
        kind_name: "Service",
        plural: "services",
        singular: "service",
        short_names: &["svc"],
        namespaced: true,
        subresources: &["status"],
        categories: ALL,
        definition: "io.k8s.api.core.v1.Service",
    },
    Resource {
        kind: Kind::Endpoints,
        group: "",
        version: "v1",
        kind_name: "Endpoints",
        plural: "endpoints",
        singular: "endpoints",
        short_names: &["ep"],
        namespaced: true,
        subresources: &[],
        categories: &[],
        definition: "io.k8s.api.core.v1.Endpoints",
    },
    Resource {
        kind: Kind::ConfigMap,
        group: "",
        version: "v1",
        kind_name: "ConfigMap",
        plural: "configmaps",
        singular: "configmap",
        short_names: &["cm"],
        namespaced: true,
        subresources: &[],
        categories: &[],
        definition: "io.k8s.api.core.v1.ConfigMap",
    },
    Resource {
        kind: Kind::Secret,
        group: "",
        version: "v1",
        kind_name: "Secret",
        plural: "secrets",
        singular: "secret",
        short_names: &[],
        namespaced: true,
        subresources: &[],
        categories: &[],
        definition: "io.k8s.api.core.v1.Secret",
    },
    Resource {
        kind: Kind::ServiceAccount,
        group: "",
        version: "v1",
        kind_name: "ServiceAccount",
        plural: "serviceaccounts",
        singular: "serviceaccount",
        short_names: &["sa"],
        namespaced: true,
        subresources: &["token"],
        categories: &[],
        definition: "io.k8s.api.core.v1.ServiceAccount",
    },
    Resource {
        kind: Kind::Event,
        group: "",
        version: "v1",
        kind_name: "Event",
        plural: "events",
        singular: "event",
        short_names: &["ev"],
        namespaced: true,
        subresources: &[],
        categories: &[],
        definition: "io.k8s.api.core.v1.Event",
    },
    Resource {
        kind: Kind::Deployment,
        group: "apps",
        version: "v1",
        kind_name: "Deployment",
        plural: "deployments",
        singular: "deployment",
        short_names: &["deploy"],
        namespaced: true,
        subresources: &["status", "scale"],
        categories: ALL,
        definition: "io.k8s.api.apps.v1.Deployment",
    },
    Resource {
        kind: Kind::ReplicaSet,
        group: "apps",
        version: "v1",
        kind_name: "ReplicaSet",
        plural: "replicasets",
        singular: "replicaset",
        short_names: &["rs"],
        namespaced: true,
        subresources: &["status", "scale"],
        categories: ALL,
        definition: "io.k8s.api.apps.v1.ReplicaSet",
    },
    Resource {
        kind: Kind::StatefulSet,
        group: "apps",
        version: "v1",
        kind_name: "StatefulSet",
        plural: "statefulsets",
        singular: "statefulset",
        short_names: &["sts"],
        namespaced: true,
        subresources: &["status", "scale"],
        categories: ALL,
        definition: "io.k8s.api.apps.v1.StatefulSet",
    },
    Resource {
        kind: Kind::DaemonSet,
        group: "apps",
        version: "v1",
        kind_name: "DaemonSet",
        plural: "daemonsets",
        singular: "daemonset",
        short_names: &["ds"],
        namespaced: true,
        subresources: &["status"],
        categories: ALL,
        definition: "io.k8s.api.apps.v1.DaemonSet",
    },
    Resource {
        kind: Kind::Job,
        group: "batch",
        version: "v1",
        kind_name: "Job",
        plural: "jobs",
        singular: "job",
        short_names: &[],
        namespaced: true,
        subresources: &["status"],
        categories: ALL,
        definition: "io.k8s.api.batch.v1.Job",
    },
    Resource {
        kind: Kind::EndpointSlice,
        group: "discovery.k8s.io",
        version: "v1",
        kind_name: "EndpointSlice",
        plural: "endpointslices",
        singular: "endpointslice",
        short_names: &[],
        namespaced: true,
        subresources: &[],
        categories: &[],
        definition: "io.k8s.api.discovery.v1.EndpointSlice",
    },
    Resource {
        kind: Kind::Lease,
        group: "coordination.k8s.io",
        version: "v1",
        kind_name: "Lease",
        plural: "leases",
        singular: "lease",
        short_names: &[],
        namespaced: true,
        subresources: &[],
        categories: &[],
        definition: "io.k8s.api.coordination.v1.Lease",
    },
];

/// The API groups other than core, in discovery order.
pub const GROUPS: &[&str] = &["apps", "batch", "discovery.k8s.io", "coordination.k8s.io"];

impl Resource {
    /// `v1` or `apps/v1`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `deployments.apps`, the way upstream names a resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    pub fn list_kind(&self) -> String {
        format!("{}List", self.kind_name)
    }

    /// The store key prefix of every object of this resource (ends with `/`).
    pub fn prefix(&self) -> String {
        let group = if self.group.is_empty() {
            "core"
        } else {
            self.group
        };
        format!("/registry/{group}/{}/", self.plural)
    }

    /// The key prefix of the objects in one namespace, or of all objects for `None`.
    pub fn namespace_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/", self.prefix()),
            _ => self.prefix(),
        }
    }

    /// The store key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/{name}", self.prefix()),
            _ => format!("{}{name}", self.prefix()),
        }
    }

    pub fn has_subresource(&self, sub: &str) -> bool {
        self.subresources.contains(&sub)
    }

    /// Whether `status` is written only through the status subresource.
    pub fn has_status(&self) -> bool {
        self.has_subresource("status")
    }

    /// Whether the object has a `spec` whose changes bump `metadata.generation`.
    pub fn tracks_generation(&self) -> bool {
        !matches!(
            self.kind,
            Kind::ConfigMap
                | Kind::Secret
                | Kind::ServiceAccount
                | Kind::Event
                | Kind::Endpoints
                | Kind::EndpointSlice
        )
    }
}

pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

pub fn by_kind(kind: Kind) -> &'static Resource {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind)
        .unwrap_or(&RESOURCES[0])
}

/// The resource a store key belongs to, with the object's namespace and name.
pub fn from_key(key: &str) -> Option<(&'static Resource, Option<&str>, &str)> {
    RESOURCES.iter().find_map(|r| {
        let rest = key.strip_prefix(r.prefix().as_str())?;
        if r.namespaced {
            let (ns, name) = rest.split_once('/')?;
            Some((r, Some(ns), name))
        } else {
            Some((r, None, rest))
        }
    })
}

pub fn in_group_version(group: &str, version: &str) -> impl Iterator<Item = &'static Resource> {
    RESOURCES
        .iter()
        .filter(move |r| r.group == group && r.version == version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_to_resource_namespace_and_name() {
        let pods = find("", "v1", "pods").expect("pods served");
        let key = pods.key(Some("default"), "web-1");
        let (r, ns, name) = from_key(&key).expect("key parses");
        assert_eq!((r.plural, ns, name), ("pods", Some("default"), "web-1"));

        let nodes = find("", "v1", "nodes").expect("nodes served");
        let key = nodes.key(None, "n1");
        let (r, ns, name) = from_key(&key).expect("key parses");
        assert_eq!((r.plural, ns, name), ("nodes", None, "n1"));
    }

    #[test]
    fn prefixes_of_different_resources_never_nest() {
        for a in RESOURCES {
            for b in RESOURCES {
                if a.plural != b.plural || a.group != b.group {
                    assert!(
                        !a.prefix().starts_with(&b.prefix()),
                        "{} in {}",
                        a.plural,
                        b.plural
                    );
                }
            }
        }
    }
}
