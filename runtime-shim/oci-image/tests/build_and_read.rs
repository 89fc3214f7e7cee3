//! Building images from real directory trees and reading them back, through the public API.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use ferrolet_oci_image::{
    BuildError, ImageFormat, ImageReference, ImageSettings, ImageSpec, LayerError, Ownership,
    ReadError, ReadOptions, StagedImage, build_image, read_image, sha256_of,
};
use flate2::read::GzDecoder;
use serde_json::Value;
use tempfile::TempDir;

fn spec(rootfs: &Path) -> ImageSpec {
    ImageSpec {
        reference: ImageReference::parse("ferrolet.local/test:1").unwrap(),
        layers: vec![rootfs.to_owned()],
        settings: ImageSettings {
            entrypoint: Some(vec!["/bin/app".into()]),
            cmd: Some(vec!["--serve".into()]),
            working_dir: Some("/srv".into()),
            user: Some("65534:65534".into()),
            labels: BTreeMap::from([("b".into(), "2".into()), ("a".into(), "1".into())]),
            stop_signal: Some("SIGINT".into()),
            exposed_ports: vec!["8080/tcp".into(), "53/udp".into()],
            ..ImageSettings::default()
        },
        ownership: Ownership::Preserve,
    }
}

/// A tree with every kind of entry a layer holds.
fn sample_tree(root: &Path) {
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::create_dir_all(root.join("srv")).unwrap();
    fs::write(root.join("bin/app"), b"#!/bin/sh\necho app\n").unwrap();
    fs::set_permissions(root.join("bin/app"), fs::Permissions::from_mode(0o4755)).unwrap();
    fs::write(root.join("srv/secret"), b"s3cret").unwrap();
    fs::set_permissions(root.join("srv/secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::hard_link(root.join("bin/app"), root.join("bin/app-again")).unwrap();
    symlink("app", root.join("bin/relative")).unwrap();
    symlink("/bin/app", root.join("bin/absolute")).unwrap();
    symlink("nowhere", root.join("bin/dangling")).unwrap();
    let long = root.join("d".repeat(60)).join("e".repeat(60));
    fs::create_dir_all(&long).unwrap();
    fs::write(long.join("f".repeat(40)), b"deep").unwrap();
    fs::write(root.join("srv/owned"), b"by someone else").unwrap();
    std::os::unix::fs::chown(root.join("srv/owned"), Some(1234), Some(5678))
        .expect("chown needs root; this test runs as root");
    nix_mkfifo(&root.join("srv/pipe"));
    fs::set_permissions(root.join("srv"), fs::Permissions::from_mode(0o1777)).unwrap();
}

fn nix_mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o640) };
    assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
}

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: String,
    mode: u32,
    uid: u64,
    gid: u64,
    link: Option<String>,
    content: Vec<u8>,
}

/// The entries of a layer tar, by path, as a reader of the layer sees them.
fn layer_entries(tar_bytes: &[u8]) -> BTreeMap<String, Entry> {
    let mut archive = tar::Archive::new(tar_bytes);
    let mut entries = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let header = entry.header().clone();
        let path = entry
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_owned();
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        let link = entry
            .link_name()
            .unwrap()
            .map(|l| l.to_string_lossy().into_owned());
        assert_eq!(header.mtime().unwrap(), 0, "{path}: mtime must be fixed");
        entries.insert(
            path,
            Entry {
                kind: format!("{:?}", header.entry_type()),
                mode: header.mode().unwrap(),
                uid: header.uid().unwrap(),
                gid: header.gid().unwrap(),
                link,
                content,
            },
        );
    }
    entries
}

