//! One CRI client suite, through the generated client only, run against `ferrolet-shim` and
//! against containerd 1.6: the runtime-independent behaviour (host-network pod, busybox
//! container, CRI log format, ExecSync, stop/exit reasons, removal, NotFound) must be the same
//! on both, which shows the suite tests CRI and not the shim's quirks.
//!
//! Needs root, the Debian `containerd` and `busybox-static` packages, and the `ferrolet-shim`
//! binary of this workspace (built by `cargo nextest run --workspace`, or
//! `cargo build -p ferrolet-shim`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferrolet_cri::v1;
use ferrolet_cri::v1::image_service_client::ImageServiceClient;
use ferrolet_cri::v1::runtime_service_client::RuntimeServiceClient;
use ferrolet_tests::containerd::Containerd;
use ferrolet_tests::images::{TestImage, busybox_image, pause_binary, pause_image};
use ferrolet_tests::wait::poll_until;
use tonic::Code;
use tonic::transport::Channel;

fn require_root() {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the CRI suite needs root (namespaces, cgroups, mounts)"
    );
}

/// A cgroup parent `ferrolet-test-<pid>-<n>` for one test's pods, removed (with anything
/// still running in it) on drop.
struct CgroupParent(String);

impl CgroupParent {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        CgroupParent(format!(
            "ferrolet-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for c in [
            "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio", "systemd",
            "unified",
        ] {
            remove_tree(&Path::new("/sys/fs/cgroup").join(c).join(&self.0));
        }
    }
}

fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
            // SAFETY: kill(2) takes plain integers.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        std::fs::remove_dir(dir).is_ok() || !dir.exists()
    });
}

