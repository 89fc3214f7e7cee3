//! Bad input over real HTTPS (curl with the admin certificate): the right status code, a
//! `Status` body that names the problem, and nothing stored.

mod api_support;

use api_support::ControlPlane;
use serde_json::{Value, json};

const CMS: &str = "/api/v1/namespaces/default/configmaps";

fn assert_status(got: &(u16, Value), code: u16, needle: &str) {
    let (status, body) = got;
    assert_eq!(*status, code, "body: {body}");
    assert_eq!(body["kind"], "Status", "body: {body}");
    assert_eq!(body["code"], code, "body: {body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(needle),
        "message {message:?} lacks {needle:?}"
    );
}

fn assert_not_stored(cp: &ControlPlane, path: &str) {
    let (code, body) = cp.get(path);
    assert_eq!(code, 404, "{path} exists: {body}");
}

fn cm(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "b"}})
}

fn post(cp: &ControlPlane, path: &str, body: &Value) -> (u16, Value) {
    cp.request(
        "POST",
        path,
        "application/json",
        body.to_string().as_bytes(),
    )
}

#[test]
fn malformed_bodies_are_bad_requests() {
    let cp = ControlPlane::start();
    let got = cp.request(
        "POST",
        CMS,
        "application/json",
        br#"{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "broken""#,
    );
    assert_status(&got, 400, "error decoding JSON body");
    let got = cp.request(
        "POST",
        CMS,
        "application/yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata: [name: broken\n",
    );
    assert_status(&got, 400, "error decoding YAML body");
    let got = cp.request("POST", CMS, "application/json", b"[1, 2]");
    assert_status(&got, 400, "must be a JSON object");
    let typed = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "broken"},
        "spec": {"replicas": "three"}});
    let got = post(&cp, "/apis/apps/v1/namespaces/default/deployments", &typed);
    assert_status(&got, 400, "error decoding the object");
    assert_not_stored(&cp, &format!("{CMS}/broken"));
    assert_not_stored(&cp, "/apis/apps/v1/namespaces/default/deployments/broken");

    // YAML that is well formed is accepted.
    let got = cp.request(
        "POST",
        CMS,
        "application/yaml",
        b"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: fine\n",
    );
    assert_eq!(got.0, 201, "{}", got.1);
}

#[test]
fn wrong_api_version_or_kind_for_the_url_is_refused() {
    let cp = ControlPlane::start();
    let mut body = cm("wrong");
    body["apiVersion"] = json!("apps/v1");
    assert_status(
        &post(&cp, CMS, &body),
        400,
        "does not match the expected API version (v1)",
    );
    let mut body = cm("wrong");
    body["kind"] = json!("Secret");
    assert_status(
        &post(&cp, CMS, &body),
        400,
        "does not match the expected kind (ConfigMap)",
    );
    let mut body = cm("wrong");
    body["metadata"]["namespace"] = json!("kube-system");
    assert_status(&post(&cp, CMS, &body), 400, "does not match the namespace");
    assert_not_stored(&cp, &format!("{CMS}/wrong"));
    assert_not_stored(&cp, "/api/v1/namespaces/kube-system/configmaps/wrong");
    let got = post(&cp, "/api/v1/namespaces/nowhere/configmaps", &cm("lost"));
    assert_status(&got, 404, "namespaces \"nowhere\" not found");
    assert_status(
        &cp.get("/api/v1/namespaces/default/widgets"),
        404,
        "could not find",
    );
}

#[test]
fn unknown_fields_follow_field_validation() {
    let cp = ControlPlane::start();
    let mut body = cm("strict");
    body["spec"] = json!({"bogus": 1});
    body["metadata"]["colour"] = json!("red");
    let got = post(&cp, &format!("{CMS}?fieldValidation=Strict"), &body);
    assert_status(&got, 400, "unknown field \"metadata.colour\"");
    assert!(
        got.1["message"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown field \"spec\"")
    );
    assert_not_stored(&cp, &format!("{CMS}/strict"));
    assert_status(
        &post(&cp, &format!("{CMS}?fieldValidation=Loose"), &body),
        400,
        "fieldValidation",
    );

    // Warn and Ignore store the object without the unknown fields.
    body["metadata"]["name"] = json!("warned");
    let got = post(&cp, &format!("{CMS}?fieldValidation=Warn"), &body);
    assert_eq!(got.0, 201, "{}", got.1);
    let (_, stored) = cp.get(&format!("{CMS}/warned"));
    assert!(
        stored.get("spec").is_none() && stored["metadata"].get("colour").is_none(),
        "{stored}"
    );
    body["metadata"]["name"] = json!("ignored");
    assert_eq!(
        post(&cp, &format!("{CMS}?fieldValidation=Ignore"), &body).0,
        201
    );
}

#[test]
fn bodies_over_three_mebibytes_are_too_large() {
    let cp = ControlPlane::start();
    let mut body = cm("huge");
    body["data"]["a"] = json!("x".repeat(3 * 1024 * 1024 + 10));
    let got = post(&cp, CMS, &body);
    assert_status(&got, 413, "request entity too large");
    assert_not_stored(&cp, &format!("{CMS}/huge"));
}

