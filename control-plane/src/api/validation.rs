//! Per-type defaulting and validation, on objects kept as JSON. Field paths in errors are
//! the ones upstream reports (`spec.template.spec.containers[0].image`).

use serde_json::{Map, Value, json};

use super::error::FieldError;
use super::object;
use super::registry::Kind;
use super::selectors::{self, LabelSelector};

const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case \
    alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character";
const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric \
    characters or '-', and must start and end with an alphanumeric character";
const DNS1035_LABEL: &str = "a DNS-1035 label must consist of lower case alphanumeric characters \
    or '-', start with an alphabetic character, and end with an alphanumeric character";

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_subdomain(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_label)
}

/// Checks a DNS-1123 subdomain (at most 253 bytes).
pub fn check_subdomain(field: &str, value: &str, errs: &mut Vec<FieldError>) {
    if value.len() > 253 {
        errs.push(FieldError::invalid(
            field,
            value,
            "must be no more than 253 characters",
        ));
    } else if !is_subdomain(value) {
        errs.push(FieldError::invalid(field, value, DNS1123_SUBDOMAIN));
    }
}

/// Checks a DNS-1123 label (at most 63 bytes).
pub fn check_label(field: &str, value: &str, errs: &mut Vec<FieldError>) {
    if value.len() > 63 {
        errs.push(FieldError::invalid(
            field,
            value,
            "must be no more than 63 characters",
        ));
    } else if !is_label(value) {
        errs.push(FieldError::invalid(field, value, DNS1123_LABEL));
    }
}

fn check_dns1035(field: &str, value: &str, errs: &mut Vec<FieldError>) {
    if value.len() > 63 {
        errs.push(FieldError::invalid(
            field,
            value,
            "must be no more than 63 characters",
        ));
    } else if !is_label(value) || !value.starts_with(|c: char| c.is_ascii_lowercase()) {
        errs.push(FieldError::invalid(field, value, DNS1035_LABEL));
    }
}

/// Validates an object name for `kind`.
pub fn check_name(kind: Kind, name: &str, errs: &mut Vec<FieldError>) {
    let field = "metadata.name";
    if name.is_empty() {
        errs.push(FieldError {
            reason: "FieldValueRequired",
            field: field.to_owned(),
            message: "Required value: name or generateName is required".to_owned(),
        });
        return;
    }
    match kind {
        Kind::Namespace => check_label(field, name, errs),
        Kind::Service => check_dns1035(field, name, errs),
        _ => check_subdomain(field, name, errs),
    }
}

fn check_metadata(kind: Kind, obj: &Value, errs: &mut Vec<FieldError>) {
    check_name(kind, object::name(obj), errs);
    let meta = obj.get("metadata").unwrap_or(&Value::Null);
    if let Some(labels) = meta.get("labels").and_then(Value::as_object) {
        for (k, v) in labels {
            if let Err(e) = selectors::check_label_key(k) {
                errs.push(FieldError::invalid("metadata.labels", k, &e.to_string()));
            }
            let v = v.as_str().unwrap_or("");
            if let Err(e) = selectors::check_value(v) {
                errs.push(FieldError::invalid(
                    format!("metadata.labels[{k}]"),
                    v,
                    &e.to_string(),
                ));
            }
        }
    }
    if let Some(annotations) = meta.get("annotations").and_then(Value::as_object) {
        let total: usize = annotations
            .iter()
            .map(|(k, v)| k.len() + v.as_str().map_or(0, str::len))
            .sum();
        if total > 256 * 1024 {
            errs.push(FieldError::too_long("metadata.annotations", 256 * 1024));
        }
        for k in annotations.keys() {
            if let Err(e) = selectors::check_label_key(k) {
                errs.push(FieldError::invalid(
                    "metadata.annotations",
                    k,
                    &e.to_string(),
                ));
            }
        }
    }
}

fn set_default(obj: &mut Map<String, Value>, key: &str, value: Value) {
    if obj.get(key).is_none_or(Value::is_null) {
        obj.insert(key.to_owned(), value);
    }
}

