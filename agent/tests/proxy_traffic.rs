//! The proxy programs real iptables (legacy and nf_tables) in a node namespace, and real
//! traffic between namespaces shows each Service behavior. Needs root.

mod proxy_support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use ferrolet::proxy::{BackendChoice, Binder, Change, HealthServer, ServiceKey};
use proxy_support::*;
use serde_json::json;

fn hits(results: &[(String, String)]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for (ep, _) in results {
        *m.entry(ep.clone()).or_default() += 1;
    }
    m
}

fn peers(results: &[(String, String)]) -> BTreeSet<String> {
    results.iter().map(|(_, p)| p.clone()).collect()
}

fn web(spec_extra: serde_json::Value) -> Change {
    let mut spec = json!({
        "clusterIP": "10.96.0.10",
        "ports": [{"name": "http", "port": 80, "targetPort": "web", "protocol": "TCP"}],
    });
    for (k, v) in spec_extra.as_object().into_iter().flatten() {
        spec[k] = v.clone();
    }
    service("web", spec)
}

fn all_endpoints<'a>(t: &'a Topology, node: &'a str) -> Vec<(&'a str, &'a str)> {
    t.endpoints.iter().map(|e| (e.ip.as_str(), node)).collect()
}

/// ClusterIP spreads over every endpoint, keeps a pod's source address, masquerades
/// traffic from outside the cluster network, rejects fast with no endpoints, and leaves
/// rules that are not ours alone.
fn cluster_ip(backend: BackendChoice) {
    let t = Topology::new(3);
    let ipt = iptables_tool(backend);
    t.node
        .exec(&[ipt, "-w", "5", "-t", "nat", "-N", "SOMEONE-ELSE"]);
    t.node.exec(&[
        ipt,
        "-w",
        "5",
        "-t",
        "nat",
        "-A",
        "SOMEONE-ELSE",
        "-s",
        "203.0.113.9/32",
        "-j",
        "RETURN",
    ]);
    t.node.exec(&[
        ipt,
        "-w",
        "5",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-j",
        "SOMEONE-ELSE",
    ]);
    t.node.exec(&[
        ipt, "-w", "5", "-t", "filter", "-A", "INPUT", "-p", "tcp", "--dport", "2222", "-j",
        "ACCEPT",
    ]);

    let (mut p, events) = t.proxier(backend);
    p.apply(web(json!({})));
    p.apply(slice(
        "web",
        &all_endpoints(&t, "other-node"),
        &[("http", 80, "TCP")],
    ));
    assert!(p.sync().expect("sync").full);

    let r = ok_requests(&t.client, "10.96.0.10:80", 200);
    let h = hits(&r);
    assert_eq!(h.len(), 3, "every endpoint answers: {h:?}");
    assert_eq!(
        peers(&r),
        BTreeSet::from([CLIENT_IP.to_owned()]),
        "pod source kept"
    );

    let r = ok_requests(&t.outside, "10.96.0.10:80", 20);
    assert_eq!(
        peers(&r),
        BTreeSet::from([BRIDGE_IP.to_owned()]),
        "outside source masqueraded"
    );

    // One endpoint leaves: a partial sync, and it gets no more traffic.
    p.apply(slice(
        "web",
        &all_endpoints(&t, "other-node")[..2],
        &[("http", 80, "TCP")],
    ));
    assert!(!p.sync().expect("sync").full);
    let h = hits(&ok_requests(&t.client, "10.96.0.10:80", 100));
    assert_eq!(h.keys().collect::<Vec<_>>(), ["ep0", "ep1"]);

    // No endpoints: refused at once by our REJECT, not a timeout.
    p.apply(slice("web", &[], &[("http", 80, "TCP")]));
    p.sync().expect("sync");
    let r = tcp_requests(&t.client, "10.96.0.10:80", 1);
    let err = r[0].as_ref().expect_err("no endpoints must fail");
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
    let filter = t.iptables_save(backend, "filter");
    assert!(
        filter.contains("default/web:http has no endpoints"),
        "{filter}"
    );

    // A periodic full resync finds its hooks in place and does not add them again.
    p.request_full_sync();
    assert!(p.sync().expect("sync").full);
    let nat = t.iptables_save(backend, "nat");
    let jumps = nat
        .lines()
        .filter(|l| l.starts_with("-A PREROUTING") && l.ends_with("-j FERRO-SERVICES"))
        .count();
    assert_eq!(jumps, 1, "{nat}");

    // Other chains and rules survived every sync.
    assert!(
        nat.contains("-A SOMEONE-ELSE -s 203.0.113.9/32 -j RETURN"),
        "{nat}"
    );
    assert!(nat.contains("-A PREROUTING -j SOMEONE-ELSE"), "{nat}");
    assert!(filter.contains("--dport 2222 -j ACCEPT"), "{filter}");
    assert!(events.drain().is_empty());
}
both_backends!(cluster_ip);

