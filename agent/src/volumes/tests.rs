//! Volumes against the fake API and a temp dir.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, DownwardAPIVolumeFile, DownwardAPIVolumeSource,
    EmptyDirVolumeSource, HostPathVolumeSource, KeyToPath, ObjectFieldSelector, Pod, PodSpec,
    Secret, SecretVolumeSource, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::api::fake::FakeApi;
use std::path::Path;

/// [`super::prepare`] on a node with no allocatable resources known.
async fn prepare<A: Api>(
    api: &A,
    mounter: &dyn Mounter,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<HashMap<String, HostVolume>, VolumeError> {
    super::prepare(api, mounter, pod, pod_dir, &BTreeMap::new()).await
}

fn pod(volumes: Vec<Volume>) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some("p".into()),
            namespace: Some("ns".into()),
            uid: Some("u".into()),
            labels: Some(BTreeMap::from([("app".into(), "web".into())])),
            ..Default::default()
        },
        spec: Some(PodSpec {
            volumes: Some(volumes),
            ..Default::default()
        }),
        status: None,
    }
}

fn config_map(data: &[(&str, &str)]) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some("cm".into()),
            namespace: Some("ns".into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ),
        ..Default::default()
    }
}

#[tokio::test]
async fn every_kind_is_made_ready_and_config_map_updates_reach_the_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    api.insert(Some("ns"), &config_map(&[("a.conf", "one"), ("b", "x")]));
    api.insert(
        Some("ns"),
        &Secret {
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "token".into(),
                ByteString(b"hunter2".to_vec()),
            )])),
            ..Default::default()
        },
    );
    let host_dir = dir.path().join("host/made");
    let p = pod(vec![
        Volume {
            name: "scratch".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Default::default()
        },
        Volume {
            name: "host".into(),
            host_path: Some(HostPathVolumeSource {
                path: host_dir.display().to_string(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            ..Default::default()
        },
        Volume {
            name: "conf".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: "cm".into(),
                items: Some(vec![KeyToPath {
                    key: "a.conf".into(),
                    path: "sub/a.conf".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "creds".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some("s".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "info".into(),
            downward_api: Some(DownwardAPIVolumeSource {
                items: Some(vec![DownwardAPIVolumeFile {
                    path: "labels".into(),
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.labels".into(),
                        api_version: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]);
    let pod_dir = dir.path().join("pod");
    let v = prepare(&api, &mounter, &p, &pod_dir)
        .await
        .expect("prepare");
    assert!(v["scratch"].path.is_dir() && !v["scratch"].read_only);
    assert!(host_dir.is_dir());
    let conf = v["conf"].path.join("sub/a.conf");
    assert_eq!(std::fs::read_to_string(&conf).expect("conf"), "one");
    assert!(!v["conf"].path.join("b").exists(), "items select keys");
    assert_eq!(
        std::fs::read(v["creds"].path.join("token")).expect("secret"),
        b"hunter2"
    );
    assert_eq!(
        std::fs::read_to_string(v["info"].path.join("labels")).expect("labels"),
        "app=\"web\"\n"
    );

    api.insert(Some("ns"), &config_map(&[("a.conf", "two"), ("b", "x")]));
    prepare(&api, &mounter, &p, &pod_dir)
        .await
        .expect("prepare again");
    assert_eq!(std::fs::read_to_string(&conf).expect("conf"), "two");

    cleanup(&mounter, &pod_dir).expect("cleanup");
    assert!(!pod_dir.join("volumes").exists());
    assert!(host_dir.is_dir(), "hostPath contents are never removed");
}

#[tokio::test]
async fn bad_volumes_fail_with_specific_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    api.insert(Some("ns"), &config_map(&[("k", "v")]));
    let cm = |items: Option<Vec<KeyToPath>>, name: &str, optional: Option<bool>| Volume {
        name: "v".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: name.into(),
            items,
            optional,
            ..Default::default()
        }),
        ..Default::default()
    };
    let item = |key: &str, path: &str| {
        Some(vec![KeyToPath {
            key: key.into(),
            path: path.into(),
            ..Default::default()
        }])
    };
    let file = dir.path().join("plain");
    std::fs::write(&file, "x").expect("file");
    let cases = vec![
        (cm(None, "absent", None), "configmap ns/absent not found"),
        (cm(item("nope", "a"), "cm", None), "key \"nope\""),
        (cm(item("k", "../escape"), "cm", None), "stay in the volume"),
        (cm(item("k", "/abs"), "cm", None), "stay in the volume"),
        (
            Volume {
                name: "v".into(),
                host_path: Some(HostPathVolumeSource {
                    path: file.display().to_string(),
                    type_: Some("Directory".into()),
                }),
                ..Default::default()
            },
            "is not a directory",
        ),
        (
            Volume {
                name: "v".into(),
                host_path: Some(HostPathVolumeSource {
                    path: "/x".into(),
                    type_: Some("Weird".into()),
                }),
                ..Default::default()
            },
            "unknown",
        ),
        (
            Volume {
                name: "v".into(),
                ..Default::default()
            },
            "not supported",
        ),
    ];
    for (volume, want) in cases {
        let err = prepare(
            &api,
            &mounter,
            &pod(vec![volume.clone()]),
            &dir.path().join("pod"),
        )
        .await
        .expect_err(want)
        .to_string();
        assert!(
            err.contains(want) && err.starts_with("volume v"),
            "{err} lacks {want}"
        );
    }
    assert!(
        !dir.path().join("escape").exists(),
        "nothing written outside the volume"
    );
    let ok = prepare(
        &api,
        &mounter,
        &pod(vec![cm(None, "absent", Some(true))]),
        &dir.path().join("pod"),
    )
    .await;
    assert!(ok.is_ok(), "an optional missing configmap is fine: {ok:?}");
}

#[test]
fn updates_swap_the_data_link_atomically_and_leave_one_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("v");
    let files = |pairs: &[(&str, &str)]| -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
            .collect()
    };
    assert!(
        atomic::write_atomic(
            "v",
            &vol,
            &files(&[("a", "1"), ("d/b", "2")]),
            0o600,
            &BTreeMap::new()
        )
        .expect("write")
    );
    let first = atomic::current_version(&vol).expect("version");
    assert_eq!(
        std::fs::read_link(vol.join("a")).expect("link"),
        Path::new("..data/a")
    );
    assert_eq!(std::fs::read_to_string(vol.join("d/b")).expect("b"), "2");
    let mode = std::fs::metadata(first.join("a"))
        .expect("meta")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    // The same content: nothing is rewritten.
    assert!(
        !atomic::write_atomic(
            "v",
            &vol,
            &files(&[("a", "1"), ("d/b", "2")]),
            0o600,
            &BTreeMap::new()
        )
        .expect("same")
    );
    assert_eq!(atomic::current_version(&vol), Some(first.clone()));

    // A changed value and a removed key: one swap, the old version gone.
    assert!(
        atomic::write_atomic("v", &vol, &files(&[("a", "one")]), 0o644, &BTreeMap::new())
            .expect("update")
    );
    let second = atomic::current_version(&vol).expect("version");
    assert_ne!(second, first);
    assert!(!first.exists(), "the old version is removed");
    assert_eq!(std::fs::read_to_string(vol.join("a")).expect("a"), "one");
    assert!(
        std::fs::symlink_metadata(vol.join("d")).is_err(),
        "removed key disappears"
    );
    let mut names: Vec<String> = std::fs::read_dir(&vol)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let stamp = second
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert_eq!(names, [stamp, "..data".to_owned(), "a".to_owned()]);

    // A bad path writes nothing at all.
    let err = atomic::write_atomic(
        "v",
        &vol,
        &files(&[("ok", "x"), ("..data", "y")]),
        0o644,
        &BTreeMap::new(),
    )
    .expect_err("reserved name");
    assert!(err.to_string().contains("stay in the volume"), "{err}");
    assert_eq!(atomic::current_version(&vol), Some(second));
    assert!(std::fs::symlink_metadata(vol.join("ok")).is_err());
}

#[tokio::test]
async fn secrets_projections_and_memory_empty_dirs_are_on_tmpfs_until_cleanup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    api.insert(
        Some("ns"),
        &Secret {
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "token".into(),
                ByteString(b"t0".to_vec()),
            )])),
            ..Default::default()
        },
    );
    let p = pod(vec![
        Volume {
            name: "creds".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some("s".into()),
                default_mode: Some(0o400),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "cache".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                    "64Mi".into(),
                )),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]);
    let pod_dir = dir.path().join("pod");
    let v = prepare(&api, &mounter, &p, &pod_dir)
        .await
        .expect("prepare");
    let creds = pod_dir.join("volumes/secret/creds");
    let cache = pod_dir.join("volumes/empty-dir/cache");
    assert_eq!(v["creds"].path, creds);
    assert!(v["creds"].read_only && !v["cache"].read_only);
    assert_eq!(
        mounter.calls(),
        [
            format!("tmpfs {} -", creds.display()),
            format!("tmpfs {} 67108864", cache.display()),
        ]
    );
    let mode = std::fs::metadata(creds.join("token"))
        .expect("token")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o400
    );

    // Syncing again mounts nothing twice; a changed secret is swapped in.
    api.insert(
        Some("ns"),
        &Secret {
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(
                "token".into(),
                ByteString(b"t1".to_vec()),
            )])),
            ..Default::default()
        },
    );
    prepare(&api, &mounter, &p, &pod_dir).await.expect("again");
    assert_eq!(mounter.calls().len(), 2);
    assert_eq!(std::fs::read(creds.join("token")).expect("token"), b"t1");

    cleanup(&mounter, &pod_dir).expect("cleanup");
    assert!(mounter.mounted().is_empty());
    assert!(!pod_dir.join("volumes").exists());

    let bad = |volume: Volume, want: &str| {
        let api = &api;
        let mounter = &mounter;
        let pod_dir = &pod_dir;
        let want = want.to_owned();
        async move {
            let err = prepare(api, mounter, &pod(vec![volume]), pod_dir)
                .await
                .expect_err(&want)
                .to_string();
            assert!(err.contains(&want), "{err} lacks {want}");
        }
    };
    bad(
        Volume {
            name: "v".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("HugePages".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        "emptyDir medium \"HugePages\" is not supported",
    )
    .await;
    bad(
        Volume {
            name: "v".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some("s".into()),
                default_mode: Some(0o1777),
                ..Default::default()
            }),
            ..Default::default()
        },
        "defaultMode 1023 is not between 0 and 0777",
    )
    .await;
}