fn object_at<'a>(value: &'a mut Value, key: &str) -> Option<&'a mut Map<String, Value>> {
    let map = value.as_object_mut()?;
    let entry = map.entry(key).or_insert_with(|| json!({}));
    if entry.is_null() {
        *entry = json!({});
    }
    entry.as_object_mut()
}

fn default_containers(spec: &mut Map<String, Value>, key: &str) {
    let Some(Value::Array(containers)) = spec.get_mut(key) else {
        return;
    };
    for c in containers.iter_mut().filter_map(Value::as_object_mut) {
        let image = c.get("image").and_then(Value::as_str).unwrap_or("");
        let last = image.rsplit('/').next().unwrap_or("");
        let policy = if image.contains('@') {
            "IfNotPresent"
        } else if !last.contains(':') || last.ends_with(":latest") {
            "Always"
        } else {
            "IfNotPresent"
        };
        set_default(c, "imagePullPolicy", json!(policy));
        set_default(c, "terminationMessagePath", json!("/dev/termination-log"));
        set_default(c, "terminationMessagePolicy", json!("File"));
        set_default(c, "resources", json!({}));
        if let Some(Value::Array(ports)) = c.get_mut("ports") {
            for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                set_default(p, "protocol", json!("TCP"));
            }
        }
    }
}

fn default_pod_spec(spec: &mut Map<String, Value>) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", json!(true));
    let sa = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .or_else(|| spec.get("serviceAccount").and_then(Value::as_str))
        .unwrap_or("default")
        .to_owned();
    set_default(spec, "serviceAccountName", json!(sa));
    set_default(spec, "serviceAccount", json!(sa));
    default_containers(spec, "containers");
    default_containers(spec, "initContainers");
}

fn default_template(spec: &mut Value) {
    if let Some(template) = spec.get_mut("template")
        && let Some(pod_spec) = object_at(template, "spec")
    {
        default_pod_spec(pod_spec);
    }
}

/// A Secret's write-only `stringData` goes into `data`, base64-encoded, winning over a key
/// of the same name, as upstream does on every write; `stringData` is never stored.
fn merge_string_data(secret: &mut Map<String, Value>) {
    let all_strings = secret
        .get("stringData")
        .and_then(Value::as_object)
        .is_some_and(|m| m.values().all(Value::is_string));
    let data_ok = secret
        .get("data")
        .is_none_or(|d| d.is_null() || d.is_object());
    if !all_strings || !data_ok {
        return;
    }
    let Some(Value::Object(strings)) = secret.remove("stringData") else {
        return;
    };
    let data = secret.entry("data").or_insert_with(|| json!({}));
    if data.is_null() {
        *data = json!({});
    }
    if let Some(data) = data.as_object_mut() {
        for (key, value) in strings {
            let text = value.as_str().unwrap_or_default();
            data.insert(key, json!(crate::certs::base64(text.as_bytes())));
        }
    }
}

