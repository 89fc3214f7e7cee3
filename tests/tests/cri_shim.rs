//! One CRI client suite, through the generated client only, run against `ferrolet-shim` and
//! against containerd 1.6: the runtime-independent behaviour (Version, Status, images, a
//! host-network pod and its status, busybox containers, CRI log format and reopening,
//! ExecSync, streaming Exec over the WebSocket remote-command protocol, container and pod
//! stats, resource updates, stop/exit reasons, removal, NotFound) must be the same on both,
//! which shows the suite tests CRI and not the shim's quirks. A second test covers what only
//! the shim does (container events, refusing to remove an image in use, the v5 protocol's
//! close channel) and the bad inputs of issue 5, checking that nothing is left behind.
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
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
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

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the WebSocket of an Exec URL offering the remote-command subprotocols `offer`;
/// returns it with the subprotocol the server chose.
async fn ws_open(url: &str, offer: &str) -> Result<(Ws, String), String> {
    let ws_url = url
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    let mut req = ws_url.into_client_request().map_err(|e| e.to_string())?;
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_str(offer).map_err(|e| e.to_string())?,
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(r) => format!("HTTP {}", r.status()),
            other => other.to_string(),
        })?;
    let proto = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    Ok((ws, proto))
}

/// What a remote-command session delivered so far.
#[derive(Debug, Default)]
struct Transcript {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The metav1.Status from the error channel.
    status: Option<serde_json::Value>,
    closed: bool,
}

impl Transcript {
    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    /// The exit code a status reports, as kubectl reads it: 0 on Success, else the cause of
    /// reason ExitCode.
    fn exit_code(&self) -> Option<i32> {
        let st = self.status.as_ref()?;
        if st["status"] == "Success" {
            return Some(0);
        }
        st["details"]["causes"]
            .as_array()?
            .iter()
            .find(|c| c["reason"] == "ExitCode")?["message"]
            .as_str()?
            .parse()
            .ok()
    }
}

/// Sends `data` on the stdin channel.
async fn ws_stdin(ws: &mut Ws, data: &str) {
    let mut msg = vec![0u8];
    msg.extend_from_slice(data.as_bytes());
    ws.send(Message::binary(msg)).await.expect("send stdin");
}

/// Reads messages into `t` until `done(t)` holds, the stream ends, or 30 s pass (a failure).
async fn ws_read_until(ws: &mut Ws, t: &mut Transcript, done: impl Fn(&Transcript) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !done(t) {
        assert!(!t.closed, "stream ended early: {t:?}");
        let next = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no progress within 30s: {t:?}"));
        match next {
            Some(Ok(Message::Binary(b))) => match b.split_first() {
                Some((&1, data)) => t.stdout.extend_from_slice(data),
                Some((&2, data)) => t.stderr.extend_from_slice(data),
                Some((&3, data)) if !data.is_empty() => {
                    t.status = Some(serde_json::from_slice(data).expect("status JSON"));
                }
                // Empty messages open channels in some servers.
                _ => {}
            },
            Some(Ok(Message::Close(_))) | None => t.closed = true,
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                // Some servers drop the TCP connection right after the status.
                assert!(t.status.is_some(), "websocket error {e}: {t:?}");
                t.closed = true;
            }
        }
    }
}

fn exec_request(id: &str, cmd: &[&str], tty: bool) -> v1::ExecRequest {
    v1::ExecRequest {
        container_id: id.to_string(),
        cmd: cmd.iter().map(|c| (*c).to_string()).collect(),
        tty,
        stdin: true,
        stdout: true,
        stderr: !tty,
        ..Default::default()
    }
}