/// The workspace's `ferrolet-shim`, beside this test's own binary directory.
fn shim_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("ferrolet-shim"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p ferrolet-shim` (nextest --workspace does)",
        bin.display()
    );
    bin
}

/// A private `ferrolet-shim serve`; killed, with its pods, on drop.
struct Shim {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Shim {
    fn start(busybox: &TestImage) -> Shim {
        let dir = ferrolet_tests::unique_temp_dir("shim").unwrap();
        let root = dir.join("root");
        let bin = shim_binary();
        let out = Command::new(&bin)
            .args(["images", "import", "--root"])
            .arg(&root)
            .arg(&busybox.oci_archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = dir.join("cri.sock");
        let log = std::fs::File::create(dir.join("shim.log")).unwrap();
        let child = Command::new(&bin)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--root")
            .arg(&root)
            .arg("--pause-binary")
            .arg(pause_binary().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let up = poll_until(Duration::from_secs(30), Duration::from_millis(20), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
        assert!(up, "ferrolet-shim did not listen on {}", socket.display());
        Shim { child, dir, socket }
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        ferrolet_tests::mounts::unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What differs between the runtimes for the suite.
struct Target {
    channel: Channel,
    busybox: String,
    cgroups: CgroupParent,
    logs: PathBuf,
}

fn log_records(path: &str) -> Vec<(String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut it = l.splitn(4, ' ');
            let ts = it.next().unwrap_or_default();
            assert!(
                ts.ends_with('Z') || ts.contains('+') || ts.rfind('-') > Some(10),
                "timestamp {ts:?} in {l:?}"
            );
            (
                it.next().unwrap_or_default().to_string(),
                it.next().unwrap_or_default().to_string(),
                it.next().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

async fn container_status(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> v1::ContainerStatus {
    rt.container_status(v1::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .expect("ContainerStatus")
    .into_inner()
    .status
    .expect("status")
}

async fn wait_state(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    state: v1::ContainerState,
) -> v1::ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = container_status(rt, id).await;
        if st.state == state as i32 {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached {state:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The runtime-independent part of the suite.
async fn suite(t: &Target) {
    let mut rt = RuntimeServiceClient::new(t.channel.clone());
    let mut img = ImageServiceClient::new(t.channel.clone());
    let status = img
        .image_status(v1::ImageStatusRequest {
            image: Some(v1::ImageSpec {
                image: t.busybox.clone(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(status.image.is_some(), "busybox must be in the store");

    let sandbox_cfg = v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: "suite".into(),
            uid: "uid-suite".into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        // Like the kubelet, no hostname for a host-network pod (runc refuses one).
        log_directory: t.logs.display().to_string(),
        labels: HashMap::from([("suite".to_string(), "cri".to_string())]),
        linux: Some(v1::LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}/pod-suite", t.cgroups.0),
            security_context: Some(v1::LinuxSandboxSecurityContext {
                namespace_options: Some(v1::NamespaceOption {
                    network: v1::NamespaceMode::Node as i32,
                    pid: v1::NamespaceMode::Container as i32,
                    ipc: v1::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let pod = rt
        .run_pod_sandbox(v1::RunPodSandboxRequest {
            config: Some(sandbox_cfg.clone()),
            runtime_handler: String::new(),
        })
        .await
        .expect("RunPodSandbox")
        .into_inner()
        .pod_sandbox_id;
    let listed = rt
        .list_pod_sandbox(v1::ListPodSandboxRequest {
            filter: Some(v1::PodSandboxFilter {
                label_selector: HashMap::from([("suite".to_string(), "cri".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].state, v1::PodSandboxState::SandboxReady as i32);

    let container = |name: &str, cmd: &[&str]| v1::ContainerConfig {
        metadata: Some(v1::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(v1::ImageSpec {
            image: t.busybox.clone(),
            ..Default::default()
        }),
        command: cmd.iter().map(|c| (*c).to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(v1::LinuxContainerConfig {
            security_context: Some(v1::LinuxContainerSecurityContext {
                namespace_options: Some(v1::NamespaceOption {
                    network: v1::NamespaceMode::Node as i32,
                    pid: v1::NamespaceMode::Container as i32,
                    ipc: v1::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let create = |cfg: v1::ContainerConfig| v1::CreateContainerRequest {
        pod_sandbox_id: pod.clone(),
        config: Some(cfg),
        sandbox_config: Some(sandbox_cfg.clone()),
    };

    let main = rt
        .create_container(create(container(
            "main",
            &["sh", "-c", "echo out; echo err >&2; exec sleep 600"],
        )))
        .await
        .expect("CreateContainer")
        .into_inner()
        .container_id;
    assert_eq!(
        container_status(&mut rt, &main).await.state,
        v1::ContainerState::ContainerCreated as i32
    );
    rt.start_container(v1::StartContainerRequest {
        container_id: main.clone(),
    })
    .await
    .expect("StartContainer");
    let st = wait_state(&mut rt, &main, v1::ContainerState::ContainerRunning).await;
    let log = st.log_path.clone();
    assert_eq!(log, t.logs.join("main.log").display().to_string());
    assert!(
        poll_until(
            Duration::from_secs(20),
            Duration::from_millis(20),
            || log_records(&log).len() >= 2
        ),
        "log lines in {log}"
    );
    let mut recs = log_records(&log);
    recs.sort();
    assert_eq!(
        recs,
        vec![
            ("stderr".to_string(), "F".to_string(), "err".to_string()),
            ("stdout".to_string(), "F".to_string(), "out".to_string()),
        ]
    );

    let out = rt
        .exec_sync(v1::ExecSyncRequest {
            container_id: main.clone(),
            cmd: vec!["sh".into(), "-c".into(), "echo hi; exit 3".into()],
            timeout: 20,
        })
        .await
        .expect("ExecSync")
        .into_inner();
    assert_eq!(
        (out.exit_code, out.stdout.as_slice()),
        (3, b"hi\n".as_slice())
    );

    // `sleep` is the init of its own PID namespace: it ignores SIGTERM, so stop escalates.
    rt.stop_container(v1::StopContainerRequest {
        container_id: main.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer");
    let st = wait_state(&mut rt, &main, v1::ContainerState::ContainerExited).await;
    assert_eq!((st.exit_code, st.reason.as_str()), (137, "Error"), "{st:?}");
    assert!(
        st.finished_at >= st.started_at && st.started_at > 0,
        "{st:?}"
    );

    let once = rt
        .create_container(create(container("once", &["sh", "-c", "exit 0"])))
        .await
        .unwrap()
        .into_inner()
        .container_id;
    rt.start_container(v1::StartContainerRequest {
        container_id: once.clone(),
    })
    .await
    .unwrap();
    let st = wait_state(&mut rt, &once, v1::ContainerState::ContainerExited).await;
    assert_eq!(
        (st.exit_code, st.reason.as_str()),
        (0, "Completed"),
        "{st:?}"
    );

    let exited = rt
        .list_containers(v1::ListContainersRequest {
            filter: Some(v1::ContainerFilter {
                pod_sandbox_id: pod.clone(),
                state: Some(v1::ContainerStateValue {
                    state: v1::ContainerState::ContainerExited as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(exited.len(), 2);

    for id in [&main, &once] {
        rt.remove_container(v1::RemoveContainerRequest {
            container_id: (*id).clone(),
        })
        .await
        .expect("RemoveContainer");
        let err = rt
            .container_status(v1::ContainerStatusRequest {
                container_id: (*id).clone(),
                verbose: false,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
    }

    rt.stop_pod_sandbox(v1::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("StopPodSandbox");
    rt.remove_pod_sandbox(v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .expect("RemovePodSandbox");
    let left = rt
        .list_pod_sandbox(v1::ListPodSandboxRequest { filter: None })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert!(left.is_empty(), "{left:?}");

    let err = rt
        .container_status(v1::ContainerStatusRequest {
            container_id: "ferrolet-no-such-container".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
}

fn logs_dir(what: &str) -> PathBuf {
    ferrolet_tests::unique_temp_dir(what).unwrap()
}

#[test]
fn cri_suite_against_ferrolet_shim() {
    require_root();
    let images = logs_dir("cri-suite-images");
    let busybox = busybox_image(&images).unwrap();
    let shim = Shim::start(&busybox);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let logs = logs_dir("cri-suite-shim-logs");
    rt.block_on(async {
        let channel = ferrolet_cri::connect_unix(&shim.socket).await.unwrap();
        suite(&Target {
            channel,
            busybox: busybox.name.clone(),
            cgroups: CgroupParent::new(),
            logs: logs.clone(),
        })
        .await;
    });
    let _ = std::fs::remove_dir_all(&logs);
    let _ = std::fs::remove_dir_all(&images);
}

#[test]
fn cri_suite_against_containerd() {
    require_root();
    let images = logs_dir("cri-suite-images");
    let busybox = busybox_image(&images).unwrap();
    let pause = pause_image(&images).unwrap();
    let containerd = Containerd::start().expect("start a private containerd");
    for archive in [&busybox.oci_archive, &pause.oci_archive] {
        containerd
            .ctr_ok(&["images", "import", &archive.display().to_string()])
            .unwrap();
    }
    // containerd runs its default sandbox image; give it ours under both names 1.6 uses.
    for name in ["k8s.gcr.io/pause:3.6", "registry.k8s.io/pause:3.6"] {
        containerd
            .ctr_ok(&["images", "tag", &pause.name, name])
            .unwrap();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let logs = logs_dir("cri-suite-containerd-logs");
    rt.block_on(async {
        let channel = ferrolet_cri::connect_unix(&containerd.socket)
            .await
            .unwrap();
        suite(&Target {
            channel,
            busybox: busybox.name.clone(),
            cgroups: CgroupParent::new(),
            logs: logs.clone(),
        })
        .await;
    });
    let _ = std::fs::remove_dir_all(&logs);
    let _ = std::fs::remove_dir_all(&images);
}