/// Fills the fields upstream defaults; runs before validation on create and update.
pub fn default(kind: Kind, obj: &mut Value) {
    match kind {
        Kind::Namespace => {
            let name = object::name(obj).to_owned();
            let meta = object::metadata_mut(obj);
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            if labels.is_null() {
                *labels = json!({});
            }
            if let Some(labels) = labels.as_object_mut() {
                labels.insert("kubernetes.io/metadata.name".into(), json!(name));
            }
            if let Some(spec) = object_at(obj, "spec") {
                set_default(spec, "finalizers", json!(["kubernetes"]));
            }
            if let Some(status) = object_at(obj, "status") {
                set_default(status, "phase", json!("Active"));
            }
        }
        Kind::Pod => {
            if let Some(spec) = object_at(obj, "spec") {
                default_pod_spec(spec);
            }
            if let Some(status) = object_at(obj, "status") {
                set_default(status, "phase", json!("Pending"));
                set_default(status, "qosClass", json!("BestEffort"));
            }
        }
        Kind::Service => {
            if let Some(spec) = object_at(obj, "spec") {
                set_default(spec, "type", json!("ClusterIP"));
                set_default(spec, "sessionAffinity", json!("None"));
                let ty = spec
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                if ty != "ExternalName" {
                    set_default(spec, "ipFamilies", json!(["IPv4"]));
                    set_default(spec, "ipFamilyPolicy", json!("SingleStack"));
                    set_default(spec, "internalTrafficPolicy", json!("Cluster"));
                }
                if ty == "NodePort" || ty == "LoadBalancer" {
                    set_default(spec, "externalTrafficPolicy", json!("Cluster"));
                }
                if let Some(Value::Array(ports)) = spec.get_mut("ports") {
                    for p in ports.iter_mut().filter_map(Value::as_object_mut) {
                        set_default(p, "protocol", json!("TCP"));
                        if let Some(port) = p.get("port").cloned() {
                            set_default(p, "targetPort", port);
                        }
                    }
                }
            }
            if let Some(status) = object_at(obj, "status") {
                set_default(status, "loadBalancer", json!({}));
            }
        }
        Kind::Secret => {
            if let Some(map) = obj.as_object_mut() {
                set_default(map, "type", json!("Opaque"));
                merge_string_data(map);
            }
        }
        Kind::Deployment => {
            if let Some(spec) = object_at(obj, "spec") {
                set_default(spec, "replicas", json!(1));
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(spec, "progressDeadlineSeconds", json!(600));
                set_default(
                    spec,
                    "strategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}),
                );
            }
            if let Some(spec) = obj.get_mut("spec") {
                default_template(spec);
            }
        }
        Kind::ReplicaSet => {
            if let Some(spec) = object_at(obj, "spec") {
                set_default(spec, "replicas", json!(1));
            }
            if let Some(spec) = obj.get_mut("spec") {
                default_template(spec);
            }
        }
        Kind::StatefulSet => {
            if let Some(spec) = object_at(obj, "spec") {
                set_default(spec, "replicas", json!(1));
                set_default(spec, "podManagementPolicy", json!("OrderedReady"));
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(
                    spec,
                    "updateStrategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}),
                );
            }
            if let Some(spec) = obj.get_mut("spec") {
                default_template(spec);
            }
        }
        Kind::DaemonSet => {
            if let Some(spec) = object_at(obj, "spec") {
                set_default(spec, "revisionHistoryLimit", json!(10));
                set_default(
                    spec,
                    "updateStrategy",
                    json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}}),
                );
            }
            if let Some(spec) = obj.get_mut("spec") {
                default_template(spec);
            }
        }
        Kind::Job => {
            let uid = object::meta_str(obj, "uid").to_owned();
            if let Some(spec) = object_at(obj, "spec") {
                set_default(spec, "parallelism", json!(1));
                set_default(spec, "backoffLimit", json!(6));
                set_default(spec, "completionMode", json!("NonIndexed"));
                set_default(spec, "suspend", json!(false));
                if spec.get("completions").is_none() {
                    spec.insert("completions".into(), json!(1));
                }
                let manual = spec.get("manualSelector").and_then(Value::as_bool) == Some(true);
                if !manual && spec.get("selector").is_none() && !uid.is_empty() {
                    spec.insert(
                        "selector".into(),
                        json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
                    );
                    if let Some(template) = spec.get_mut("template")
                        && let Some(meta) = object_at(template, "metadata")
                        && let Some(labels) = meta
                            .entry("labels")
                            .or_insert_with(|| json!({}))
                            .as_object_mut()
                    {
                        labels.insert("batch.kubernetes.io/controller-uid".into(), json!(uid));
                    }
                }
            }
            if let Some(spec) = obj.get_mut("spec") {
                default_template(spec);
            }
        }
        Kind::Node | Kind::Endpoints | Kind::ConfigMap | Kind::ServiceAccount | Kind::Event => {}
        Kind::EndpointSlice | Kind::Lease => {}
    }
}

