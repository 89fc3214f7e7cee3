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
    let v = prepare(&api, &p, &pod_dir).await.expect("prepare");
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
    prepare(&api, &p, &pod_dir).await.expect("prepare again");
    assert_eq!(std::fs::read_to_string(&conf).expect("conf"), "two");

    cleanup(&pod_dir).expect("cleanup");
    assert!(!pod_dir.join("volumes").exists());
    assert!(host_dir.is_dir(), "hostPath contents are never removed");
}

#[tokio::test]
async fn bad_volumes_fail_with_specific_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let api = FakeApi::new();
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
        let err = prepare(&api, &pod(vec![volume.clone()]), &dir.path().join("pod"))
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
        &pod(vec![cm(None, "absent", Some(true))]),
        &dir.path().join("pod"),
    )
    .await;
    assert!(ok.is_ok(), "an optional missing configmap is fine: {ok:?}");
}
