//! The proxier against the fake kernel of `fake_kernel`.

use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

use super::*;
use crate::proxy::events::MemoryRecorder;
use crate::proxy::fake_kernel::{FakeExec, FakeKernel, Tables};
use crate::proxy::iptables::BackendChoice;
fn config() -> ProxyConfig {
    let mut c = ProxyConfig::new("node-a");
    c.service_cidrs = vec!["10.96.0.0/16".parse().unwrap()];
    c.cluster_cidr = Some("10.244.0.0/16".parse().unwrap());
    c
}

fn proxier(k: &Arc<FakeKernel>) -> (Proxier, Arc<MemoryRecorder>) {
    let exec: Arc<dyn Exec> = Arc::new(FakeExec(k.clone()));
    let ipt = Iptables::detect(exec.clone(), BackendChoice::Auto).unwrap();
    let events = Arc::new(MemoryRecorder::new());
    (Proxier::new(config(), ipt, exec, events.clone()), events)
}

fn service(name: &str, ip: &str, ports: serde_json::Value, extra: serde_json::Value) -> Change {
    let mut spec = json!({"clusterIP": ip, "ports": ports});
    if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": name},
        "spec": spec,
    }))
    .unwrap();
    Change::ServiceUpserted(Box::new(svc))
}

fn tcp(port: u16) -> serde_json::Value {
    json!([{"name": "http", "port": port, "protocol": "TCP"}])
}

/// A slice of `svc` with endpoints (address, node) on port `http` = `port`.
fn slice(svc: &str, name: &str, port: u16, proto: &str, eps: &[(&str, &str)]) -> Change {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(ip, node)| {
            if ip.is_empty() {
                json!({"addresses": [], "nodeName": node})
            } else {
                json!({"addresses": [ip], "nodeName": node, "conditions": {"ready": true}})
            }
        })
        .collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "ns", "name": name, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": proto}],
    }))
    .unwrap();
    Change::SliceUpserted(Box::new(s))
}

/// What a fresh proxier writes for the same inputs on a fresh kernel.
fn fresh_full_sync(changes: &[Change], foreign: impl Fn(&FakeKernel)) -> Tables {
    let k = FakeKernel::new();
    foreign(&k);
    let (mut p, _) = proxier(&k);
    for c in changes {
        p.apply(c.clone());
    }
    p.sync().unwrap();
    k.ours()
}

fn foreign_rules(k: &FakeKernel) {
    k.tables
        .lock()
        .unwrap()
        .get_mut("nat")
        .unwrap()
        .insert("OTHER-CHAIN".into(), vec![]);
    k.add_rule("nat", "OTHER-CHAIN", "-j RETURN");
    k.add_rule("nat", "PREROUTING", "-j OTHER-CHAIN");
    k.add_rule("filter", "INPUT", "-p tcp --dport 22 -j ACCEPT");
}

fn dispatch_has(k: &FakeKernel, needle: &str) -> bool {
    k.chain("nat", "FERRO-SERVICES")
        .unwrap()
        .iter()
        .any(|r| r.contains(needle))
}