/// The entries the layer should have for `root`, straight from the filesystem.
fn expected_entries(root: &Path) -> BTreeMap<String, Entry> {
    let mut out = BTreeMap::new();
    let mut seen_inodes: BTreeMap<u64, String> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(root.join(&rel))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for name in names {
            let rel = rel.join(name);
            let meta = fs::symlink_metadata(root.join(&rel)).unwrap();
            let name = rel.to_string_lossy().into_owned();
            let ft = meta.file_type();
            let (kind, link, content) = if ft.is_dir() {
                stack.push(rel.clone());
                ("Directory", None, Vec::new())
            } else if ft.is_symlink() {
                let target = fs::read_link(root.join(&rel)).unwrap();
                (
                    "Symlink",
                    Some(target.to_string_lossy().into_owned()),
                    Vec::new(),
                )
            } else if meta.nlink() > 1 && seen_inodes.contains_key(&meta.ino()) {
                ("Link", Some(seen_inodes[&meta.ino()].clone()), Vec::new())
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    seen_inodes.insert(meta.ino(), name.clone());
                }
                ("Regular", None, fs::read(root.join(&rel)).unwrap())
            } else {
                ("Fifo", None, Vec::new())
            };
            out.insert(
                name,
                Entry {
                    kind: kind.to_owned(),
                    mode: meta.mode() & 0o7777,
                    uid: u64::from(meta.uid()),
                    gid: u64::from(meta.gid()),
                    link,
                    content,
                },
            );
        }
    }
    out
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
    out
}

fn json(path: &Path) -> Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.strip_prefix("sha256:").unwrap()),
    )
    .unwrap()
}

fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn layout_digests_match_recomputed_content() {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let layout = tmp.path().join("layout");
    let built = build_image(&spec(&rootfs), ImageFormat::OciLayout, &layout).unwrap();

    assert_eq!(
        json(&layout.join("oci-layout"))["imageLayoutVersion"],
        "1.0.0"
    );
    let index = json(&layout.join("index.json"));
    let entry = &index["manifests"][0];
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(
        entry["annotations"]["io.containerd.image.name"],
        "ferrolet.local/test:1"
    );
    assert_eq!(
        entry["annotations"]["org.opencontainers.image.ref.name"],
        "1"
    );
    assert_eq!(entry["platform"]["os"], "linux");

    let manifest_digest = entry["digest"].as_str().unwrap();
    assert_eq!(manifest_digest, built.manifest_digest.to_string());
    let manifest_bytes = blob(&layout, manifest_digest);
    assert_eq!(sha256_of(&manifest_bytes).to_string(), manifest_digest);
    assert_eq!(entry["size"], manifest_bytes.len());
    let manifest: Value = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest["schemaVersion"], 2);

    let config_digest = manifest["config"]["digest"].as_str().unwrap();
    let config_bytes = blob(&layout, config_digest);
    assert_eq!(sha256_of(&config_bytes).to_string(), config_digest);
    assert_eq!(manifest["config"]["size"], config_bytes.len());
    let config: Value = serde_json::from_slice(&config_bytes).unwrap();
    assert_eq!(
        config["config"]["Entrypoint"],
        serde_json::json!(["/bin/app"])
    );
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["--serve"]));
    assert_eq!(config["config"]["WorkingDir"], "/srv");
    assert_eq!(config["config"]["User"], "65534:65534");
    assert_eq!(config["config"]["StopSignal"], "SIGINT");
    assert_eq!(
        config["config"]["Labels"],
        serde_json::json!({"a": "1", "b": "2"})
    );
    assert_eq!(
        config["config"]["ExposedPorts"],
        serde_json::json!({"53/udp": {}, "8080/tcp": {}})
    );
    assert_eq!(config["rootfs"]["type"], "layers");

    let layer = &manifest["layers"][0];
    assert_eq!(
        layer["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let layer_bytes = blob(&layout, layer["digest"].as_str().unwrap());
    assert_eq!(sha256_of(&layer_bytes).to_string(), layer["digest"]);
    assert_eq!(layer["size"], layer_bytes.len());
    let tar = gunzip(&layer_bytes);
    assert_eq!(config["rootfs"]["diff_ids"][0], sha256_of(&tar).to_string());
    assert_eq!(
        built.layers[0].diff_id.to_string(),
        sha256_of(&tar).to_string()
    );
    // Nothing but the finished layout is left beside it.
    assert_eq!(dir_names(tmp.path()), ["layout", "rootfs"]);
}

#[test]
fn layer_preserves_modes_links_devices_and_owners() {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let layout = tmp.path().join("layout");
    let built = build_image(&spec(&rootfs), ImageFormat::OciLayout, &layout).unwrap();
    let tar = gunzip(&blob(&layout, built.layers[0].digest.as_ref()));
    let got = layer_entries(&tar);
    assert_eq!(got, expected_entries(&rootfs));
    // Spot checks of what the comparison covers, so a broken expectation cannot hide them.
    assert_eq!(got["bin/app"].mode, 0o4755);
    assert_eq!(got["srv"].mode, 0o1777);
    assert_eq!(got["bin/app-again"].kind, "Link");
    assert_eq!(got["bin/app-again"].link.as_deref(), Some("bin/app"));
    assert_eq!(got["bin/dangling"].link.as_deref(), Some("nowhere"));
    assert_eq!((got["srv/owned"].uid, got["srv/owned"].gid), (1234, 5678));
    assert_eq!(got["srv/pipe"].kind, "Fifo");
    assert!(got.keys().any(|k| k.len() > 150), "long paths are kept");
}

#[test]
fn fixed_ownership_overrides_disk_owners() {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let mut spec = spec(&rootfs);
    spec.ownership = Ownership::Fixed { uid: 0, gid: 0 };
    let layout = tmp.path().join("layout");
    let built = build_image(&spec, ImageFormat::OciLayout, &layout).unwrap();
    let tar = gunzip(&blob(&layout, built.layers[0].digest.as_ref()));
    for (path, entry) in layer_entries(&tar) {
        assert_eq!((entry.uid, entry.gid), (0, 0), "{path}");
    }
}

#[test]
fn same_tree_gives_same_bytes() {
    let tmp = TempDir::new().unwrap();
    let first = tmp.path().join("first");
    sample_tree(&first);
    // A second copy made later, with other mtimes, inode numbers and creation order.
    let second = tmp.path().join("second");
    fs::create_dir(&second).unwrap();
    for name in ["srv", "empty", "bin"] {
        let status = std::process::Command::new("cp")
            .args(["-a", "--no-preserve=timestamps"])
            .arg(first.join(name))
            .arg(&second)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let long = "d".repeat(60);
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(first.join(&long))
        .arg(&second)
        .status()
        .unwrap();
    assert!(status.success());

    for format in [ImageFormat::OciArchive, ImageFormat::DockerArchive] {
        let a = tmp.path().join(format!("a-{format}.tar"));
        let b = tmp.path().join(format!("b-{format}.tar"));
        let built_a = build_image(&spec(&first), format, &a).unwrap();
        let built_b = build_image(&spec(&second), format, &b).unwrap();
        assert_eq!(built_a.manifest_digest, built_b.manifest_digest);
        assert_eq!(built_a.layers, built_b.layers);
        assert!(
            fs::read(&a).unwrap() == fs::read(&b).unwrap(),
            "{format} archives differ"
        );
    }
}

#[test]
fn every_format_reads_back_with_the_built_digests() {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let staged = StagedImage::build(&spec(&rootfs), tmp.path()).unwrap();
    let scratch = tmp.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let options = ReadOptions {
        scratch_dir: Some(scratch.clone()),
        ..ReadOptions::default()
    };
    for format in ImageFormat::ALL {
        let output = tmp.path().join(format!("out-{format}"));
        let built = staged.write(format, &output).unwrap();
        let image = read_image(&output, &options).unwrap();
        assert_eq!(image.format, format);
        assert_eq!(image.names, ["ferrolet.local/test:1"], "{format}");
        assert_eq!(image.config_digest, built.config_digest, "{format}");
        assert_eq!(sha256_of(&image.config_bytes), built.config_digest);
        if format != ImageFormat::DockerArchive {
            assert_eq!(image.manifest_digest, built.manifest_digest, "{format}");
            assert_eq!(image.ref_name.as_deref(), Some("1"));
        }
        assert_eq!(image.layers.len(), 1);
        assert_eq!(image.layers[0].digest, built.layers[0].digest, "{format}");
        assert_eq!(image.layers[0].diff_id, built.layers[0].diff_id, "{format}");
        let config = image.config.config().as_ref().unwrap();
        assert_eq!(
            config.entrypoint().as_deref(),
            Some(&["/bin/app".to_owned()][..])
        );
        let tar = gunzip(&fs::read(&image.layers[0].path).unwrap());
        assert_eq!(layer_entries(&tar), expected_entries(&rootfs), "{format}");
        drop(image);
    }
    assert!(
        dir_names(&scratch).is_empty(),
        "unpacked archives are removed with the image"
    );
}

#[test]
fn a_missing_rootfs_is_reported_and_nothing_is_written() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let missing = tmp.path().join("no-such-dir");
    for format in ImageFormat::ALL {
        let err = build_image(&spec(&missing), format, &out.join("image")).unwrap_err();
        assert!(
            matches!(&err, BuildError::Layer(LayerError::RootfsMissing { path }) if *path == missing),
            "{err}"
        );
        assert!(err.to_string().contains("does not exist"), "{err}");
        assert!(
            dir_names(&out).is_empty(),
            "left behind: {:?}",
            dir_names(&out)
        );
    }
    let file = tmp.path().join("a-file");
    fs::write(&file, b"").unwrap();
    let err = build_image(&spec(&file), ImageFormat::OciArchive, &out.join("i")).unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Layer(LayerError::RootfsNotDirectory { .. })
        ),
        "{err}"
    );
    assert!(dir_names(&out).is_empty());
}