/// Exec's streaming part: an interactive `sh` over the WebSocket remote-command protocol,
/// without and with a terminal, with the exit code of a failing command.
async fn exec_streaming(rt: &mut RuntimeServiceClient<Channel>, id: &str) {
    let url = rt
        .exec(exec_request(id, &["sh"], false))
        .await
        .expect("Exec")
        .into_inner()
        .url;
    let (mut ws, proto) = ws_open(&url, "v5.channel.k8s.io,v4.channel.k8s.io")
        .await
        .expect("open the exec stream");
    assert!(
        proto == "v5.channel.k8s.io" || proto == "v4.channel.k8s.io",
        "{proto:?}"
    );
    let mut t = Transcript::default();
    ws_stdin(&mut ws, "echo hello-$((6*7)); echo oops >&2\n").await;
    ws_read_until(&mut ws, &mut t, |t| {
        t.out().contains("hello-42\n") && t.err().contains("oops\n")
    })
    .await;
    ws_stdin(&mut ws, "exit 3\n").await;
    ws_read_until(&mut ws, &mut t, |t| t.status.is_some()).await;
    assert_eq!(t.exit_code(), Some(3), "{t:?}");
    assert_eq!(t.status.as_ref().unwrap()["reason"], "NonZeroExitCode");

    let url = rt
        .exec(exec_request(id, &["sh"], true))
        .await
        .expect("Exec with tty")
        .into_inner()
        .url;
    let (mut ws, _) = ws_open(&url, "v5.channel.k8s.io,v4.channel.k8s.io")
        .await
        .expect("open the tty exec stream");
    ws.send(Message::binary(
        b"\x04{\"Width\":100,\"Height\":40}".to_vec(),
    ))
    .await
    .unwrap();
    let mut t = Transcript::default();
    // The terminal echoes what is typed; only the shell's output has the computed number.
    ws_stdin(&mut ws, "[ -t 0 ] && echo tty-$((2*21))\n").await;
    ws_read_until(&mut ws, &mut t, |t| t.out().contains("tty-42")).await;
    ws_stdin(&mut ws, "exit\n").await;
    ws_read_until(&mut ws, &mut t, |t| t.status.is_some()).await;
    assert_eq!(t.exit_code(), Some(0), "{t:?}");
    assert!(
        t.stderr.is_empty(),
        "a terminal has no separate stderr: {t:?}"
    );
}

