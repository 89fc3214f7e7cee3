//! The CRI server for real, through the generated client over its unix socket: pods with a
//! pause container, busybox containers, logs, exec, stats, events, restart safety and bad
//! inputs. Each test runs its own `ferrolet-shim serve` on a private root and cgroup parent.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use common::{require_root, unique, wait_for};
use ferrolet_cri::v1;
use ferrolet_cri::v1::image_service_client::ImageServiceClient;
use ferrolet_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::Code;
use tonic::transport::Channel;

const SHIM: &str = env!("CARGO_BIN_EXE_ferrolet-shim");

/// A running `ferrolet-shim serve` and everything it owns; all of it is removed on drop.
struct Server {
    child: Option<Child>,
    tmp: tempfile::TempDir,
    cgroup_parent: String,
    busybox: String,
}

impl Server {
    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }
    /// The volatile state, kept apart from the root as hosts keep it on tmpfs.
    fn state(&self) -> PathBuf {
        self.tmp.path().join("state")
    }
    fn socket(&self) -> PathBuf {
        self.tmp.path().join("cri.sock")
    }
    fn logs(&self) -> PathBuf {
        self.tmp.path().join("logs")
    }

    fn new() -> Server {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let images = tmp.path().join("images");
        std::fs::create_dir_all(&images).unwrap();
        let busybox = ferrolet_tests::images::busybox_image(&images).unwrap();
        let mut s = Server {
            child: None,
            tmp,
            cgroup_parent: unique("ferrolet-test"),
            busybox: busybox.name.clone(),
        };
        s.import(&busybox.oci_archive);
        s.start();
        s
    }

    /// `ferrolet-shim images import` of an image archive into this server's root.
    fn import(&self, archive: &Path) {
        let out = Command::new(SHIM)
            .args(["images", "import", "--root"])
            .arg(self.root())
            .arg(archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn start(&mut self) {
        let pause = ferrolet_tests::images::pause_binary().unwrap();
        let _ = std::fs::remove_file(self.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("shim.log"))
            .unwrap();
        let child = Command::new(SHIM)
            .arg("serve")
            .arg("--socket")
            .arg(self.socket())
            .arg("--root")
            .arg(self.root())
            .arg("--state")
            .arg(self.state())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--pause-binary")
            .arg(pause)
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let sock = self.socket();
        wait_for(30, "the shim's socket", || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn clients(&self) -> (RuntimeServiceClient<Channel>, ImageServiceClient<Channel>) {
        let ch = ferrolet_cri::connect_unix(self.socket()).await.unwrap();
        (
            RuntimeServiceClient::new(ch.clone()),
            ImageServiceClient::new(ch),
        )
    }

    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        ["memory", "pids", "cpu"]
            .iter()
            .map(|c| {
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join(&self.cgroup_parent)
            })
            .flat_map(|top| {
                let mut out = Vec::new();
                let mut stack = vec![top];
                while let Some(d) = stack.pop() {
                    if let Ok(entries) = std::fs::read_dir(&d) {
                        for e in entries.flatten() {
                            if e.file_type().is_ok_and(|t| t.is_dir()) {
                                out.push(e.path());
                                stack.push(e.path());
                            }
                        }
                    }
                }
                out
            })
            .collect()
    }

    fn mounts(&self) -> Vec<String> {
        ferrolet_tests::mounts::mounts_below(self.tmp.path())
    }

    fn processes(&self) -> Vec<u32> {
        let root = self.tmp.path().to_string_lossy().into_owned();
        let me = std::process::id();
        let shim = self.child.as_ref().map(Child::id);
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| *p != me && Some(*p) != shim)
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&root))
            })
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        // Killing every process of the test's cgroups ends containers and their monitors.
        for c in [
            "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
        ] {
            let top = Path::new("/sys/fs/cgroup")
                .join(c)
                .join(&self.cgroup_parent);
            remove_tree(&top);
        }
        ferrolet_tests::mounts::unmount_below(self.tmp.path());
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
    for _ in 0..300 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sandbox_config(s: &Server, name: &str) -> v1::PodSandboxConfig {
    v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: format!("host-{name}"),
        log_directory: s.logs().join(name).display().to_string(),
        dns_config: Some(v1::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        ..Default::default()
    }
}

