//! Request bodies in Kubernetes' protobuf encoding, as kubectl's typed clients send them
//! (`kubectl create namespace|configmap|secret|deployment|service|token`, `kubectl run`,
//! `kubectl expose`), turned into the JSON the rest of the server works on.
//!
//! The envelope is the 4-byte magic `k8s\0` and a `runtime.Unknown` message whose
//! `typeMeta` names the kind and whose `raw` holds the object. The objects are decoded with
//! a table of upstream's message field numbers; a field this table does not know is skipped
//! and reported, never guessed at.

use serde_json::{Map, Value, json};

use super::error::ApiError;

/// How a field's bytes become JSON.
#[derive(Clone, Copy)]
enum Ty {
    Str,
    Int,
    Bool,
    Msg(&'static str),
    /// `map<string,string>`.
    MapStr,
    /// `map<string,bytes>`.
    MapBytes,
    /// `map<string,Quantity>`.
    MapQuantity,
    Time,
    IntOrString,
    /// Known, and not taken from a request (`selfLink`, `status`).
    Ignore,
}

struct Field {
    num: u64,
    name: &'static str,
    ty: Ty,
    repeated: bool,
}

const fn f(num: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        num,
        name,
        ty,
        repeated: false,
    }
}

const fn list(num: u64, name: &'static str, ty: Ty) -> Field {
    Field {
        num,
        name,
        ty,
        repeated: true,
    }
}

