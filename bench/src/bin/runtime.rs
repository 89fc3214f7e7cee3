//! CRI runtime benchmark: sequential pod start and teardown, and the memory of the
//! runtime's own processes with many pods running; `ferrolet-shim` against containerd 1.6 +
//! runc in the same run, on the same machine.
//!
//! A pod is a host-network sandbox (so no CNI work counts) with one busybox `httpd`
//! container. Start is RunPodSandbox + CreateContainer + StartContainer; teardown is
//! StopContainer + RemoveContainer + StopPodSandbox + RemovePodSandbox. Each runtime runs in a
//! cpuacct cgroup of its own (`ferrolet-bench-<pid>/<runtime>`), which its helper processes
//! (the shim's monitors, containerd's shims and runc) inherit and the containers leave, so
//! the cgroup's CPU usage is the CPU the runtime spent, and its process list is what the
//! memory figures add up.
//!
//! Build: `cargo build --release -p ferrolet-shim` and `cargo build -p ferrolet-bench --bin
//! runtime`; run as root: `runtime --shim <target>/release/ferrolet-shim`.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use ferrolet_bench::procfs::loadavg;
use ferrolet_bench::{Better, Figure};
use ferrolet_cri::v1;
use ferrolet_cri::v1::runtime_service_client::RuntimeServiceClient;
use ferrolet_tests::containerd::Containerd;
use ferrolet_tests::images::{busybox_image, pause_binary, pause_image};
use ferrolet_tests::wait::poll_until;
use serde_json::{Value, json};
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark CRI pod start/teardown and memory: ferrolet-shim vs containerd + runc"
)]
struct Args {
    /// Pods started and torn down one after another, per runtime.
    #[arg(long, default_value_t = 50)]
    count: usize,
    /// Pods kept running at once for the memory figures, per runtime.
    #[arg(long, default_value_t = 100)]
    running: usize,
    /// The `ferrolet-shim` binary (default: beside this program).
    #[arg(long)]
    shim: Option<PathBuf>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench/out/runtime.json")]
    out: PathBuf,
}

const CPUACCT: &str = "/sys/fs/cgroup/cpuacct";
/// Every cgroup v1 hierarchy the runtimes create pod cgroups in.
const HIERARCHIES: [&str; 8] = [
    "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer", "blkio",
];

/// A cgroup directory under every hierarchy, removed (after killing what is left in it) on
/// drop, children first.
struct BenchCgroup {
    name: String,
}

impl BenchCgroup {
    fn new(name: String) -> Result<Self> {
        let dir = Path::new(CPUACCT).join(&name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self { name })
    }

    /// The cpuacct cgroup `<name>/<sub>`, created.
    fn sub(&self, sub: &str) -> Result<PathBuf> {
        let dir = Path::new(CPUACCT).join(&self.name).join(sub);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        for h in HIERARCHIES.iter().chain(&["systemd", "unified"]) {
            remove_cgroup_tree(&Path::new("/sys/fs/cgroup").join(h).join(&self.name));
        }
    }
}

/// Who moves a fresh process into its cgroups.
#[derive(Clone, Copy)]
enum Mover {
    /// Another process writes its pid to each hierarchy's `cgroup.procs` (what runc does).
    Parent,
    /// The process writes `0` to each hierarchy's `tasks` before it execs (what
    /// ferrolet-shim does).
    Itself,
}