fn container_config(s: &Server, name: &str, cmd: &[&str]) -> v1::ContainerConfig {
    v1::ContainerConfig {
        metadata: Some(v1::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(v1::ImageSpec {
            image: s.busybox.clone(),
            ..Default::default()
        }),
        command: cmd.iter().map(|c| (*c).to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: HashMap::from([("container".to_string(), name.to_string())]),
        linux: Some(v1::LinuxContainerConfig {
            resources: Some(v1::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                cpu_shares: 256,
                ..Default::default()
            }),
            security_context: None,
        }),
        ..Default::default()
    }
}

async fn run_sandbox(rt: &mut RuntimeServiceClient<Channel>, cfg: v1::PodSandboxConfig) -> String {
    rt.run_pod_sandbox(v1::RunPodSandboxRequest {
        config: Some(cfg),
        runtime_handler: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .pod_sandbox_id
}

async fn create(
    rt: &mut RuntimeServiceClient<Channel>,
    sandbox: &str,
    cfg: v1::ContainerConfig,
) -> Result<String, tonic::Status> {
    rt.create_container(v1::CreateContainerRequest {
        pod_sandbox_id: sandbox.into(),
        config: Some(cfg),
        sandbox_config: None,
    })
    .await
    .map(|r| r.into_inner().container_id)
}

async fn status(rt: &mut RuntimeServiceClient<Channel>, id: &str) -> v1::ContainerStatus {
    rt.container_status(v1::ContainerStatusRequest {
        container_id: id.into(),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .status
    .unwrap()
}

/// ImageStatus of `name`: the image, or None when the store does not have it.
async fn image_status(img: &mut ImageServiceClient<Channel>, name: &str) -> Option<v1::Image> {
    img.image_status(v1::ImageStatusRequest {
        image: Some(v1::ImageSpec {
            image: name.into(),
            ..Default::default()
        }),
        verbose: false,
    })
    .await
    .unwrap()
    .into_inner()
    .image
}

async fn wait_state(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
    state: v1::ContainerState,
) -> v1::ContainerStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(rt, id).await;
        if st.state == state as i32 {
            return st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "container {id} never reached {state:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_lines(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3).map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn pod_and_container_lifecycle_over_cri() {
    let s = Server::new();
    let (mut rt, mut img) = s.clients().await;
    let v = rt
        .version(v1::VersionRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.runtime_api_version, "v1");
    let images = img
        .list_images(v1::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(
        images.iter().any(|i| i.repo_tags.contains(&s.busybox)),
        "{images:?}"
    );

    let mut events = rt
        .get_container_events(v1::GetEventsRequest {})
        .await
        .unwrap()
        .into_inner();

    let pod = run_sandbox(&mut rt, sandbox_config(&s, "web")).await;
    let st = rt
        .pod_sandbox_status(v1::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        st.status.as_ref().unwrap().state,
        v1::PodSandboxState::SandboxReady as i32
    );
    let netns = PathBuf::from(&st.info["netns"]);
    assert!(netns.exists(), "netns file {netns:?}");
    let listed = rt
        .list_pod_sandbox(v1::ListPodSandboxRequest {
            filter: Some(v1::PodSandboxFilter {
                label_selector: HashMap::from([("app".to_string(), "web".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(listed.len(), 1);

    let cfg = container_config(
        &s,
        "main",
        &[
            "sh",
            "-c",
            "echo hello; hostname; grep nameserver /etc/resolv.conf; exec sleep 600",
        ],
    );
    let c = create(&mut rt, &pod, cfg).await.unwrap();
    assert_eq!(
        status(&mut rt, &c).await.state,
        v1::ContainerState::ContainerCreated as i32
    );
    rt.start_container(v1::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    let st = wait_state(&mut rt, &c, v1::ContainerState::ContainerRunning).await;
    assert!(st.started_at > 0);
    let log = st.log_path.clone();
    wait_for(20, "container output in its log", || {
        log_lines(&log).len() >= 3
    });
    assert_eq!(
        log_lines(&log)[..3],
        ["hello", "host-web", "nameserver 10.96.0.10"].map(String::from)
    );

    for want in [
        v1::ContainerEventType::ContainerCreatedEvent,
        v1::ContainerEventType::ContainerStartedEvent,
    ] {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(
            (ev.container_id.as_str(), ev.container_event_type),
            (c.as_str(), want as i32)
        );
    }

    let out = rt
        .exec_sync(v1::ExecSyncRequest {
            container_id: c.clone(),
            cmd: vec![
                "sh".into(),
                "-c".into(),
                "hostname; echo err >&2; exit 3".into(),
            ],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(out.exit_code, 3);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "host-web\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    // The command runs in the container's own cgroup of every controller the shim uses.
    let out = rt
        .exec_sync(v1::ExecSyncRequest {
            container_id: c.clone(),
            cmd: vec!["cat".into(), "/proc/self/cgroup".into()],
            timeout: 10,
        })
        .await
        .unwrap()
        .into_inner();
    let cgroups = String::from_utf8_lossy(&out.stdout);
    for controller in [
        "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
    ] {
        let line = cgroups
            .lines()
            .find(|l| l.split(':').nth(1) == Some(controller))
            .unwrap_or_else(|| panic!("no {controller} line in {cgroups}"));
        assert!(line.ends_with(&format!("/{c}")), "{line}");
    }
    let err = rt
        .exec_sync(v1::ExecSyncRequest {
            container_id: c.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");

    let stats = rt
        .container_stats(v1::ContainerStatsRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert!(stats.memory.unwrap().working_set_bytes.unwrap().value > 0);
    let all = rt
        .list_container_stats(v1::ListContainerStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(all.len(), 1);

    std::fs::rename(&log, format!("{log}.1")).unwrap();
    rt.reopen_container_log(v1::ReopenContainerLogRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    assert!(Path::new(&log).exists());

    rt.stop_container(v1::StopContainerRequest {
        container_id: c.clone(),
        timeout: 1,
    })
    .await
    .unwrap();
    let st = status(&mut rt, &c).await;
    assert_eq!(st.state, v1::ContainerState::ContainerExited as i32);
    // The pod shares one PID namespace (the CRI default), so `sleep` is not an init
    // immune to SIGTERM: the stop signal ends it.
    assert_eq!((st.exit_code, st.reason.as_str()), (143, "Error"));
    let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        ev.container_event_type,
        v1::ContainerEventType::ContainerStoppedEvent as i32
    );

    let done = create(&mut rt, &pod, container_config(&s, "once", &["true"]))
        .await
        .unwrap();
    rt.start_container(v1::StartContainerRequest {
        container_id: done.clone(),
    })
    .await
    .unwrap();
    let st = wait_state(&mut rt, &done, v1::ContainerState::ContainerExited).await;
    assert_eq!((st.exit_code, st.reason.as_str()), (0, "Completed"));
    let running = rt
        .list_containers(v1::ListContainersRequest {
            filter: Some(v1::ContainerFilter {
                state: Some(v1::ContainerStateValue {
                    state: v1::ContainerState::ContainerExited as i32,
                }),
                label_selector: HashMap::from([("container".to_string(), "once".to_string())]),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert_eq!(
        running.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        vec![done.clone()]
    );

    rt.remove_container(v1::RemoveContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    let err = rt
        .container_status(v1::ContainerStatusRequest {
            container_id: c.clone(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The image is in use while the pod has containers.
    let err = img
        .remove_image(v1::RemoveImageRequest {
            image: Some(v1::ImageSpec {
                image: s.busybox.clone(),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");

    rt.stop_pod_sandbox(v1::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.stop_pod_sandbox(v1::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    assert!(!netns.exists());
    rt.remove_pod_sandbox(v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    rt.remove_pod_sandbox(v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    })
    .await
    .unwrap();
    let left = rt
        .list_containers(v1::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .containers;
    assert!(left.is_empty());
    assert!(s.cgroup_dirs().is_empty(), "{:?}", s.cgroup_dirs());
    assert!(s.mounts().is_empty(), "{:?}", s.mounts());
    wait_for(10, "no processes of the pod", || s.processes().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn containers_outlive_a_killed_shim_and_their_exits_are_recorded() {
    let mut s = Server::new();
    let (mut rt, _) = s.clients().await;
    let pod = run_sandbox(&mut rt, sandbox_config(&s, "keep")).await;
    let flag_dir = s.tmp.path().join("flag");
    std::fs::create_dir_all(&flag_dir).unwrap();
    let mut cfg = container_config(
        &s,
        "waiter",
        &[
            "sh",
            "-c",
            "echo up; while [ ! -f /flag/stop ]; do sleep 0.05; done; echo bye; exit 7",
        ],
    );
    cfg.mounts.push(v1::Mount {
        container_path: "/flag".into(),
        host_path: flag_dir.display().to_string(),
        ..Default::default()
    });
    let c = create(&mut rt, &pod, cfg).await.unwrap();
    rt.start_container(v1::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    let log = wait_state(&mut rt, &c, v1::ContainerState::ContainerRunning)
        .await
        .log_path;
    drop(rt);
    s.kill();

    // With the shim gone, the container runs on; let it exit now.
    std::fs::write(flag_dir.join("stop"), "").unwrap();
    wait_for(20, "the container's last words", || {
        log_lines(&log).contains(&"bye".to_string())
    });

    // A writable layer nobody owns (its state was lost, as on a reboot with the state on
    // tmpfs) is removed when the shim starts; the pod's own layers stay.
    let snapshots = s.root().join("snapshots");
    let orphan = snapshots.join("0123456789abcdef");
    std::fs::create_dir_all(orphan.join("upper/data")).unwrap();
    std::fs::write(orphan.join("upper/data/file"), "left behind").unwrap();
    s.start();
    assert!(!orphan.exists(), "orphaned writable layer kept");
    assert!(snapshots.join(&c).exists() && snapshots.join(&pod).exists());
    assert!(
        s.state()
            .join("cri/containers")
            .join(format!("{c}.json"))
            .exists()
    );
    let (mut rt, _) = s.clients().await;
    let st = wait_state(&mut rt, &c, v1::ContainerState::ContainerExited).await;
    assert_eq!((st.exit_code, st.reason.as_str()), (7, "Error"));
    assert_eq!(log_lines(&log), vec!["up", "bye"]);
    let ps = rt
        .pod_sandbox_status(v1::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        ps.status.unwrap().state,
        v1::PodSandboxState::SandboxReady as i32
    );
    rt.remove_pod_sandbox(v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    assert!(s.cgroup_dirs().is_empty(), "{:?}", s.cgroup_dirs());
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_inputs_get_specific_statuses_and_leave_nothing() {
    let s = Server::new();
    let (mut rt, mut img) = s.clients().await;
    let err = rt
        .container_status(v1::ContainerStatusRequest {
            container_id: "nope".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .pod_sandbox_status(v1::PodSandboxStatusRequest {
            pod_sandbox_id: "nope".into(),
            verbose: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = rt
        .run_pod_sandbox(v1::RunPodSandboxRequest {
            config: Some(v1::PodSandboxConfig::default()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("metadata"), "{err}");
    assert!(image_status(&mut img, "missing:1").await.is_none());

    let pod = run_sandbox(&mut rt, sandbox_config(&s, "bad")).await;
    let err = create(
        &mut rt,
        "not-a-sandbox",
        container_config(&s, "x", &["true"]),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err}");

    let mut cfg = container_config(&s, "noimage", &["true"]);
    cfg.image = Some(v1::ImageSpec {
        image: "ferrolet.local/missing:1".into(),
        ..Default::default()
    });
    let err = create(&mut rt, &pod, cfg).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("ferrolet.local/missing:1"), "{err}");

    let mut cfg = container_config(&s, "badmount", &["true"]);
    cfg.mounts.push(v1::Mount {
        container_path: "/data".into(),
        host_path: "/no/such/dir".into(),
        ..Default::default()
    });
    let err = create(&mut rt, &pod, cfg).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("/no/such/dir"), "{err}");

    let mut cfg = container_config(&s, "baduser", &["true"]);
    cfg.linux.as_mut().unwrap().security_context = Some(v1::LinuxContainerSecurityContext {
        run_as_username: "nosuchuser".into(),
        ..Default::default()
    });
    let c = create(&mut rt, &pod, cfg).await.unwrap();
    let err = rt
        .start_container(v1::StartContainerRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("nosuchuser"), "{err}");
    let st = status(&mut rt, &c).await;
    assert_eq!(st.state, v1::ContainerState::ContainerExited as i32);
    assert_eq!(st.reason, "StartError");

    let c2 = create(
        &mut rt,
        &pod,
        container_config(&s, "nobin", &["no-such-binary"]),
    )
    .await
    .unwrap();
    let err = rt
        .start_container(v1::StartContainerRequest { container_id: c2 })
        .await
        .unwrap_err();
    assert!(err.message().contains("no-such-binary"), "{err}");

    rt.remove_pod_sandbox(v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();
    assert!(s.cgroup_dirs().is_empty(), "{:?}", s.cgroup_dirs());
    assert!(s.mounts().is_empty(), "{:?}", s.mounts());
    wait_for(10, "no processes left", || s.processes().is_empty());
    assert!(
        std::fs::read_dir(s.state().join("containers"))
            .unwrap()
            .next()
            .is_none(),
        "container state left"
    );
}

/// A private `docker-registry` on a loopback port; killed on drop.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry)");
        wait_for(30, "the registry to listen", || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Registry {
            child,
            addr,
            _dir: dir,
        }
    }

    fn push(&self, archive: &Path, name: &str) {
        let out = Command::new("skopeo")
            .args(["copy", "--insecure-policy", "--dest-tls-verify=false"])
            .arg(format!("oci-archive:{}", archive.display()))
            .arg(format!("docker://{}/{name}", self.addr))
            .output()
            .expect("skopeo");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn images_are_pulled_from_a_registry_and_bad_pulls_leave_nothing() {
    let s = Server::new();
    let reg = Registry::start();
    let images_dir = s.tmp.path().join("push");
    std::fs::create_dir_all(&images_dir).unwrap();
    let busybox = ferrolet_tests::images::busybox_image(&images_dir).unwrap();
    reg.push(&busybox.oci_archive, "test/busybox:1");
    let (mut rt, mut img) = s.clients().await;
    let count = |imgs: &Vec<v1::Image>| imgs.len();
    let before = img
        .list_images(v1::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;

    let name = format!("{}/test/busybox:1", reg.addr);
    let pulled = img
        .pull_image(v1::PullImageRequest {
            image: Some(v1::ImageSpec {
                image: name.clone(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_ref;
    assert_eq!(pulled, busybox.config_digest);
    let st = image_status(&mut img, &name)
        .await
        .expect("pulled image is listed");
    assert!(st.repo_tags.contains(&name), "{st:?}");
    assert!(
        st.repo_digests.contains(&format!(
            "{}/test/busybox@{}",
            reg.addr, busybox.manifest_digest
        )),
        "{st:?}"
    );

    // The pulled image runs.
    let pod = run_sandbox(&mut rt, sandbox_config(&s, "pulled")).await;
    let mut cfg = container_config(&s, "p", &["sh", "-c", "echo pulled"]);
    cfg.image = Some(v1::ImageSpec {
        image: name.clone(),
        ..Default::default()
    });
    let c = create(&mut rt, &pod, cfg).await.unwrap();
    rt.start_container(v1::StartContainerRequest {
        container_id: c.clone(),
    })
    .await
    .unwrap();
    let st = wait_state(&mut rt, &c, v1::ContainerState::ContainerExited).await;
    assert_eq!(st.exit_code, 0);
    assert_eq!(log_lines(&st.log_path), vec!["pulled"]);
    rt.remove_pod_sandbox(v1::RemovePodSandboxRequest {
        pod_sandbox_id: pod,
    })
    .await
    .unwrap();

    let missing = img
        .pull_image(v1::PullImageRequest {
            image: Some(v1::ImageSpec {
                image: format!("{}/test/busybox:nope", reg.addr),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing}");
    let wrong_digest = img
        .pull_image(v1::PullImageRequest {
            image: Some(v1::ImageSpec {
                image: format!("{}/test/busybox@sha256:{}", reg.addr, "0".repeat(64)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(wrong_digest.code(), Code::NotFound | Code::InvalidArgument),
        "{wrong_digest}"
    );
    let after = img
        .list_images(v1::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(count(&after), count(&before) + 1);
    let tmp = s.root().join("images/tmp");
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "partial pull left in {tmp:?}"
    );
}

/// `ferrolet-shim images import` beside a running server, as the quick start does: the
/// server answers ImageStatus and ListImages with the new image without a restart.
#[tokio::test]
async fn an_image_imported_while_the_shim_runs_is_seen_by_it() {
    let s = Server::new();
    let (_rt, mut img) = s.clients().await;
    let dir = s.tmp.path().join("later");
    std::fs::create_dir_all(&dir).unwrap();
    let pause = ferrolet_tests::images::pause_image(&dir).unwrap();
    assert!(
        image_status(&mut img, &pause.name).await.is_none(),
        "not imported yet"
    );

    s.import(&pause.oci_archive);

    let found = image_status(&mut img, &pause.name)
        .await
        .expect("the running shim sees the import");
    assert!(found.repo_tags.contains(&pause.name), "{found:?}");
    let listed = img
        .list_images(v1::ListImagesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(
        listed.iter().any(|i| i.repo_tags.contains(&pause.name)),
        "{listed:?}"
    );
    assert!(
        listed.iter().any(|i| i.repo_tags.contains(&s.busybox)),
        "the image from before is still there: {listed:?}"
    );
}
