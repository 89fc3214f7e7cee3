//! Network topologies for the proxy's real tests, built from namespaces the test creates
//! and removed when the test ends, pass or fail:
//!
//! ```text
//!  outside 192.168.50.2 ── out0 192.168.50.1 ┐
//!  client  10.240.1.2   ── cl0  10.240.1.1   ├─ node (iptables under test)
//!  ep0..N  10.240.0.10+i ── br0 10.240.0.1   ┘   10.96.0.0/16 routed to outside
//! ```
//!
//! The client is a pod (inside the cluster CIDR 10.240.0.0/16), `outside` is not. Every
//! endpoint runs a TCP server on port 80 and a UDP server on port 53 that answer with the
//! endpoint's name and the peer address they saw.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use ferrolet::proxy::{
    BackendChoice, Change, EventRecorder, HostExec, Iptables, MemoryRecorder, Proxier, ProxyConfig,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

pub const NODE_NAME: &str = "node-under-test";
pub const OUTSIDE_NODE_IP: &str = "192.168.50.1";
pub const OUTSIDE_IP: &str = "192.168.50.2";
pub const CLIENT_IP: &str = "10.240.1.2";
pub const BRIDGE_IP: &str = "10.240.0.1";

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test programs iptables in network namespaces and must run as root"
    );
}

pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        run(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Runs `f` on a fresh thread that has entered this namespace.
    pub fn within<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.name, f)
    }
}

/// Runs `f` on a fresh thread inside the named namespace and waits for it.
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    spawn_in_netns(name, f)
        .join()
        .expect("thread in netns panicked")
}

/// Starts `f` on a fresh thread inside the named namespace.
pub fn spawn_in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = format!("/run/netns/{name}");
    std::thread::spawn(move || {
        enter(&path);
        f()
    })
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