#[test]
fn partial_syncs_write_only_changes_and_converge_to_a_full_sync() {
    let k = FakeKernel::new();
    foreign_rules(&k);
    let (mut p, events) = proxier(&k);
    let mut history = vec![
        service("web", "10.96.0.10", tcp(80), json!({})),
        slice(
            "web",
            "web-1",
            8080,
            "TCP",
            &[("10.244.1.1", "node-b"), ("10.244.1.2", "node-b")],
        ),
        service("db", "10.96.0.11", tcp(5432), json!({})),
        slice("db", "db-1", 5432, "TCP", &[("10.244.2.1", "node-a")]),
    ];
    for c in &history {
        p.apply(c.clone());
    }
    let first = p.sync().unwrap();
    assert!(first.full);
    assert!(dispatch_has(&k, "-d 10.96.0.10/32"));
    let hooks = k.chain("nat", "PREROUTING").unwrap();
    assert_eq!(
        hooks
            .iter()
            .filter(|r| r.ends_with("-j FERRO-SERVICES"))
            .count(),
        1
    );

    // Nothing changed: nothing written.
    assert_eq!(p.sync().unwrap().bytes, 0);

    // One endpoint changes: only web's service chain is rewritten.
    let c = slice(
        "web",
        "web-1",
        8080,
        "TCP",
        &[("10.244.1.1", "node-b"), ("10.244.1.3", "node-b")],
    );
    history.push(c.clone());
    p.apply(c);
    let r = p.sync().unwrap();
    assert!(!r.full);
    let payload = k.restores().pop().unwrap();
    assert!(payload.contains("10.244.1.3:8080"));
    assert!(
        !payload.contains("FERRO-SERVICES"),
        "dispatch untouched:\n{payload}"
    );
    assert!(!payload.contains("*filter"), "filter untouched:\n{payload}");
    assert_eq!(
        payload.lines().filter(|l| l.starts_with(':')).count(),
        1,
        "{payload}"
    );

    // A Service goes away: its chains are deleted, the dispatch rewritten.
    let c = Change::ServiceDeleted(ServiceKey::new("ns", "db"));
    history.push(c.clone());
    p.apply(c);
    p.sync().unwrap();
    let payload = k.restores().pop().unwrap();
    assert!(
        payload.lines().any(|l| l.starts_with("-X FERRO-SVC-")),
        "{payload}"
    );
    assert!(!dispatch_has(&k, "10.96.0.11"));

    // The endpoints go away: the filter table rejects.
    let c = slice("web", "web-1", 8080, "TCP", &[]);
    history.push(c.clone());
    p.apply(c);
    p.sync().unwrap();
    let rejects = k.chain("filter", "FERRO-SERVICES").unwrap();
    assert_eq!(rejects.len(), 1);
    assert!(rejects[0].contains("-d 10.96.0.10/32") && rejects[0].contains("REJECT"));

    assert_eq!(k.ours(), fresh_full_sync(&history, foreign_rules));
    assert_eq!(k.chain("nat", "OTHER-CHAIN").unwrap(), ["-j RETURN"]);
    assert!(
        k.chain("nat", "PREROUTING")
            .unwrap()
            .contains(&"-j OTHER-CHAIN".to_owned())
    );
    assert!(
        k.chain("filter", "INPUT")
            .unwrap()
            .contains(&"-p tcp --dport 22 -j ACCEPT".to_owned())
    );
    for payload in k.restores() {
        assert!(
            !payload.contains("OTHER-CHAIN") && !payload.contains("--dport 22"),
            "{payload}"
        );
        assert!(
            !payload
                .lines()
                .any(|l| l.starts_with(":PREROUTING") || l.starts_with("-F"))
        );
    }
    assert!(events.drain().is_empty());
}

#[test]
fn full_sync_deletes_stale_chains_of_an_earlier_run_and_keeps_hooks_single() {
    let k = FakeKernel::new();
    {
        let (mut p, _) = proxier(&k);
        p.apply(service("old", "10.96.0.20", tcp(80), json!({})));
        p.apply(slice(
            "old",
            "old-1",
            80,
            "TCP",
            &[("10.244.1.9", "node-a")],
        ));
        p.sync().unwrap();
    }
    let before: usize = k.tables.lock().unwrap()["nat"].len();
    let (mut p, _) = proxier(&k);
    p.apply(service("new", "10.96.0.21", tcp(80), json!({})));
    p.sync().unwrap();
    let nat = k.tables.lock().unwrap()["nat"].clone();
    assert!(nat.len() < before, "stale chains removed");
    assert!(!nat.values().flatten().any(|r| r.contains("10.244.1.9")));
    assert_eq!(nat["PREROUTING"].len(), 1);
    assert_eq!(
        k.ours(),
        fresh_full_sync(&[service("new", "10.96.0.21", tcp(80), json!({}))], |_| {})
    );
}