/// Drops the capabilities that let root read any file, in the calling thread only, so an
/// unreadable file is unreadable for this test even when it runs as root.
fn drop_read_override_in_this_thread() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_DAC_OVERRIDE: u32 = 1;
    const CAP_DAC_READ_SEARCH: u32 = 2;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: header and data are valid for the kernel's version-3 capability layout (one
    // header, two data records); pid 0 means the calling thread.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
    data[0].effective &= !((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH));
    // SAFETY: as above; capset only reads the structures.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    assert_eq!(rc, 0, "capset: {}", std::io::Error::last_os_error());
}

#[test]
fn an_unreadable_file_is_reported_and_nothing_is_written() {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let secret = rootfs.join("srv/secret");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let spec = spec(&rootfs);
    let out_in_thread = out.clone();
    let errors = std::thread::spawn(move || {
        drop_read_override_in_this_thread();
        ImageFormat::ALL
            .into_iter()
            .map(|format| build_image(&spec, format, &out_in_thread.join("image")).unwrap_err())
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    for err in errors {
        assert!(
            matches!(&err, BuildError::Layer(LayerError::Read { path, .. }) if *path == secret),
            "{err}"
        );
        assert!(err.to_string().contains("Permission denied"), "{err}");
    }
    assert!(
        dir_names(&out).is_empty(),
        "left behind: {:?}",
        dir_names(&out)
    );
}

#[test]
fn a_missing_output_directory_is_reported_before_any_work() {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let parent = tmp.path().join("missing/deeper");
    for format in ImageFormat::ALL {
        let err = build_image(&spec(&rootfs), format, &parent.join("image")).unwrap_err();
        assert!(
            matches!(&err, BuildError::OutputDirMissing { path } if *path == parent),
            "{err}"
        );
    }
    assert!(!tmp.path().join("missing").exists());
    assert_eq!(dir_names(tmp.path()), ["rootfs"]);
}

#[test]
fn an_existing_layout_is_not_overwritten_but_an_archive_is_replaced() {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let layout = tmp.path().join("layout");
    fs::create_dir(&layout).unwrap();
    fs::write(layout.join("keep"), b"mine").unwrap();
    let err = build_image(&spec(&rootfs), ImageFormat::OciLayout, &layout).unwrap_err();
    assert!(matches!(err, BuildError::OutputExists { .. }), "{err}");
    assert_eq!(dir_names(&layout), ["keep"]);

    let archive = tmp.path().join("image.tar");
    fs::write(&archive, b"old").unwrap();
    build_image(&spec(&rootfs), ImageFormat::DockerArchive, &archive).unwrap();
    assert!(read_image(&archive, &ReadOptions::default()).is_ok());
    assert_eq!(dir_names(tmp.path()), ["image.tar", "layout", "rootfs"]);
}

#[test]
fn whiteout_names_sockets_digest_references_and_no_layers_are_refused() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();

    let whiteout = tmp.path().join("whiteout");
    fs::create_dir_all(whiteout.join("etc")).unwrap();
    fs::write(whiteout.join("etc/.wh.passwd"), b"").unwrap();
    let err = build_image(&spec(&whiteout), ImageFormat::OciArchive, &out.join("i")).unwrap_err();
    assert!(
        matches!(err, BuildError::Layer(LayerError::WhiteoutName { .. })),
        "{err}"
    );

    let socket_tree = tmp.path().join("socket");
    fs::create_dir(&socket_tree).unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(socket_tree.join("sock")).unwrap();
    let err =
        build_image(&spec(&socket_tree), ImageFormat::OciArchive, &out.join("i")).unwrap_err();
    assert!(
        matches!(
            err,
            BuildError::Layer(LayerError::UnsupportedFileType { kind: "socket", .. })
        ),
        "{err}"
    );

    let mut with_digest = spec(&whiteout);
    with_digest.reference = ImageReference::parse(
        "x.io/a@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    )
    .unwrap();
    let err = build_image(&with_digest, ImageFormat::OciArchive, &out.join("i")).unwrap_err();
    assert!(matches!(err, BuildError::DigestInReference { .. }), "{err}");

    let mut no_layers = spec(&whiteout);
    no_layers.layers.clear();
    let err = build_image(&no_layers, ImageFormat::OciArchive, &out.join("i")).unwrap_err();
    assert!(matches!(err, BuildError::NoLayers), "{err}");
    assert!(
        dir_names(&out).is_empty(),
        "left behind: {:?}",
        dir_names(&out)
    );
}

/// Builds a layout to tamper with.
fn layout_to_tamper() -> (TempDir, PathBuf, Value) {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let layout = tmp.path().join("layout");
    build_image(&spec(&rootfs), ImageFormat::OciLayout, &layout).unwrap();
    let index = json(&layout.join("index.json"));
    let manifest: Value = serde_json::from_slice(&blob(
        &layout,
        index["manifests"][0]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    (tmp, layout, manifest)
}

fn blob_path(layout: &Path, digest: &Value) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.as_str().unwrap().strip_prefix("sha256:").unwrap())
}

#[test]
fn a_tampered_layer_is_caught() {
    let (_tmp, layout, manifest) = layout_to_tamper();
    let path = blob_path(&layout, &manifest["layers"][0]["digest"]);
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let err = read_image(&layout, &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, ReadError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().starts_with("layer 0"), "{err}");

    fs::write(&path, &bytes[..middle]).unwrap();
    let err = read_image(&layout, &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, ReadError::SizeMismatch { .. }), "{err}");

    fs::remove_file(&path).unwrap();
    let err = read_image(&layout, &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, ReadError::Missing { .. }), "{err}");
}

