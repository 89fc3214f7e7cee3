//! A whole one-node cluster on this host, private to one test: the real
//! `ferrolet-control-plane` (embedded SQLite, loopback, a free port), the real
//! `ferrolet-shim` (its own root and a `ferrolet-test-*` cgroup parent), our CNI plugins with
//! a bridge + host-local + portmap conflist (a bridge and a private subnet of the test's
//! own), and the `ferrolet` agent. Everything is driven through public interfaces: kubectl
//! with the control plane's admin kubeconfig, TCP to pod IPs from the host.
//!
//! Dropping the [`Cluster`] stops the agent, the shim and every process left in the
//! cgroup parent, unmounts what the shim mounted, deletes the bridge, stops the control
//! plane and removes the temp dir, even when the test failed half way.
//!
//! With [`NodeRuntime::Containerd`] the agent runs on a private containerd 1.6 + runc instead
//! of `ferrolet-shim` (containerd then wires pod networking itself, with the reference CNI
//! plugins of `/usr/lib/cni` and the same bridge conflist), to compare whole node stacks.
//!
//! The binaries come from the cargo target dir this test was built in: build them first
//! with `cargo build -p ferrolet -p ferrolet-shim -p ferrolet-control-plane -p ferrolet-cni --bins`.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use crate::containerd::Containerd;
use crate::images::{busybox_image, busybox_v2_image, pause_binary, pause_image};
use crate::mounts::unmount_below;
use crate::process::output_within;
use crate::wait::poll_until;

/// The CNI plugin executables of `cni-plugins/`.
pub const CNI_PLUGINS: &[&str] = &["bridge", "host-local", "loopback", "portmap"];
/// How long one kubectl call may take.
const KUBECTL_DEADLINE: Duration = Duration::from_secs(60);
/// How long a daemon may take to come up.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// Fails unless this process is root: the cluster needs namespaces, cgroups and netlink.
pub fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "end-to-end cluster tests need root (namespaces, cgroups, netlink); running as uid {euid}"
    );
    Ok(())
}

/// `<pid>-<n>`, unique within this test process run.
pub fn next_unique() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The cargo target profile dir this program was built in (`target/debug`), where the
/// workspace's binaries are: above `deps/` for a test, beside it for a binary (a benchmark).
/// `FERROLET_TEST_BIN_DIR` overrides it (a copy of the binaries of one build, when other
/// builds share the target dir).
pub fn binaries_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("FERROLET_TEST_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("finding the program's own executable")?;
    // A test: <target>/<profile>/deps/<test>-<hash>; a binary: <target>/<profile>/<name>.
    let dir = exe.parent();
    let dir = if dir.and_then(Path::file_name).is_some_and(|n| n == "deps") {
        dir.and_then(Path::parent)
    } else {
        dir
    };
    dir.map(Path::to_path_buf)
        .with_context(|| format!("{} has no target dir above it", exe.display()))
}

/// Waits until the control plane `daemon` has written `kubeconfig` and answers `/readyz`
/// through `kubectl`; fails with its log if it dies or does not answer in time.
pub fn wait_control_plane(
    daemon: &mut Daemon,
    kubeconfig: &Path,
    kubectl: impl Fn(&[&str]) -> anyhow::Result<Output>,
) -> anyhow::Result<()> {
    let up = poll_until(START_DEADLINE, Duration::from_millis(50), || {
        daemon.running()
            && kubeconfig.exists()
            && kubectl(&["get", "--raw", "/readyz"]).is_ok_and(|o| o.status.success())
    });
    daemon.ensure_running()?;
    ensure!(
        up,
        "the control plane did not answer within {START_DEADLINE:?}; its log:\n{}",
        daemon.log_tail(60)
    );
    Ok(())
}

