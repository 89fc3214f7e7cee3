//! Admission that changes what is stored: the service account token volume of pods.
//!
//! Upstream's ServiceAccount admission gives every new pod a projected volume
//! `kube-api-access-<suffix>` (a bound token for the pod's service account, the cluster CA
//! from the `kube-root-ca.crt` ConfigMap, and the namespace) and mounts it read-only at
//! [`TOKEN_MOUNT_PATH`] in each container that mounts nothing there. That is where in-cluster
//! clients (client-go, kubectl in a pod) look for credentials. A pod or service account with
//! `automountServiceAccountToken: false` gets nothing.

use serde_json::{Map, Value, json};

/// Where in-cluster clients read the token, CA and namespace.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Life of the projected token upstream asks for (an hour, plus a few seconds so a token
/// is never refreshed exactly at a round number).
const TOKEN_EXPIRATION_SECONDS: u64 = 3607;
/// Name prefix of the volume.
const VOLUME_PREFIX: &str = "kube-api-access-";

/// The service account a pod (already defaulted) runs as.
pub fn service_account_name(pod: &Value) -> &str {
    pod.pointer("/spec/serviceAccountName")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
}

/// Whether the pod opts out itself (`spec.automountServiceAccountToken: false`), in which case
/// its service account does not matter.
pub fn pod_opts_out(pod: &Value) -> bool {
    pod.pointer("/spec/automountServiceAccountToken") == Some(&Value::Bool(false))
}

/// Adds the token volume and mounts to a new pod. `account` is the pod's ServiceAccount
/// object when it exists (its `automountServiceAccountToken` applies when the pod sets none);
/// `suffix` names the volume. Pods whose every container already mounts something at
/// [`TOKEN_MOUNT_PATH`] are left alone, as are pods that opt out.
pub fn mount_service_account_token(pod: &mut Value, account: Option<&Value>, suffix: &str) {
    let pod_choice = pod
        .pointer("/spec/automountServiceAccountToken")
        .and_then(Value::as_bool);
    let account_choice = account
        .and_then(|a| a.get("automountServiceAccountToken"))
        .and_then(Value::as_bool);
    if !pod_choice.or(account_choice).unwrap_or(true) {
        return;
    }
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let existing = existing_volume(spec);
    let name = existing.unwrap_or_else(|| format!("{VOLUME_PREFIX}{suffix}"));
    let mut mounted = false;
    for key in ["initContainers", "containers"] {
        let Some(Value::Array(containers)) = spec.get_mut(key) else {
            continue;
        };
        for c in containers.iter_mut().filter_map(Value::as_object_mut) {
            mounted |= add_mount(c, &name);
        }
    }
    if mounted && existing_volume(spec).is_none() {
        let volumes = spec.entry("volumes").or_insert_with(|| json!([]));
        if volumes.is_null() {
            *volumes = json!([]);
        }
        if let Some(list) = volumes.as_array_mut() {
            list.push(token_volume(&name));
        }
    }
}

/// A `kube-api-access-*` volume the pod already has (a pod re-created from another pod's
/// manifest carries one), so that a second one is not added.
fn existing_volume(spec: &Map<String, Value>) -> Option<String> {
    spec.get("volumes")?
        .as_array()?
        .iter()
        .filter_map(|v| v.get("name")?.as_str())
        .find(|n| n.starts_with(VOLUME_PREFIX))
        .map(str::to_owned)
}

/// Mounts the volume in one container unless something is mounted at the path already;
/// returns whether it did.
fn add_mount(container: &mut Map<String, Value>, volume: &str) -> bool {
    let mounts = container.entry("volumeMounts").or_insert_with(|| json!([]));
    if mounts.is_null() {
        *mounts = json!([]);
    }
    let Some(list) = mounts.as_array_mut() else {
        return false;
    };
    let taken = list.iter().any(|m| {
        m.get("mountPath")
            .and_then(Value::as_str)
            .is_some_and(|p| p.trim_end_matches('/') == TOKEN_MOUNT_PATH)
    });
    if taken {
        return false;
    }
    list.push(json!({
        "name": volume,
        "readOnly": true,
        "mountPath": TOKEN_MOUNT_PATH,
    }));
    true
}