/// The runtime-independent part of the suite.
async fn suite(t: &Target) {
    let mut rt = RuntimeServiceClient::new(t.channel.clone());
    let mut img = ImageServiceClient::new(t.channel.clone());
    let version = rt
        .version(v1::VersionRequest::default())
        .await
        .expect("Version")
        .into_inner();
    assert_eq!(version.runtime_api_version, "v1", "{version:?}");
    let conditions = rt
        .status(v1::StatusRequest { verbose: false })
        .await
        .expect("Status")
        .into_inner()
        .status
        .expect("runtime status")
        .conditions;
    assert!(
        conditions
            .iter()
            .any(|c| c.r#type == "RuntimeReady" && c.status),
        "{conditions:?}"
    );
    let images = img
        .list_images(v1::ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    assert!(
        images.iter().any(|i| i.repo_tags.contains(&t.busybox)),
        "{images:?}"
    );
    let fs = img
        .image_fs_info(v1::ImageFsInfoRequest::default())
        .await
        .expect("ImageFsInfo")
        .into_inner();
    // containerd fills in the usage figures only after its periodic scan; where is common.
    let mountpoint = fs
        .image_filesystems
        .first()
        .and_then(|f| f.fs_id.as_ref())
        .map(|id| id.mountpoint.clone())
        .unwrap_or_default();
    assert!(!mountpoint.is_empty(), "{fs:?}");
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
    let pst = rt
        .pod_sandbox_status(v1::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        })
        .await
        .expect("PodSandboxStatus")
        .into_inner()
        .status
        .expect("sandbox status");
    assert_eq!(pst.state, v1::PodSandboxState::SandboxReady as i32);
    assert_eq!(
        pst.metadata.as_ref().map(|m| m.name.as_str()),
        Some("suite")
    );
    let network = pst
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .map(|o| o.network);
    assert_eq!(network, Some(v1::NamespaceMode::Node as i32), "{pst:?}");

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

    exec_streaming(&mut rt, &main).await;

    let stats = rt
        .container_stats(v1::ContainerStatsRequest {
            container_id: main.clone(),
        })
        .await
        .expect("ContainerStats")
        .into_inner()
        .stats
        .expect("stats");
    assert_eq!(
        stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(main.as_str())
    );
    let cpu = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |u| u.value);
    assert!(cpu > 0, "the shell ran, so it used CPU: {stats:?}");
    let listed = rt
        .list_container_stats(v1::ListContainerStatsRequest {
            filter: Some(v1::ContainerStatsFilter {
                pod_sandbox_id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListContainerStats")
        .into_inner()
        .stats;
    assert!(
        listed
            .iter()
            .any(|s| s.attributes.as_ref().is_some_and(|a| a.id == main)),
        "{listed:?}"
    );
    let pod_stats = rt
        .pod_sandbox_stats(v1::PodSandboxStatsRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .expect("PodSandboxStats")
        .into_inner()
        .stats
        .expect("pod stats");
    assert_eq!(
        pod_stats.attributes.as_ref().map(|a| a.id.as_str()),
        Some(pod.as_str())
    );
    assert!(pod_stats.linux.is_some(), "{pod_stats:?}");
    let all = rt
        .list_pod_sandbox_stats(v1::ListPodSandboxStatsRequest {
            filter: Some(v1::PodSandboxStatsFilter {
                id: pod.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("ListPodSandboxStats")
        .into_inner()
        .stats;
    assert_eq!(all.len(), 1, "{all:?}");

    rt.update_container_resources(v1::UpdateContainerResourcesRequest {
        container_id: main.clone(),
        linux: Some(v1::LinuxContainerResources {
            cpu_shares: 512,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .expect("UpdateContainerResources");
    // Both runtimes put a container's cgroup at <pod cgroup parent>/<container id>.
    let shares = Path::new("/sys/fs/cgroup/cpu")
        .join(&t.cgroups.0)
        .join("pod-suite")
        .join(&main)
        .join("cpu.shares");
    assert_eq!(
        std::fs::read_to_string(&shares).unwrap_or_default().trim(),
        "512",
        "{}",
        shares.display()
    );

    // A container that keeps logging: its log is rotated away and reopened.
    let ticker = rt
        .create_container(create(container(
            "ticker",
            &["sh", "-c", "while true; do echo tick; sleep 1; done"],
        )))
        .await
        .expect("CreateContainer ticker")
        .into_inner()
        .container_id;
    rt.start_container(v1::StartContainerRequest {
        container_id: ticker.clone(),
    })
    .await
    .expect("StartContainer ticker");
    let ticker_log = t.logs.join("ticker.log");
    let ticks = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.ends_with(" stdout F tick"))
            .count()
    };
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            ticks(&ticker_log) >= 1
        }),
        "ticks in {}",
        ticker_log.display()
    );
    let rotated = t.logs.join("ticker.log.1");
    std::fs::rename(&ticker_log, &rotated).unwrap();
    rt.reopen_container_log(v1::ReopenContainerLogRequest {
        container_id: ticker.clone(),
    })
    .await
    .expect("ReopenContainerLog");
    assert!(
        poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            ticks(&ticker_log) >= 1
        }),
        "ticks in the reopened {}",
        ticker_log.display()
    );
    rt.stop_container(v1::StopContainerRequest {
        container_id: ticker.clone(),
        timeout: 0,
    })
    .await
    .expect("StopContainer ticker");
    wait_state(&mut rt, &ticker, v1::ContainerState::ContainerExited).await;

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
    assert_eq!(exited.len(), 3);

    for id in [&main, &once, &ticker] {
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

/// A pod of its own network namespace for the shim-only tests.
fn own_netns_pod(name: &str, cgroups: &CgroupParent, logs: &Path) -> v1::PodSandboxConfig {
    v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: logs.display().to_string(),
        linux: Some(v1::LinuxPodSandboxConfig {
            cgroup_parent: format!("/{}/pod-{name}", cgroups.0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn busybox_container(busybox: &str, name: &str, cmd: &[&str]) -> v1::ContainerConfig {
    v1::ContainerConfig {
        metadata: Some(v1::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(v1::ImageSpec {
            image: busybox.to_string(),
            ..Default::default()
        }),
        command: cmd.iter().map(|c| (*c).to_string()).collect(),
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// Cgroup directories below the test's parent, in every hierarchy.
fn cgroup_dirs_below(parent: &CgroupParent) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for c in ["cpu", "memory", "pids", "devices", "freezer"] {
        let mut stack = vec![Path::new("/sys/fs/cgroup").join(c).join(&parent.0)];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                    stack.push(e.path());
                }
            }
        }
    }
    out
}

async fn next_event(
    events: &mut tonic::Streaming<v1::ContainerEventResponse>,
) -> v1::ContainerEventResponse {
    tokio::time::timeout(Duration::from_secs(30), events.message())
        .await
        .expect("an event within 30s")
        .expect("event stream")
        .expect("stream still open")
}

/// What only ferrolet-shim does (containerd 1.6 lacks GetContainerEvents, removes images in
/// use and serves only the v4 remote-command protocol), and the bad inputs of issue 5, each
/// with a specific status, checked to leave nothing behind.
#[test]
fn shim_only_rpcs_and_bad_inputs_leave_nothing() {
    require_root();
    let images = logs_dir("cri-shim-only-images");
    let busybox = busybox_image(&images).unwrap();
    let shim = Shim::start(&busybox);
    let logs = logs_dir("cri-shim-only-logs");
    let cgroups = CgroupParent::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = ferrolet_cri::connect_unix(&shim.socket).await.unwrap();
        let mut rt = RuntimeServiceClient::new(channel.clone());
        let mut img = ImageServiceClient::new(channel);
        let mut events = rt
            .get_container_events(v1::GetEventsRequest {})
            .await
            .expect("GetContainerEvents")
            .into_inner();

        let pod_cfg = own_netns_pod("only", &cgroups, &logs);
        let pod = rt
            .run_pod_sandbox(v1::RunPodSandboxRequest {
                config: Some(pod_cfg.clone()),
                runtime_handler: String::new(),
            })
            .await
            .expect("RunPodSandbox")
            .into_inner()
            .pod_sandbox_id;
        let create = |cfg: v1::ContainerConfig| v1::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cfg),
            sandbox_config: Some(pod_cfg.clone()),
        };
        let sleeper = rt
            .create_container(create(busybox_container(
                &busybox.name,
                "sleeper",
                &["sleep", "600"],
            )))
            .await
            .expect("CreateContainer")
            .into_inner()
            .container_id;
        let ev = next_event(&mut events).await;
        assert_eq!(
            (ev.container_id.as_str(), ev.container_event_type),
            (
                sleeper.as_str(),
                v1::ContainerEventType::ContainerCreatedEvent as i32
            )
        );
        rt.start_container(v1::StartContainerRequest {
            container_id: sleeper.clone(),
        })
        .await
        .expect("StartContainer");
        let ev = next_event(&mut events).await;
        assert_eq!(
            ev.container_event_type,
            v1::ContainerEventType::ContainerStartedEvent as i32
        );

        // The shim measures its image store on every call.
        let fs = img
            .image_fs_info(v1::ImageFsInfoRequest::default())
            .await
            .expect("ImageFsInfo")
            .into_inner();
        let used = fs
            .image_filesystems
            .first()
            .and_then(|f| f.used_bytes.as_ref())
            .map_or(0, |u| u.value);
        assert!(used > 0, "{fs:?}");

        // RemoveImage refuses an image a container uses.
        let err = img
            .remove_image(v1::RemoveImageRequest {
                image: Some(v1::ImageSpec {
                    image: busybox.name.clone(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

        let err = rt
            .attach(v1::AttachRequest {
                container_id: sleeper.clone(),
                stdout: true,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unimplemented, "{err:?}");

        // Exec requests that make no sense.
        for (req, code, words) in [
            (
                exec_request("ferrolet-no-such-container", &["sh"], false),
                Code::NotFound,
                "ferrolet-no-such-container",
            ),
            (
                exec_request(&sleeper, &[], false),
                Code::InvalidArgument,
                "cmd",
            ),
            (
                v1::ExecRequest {
                    stderr: true,
                    ..exec_request(&sleeper, &["sh"], true)
                },
                Code::InvalidArgument,
                "tty and stderr",
            ),
            (
                v1::ExecRequest {
                    container_id: sleeper.clone(),
                    cmd: vec!["true".into()],
                    ..Default::default()
                },
                Code::InvalidArgument,
                "stdin, stdout",
            ),
        ] {
            let err = rt.exec(req).await.unwrap_err();
            assert_eq!(err.code(), code, "{err:?}");
            assert!(err.message().contains(words), "{err:?}");
        }

        // A URL is refused without a subprotocol we speak (and stays valid), works once, and
        // then is gone; a made-up token never works.
        let url = rt
            .exec(exec_request(&sleeper, &["sh", "-c", "echo once"], false))
            .await
            .expect("Exec")
            .into_inner()
            .url;
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let err = ws_open(&url, "v3.channel.k8s.io")
            .await
            .expect_err("refused");
        assert!(err.contains("400"), "{err}");
        let (mut ws, proto) = ws_open(&url, "v4.channel.k8s.io,v5.channel.k8s.io")
            .await
            .expect("open");
        assert_eq!(proto, "v5.channel.k8s.io");
        let mut t = Transcript::default();
        ws_read_until(&mut ws, &mut t, |t| t.status.is_some()).await;
        assert_eq!((t.out(), t.exit_code()), ("once\n".to_string(), Some(0)));
        let err = ws_open(&url, "v5.channel.k8s.io")
            .await
            .expect_err("used up");
        assert!(err.contains("404"), "{err}");
        let (base, _) = url.rsplit_once('/').unwrap();
        let err = ws_open(&format!("{base}/0123456789abcdef"), "v5.channel.k8s.io")
            .await
            .expect_err("made-up token");
        assert!(err.contains("404"), "{err}");
        // v4 clients get the same protocol without the close channel.
        let url = rt
            .exec(exec_request(&sleeper, &["sh", "-c", "exit 7"], false))
            .await
            .unwrap()
            .into_inner()
            .url;
        let (mut ws, proto) = ws_open(&url, "v4.channel.k8s.io").await.expect("open v4");
        assert_eq!(proto, "v4.channel.k8s.io");
        let mut t = Transcript::default();
        ws_read_until(&mut ws, &mut t, |t| t.status.is_some()).await;
        assert_eq!(t.exit_code(), Some(7), "{t:?}");
        // v5's close channel ends stdin: `cat` sees the end of its input and exits.
        let url = rt
            .exec(exec_request(&sleeper, &["cat"], false))
            .await
            .unwrap()
            .into_inner()
            .url;
        let (mut ws, _) = ws_open(&url, "v5.channel.k8s.io").await.expect("open v5");
        ws_stdin(&mut ws, "echoed\n").await;
        ws.send(Message::binary(vec![255u8, 0])).await.unwrap();
        let mut t = Transcript::default();
        ws_read_until(&mut ws, &mut t, |t| t.status.is_some()).await;
        assert_eq!((t.out(), t.exit_code()), ("echoed\n".to_string(), Some(0)));
        // The exec helpers are gone: the container's cgroup holds only its own process.
        let procs = Path::new("/sys/fs/cgroup/pids")
            .join(&cgroups.0)
            .join("pod-only")
            .join(&sleeper)
            .join("cgroup.procs");
        assert!(
            poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
                std::fs::read_to_string(&procs)
                    .unwrap_or_default()
                    .lines()
                    .count()
                    == 1
            }),
            "{}: {:?}",
            procs.display(),
            std::fs::read_to_string(&procs)
        );

        // The bad inputs of issue 5.
        let not_found = [
            rt.container_status(v1::ContainerStatusRequest {
                container_id: "ferrolet-nope".into(),
                verbose: false,
            })
            .await
            .map(|_| ())
            .unwrap_err(),
            rt.pod_sandbox_status(v1::PodSandboxStatusRequest {
                pod_sandbox_id: "ferrolet-nope".into(),
                verbose: false,
            })
            .await
            .map(|_| ())
            .unwrap_err(),
            rt.start_container(v1::StartContainerRequest {
                container_id: "ferrolet-nope".into(),
            })
            .await
            .map(|_| ())
            .unwrap_err(),
            rt.exec_sync(v1::ExecSyncRequest {
                container_id: "ferrolet-nope".into(),
                cmd: vec!["true".into()],
                timeout: 5,
            })
            .await
            .map(|_| ())
            .unwrap_err(),
        ];
        for err in not_found {
            assert_eq!(err.code(), Code::NotFound, "{err:?}");
            assert!(err.message().contains("ferrolet-nope"), "{err:?}");
        }
        let mut cfg = busybox_container(&busybox.name, "noimage", &["true"]);
        cfg.image = Some(v1::ImageSpec {
            image: "ferrolet.local/missing:1".into(),
            ..Default::default()
        });
        let err = rt.create_container(create(cfg)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(
            err.message().contains("ferrolet.local/missing:1"),
            "{err:?}"
        );
        let mut cfg = busybox_container(&busybox.name, "badmount", &["true"]);
        cfg.mounts.push(v1::Mount {
            container_path: "/data".into(),
            host_path: "/ferrolet/no/such/dir".into(),
            ..Default::default()
        });
        let err = rt.create_container(create(cfg)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("/ferrolet/no/such/dir"), "{err:?}");
        let mut cfg = busybox_container(&busybox.name, "baduser", &["true"]);
        cfg.linux = Some(v1::LinuxContainerConfig {
            security_context: Some(v1::LinuxContainerSecurityContext {
                run_as_username: "nosuchuser".into(),
                ..Default::default()
            }),
            ..Default::default()
        });
        // The user is looked up in the image's /etc/passwd when the container starts.
        let bad_user = match rt.create_container(create(cfg)).await {
            Err(err) => {
                assert!(err.message().contains("nosuchuser"), "{err:?}");
                None
            }
            Ok(r) => {
                let id = r.into_inner().container_id;
                let err = rt
                    .start_container(v1::StartContainerRequest {
                        container_id: id.clone(),
                    })
                    .await
                    .unwrap_err();
                assert!(err.message().contains("nosuchuser"), "{err:?}");
                let st = container_status(&mut rt, &id).await;
                assert_eq!(
                    (st.state, st.reason.as_str()),
                    (v1::ContainerState::ContainerExited as i32, "StartError"),
                    "{st:?}"
                );
                Some(id)
            }
        };

        rt.stop_container(v1::StopContainerRequest {
            container_id: sleeper.clone(),
            timeout: 0,
        })
        .await
        .expect("StopContainer");
        loop {
            let ev = next_event(&mut events).await;
            if ev.container_id == sleeper
                && ev.container_event_type == v1::ContainerEventType::ContainerStoppedEvent as i32
            {
                break;
            }
        }
        let err = rt
            .exec(exec_request(&sleeper, &["sh"], false))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        for id in std::iter::once(&sleeper).chain(bad_user.as_ref()) {
            rt.remove_container(v1::RemoveContainerRequest {
                container_id: id.clone(),
            })
            .await
            .expect("RemoveContainer");
        }
        loop {
            let ev = next_event(&mut events).await;
            if ev.container_id == sleeper
                && ev.container_event_type == v1::ContainerEventType::ContainerDeletedEvent as i32
            {
                break;
            }
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
        // A sandbox id that was removed.
        let err = rt
            .create_container(create(busybox_container(&busybox.name, "late", &["true"])))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{err:?}");
        assert!(err.message().contains(&pod), "{err:?}");

        // Nothing left: no sandbox or container, mount, cgroup or network namespace file.
        let left = rt
            .list_containers(v1::ListContainersRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .containers;
        assert!(left.is_empty(), "{left:?}");
        let left = rt
            .list_pod_sandbox(v1::ListPodSandboxRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .items;
        assert!(left.is_empty(), "{left:?}");
        let mounts = ferrolet_tests::mounts::mounts_below(&shim.dir);
        assert!(mounts.is_empty(), "{mounts:?}");
        let dirs = cgroup_dirs_below(&cgroups);
        assert!(dirs.is_empty(), "{dirs:?}");
        let netns: Vec<_> = std::fs::read_dir(shim.dir.join("root/netns"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(netns.is_empty(), "{netns:?}");
        // With nothing using it, the image can go.
        img.remove_image(v1::RemoveImageRequest {
            image: Some(v1::ImageSpec {
                image: busybox.name.clone(),
                ..Default::default()
            }),
        })
        .await
        .expect("RemoveImage");
        let st = img
            .image_status(v1::ImageStatusRequest {
                image: Some(v1::ImageSpec {
                    image: busybox.name.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(st.image.is_none(), "{st:?}");
    });
    let _ = std::fs::remove_dir_all(&logs);
    let _ = std::fs::remove_dir_all(&images);
}