/// A binary of this workspace in [`binaries_dir`], or an error telling how to build it.
pub fn workspace_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = binaries_dir()?.join(name);
    ensure!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build -p ferrolet -p ferrolet-shim \
         -p ferrolet-control-plane -p ferrolet-cni --bins` (same CARGO_TARGET_DIR as the tests)",
        path.display()
    );
    Ok(path)
}

/// A cgroup parent `ferrolet-test-<pid>-<n>`; on drop every process left in it is killed and
/// it is removed (children first) in every hierarchy.
#[derive(Debug)]
pub struct CgroupParent {
    /// The name, without a leading `/`.
    pub name: String,
}

impl CgroupParent {
    pub fn new() -> CgroupParent {
        CgroupParent {
            name: format!("ferrolet-test-{}", next_unique()),
        }
    }

    fn dirs(&self) -> Vec<PathBuf> {
        fs::read_dir("/sys/fs/cgroup")
            .map(|d| d.flatten().map(|e| e.path().join(&self.name)).collect())
            .unwrap_or_default()
    }

    /// Kills every process in the parent (any hierarchy) and removes it.
    pub fn remove(&self) {
        for dir in self.dirs() {
            kill_and_remove_tree(&dir);
        }
    }
}

impl Default for CgroupParent {
    fn default() -> Self {
        CgroupParent::new()
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        self.remove();
    }
}

fn kill_and_remove_tree(dir: &Path) {
    if !dir.exists() {
        return;
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                kill_and_remove_tree(&e.path());
            }
        }
    }
    poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            // SAFETY: kill(2) takes plain integers and touches no memory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        fs::remove_dir(dir).is_ok() || !dir.exists()
    });
}

/// One long-running process of the cluster, its output in `<dir>/<name>.log`; killed on drop.
#[derive(Debug)]
pub struct Daemon {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Daemon {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> anyhow::Result<Daemon> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Daemon {
            name: name.to_owned(),
            log,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// True while the process has not exited.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Fails (with the end of its log) if the process exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}; end of its log:\n{}",
                self.name,
                self.log_tail(60)
            );
        }
        Ok(())
    }

    /// The last `lines` lines of the daemon's log.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The last `lines` lines of a file, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The pod network of one test: a bridge name and a /24 no route of this host overlaps.
#[derive(Debug, Clone)]
pub struct PodNetwork {
    /// The CNI network name.
    pub name: String,
    pub bridge: String,
    pub subnet: Ipv4Addr,
    pub prefix: u8,
}

/// The pod subnets this process picked, so clusters up at once never share one.
static PICKED: std::sync::Mutex<Vec<(Ipv4Addr, u8)>> = std::sync::Mutex::new(Vec::new());

impl PodNetwork {
    /// A network for one test: a unique bridge name and a /24 that no route of this host
    /// overlaps (tests of other processes pick from the same space and see each other's
    /// bridges).
    pub fn pick() -> anyhow::Result<PodNetwork> {
        let unique = next_unique();
        let routes = host_ipv4_prefixes()?;
        let seed = std::process::id() as usize * 7 + unique.len();
        for i in 0..2000 {
            let n = (seed + i * 13) % (50 * 256);
            let octets = [
                10,
                200 + u8::try_from(n / 256).unwrap_or(0),
                (n % 256) as u8,
                0,
            ];
            let subnet = Ipv4Addr::from(octets);
            // A cluster's bridge (and so its route) appears at its first pod: the subnets
            // this process already gave out count as taken too.
            let mut taken = PICKED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !routes
                .iter()
                .chain(taken.iter())
                .any(|(net, len)| overlaps(*net, *len, subnet, 24))
            {
                taken.push((subnet, 24));
                return Ok(PodNetwork {
                    name: format!("e2e-{unique}"),
                    bridge: format!("fe2e{}", unique.replace('-', "x")),
                    subnet,
                    prefix: 24,
                });
            }
        }
        bail!("no free 10.200.0.0/13-ish /24 for the test's pod network")
    }

    /// `a.b.c.0/24`.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.subnet, self.prefix)
    }

    /// Whether `ip` lies in the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        overlaps(self.subnet, self.prefix, ip, 32)
    }

    /// The host-side interfaces (veths) enslaved to the bridge now.
    pub fn bridge_ports(&self) -> Vec<String> {
        fs::read_dir(format!("/sys/class/net/{}/brif", self.bridge))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn overlaps(a: Ipv4Addr, a_len: u8, b: Ipv4Addr, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    if len == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(len));
    (u32::from(a) & mask) == (u32::from(b) & mask)
}

/// Every IPv4 destination prefix in every routing table of this host (default routes excluded).
fn host_ipv4_prefixes() -> anyhow::Result<Vec<(Ipv4Addr, u8)>> {
    let out = output_within(
        Command::new("ip").args(["-4", "-o", "route", "show", "table", "all"]),
        Duration::from_secs(10),
    )?;
    ensure!(
        out.status.success(),
        "ip route: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut prefixes = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let mut dst = words.next().unwrap_or_default();
        if matches!(
            dst,
            "local" | "broadcast" | "unicast" | "blackhole" | "unreachable"
        ) {
            dst = words.next().unwrap_or_default();
        }
        if dst == "default" {
            continue;
        }
        let (ip, len) = dst.split_once('/').unwrap_or((dst, "32"));
        if let (Ok(ip), Ok(len)) = (ip.parse::<Ipv4Addr>(), len.parse::<u8>()) {
            prefixes.push((ip, len));
        }
    }
    Ok(prefixes)
}

/// The CRI runtime the agent of a [`Cluster`] runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NodeRuntime {
    /// `ferrolet-shim`; the agent runs our CNI plugins itself.
    #[default]
    FerroletShim,
    /// A private containerd 1.6 + runc, which runs the reference CNI plugins itself.
    Containerd,
}

/// What differs between clusters a test starts.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra arguments for `ferrolet`.
    pub agent_args: Vec<String>,
    /// The CRI runtime under the agent.
    pub runtime: NodeRuntime,
}

/// A one-node cluster owned by one test.
#[derive(Debug)]
pub struct Cluster {
    pub dir: PathBuf,
    pub node_name: String,
    /// The control plane's admin kubeconfig.
    pub kubeconfig: PathBuf,
    pub cri_socket: PathBuf,
    pub shim_root: PathBuf,
    pub agent_root: PathBuf,
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    /// host-local's `dataDir`: one file per allocated IP under `<it>/<network name>/`.
    pub ipam_dir: PathBuf,
    pub network: PodNetwork,
    pub cgroup: CgroupParent,
    /// The loopback port of the agent's kubelet API.
    pub kubelet_port: u16,
    pub options: ClusterOptions,
    agent: Option<Daemon>,
    shim: Option<Daemon>,
    containerd: Option<Containerd>,
    control_plane: Option<Daemon>,
}

impl Cluster {
    /// Starts control plane, shim and agent, and waits until the node is Ready.
    pub fn start(options: ClusterOptions) -> anyhow::Result<Cluster> {
        require_root()?;
        let dir = crate::unique_temp_dir("e2e")?;
        let mut cluster = Cluster {
            node_name: format!("e2e-node-{}", next_unique()),
            kubeconfig: dir.join("cp/admin.kubeconfig"),
            cri_socket: dir.join("shim.sock"),
            shim_root: dir.join("shim"),
            agent_root: dir.join("agent"),
            cni_bin_dir: dir.join("cni/bin"),
            cni_conf_dir: dir.join("cni/net.d"),
            ipam_dir: dir.join("cni/ipam"),
            network: PodNetwork::pick()?,
            cgroup: CgroupParent::new(),
            kubelet_port: free_loopback_port()?,
            options,
            agent: None,
            shim: None,
            containerd: None,
            control_plane: None,
            dir,
        };
        cluster.start_control_plane()?;
        cluster.setup_cni()?;
        match cluster.options.runtime {
            NodeRuntime::FerroletShim => cluster.start_shim()?,
            NodeRuntime::Containerd => cluster.start_containerd()?,
        }
        cluster.start_agent()?;
        cluster.wait_node_ready()?;
        Ok(cluster)
    }

    fn start_control_plane(&mut self) -> anyhow::Result<()> {
        let bin = workspace_binary("ferrolet-control-plane")?;
        let data = self.dir.join("cp");
        fs::create_dir_all(&data)?;
        let mut daemon = Daemon::spawn(
            "ferrolet-control-plane",
            Command::new(bin)
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen", "127.0.0.1:0"]),
            self.dir.join("control-plane.log"),
        )?;
        wait_control_plane(&mut daemon, &self.kubeconfig, |args| self.kubectl(args))?;
        self.control_plane = Some(daemon);
        Ok(())
    }

    fn setup_cni(&mut self) -> anyhow::Result<()> {
        fs::create_dir_all(&self.cni_bin_dir)?;
        fs::create_dir_all(&self.cni_conf_dir)?;
        fs::create_dir_all(&self.ipam_dir)?;
        link_cni_plugins(&self.cni_bin_dir)?;
        self.write_conflist(&self.cni_conf_dir)
    }

    /// The pod network's conflist (bridge + host-local + portmap) in `conf_dir`.
    fn write_conflist(&self, conf_dir: &Path) -> anyhow::Result<()> {
        let net = &self.network;
        write_bridge_conflist(
            conf_dir,
            &net.name,
            &net.bridge,
            &self.ipam_dir,
            &net.cidr(),
        )
    }

    /// A private containerd with our pause and busybox images, the pause image also under
    /// the sandbox image names containerd 1.6 uses (so it never pulls), and the pod network's
    /// conflist in its CNI dir.
    fn start_containerd(&mut self) -> anyhow::Result<()> {
        let containerd = Containerd::start()?;
        let images = self.dir.join("images");
        fs::create_dir_all(&images)?;
        let pause = pause_image(&images)?;
        let busybox = busybox_image(&images)?;
        for image in [&pause, &busybox] {
            containerd.ctr_ok(&["images", "import", &image.oci_archive.to_string_lossy()])?;
        }
        for alias in ["k8s.gcr.io/pause:3.6", "registry.k8s.io/pause:3.6"] {
            containerd.ctr_ok(&["images", "tag", &pause.name, alias])?;
        }
        self.write_conflist(&containerd.root.join("cni/net.d"))?;
        self.cri_socket.clone_from(&containerd.socket);
        self.containerd = Some(containerd);
        Ok(())
    }

    /// The containerd daemon's process id, when the node runs on containerd.
    pub fn containerd_pid(&self) -> Option<u32> {
        self.containerd.as_ref().and_then(Containerd::pid)
    }

    fn start_shim(&mut self) -> anyhow::Result<()> {
        import_busybox(&self.shim_root, &self.dir.join("images"))?;
        let mut cmd = shim_command(&self.cri_socket, &self.shim_root, &self.cgroup)?;
        let daemon = Daemon::spawn("ferrolet-shim", &mut cmd, self.dir.join("shim.log"))?;
        self.shim = Some(wait_listening(daemon, &self.cri_socket)?);
        Ok(())
    }

    /// The agent's command line.
    pub fn agent_command(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(workspace_binary("ferrolet")?);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--node-name")
            .arg(&self.node_name)
            .arg("--container-runtime-endpoint")
            .arg(format!("unix://{}", self.cri_socket.display()))
            .arg("--root-dir")
            .arg(&self.agent_root)
            .arg("--cni-bin-dir")
            .arg(&self.cni_bin_dir)
            .arg("--cni-conf-dir")
            .arg(&self.cni_conf_dir)
            .arg("--cgroup-root")
            .arg(format!("/{}/pods", self.cgroup.name))
            .args(["--address", "127.0.0.1", "--port"])
            .arg(self.kubelet_port.to_string())
            // This cluster lives in the host's own network namespace, whose iptables a test
            // must not rewrite; the proxy is tested in namespaces of its own.
            .arg("--service-proxy=false")
            .args(&self.options.agent_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        Ok(cmd)
    }

    /// Starts `ferrolet` (again, after [`Cluster::kill_agent`]); its log is appended to.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        ensure!(self.agent.is_none(), "the agent is already running");
        let mut cmd = self.agent_command()?;
        let daemon = Daemon::spawn("ferrolet", &mut cmd, self.dir.join("agent.log"))?;
        self.agent = Some(daemon);
        Ok(())
    }

    /// `kill -9` the agent; containers keep running.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill9();
        }
    }

    /// The agent process, while it runs.
    pub fn agent(&mut self) -> Option<&mut Daemon> {
        self.agent.as_mut()
    }

    /// Fails (with the logs) if a daemon of the cluster died.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        for d in [&mut self.control_plane, &mut self.shim, &mut self.agent]
            .into_iter()
            .flatten()
        {
            d.ensure_running()?;
        }
        Ok(())
    }

    /// The ends of every daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut logs = vec![
            ("control plane", self.dir.join("control-plane.log")),
            ("shim", self.dir.join("shim.log")),
            ("agent", self.dir.join("agent.log")),
        ];
        if let Some(containerd) = &self.containerd {
            logs[1] = ("containerd", containerd.log.clone());
        }
        for (name, file) in logs {
            out.push_str(&format!(
                "----- {name} log (end) -----\n{}\n",
                log_tail(&file, 80)
            ));
        }
        out
    }

    /// Runs kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        kubectl_in(None, &self.kubeconfig, args)
    }

    /// Runs kubectl and returns its stdout; fails with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        kubectl_ok_in(None, &self.kubeconfig, args)
    }

    /// `kubectl create -f` of one object given as JSON.
    pub fn create(&self, object: &Value) -> anyhow::Result<()> {
        create_in(None, &self.kubeconfig, &self.dir, object)
    }

    /// The pod as JSON, `None` when the API does not have it.
    pub fn pod(&self, namespace: &str, name: &str) -> anyhow::Result<Option<Value>> {
        let text = self.kubectl_ok(&[
            "get",
            "pod",
            "-n",
            namespace,
            name,
            "-o",
            "json",
            "--ignore-not-found",
        ])?;
        if text.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(
            serde_json::from_str(&text).context("kubectl get pod -o json")?,
        ))
    }

    /// Polls the pod until `cond` holds; returns it. Fails with the pod and the logs.
    pub fn wait_pod(
        &mut self,
        namespace: &str,
        name: &str,
        within: Duration,
        what: &str,
        mut cond: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let mut last = None;
        let ok = poll_until(within, Duration::from_millis(200), || {
            last = self.pod(namespace, name).ok().flatten();
            last.as_ref().is_some_and(&mut cond)
        });
        if ok {
            return last.context("pod vanished");
        }
        self.ensure_running()?;
        bail!(
            "pod {namespace}/{name} not {what} within {within:?}; last seen:\n{}\n{}",
            last.map_or_else(
                || "<absent>".to_owned(),
                |p| serde_json::to_string_pretty(&p["status"]).unwrap_or_default()
            ),
            self.logs()
        )
    }

    /// Polls until the pod is gone from the API.
    pub fn wait_pod_gone(
        &mut self,
        namespace: &str,
        name: &str,
        within: Duration,
    ) -> anyhow::Result<()> {
        let gone = poll_until(within, Duration::from_millis(200), || {
            matches!(self.pod(namespace, name), Ok(None))
        });
        if !gone {
            self.ensure_running()?;
            bail!(
                "pod {namespace}/{name} still in the API after {within:?}\n{}",
                self.logs()
            );
        }
        Ok(())
    }

    fn wait_node_ready(&mut self) -> anyhow::Result<()> {
        let node = self.node_name.clone();
        let ready = poll_until(START_DEADLINE, Duration::from_millis(200), || {
            self.kubectl_ok(&["get", "node", &node, "-o", "json"])
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                .is_some_and(|n| condition(&n, "Ready") == Some("True"))
        });
        self.ensure_running()?;
        ensure!(
            ready,
            "node {node} not Ready within {START_DEADLINE:?}\n{}",
            self.logs()
        );
        Ok(())
    }

    /// GET `path` (with its query) on the agent's kubelet API with curl, trusting only the
    /// agent's own serving certificate; with the control plane's admin client certificate
    /// (signed by the cluster CA) when `with_client_cert`. Returns the HTTP status and body.
    pub fn kubelet_get(&self, path: &str, with_client_cert: bool) -> anyhow::Result<(u16, String)> {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "20",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(self.agent_root.join("pki/kubelet.crt"));
        if with_client_cert {
            let pki = self.dir.join("cp/pki");
            cmd.arg("--cert")
                .arg(pki.join("admin.crt"))
                .arg("--key")
                .arg(pki.join("admin.key"));
        }
        cmd.arg(format!("https://127.0.0.1:{}{path}", self.kubelet_port));
        let out = output_within(&mut cmd, Duration::from_secs(30))?;
        ensure!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        let code = code
            .trim()
            .parse()
            .with_context(|| format!("curl printed no status code: {text:?}"))?;
        Ok((code, body.to_owned()))
    }

    /// Allocated pod IPs according to host-local's files.
    pub fn allocated_ips(&self) -> Vec<Ipv4Addr> {
        fs::read_dir(self.ipam_dir.join(&self.network.name))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kill_agent();
        if let Some(mut shim) = self.shim.take() {
            shim.kill9();
        }
        // Pods and container monitors live in the cgroup parent: killing them first leaves
        // containerd only dead tasks to delete, which it does quickly.
        self.cgroup.remove();
        // Stops its tasks and shims, unmounts and removes its own dir.
        drop(self.containerd.take());
        self.cgroup.remove();
        unmount_below(&self.dir);
        let _ = output_within(
            Command::new("ip").args(["link", "del", &self.network.bridge]),
            Duration::from_secs(10),
        );
        if let Some(mut cp) = self.control_plane.take() {
            cp.kill9();
        }
        if std::env::var_os("FERROLET_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs kubectl with `kubeconfig`, inside the named network namespace when given (through
/// `nsenter --net`, so the mount namespace and files stay this process's).
pub fn kubectl_in(netns: Option<&str>, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let mut cmd = in_netns(netns, "kubectl");
    cmd.arg("--kubeconfig").arg(kubeconfig).args(args);
    output_within(&mut cmd, KUBECTL_DEADLINE)
}

/// [`kubectl_in`], returning stdout; fails with its stderr when kubectl fails.
pub fn kubectl_ok_in(
    netns: Option<&str>,
    kubeconfig: &Path,
    args: &[&str],
) -> anyhow::Result<String> {
    let out = kubectl_in(netns, kubeconfig, args)?;
    ensure!(
        out.status.success(),
        "kubectl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl create -f` of one object given as JSON, through a file in `dir`.