/// ClientIP affinity sends one client to one endpoint.
fn session_affinity(backend: BackendChoice) {
    let t = Topology::new(3);
    let (mut p, _) = t.proxier(backend);
    p.apply(web(json!({
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
    })));
    p.apply(slice(
        "web",
        &all_endpoints(&t, "other-node"),
        &[("http", 80, "TCP")],
    ));
    p.sync().expect("sync");
    let h = hits(&ok_requests(&t.client, "10.96.0.10:80", 40));
    assert_eq!(h.len(), 1, "one client, one endpoint: {h:?}");
    let nat = t.iptables_save(backend, "nat");
    assert!(nat.contains("--seconds 600 --reap"), "{nat}");
}
both_backends!(session_affinity);

/// NodePort on the node's address and on 127.0.0.1, and an external IP, all masqueraded
/// (policy Cluster) and spread.
fn node_port_and_external_ip(backend: BackendChoice) {
    let t = Topology::new(3);
    let (mut p, _) = t.proxier(backend);
    p.apply(web(json!({
        "type": "NodePort",
        "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
        "externalIPs": ["192.168.60.10"],
    })));
    p.apply(slice(
        "web",
        &all_endpoints(&t, NODE_NAME),
        &[("http", 80, "TCP")],
    ));
    p.sync().expect("sync");

    let r = ok_requests(&t.outside, &format!("{OUTSIDE_NODE_IP}:30080"), 200);
    assert_eq!(hits(&r).len(), 3, "{:?}", hits(&r));
    assert_eq!(peers(&r), BTreeSet::from([BRIDGE_IP.to_owned()]));

    let r = ok_requests(&t.outside, "192.168.60.10:80", 30);
    assert_eq!(peers(&r), BTreeSet::from([BRIDGE_IP.to_owned()]));

    let r = ok_requests(&t.node, "127.0.0.1:30080", 10);
    assert_eq!(r.len(), 10);
}
both_backends!(node_port_and_external_ip);

struct NetnsBinder(String);
impl Binder for NetnsBinder {
    fn bind(&self, port: u16) -> std::io::Result<std::net::TcpListener> {
        in_netns(&self.0, move || {
            std::net::TcpListener::bind(("0.0.0.0", port))
        })
    }
}

fn health_get(t: &Topology) -> String {
    t.outside.within(|| {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect((OUTSIDE_NODE_IP, 32100)).expect("connect");
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: n\r\n\r\n")
            .expect("write");
        let mut s = String::new();
        c.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        c.read_to_string(&mut s).expect("read");
        s
    })
}

/// externalTrafficPolicy Local: outside traffic reaches only local endpoints with its
/// source address intact; the health check node port says how many there are.
fn external_policy_local(backend: BackendChoice) {
    let t = Topology::new(3);
    let (mut p, _) = t.proxier(backend);
    p.apply(web(json!({
        "type": "NodePort",
        "externalTrafficPolicy": "Local",
        "healthCheckNodePort": 32100,
        "ports": [{"name": "http", "port": 80, "nodePort": 30080, "protocol": "TCP"}],
    })));
    let eps = [
        (t.endpoints[0].ip.as_str(), NODE_NAME),
        (t.endpoints[1].ip.as_str(), NODE_NAME),
        (t.endpoints[2].ip.as_str(), "other-node"),
    ];
    p.apply(slice("web", &eps, &[("http", 80, "TCP")]));
    p.sync().expect("sync");

    let r = ok_requests(&t.outside, &format!("{OUTSIDE_NODE_IP}:30080"), 200);
    assert_eq!(hits(&r).keys().collect::<Vec<_>>(), ["ep0", "ep1"]);
    assert_eq!(
        peers(&r),
        BTreeSet::from([OUTSIDE_IP.to_owned()]),
        "source kept"
    );

    // A pod using the NodePort is not held to local endpoints.
    let h = hits(&ok_requests(
        &t.client,
        &format!("{OUTSIDE_NODE_IP}:30080"),
        200,
    ));
    assert_eq!(h.len(), 3, "{h:?}");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let mut hs = HealthServer::new(Arc::new(NetnsBinder(t.node.name.clone())));
    let checks = p.health_checks();
    assert_eq!(checks[&32100].service, ServiceKey::new("default", "web"));
    assert!(hs.update(&checks).is_empty());
    let answer = health_get(&t);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"localEndpoints\":2"), "{answer}");

    // No local endpoints: outside traffic is dropped, health says 503.
    p.apply(slice("web", &eps[2..], &[("http", 80, "TCP")]));
    p.sync().expect("sync");
    hs.update(&p.health_checks());
    let answer = health_get(&t);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("\"localEndpoints\":0"), "{answer}");
    let filter = t.iptables_save(backend, "filter");
    assert!(filter.contains("has no local endpoints"), "{filter}");
}
both_backends!(external_policy_local);

