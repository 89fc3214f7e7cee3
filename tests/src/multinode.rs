//! A cluster of several nodes on this one machine, private to one test. Each node is a
//! network namespace acting as a host (`ferrolet-mn-<unique>-<i>`), with `eth0` on a private
//! /24 joined to the others by a bridge that lives in a namespace of its own
//! (`ferrolet-mn-<unique>-br`), so nothing of the test touches this machine's own network.
//! Every host runs its own `ferrolet-shim` (own root, own `ferrolet-test-*` cgroup parent),
//! its own CNI configuration and IPAM state, and its own `ferrolet` agent; host 0 also runs
//! the control plane, listening on its host IP. The daemons enter their host's namespace
//! with `nsenter --net` only, so they share this process's mount namespace and files.
//!
//! Pod ranges: the control plane's nodeipam assigns each Node a /24 of the cluster CIDR in
//! `spec.podCIDR`; only once that is set does the harness write the node's CNI conflist
//! (host-local over exactly that range). This is what an operator's provisioning would do,
//! and it needs no guess of the order nodeipam hands ranges out in; until then the node
//! reports NotReady (no CNI configuration) and gets no pods. Each agent routes the other
//! nodes' ranges to their host IPs (`--cluster-cidr`), so pods reach each other by pod IP.
//!
//! Each agent runs its service proxy, so Services are programmed into each host's own
//! iptables, never this machine's.
//!
//! Dropping the [`MultiCluster`] stops every agent and shim, kills what is left in their
//! cgroup parents, unmounts what the shims mounted, stops the control plane, deletes the
//! namespaces (and with them the bridge, veths and pod bridges) and removes the temp dir,
//! even when the test failed half way.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use serde_json::Value;

use crate::cluster::{
    CgroupParent, Daemon, START_DEADLINE, condition, create_in, import_busybox, in_netns,
    kubectl_in, kubectl_ok_in, link_cni_plugins, log_tail, next_unique, shim_command,
    wait_control_plane, wait_listening, workspace_binary, write_bridge_conflist,
};
use crate::mounts::unmount_below;
use crate::process::output_within;
use crate::wait::poll_until;

/// The range every pod IP of the cluster comes from; it only exists inside the test's
/// namespaces, so it cannot clash with this machine's routes.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The range of Service ClusterIPs, also only inside the test's namespaces.
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The name of the pod bridge inside every host namespace.
pub const POD_BRIDGE: &str = "cni0";
const API_PORT: u16 = 6443;
/// etcd's client URL inside host 0's namespace (its loopback is the test's alone).
const ETCD_CLIENT_URL: &str = "http://127.0.0.1:2379";
const ETCD_PEER_URL: &str = "http://127.0.0.1:2380";

/// What differs between multi-node clusters a test starts.
#[derive(Debug, Clone)]
pub struct MultiOptions {
    pub nodes: usize,
    /// Store the cluster in a private etcd (run in host 0's namespace) instead of SQLite.
    pub etcd: bool,
}

impl Default for MultiOptions {
    fn default() -> Self {
        MultiOptions {
            nodes: 3,
            etcd: false,
        }
    }
}

/// One host: a network namespace with its shim and agent.
#[derive(Debug)]
pub struct Host {
    pub index: usize,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node_name: String,
    pub dir: PathBuf,
    pub cri_socket: PathBuf,
    pub shim_root: PathBuf,
    pub agent_root: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub ipam_dir: PathBuf,
    pub cgroup: CgroupParent,
    /// The node's `spec.podCIDR`, once nodeipam assigned it.
    pub pod_cidr: Option<String>,
    shim: Option<Daemon>,
    agent: Option<Daemon>,
}

impl Host {
    fn log(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }

    /// Runs `program args` inside this host's network namespace.
    pub fn exec(&self, program: &str, args: &[&str], within: Duration) -> anyhow::Result<Output> {
        output_within(in_netns(Some(&self.netns), program).args(args), within)
    }