fn fields(message: &str) -> &'static [Field] {
    use Ty::*;
    match message {
        "ObjectMeta" => {
            const T: &[Field] = &[
                f(1, "name", Str),
                f(2, "generateName", Str),
                f(3, "namespace", Str),
                f(4, "selfLink", Ignore),
                f(5, "uid", Str),
                f(6, "resourceVersion", Str),
                f(7, "generation", Int),
                f(8, "creationTimestamp", Time),
                f(11, "labels", MapStr),
                f(12, "annotations", MapStr),
                list(14, "finalizers", Str),
            ];
            T
        }
        "LabelSelector" => {
            const T: &[Field] = &[
                f(1, "matchLabels", MapStr),
                list(2, "matchExpressions", Msg("LabelSelectorRequirement")),
            ];
            T
        }
        "LabelSelectorRequirement" => {
            const T: &[Field] = &[
                f(1, "key", Str),
                f(2, "operator", Str),
                list(3, "values", Str),
            ];
            T
        }
        "Namespace" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "spec", Msg("NamespaceSpec")),
                f(3, "status", Ignore),
            ];
            T
        }
        "NamespaceSpec" => {
            const T: &[Field] = &[list(1, "finalizers", Str)];
            T
        }
        "ConfigMap" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "data", MapStr),
                f(3, "binaryData", MapBytes),
                f(4, "immutable", Bool),
            ];
            T
        }
        "Secret" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "data", MapBytes),
                f(3, "type", Str),
                f(4, "stringData", MapStr),
                f(5, "immutable", Bool),
            ];
            T
        }
        "ServiceAccount" => {
            const T: &[Field] = &[f(1, "metadata", Msg("ObjectMeta"))];
            T
        }
        "Pod" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "spec", Msg("PodSpec")),
                f(3, "status", Ignore),
            ];
            T
        }
        "PodTemplateSpec" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "spec", Msg("PodSpec")),
                f(3, "status", Ignore),
            ];
            T
        }
        "PodSpec" => {
            const T: &[Field] = &[
                list(2, "containers", Msg("Container")),
                f(3, "restartPolicy", Str),
                f(4, "terminationGracePeriodSeconds", Int),
                f(5, "activeDeadlineSeconds", Int),
                f(6, "dnsPolicy", Str),
                f(7, "nodeSelector", MapStr),
                f(8, "serviceAccountName", Str),
                f(9, "serviceAccount", Str),
                f(10, "nodeName", Str),
                f(11, "hostNetwork", Bool),
                f(12, "hostPID", Bool),
                f(13, "hostIPC", Bool),
                f(16, "hostname", Str),
                f(17, "subdomain", Str),
                f(19, "schedulerName", Str),
                list(20, "initContainers", Msg("Container")),
                f(24, "priorityClassName", Str),
            ];
            T
        }
        "Container" => {
            const T: &[Field] = &[
                f(1, "name", Str),
                f(2, "image", Str),
                list(3, "command", Str),
                list(4, "args", Str),
                f(5, "workingDir", Str),
                list(6, "ports", Msg("ContainerPort")),
                list(7, "env", Msg("EnvVar")),
                f(8, "resources", Msg("ResourceRequirements")),
                f(13, "terminationMessagePath", Str),
                f(14, "imagePullPolicy", Str),
                f(16, "stdin", Bool),
                f(17, "stdinOnce", Bool),
                f(18, "tty", Bool),
                f(20, "terminationMessagePolicy", Str),
                f(24, "restartPolicy", Str),
            ];
            T
        }
        "ContainerPort" => {
            const T: &[Field] = &[
                f(1, "name", Str),
                f(2, "hostPort", Int),
                f(3, "containerPort", Int),
                f(4, "protocol", Str),
                f(5, "hostIP", Str),
            ];
            T
        }
        "EnvVar" => {
            const T: &[Field] = &[f(1, "name", Str), f(2, "value", Str)];
            T
        }
        "ResourceRequirements" => {
            const T: &[Field] = &[f(1, "limits", MapQuantity), f(2, "requests", MapQuantity)];
            T
        }
        "Deployment" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "spec", Msg("DeploymentSpec")),
                f(3, "status", Ignore),
            ];
            T
        }
        "DeploymentSpec" => {
            const T: &[Field] = &[
                f(1, "replicas", Int),
                f(2, "selector", Msg("LabelSelector")),
                f(3, "template", Msg("PodTemplateSpec")),
                f(4, "strategy", Msg("DeploymentStrategy")),
                f(5, "minReadySeconds", Int),
                f(6, "revisionHistoryLimit", Int),
                f(7, "paused", Bool),
                f(9, "progressDeadlineSeconds", Int),
            ];
            T
        }
        "Job" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "spec", Msg("JobSpec")),
                f(3, "status", Ignore),
            ];
            T
        }
        "JobSpec" => {
            const T: &[Field] = &[
                f(1, "parallelism", Int),
                f(2, "completions", Int),
                f(3, "activeDeadlineSeconds", Int),
                f(4, "selector", Msg("LabelSelector")),
                f(5, "manualSelector", Bool),
                f(6, "template", Msg("PodTemplateSpec")),
                f(7, "backoffLimit", Int),
            ];
            T
        }
        "Service" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "spec", Msg("ServiceSpec")),
                f(3, "status", Ignore),
            ];
            T
        }
        "ServiceSpec" => {
            const T: &[Field] = &[
                list(1, "ports", Msg("ServicePort")),
                f(2, "selector", MapStr),
                f(3, "clusterIP", Str),
                f(4, "type", Str),
                list(5, "externalIPs", Str),
                f(7, "sessionAffinity", Str),
                f(8, "loadBalancerIP", Str),
                f(10, "externalName", Str),
                f(11, "externalTrafficPolicy", Str),
                f(12, "healthCheckNodePort", Int),
                f(13, "publishNotReadyAddresses", Bool),
            ];
            T
        }
        "ServicePort" => {
            const T: &[Field] = &[
                f(1, "name", Str),
                f(2, "protocol", Str),
                f(3, "port", Int),
                f(4, "targetPort", IntOrString),
                f(5, "nodePort", Int),
            ];
            T
        }
        "DeploymentStrategy" => {
            const T: &[Field] = &[f(1, "type", Str)];
            T
        }
        // `kubectl create token`.
        "TokenRequest" => {
            const T: &[Field] = &[
                f(1, "metadata", Msg("ObjectMeta")),
                f(2, "spec", Msg("TokenRequestSpec")),
                f(3, "status", Ignore),
            ];
            T
        }
        "TokenRequestSpec" => {
            const T: &[Field] = &[
                list(1, "audiences", Str),
                f(3, "boundObjectRef", Msg("BoundObjectReference")),
                f(4, "expirationSeconds", Int),
            ];
            T
        }
        "BoundObjectReference" => {
            const T: &[Field] = &[
                f(1, "kind", Str),
                f(2, "apiVersion", Str),
                f(3, "name", Str),
                f(4, "uid", Str),
            ];
            T
        }
        _ => &[],
    }
}