pub fn create_in(
    netns: Option<&str>,
    kubeconfig: &Path,
    dir: &Path,
    object: &Value,
) -> anyhow::Result<()> {
    let file = dir.join(format!("object-{}.json", next_unique()));
    fs::write(&file, serde_json::to_vec(object)?)?;
    let path = file.to_string_lossy().into_owned();
    kubectl_ok_in(netns, kubeconfig, &["create", "-f", &path])?;
    Ok(())
}

/// A command for `program`, run inside the named network namespace when given.
pub fn in_netns(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut cmd = Command::new("nsenter");
            cmd.arg(format!("--net=/run/netns/{ns}")).arg(program);
            cmd
        }
        None => Command::new(program),
    }
}

/// Symlinks our CNI plugin executables into `bin_dir`.
pub fn link_cni_plugins(bin_dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(bin_dir)?;
    for plugin in CNI_PLUGINS {
        let bin = workspace_binary(plugin)?;
        std::os::unix::fs::symlink(&bin, bin_dir.join(plugin))
            .with_context(|| format!("linking {}", bin.display()))?;
    }
    Ok(())
}

/// Writes `<conf_dir>/10-e2e.conflist`: bridge (a gateway, no masquerade) with host-local
/// IPs from `subnet` and a default route through the bridge, then portmap.
pub fn write_bridge_conflist(
    conf_dir: &Path,
    name: &str,
    bridge: &str,
    ipam_dir: &Path,
    subnet: &str,
) -> anyhow::Result<()> {
    let conflist = json!({
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": ipam_dir,
                    "ranges": [[{"subnet": subnet}]],
                    // Pods reach other nodes' pods (and anything else) through the bridge.
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": true}},
        ],
    });
    fs::create_dir_all(conf_dir)?;
    fs::write(
        conf_dir.join("10-e2e.conflist"),
        serde_json::to_vec_pretty(&conflist)?,
    )?;
    Ok(())
}