/// internalTrafficPolicy Local: pods reach only endpoints on their node, source kept.
fn internal_policy_local(backend: BackendChoice) {
    let t = Topology::new(3);
    let (mut p, _) = t.proxier(backend);
    p.apply(web(json!({"internalTrafficPolicy": "Local"})));
    let eps = [
        (t.endpoints[0].ip.as_str(), "other-node"),
        (t.endpoints[1].ip.as_str(), NODE_NAME),
        (t.endpoints[2].ip.as_str(), "other-node"),
    ];
    p.apply(slice("web", &eps, &[("http", 80, "TCP")]));
    p.sync().expect("sync");
    let r = ok_requests(&t.client, "10.96.0.10:80", 100);
    assert_eq!(hits(&r).keys().collect::<Vec<_>>(), ["ep1"]);
    assert_eq!(peers(&r), BTreeSet::from([CLIENT_IP.to_owned()]));
}
both_backends!(internal_policy_local);

/// A pod reaching itself through its Service gets the answer (hairpin masquerade).
fn hairpin(backend: BackendChoice) {
    let t = Topology::new(1);
    let (mut p, _) = t.proxier(backend);
    p.apply(web(json!({})));
    p.apply(slice(
        "web",
        &all_endpoints(&t, NODE_NAME),
        &[("http", 80, "TCP")],
    ));
    p.sync().expect("sync");
    let r = ok_requests(&t.endpoints[0].ns, "10.96.0.10:80", 5);
    assert_eq!(hits(&r).keys().collect::<Vec<_>>(), ["ep0"]);
    assert_eq!(peers(&r), BTreeSet::from([BRIDGE_IP.to_owned()]));
}
both_backends!(hairpin);

/// A UDP flow pinned to an endpoint by conntrack moves when that endpoint leaves; TCP and
/// UDP ports of one Service work side by side.
fn udp_conntrack_cleanup(backend: BackendChoice) {
    let t = Topology::new(2);
    let (mut p, _) = t.proxier(backend);
    p.apply(service(
        "dns",
        json!({"clusterIP": "10.96.0.53", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "http", "port": 80, "protocol": "TCP"},
        ]}),
    ));
    let ports = [("dns", 53, "UDP"), ("http", 80, "TCP")];
    p.apply(slice("dns", &[(t.endpoints[0].ip.as_str(), "n")], &ports));
    p.sync().expect("sync");
    assert_eq!(ok_requests(&t.client, "10.96.0.53:80", 1)[0].0, "ep0");

    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<String>();
    let client = spawn_in_netns(&t.client.name, move || {
        let s = UdpSocket::bind("0.0.0.0:40053").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut buf = [0u8; 128];
        for () in rx {
            s.send_to(b"q", "10.96.0.53:53").expect("send");
            let n = s.recv(&mut buf).unwrap_or(0);
            back_tx
                .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                .expect("back");
        }
    });
    tx.send(()).expect("ask");
    assert!(back_rx.recv().expect("answer").starts_with("ep0"));
    let flows = t.node.exec(&["conntrack", "-L", "-p", "udp"]);
    assert!(flows.contains(&t.endpoints[0].ip), "{flows}");

    p.apply(slice("dns", &[(t.endpoints[1].ip.as_str(), "n")], &ports));
    let r = p.sync().expect("sync");
    assert!(r.conntrack_deletions > 0);
    // Same socket, same 5-tuple: without the cleanup conntrack would still send it to ep0,
    // whose server is still running.
    tx.send(()).expect("ask");
    let answer = back_rx.recv().expect("answer");
    assert!(answer.starts_with("ep1"), "{answer}");
    drop(tx);
    client.join().expect("client");
}
both_backends!(udp_conntrack_cleanup);

/// Someone flushes and deletes the tables' chains: the canary notices and a full sync
/// brings everything back.
fn flushed_chains_restored(backend: BackendChoice) {
    let t = Topology::new(2);
    let (mut p, _) = t.proxier(backend);
    p.apply(web(json!({})));
    p.apply(slice(
        "web",
        &all_endpoints(&t, "other-node"),
        &[("http", 80, "TCP")],
    ));
    p.sync().expect("sync");
    assert!(p.check_canary().expect("canary"));
    let ipt = iptables_tool(backend);
    t.node.exec(&[ipt, "-w", "5", "-t", "nat", "-F"]);
    t.node.exec(&[ipt, "-w", "5", "-t", "nat", "-X"]);
    assert!(!t.iptables_save(backend, "nat").contains("FERRO-"));
    assert!(!p.check_canary().expect("canary"));
    assert!(p.sync().expect("sync").full);
    assert!(p.check_canary().expect("canary"));
    assert_eq!(hits(&ok_requests(&t.client, "10.96.0.10:80", 100)).len(), 2);
}
both_backends!(flushed_chains_restored);