/// Fields whose zero value means something (Go pointers), kept when zero.
const KEEP_ZERO: &[&str] = &["replicas", "parallelism", "completions", "backoffLimit"];

struct Reader<'a> {
    buf: &'a [u8],
}

fn bad(why: &str) -> ApiError {
    ApiError::BadRequest(format!("error decoding protobuf body: {why}"))
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self
                .buf
                .split_first()
                .ok_or_else(|| bad("truncated varint"))?;
            self.buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad("varint too long"))
    }

    fn bytes(&mut self) -> Result<&'a [u8], ApiError> {
        let len = usize::try_from(self.varint()?).map_err(|_| bad("length too large"))?;
        if len > self.buf.len() {
            return Err(bad("length past the end"));
        }
        let (head, rest) = self.buf.split_at(len);
        self.buf = rest;
        Ok(head)
    }

    fn skip(&mut self, wire: u64) -> Result<(), ApiError> {
        let n = match wire {
            0 => {
                self.varint()?;
                0
            }
            1 => 8,
            2 => {
                self.bytes()?;
                0
            }
            5 => 4,
            other => return Err(bad(&format!("unsupported wire type {other}"))),
        };
        if n > self.buf.len() {
            return Err(bad("truncated fixed-size field"));
        }
        self.buf = &self.buf[n..];
        Ok(())
    }

    /// Next `(field number, wire type)`, or `None` at the end.
    fn key(&mut self) -> Result<Option<(u64, u64)>, ApiError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        Ok(Some((key >> 3, key & 7)))
    }
}

fn text(bytes: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| bad("string is not UTF-8"))
}

/// The `(key, value)` of one map entry message.
fn map_entry(bytes: &[u8]) -> Result<(String, &[u8]), ApiError> {
    let mut r = Reader { buf: bytes };
    let (mut key, mut value): (String, &[u8]) = (String::new(), &[]);
    while let Some((num, wire)) = r.key()? {
        match (num, wire) {
            (1, 2) => key = text(r.bytes()?)?,
            (2, 2) => value = r.bytes()?,
            _ => r.skip(wire)?,
        }
    }
    Ok((key, value))
}

fn time(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut r = Reader { buf: bytes };
    let mut seconds = 0i64;
    while let Some((num, wire)) = r.key()? {
        match (num, wire) {
            (1, 0) => seconds = r.varint()?.cast_signed(),
            _ => r.skip(wire)?,
        }
    }
    if seconds == 0 {
        return Ok(Value::Null);
    }
    let t = chrono::DateTime::from_timestamp(seconds, 0).ok_or_else(|| bad("time out of range"))?;
    Ok(json!(super::object::timestamp(t)))
}

fn int_or_string(bytes: &[u8]) -> Result<Value, ApiError> {
    let mut r = Reader { buf: bytes };
    let (mut kind, mut int, mut string) = (0, 0i64, String::new());
    while let Some((num, wire)) = r.key()? {
        match (num, wire) {
            (1, 0) => kind = r.varint()?,
            (2, 0) => int = i64::from(r.varint()?.cast_signed() as i32),
            (3, 2) => string = text(r.bytes()?)?,
            _ => r.skip(wire)?,
        }
    }
    Ok(if kind == 1 { json!(string) } else { json!(int) })
}