#[test]
fn sub_paths_stay_inside_their_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("vol");
    std::fs::create_dir_all(&root).expect("vol");
    std::os::unix::fs::symlink("/etc", root.join("out")).expect("symlink");
    let writable = HostVolume {
        path: root.clone(),
        read_only: false,
    };
    let made = sub_path("v", &writable, "data/site").expect("created");
    assert!(made.is_dir() && made.starts_with(root.canonicalize().expect("canon")));
    for (bad, want) in [
        ("../x", "without '..'"),
        ("/abs", "without '..'"),
        ("", "without '..'"),
        ("out", "outside the volume"),
        ("out/passwd", "outside the volume"),
    ] {
        let err = sub_path("v", &writable, bad).expect_err(bad).to_string();
        assert!(
            err.contains(want) && err.starts_with("volume v"),
            "{bad}: {err}"
        );
    }
    let read_only = HostVolume {
        path: root,
        read_only: true,
    };
    assert!(
        sub_path("v", &read_only, "missing").is_err(),
        "nothing made in a read-only volume"
    );
}

#[tokio::test]
async fn item_modes_override_the_default_mode_and_bad_ones_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    api.insert(
        Some("ns"),
        &config_map(&[("run.sh", "echo"), ("conf", "x")]),
    );
    let volume = |mode: Option<i32>| Volume {
        name: "v".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: "cm".into(),
            default_mode: Some(0o640),
            items: Some(vec![
                KeyToPath {
                    key: "run.sh".into(),
                    path: "bin/run.sh".into(),
                    mode,
                    ..Default::default()
                },
                KeyToPath {
                    key: "conf".into(),
                    path: "conf".into(),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod_dir = dir.path().join("pod");
    let mode_of = |v: &HostVolume, rel: &str| {
        std::fs::metadata(v.path.join(rel))
            .expect("file")
            .permissions()
            .mode()
            & 0o777
    };
    let v = prepare(&api, &mounter, &pod(vec![volume(Some(0o755))]), &pod_dir)
        .await
        .expect("prepare");
    assert_eq!(mode_of(&v["v"], "bin/run.sh"), 0o755);
    assert_eq!(mode_of(&v["v"], "conf"), 0o640);
    // Only the mode changed: that is an update too.
    let v = prepare(&api, &mounter, &pod(vec![volume(Some(0o700))]), &pod_dir)
        .await
        .expect("prepare");
    assert_eq!(mode_of(&v["v"], "bin/run.sh"), 0o700);
    let err = prepare(&api, &mounter, &pod(vec![volume(Some(1000))]), &pod_dir)
        .await
        .expect_err("mode too large")
        .to_string();
    assert!(
        err.contains("mode 1000 of item \"bin/run.sh\" is not between 0 and 0777"),
        "{err}"
    );
}

/// A pod from JSON parts, for the projected and downward volume tests.
fn pod_json(spec: serde_json::Value) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u"},
        "spec": spec,
    }))
    .expect("pod")
}

