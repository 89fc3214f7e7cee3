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