/// TCP :80 and UDP :53 servers in one endpoint namespace, stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    fn start(ns: &Netns, name: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let path = format!("/run/netns/{}", ns.name);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::new();
        {
            let (stop, path, name, tx) = (stop.clone(), path.clone(), name.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                enter(&path);
                let l = TcpListener::bind("0.0.0.0:80").expect("bind tcp 80");
                l.set_nonblocking(true).expect("nonblocking");
                tx.send(()).expect("ready");
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut c, peer)) => {
                            let _ = c.set_nonblocking(false);
                            let _ = writeln!(c, "{name} {}", peer.ip());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
        }
        {
            let (stop, name) = (stop.clone(), name);
            threads.push(std::thread::spawn(move || {
                enter(&path);
                let s = UdpSocket::bind("0.0.0.0:53").expect("bind udp 53");
                s.set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                tx.send(()).expect("ready");
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(format!("{name} {}\n", peer.ip()).as_bytes(), peer);
                    }
                }
            }));
        }
        rx.recv().expect("tcp server ready");
        rx.recv().expect("udp server ready");
        Self { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

pub struct Endpoint {
    pub ip: String,
    pub name: String,
    pub servers: Option<Servers>,
    pub ns: Netns,
}

pub struct Topology {
    pub node: Netns,
    pub client: Netns,
    pub outside: Netns,
    // Declared last so servers stop before their namespaces go.
    pub endpoints: Vec<Endpoint>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for e in &mut self.endpoints {
            e.servers.take();
        }
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn veth(node: &Netns, host_if: &str, other: &Netns) {
    node.ip(&[
        "link",
        "add",
        host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &other.name,
    ]);
    other.ip(&["link", "set", "eth0", "up"]);
    node.ip(&["link", "set", host_if, "up"]);
}

impl Topology {
    pub fn new(endpoints: usize) -> Self {
        require_root();
        let id = format!(
            "fpx{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let node = Netns::new(format!("{id}-node"));
        let client = Netns::new(format!("{id}-cl"));
        let outside = Netns::new(format!("{id}-out"));
        node.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        node.ip(&["link", "add", "br0", "type", "bridge"]);
        node.ip(&["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", "br0"]);
        node.ip(&["link", "set", "br0", "up"]);

        veth(&node, "cl0", &client);
        node.ip(&["addr", "add", "10.240.1.1/24", "dev", "cl0"]);
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"]);
        client.ip(&["route", "add", "default", "via", "10.240.1.1"]);

        veth(&node, "out0", &outside);
        node.ip(&[
            "addr",
            "add",
            &format!("{OUTSIDE_NODE_IP}/24"),
            "dev",
            "out0",
        ]);
        outside.ip(&["addr", "add", &format!("{OUTSIDE_IP}/24"), "dev", "eth0"]);
        outside.ip(&["route", "add", "default", "via", OUTSIDE_NODE_IP]);
        // Service traffic that is not DNATed must still be forwarded (where our REJECT
        // sees it), as on a node with a default route.
        node.ip(&["route", "add", "10.96.0.0/16", "via", OUTSIDE_IP]);

        let mut eps = Vec::new();
        for i in 0..endpoints {
            let ns = Netns::new(format!("{id}-ep{i}"));
            let host_if = format!("ep{i}");
            veth(&node, &host_if, &ns);
            node.ip(&["link", "set", &host_if, "master", "br0"]);
            // As the CNI bridge plugin's hairpinMode does: a pod may reach itself.
            node.ip(&[
                "link",
                "set",
                &host_if,
                "type",
                "bridge_slave",
                "hairpin",
                "on",
            ]);
            let ip = format!("10.240.0.{}", 10 + i);
            ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
            ns.ip(&["route", "add", "default", "via", BRIDGE_IP]);
            let name = format!("ep{i}");
            let servers = Some(Servers::start(&ns, name.clone()));
            eps.push(Endpoint {
                ip,
                name,
                servers,
                ns,
            });
        }
        Self {
            node,
            client,
            outside,
            endpoints: eps,
        }
    }

    /// A proxier that programs the node namespace with `backend`.
    pub fn proxier(&self, backend: BackendChoice) -> (Proxier, Arc<MemoryRecorder>) {
        let exec = Arc::new(HostExec::in_netns(&self.node.name));
        let ipt = Iptables::detect(exec.clone(), backend).expect("iptables backend");
        let events = Arc::new(MemoryRecorder::new());
        let mut cfg = ProxyConfig::new(NODE_NAME);
        cfg.service_cidrs = vec!["10.96.0.0/16".parse().expect("cidr")];
        cfg.cluster_cidr = Some("10.240.0.0/16".parse().expect("cidr"));
        let rec: Arc<dyn EventRecorder> = events.clone();
        (Proxier::new(cfg, ipt, exec, rec), events)
    }

    pub fn iptables_save(&self, backend: BackendChoice, table: &str) -> String {
        let tool = match backend {
            BackendChoice::Legacy => "iptables-legacy-save",
            BackendChoice::Nft => "iptables-nft-save",
            BackendChoice::Auto => "iptables-save",
        };
        self.node.exec(&[tool, "-t", table])
    }
}

pub fn iptables_tool(backend: BackendChoice) -> &'static str {
    match backend {
        BackendChoice::Legacy => "iptables-legacy",
        BackendChoice::Nft => "iptables-nft",
        BackendChoice::Auto => "iptables",
    }
}

/// What one TCP request got: the endpoint's name and the peer it saw, or the error.
pub fn tcp_request(addr: SocketAddr) -> std::io::Result<(String, String)> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    c.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut s = String::new();
    c.read_to_string(&mut s)?;
    let mut it = s.split_whitespace();
    Ok((
        it.next().unwrap_or("").to_owned(),
        it.next().unwrap_or("").to_owned(),
    ))
}

/// `n` TCP requests from inside `ns`.
pub fn tcp_requests(ns: &Netns, addr: &str, n: usize) -> Vec<std::io::Result<(String, String)>> {
    let addr: SocketAddr = addr.parse().expect("address");
    ns.within(move || (0..n).map(|_| tcp_request(addr)).collect())
}

pub fn ok_requests(ns: &Netns, addr: &str, n: usize) -> Vec<(String, String)> {
    tcp_requests(ns, addr, n)
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("request to {addr} failed: {e}")))
        .collect()
}

pub fn service(name: &str, spec: serde_json::Value) -> Change {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": name},
        "spec": spec,
    }))
    .expect("service");
    Change::ServiceUpserted(Box::new(svc))
}

/// An EndpointSlice for `svc` with the given endpoints (ip, node) and ports (name, port, proto).
pub fn slice(svc: &str, eps: &[(&str, &str)], ports: &[(&str, u16, &str)]) -> Change {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(ip, node)| json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true}}))
        .collect();
    let ports: Vec<_> = ports
        .iter()
        .map(|(n, p, proto)| json!({"name": n, "port": p, "protocol": proto}))
        .collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": format!("{svc}-1"),
                     "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
    .expect("slice");
    Change::SliceUpserted(Box::new(s))
}

/// Generates one test per backend from a function taking the backend.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[test]
            fn legacy() {
                super::$name(ferrolet::proxy::BackendChoice::Legacy);
            }
            #[test]
            fn nft() {
                super::$name(ferrolet::proxy::BackendChoice::Nft);
            }
        }
    };
}