#[test]
fn a_config_whose_diff_id_lies_is_caught() {
    let (_tmp, layout, manifest) = layout_to_tamper();
    // Rewrite the chain config -> manifest -> index with consistent digests, so only the
    // diff id check can notice.
    let mut config = json(&blob_path(&layout, &manifest["config"]["digest"]));
    config["rootfs"]["diff_ids"][0] = Value::from(sha256_of(b"not the layer").to_string());
    let config_bytes = serde_json::to_vec(&config).unwrap();
    let config_digest = sha256_of(&config_bytes).to_string();
    fs::write(
        blob_path(&layout, &Value::from(config_digest.clone())),
        &config_bytes,
    )
    .unwrap();
    let mut manifest = manifest;
    manifest["config"]["digest"] = Value::from(config_digest);
    manifest["config"]["size"] = Value::from(config_bytes.len());
    let manifest_bytes = serde_json::to_vec(&manifest).unwrap();
    let manifest_digest = sha256_of(&manifest_bytes).to_string();
    fs::write(
        blob_path(&layout, &Value::from(manifest_digest.clone())),
        &manifest_bytes,
    )
    .unwrap();
    let mut index = json(&layout.join("index.json"));
    index["manifests"][0]["digest"] = Value::from(manifest_digest);
    index["manifests"][0]["size"] = Value::from(manifest_bytes.len());
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();

    let err = read_image(&layout, &ReadOptions::default()).unwrap_err();
    assert!(
        matches!(err, ReadError::DiffIdMismatch { index: 0, .. }),
        "{err}"
    );
}