fn check_containers(
    spec: &Value,
    path: &str,
    key: &str,
    required: bool,
    errs: &mut Vec<FieldError>,
) {
    let containers = spec.get(key).and_then(Value::as_array);
    let Some(containers) = containers.filter(|c| !c.is_empty()) else {
        if required {
            errs.push(FieldError::required(format!("{path}.{key}")));
        }
        return;
    };
    let mut names = Vec::new();
    for (i, c) in containers.iter().enumerate() {
        let at = format!("{path}.{key}[{i}]");
        let name = c.get("name").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() {
            errs.push(FieldError::required(format!("{at}.name")));
        } else {
            check_label(&format!("{at}.name"), name, errs);
            if names.contains(&name) {
                errs.push(FieldError::duplicate(format!("{at}.name"), name));
            }
            names.push(name);
        }
        if c.get("image")
            .and_then(Value::as_str)
            .unwrap_or("")
            .trim()
            .is_empty()
        {
            errs.push(FieldError::required(format!("{at}.image")));
        }
        if let Some(ports) = c.get("ports").and_then(Value::as_array) {
            for (j, p) in ports.iter().enumerate() {
                let port = p.get("containerPort").and_then(Value::as_i64).unwrap_or(0);
                if !(1..=65535).contains(&port) {
                    errs.push(FieldError::invalid(
                        format!("{at}.ports[{j}].containerPort"),
                        &port.to_string(),
                        "must be between 1 and 65535, inclusive",
                    ));
                }
            }
        }
        if let Some(policy) = c.get("imagePullPolicy").and_then(Value::as_str) {
            let ok = ["Always", "IfNotPresent", "Never"];
            if !ok.contains(&policy) {
                errs.push(FieldError::not_supported(
                    format!("{at}.imagePullPolicy"),
                    policy,
                    &ok,
                ));
            }
        }
    }
}