#[test]
fn failed_restore_makes_the_next_sync_full() {
    let k = FakeKernel::new();
    let (mut p, _) = proxier(&k);
    p.apply(service("web", "10.96.0.10", tcp(80), json!({})));
    p.sync().unwrap();
    *k.fail_restores.lock().unwrap() = 1;
    p.apply(slice(
        "web",
        "web-1",
        80,
        "TCP",
        &[("10.244.1.1", "node-b")],
    ));
    let err = p.sync().unwrap_err();
    assert!(err.to_string().contains("line 2 failed"), "{err}");
    assert!(p.needs_sync());
    let r = p.sync().unwrap();
    assert!(r.full);
    assert!(k.chain("nat", "FERRO-SERVICES").is_some());
    assert!(
        k.tables.lock().unwrap()["nat"]
            .values()
            .flatten()
            .any(|r| r.contains("10.244.1.1:80"))
    );
}

#[test]
fn canary_notices_a_flushed_table_and_the_full_sync_restores_it() {
    let k = FakeKernel::new();
    let (mut p, _) = proxier(&k);
    p.apply(service("web", "10.96.0.10", tcp(80), json!({})));
    p.apply(slice(
        "web",
        "web-1",
        80,
        "TCP",
        &[("10.244.1.1", "node-b")],
    ));
    p.sync().unwrap();
    let good = k.ours();
    assert!(p.check_canary().unwrap());
    assert!(!p.needs_sync());

    k.flush_table("nat");
    assert!(!p.check_canary().unwrap());
    assert!(p.needs_sync());
    assert!(p.sync().unwrap().full);
    assert_eq!(k.ours(), good);
}

#[test]
fn removed_udp_endpoints_lose_their_conntrack_entries() {
    let k = FakeKernel::new();
    let (mut p, _) = proxier(&k);
    let udp = json!([{"name": "http", "port": 53, "protocol": "UDP", "nodePort": 30053}]);
    p.apply(service(
        "dns",
        "10.96.0.53",
        udp,
        json!({"type": "NodePort"}),
    ));
    p.sync().unwrap();
    p.apply(slice(
        "dns",
        "dns-1",
        5353,
        "UDP",
        &[("10.244.1.1", "node-b"), ("10.244.1.2", "node-b")],
    ));
    p.sync().unwrap();
    // Going from no endpoints to some clears flows that were never DNATed.
    assert_eq!(
        k.conntrack_calls(),
        [
            "-D -p udp --orig-dst 10.96.0.53",
            "-D -p udp --orig-port-dst 30053"
        ]
    );
    p.apply(slice(
        "dns",
        "dns-1",
        5353,
        "UDP",
        &[("10.244.1.2", "node-b")],
    ));
    let r = p.sync().unwrap();
    assert_eq!(r.conntrack_deletions, 2);
    assert_eq!(
        k.conntrack_calls()[2..],
        [
            "-D -p udp --orig-dst 10.96.0.53 --dst-nat 10.244.1.1",
            "-D -p udp --orig-port-dst 30053 --dst-nat 10.244.1.1"
        ]
    );
}

#[test]
fn named_target_ports_resolve_per_slice() {
    let k = FakeKernel::new();
    let (mut p, _) = proxier(&k);
    p.apply(service("web", "10.96.0.10", tcp(80), json!({})));
    p.apply(slice(
        "web",
        "web-1",
        8080,
        "TCP",
        &[("10.244.1.1", "node-b")],
    ));
    p.apply(slice(
        "web",
        "web-2",
        9090,
        "TCP",
        &[("10.244.1.2", "node-b")],
    ));
    p.sync().unwrap();
    let nat = k.tables.lock().unwrap()["nat"].clone();
    let all: Vec<&String> = nat.values().flatten().collect();
    assert!(
        all.iter()
            .any(|r| r.ends_with("--to-destination 10.244.1.1:8080"))
    );
    assert!(
        all.iter()
            .any(|r| r.ends_with("--to-destination 10.244.1.2:9090"))
    );
}

fn reasons(events: &MemoryRecorder) -> Vec<&'static str> {
    events.drain().into_iter().map(|e| e.reason).collect()
}