#[test]
fn invalid_objects_are_unprocessable_with_field_paths() {
    let cp = ControlPlane::start();
    let got = post(&cp, CMS, &cm("Bad_Name"));
    assert_status(&got, 422, "metadata.name: Invalid value: \"Bad_Name\"");
    assert_eq!(got.1["details"]["causes"][0]["field"], "metadata.name");
    let long = "a".repeat(254);
    assert_status(
        &post(&cp, CMS, &cm(&long)),
        422,
        "must be no more than 253 characters",
    );
    let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "dotted.name"}});
    assert_status(&post(&cp, "/api/v1/namespaces", &ns), 422, "RFC 1123 label");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "empty"}, "spec": {"containers": []}});
    let got = post(&cp, "/api/v1/namespaces/default/pods", &pod);
    assert_status(&got, 422, "spec.containers: Required value");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "noimage"},
        "spec": {"containers": [{"name": "c"}]}});
    assert_status(
        &post(&cp, "/api/v1/namespaces/default/pods", &pod),
        422,
        "spec.containers[0].image: Required value",
    );
    let deploy = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "mismatch"},
        "spec": {"selector": {"matchLabels": {"app": "a"}}, "template": {"metadata": {"labels": {"app": "b"}},
        "spec": {"containers": [{"name": "c", "image": "i"}]}}}});
    assert_status(
        &post(&cp, "/apis/apps/v1/namespaces/default/deployments", &deploy),
        422,
        "`selector` does not match template `labels`",
    );
    assert_not_stored(&cp, &format!("{CMS}/Bad_Name"));
    assert_not_stored(&cp, "/api/v1/namespaces/default/pods/empty");
    assert_not_stored(&cp, "/api/v1/namespaces/default/pods/noimage");
    assert_not_stored(&cp, "/apis/apps/v1/namespaces/default/deployments/mismatch");
    assert_not_stored(&cp, "/api/v1/namespaces/dotted.name");
}

#[test]
fn bad_selectors_and_resource_versions_are_bad_requests() {
    let cp = ControlPlane::start();
    assert_status(
        &cp.get(&format!("{CMS}?labelSelector=app%20in%20web")),
        400,
        "invalid labelSelector",
    );
    assert_status(
        &cp.get(&format!("{CMS}?labelSelector=-bad%3D1")),
        400,
        "invalid label key",
    );
    assert_status(
        &cp.get(&format!("{CMS}?fieldSelector=metadata.name")),
        400,
        "invalid fieldSelector",
    );
    assert_status(
        &cp.get(&format!("{CMS}?fieldSelector=spec.nodeName%3Dx")),
        400,
        "field label not supported: spec.nodeName",
    );
    assert_status(
        &cp.get(&format!("{CMS}?resourceVersion=abc")),
        400,
        "invalid resource version \"abc\"",
    );
    assert_status(
        &cp.get(&format!("{CMS}?watch=true&resourceVersion=abc")),
        400,
        "invalid resource version",
    );
    assert_status(&cp.get(&format!("{CMS}?limit=-1")), 400, "limit");
    assert_status(
        &cp.get(&format!("{CMS}?continue=nonsense")),
        400,
        "invalid continue token",
    );

    // An update with a non-numeric or stale resourceVersion changes nothing.
    assert_eq!(post(&cp, CMS, &cm("versioned")).0, 201);
    let (_, stored) = cp.get(&format!("{CMS}/versioned"));
    let mut update = stored.clone();
    update["data"]["a"] = json!("changed");
    update["metadata"]["resourceVersion"] = json!("abc");
    let got = cp.request(
        "PUT",
        &format!("{CMS}/versioned"),
        "application/json",
        update.to_string().as_bytes(),
    );
    assert_status(&got, 400, "invalid resource version");
    update["metadata"]["resourceVersion"] = json!("1");
    let got = cp.request(
        "PUT",
        &format!("{CMS}/versioned"),
        "application/json",
        update.to_string().as_bytes(),
    );
    assert_status(&got, 409, "the object has been modified");
    assert_status(&post(&cp, CMS, &cm("versioned")), 409, "already exists");
    let (_, after) = cp.get(&format!("{CMS}/versioned"));
    assert_eq!(after["data"]["a"], "b");
    assert_eq!(
        after["metadata"]["resourceVersion"],
        stored["metadata"]["resourceVersion"]
    );

    let got = cp.request("PATCH", &format!("{CMS}/versioned"), "text/plain", b"{}");
    assert_status(&got, 415, "unknown format");
    let got = cp.request(
        "PATCH",
        &format!("{CMS}/versioned"),
        "application/json-patch+json",
        br#"[{"op":"remove","path":"/data/missing"}]"#,
    );
    assert_eq!(got.0, 422, "{}", got.1);
}

#[test]
fn requests_without_credentials_are_unauthorized() {
    let cp = ControlPlane::start();
    let ca = cp.data_dir().join("pki").join("ca.crt");
    let anonymous = std::process::Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&ca)
        .arg(format!("{}/api/v1/namespaces", cp.url))
        .output()
        .expect("curl");
    let body: Value = serde_json::from_slice(&anonymous.stdout).unwrap_or(Value::Null);
    assert_eq!(body["code"], 401, "{body}");
    assert_eq!(body["reason"], "Unauthorized");

    let tokens = std::fs::read_to_string(cp.data_dir().join("tokens.csv")).expect("token file");
    let token = tokens.split(',').next().unwrap_or_default().to_owned();
    let with_token = |token: &str| {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(&ca)
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("{}/api/v1/namespaces", cp.url))
            .output()
            .expect("curl");
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    assert_eq!(with_token(&token)["kind"], "NamespaceList");
    assert_eq!(with_token("not-a-token")["code"], 401);
}