#[test]
fn a_tampered_manifest_is_caught() {
    let (_tmp, layout, _) = layout_to_tamper();
    let index = json(&layout.join("index.json"));
    let path = blob_path(&layout, &index["manifests"][0]["digest"]);
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("schemaVersion\":2", "schemaVersion\":3");
    fs::write(&path, text).unwrap();
    let err = read_image(&layout, &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, ReadError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().starts_with("image manifest"), "{err}");
}

fn write_tar(path: &Path, build: impl FnOnce(&mut tar::Builder<fs::File>)) {
    let mut builder = tar::Builder::new(fs::File::create(path).unwrap());
    build(&mut builder);
    builder.finish().unwrap();
}

#[test]
fn hostile_or_foreign_archives_are_refused() {
    let tmp = TempDir::new().unwrap();
    let scratch = tmp.path().join("scratch");
    fs::create_dir(&scratch).unwrap();
    let options = ReadOptions {
        scratch_dir: Some(scratch.clone()),
        ..ReadOptions::default()
    };

    let escape = tmp.path().join("escape.tar");
    write_tar(&escape, |b| {
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        // The tar crate refuses to write '..' through set_path, so write the raw name.
        header.as_gnu_mut().unwrap().name[..9].copy_from_slice(b"../evil\0\0");
        header.set_cksum();
        b.append(&header, &b"x"[..]).unwrap();
    });
    let err = read_image(&escape, &options).unwrap_err();
    assert!(matches!(err, ReadError::UnsafePath { .. }), "{err}");
    assert!(!tmp.path().join("evil").exists());

    let link = tmp.path().join("link.tar");
    write_tar(&link, |b| {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        b.append_link(&mut header, "index.json", "/etc/passwd")
            .unwrap();
    });
    let err = read_image(&link, &options).unwrap_err();
    assert!(matches!(err, ReadError::UnsupportedEntry { .. }), "{err}");

    let plain = tmp.path().join("plain.tar");
    write_tar(&plain, |b| {
        let mut header = tar::Header::new_gnu();
        header.set_size(2);
        header.set_mode(0o644);
        b.append_data(&mut header, "hello.txt", &b"hi"[..]).unwrap();
    });
    let err = read_image(&plain, &options).unwrap_err();
    assert!(matches!(err, ReadError::NotAnImage { .. }), "{err}");

    let garbage = tmp.path().join("garbage.tar");
    fs::write(&garbage, b"this is not a tar file at all, not even close").unwrap();
    assert!(read_image(&garbage, &options).is_err());

    let err = read_image(&tmp.path().join("absent.tar"), &options).unwrap_err();
    assert!(matches!(err, ReadError::Open { .. }), "{err}");
    assert!(
        dir_names(&scratch).is_empty(),
        "unpack leftovers: {:?}",
        dir_names(&scratch)
    );
}

#[test]
fn a_gzipped_docker_archive_reads_like_the_plain_one() {
    let tmp = TempDir::new().unwrap();
    let rootfs = tmp.path().join("rootfs");
    sample_tree(&rootfs);
    let archive = tmp.path().join("image.tar");
    let built = build_image(&spec(&rootfs), ImageFormat::DockerArchive, &archive).unwrap();
    let gz = tmp.path().join("image.tar.gz");
    let mut encoder =
        flate2::write::GzEncoder::new(fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    std::io::copy(&mut fs::File::open(&archive).unwrap(), &mut encoder).unwrap();
    encoder.finish().unwrap();
    let plain = read_image(&archive, &ReadOptions::default()).unwrap();
    let gzipped = read_image(&gz, &ReadOptions::default()).unwrap();
    assert_eq!(plain.config_digest, built.config_digest);
    assert_eq!(gzipped.manifest_digest, plain.manifest_digest);
    assert_eq!(gzipped.layers[0].diff_id, built.layers[0].diff_id);
}