    /// The pod interfaces (veths) on this host's pod bridge now.
    pub fn bridge_ports(&self) -> anyhow::Result<Vec<String>> {
        let out = output_within(
            Command::new("ip").args([
                "-n",
                &self.netns,
                "-o",
                "link",
                "show",
                "master",
                POD_BRIDGE,
            ]),
            Duration::from_secs(10),
        )?;
        // No bridge yet (no pod ever ran here) means no ports.
        if !out.status.success() {
            return Ok(Vec::new());
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|n| n.trim().split('@').next().unwrap_or_default().to_owned())
            .collect())
    }

    /// `ip -4 route` lines of this host's main table.
    pub fn routes(&self) -> anyhow::Result<Vec<String>> {
        let out = output_within(
            Command::new("ip").args(["-n", &self.netns, "-4", "route", "show"]),
            Duration::from_secs(10),
        )?;
        ensure!(
            out.status.success(),
            "ip route in {}: {}",
            self.netns,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect())
    }
}

/// Several nodes, one control plane, owned by one test.
#[derive(Debug)]
pub struct MultiCluster {
    pub dir: PathBuf,
    /// The control plane's admin kubeconfig (its server is host 0's IP).
    pub kubeconfig: PathBuf,
    pub hosts: Vec<Host>,
    pub options: MultiOptions,
    cni_bin_dir: PathBuf,
    bridge_netns: String,
    /// Every namespace created, deleted on drop.
    namespaces: Vec<String>,
    control_plane: Option<Daemon>,
    etcd: Option<Daemon>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = output_within(Command::new("ip").args(args), Duration::from_secs(10))?;
    ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl MultiCluster {
    /// Builds the hosts, starts the control plane, the shims and the agents, gives every node
    /// its CNI configuration once it has a pod range, and waits until all are Ready.
    pub fn start(options: MultiOptions) -> anyhow::Result<MultiCluster> {
        crate::cluster::require_root()?;
        ensure!(
            (1..=200).contains(&options.nodes),
            "a multi-node cluster needs 1 to 200 nodes, not {}",
            options.nodes
        );
        let unique = next_unique();
        let dir = crate::unique_temp_dir("mn")?;
        // A /24 per run; it lives only in the test's namespaces.
        let third = u8::try_from(std::process::id() % 250).unwrap_or(0);
        let mut cluster = MultiCluster {
            kubeconfig: dir.join("cp/admin.kubeconfig"),
            hosts: Vec::new(),
            cni_bin_dir: dir.join("cni-bin"),
            bridge_netns: format!("ferrolet-mn-{unique}-br"),
            namespaces: Vec::new(),
            control_plane: None,
            etcd: None,
            options,
            dir,
        };
        for index in 0..cluster.options.nodes {
            let hdir = cluster.dir.join(format!("host{index}"));
            fs::create_dir_all(&hdir)?;
            cluster.hosts.push(Host {
                index,
                netns: format!("ferrolet-mn-{unique}-{index}"),
                ip: Ipv4Addr::new(172, 31, third, u8::try_from(index + 1)?),
                node_name: format!("mn-{unique}-{index}"),
                cri_socket: hdir.join("shim.sock"),
                shim_root: hdir.join("shim"),
                agent_root: hdir.join("agent"),
                cni_conf_dir: hdir.join("cni/net.d"),
                ipam_dir: hdir.join("cni/ipam"),
                cgroup: CgroupParent::new(),
                pod_cidr: None,
                shim: None,
                agent: None,
                dir: hdir,
            });
        }
        cluster.build_network()?;
        link_cni_plugins(&cluster.cni_bin_dir)?;
        if cluster.options.etcd {
            cluster.start_etcd()?;
        }
        cluster.start_control_plane()?;
        let images = cluster.dir.join("images");
        for i in 0..cluster.hosts.len() {
            import_busybox(&cluster.hosts[i].shim_root, &images)?;
            cluster.start_shim(i)?;
            cluster.start_agent(i)?;
        }
        cluster.configure_pod_networks()?;
        for i in 0..cluster.hosts.len() {
            cluster.wait_node_ready(i, START_DEADLINE)?;
        }
        Ok(cluster)
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn build_network(&mut self) -> anyhow::Result<()> {
        let br = self.bridge_netns.clone();
        self.add_netns(&br)?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        // The segment's gateway, as a real host has one: without a default route a host
        // cannot even start a connection to a ClusterIP (the route lookup comes before the
        // proxy's DNAT). The bridge namespace forwards nothing, so traffic stays inside.
        let gateway = self.gateway();
        ip(&[
            "-n",
            &br,
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            "br0",
        ])?;
        for i in 0..self.hosts.len() {
            let (ns, addr) = (self.hosts[i].netns.clone(), self.hosts[i].ip);
            self.add_netns(&ns)?;
            let port = format!("h{i}");
            ip(&[
                "-n", &br, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ])?;
            // Hosts forward between their pod bridge and eth0.
            let out = self.hosts[i].exec(
                "sysctl",
                &["-qw", "net.ipv4.ip_forward=1"],
                Duration::from_secs(10),
            )?;
            ensure!(
                out.status.success(),
                "enabling ip_forward in {ns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// The bridge's address on the hosts' segment.
    fn gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.hosts[0].ip.octets();
        Ipv4Addr::new(a, b, c, 254)
    }

    fn control_plane_command(&self) -> anyhow::Result<Command> {
        let host = &self.hosts[0];
        let mut cmd = in_netns(
            Some(&host.netns),
            workspace_binary("ferrolet-control-plane")?,
        );
        cmd.arg("--data-dir")
            .arg(self.dir.join("cp"))
            .arg("--listen")
            .arg(format!("{}:{API_PORT}", host.ip))
            .args(["--cluster-cidr", CLUSTER_CIDR])
            .args(["--service-cluster-ip-range", SERVICE_CIDR])
            // Short enough that losing a node shows within a test, longer than two lease
            // renewals (10s each) so a busy machine does not flap nodes.
            .args(["--node-monitor-grace-period", "25s"])
            .args(["--node-monitor-period", "2s"])
            .args(["--pod-eviction-timeout", "2s"]);
        if self.options.etcd {
            cmd.arg("--etcd-servers").arg(ETCD_CLIENT_URL);
        }
        Ok(cmd)
    }

    /// Starts etcd (Debian's, or `FERROLET_ETCD`) in host 0's namespace and waits until it
    /// reports healthy.
    fn start_etcd(&mut self) -> anyhow::Result<()> {
        let binary = std::env::var_os("FERROLET_ETCD").unwrap_or_else(|| "/usr/bin/etcd".into());
        let netns = self.hosts[0].netns.clone();
        let mut cmd = in_netns(Some(&netns), &binary);
        cmd.arg("--name=mn")
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={ETCD_CLIENT_URL}"))
            .arg(format!("--advertise-client-urls={ETCD_CLIENT_URL}"))
            .arg(format!("--listen-peer-urls={ETCD_PEER_URL}"))
            .arg(format!("--initial-advertise-peer-urls={ETCD_PEER_URL}"))
            .arg(format!("--initial-cluster=mn={ETCD_PEER_URL}"));
        let mut daemon = Daemon::spawn("etcd", &mut cmd, self.dir.join("etcd.log"))?;
        let health = format!("{ETCD_CLIENT_URL}/health");
        let up = poll_until(START_DEADLINE, Duration::from_millis(100), || {
            daemon.running()
                && self.hosts[0]
                    .exec(
                        "curl",
                        &["-sf", "--max-time", "2", &health],
                        Duration::from_secs(5),
                    )
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).contains("\"health\":\"true\"")
                    })
        });
        daemon.ensure_running()?;
        ensure!(
            up,
            "etcd did not report healthy within {START_DEADLINE:?}; its log:\n{}",
            daemon.log_tail(40)
        );
        self.etcd = Some(daemon);
        Ok(())
    }

    /// Starts the control plane (again, after [`MultiCluster::kill_control_plane`]) and waits
    /// until it answers `/readyz`.
    pub fn start_control_plane(&mut self) -> anyhow::Result<()> {
        ensure!(
            self.control_plane.is_none(),
            "the control plane is already running"
        );
        fs::create_dir_all(self.dir.join("cp"))?;
        let mut cmd = self.control_plane_command()?;
        let mut daemon = Daemon::spawn(
            "ferrolet-control-plane",
            &mut cmd,
            self.dir.join("control-plane.log"),
        )?;
        wait_control_plane(&mut daemon, &self.kubeconfig, |args| self.kubectl(args))?;
        self.control_plane = Some(daemon);
        Ok(())
    }

    /// `kill -9` the control plane.
    pub fn kill_control_plane(&mut self) {
        if let Some(mut cp) = self.control_plane.take() {
            cp.kill9();
        }
    }

    fn start_shim(&mut self, i: usize) -> anyhow::Result<()> {
        let host = &self.hosts[i];
        let inner = shim_command(&host.cri_socket, &host.shim_root, &host.cgroup)?;
        let mut cmd = in_netns(Some(&host.netns), inner.get_program());
        cmd.args(inner.get_args());
        let daemon = Daemon::spawn(
            &format!("ferrolet-shim (host {i})"),
            &mut cmd,
            host.log("shim"),
        )?;
        let daemon = wait_listening(daemon, &host.cri_socket)?;
        self.hosts[i].shim = Some(daemon);
        Ok(())
    }

    /// Starts host `i`'s agent (again, after [`MultiCluster::stop_agent`]); its log is
    /// appended to.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let host = &self.hosts[i];
        ensure!(host.agent.is_none(), "host {i}'s agent is already running");
        let mut cmd = in_netns(Some(&host.netns), workspace_binary("ferrolet")?);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--node-name")
            .arg(&host.node_name)
            .arg("--container-runtime-endpoint")
            .arg(format!("unix://{}", host.cri_socket.display()))
            .arg("--root-dir")
            .arg(&host.agent_root)
            .arg("--cni-bin-dir")
            .arg(&self.cni_bin_dir)
            .arg("--cni-conf-dir")
            .arg(&host.cni_conf_dir)
            .arg("--cgroup-root")
            .arg(format!("/{}/pods", host.cgroup.name))
            .args(["--cluster-cidr", CLUSTER_CIDR])
            // The proxy programs Services into this host's own namespace.
            .args(["--service-cluster-ip-range", SERVICE_CIDR])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            );
        let daemon = Daemon::spawn(&format!("ferrolet (host {i})"), &mut cmd, host.log("agent"))?;
        self.hosts[i].agent = Some(daemon);
        Ok(())
    }

    /// Stops host `i`'s agent with SIGTERM (as systemd would), waiting for it to exit;
    /// containers keep running.
    pub fn stop_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(mut agent) = self.hosts[i].agent.take() else {
            bail!("host {i}'s agent is not running");
        };
        let pid = libc::pid_t::try_from(agent.pid())?;
        // SAFETY: kill(2) takes plain integers and touches no memory.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let exited = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            !agent.running()
        });
        if !exited {
            agent.kill9();
            bail!("host {i}'s agent ignored SIGTERM for 20s");
        }
        Ok(())
    }

    /// Waits for every node's pod range, then writes its conflist over exactly that range.
    fn configure_pod_networks(&mut self) -> anyhow::Result<()> {
        for i in 0..self.hosts.len() {
            let name = self.hosts[i].node_name.clone();
            let mut cidr = None;
            let ok = poll_until(START_DEADLINE, Duration::from_millis(200), || {
                cidr = self
                    .node(&name)
                    .ok()
                    .and_then(|n| n["spec"]["podCIDR"].as_str().map(str::to_owned));
                cidr.is_some()
            });
            self.ensure_running()?;
            let Some(cidr) = cidr.filter(|_| ok) else {
                bail!(
                    "node {name} got no spec.podCIDR within {START_DEADLINE:?}\n{}",
                    self.logs()
                );
            };
            let host = &mut self.hosts[i];
            write_bridge_conflist(
                &host.cni_conf_dir,
                "multinode",
                POD_BRIDGE,
                &host.ipam_dir,
                &cidr,
            )?;
            host.pod_cidr = Some(cidr);
        }
        Ok(())
    }

    /// The Node as JSON.
    pub fn node(&self, name: &str) -> anyhow::Result<Value> {
        let text = self.kubectl_ok(&["get", "node", name, "-o", "json"])?;
        serde_json::from_str(&text).context("kubectl get node -o json")
    }

    /// The Ready condition's status of host `i`'s node (`None` without the condition).
    pub fn node_ready(&self, i: usize) -> anyhow::Result<Option<String>> {
        let node = self.node(&self.hosts[i].node_name)?;
        Ok(condition(&node, "Ready").map(str::to_owned))
    }

    /// Waits until host `i`'s node is Ready.
    pub fn wait_node_ready(&mut self, i: usize, within: Duration) -> anyhow::Result<()> {
        self.wait_for(within, &format!("node {i} Ready"), |c| {
            Ok(c.node_ready(i)?.as_deref() == Some("True"))
        })
    }

    /// Polls `cond` until it is true; on timeout (or a daemon's death) fails naming `what`,
    /// with the last error of `cond` and the ends of the logs.
    pub fn wait_for(
        &mut self,
        within: Duration,
        what: &str,
        mut cond: impl FnMut(&MultiCluster) -> anyhow::Result<bool>,
    ) -> anyhow::Result<()> {
        let mut last_error = None;
        let ok = poll_until(within, Duration::from_millis(250), || match cond(self) {
            Ok(b) => b,
            Err(e) => {
                last_error = Some(e);
                false
            }
        });
        if ok {
            return Ok(());
        }
        self.ensure_running()?;
        bail!(
            "not {what} within {within:?}{}\n{}",
            last_error.map_or_else(String::new, |e| format!(" (last error: {e:#})")),
            self.logs()
        )
    }

    /// Fails (with the logs) if a daemon that should run died.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        for d in [&mut self.etcd, &mut self.control_plane]
            .into_iter()
            .flatten()
        {
            d.ensure_running()?;
        }
        for host in &mut self.hosts {
            for d in [&mut host.shim, &mut host.agent].into_iter().flatten() {
                d.ensure_running()?;
            }
        }
        Ok(())
    }

    /// The ends of every daemon's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = format!(
            "----- control plane log (end) -----\n{}\n",
            log_tail(&self.dir.join("control-plane.log"), 40)
        );
        for host in &self.hosts {
            for what in ["shim", "agent"] {
                out.push_str(&format!(
                    "----- host {} {what} log (end) -----\n{}\n",
                    host.index,
                    log_tail(&host.log(what), 30)
                ));
            }
        }
        out
    }

    /// Runs kubectl with the admin kubeconfig from host 0's namespace (where the API is).
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Output> {
        kubectl_in(Some(&self.hosts[0].netns), &self.kubeconfig, args)
    }

    /// Runs kubectl and returns its stdout; fails with its stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        kubectl_ok_in(Some(&self.hosts[0].netns), &self.kubeconfig, args)
    }

    /// `kubectl create -f` of one object given as JSON.
    pub fn create(&self, object: &Value) -> anyhow::Result<()> {
        create_in(
            Some(&self.hosts[0].netns),
            &self.kubeconfig,
            &self.dir,
            object,
        )
    }

    /// The pods matching the label selector, as JSON.
    pub fn pods(&self, namespace: &str, selector: &str) -> anyhow::Result<Vec<Value>> {
        let text =
            self.kubectl_ok(&["get", "pods", "-n", namespace, "-l", selector, "-o", "json"])?;
        let list: Value = serde_json::from_str(&text).context("kubectl get pods -o json")?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// The index of the host whose node is `node_name`.
    pub fn host_of(&self, node_name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.node_name == node_name)
    }
}

impl Drop for MultiCluster {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            if let Some(mut agent) = host.agent.take() {
                agent.kill9();
            }
            if let Some(mut shim) = host.shim.take() {
                shim.kill9();
            }
            // Pods and container monitors live in the cgroup parent.
            host.cgroup.remove();
        }
        unmount_below(&self.dir);
        self.kill_control_plane();
        if let Some(mut etcd) = self.etcd.take() {
            etcd.kill9();
        }
        // Deleting a namespace deletes its links: the bridge, the veths, the pod bridges.
        for ns in self.namespaces.iter().rev() {
            let _ = output_within(
                Command::new("ip").args(["netns", "del", ns]),
                Duration::from_secs(10),
            );
        }
        if std::env::var_os("FERROLET_KEEP_TEST_DIRS").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether `path` names one of the hosts' namespaces (for tests checking cleanup).
pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}
