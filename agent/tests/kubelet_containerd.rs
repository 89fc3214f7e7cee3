//! The kubelet's pod workers driving a real containerd 1.6 (private per test) as the CRI
//! runtime: containerd wires the pod network itself with the reference bridge and
//! host-local plugins; pods live under a `ferrolet-test-*` cgroup parent. The API server is
//! stood in for by the in-memory `FakeApi` (the control plane has its own tests); runtime,
//! images, CNI, cgroups and processes are real. Needs root and containerd; fails otherwise.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ferrolet::api::events::ApiEventSink;
use ferrolet::api::fake::FakeApi;
use ferrolet::api::{Api as _, ListParams};
use ferrolet::cni::Cni;
use ferrolet::cri::{CriRuntime, Runtime};
use ferrolet::pods::runtime_events::{ContainerEvents as _, CriEvents, is_unsupported};
use ferrolet::pods::worker::Deps;
use ferrolet::pods::{PodContext, PodManager};
use ferrolet::volumes::HostMounter;
use ferrolet_tests::cluster::PodNetwork;
use ferrolet_tests::containerd::Containerd;
use ferrolet_tests::images::{BUSYBOX_IMAGE, PAUSE_IMAGE, busybox_image, pause_image};
use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, Event,
    ExecAction, HTTPGetAction, HostPathVolumeSource, Lifecycle, LifecycleHandler, Pod, PodSpec,
    PodStatus, Probe, Secret, SecretVolumeSource, TCPSocketAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// A unique `/ferrolet-test-<pid>-<n>` cgroup parent, removed (children first, in every
/// hierarchy) on drop.
struct CgroupParent(String);

impl CgroupParent {
    fn new() -> CgroupParent {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        CgroupParent(format!("/ferrolet-test-{}-{n}", std::process::id()))
    }

    fn dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir("/sys/fs/cgroup")
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().join(self.0.trim_start_matches('/')))
                    .collect()
            })
            .unwrap_or_default()
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
    let _ = std::fs::remove_dir(dir);
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        for d in self.dirs() {
            remove_tree(&d);
        }
    }
}

/// A host bridge the CNI bridge plugin makes for the test, deleted on drop.
struct Bridge(String);

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

fn ctr(containerd: &Containerd, args: &[&str]) {
    containerd
        .ctr_ok(args)
        .unwrap_or_else(|e| panic!("ctr {args:?}: {e:#}"));
}

/// containerd with our images (the pause image also under containerd's default sandbox
/// image name, so it never pulls) and a bridge network in its private CNI dir.
fn setup(dir: &Path) -> (Containerd, Bridge, String, PathBuf) {
    // The agent's log goes to the test's output, shown when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "ferrolet=info".into()),
        )
        .try_init();
    let containerd = Containerd::start().expect("start a private containerd (needs root)");
    let pause = pause_image(dir).expect("pause image");
    let busybox = busybox_image(dir).expect("busybox image");
    for image in [&pause, &busybox] {
        ctr(
            &containerd,
            &["images", "import", &image.oci_archive.display().to_string()],
        );
    }
    for alias in ["k8s.gcr.io/pause:3.6", "registry.k8s.io/pause:3.6"] {
        ctr(&containerd, &["images", "tag", PAUSE_IMAGE, alias]);
    }
    // Each test gets its own bridge and a subnet no route of the host overlaps: tests of
    // other binaries run beside it with bridges of their own.
    let net = PodNetwork::pick().expect("a free pod subnet");
    let bridge = Bridge(net.bridge.clone());
    let subnet = net.cidr();
    let ipam_dir = dir.join("ipam");
    let conflist = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": net.name,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge.0,
            // The gateway address on the host lets network probes reach pod IPs.
            "isGateway": true,
            "ipMasq": false,
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": ipam_dir},
        }, {"type": "loopback"}]
    });
    std::fs::write(
        containerd.root.join("cni/net.d/10-test.conflist"),
        conflist.to_string(),
    )
    .expect("write conflist");
    (containerd, bridge, subnet, ipam_dir)
}

