//! Server-side printing: `meta.k8s.io/v1` `Table` with the columns `kubectl get` shows.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::object::{self, field_string, human_age};
use super::registry::Kind;

/// `(name, type, priority)`; priority 1 columns appear with `-o wide` only.
fn columns(kind: Kind) -> &'static [(&'static str, &'static str, u8)] {
    match kind {
        Kind::Namespace => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Age", "string", 0),
        ],
        Kind::Node => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Roles", "string", 0),
            ("Age", "string", 0),
            ("Version", "string", 0),
            ("Internal-IP", "string", 1),
            ("OS-Image", "string", 1),
            ("Kernel-Version", "string", 1),
            ("Container-Runtime", "string", 1),
        ],
        Kind::Pod => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Status", "string", 0),
            ("Restarts", "string", 0),
            ("Age", "string", 0),
            ("IP", "string", 1),
            ("Node", "string", 1),
        ],
        Kind::Service => &[
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Cluster-IP", "string", 0),
            ("External-IP", "string", 0),
            ("Port(s)", "string", 0),
            ("Age", "string", 0),
            ("Selector", "string", 1),
        ],
        Kind::Endpoints => &[
            ("Name", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        Kind::ConfigMap => &[
            ("Name", "string", 0),
            ("Data", "integer", 0),
            ("Age", "string", 0),
        ],
        Kind::Secret => &[
            ("Name", "string", 0),
            ("Type", "string", 0),
            ("Data", "integer", 0),
            ("Age", "string", 0),
        ],
        Kind::ServiceAccount => &[
            ("Name", "string", 0),
            ("Secrets", "integer", 0),
            ("Age", "string", 0),
        ],
        Kind::Event => &[
            ("Last Seen", "string", 0),
            ("Type", "string", 0),
            ("Reason", "string", 0),
            ("Object", "string", 0),
            ("Message", "string", 0),
        ],
        Kind::Deployment => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
            ("Selector", "string", 1),
        ],
        Kind::ReplicaSet => &[
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Age", "string", 0),
            ("Containers", "string", 1),
            ("Images", "string", 1),
        ],
        Kind::StatefulSet => &[
            ("Name", "string", 0),
            ("Ready", "string", 0),
            ("Age", "string", 0),
        ],
        Kind::DaemonSet => &[
            ("Name", "string", 0),
            ("Desired", "integer", 0),
            ("Current", "integer", 0),
            ("Ready", "integer", 0),
            ("Up-to-date", "integer", 0),
            ("Available", "integer", 0),
            ("Node Selector", "string", 0),
            ("Age", "string", 0),
        ],
        Kind::Job => &[
            ("Name", "string", 0),
            ("Status", "string", 0),
            ("Completions", "string", 0),
            ("Duration", "string", 0),
            ("Age", "string", 0),
        ],
        Kind::EndpointSlice => &[
            ("Name", "string", 0),
            ("AddressType", "string", 0),
            ("Ports", "string", 0),
            ("Endpoints", "string", 0),
            ("Age", "string", 0),
        ],
        Kind::Lease => &[
            ("Name", "string", 0),
            ("Holder", "string", 0),
            ("Age", "string", 0),
        ],
    }
}

fn int(obj: &Value, path: &str) -> i64 {
    field_string(obj, path).parse().unwrap_or(0)
}

fn none_if_empty(s: String) -> String {
    if s.is_empty() { "<none>".to_owned() } else { s }
}

