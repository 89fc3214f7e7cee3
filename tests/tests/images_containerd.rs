//! Proof that the images our builder makes are valid: a private containerd imports both the
//! OCI and the docker-archive of the pause and busybox images, lists them with our digests, and
//! runs them with runc. Needs root (containerd, overlayfs, cgroups).

use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ferrolet_oci_image::{
    ImageFormat, ImageReference, ImageSettings, ImageSpec, Ownership, build_image,
};
use ferrolet_tests::containerd::Containerd;
use ferrolet_tests::images::{self, TestImage};
use ferrolet_tests::wait::poll_until;

const DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// A cgroup parent `/ferrolet-test-<pid>-<n>` for the containers of one test. `ctr run` would
/// otherwise put them under `/k8s.io/<id>`, outside the parent tests may use. Dropping it
/// removes the parent and everything below it in every hierarchy.
struct CgroupParent {
    name: String,
}

impl CgroupParent {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Self {
            name: format!("ferrolet-test-{}-{n}", std::process::id()),
        }
    }

    /// The `--cgroup` value for container `id`.
    fn path_for(&self, id: &str) -> String {
        format!("/{}/{id}", self.name)
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        let Ok(hierarchies) = fs::read_dir("/sys/fs/cgroup") else {
            return;
        };
        for hierarchy in hierarchies.flatten() {
            remove_cgroup_tree(&hierarchy.path().join(&self.name));
        }
    }
}

/// cgroupfs directories hold kernel files that cannot be unlinked: remove leaves first with
/// rmdir.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(children) = fs::read_dir(dir) {
        for child in children.flatten() {
            if child.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&child.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

fn unique_id(what: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{what}-{}-{n}", std::process::id())
}

/// The manifest digest `ctr images ls` shows for `name`.
fn listed_digest(containerd: &Containerd, name: &str) -> Option<String> {
    let list = containerd.ctr_ok(&["images", "ls"]).ok()?;
    list.lines().find_map(|line| {
        let mut columns = line.split_whitespace();
        (columns.next() == Some(name)).then(|| columns.nth(1).map(str::to_owned))?
    })
}

fn import(containerd: &Containerd, archive: &Path) {
    let path = archive.to_str().expect("utf-8 path");
    containerd
        .ctr_ok(&["images", "import", path])
        .unwrap_or_else(|e| panic!("importing {path}: {e:#}"));
}

/// Imports the OCI archive and checks containerd lists the image under our manifest digest.
fn import_oci(containerd: &Containerd, image: &TestImage) {
    import(containerd, &image.oci_archive);
    assert_eq!(
        listed_digest(containerd, &image.name).as_deref(),
        Some(image.manifest_digest.as_str()),
        "ctr images ls:\n{}",
        containerd.ctr_ok(&["images", "ls"]).unwrap_or_default()
    );
}

/// Imports the docker-archive. containerd writes its own manifest for it, so check that the
/// manifest it lists references exactly our config and layer blobs.
fn import_docker(containerd: &Containerd, image: &TestImage) {
    import(containerd, &image.docker_archive);
    let digest = listed_digest(containerd, &image.name).expect("image listed after import");
    let manifest = containerd
        .ctr_ok(&["content", "get", &digest])
        .expect("read the manifest containerd made");
    let manifest: serde_json::Value = serde_json::from_str(&manifest).expect("manifest JSON");
    assert_eq!(manifest["config"]["digest"], image.config_digest.as_str());
    let layers: Vec<&str> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["digest"].as_str())
        .collect();
    assert_eq!(layers, image.layer_digests);
}

/// `ctr run --rm` of `image` with `args`; returns stdout, panicking with stderr on failure.
fn run(containerd: &Containerd, cgroups: &CgroupParent, image: &str, args: &[&str]) -> String {
    let id = unique_id("run");
    let cgroup = cgroups.path_for(&id);
    let mut full = vec!["run", "--rm", "--cgroup", &cgroup, image, &id];
    full.extend_from_slice(args);
    containerd
        .ctr_ok(&full)
        .unwrap_or_else(|e| panic!("ctr run {image} {args:?}: {e:#}"))
}

/// Kills and reaps a spawned `ctr` if the test ends before it exits.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The STATUS column of `ctr tasks ls` for `id`, if the task exists.
fn task_status(containerd: &Containerd, id: &str) -> Option<String> {
    let list = containerd.ctr_ok(&["tasks", "ls"]).ok()?;
    list.lines().find_map(|line| {
        let columns: Vec<&str> = line.split_whitespace().collect();
        (columns.first() == Some(&id)).then(|| columns.get(2).map(|s| (*s).to_owned()))?
    })
}