fn message(
    name: &str,
    bytes: &[u8],
    path: &str,
    skipped: &mut Vec<String>,
) -> Result<Value, ApiError> {
    let table = fields(name);
    let mut out = Map::new();
    let mut r = Reader { buf: bytes };
    while let Some((num, wire)) = r.key()? {
        let Some(field) = table.iter().find(|f| f.num == num) else {
            skipped.push(format!("{path}#{num}"));
            r.skip(wire)?;
            continue;
        };
        let at = format!(
            "{path}{}{}",
            if path.is_empty() { "" } else { "." },
            field.name
        );
        let value = match (field.ty, wire) {
            (Ty::Int, 0) => {
                let v = r.varint()?.cast_signed();
                // int32 fields arrive sign-extended to 64 bits; int64 fields as they are.
                json!(v)
            }
            (Ty::Bool, 0) => json!(r.varint()? != 0),
            (Ty::Str, 2) => json!(text(r.bytes()?)?),
            (Ty::Msg(inner), 2) => message(inner, r.bytes()?, &at, skipped)?,
            (Ty::Time, 2) => time(r.bytes()?)?,
            (Ty::IntOrString, 2) => int_or_string(r.bytes()?)?,
            (Ty::Ignore, _) => {
                r.skip(wire)?;
                continue;
            }
            (Ty::MapStr | Ty::MapBytes | Ty::MapQuantity, 2) => {
                let (key, raw) = map_entry(r.bytes()?)?;
                let value = match field.ty {
                    Ty::MapBytes => json!(crate::certs::base64(raw)),
                    Ty::MapQuantity => {
                        // Quantity is a message with its string in field 1.
                        let mut qr = Reader { buf: raw };
                        let mut s = String::new();
                        while let Some((n, w)) = qr.key()? {
                            if (n, w) == (1, 2) {
                                s = text(qr.bytes()?)?;
                            } else {
                                qr.skip(w)?;
                            }
                        }
                        json!(s)
                    }
                    _ => json!(text(raw)?),
                };
                let entry = out.entry(field.name).or_insert_with(|| json!({}));
                if let Some(map) = entry.as_object_mut() {
                    map.insert(key, value);
                }
                continue;
            }
            _ => return Err(bad(&format!("field {at} has wire type {wire}"))),
        };
        let keep = match &value {
            Value::Null => false,
            Value::String(s) => !s.is_empty(),
            Value::Bool(b) => *b,
            Value::Number(n) => n.as_i64() != Some(0) || KEEP_ZERO.contains(&field.name),
            Value::Object(m) => !m.is_empty(),
            Value::Array(_) => true,
        };
        if field.repeated {
            let entry = out.entry(field.name).or_insert_with(|| json!([]));
            if let Some(items) = entry.as_array_mut() {
                items.push(value);
            }
        } else if keep {
            out.insert(field.name.to_owned(), value);
        }
    }
    Ok(Value::Object(out))
}