fn volume_json(v: serde_json::Value) -> Volume {
    serde_json::from_value(v).expect("volume")
}

#[tokio::test]
async fn downward_api_resource_fields_use_limits_or_the_node_allocatable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    let items = serde_json::json!([
        {"path": "cpu_limit", "resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "1m"}},
        {"path": "mem_limit", "resourceFieldRef": {"containerName": "app", "resource": "limits.memory", "divisor": "1Mi"}},
        {"path": "mem_request", "resourceFieldRef": {"containerName": "app", "resource": "requests.memory"}},
        {"path": "node_cpu", "resourceFieldRef": {"containerName": "bare", "resource": "limits.cpu"}},
        {"path": "node_disk", "resourceFieldRef": {"containerName": "bare", "resource": "limits.ephemeral-storage", "divisor": "1Gi"}},
        {"path": "name", "fieldRef": {"fieldPath": "metadata.name"}},
    ]);
    let spec = |volume: serde_json::Value| {
        serde_json::json!({
            "containers": [
                {"name": "app", "resources": {"limits": {"cpu": "500m", "memory": "64Mi"},
                    "requests": {"memory": "1Ki"}}},
                {"name": "bare"},
            ],
            "volumes": [volume],
        })
    };
    let allocatable = BTreeMap::from([
        ("cpu".to_owned(), Quantity::from_units(3)),
        (
            "ephemeral-storage".to_owned(),
            Quantity::from_units(20 << 30),
        ),
    ]);
    let plain = pod_json(spec(
        serde_json::json!({"name": "info", "downwardAPI": {"items": items}}),
    ));
    let v = super::prepare(&api, &mounter, &plain, &dir.path().join("a"), &allocatable)
        .await
        .expect("downwardAPI volume");
    let read = |v: &HostVolume, f: &str| std::fs::read_to_string(v.path.join(f)).expect(f);
    for (file, want) in [
        ("cpu_limit", "500"),
        ("mem_limit", "64"),
        ("mem_request", "1024"),
        ("node_cpu", "3"),
        ("node_disk", "20"),
        ("name", "p"),
    ] {
        assert_eq!(read(&v["info"], file), want, "{file}");
    }
    // The same items in a projected volume's downwardAPI source.
    let projected = pod_json(spec(serde_json::json!({"name": "info", "projected": {
        "sources": [{"downwardAPI": {"items": items}}]}})));
    let v = super::prepare(
        &api,
        &mounter,
        &projected,
        &dir.path().join("b"),
        &allocatable,
    )
    .await
    .expect("projected volume");
    assert_eq!(read(&v["info"], "cpu_limit"), "500");
    assert_eq!(read(&v["info"], "node_cpu"), "3");

    // Bad items: each named in the error, nothing written.
    for (item, want) in [
        (
            serde_json::json!({"path": "x", "resourceFieldRef": {"resource": "limits.cpu"}}),
            "containerName is required",
        ),
        (
            serde_json::json!({"path": "x", "resourceFieldRef": {"containerName": "ghost", "resource": "limits.cpu"}}),
            "container \"ghost\" is not in the pod",
        ),
        (
            serde_json::json!({"path": "x", "resourceFieldRef": {"containerName": "app", "resource": "limits.gpu"}}),
            "resource \"limits.gpu\" is not supported",
        ),
        (
            serde_json::json!({"path": "x", "resourceFieldRef": {"containerName": "app", "resource": "limits.cpu", "divisor": "0"}}),
            "divisor \"0\"",
        ),
        (
            serde_json::json!({"path": "x", "resourceFieldRef": {"containerName": "app", "resource": "limits.memory", "divisor": "3Mi"}}),
            "must be one of",
        ),
        (
            serde_json::json!({"path": "x"}),
            "exactly one of fieldRef and resourceFieldRef",
        ),
    ] {
        let bad = pod_json(spec(
            serde_json::json!({"name": "info", "downwardAPI": {"items": [item]}}),
        ));
        let pod_dir = dir.path().join("bad");
        let err = super::prepare(&api, &mounter, &bad, &pod_dir, &allocatable)
            .await
            .expect_err(want)
            .to_string();
        assert!(
            err.contains(want) && err.starts_with("volume info"),
            "{err} lacks {want}"
        );
        assert!(
            !pod_dir.join("volumes/downward-api/info/..data").exists(),
            "{want}: something was written"
        );
    }
}

