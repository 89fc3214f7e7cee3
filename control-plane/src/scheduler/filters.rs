//! Filters: can this pod run on this node at all? Each returns the reasons it cannot, worded
//! as the upstream scheduler words them, so `kubectl describe pod` reads the same.

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, Taint, Toleration,
};

use super::resources::Resources;
use super::state::{HostPort, NodeInfo};

/// Why a node was rejected.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reason {
    NotReady,
    Unschedulable,
    UntoleratedTaint { key: String, value: String },
    NodeAffinity,
    Insufficient(String),
    TooManyPods,
    HostPorts,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::NotReady => f.write_str("node(s) were not ready"),
            Reason::Unschedulable => f.write_str("node(s) were unschedulable"),
            Reason::UntoleratedTaint { key, value } => {
                write!(f, "node(s) had untolerated taint {{{key}: {value}}}")
            }
            Reason::NodeAffinity => {
                f.write_str("node(s) didn't match Pod's node affinity/selector")
            }
            Reason::Insufficient(r) => write!(f, "Insufficient {r}"),
            Reason::TooManyPods => f.write_str("Too many pods"),
            Reason::HostPorts => {
                f.write_str("node(s) didn't have free ports for the requested pod ports")
            }
        }
    }
}

const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";
const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

fn tolerations(pod: &Pod) -> &[Toleration] {
    pod.spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default()
}

/// Whether one toleration covers a taint.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if t.effect
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != taint.effect)
    {
        return false;
    }
    let key = t.key.as_deref().unwrap_or_default();
    match t.operator.as_deref() {
        Some("Exists") => key.is_empty() || key == taint.key,
        // Equal is the default operator.
        _ => {
            key == taint.key
                && t.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
    }
}

pub fn tolerated(pod: &Pod, taint: &Taint) -> bool {
    tolerations(pod).iter().any(|t| tolerates(t, taint))
}

fn ready(node: &Node) -> Option<&str> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status.as_str())
}

/// A node must report Ready=True unless the pod tolerates the taint that node lifecycle puts on
/// such a node.
pub fn node_ready(pod: &Pod, node: &Node) -> Option<Reason> {
    let taint_key = match ready(node) {
        Some("True") => return None,
        Some("False") => NOT_READY_TAINT,
        _ => UNREACHABLE_TAINT,
    };
    let taint = Taint {
        key: taint_key.into(),
        effect: "NoSchedule".into(),
        ..Taint::default()
    };
    (!tolerated(pod, &taint)).then_some(Reason::NotReady)
}

/// A cordoned node takes no new pods, unless they tolerate the unschedulable taint.
pub fn node_schedulable(pod: &Pod, node: &Node) -> Option<Reason> {
    let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
    if !cordoned {
        return None;
    }
    let taint = Taint {
        key: UNSCHEDULABLE_TAINT.into(),
        effect: "NoSchedule".into(),
        ..Taint::default()
    };
    (!tolerated(pod, &taint)).then_some(Reason::Unschedulable)
}

/// Every NoSchedule and NoExecute taint must be tolerated; PreferNoSchedule only scores.
pub fn taints(pod: &Pod, node: &Node) -> Option<Reason> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .find(|t| !tolerated(pod, t))
        .map(|t| Reason::UntoleratedTaint {
            key: t.key.clone(),
            value: t.value.clone().unwrap_or_default(),
        })
}

fn requirement_matches(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|w| w == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|w| w == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        op @ ("Gt" | "Lt") => {
            let (Some(v), [bound]) = (value.and_then(|v| v.parse::<i64>().ok()), values) else {
                return false;
            };
            let Ok(bound) = bound.parse::<i64>() else {
                return false;
            };
            if op == "Gt" { v > bound } else { v < bound }
        }
        _ => false,
    }
}

fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    // An empty term matches nothing.
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    let labels = node.metadata.labels.as_ref();
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.and_then(|l| l.get(&r.key)).map(String::as_str)))
        && fields.iter().all(|r| {
            let v = (r.key == "metadata.name")
                .then(|| node.metadata.name.as_deref().unwrap_or_default());
            requirement_matches(r, v)
        })
}

/// `nodeSelector` labels all present, and some term of the required node affinity matching.
pub fn node_affinity(pod: &Pod, node: &Node) -> Option<Reason> {
    let spec = pod.spec.as_ref()?;
    let labels = node.metadata.labels.as_ref();
    let selector_ok = spec
        .node_selector
        .iter()
        .flatten()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    let affinity_ok = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_none_or(|sel| {
            sel.node_selector_terms
                .iter()
                .any(|t| term_matches(t, node))
        });
    (!(selector_ok && affinity_ok)).then_some(Reason::NodeAffinity)
}

/// Requests must fit in allocatable minus what placed pods already request; a node also has
/// a pod count limit (`pods` allocatable).
pub fn fits(requests: &Resources, info: &NodeInfo) -> Vec<Reason> {
    let mut out = Vec::new();
    let max_pods = info.allocatable.0.get("pods").copied();
    if let Some(max) = max_pods
        && (info.pod_count as i128 + 1) * 1000 > max
    {
        out.push(Reason::TooManyPods);
    }
    for (name, want) in &requests.0 {
        if *want <= 0 || name == "pods" {
            continue;
        }
        let free = info.allocatable.get(name) - info.requested.get(name);
        if *want > free {
            out.push(Reason::Insufficient(name.clone()));
        }
    }
    out
}

fn ports_conflict(a: &HostPort, b: &HostPort) -> bool {
    a.0 == b.0 && a.2 == b.2 && (a.1 == b.1 || a.1 == "0.0.0.0" || b.1 == "0.0.0.0")
}

pub fn host_ports(wanted: &[HostPort], info: &NodeInfo) -> Option<Reason> {
    wanted
        .iter()
        .any(|w| info.host_ports.keys().any(|used| ports_conflict(w, used)))
        .then_some(Reason::HostPorts)
}

/// The pod's needs, computed once per scheduling attempt.
pub struct PodNeeds<'a> {
    pub pod: &'a Pod,
    pub requests: Resources,
    pub host_ports: Vec<HostPort>,
}

impl<'a> PodNeeds<'a> {
    pub fn of(pod: &'a Pod) -> Self {
        PodNeeds {
            pod,
            requests: super::resources::pod_requests(pod),
            host_ports: super::state::pod_host_ports(pod),
        }
    }
}

/// Runs the filters in order and returns the first failing one's reasons (empty = fits).
pub fn run_filters(needs: &PodNeeds<'_>, info: &NodeInfo) -> Vec<Reason> {
    let pod = needs.pod;
    let node = info.node.as_ref();
    let first = node_ready(pod, node)
        .or_else(|| node_schedulable(pod, node))
        .or_else(|| taints(pod, node))
        .or_else(|| node_affinity(pod, node));
    if let Some(r) = first {
        return vec![r];
    }
    let r = fits(&needs.requests, info);
    if !r.is_empty() {
        return r;
    }
    host_ports(&needs.host_ports, info).into_iter().collect()
}