/// Decodes a protobuf request body into the object's JSON.
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let payload = body
        .strip_prefix(b"k8s\0")
        .ok_or_else(|| bad("missing the k8s protobuf magic prefix"))?;
    let mut r = Reader { buf: payload };
    let (mut api_version, mut kind, mut raw): (String, String, &[u8]) =
        (String::new(), String::new(), &[]);
    while let Some((num, wire)) = r.key()? {
        match (num, wire) {
            (1, 2) => {
                let mut tm = Reader { buf: r.bytes()? };
                while let Some((n, w)) = tm.key()? {
                    match (n, w) {
                        (1, 2) => api_version = text(tm.bytes()?)?,
                        (2, 2) => kind = text(tm.bytes()?)?,
                        _ => tm.skip(w)?,
                    }
                }
            }
            (2, 2) => raw = r.bytes()?,
            _ => r.skip(wire)?,
        }
    }
    if fields(&kind).is_empty() {
        return Err(ApiError::UnsupportedMediaType(format!(
            "protobuf bodies of kind {kind:?} are not supported; send JSON or YAML"
        )));
    }
    let mut skipped = Vec::new();
    let mut obj = message(&kind, raw, "", &mut skipped)?;
    if !skipped.is_empty() {
        tracing::warn!(kind, fields = ?skipped, "protobuf fields without a JSON mapping were dropped");
    }
    if let Some(map) = obj.as_object_mut() {
        map.insert("apiVersion".into(), json!(api_version));
        map.insert("kind".into(), json!(kind));
    }
    Ok(obj)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn string(num: u64, s: &[u8], out: &mut Vec<u8>) {
        varint(num << 3 | 2, out);
        varint(s.len() as u64, out);
        out.extend_from_slice(s);
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = Vec::new();
        string(1, api_version.as_bytes(), &mut tm);
        string(2, kind.as_bytes(), &mut tm);
        let mut body = b"k8s\0".to_vec();
        string(1, &tm, &mut body);
        string(2, raw, &mut body);
        body
    }

    #[test]
    fn config_map_with_labels_and_data() {
        let mut meta = Vec::new();
        string(1, b"web", &mut meta);
        string(2, b"", &mut meta);
        let mut label = Vec::new();
        string(1, b"app", &mut label);
        string(2, b"web", &mut label);
        string(11, &label, &mut meta);
        let mut raw = Vec::new();
        string(1, &meta, &mut raw);
        let mut entry = Vec::new();
        string(1, b"k", &mut entry);
        string(2, b"v", &mut entry);
        string(2, &entry, &mut raw);
        let obj = decode(&envelope("v1", "ConfigMap", &raw)).expect("decodes");
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "web", "labels": {"app": "web"}}, "data": {"k": "v"}})
        );
    }

    #[test]
    fn zero_replicas_survive_and_other_zeros_do_not() {
        let mut spec = Vec::new();
        varint(1 << 3, &mut spec);
        varint(0, &mut spec);
        varint(5 << 3, &mut spec);
        varint(0, &mut spec);
        let mut raw = Vec::new();
        string(2, &spec, &mut raw);
        let obj = decode(&envelope("apps/v1", "Deployment", &raw)).expect("decodes");
        assert_eq!(obj["spec"], json!({"replicas": 0}));
    }

    #[test]
    fn token_request_as_kubectl_create_token_sends_it() {
        let mut bound = Vec::new();
        string(1, b"Pod", &mut bound);
        string(2, b"v1", &mut bound);
        string(3, b"web", &mut bound);
        string(4, b"u-1", &mut bound);
        let mut spec = Vec::new();
        string(1, b"vault", &mut spec);
        string(3, &bound, &mut spec);
        varint(4 << 3, &mut spec);
        varint(600, &mut spec);
        let mut meta = Vec::new();
        string(1, b"default", &mut meta);
        let mut raw = Vec::new();
        string(1, &meta, &mut raw);
        string(2, &spec, &mut raw);
        let obj =
            decode(&envelope("authentication.k8s.io/v1", "TokenRequest", &raw)).expect("decodes");
        assert_eq!(
            obj,
            json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "metadata": {"name": "default"},
                "spec": {"audiences": ["vault"], "expirationSeconds": 600,
                    "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": "u-1"}}})
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let mut body = b"k8s\0".to_vec();
            body.extend_from_slice(&tail);
            let _ = decode(&body);
            let wrapped = envelope("apps/v1", "Deployment", &tail);
            let _ = decode(&wrapped);
        }
    }

    #[test]
    fn garbage_is_a_bad_request() {
        assert_eq!(decode(b"nope").map_err(|e| e.code()).err(), Some(400));
        let truncated = envelope("v1", "ConfigMap", &[0x0a, 0x05, b'a']);
        assert_eq!(decode(&truncated).map_err(|e| e.code()).err(), Some(400));
        let unknown = envelope("v1", "Widget", &[]);
        assert_eq!(decode(&unknown).map_err(|e| e.code()).err(), Some(415));
    }
}