fn reasons(events: &[ferrolet::proxy::ProxyEvent]) -> BTreeSet<&'static str> {
    events.iter().map(|e| e.reason).collect()
}

/// Bad input is skipped with an Event and leaves every other Service working: a second
/// Service on a taken ClusterIP:port, a ClusterIP outside the range, one that is no IP at
/// all, and a slice with an invalid address and an endpoint without addresses.
fn bad_input(backend: BackendChoice) {
    let t = Topology::new(3);
    let (mut p, events) = t.proxier(backend);
    let with_meta = |name: &str, created: &str, spec: serde_json::Value| {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name, "creationTimestamp": created},
            "spec": spec,
        }))
        .expect("service");
        Change::ServiceUpserted(Box::new(svc))
    };
    let port = json!([{"name": "http", "port": 80, "protocol": "TCP"}]);
    // web is older than twin, so web keeps 10.96.0.10:80.
    p.apply(with_meta(
        "web",
        "2026-01-01T00:00:00Z",
        json!({"clusterIP": "10.96.0.10", "ports": port}),
    ));
    p.apply(with_meta(
        "twin",
        "2026-02-01T00:00:00Z",
        json!({"clusterIP": "10.96.0.10", "ports": port}),
    ));
    p.apply(service(
        "faraway",
        json!({"clusterIP": "10.97.0.1", "ports": port}),
    ));
    p.apply(service(
        "garbled",
        json!({"clusterIP": "10.96.0.300", "ports": port}),
    ));
    p.apply(service(
        "mixed",
        json!({"clusterIP": "10.96.0.20", "ports": port}),
    ));
    let ports = [("http", 80, "TCP")];
    p.apply(slice(
        "web",
        &[
            (t.endpoints[0].ip.as_str(), "n"),
            (t.endpoints[1].ip.as_str(), "n"),
        ],
        &ports,
    ));
    p.apply(slice("twin", &[(t.endpoints[2].ip.as_str(), "n")], &ports));
    p.apply(slice(
        "faraway",
        &[(t.endpoints[2].ip.as_str(), "n")],
        &ports,
    ));
    let mixed: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "default", "name": "mixed-1",
                     "labels": {"kubernetes.io/service-name": "mixed"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["10.240.0.999"], "nodeName": "n", "conditions": {"ready": true}},
            {"addresses": [], "nodeName": "n", "conditions": {"ready": true}},
            {"addresses": [t.endpoints[2].ip], "nodeName": "n", "conditions": {"ready": true}},
        ],
        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
    }))
    .expect("slice");
    p.apply(Change::SliceUpserted(Box::new(mixed)));
    p.sync().expect("bad input must not fail the sync");

    let got = events.drain();
    let want = BTreeSet::from([
        "PortCollision",
        "ClusterIPOutOfRange",
        "InvalidClusterIP",
        "InvalidEndpointIP",
        "EndpointWithoutAddress",
    ]);
    assert!(reasons(&got).is_superset(&want), "{got:?}");
    let collision = got
        .iter()
        .find(|e| e.reason == "PortCollision")
        .expect("collision event");
    assert_eq!(
        (collision.kind, collision.name.as_str()),
        ("Service", "twin")
    );

    // web keeps its address and only its own endpoints answer there.
    let h = hits(&ok_requests(&t.client, "10.96.0.10:80", 200));
    assert_eq!(h.keys().collect::<Vec<_>>(), ["ep0", "ep1"], "{h:?}");
    // mixed works with the one endpoint that was valid.
    let h = hits(&ok_requests(&t.client, "10.96.0.20:80", 20));
    assert_eq!(h.keys().collect::<Vec<_>>(), ["ep2"], "{h:?}");
    let nat = t.iptables_save(backend, "nat");
    assert!(!nat.contains("10.97.0.1"), "{nat}");
    assert!(!nat.contains("10.240.0.999"), "{nat}");

    // The older Service goes away: twin gets the address at the next sync.
    p.apply(Change::ServiceDeleted(ServiceKey::new("default", "web")));
    p.sync().expect("sync");
    let h = hits(&ok_requests(&t.client, "10.96.0.10:80", 20));
    assert_eq!(h.keys().collect::<Vec<_>>(), ["ep2"], "{h:?}");
}
both_backends!(bad_input);