fn token_volume(name: &str) -> Value {
    json!({
        "name": name,
        "projected": {
            "defaultMode": 420,
            "sources": [
                {"serviceAccountToken": {
                    "expirationSeconds": TOKEN_EXPIRATION_SECONDS,
                    "path": "token",
                }},
                {"configMap": {
                    "name": "kube-root-ca.crt",
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                }},
                {"downwardAPI": {
                    "items": [{
                        "path": "namespace",
                        "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"},
                    }],
                }},
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "default"}, "spec": spec})
    }

    fn mounts(pod: &Value, key: &str, i: usize) -> Vec<(String, String)> {
        pod["spec"][key][i]["volumeMounts"]
            .as_array()
            .map(|l| {
                l.iter()
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap_or("").to_owned(),
                            m["mountPath"].as_str().unwrap_or("").to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn every_container_gets_the_volume_once() {
        let mut p = pod(json!({
            "initContainers": [{"name": "init", "image": "busybox"}],
            "containers": [
                {"name": "a", "image": "busybox", "volumeMounts": [{"name": "data", "mountPath": "/data"}]},
                {"name": "b", "image": "busybox"},
            ],
            "volumes": [{"name": "data", "emptyDir": {}}],
        }));
        mount_service_account_token(&mut p, None, "x2b4z");
        let volumes = p["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 2);
        assert_eq!(volumes[1], token_volume("kube-api-access-x2b4z"));
        let token = (
            "kube-api-access-x2b4z".to_owned(),
            TOKEN_MOUNT_PATH.to_owned(),
        );
        assert_eq!(
            mounts(&p, "initContainers", 0),
            std::slice::from_ref(&token)
        );
        assert_eq!(
            mounts(&p, "containers", 0),
            [("data".to_owned(), "/data".to_owned()), token.clone()]
        );
        assert_eq!(mounts(&p, "containers", 1), [token]);
        assert_eq!(
            p["spec"]["containers"][1]["volumeMounts"][0]["readOnly"],
            true
        );

        // Admitting the stored pod again (a copy of its manifest) adds nothing.
        let before = p.clone();
        mount_service_account_token(&mut p, None, "other");
        assert_eq!(p, before);
    }

    #[test]
    fn opting_out_on_the_pod_or_its_account_mounts_nothing() {
        let spec = json!({"containers": [{"name": "a", "image": "busybox"}]});
        let mut p =
            pod(json!({"automountServiceAccountToken": false, "containers": spec["containers"]}));
        let before = p.clone();
        mount_service_account_token(&mut p, None, "abcde");
        assert_eq!(p, before);

        let quiet = json!({"metadata": {"name": "default"}, "automountServiceAccountToken": false});
        let mut p = pod(spec.clone());
        mount_service_account_token(&mut p, Some(&quiet), "abcde");
        assert_eq!(p, pod(spec.clone()));

        // The pod's own choice wins over its account's.
        let mut p =
            pod(json!({"automountServiceAccountToken": true, "containers": spec["containers"]}));
        mount_service_account_token(&mut p, Some(&quiet), "abcde");
        assert_eq!(p["spec"]["volumes"][0]["name"], "kube-api-access-abcde");
    }

    #[test]
    fn a_path_already_mounted_is_left_to_the_pod() {
        let mut p = pod(json!({
            "containers": [{"name": "a", "image": "busybox", "volumeMounts": [
                {"name": "own", "mountPath": format!("{TOKEN_MOUNT_PATH}/")},
            ]}],
            "volumes": [{"name": "own", "secret": {"secretName": "s"}}],
        }));
        let before = p.clone();
        mount_service_account_token(&mut p, None, "abcde");
        assert_eq!(p, before, "no container needs the volume, so none is added");
    }

    #[test]
    fn odd_shapes_do_not_panic() {
        for spec in [
            json!(null),
            json!({"containers": null, "volumes": null}),
            json!({"containers": [null, 3, {"volumeMounts": null}]}),
            json!({"containers": [{"volumeMounts": "nope"}], "volumes": "nope"}),
        ] {
            let mut p = pod(spec);
            mount_service_account_token(&mut p, Some(&json!("not an object")), "abcde");
        }
        assert_eq!(service_account_name(&pod(json!({}))), "default");
        assert_eq!(
            service_account_name(&pod(json!({"serviceAccountName": "builder"}))),
            "builder"
        );
    }
}