fn pod(name: &str, command: &str, policy: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("{name}-{}", std::process::id())),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("node-a".into()),
            restart_policy: Some(policy.into()),
            termination_grace_period_seconds: Some(2),
            containers: vec![Container {
                name: "main".into(),
                image: Some(BUSYBOX_IMAGE.into()),
                image_pull_policy: Some("IfNotPresent".into()),
                command: Some(vec!["sh".into(), "-c".into(), command.into()]),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
}

async fn wait_for<T>(what: &str, secs: u64, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn pods_run_in_containerd_with_a_cni_ip_and_are_torn_down_completely() {
    let cgroups = CgroupParent::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (containerd, _bridge, subnet, ipam_dir) = setup(dir.path());
    let prefix = subnet.trim_end_matches("0/24").to_owned();
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let runtime = Arc::new(
            CriRuntime::connect(&containerd.socket)
                .await
                .expect("connect CRI"),
        );
        let api = Arc::new(FakeApi::new());
        let root = dir.path().join("agent");
        let deps = Arc::new(Deps {
            api: api.clone(),
            runtime: runtime.clone(),
            // containerd does its own CNI; the agent's conf dir stays empty.
            network: Arc::new(Cni {
                bin_dir: "/usr/lib/cni".into(),
                conf_dir: dir.path().join("agent-cni-empty"),
                cache_dir: root.join("cni/results"),
            }),
            ctx: PodContext {
                node_name: "node-a".into(),
                root_dir: root.clone(),
                cgroup_root: cgroups.0.clone(),
                cluster_dns: vec![],
                cluster_domain: "cluster.local".into(),
                resolv_conf: "/etc/resolv.conf".into(),
                host_ips: vec!["127.0.0.1".into()],
                runtime_name: "containerd".into(),
                allocatable: std::collections::BTreeMap::new(),
            },
            cgroupfs: "/sys/fs/cgroup".into(),
            events: ApiEventSink::spawn(api.clone(), "kubelet", "node-a"),
            mounter: Arc::new(HostMounter),
        });
        let manager = PodManager::new(deps);

        let web = pod("web", "echo hello > /tmp/said; exec sleep 3600", "Always");
        let fails = pod("fails", "exit 3", "Never");
        for p in [&web, &fails] {
            api.insert(Some("default"), p);
            manager.dispatch(p.clone());
        }

        let status = wait_for("web Running with a pod IP", 120, async || {
            let s = api.object::<Pod>(Some("default"), "web")?.status?;
            (s.phase.as_deref() == Some("Running") && s.pod_ip.is_some()).then_some(s)
        })
        .await;
        let ip = status.pod_ip.clone().expect("pod IP");
        assert!(
            ip.starts_with(&prefix),
            "pod IP {ip} from the CNI subnet {subnet}"
        );
        let cs = &status.container_statuses.expect("container statuses")[0];
        assert!(cs.ready);
        assert!(
            cs.container_id
                .as_deref()
                .is_some_and(|id| id.starts_with("containerd://")),
            "{cs:?}"
        );

        // The container really runs the command, in the pod's cgroup parent.
        let uid = web.metadata.uid.clone().expect("uid");
        let selector = HashMap::from([("io.kubernetes.pod.uid".to_owned(), uid.clone())]);
        let containers = runtime
            .list_containers(None, selector.clone())
            .await
            .expect("list containers");
        assert_eq!(containers.len(), 1, "{containers:?}");
        let said = runtime
            .exec_sync(
                &containers[0].id,
                vec!["cat".into(), "/tmp/said".into()],
                Duration::from_secs(10),
            )
            .await
            .expect("exec");
        assert_eq!(String::from_utf8_lossy(&said.stdout), "hello\n");
        let pod_cgroup = Path::new("/sys/fs/cgroup/memory")
            .join(cgroups.0.trim_start_matches('/'))
            .join(format!("pod{uid}"));
        assert!(pod_cgroup.is_dir(), "{} exists", pod_cgroup.display());

        // A failing container with restartPolicy Never: Failed with its real exit code.
        let failed = wait_for("fails Failed", 120, async || {
            let s = api.object::<Pod>(Some("default"), "fails")?.status?;
            (s.phase.as_deref() == Some("Failed")).then_some(s)
        })
        .await;
        let term = failed.container_statuses.expect("statuses")[0]
            .state
            .clone()
            .and_then(|s| s.terminated)
            .expect("terminated");
        assert_eq!(term.exit_code, 3);

        // Deleted from the API: torn down, IP released, cgroup gone.
        for p in [&web, &fails] {
            manager.gone(p.metadata.uid.as_deref().unwrap_or_default());
        }
        wait_for("sandboxes removed", 60, async || {
            let left = runtime
                .list_pod_sandboxes(HashMap::new())
                .await
                .expect("list sandboxes");
            left.is_empty().then_some(())
        })
        .await;
        wait_for("workers finished", 30, async || {
            (manager.worker_count() == 0).then_some(())
        })
        .await;
        assert!(!pod_cgroup.exists(), "pod cgroup removed");
        let leased: Vec<String> = std::fs::read_dir(&ipam_dir)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|net| {
                std::fs::read_dir(net.path())
                    .into_iter()
                    .flatten()
                    .flatten()
            })
            .map(|f| f.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect();
        assert!(leased.is_empty(), "IPs still allocated: {leased:?}");
        assert!(!root.join("pods").join(&uid).exists(), "pod dir removed");
    });
}