#[test]
fn pause_binary_is_static_and_prints_its_version() {
    let pause = images::pause_binary().expect("build the static pause");
    assert!(
        !images::has_interpreter(&pause).unwrap(),
        "{} needs a dynamic loader",
        pause.display()
    );
    let out = Command::new(&pause).arg("-v").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ferrolet-pause {}", env!("CARGO_PKG_VERSION"))
    );
    // A dynamic binary is told apart, so the check above can fail.
    assert!(images::has_interpreter(Path::new("/bin/sh")).unwrap());
}

#[test]
fn busybox_image_imports_and_runs_in_containerd() {
    let cgroups = CgroupParent::new();
    let containerd = Containerd::start().expect("start containerd");
    let dir = tempfile::tempdir().unwrap();
    let image = images::busybox_image(dir.path()).expect("busybox image");
    assert_eq!(image.name, images::BUSYBOX_IMAGE);

    import_oci(&containerd, &image);
    let out = run(&containerd, &cgroups, &image.name, &["echo", "hello"]);
    assert_eq!(out.trim(), "hello");
    let out = run(
        &containerd,
        &cgroups,
        &image.name,
        &["sh", "-c", "ls -ld /tmp; id -u"],
    );
    assert!(
        out.starts_with("drwxrwxrwt"),
        "/tmp must be sticky and world-writable: {out}"
    );
    assert!(
        out.trim_end().ends_with("\n0"),
        "runs as root by default: {out}"
    );

    import_docker(&containerd, &image);
    let out = run(&containerd, &cgroups, &image.name, &["cat", "/etc/group"]);
    assert!(out.contains("nobody:x:65534:"), "{out}");

    // The image user is resolved against the image's /etc/passwd by containerd.
    let rootfs = images::busybox_rootfs(dir.path()).unwrap();
    let nobody = "ferrolet.local/busybox-nobody:test";
    let built = build_image(
        &ImageSpec {
            reference: ImageReference::parse(nobody).unwrap(),
            layers: vec![rootfs],
            settings: ImageSettings {
                user: Some("nobody".to_owned()),
                ..ImageSettings::default()
            },
            ownership: Ownership::Fixed { uid: 0, gid: 0 },
        },
        ImageFormat::OciArchive,
        &dir.path().join("nobody.tar"),
    )
    .unwrap();
    import(&containerd, &built.output);
    let out = run(
        &containerd,
        &cgroups,
        nobody,
        &["sh", "-c", "id -u; id -g; id -un"],
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["65534", "65534", "nobody"]
    );
}

#[test]
fn pause_image_imports_runs_and_exits_zero_on_sigterm() {
    let cgroups = CgroupParent::new();
    let containerd = Containerd::start().expect("start containerd");
    let dir = tempfile::tempdir().unwrap();
    let image = images::pause_image(dir.path()).expect("pause image");
    assert_eq!(image.name, images::PAUSE_IMAGE);

    for format in [ImageFormat::OciArchive, ImageFormat::DockerArchive] {
        if format == ImageFormat::OciArchive {
            import_oci(&containerd, &image);
        } else {
            import_docker(&containerd, &image);
        }
        let id = unique_id("pause");
        let cgroup = cgroups.path_for(&id);
        // Attached (not `-d`): `ctr run` exits with the task's exit code, which is how the
        // exit status of pause is seen; `ctr tasks delete` only logs a non-zero one.
        let mut ctr = KillOnDrop(
            Command::new("ctr")
                .arg("--address")
                .arg(&containerd.socket)
                .args([
                    "-n",
                    "k8s.io",
                    "run",
                    "--rm",
                    "--cgroup",
                    &cgroup,
                    &image.name,
                    &id,
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start ctr run"),
        );
        assert!(
            poll_until(DEADLINE, POLL, || task_status(&containerd, &id).as_deref()
                == Some("RUNNING")),
            "{format}: pause task never ran: {:?}",
            task_status(&containerd, &id)
        );
        let cgroup_dir =
            PathBuf::from("/sys/fs/cgroup/memory").join(cgroup.trim_start_matches('/'));
        assert!(
            cgroup_dir.is_dir(),
            "{format}: container cgroup {} missing",
            cgroup_dir.display()
        );

        containerd
            .ctr_ok(&["tasks", "kill", "-s", "SIGTERM", &id])
            .unwrap();
        let mut status = None;
        assert!(
            poll_until(DEADLINE, POLL, || {
                status = ctr.0.try_wait().expect("wait for ctr run");
                status.is_some()
            }),
            "{format}: pause did not stop on SIGTERM: {:?}",
            task_status(&containerd, &id)
        );
        let mut stderr = String::new();
        if let Some(mut pipe) = ctr.0.stderr.take() {
            let _ = pipe.read_to_string(&mut stderr);
        }
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{format}: pause exit status {status:?}: {stderr}"
        );
        assert_eq!(
            task_status(&containerd, &id),
            None,
            "{format}: --rm left the task"
        );
    }
}