#[test]
fn bad_input_is_skipped_reported_and_does_not_hurt_other_services() {
    let k = FakeKernel::new();
    let (mut p, events) = proxier(&k);
    p.apply(service("good", "10.96.0.10", tcp(80), json!({})));
    p.apply(slice(
        "good",
        "good-1",
        80,
        "TCP",
        &[("10.244.1.1", "node-b")],
    ));

    // Outside the service range, and not an IP at all.
    p.apply(service("far", "172.16.0.1", tcp(80), json!({})));
    p.apply(service("junk", "not-an-ip", tcp(80), json!({})));
    // Two ports of one Service collide.
    p.apply(service(
        "twice",
        "10.96.0.12",
        json!([{"name": "a", "port": 80}, {"name": "b", "port": 80, "protocol": "TCP"}, {"name": "c", "port": 81}]),
        json!({}),
    ));
    // An endpoint without addresses and one with a bad address, beside a good one.
    p.apply(service("eps", "10.96.0.13", tcp(80), json!({})));
    p.apply(slice(
        "eps",
        "eps-1",
        80,
        "TCP",
        &[
            ("", "node-b"),
            ("10.244.1.300", "node-b"),
            ("10.244.1.5", "node-b"),
        ],
    ));
    p.sync().unwrap();

    let mut got = reasons(&events);
    got.sort_unstable();
    assert_eq!(
        got,
        [
            "ClusterIPOutOfRange",
            "EndpointWithoutAddress",
            "InvalidClusterIP",
            "InvalidEndpointIP",
            "PortCollision"
        ]
    );
    assert!(dispatch_has(&k, "-d 10.96.0.10/32"));
    assert!(!dispatch_has(&k, "172.16.0.1"));
    let twice: Vec<String> = k
        .chain("nat", "FERRO-SERVICES")
        .unwrap()
        .into_iter()
        .filter(|r| r.contains("10.96.0.12"))
        .collect();
    assert_eq!(twice.len(), 2, "ports a and c programmed: {twice:?}");
    let nat = k.tables.lock().unwrap()["nat"].clone();
    assert!(nat.values().flatten().any(|r| r.ends_with("10.244.1.5:80")));
    assert!(!nat.values().flatten().any(|r| r.contains("10.244.1.300")));
}

#[test]
fn colliding_node_ports_go_to_the_older_service_and_move_when_it_goes() {
    let k = FakeKernel::new();
    let (mut p, events) = proxier(&k);
    let np = |ip: &str, name: &str, created: &str| {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"namespace": "ns", "name": name, "creationTimestamp": created},
            "spec": {"type": "NodePort", "clusterIP": ip, "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
        }))
        .unwrap();
        Change::ServiceUpserted(Box::new(svc))
    };
    p.apply(np("10.96.0.31", "young", "2024-02-01T00:00:00Z"));
    p.apply(np("10.96.0.30", "old", "2024-01-01T00:00:00Z"));
    p.sync().unwrap();
    assert_eq!(reasons(&events), ["NodePortCollision"]);
    let nodeports = k.chain("nat", "FERRO-NODEPORTS").unwrap();
    assert_eq!(nodeports.len(), 1);
    assert!(nodeports[0].contains("ns/old:http"));
    // Both ClusterIPs still work.
    assert!(dispatch_has(&k, "10.96.0.30") && dispatch_has(&k, "10.96.0.31"));

    p.apply(Change::ServiceDeleted(ServiceKey::new("ns", "old")));
    p.sync().unwrap();
    let nodeports = k.chain("nat", "FERRO-NODEPORTS").unwrap();
    assert_eq!(nodeports.len(), 1);
    assert!(nodeports[0].contains("ns/young:http"), "{nodeports:?}");
}