type TestDeps = Deps<FakeApi, CriRuntime, Cni>;

/// The agent's pieces around a private containerd: the fake API, real CRI, real CNI (unused:
/// containerd does its own), real mounts and the event writer.
fn deps(
    api: &Arc<FakeApi>,
    runtime: &Arc<CriRuntime>,
    dir: &Path,
    cgroups: &CgroupParent,
) -> Arc<TestDeps> {
    let root = dir.join("agent");
    Arc::new(Deps {
        api: api.clone(),
        runtime: runtime.clone(),
        network: Arc::new(Cni {
            bin_dir: "/usr/lib/cni".into(),
            conf_dir: dir.join("agent-cni-empty"),
            cache_dir: root.join("cni/results"),
        }),
        ctx: PodContext {
            node_name: "node-a".into(),
            root_dir: root,
            cgroup_root: cgroups.0.clone(),
            cluster_dns: vec![],
            cluster_domain: "cluster.local".into(),
            resolv_conf: "/etc/resolv.conf".into(),
            host_ips: vec!["127.0.0.1".into()],
            runtime_name: "containerd".into(),
            allocatable: std::collections::BTreeMap::new(),
        },
        cgroupfs: "/sys/fs/cgroup".into(),
        events: ApiEventSink::spawn(api.clone(), "kubelet", "node-a"),
        mounter: Arc::new(HostMounter),
    })
}

fn exec_probe(cmd: &[&str]) -> Probe {
    Probe {
        exec: Some(ExecAction {
            command: Some(cmd.iter().map(|s| (*s).to_owned()).collect()),
        }),
        period_seconds: Some(1),
        failure_threshold: Some(1),
        ..Default::default()
    }
}

fn exec_hook(cmd: &[&str]) -> LifecycleHandler {
    LifecycleHandler {
        exec: Some(ExecAction {
            command: Some(cmd.iter().map(|s| (*s).to_owned()).collect()),
        }),
        ..Default::default()
    }
}

fn main_status(s: &PodStatus) -> k8s_openapi::api::core::v1::ContainerStatus {
    s.container_statuses
        .iter()
        .flatten()
        .next()
        .cloned()
        .unwrap_or_default()
}