/// Imports the busybox test image (built into `images_dir`) into a shim root.
pub fn import_busybox(shim_root: &Path, images_dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(images_dir)?;
    let busybox = busybox_image(images_dir)?;
    let v2 = busybox_v2_image(images_dir)?;
    let out = output_within(
        Command::new(workspace_binary("ferrolet-shim")?)
            .args(["images", "import", "--root"])
            .arg(shim_root)
            .arg(&busybox.oci_archive)
            .arg(&v2.oci_archive),
        Duration::from_secs(120),
    )?;
    ensure!(
        out.status.success(),
        "ferrolet-shim images import: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `ferrolet-shim serve` on `socket` with its own root and cgroup parent.
pub fn shim_command(socket: &Path, root: &Path, cgroup: &CgroupParent) -> anyhow::Result<Command> {
    let mut cmd = Command::new(workspace_binary("ferrolet-shim")?);
    cmd.arg("serve")
        .arg("--socket")
        .arg(socket)
        .arg("--root")
        .arg(root)
        .arg("--cgroup-parent")
        .arg(&cgroup.name)
        .arg("--pause-binary")
        .arg(pause_binary()?);
    Ok(cmd)
}

/// Waits until `daemon` accepts connections on the unix socket; fails if it exits first.
pub fn wait_listening(mut daemon: Daemon, socket: &Path) -> anyhow::Result<Daemon> {
    let up = poll_until(START_DEADLINE, Duration::from_millis(20), || {
        !daemon.running() || std::os::unix::net::UnixStream::connect(socket).is_ok()
    });
    daemon.ensure_running()?;
    ensure!(
        up,
        "{} did not listen on {} within {START_DEADLINE:?}",
        daemon.name,
        socket.display()
    );
    Ok(daemon)
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_loopback_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `status` of the condition `kind` of a Node or Pod in JSON.
pub fn condition<'a>(object: &'a Value, kind: &str) -> Option<&'a str> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?["status"]
        .as_str()
}

/// An HTTP/1.0 GET of `path` on `addr` with plain TCP; the status line and body.
pub fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .with_context(|| format!("reading the answer of {addr}"))?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("{addr} answered without a status line: {head:?}"))?;
    Ok((code, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_overlap_when_the_shorter_mask_agrees() {
        let a = Ipv4Addr::new(10, 200, 3, 0);
        assert!(overlaps(a, 24, Ipv4Addr::new(10, 200, 3, 7), 32));
        assert!(!overlaps(a, 24, Ipv4Addr::new(10, 200, 4, 0), 24));
        assert!(overlaps(Ipv4Addr::new(10, 0, 0, 0), 8, a, 24));
        assert!(overlaps(Ipv4Addr::new(0, 0, 0, 0), 0, a, 24));
    }
}