fn check_pod_spec(spec: Option<&Value>, path: &str, restart: &[&str], errs: &mut Vec<FieldError>) {
    let Some(spec) = spec.filter(|s| s.is_object()) else {
        errs.push(FieldError::required(path));
        return;
    };
    check_containers(spec, path, "containers", true, errs);
    check_containers(spec, path, "initContainers", false, errs);
    if let Some(policy) = spec.get("restartPolicy").and_then(Value::as_str)
        && !restart.contains(&policy)
    {
        errs.push(FieldError::not_supported(
            format!("{path}.restartPolicy"),
            policy,
            restart,
        ));
    }
    if let Some(policy) = spec.get("dnsPolicy").and_then(Value::as_str) {
        let ok = ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"];
        if !ok.contains(&policy) {
            errs.push(FieldError::not_supported(
                format!("{path}.dnsPolicy"),
                policy,
                &ok,
            ));
        }
    }
    if let Some(grace) = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_i64)
        && grace < 0
    {
        errs.push(FieldError::invalid(
            format!("{path}.terminationGracePeriodSeconds"),
            &grace.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    if let Some(volumes) = spec.get("volumes").and_then(Value::as_array) {
        let mut names = Vec::new();
        for (i, v) in volumes.iter().enumerate() {
            let name = v.get("name").and_then(Value::as_str).unwrap_or("");
            let field = format!("{path}.volumes[{i}].name");
            if name.is_empty() {
                errs.push(FieldError::required(field));
            } else if names.contains(&name) {
                errs.push(FieldError::duplicate(field, name));
            } else {
                check_label(&field, name, errs);
                names.push(name);
            }
        }
    }
}

/// Parses `spec.selector` (a `LabelSelector` object) into requirements we can match.
pub fn selector_from_spec(selector: &Value) -> Option<LabelSelector> {
    use super::selectors::Requirement;
    let mut reqs = Vec::new();
    for (k, v) in object::string_map(selector.get("matchLabels")) {
        reqs.push(Requirement::Equals(k, v));
    }
    let empty = Vec::new();
    let exprs = selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for expr in exprs {
        let key = expr.get("key").and_then(Value::as_str)?.to_owned();
        let values: Vec<String> = expr
            .get("values")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        reqs.push(match expr.get("operator").and_then(Value::as_str)? {
            "In" => Requirement::In(key, values),
            "NotIn" => Requirement::NotIn(key, values),
            "Exists" => Requirement::Exists(key),
            "DoesNotExist" => Requirement::NotExists(key),
            _ => return None,
        });
    }
    Some(LabelSelector(reqs))
}

fn check_workload(obj: &Value, restart: &[&str], needs_selector: bool, errs: &mut Vec<FieldError>) {
    let Some(spec) = obj.get("spec").filter(|s| s.is_object()) else {
        errs.push(FieldError::required("spec"));
        return;
    };
    if let Some(replicas) = spec.get("replicas").and_then(Value::as_i64)
        && replicas < 0
    {
        errs.push(FieldError::invalid(
            "spec.replicas",
            &replicas.to_string(),
            "must be greater than or equal to 0",
        ));
    }
    let template_labels = object::string_map(
        spec.get("template")
            .and_then(|t| t.get("metadata"))
            .and_then(|m| m.get("labels")),
    );
    match spec.get("selector") {
        None if needs_selector => errs.push(FieldError::required("spec.selector")),
        None => {}
        Some(selector) => match selector_from_spec(selector) {
            None => errs.push(FieldError::invalid(
                "spec.selector",
                &selector.to_string(),
                "invalid label selector",
            )),
            Some(sel) if sel.0.is_empty() => errs.push(FieldError::invalid(
                "spec.selector",
                &selector.to_string(),
                "empty selector is invalid for deployment",
            )),
            Some(sel) if !sel.matches(&template_labels) => errs.push(FieldError::invalid(
                "spec.template.metadata.labels",
                &format!("{template_labels:?}"),
                "`selector` does not match template `labels`",
            )),
            Some(_) => {}
        },
    }
    check_pod_spec(
        spec.get("template").and_then(|t| t.get("spec")),
        "spec.template.spec",
        restart,
        errs,
    );
}

fn check_data_keys(obj: &Value, field: &str, errs: &mut Vec<FieldError>) {
    if let Some(data) = obj.get(field).and_then(Value::as_object) {
        for key in data.keys() {
            let ok = !key.is_empty()
                && key.len() <= 253
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                errs.push(FieldError::invalid(
                    format!("{field}[{key}]"),
                    key,
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                ));
            }
        }
    }
}

fn check_service(obj: &Value, errs: &mut Vec<FieldError>) {
    let spec = obj.get("spec").unwrap_or(&Value::Null);
    let types = ["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
    let ty = spec
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("ClusterIP");
    if !types.contains(&ty) {
        errs.push(FieldError::not_supported("spec.type", ty, &types));
    }
    let ports = spec
        .get("ports")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if ports.is_empty()
        && ty != "ExternalName"
        && spec.get("clusterIP").and_then(Value::as_str) != Some("None")
    {
        errs.push(FieldError::required("spec.ports"));
    }
    let mut names = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        if !(1..=65535).contains(&port) {
            errs.push(FieldError::invalid(
                format!("{at}.port"),
                &port.to_string(),
                "must be between 1 and 65535, inclusive",
            ));
        }
        let name = p.get("name").and_then(Value::as_str).unwrap_or("");
        if ports.len() > 1 && name.is_empty() {
            errs.push(FieldError::required(format!("{at}.name")));
        }
        if !name.is_empty() {
            if names.contains(&name) {
                errs.push(FieldError::duplicate(format!("{at}.name"), name));
            }
            names.push(name);
        }
        let protocols = ["TCP", "UDP", "SCTP"];
        let protocol = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
        if !protocols.contains(&protocol) {
            errs.push(FieldError::not_supported(
                format!("{at}.protocol"),
                protocol,
                &protocols,
            ));
        }
        if let Some(node_port) = p.get("nodePort").and_then(Value::as_i64) {
            if ty == "ClusterIP" && node_port != 0 {
                errs.push(FieldError::forbidden(
                    format!("{at}.nodePort"),
                    "may not be used when `type` is 'ClusterIP'",
                ));
            } else if node_port != 0 && !(30000..=32767).contains(&node_port) {
                errs.push(FieldError::invalid(
                    format!("{at}.nodePort"),
                    &node_port.to_string(),
                    "provided port is not in the valid range. The range of valid ports is 30000-32767",
                ));
            }
        }
    }
}

/// Validates a whole object of `kind` (create and update alike).
pub fn validate(kind: Kind, obj: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    check_metadata(kind, obj, &mut errs);
    let always = ["Always", "OnFailure", "Never"];
    match kind {
        Kind::Pod => check_pod_spec(obj.get("spec"), "spec", &always, &mut errs),
        Kind::Deployment | Kind::ReplicaSet | Kind::StatefulSet | Kind::DaemonSet => {
            check_workload(obj, &["Always"], true, &mut errs);
        }
        Kind::Job => check_workload(obj, &["OnFailure", "Never"], false, &mut errs),
        Kind::Service => check_service(obj, &mut errs),
        Kind::ConfigMap => {
            check_data_keys(obj, "data", &mut errs);
            check_data_keys(obj, "binaryData", &mut errs);
        }
        Kind::Secret => {
            check_data_keys(obj, "data", &mut errs);
            check_data_keys(obj, "stringData", &mut errs);
        }
        Kind::EndpointSlice => {
            let types = ["IPv4", "IPv6", "FQDN"];
            match obj.get("addressType").and_then(Value::as_str) {
                None => errs.push(FieldError::required("addressType")),
                Some(t) if !types.contains(&t) => {
                    errs.push(FieldError::not_supported("addressType", t, &types));
                }
                Some(_) => {}
            }
        }
        Kind::Event => {
            if obj.get("involvedObject").is_none() {
                errs.push(FieldError::required("involvedObject"));
            }
        }
        Kind::Namespace | Kind::Node | Kind::Endpoints | Kind::ServiceAccount | Kind::Lease => {}
    }
    errs
}

fn immutable(field: &str, old: Option<&Value>, new: Option<&Value>, errs: &mut Vec<FieldError>) {
    if old != new {
        let shown = new.map_or_else(|| "null".to_owned(), Value::to_string);
        errs.push(FieldError::invalid(field, &shown, "field is immutable"));
    }
}

/// The pod spec with the fields a pod update may change blanked out.
fn pod_spec_fixed_part(spec: Option<&Value>) -> Value {
    let mut spec = spec.cloned().unwrap_or(Value::Null);
    if let Some(map) = spec.as_object_mut() {
        map.remove("activeDeadlineSeconds");
        map.remove("tolerations");
        map.remove("terminationGracePeriodSeconds");
        for key in ["containers", "initContainers"] {
            if let Some(Value::Array(cs)) = map.get_mut(key) {
                for c in cs.iter_mut().filter_map(Value::as_object_mut) {
                    c.remove("image");
                }
            }
        }
    }
    spec
}

/// The rules only an update has: fields that may not change.
pub fn validate_update(kind: Kind, old: &Value, new: &Value) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let at = |v: &'_ Value, path: &str| -> Option<Value> {
        let mut cur = v;
        for p in path.split('.') {
            cur = cur.get(p)?;
        }
        Some(cur.clone())
    };
    match kind {
        Kind::Deployment | Kind::ReplicaSet | Kind::StatefulSet | Kind::DaemonSet | Kind::Job => {
            immutable(
                "spec.selector",
                at(old, "spec.selector").as_ref(),
                at(new, "spec.selector").as_ref(),
                &mut errs,
            );
        }
        Kind::Service => {
            let old_ip = at(old, "spec.clusterIP");
            let new_ip = at(new, "spec.clusterIP");
            if new_ip
                .as_ref()
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
            {
                immutable(
                    "spec.clusterIP",
                    old_ip.as_ref(),
                    new_ip.as_ref(),
                    &mut errs,
                );
            }
        }
        Kind::Pod
            if pod_spec_fixed_part(old.get("spec")) != pod_spec_fixed_part(new.get("spec")) =>
        {
            let old_node = at(old, "spec.nodeName");
            let new_node = at(new, "spec.nodeName");
            if old_node != new_node && old_node.is_some() {
                immutable(
                    "spec.nodeName",
                    old_node.as_ref(),
                    new_node.as_ref(),
                    &mut errs,
                );
            } else {
                errs.push(FieldError::forbidden(
                    "spec",
                    "pod updates may not change fields other than `spec.containers[*].image`, \
                     `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, \
                     `spec.tolerations` (only additions to existing tolerations) or \
                     `spec.terminationGracePeriodSeconds`",
                ));
            }
        }
        _ => {}
    }
    errs
}