#[test]
fn node_pod_cidr_is_used_when_no_cluster_cidr_is_configured() {
    let k = FakeKernel::new();
    let exec: Arc<dyn Exec> = Arc::new(FakeExec(k.clone()));
    let ipt = Iptables::detect(exec.clone(), BackendChoice::Auto).unwrap();
    let mut cfg = config();
    cfg.cluster_cidr = None;
    let mut p = Proxier::new(cfg, ipt, exec, Arc::new(MemoryRecorder::new()));
    p.apply(service("web", "10.96.0.10", tcp(80), json!({})));
    p.apply(slice(
        "web",
        "web-1",
        80,
        "TCP",
        &[("10.244.1.1", "node-b")],
    ));
    p.sync().unwrap();
    let nat = k.tables.lock().unwrap()["nat"].clone();
    assert!(!nat.values().flatten().any(|r| r.contains("! -s")));
    let node: Node = serde_json::from_value(
        json!({"metadata": {"name": "node-a"}, "spec": {"podCIDR": "10.244.7.0/24"}}),
    )
    .unwrap();
    p.apply(Change::NodeUpserted(Box::new(node)));
    p.sync().unwrap();
    let nat = k.tables.lock().unwrap()["nat"].clone();
    assert!(
        nat.values()
            .flatten()
            .any(|r| r.contains("! -s 10.244.7.0/24 -j FERRO-MARK-MASQ"))
    );
}

#[test]
fn health_checks_count_local_endpoints() {
    let k = FakeKernel::new();
    let (mut p, _) = proxier(&k);
    let ports = json!([{"name": "http", "port": 80, "nodePort": 30080}]);
    p.apply(service(
        "web",
        "10.96.0.10",
        ports,
        json!({"type": "NodePort", "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000}),
    ));
    p.apply(slice(
        "web",
        "web-1",
        80,
        "TCP",
        &[("10.244.1.1", "node-a"), ("10.244.1.2", "node-b")],
    ));
    p.sync().unwrap();
    let hc = p.health_checks();
    assert_eq!(hc[&32000].local_endpoints, 1);
    assert!(k.chain("filter", "FERRO-NODEPORTS").unwrap()[0].contains("--dport 32000"));
}

async fn next_report(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<SyncReport, String>>,
) -> SyncReport {
    tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("a sync within the deadline")
        .expect("loop alive")
        .expect("sync ok")
}

#[tokio::test]
async fn the_loop_syncs_changes_checks_the_canary_and_stops() {
    use crate::proxy::run::{Timing, run};
    use std::time::Duration;

    let k = FakeKernel::new();
    let (p, _) = proxier(&k);
    let p = Arc::new(Mutex::new(p));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (rep_tx, mut rep_rx) = tokio::sync::mpsc::unbounded_channel();
    let timing = Timing {
        min_sync_interval: Duration::from_millis(10),
        full_sync_interval: Duration::from_secs(3600),
        canary_interval: Duration::from_millis(20),
    };
    let task = tokio::spawn(run(p.clone(), rx, timing, None, stop_rx, Some(rep_tx)));

    // Start-up full sync, even with nothing to program.
    assert!(next_report(&mut rep_rx).await.full);

    tx.send(service("web", "10.96.0.10", tcp(80), json!({})))
        .await
        .unwrap();
    let r = next_report(&mut rep_rx).await;
    assert!(!r.full && r.services_rebuilt == 1, "{r:?}");
    assert!(dispatch_has(&k, "10.96.0.10"));

    // Wiping the table is noticed by the canary and repaired by a full sync.
    k.flush_table("nat");
    loop {
        if next_report(&mut rep_rx).await.full {
            break;
        }
    }
    assert!(dispatch_has(&k, "10.96.0.10"));

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("loop stops")
        .unwrap();
}

#[test]
fn legacy_full_sync_is_one_payload_and_writes_what_batched_nft_writes() {
    let changes: Vec<Change> = (0..30)
        .flat_map(|i| {
            let name = format!("svc{i}");
            let ip = format!("10.96.1.{i}");
            let ep = format!("10.244.3.{i}");
            vec![
                service(&name, &ip, tcp(80), json!({})),
                slice(&name, &format!("{name}-1"), 80, "TCP", &[(&ep, "node-a")]),
            ]
        })
        .collect();
    let nft = fresh_full_sync(&changes, |_| {});

    let k = FakeKernel::with_backend(true);
    let (mut p, _) = proxier(&k);
    assert_eq!(p.iptables().backend(), Backend::Legacy);
    for c in &changes {
        p.apply(c.clone());
    }
    p.sync().unwrap();
    assert_eq!(k.restores().len(), 1);
    assert_eq!(k.ours(), nft);
}