fn condition(s: &PodStatus, kind: &str) -> Option<String> {
    s.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

async fn status_when(
    api: &FakeApi,
    name: &str,
    what: &str,
    cond: impl Fn(&PodStatus) -> bool,
) -> PodStatus {
    wait_for(what, 90, async || {
        let s = api.object::<Pod>(Some("default"), name)?.status?;
        cond(&s).then_some(s)
    })
    .await
}

async fn exec_in(runtime: &CriRuntime, status: &PodStatus, cmd: &[&str]) -> String {
    let id = main_status(status)
        .container_id
        .and_then(|id| id.strip_prefix("containerd://").map(str::to_owned))
        .expect("container id");
    let out = runtime
        .exec_sync(
            &id,
            cmd.iter().map(|s| (*s).to_owned()).collect(),
            Duration::from_secs(10),
        )
        .await
        .expect("exec");
    assert_eq!(
        out.exit_code,
        0,
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn sandboxes_gone(runtime: &CriRuntime, manager: &PodManager<FakeApi, CriRuntime, Cni>) {
    wait_for("sandboxes removed", 60, async || {
        let left = runtime
            .list_pod_sandboxes(HashMap::new())
            .await
            .expect("list sandboxes");
        left.is_empty().then_some(())
    })
    .await;
    wait_for("workers finished", 30, async || {
        (manager.worker_count() == 0).then_some(())
    })
    .await;
}

#[test]
fn probes_hooks_and_events_drive_a_real_container() {
    let cgroups = CgroupParent::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (containerd, _bridge, _subnet, _ipam) = setup(dir.path());
    let out = dir.path().join("out");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let runtime = Arc::new(
            CriRuntime::connect(&containerd.socket)
                .await
                .expect("connect CRI"),
        );
        let api = Arc::new(FakeApi::new());
        let manager = PodManager::new(deps(&api, &runtime, dir.path(), &cgroups));
        let mut p = pod("probed", "touch /tmp/healthy; exec sleep 3600", "Always");
        if let Some(spec) = p.spec.as_mut() {
            spec.volumes = Some(vec![Volume {
                name: "out".into(),
                host_path: Some(HostPathVolumeSource {
                    path: out.display().to_string(),
                    type_: Some("DirectoryOrCreate".into()),
                }),
                ..Default::default()
            }]);
            let c = &mut spec.containers[0];
            c.volume_mounts = Some(vec![VolumeMount {
                name: "out".into(),
                mount_path: "/out".into(),
                ..Default::default()
            }]);
            c.lifecycle = Some(Lifecycle {
                post_start: Some(exec_hook(&["touch", "/tmp/ready"])),
                pre_stop: Some(exec_hook(&["sh", "-c", "echo bye > /out/prestop"])),
                ..Default::default()
            });
            c.startup_probe = Some(exec_probe(&["true"]));
            c.readiness_probe = Some(exec_probe(&["test", "-f", "/tmp/ready"]));
            let mut liveness = exec_probe(&["test", "-f", "/tmp/healthy"]);
            liveness.failure_threshold = Some(2);
            c.liveness_probe = Some(liveness);
        }
        api.insert(Some("default"), &p);
        manager.dispatch(p.clone());

        // postStart made the readiness file: started, ready, Ready.
        let s = status_when(&api, "probed", "ready", |s| main_status(s).ready).await;
        assert_eq!(main_status(&s).started, Some(true));
        assert_eq!(condition(&s, "Ready").as_deref(), Some("True"));
        assert_eq!(condition(&s, "ContainersReady").as_deref(), Some("True"));

        // Readiness failing: not ready, no restart.
        exec_in(&runtime, &s, &["rm", "/tmp/ready"]).await;
        let s = status_when(&api, "probed", "not ready", |s| !main_status(s).ready).await;
        assert_eq!(condition(&s, "Ready").as_deref(), Some("False"));
        assert_eq!(main_status(&s).restart_count, 0);

        // Liveness failing: killed and restarted; the new container is ready again.
        exec_in(&runtime, &s, &["rm", "/tmp/healthy"]).await;
        let s = status_when(&api, "probed", "restarted and ready", |s| {
            main_status(s).restart_count == 1 && main_status(s).ready
        })
        .await;
        assert!(
            main_status(&s)
                .last_state
                .and_then(|l| l.terminated)
                .is_some(),
            "the killed container is the last state"
        );

        // Events reached the API, repeats merged.
        let events = wait_for("events", 30, async || {
            let list = api
                .list::<Event>(Some("default"), &ListParams::default())
                .await
                .ok()?;
            let has = |reason: &str, msg: &str| {
                list.items.iter().any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.message.as_deref().is_some_and(|m| m.contains(msg))
                })
            };
            (has("Started", "Started container main")
                && has("Created", "Created container")
                && has("Unhealthy", "Liveness probe failed")
                && has("Unhealthy", "Readiness probe failed")
                && has("Killing", "failed liveness probe, will be restarted"))
            .then_some(list.items)
        })
        .await;
        let liveness = events
            .iter()
            .find(|e| {
                e.message
                    .as_deref()
                    .is_some_and(|m| m.starts_with("Liveness probe failed"))
            })
            .expect("liveness event");
        assert!(
            liveness.count >= Some(2),
            "two failures merged: {liveness:?}"
        );
        assert_eq!(
            liveness.involved_object.field_path.as_deref(),
            Some("spec.containers{main}")
        );
        assert_eq!(liveness.involved_object.name.as_deref(), Some("probed"));

        // Deleted: the preStop hook runs before the container stops.
        manager.gone(p.metadata.uid.as_deref().unwrap_or_default());
        sandboxes_gone(&runtime, &manager).await;
        assert_eq!(
            std::fs::read_to_string(out.join("prestop")).expect("preStop wrote its file"),
            "bye\n"
        );
    });
}