/// The kernel's part of putting a container's first process into its cgroups: a fresh
/// process is moved into a new cgroup of every v1 hierarchy, after the machine was quiet for
/// a moment. Moved by another process, the first write takes the cgroup threadgroup lock
/// for writing, which waits for an RCU grace period (writes right after it are cheap); a
/// process that moves only itself skips that lock. Median of `rounds`, in ms. A pod start
/// moves two processes: the pause process and the container's.
fn cgroup_move_floor(bench: &BenchCgroup, rounds: usize, mover: Mover) -> Result<f64> {
    let mut took = Vec::new();
    for round in 0..rounds {
        let name = format!("floor-{round}");
        let dirs: Vec<PathBuf> = HIERARCHIES
            .iter()
            .map(|h| {
                Path::new("/sys/fs/cgroup")
                    .join(h)
                    .join(&bench.name)
                    .join(&name)
            })
            .collect();
        for d in &dirs {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            if d.starts_with("/sys/fs/cgroup/cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let parent = d.parent().context("cpuset parent")?;
                    std::fs::write(d.join(f), std::fs::read(parent.join(f))?)?;
                }
            }
        }
        let moved = match mover {
            Mover::Parent => move_by_parent(&dirs),
            Mover::Itself => move_itself(&dirs),
        };
        for d in &dirs {
            remove_cgroup_tree(d);
        }
        took.push(moved?.as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    Ok(took[took.len() / 2])
}

fn move_by_parent(dirs: &[PathBuf]) -> Result<Duration> {
    let mut child = Command::new("sleep").arg("30").spawn()?;
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let moved = dirs.iter().try_for_each(|d| move_into(d, child.id()));
    let elapsed = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    moved.map(|()| elapsed)
}

/// Times, inside a freshly forked child, its own `tasks` writes; the child reports the
/// nanoseconds on a pipe before it execs.
fn move_itself(dirs: &[PathBuf]) -> Result<Duration> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let tasks = dirs
        .iter()
        .map(|d| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("tasks"))
                .with_context(|| format!("opening {}/tasks", d.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let (read_end, write_end) = nix::unistd::pipe()?;
    let report = write_end.as_raw_fd();
    std::thread::sleep(Duration::from_millis(200));
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    // SAFETY: between fork and exec the closure only calls clock_gettime and write(2) on
    // descriptors opened before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let t = Instant::now();
            for f in &tasks {
                if libc::write(f.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            let ns = u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
            libc::write(report, ns.to_ne_bytes().as_ptr().cast(), 8);
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    drop(write_end);
    let mut child = spawned.context("starting a process that moves itself")?;
    let mut buf = [0u8; 8];
    let read = std::fs::File::from(read_end).read_exact(&mut buf);
    let _ = child.kill();
    let _ = child.wait();
    read.context("reading the child's timing")?;
    Ok(Duration::from_nanos(u64::from_ne_bytes(buf)))
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    poll_until(Duration::from_secs(5), Duration::from_millis(10), || {
        for pid in pids_in(dir) {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::fs::remove_dir(dir).is_ok() || !dir.exists()
    });
}

fn pids_in(cgroup: &Path) -> Vec<i32> {
    std::fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn move_into(cgroup: &Path, pid: u32) -> Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
        .with_context(|| format!("moving {pid} into {}", cgroup.display()))
}

/// CPU time used so far by the processes of a cpuacct cgroup, living and dead.
fn cgroup_cpu(cgroup: &Path) -> Duration {
    let ns = std::fs::read_to_string(cgroup.join("cpuacct.usage"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

/// Process count and summed `Rss`/`Pss` (KiB) of a cgroup's processes.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    processes: usize,
    rss_kib: u64,
    pss_kib: u64,
}

fn cgroup_memory(cgroup: &Path) -> Memory {
    let mut m = Memory::default();
    for pid in pids_in(cgroup) {
        let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        m.processes += 1;
        for line in rollup.lines() {
            let mut it = line.split_whitespace();
            let (Some(key), Some(kib)) = (it.next(), it.next().and_then(|v| v.parse::<u64>().ok()))
            else {
                continue;
            };
            match key {
                "Rss:" => m.rss_kib += kib,
                "Pss:" => m.pss_kib += kib,
                _ => {}
            }
        }
    }
    m
}

/// A private `ferrolet-shim serve`; killed on drop (its pods are torn down before).
struct ShimServer {
    child: Child,
    dir: PathBuf,
    state: PathBuf,
    socket: PathBuf,
}

/// A directory for a runtime's volatile state on tmpfs (`/dev/shm`), where hosts keep it
/// (`/run`): both runtimes get one, so neither pays the disk for its records and mount
/// points while the other does not.
fn volatile_dir(what: &str) -> Result<PathBuf> {
    let dir = Path::new("/dev/shm").join(format!("ferrolet-bench-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

impl ShimServer {
    fn start(bin: &Path, busybox: &Path, pause: &Path, cgroup: &Path) -> Result<ShimServer> {
        let dir = ferrolet_tests::unique_temp_dir("bench-shim")?;
        let root = dir.join("root");
        let out = Command::new(bin)
            .args(["images", "import", "--root"])
            .arg(&root)
            .arg(busybox)
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        ensure!(
            out.status.success(),
            "importing busybox: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let socket = dir.join("cri.sock");
        let log = std::fs::File::create(dir.join("shim.log"))?;
        let state = volatile_dir("shim")?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--root")
            .arg(&root)
            .arg("--state")
            .arg(&state)
            .arg("--pause-binary")
            .arg(pause)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = ShimServer {
            child,
            dir,
            state,
            socket,
        };
        move_into(cgroup, server.child.id())?;
        let up = poll_until(Duration::from_secs(30), Duration::from_millis(10), || {
            std::os::unix::net::UnixStream::connect(&server.socket).is_ok()
        });
        ensure!(
            up,
            "ferrolet-shim did not listen on {}",
            server.socket.display()
        );
        Ok(server)
    }
}

impl Drop for ShimServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        ferrolet_tests::mounts::unmount_below(&self.dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        ferrolet_tests::mounts::unmount_below(&self.state);
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

/// One runtime under test.
struct Runtime {
    label: &'static str,
    client: RuntimeServiceClient<Channel>,
    /// The cpuacct cgroup holding the runtime's own processes.
    cgroup: PathBuf,
    /// Parent of the pod cgroups, relative to the hierarchy roots.
    pod_parent: String,
    busybox: String,
    logs: PathBuf,
    uid_tag: String,
}

/// Wall and runtime-CPU time of one operation, with its steps' wall times.
#[derive(Debug, Clone, Default)]
struct Sample {
    wall: Duration,
    cpu: Duration,
    steps: Vec<Duration>,
}

struct Pod {
    sandbox: String,
    container: String,
    port: u16,
}

impl Runtime {
    fn sandbox_config(&self, i: usize) -> v1::PodSandboxConfig {
        let host = v1::NamespaceOption {
            network: v1::NamespaceMode::Node as i32,
            pid: v1::NamespaceMode::Container as i32,
            ipc: v1::NamespaceMode::Pod as i32,
            ..Default::default()
        };
        v1::PodSandboxConfig {
            metadata: Some(v1::PodSandboxMetadata {
                name: format!("bench-{i}"),
                uid: format!("{}-{i}", self.uid_tag),
                namespace: "bench".into(),
                attempt: 0,
            }),
            log_directory: self.logs.join(i.to_string()).display().to_string(),
            labels: HashMap::from([("bench".to_string(), "runtime".to_string())]),
            linux: Some(v1::LinuxPodSandboxConfig {
                cgroup_parent: format!("/{}/pod-{i}", self.pod_parent),
                security_context: Some(v1::LinuxSandboxSecurityContext {
                    namespace_options: Some(host),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn container_config(&self, port: u16) -> v1::ContainerConfig {
        // httpd is the init of its own PID namespace, where SIGTERM without a handler is
        // ignored; the shell's trap makes the stop signal end the container, as in a real
        // pod, instead of every stop waiting out its timeout.
        let script = format!("trap 'exit 0' TERM; httpd -f -p 127.0.0.1:{port} -h /var/www & wait");
        v1::ContainerConfig {
            metadata: Some(v1::ContainerMetadata {
                name: "httpd".into(),
                attempt: 0,
            }),
            image: Some(v1::ImageSpec {
                image: self.busybox.clone(),
                ..Default::default()
            }),
            command: vec!["sh".into(), "-c".into(), script],
            log_path: "httpd.log".into(),
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
        }
    }

    /// RunPodSandbox + CreateContainer + StartContainer, timed.
    async fn start_pod(&mut self, i: usize, port: u16) -> Result<(Pod, Sample)> {
        let sandbox_config = self.sandbox_config(i);
        let container_config = self.container_config(port);
        let cpu0 = cgroup_cpu(&self.cgroup);
        let t0 = Instant::now();
        let sandbox = self
            .client
            .run_pod_sandbox(v1::RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .with_context(|| format!("{} RunPodSandbox {i}", self.label))?
            .into_inner()
            .pod_sandbox_id;
        let t1 = Instant::now();
        let container = self
            .client
            .create_container(v1::CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(container_config),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .with_context(|| format!("{} CreateContainer {i}", self.label))?
            .into_inner()
            .container_id;
        let t2 = Instant::now();
        self.client
            .start_container(v1::StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .with_context(|| format!("{} StartContainer {i}", self.label))?;
        let t3 = Instant::now();
        let cpu = cgroup_cpu(&self.cgroup).saturating_sub(cpu0);
        let pod = Pod {
            sandbox,
            container,
            port,
        };
        Ok((
            pod,
            Sample {
                wall: t3 - t0,
                cpu,
                steps: vec![t1 - t0, t2 - t1, t3 - t2],
            },
        ))
    }

    /// StopContainer + RemoveContainer + StopPodSandbox + RemovePodSandbox, timed.
    async fn teardown(&mut self, pod: &Pod) -> Result<Sample> {
        let cpu0 = cgroup_cpu(&self.cgroup);
        let t0 = Instant::now();
        self.client
            .stop_container(v1::StopContainerRequest {
                container_id: pod.container.clone(),
                timeout: 10,
            })
            .await
            .with_context(|| format!("{} StopContainer", self.label))?;
        let t1 = Instant::now();
        self.client
            .remove_container(v1::RemoveContainerRequest {
                container_id: pod.container.clone(),
            })
            .await
            .with_context(|| format!("{} RemoveContainer", self.label))?;
        let t2 = Instant::now();
        self.client
            .stop_pod_sandbox(v1::StopPodSandboxRequest {
                pod_sandbox_id: pod.sandbox.clone(),
            })
            .await
            .with_context(|| format!("{} StopPodSandbox", self.label))?;
        let t3 = Instant::now();
        self.client
            .remove_pod_sandbox(v1::RemovePodSandboxRequest {
                pod_sandbox_id: pod.sandbox.clone(),
            })
            .await
            .with_context(|| format!("{} RemovePodSandbox", self.label))?;
        let t4 = Instant::now();
        let cpu = cgroup_cpu(&self.cgroup).saturating_sub(cpu0);
        Ok(Sample {
            wall: t4 - t0,
            cpu,
            steps: vec![t1 - t0, t2 - t1, t3 - t2, t4 - t3],
        })
    }

    /// Fails unless the pod's httpd answers within 30 s (checked outside the timings; a
    /// loaded machine can take many seconds to start 100 pods' httpd).
    fn check_serving(&self, pod: &Pod) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], pod.port));
        let up = poll_until(Duration::from_secs(30), Duration::from_millis(5), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        });
        ensure!(
            up,
            "{}: httpd of pod {} never listened on {addr}",
            self.label,
            pod.sandbox
        );
        Ok(())
    }

    /// Every pod sandbox of the runtime, as listed (to check teardown left none).
    async fn sandboxes(&mut self) -> Result<usize> {
        Ok(self
            .client
            .list_pod_sandbox(v1::ListPodSandboxRequest { filter: None })
            .await?
            .into_inner()
            .items
            .len())
    }
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// Nearest-rank percentiles in milliseconds.
fn stats(samples: &[Duration]) -> Stats {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let idx = ((p / 100.0) * ms.len() as f64).ceil() as usize;
        ms[idx.clamp(1, ms.len()) - 1]
    };
    Stats {
        p50: rank(50.0),
        p99: rank(99.0),
        mean: ms.iter().sum::<f64>() / ms.len() as f64,
    }
}

/// Port of pod `i` of runtime `r` in phase `phase`: distinct for everything running at once.
/// The host port of pod `i` of runtime `r` in `phase`: all below 32768, the start of Linux's
/// ephemeral range, so no client socket of another program can hold one.
fn port(r: usize, phase: usize, i: usize) -> u16 {
    u16::try_from(20_000 + 2_000 * phase + 1_000 * r + i).unwrap_or(u16::MAX)
}

fn side(st: Stats) -> Value {
    json!({"p50_ms": st.p50, "p99_ms": st.p99, "mean_ms": st.mean})
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the runtime benchmark needs root"
    );
    ensure!(args.count > 0, "--count must be at least 1");
    ensure!(
        args.count <= 1000 && args.running <= 1000,
        "at most 1000 pods per phase"
    );
    let shim_bin = match args.shim.clone() {
        Some(p) => p,
        None => std::env::current_exe()?
            .parent()
            .context("program has no directory")?
            .join("ferrolet-shim"),
    };
    ensure!(
        shim_bin.exists(),
        "{} is missing: build it with cargo build --release -p ferrolet-shim and pass --shim",
        shim_bin.display()
    );
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run(&args, &shim_bin))
}

async fn run(args: &Args, shim_bin: &Path) -> Result<()> {
    let tag = std::process::id();
    let work = ferrolet_tests::unique_temp_dir("bench-runtime")?;
    let _cleanup_work = DirGuard(work.clone());
    eprintln!("building/reading the test images...");
    let busybox = busybox_image(&work)?;
    let pause = pause_image(&work)?;
    let pause_bin = pause_binary()?;

    let cgroup = BenchCgroup::new(format!("ferrolet-bench-{tag}"))?;
    let shim_cg = cgroup.sub("ferrolet-shim")?;
    let ctrd_cg = cgroup.sub("containerd")?;

    eprintln!("starting ferrolet-shim and containerd...");
    let shim = ShimServer::start(shim_bin, &busybox.oci_archive, &pause_bin, &shim_cg)?;
    let containerd = Containerd::start_with_state(Some(volatile_dir("containerd")?))
        .context("starting a private containerd")?;
    move_into(&ctrd_cg, containerd.pid().context("containerd pid")?)?;
    for archive in [&busybox.oci_archive, &pause.oci_archive] {
        containerd.ctr_ok(&["images", "import", &archive.display().to_string()])?;
    }
    // containerd 1.6 runs its default sandbox image; give it ours under both names it uses.
    for name in ["k8s.gcr.io/pause:3.6", "registry.k8s.io/pause:3.6"] {
        containerd.ctr_ok(&["images", "tag", &pause.name, name])?;
    }

    let mut runtimes = Vec::new();
    for (label, socket, cg) in [
        ("ferrolet-shim", &shim.socket, &shim_cg),
        ("containerd", &containerd.socket, &ctrd_cg),
    ] {
        let channel = ferrolet_cri::connect_unix(socket).await?;
        runtimes.push(Runtime {
            label,
            client: RuntimeServiceClient::new(channel),
            cgroup: cg.clone(),
            pod_parent: format!("ferrolet-bench-{tag}/pods-{label}"),
            busybox: busybox.name.clone(),
            logs: work.join(format!("logs-{label}")),
            uid_tag: format!("bench-{tag}-{label}"),
        });
    }

    // Warm up caches (image layers, binaries, containerd's snapshots) outside the timings.
    for r in &mut runtimes {
        for n in 0..3 {
            let (pod, _) = r.start_pod(900 + n, port(0, 3, n) + 100).await?;
            r.check_serving(&pod)?;
            r.teardown(&pod).await?;
        }
    }
    let idle: Vec<Memory> = runtimes.iter().map(|r| cgroup_memory(&r.cgroup)).collect();
    let load_before = loadavg();

    // Interleave the runtimes pod by pod so that drifts in machine load hit both.
    eprintln!(
        "{} sequential pod starts and teardowns per runtime...",
        args.count
    );
    let mut start: Vec<Vec<Sample>> = vec![Vec::new(), Vec::new()];
    let mut stop: Vec<Vec<Sample>> = vec![Vec::new(), Vec::new()];
    let mut pods: Vec<Vec<Pod>> = vec![Vec::new(), Vec::new()];
    for i in 0..args.count {
        for (r, rt) in runtimes.iter_mut().enumerate() {
            let (pod, sample) = rt.start_pod(i, port(r, 0, i)).await?;
            start[r].push(sample);
            rt.check_serving(&pod)?;
            pods[r].push(pod);
        }
    }
    for (ours, theirs) in pods[0].iter().zip(&pods[1]) {
        stop[0].push(runtimes[0].teardown(ours).await?);
        stop[1].push(runtimes[1].teardown(theirs).await?);
    }
    for rt in &mut runtimes {
        let left = rt.sandboxes().await?;
        ensure!(
            left == 0,
            "{}: {left} sandboxes left after teardown",
            rt.label
        );
    }

    eprintln!("{} pods running per runtime...", args.running);
    let mut busy: Vec<Memory> = Vec::new();
    for (r, rt) in runtimes.iter_mut().enumerate() {
        let mut running = Vec::new();
        for i in 0..args.running {
            let (pod, _) = rt.start_pod(i, port(r, 1, i)).await?;
            running.push(pod);
        }
        for pod in &running {
            rt.check_serving(pod)?;
        }
        busy.push(cgroup_memory(&rt.cgroup));
        for pod in &running {
            rt.teardown(pod).await?;
        }
    }
    let load_after = loadavg();
    let move_floor = cgroup_move_floor(&cgroup, 15, Mover::Parent)?;
    let self_move = cgroup_move_floor(&cgroup, 15, Mover::Itself)?;

    let n = args.running as f64;
    let mut report = serde_json::Map::new();
    println!(
        "CRI pod start and teardown, {} pods one after another per runtime \
         (hostNetwork sandbox + busybox httpd), ferrolet-shim vs containerd 1.6 + runc\n",
        args.count
    );
    println!(
        "| op | ferrolet-shim p50 | ferrolet-shim p99 | containerd p50 | containerd p99 | speedup p50 | speedup p99 |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut figures = vec![
        Figure::alone(
            "kernel: a fresh process moved into new cgroups by another process (v1, all hierarchies; runc's way); a pod start moves two",
            "ms",
            move_floor,
            Better::Lower,
        ),
        Figure::alone(
            "kernel: a fresh process moving itself into new cgroups (v1, all hierarchies; ferrolet-shim's way)",
            "ms",
            self_move,
            Better::Lower,
        ),
    ];
    let peer = "containerd 1.6 + runc";
    for (op, samples) in [("start", &start), ("teardown", &stop)] {
        let wall = |v: &[Sample]| stats(&v.iter().map(|x| x.wall).collect::<Vec<_>>());
        let cpu = |v: &[Sample]| stats(&v.iter().map(|x| x.cpu).collect::<Vec<_>>());
        for (kind, f) in [
            ("wall", &wall as &dyn Fn(&[Sample]) -> Stats),
            ("runtime CPU", &cpu),
        ] {
            let (o, c) = (f(&samples[0]), f(&samples[1]));
            println!(
                "| {op} {kind} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1}x | {:.1}x |",
                o.p50,
                o.p99,
                c.p50,
                c.p99,
                c.p50 / o.p50,
                c.p99 / o.p99
            );
            let met = |ratio: f64| ratio >= 7.0;
            let (unit_name, p50_target) = if kind == "wall" {
                (format!("pod {op}"), Some(c.p50 / o.p50))
            } else {
                (format!("pod {op} runtime CPU"), None)
            };
            let p50 = Figure::versus(
                &format!("{unit_name} p50"),
                "ms",
                o.p50,
                c.p50,
                peer,
                Better::Lower,
            );
            figures.push(match p50_target {
                Some(ratio) => p50.target(">= 7x faster", met(ratio)),
                None => p50,
            });
            if kind == "wall" {
                figures.push(Figure::versus(
                    &format!("{unit_name} p99"),
                    "ms",
                    o.p99,
                    c.p99,
                    peer,
                    Better::Lower,
                ));
            }
            report.insert(
                format!("{op}_{}", kind.replace(' ', "_").to_lowercase()),
                json!({"ferrolet-shim": side(o), "containerd": side(c),
                       "speedup_p50": c.p50 / o.p50, "speedup_p99": c.p99 / o.p99}),
            );
        }
    }
    let step_names: [&[&str]; 2] = [
        &["RunPodSandbox", "CreateContainer", "StartContainer"],
        &[
            "StopContainer",
            "RemoveContainer",
            "StopPodSandbox",
            "RemovePodSandbox",
        ],
    ];
    println!("\nwall p50 per call:\n");
    println!("| call | ferrolet-shim | containerd |");
    println!("|---|---|---|");
    for (samples, names) in [&start, &stop].into_iter().zip(step_names) {
        for (k, name) in names.iter().enumerate() {
            let p = |v: &[Sample]| stats(&v.iter().map(|x| x.steps[k]).collect::<Vec<_>>()).p50;
            println!(
                "| {name} | {:.2} ms | {:.2} ms |",
                p(&samples[0]),
                p(&samples[1])
            );
        }
    }

    println!(
        "\nmemory of the runtime's own processes (ferrolet-shim: shim + monitors; containerd: \
         daemon + containerd-shim-runc-v2), {} pods running:\n",
        args.running
    );
    println!(
        "| runtime | processes | RSS sum | PSS sum | RSS per pod | PSS per pod | idle PSS | added PSS per pod |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mib = |kib: u64| kib as f64 / 1024.0;
    for (r, rt) in runtimes.iter().enumerate() {
        let (m, i) = (busy[r], idle[r]);
        let added = m.pss_kib.saturating_sub(i.pss_kib) as f64 / n;
        println!(
            "| {} | {} | {:.1} MiB | {:.1} MiB | {:.0} KiB | {:.0} KiB | {:.1} MiB | {:.0} KiB |",
            rt.label,
            m.processes,
            mib(m.rss_kib),
            mib(m.pss_kib),
            m.rss_kib as f64 / n,
            m.pss_kib as f64 / n,
            mib(i.pss_kib),
            added
        );
        report.insert(
            format!("memory_{}", rt.label),
            json!({"processes": m.processes, "rss_kib": m.rss_kib, "pss_kib": m.pss_kib,
                   "rss_kib_per_pod": m.rss_kib as f64 / n, "pss_kib_per_pod": m.pss_kib as f64 / n,
                   "idle_rss_kib": i.rss_kib, "idle_pss_kib": i.pss_kib,
                   "added_pss_kib_per_pod": added}),
        );
    }
    let per_pod = |m: Memory| m.pss_kib as f64 / n / 1024.0;
    figures.push(
        Figure::versus(
            &format!("runtime PSS per running pod ({} pods)", args.running),
            "MiB",
            per_pod(busy[0]),
            per_pod(busy[1]),
            peer,
            Better::Lower,
        )
        .target("< 1 MB", busy[0].pss_kib as f64 / n < 1000.0),
    );
    println!(
        "\nkernel: a fresh process moved into new cgroups of every v1 hierarchy takes \
         {move_floor:.2} ms when another process moves it (runc's way) and {self_move:.2} ms \
         when it moves itself (ferrolet-shim's way), median of 15; a pod start moves two \
         (pause and container)"
    );
    report.insert("cgroup_move_floor_ms".into(), json!(move_floor));
    report.insert("cgroup_self_move_ms".into(), json!(self_move));
    println!("\nload average: {load_before} before the timed phase, {load_after} at the end");
    report.insert(
        "benchmark".into(),
        json!("cri pod start/teardown and memory"),
    );
    report.insert("pods".into(), json!(args.count));
    report.insert("running".into(), json!(args.running));
    report.insert("loadavg_before".into(), json!(load_before));
    report.insert("loadavg_after".into(), json!(load_after));
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        &args.out,
        serde_json::to_string_pretty(&Value::Object(report))?,
    )
    .with_context(|| format!("writing {}", args.out.display()))?;
    ferrolet_bench::write_figures(&args.out, &figures)
        .with_context(|| format!("writing the figures beside {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    drop(runtimes);
    drop(containerd);
    drop(shim);
    drop(cgroup);
    Ok(())
}

/// Removes `dir` (after unmounting anything left below it) when dropped.
struct DirGuard(PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        ferrolet_tests::mounts::unmount_below(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