fn container_list(obj: &Value, field: &str) -> String {
    obj.pointer("/spec/template/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .map(|c| c.get(field).and_then(Value::as_str).unwrap_or(""))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn selector_string(obj: &Value, pointer: &str) -> String {
    let map = object::string_map(obj.pointer(pointer));
    none_if_empty(
        map.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

fn pod_cells(obj: &Value) -> (String, String, i64) {
    let statuses = obj
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let total = obj
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let ready = statuses
        .iter()
        .filter(|s| s.get("ready").and_then(Value::as_bool) == Some(true))
        .count();
    let init_statuses = obj
        .pointer("/status/initContainerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let restarts: i64 = statuses
        .iter()
        .chain(&init_statuses)
        .filter_map(|s| s.get("restartCount").and_then(Value::as_i64))
        .sum();
    let mut status = field_string(obj, "status.reason");
    if status.is_empty() {
        status = field_string(obj, "status.phase");
    }
    let init_status = init_column(obj, &init_statuses);
    let initializing = init_status.is_some();
    if let Some(init) = init_status {
        status = init;
    }
    for s in statuses.iter().filter(|_| !initializing) {
        if let Some(reason) = s
            .pointer("/state/waiting/reason")
            .or_else(|| s.pointer("/state/terminated/reason"))
            .and_then(Value::as_str)
        {
            status = reason.to_owned();
        }
    }
    if !object::meta_str(obj, "deletionTimestamp").is_empty() {
        status = "Terminating".to_owned();
    }
    (format!("{ready}/{total}"), status, restarts)
}

/// kubectl's STATUS while init containers have not all finished: `Init:<reason>` for the
/// first one that failed or waits with a reason, else `Init:<done>/<total>`; `None` once
/// they have all succeeded (restartable sidecars count once started).
fn init_column(obj: &Value, init_statuses: &[Value]) -> Option<String> {
    let specs = obj
        .pointer("/spec/initContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for (i, s) in init_statuses.iter().enumerate() {
        let name = s.get("name").and_then(Value::as_str);
        let sidecar = specs.iter().any(|c| {
            c.get("name").and_then(Value::as_str) == name
                && c.get("restartPolicy").and_then(Value::as_str) == Some("Always")
        });
        let terminated = s.pointer("/state/terminated");
        let exit_code = terminated
            .and_then(|t| t.get("exitCode"))
            .and_then(Value::as_i64);
        let waiting = s
            .pointer("/state/waiting/reason")
            .and_then(Value::as_str)
            .filter(|r| !r.is_empty() && *r != "PodInitializing");
        if exit_code == Some(0) || (sidecar && s.get("started") == Some(&Value::Bool(true))) {
            continue;
        }
        if let Some(t) = terminated {
            let reason = t.get("reason").and_then(Value::as_str).unwrap_or_default();
            let signal = t.get("signal").and_then(Value::as_i64).unwrap_or(0);
            return Some(if !reason.is_empty() {
                format!("Init:{reason}")
            } else if signal != 0 {
                format!("Init:Signal:{signal}")
            } else {
                format!("Init:ExitCode:{}", exit_code.unwrap_or(0))
            });
        }
        if let Some(reason) = waiting {
            return Some(format!("Init:{reason}"));
        }
        return Some(format!("Init:{i}/{}", specs.len()));
    }
    None
}

fn service_ports(obj: &Value) -> String {
    let ports = obj.pointer("/spec/ports").and_then(Value::as_array);
    let rendered: Vec<String> = ports
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
                    let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
                    match p.get("nodePort").and_then(Value::as_i64) {
                        Some(np) if np != 0 => format!("{port}:{np}/{proto}"),
                        _ => format!("{port}/{proto}"),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    none_if_empty(rendered.join(","))
}

fn endpoints_string(obj: &Value) -> String {
    let mut out = Vec::new();
    for subset in obj
        .get("subsets")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let ports: Vec<i64> = subset
            .get("ports")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p.get("port").and_then(Value::as_i64))
                    .collect()
            })
            .unwrap_or_default();
        for addr in subset
            .get("addresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let ip = addr.get("ip").and_then(Value::as_str).unwrap_or("");
            if ports.is_empty() {
                out.push(ip.to_owned());
            }
            for port in &ports {
                out.push(format!("{ip}:{port}"));
            }
        }
    }
    none_if_empty(out.join(","))
}

fn cells(kind: Kind, obj: &Value, now: DateTime<Utc>) -> Vec<Value> {
    let name = json!(object::name(obj));
    let age = json!(human_age(object::meta_str(obj, "creationTimestamp"), now));
    let count = |field: &str| {
        obj.get(field)
            .and_then(Value::as_object)
            .map_or(0, serde_json::Map::len)
    };
    match kind {
        Kind::Namespace => vec![name, json!(field_string(obj, "status.phase")), age],
        Kind::Node => {
            let ready = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.get("type").and_then(Value::as_str) == Some("Ready"))
                })
                .and_then(|c| c.get("status").and_then(Value::as_str))
                .map_or(
                    "Unknown",
                    |s| if s == "True" { "Ready" } else { "NotReady" },
                );
            let roles: Vec<String> = object::labels(obj)
                .keys()
                .filter_map(|k| {
                    k.strip_prefix("node-role.kubernetes.io/")
                        .map(str::to_owned)
                })
                .collect();
            let ip = obj
                .pointer("/status/addresses")
                .and_then(Value::as_array)
                .and_then(|a| {
                    a.iter()
                        .find(|x| x.get("type").and_then(Value::as_str) == Some("InternalIP"))
                })
                .and_then(|x| x.get("address").and_then(Value::as_str))
                .unwrap_or("<none>");
            vec![
                name,
                json!(ready),
                json!(none_if_empty(roles.join(","))),
                age,
                json!(field_string(obj, "status.nodeInfo.kubeletVersion")),
                json!(ip),
                json!(field_string(obj, "status.nodeInfo.osImage")),
                json!(field_string(obj, "status.nodeInfo.kernelVersion")),
                json!(field_string(obj, "status.nodeInfo.containerRuntimeVersion")),
            ]
        }
        Kind::Pod => {
            let (ready, status, restarts) = pod_cells(obj);
            vec![
                name,
                json!(ready),
                json!(status),
                json!(restarts.to_string()),
                age,
                json!(none_if_empty(field_string(obj, "status.podIP"))),
                json!(none_if_empty(field_string(obj, "spec.nodeName"))),
            ]
        }
        Kind::Service => {
            let external = obj
                .pointer("/spec/externalIPs")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            vec![
                name,
                json!(field_string(obj, "spec.type")),
                json!(none_if_empty(field_string(obj, "spec.clusterIP"))),
                json!(none_if_empty(external)),
                json!(service_ports(obj)),
                age,
                json!(selector_string(obj, "/spec/selector")),
            ]
        }
        Kind::Endpoints => vec![name, json!(endpoints_string(obj)), age],
        Kind::ConfigMap => vec![name, json!(count("data") + count("binaryData")), age],
        Kind::Secret => vec![
            name,
            json!(field_string(obj, "type")),
            json!(count("data")),
            age,
        ],
        Kind::ServiceAccount => {
            let secrets = obj
                .get("secrets")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            vec![name, json!(secrets), age]
        }
        Kind::Event => {
            let last = [
                field_string(obj, "lastTimestamp"),
                field_string(obj, "eventTime"),
            ]
            .into_iter()
            .find(|s| !s.is_empty())
            .unwrap_or_else(|| object::meta_str(obj, "creationTimestamp").to_owned());
            vec![
                json!(human_age(&last, now)),
                json!(field_string(obj, "type")),
                json!(field_string(obj, "reason")),
                json!(format!(
                    "{}/{}",
                    field_string(obj, "involvedObject.kind").to_lowercase(),
                    field_string(obj, "involvedObject.name")
                )),
                json!(field_string(obj, "message")),
            ]
        }
        Kind::Deployment => vec![
            name,
            json!(format!(
                "{}/{}",
                int(obj, "status.readyReplicas"),
                int(obj, "spec.replicas")
            )),
            json!(int(obj, "status.updatedReplicas")),
            json!(int(obj, "status.availableReplicas")),
            age,
            json!(container_list(obj, "name")),
            json!(container_list(obj, "image")),
            json!(selector_string(obj, "/spec/selector/matchLabels")),
        ],
        Kind::ReplicaSet => vec![
            name,
            json!(int(obj, "spec.replicas")),
            json!(int(obj, "status.replicas")),
            json!(int(obj, "status.readyReplicas")),
            age,
            json!(container_list(obj, "name")),
            json!(container_list(obj, "image")),
        ],
        Kind::StatefulSet => vec![
            name,
            json!(format!(
                "{}/{}",
                int(obj, "status.readyReplicas"),
                int(obj, "spec.replicas")
            )),
            age,
        ],
        Kind::DaemonSet => vec![
            name,
            json!(int(obj, "status.desiredNumberScheduled")),
            json!(int(obj, "status.currentNumberScheduled")),
            json!(int(obj, "status.numberReady")),
            json!(int(obj, "status.updatedNumberScheduled")),
            json!(int(obj, "status.numberAvailable")),
            json!(selector_string(obj, "/spec/template/spec/nodeSelector")),
            age,
        ],
        Kind::Job => {
            let complete = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.get("type").and_then(Value::as_str) == Some("Complete")
                            && c.get("status").and_then(Value::as_str) == Some("True")
                    })
                });
            let status = if complete { "Complete" } else { "Running" };
            let duration = match (
                object::parse_timestamp(&field_string(obj, "status.startTime")),
                object::parse_timestamp(&field_string(obj, "status.completionTime")),
            ) {
                (Some(start), Some(end)) => object::human_duration((end - start).num_seconds()),
                (Some(start), None) => object::human_duration((now - start).num_seconds()),
                _ => String::new(),
            };
            vec![
                name,
                json!(status),
                json!(format!(
                    "{}/{}",
                    int(obj, "status.succeeded"),
                    int(obj, "spec.completions")
                )),
                json!(duration),
                age,
            ]
        }
        Kind::EndpointSlice => {
            let ports: Vec<String> = obj
                .get("ports")
                .and_then(Value::as_array)
                .map(|ps| {
                    ps.iter()
                        .filter_map(|p| p.get("port").and_then(Value::as_i64))
                        .map(|p| p.to_string())
                        .collect()
                })
                .unwrap_or_default();
            let addrs: Vec<String> = obj
                .get("endpoints")
                .and_then(Value::as_array)
                .map(|es| {
                    es.iter()
                        .flat_map(|e| {
                            e.get("addresses")
                                .and_then(Value::as_array)
                                .cloned()
                                .unwrap_or_default()
                        })
                        .filter_map(|a| a.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                name,
                json!(field_string(obj, "addressType")),
                json!(none_if_empty(ports.join(","))),
                json!(none_if_empty(addrs.join(","))),
                age,
            ]
        }
        Kind::Lease => vec![name, json!(field_string(obj, "spec.holderIdentity")), age],
    }
}