#[cfg(test)]
mod tests {
    #[test]
    fn secret_string_data_is_stored_as_base64_data() {
        let mut secret = serde_json::json!({
            "metadata": {"name": "s"},
            "data": {"a": "b2xk", "keep": "eA=="},
            "stringData": {"a": "new", "plain": "hello"},
        });
        default(Kind::Secret, &mut secret);
        assert!(secret.get("stringData").is_none(), "{secret}");
        assert_eq!(
            secret["data"],
            serde_json::json!({"a": "bmV3", "keep": "eA==", "plain": "aGVsbG8="})
        );
        assert_eq!(secret["type"], "Opaque");
    }

    use super::*;

    fn pod(spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": spec})
    }

    fn fields(errs: &[FieldError]) -> Vec<&str> {
        errs.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn pod_without_containers_is_invalid_at_spec_containers() {
        let errs = validate(Kind::Pod, &pod(json!({"containers": []})));
        assert_eq!(fields(&errs), ["spec.containers"]);
    }

    #[test]
    fn container_errors_carry_their_index() {
        let errs = validate(
            Kind::Pod,
            &pod(
                json!({"containers": [{"name": "a", "image": "x"}, {"name": "a"}, {"name": "B_", "image": "y"}]}),
            ),
        );
        assert_eq!(
            fields(&errs),
            [
                "spec.containers[1].name",
                "spec.containers[1].image",
                "spec.containers[2].name"
            ]
        );
    }

    #[test]
    fn names_are_checked_per_kind() {
        let mut errs = Vec::new();
        check_name(Kind::ConfigMap, "a.b-c", &mut errs);
        check_name(Kind::Namespace, "ok-ns", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        check_name(Kind::Namespace, "a.b", &mut errs);
        check_name(Kind::Service, "1abc", &mut errs);
        check_name(Kind::ConfigMap, &"a".repeat(254), &mut errs);
        check_name(Kind::Pod, "Upper", &mut errs);
        assert_eq!(errs.len(), 4);
        assert!(errs[2].message.contains("no more than 253"));
    }

    #[test]
    fn deployment_template_must_match_selector() {
        let d = json!({"metadata": {"name": "d"}, "spec": {
            "selector": {"matchLabels": {"app": "a"}},
            "template": {"metadata": {"labels": {"app": "b"}},
                "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
        let errs = validate(Kind::Deployment, &d);
        assert_eq!(fields(&errs), ["spec.template.metadata.labels"]);
    }

    #[test]
    fn defaults_fill_pod_template_and_service_ports() {
        let mut d = json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": {
            "containers": [{"name": "c", "image": "busybox"}]}}}});
        default(Kind::Deployment, &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["imagePullPolicy"], "Always");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");

        let mut s = json!({"metadata": {"name": "s"}, "spec": {"ports": [{"port": 80}]}});
        default(Kind::Service, &mut s);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["type"], "ClusterIP");
    }

    #[test]
    fn immutable_fields_are_reported_on_update() {
        let old = json!({"spec": {"selector": {"matchLabels": {"a": "1"}}}});
        let new = json!({"spec": {"selector": {"matchLabels": {"a": "2"}}}});
        let errs = validate_update(Kind::Deployment, &old, &new);
        assert_eq!(fields(&errs), ["spec.selector"]);

        let p1 = pod(json!({"containers": [{"name": "a", "image": "x:1"}]}));
        let p2 = pod(json!({"containers": [{"name": "a", "image": "x:2"}]}));
        assert!(validate_update(Kind::Pod, &p1, &p2).is_empty());
        let p3 = pod(json!({"containers": [{"name": "b", "image": "x:1"}]}));
        assert_eq!(fields(&validate_update(Kind::Pod, &p1, &p3)), ["spec"]);
    }

    #[test]
    fn bad_labels_are_invalid() {
        let obj =
            json!({"metadata": {"name": "x", "labels": {"bad key": "v", "ok": "bad value!"}}});
        let errs = validate(Kind::ConfigMap, &obj);
        assert_eq!(errs.len(), 2, "{errs:?}");
    }
}