/// The volume upstream's admission plugin adds to every pod, as the agent gets it.
fn kube_api_access(token: serde_json::Value, default_mode: Option<u32>) -> Volume {
    let mut projected = serde_json::json!({"sources": [
        {"serviceAccountToken": token},
        {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]});
    if let Some(m) = default_mode {
        projected["defaultMode"] = m.into();
    }
    volume_json(serde_json::json!({"name": "kube-api-access", "projected": projected}))
}

fn now_secs() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs(),
    )
    .expect("seconds")
}

/// An unsigned JWT with these claims (the agent only reads them).
fn jwt(iat: i64, exp: i64) -> String {
    use base64::Engine as _;
    let claims = serde_json::json!({"iat": iat, "exp": exp, "aud": ["https://kubernetes.default.svc.cluster.local"]});
    format!(
        "e30.{}.c2ln",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn token_requests(api: &FakeApi) -> Vec<String> {
    api.writes()
        .into_iter()
        .filter_map(|w| match w {
            crate::api::fake::Write::Create { path } if path.ends_with("/token") => Some(path),
            _ => None,
        })
        .collect()
}

fn with_root_ca(api: &FakeApi) {
    api.insert(
        Some("ns"),
        &ConfigMap {
            metadata: ObjectMeta {
                name: Some("kube-root-ca.crt".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([("ca.crt".into(), "CA-PEM".into())])),
            ..Default::default()
        },
    );
}

/// What the fake API server answers to `account`'s TokenRequests.
fn answer_tokens(api: &FakeApi, account: &str, token: &str) {
    api.set_reply::<k8s_openapi::api::core::v1::ServiceAccount>(
        Some("ns"),
        account,
        "token",
        serde_json::json!({"status": {"token": token}}),
    );
}

fn service_account(api: &FakeApi, name: &str) {
    api.insert(
        Some("ns"),
        &k8s_openapi::api::core::v1::ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            ..Default::default()
        },
    );
}

#[tokio::test]
async fn the_kube_api_access_volume_gets_a_private_token_the_ca_and_the_namespace_on_tmpfs() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    with_root_ca(&api);
    service_account(&api, "robot");
    let first = jwt(now_secs(), now_secs() + 3607);
    answer_tokens(&api, "robot", &first);
    let p = pod_json(serde_json::json!({
        "serviceAccountName": "robot",
        "containers": [{"name": "app"}],
        "volumes": [kube_api_access(serde_json::json!({"path": "token", "expirationSeconds": 3607}), None)],
    }));
    let pod_dir = dir.path().join("pod");
    let v = prepare(&api, &mounter, &p, &pod_dir).await.expect("volume");
    let vol = &v["kube-api-access"];
    let read = |f: &str| std::fs::read_to_string(vol.path.join(f)).expect(f);
    let mode = |f: &str| {
        std::fs::metadata(vol.path.join(f))
            .expect(f)
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(read("token"), first);
    assert_eq!(read("ca.crt"), "CA-PEM");
    assert_eq!(read("namespace"), "ns");
    assert_eq!(mode("token"), 0o600, "token private by default");
    assert_eq!(mode("ca.crt"), 0o644);
    assert!(vol.read_only);
    assert!(mounter.is_mounted(&vol.path), "tokens stay off the disk");
    assert_eq!(
        token_requests(&api),
        ["/api/v1/namespaces/ns/serviceaccounts/robot/token"]
    );

    // Young: kept, no new request on the next syncs.
    prepare(&api, &mounter, &p, &pod_dir).await.expect("again");
    prepare(&api, &mounter, &p, &pod_dir).await.expect("again");
    assert_eq!(token_requests(&api).len(), 1, "fresh token asked for again");

    // Past 80% of its life: asked for again and swapped in with the rest.
    let old = jwt(now_secs() - 3000, now_secs() + 600);
    std::fs::write(
        atomic::current_version(&vol.path)
            .expect("version")
            .join("token"),
        &old,
    )
    .expect("age the token");
    let second = jwt(now_secs(), now_secs() + 3600);
    answer_tokens(&api, "robot", &second);
    prepare(&api, &mounter, &p, &pod_dir)
        .await
        .expect("refresh");
    assert_eq!(token_requests(&api).len(), 2);
    assert_eq!(read("token"), second);
    assert_eq!(read("ca.crt"), "CA-PEM");

    // A defaultMode applies to the token too.
    let p = pod_json(serde_json::json!({
        "serviceAccountName": "robot",
        "containers": [{"name": "app"}],
        "volumes": [kube_api_access(serde_json::json!({"path": "token"}), Some(0o440))],
    }));
    prepare(&api, &mounter, &p, &pod_dir).await.expect("mode");
    assert_eq!(mode("token"), 0o440);
    assert_eq!(mode("namespace"), 0o440);
}

#[tokio::test]
async fn a_missing_service_account_or_a_short_lifetime_writes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    with_root_ca(&api);
    let p = pod_json(serde_json::json!({
        "serviceAccountName": "ghost",
        "containers": [{"name": "app"}],
        "volumes": [kube_api_access(serde_json::json!({"path": "token"}), None)],
    }));
    let pod_dir = dir.path().join("pod");
    let err = prepare(&api, &mounter, &p, &pod_dir)
        .await
        .expect_err("no such account");
    assert!(
        matches!(&err, VolumeError::Missing { kind: "serviceaccount", name, .. } if name == "ghost"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "volume kube-api-access: serviceaccount ns/ghost not found"
    );
    let vol_dir = pod_dir.join("volumes/projected/kube-api-access");
    assert!(!vol_dir.join("..data").exists(), "half a volume written");
    assert!(mounter.mounted().is_empty(), "tmpfs mounted for nothing");

    // No serviceAccountName: the namespace's default account.
    service_account(&api, "default");
    let p = pod_json(serde_json::json!({
        "containers": [{"name": "app"}],
        "volumes": [kube_api_access(serde_json::json!({"path": "token", "audience": "vault"}), None)],
    }));
    answer_tokens(&api, "default", &jwt(now_secs(), now_secs() + 3600));
    prepare(&api, &mounter, &p, &pod_dir)
        .await
        .expect("default account");
    assert_eq!(
        token_requests(&api),
        ["/api/v1/namespaces/ns/serviceaccounts/default/token"]
    );
    // Its token says another audience than "vault": asked for again each time, as the
    // projection's audience is what counts.
    prepare(&api, &mounter, &p, &pod_dir).await.expect("again");
    assert_eq!(token_requests(&api).len(), 2);

    for seconds in [0, 599] {
        let short = pod_json(serde_json::json!({
            "containers": [{"name": "app"}],
            "volumes": [kube_api_access(serde_json::json!({"path": "token", "expirationSeconds": seconds}), None)],
        }));
        let err = prepare(&api, &mounter, &short, &dir.path().join("short"))
            .await
            .expect_err("too short")
            .to_string();
        assert!(err.contains("less than the minimum of 600"), "{err}");
    }
    assert_eq!(
        token_requests(&api).len(),
        2,
        "short lifetimes reached the API"
    );
    // A server answering without a token is an error, not an empty file.
    answer_tokens(&api, "default", "");
    let err = prepare(&api, &mounter, &p, &dir.path().join("empty"))
        .await
        .expect_err("empty token")
        .to_string();
    assert!(err.contains("without a token"), "{err}");
}

#[tokio::test]
async fn a_failed_refresh_keeps_a_token_that_still_holds_and_fails_once_it_expired() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    with_root_ca(&api);
    service_account(&api, "default");
    answer_tokens(&api, "default", &jwt(now_secs(), now_secs() + 3600));
    let p = pod_json(serde_json::json!({
        "containers": [{"name": "app"}],
        "volumes": [kube_api_access(serde_json::json!({"path": "token"}), None)],
    }));
    let pod_dir = dir.path().join("pod");
    let v = prepare(&api, &mounter, &p, &pod_dir).await.expect("volume");
    let vol = v["kube-api-access"].path.clone();
    Api::delete::<k8s_openapi::api::core::v1::ServiceAccount>(
        &api,
        Some("ns"),
        "default",
        &crate::api::DeleteParams::default(),
    )
    .await
    .expect("delete account");
    let age = |token: &str| {
        std::fs::write(
            atomic::current_version(&vol)
                .expect("version")
                .join("token"),
            token,
        )
        .expect("age the token");
    };
    // Due for refresh but unexpired: the refresh fails, the token stays.
    let aged = jwt(now_secs() - 3000, now_secs() + 600);
    age(&aged);
    prepare(&api, &mounter, &p, &pod_dir)
        .await
        .expect("kept the old token");
    assert_eq!(
        std::fs::read_to_string(vol.join("token")).expect("token"),
        aged
    );
    // Expired: the failure is the pod's.
    age(&jwt(now_secs() - 4000, now_secs() - 1));
    let err = prepare(&api, &mounter, &p, &pod_dir)
        .await
        .expect_err("expired and no account");
    assert!(
        err.to_string()
            .contains("serviceaccount ns/default not found"),
        "{err}"
    );
}

#[test]
fn tokens_belong_to_the_one_non_root_user_all_containers_run_as() {
    let owner = |spec: serde_json::Value| token_owner(&pod_json(spec));
    assert_eq!(
        owner(serde_json::json!({"containers": [{"name": "a"}]})),
        None
    );
    assert_eq!(
        owner(serde_json::json!({"securityContext": {"runAsUser": 1000},
            "containers": [{"name": "a"}, {"name": "b"}]})),
        Some(1000)
    );
    assert_eq!(
        owner(serde_json::json!({"securityContext": {"runAsUser": 1000},
            "initContainers": [{"name": "i", "securityContext": {"runAsUser": 2000}}],
            "containers": [{"name": "a"}]})),
        None,
        "two users: root keeps it"
    );
    assert_eq!(
        owner(serde_json::json!({"containers": [
            {"name": "a", "securityContext": {"runAsUser": 7}},
            {"name": "b", "securityContext": {"runAsUser": 7}}]})),
        Some(7)
    );
    assert_eq!(
        owner(serde_json::json!({"containers": [
            {"name": "a", "securityContext": {"runAsUser": 7}}, {"name": "b"}]})),
        None,
        "one container without a user"
    );
    assert_eq!(
        owner(
            serde_json::json!({"securityContext": {"runAsUser": 0}, "containers": [{"name": "a"}]})
        ),
        None
    );
}

#[tokio::test]
async fn a_non_root_pod_owns_its_token_file() {
    use std::os::unix::fs::MetadataExt as _;
    // As root any uid will do; as another user only one's own uid can be given away to.
    let me = nix::unistd::geteuid().as_raw();
    let uid = if me == 0 { 4321 } else { me };
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
    let mounter = FakeMounter::default();
    with_root_ca(&api);
    service_account(&api, "default");
    answer_tokens(&api, "default", &jwt(now_secs(), now_secs() + 3600));
    let p = pod_json(serde_json::json!({
        "securityContext": {"runAsUser": uid},
        "containers": [{"name": "app"}],
        "volumes": [kube_api_access(serde_json::json!({"path": "token"}), None)],
    }));
    let v = prepare(&api, &mounter, &p, &dir.path().join("pod"))
        .await
        .expect("volume");
    let meta = std::fs::metadata(v["kube-api-access"].path.join("token")).expect("token");
    assert_eq!(meta.uid(), uid);
    assert_eq!(meta.mode() & 0o777, 0o600);
    let ca = std::fs::metadata(v["kube-api-access"].path.join("ca.crt")).expect("ca");
    assert_eq!(ca.uid(), me, "only the token changes hands");
}