fn tmpfs_mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(" - tmpfs "))
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|p| Path::new(p).starts_with(dir))
        .collect()
}

#[test]
fn secret_and_memory_volumes_are_tmpfs_config_maps_update_and_sub_paths_mount() {
    let cgroups = CgroupParent::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (containerd, _bridge, _subnet, _ipam) = setup(dir.path());
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let runtime = Arc::new(
            CriRuntime::connect(&containerd.socket)
                .await
                .expect("connect CRI"),
        );
        let api = Arc::new(FakeApi::new());
        let d = deps(&api, &runtime, dir.path(), &cgroups);
        let pods_root = d.ctx.root_dir.join("pods");
        let manager = PodManager::new(d);
        let config_map = |value: &str| ConfigMap {
            metadata: ObjectMeta {
                name: Some("conf".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            data: Some([("greeting".to_owned(), value.to_owned())].into()),
            ..Default::default()
        };
        api.insert(Some("default"), &config_map("hello"));
        api.insert(
            Some("default"),
            &Secret {
                metadata: ObjectMeta {
                    name: Some("creds".into()),
                    namespace: Some("default".into()),
                    ..Default::default()
                },
                string_data: Some([("token".to_owned(), "s3cret".to_owned())].into()),
                ..Default::default()
            },
        );
        let mut p = pod("vols", "exec sleep 3600", "Always");
        if let Some(spec) = p.spec.as_mut() {
            spec.volumes = Some(vec![
                Volume {
                    name: "conf".into(),
                    config_map: Some(ConfigMapVolumeSource {
                        name: "conf".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "creds".into(),
                    secret: Some(SecretVolumeSource {
                        secret_name: Some("creds".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                Volume {
                    name: "cache".into(),
                    empty_dir: Some(EmptyDirVolumeSource {
                        medium: Some("Memory".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ]);
            spec.containers[0].volume_mounts = Some(vec![
                VolumeMount {
                    name: "conf".into(),
                    mount_path: "/etc/conf".into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "creds".into(),
                    mount_path: "/etc/creds".into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "cache".into(),
                    mount_path: "/data".into(),
                    sub_path: Some("app".into()),
                    ..Default::default()
                },
            ]);
        }
        api.insert(Some("default"), &p);
        manager.dispatch(p.clone());
        let s = status_when(&api, "vols", "running", |s| {
            s.phase.as_deref() == Some("Running") && main_status(s).ready
        })
        .await;
        let uid = p.metadata.uid.clone().expect("uid");
        let pod_dir = pods_root.join(&uid);
        assert_eq!(
            exec_in(&runtime, &s, &["cat", "/etc/creds/token"]).await,
            "s3cret"
        );
        assert_eq!(
            exec_in(&runtime, &s, &["cat", "/etc/conf/greeting"]).await,
            "hello"
        );
        let mut mounts = tmpfs_mounts_under(&pod_dir);
        mounts.sort();
        assert_eq!(
            mounts,
            [
                pod_dir
                    .join("volumes/empty-dir/cache")
                    .display()
                    .to_string(),
                pod_dir.join("volumes/secret/creds").display().to_string(),
            ],
            "secret and Memory emptyDir on tmpfs, configMap on disk"
        );

        // subPath: the container's /data is the volume's app/ directory.
        exec_in(&runtime, &s, &["sh", "-c", "echo x > /data/file"]).await;
        assert_eq!(
            std::fs::read_to_string(pod_dir.join("volumes/empty-dir/cache/app/file"))
                .expect("file through the subPath"),
            "x\n"
        );

        // A configMap update reaches the running container.
        api.insert(Some("default"), &config_map("bonjour"));
        wait_for("the updated configMap in the container", 60, async || {
            let got = exec_in(&runtime, &s, &["cat", "/etc/conf/greeting"]).await;
            (got == "bonjour").then_some(())
        })
        .await;

        manager.gone(&uid);
        sandboxes_gone(&runtime, &manager).await;
        assert!(tmpfs_mounts_under(&pod_dir).is_empty(), "tmpfs unmounted");
        assert!(!pod_dir.exists(), "pod dir removed");
    });
}

#[test]
fn without_containerd_events_the_workers_poll_and_still_see_exits() {
    let cgroups = CgroupParent::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (containerd, _bridge, _subnet, _ipam) = setup(dir.path());
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let runtime = Arc::new(
            CriRuntime::connect(&containerd.socket)
                .await
                .expect("connect CRI"),
        );
        let events = Arc::new(
            CriEvents::connect(&containerd.socket)
                .await
                .expect("connect CRI"),
        );
        // containerd 1.6 predates GetContainerEvents.
        let Err(err) = events.subscribe().await else {
            panic!("containerd 1.6 unexpectedly streams container events");
        };
        assert!(is_unsupported(&err), "{err}");
        let api = Arc::new(FakeApi::new());
        let manager = Arc::new(PodManager::new(deps(&api, &runtime, dir.path(), &cgroups)));
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        tokio::time::timeout(
            Duration::from_secs(30),
            manager.clone().watch_runtime(events, shutdown),
        )
        .await
        .expect("the watcher gives up on an unsupported stream");
        assert!(!manager.event_driven());

        // A container exiting is still noticed (by polling) and restarted.
        let p = pod("polled", "sleep 1; exit 4", "OnFailure");
        api.insert(Some("default"), &p);
        manager.dispatch(p.clone());
        let s = status_when(&api, "polled", "a restart", |s| {
            main_status(s).restart_count >= 1
        })
        .await;
        let last = main_status(&s)
            .last_state
            .and_then(|l| l.terminated)
            .expect("last state");
        assert_eq!(last.exit_code, 4);
        manager.gone(p.metadata.uid.as_deref().unwrap_or_default());
        sandboxes_gone(&runtime, &manager).await;
    });
}

#[test]
fn a_static_pod_runs_in_containerd_and_its_mirror_shows_its_status() {
    let cgroups = CgroupParent::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (containerd, _bridge, _subnet, _ipam) = setup(dir.path());
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).expect("manifest dir");
    std::fs::write(
        manifests.join("static-web.yaml"),
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: static-web\nspec:\n  \
             terminationGracePeriodSeconds: 1\n  containers:\n  - name: main\n    \
             image: {BUSYBOX_IMAGE}\n    imagePullPolicy: Never\n    \
             command: [sh, -c, 'exec sleep 3600']\n"
        ),
    )
    .expect("manifest");
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let runtime = Arc::new(
            CriRuntime::connect(&containerd.socket)
                .await
                .expect("connect CRI"),
        );
        let api = Arc::new(FakeApi::new());
        let manager = PodManager::new(deps(&api, &runtime, dir.path(), &cgroups));
        manager.sync_static(&manifests).await;
        let s = status_when(&api, "static-web-node-a", "mirror Running", |s| {
            s.phase.as_deref() == Some("Running") && main_status(s).ready
        })
        .await;
        let mirror = api
            .object::<Pod>(Some("default"), "static-web-node-a")
            .expect("mirror");
        assert!(
            mirror
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror")),
            "{mirror:?}"
        );
        assert_eq!(exec_in(&runtime, &s, &["echo", "hi"]).await, "hi\n");

        std::fs::remove_file(manifests.join("static-web.yaml")).expect("rm manifest");
        manager.sync_static(&manifests).await;
        sandboxes_gone(&runtime, &manager).await;
        assert!(
            api.object::<Pod>(Some("default"), "static-web-node-a")
                .is_none(),
            "mirror deleted"
        );
    });
}

#[test]
fn http_and_tcp_probes_reach_the_pod_ip() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let cgroups = CgroupParent::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (containerd, _bridge, _subnet, _ipam) = setup(dir.path());
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(async {
        let runtime = Arc::new(
            CriRuntime::connect(&containerd.socket)
                .await
                .expect("connect CRI"),
        );
        let api = Arc::new(FakeApi::new());
        let manager = PodManager::new(deps(&api, &runtime, dir.path(), &cgroups));
        let mut p = pod(
            "served",
            "mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p 8080 -h /www",
            "Always",
        );
        if let Some(c) = p.spec.as_mut().map(|s| &mut s.containers[0]) {
            c.ports = Some(vec![ContainerPort {
                name: Some("http".into()),
                container_port: 8080,
                ..Default::default()
            }]);
            c.readiness_probe = Some(Probe {
                http_get: Some(HTTPGetAction {
                    port: IntOrString::String("http".into()),
                    path: Some("/healthz".into()),
                    ..Default::default()
                }),
                period_seconds: Some(1),
                failure_threshold: Some(1),
                ..Default::default()
            });
            c.liveness_probe = Some(Probe {
                tcp_socket: Some(TCPSocketAction {
                    port: IntOrString::Int(8080),
                    host: None,
                }),
                period_seconds: Some(1),
                failure_threshold: Some(3),
                ..Default::default()
            });
        }
        api.insert(Some("default"), &p);
        manager.dispatch(p.clone());
        let s = status_when(&api, "served", "ready through httpGet", |s| {
            main_status(s).ready
        })
        .await;
        assert_eq!(condition(&s, "Ready").as_deref(), Some("True"));

        // The page goes away: readiness fails over HTTP (404); TCP liveness still passes.
        exec_in(&runtime, &s, &["rm", "/www/healthz"]).await;
        let s = status_when(&api, "served", "not ready after a 404", |s| {
            !main_status(s).ready
        })
        .await;
        assert_eq!(main_status(&s).restart_count, 0, "the port still answers");

        manager.gone(p.metadata.uid.as_deref().unwrap_or_default());
        sandboxes_gone(&runtime, &manager).await;
    });
}