/// `includeObject` of a Table request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IncludeObject {
    None,
    Metadata,
    Object,
}

impl IncludeObject {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => IncludeObject::None,
            Some("Object") => IncludeObject::Object,
            _ => IncludeObject::Metadata,
        }
    }
}

fn row(kind: Kind, obj: &Value, include: IncludeObject, now: DateTime<Utc>) -> Value {
    let object = match include {
        IncludeObject::None => Value::Null,
        IncludeObject::Object => obj.clone(),
        IncludeObject::Metadata => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
        }),
    };
    json!({"cells": cells(kind, obj, now), "object": object})
}

/// A Table of `objects`; `list_meta` is the list's metadata (resourceVersion, continue).
pub fn table(
    kind: Kind,
    objects: &[Value],
    list_meta: Value,
    include: IncludeObject,
    headers: bool,
) -> Value {
    let now = object::now();
    let columns: Vec<Value> = if headers {
        columns(kind)
            .iter()
            .map(|(name, ty, priority)| {
                let format = if *name == "Name" { "name" } else { "" };
                json!({"name": name, "type": ty, "format": format, "description": "", "priority": priority})
            })
            .collect()
    } else {
        Vec::new()
    };
    let rows: Vec<Value> = objects.iter().map(|o| row(kind, o, include, now)).collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "columnDefinitions": columns,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_row_shows_ready_status_and_restarts() {
        let pod = json!({"metadata": {"name": "web", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"ready": true, "restartCount": 2}, {"ready": false, "restartCount": 1}]}});
        let t = table(
            Kind::Pod,
            &[pod],
            json!({"resourceVersion": "5"}),
            IncludeObject::Metadata,
            true,
        );
        assert_eq!(t["columnDefinitions"][1]["name"], "Ready");
        let cells = &t["rows"][0]["cells"];
        assert_eq!(cells[0], "web");
        assert_eq!(cells[1], "1/2");
        assert_eq!(cells[2], "Running");
        assert_eq!(cells[3], "3");
        assert_eq!(t["rows"][0]["object"]["kind"], "PartialObjectMetadata");
    }

    #[test]
    fn pod_row_shows_init_container_progress_and_failures() {
        let status_of = |init: Value| {
            let pod = json!({"metadata": {"name": "p"},
                "spec": {"initContainers": [{"name": "i1"}, {"name": "i2"}],
                    "containers": [{"name": "a"}]},
                "status": {"phase": "Pending", "initContainerStatuses": init,
                    "containerStatuses": [{"name": "a", "restartCount": 0,
                        "state": {"waiting": {"reason": "PodInitializing"}}}]}});
            let t = table(Kind::Pod, &[pod], json!({}), IncludeObject::None, true);
            (
                t["rows"][0]["cells"][2].clone(),
                t["rows"][0]["cells"][3].clone(),
            )
        };
        let done = json!({"name": "i1", "state": {"terminated": {"exitCode": 0}}});
        assert_eq!(
            status_of(json!([done, {"name": "i2", "restartCount": 3,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}}}])),
            (json!("Init:CrashLoopBackOff"), json!("3"))
        );
        assert_eq!(
            status_of(json!([{"name": "i1", "restartCount": 1,
                "state": {"terminated": {"exitCode": 1, "reason": "Error"}}}])),
            (json!("Init:Error"), json!("1"))
        );
        assert_eq!(
            status_of(json!([{"name": "i1", "state": {"terminated": {"exitCode": 2}}}])).0,
            "Init:ExitCode:2"
        );
        assert_eq!(
            status_of(json!([done, {"name": "i2", "state": {"running": {}}}])).0,
            "Init:1/2"
        );
        assert_eq!(
            status_of(json!([done, {"name": "i2", "state": {"terminated": {"exitCode": 0}}}])).0,
            "PodInitializing"
        );
    }

    #[test]
    fn every_kind_has_one_cell_per_column() {
        for r in super::super::registry::RESOURCES {
            let t = table(r.kind, &[json!({})], json!({}), IncludeObject::None, true);
            let cols = t["columnDefinitions"].as_array().map_or(0, Vec::len);
            let cells = t["rows"][0]["cells"].as_array().map_or(0, Vec::len);
            assert_eq!(cols, cells, "{}", r.kind_name);
        }
    }

    #[test]
    fn service_ports_show_node_ports() {
        let svc = json!({"spec": {"type": "NodePort", "clusterIP": "10.0.0.5",
            "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}});
        let t = table(Kind::Service, &[svc], json!({}), IncludeObject::None, false);
        assert_eq!(t["rows"][0]["cells"][4], "80:30080/TCP");
        assert_eq!(t["columnDefinitions"], json!([]));
    }
}
