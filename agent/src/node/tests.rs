//! Node registration, status and lease against the fake API and runtime.

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;

use super::*;
use crate::api::fake::{FakeApi, Write};
use crate::cni::fake::FakeNetwork;
use crate::cri::fake::FakeRuntime;

fn settings() -> NodeSettings {
    NodeSettings {
        name: "node-a".into(),
        labels: BTreeMap::from([("zone".into(), "z1".into())]),
        taints: vec![Taint {
            key: "dedicated".into(),
            value: Some("gpu".into()),
            effect: "NoSchedule".into(),
            time_added: None,
        }],
        max_pods: 50,
        reserved: BTreeMap::from([
            ("cpu".into(), Quantity::parse("250m").expect("q")),
            ("memory".into(), Quantity::parse("1Ki").expect("q")),
        ]),
        host_ips: vec!["192.0.2.1".into()],
        hostname: "host-a".into(),
        lease_duration_seconds: 40,
        kubelet_port: 10250,
        update_frequency: Duration::from_secs(10),
        report_frequency: Duration::from_secs(300),
        root_dir: "/tmp".into(),
    }
}

fn info() -> SystemInfo {
    SystemInfo {
        cpus: 2,
        memory_bytes: 4096,
        memory_available_bytes: 1 << 30,
        disk_bytes: 1000,
        disk_available_bytes: 500,
        pid_max: 1000,
        processes: 10,
        kernel_version: "6.1.0".into(),
        os_image: "Debian".into(),
        machine_id: "m".into(),
        system_uuid: "s".into(),
        boot_id: "b".into(),
    }
}

#[test]
fn capacity_minus_reserved_is_allocatable() {
    let (cap, alloc) = resources(&settings(), &info());
    let get = |m: &BTreeMap<String, ApiQuantity>, k: &str| m[k].0.clone();
    assert_eq!(get(&cap, "cpu"), "2");
    assert_eq!(get(&alloc, "cpu"), "1750m");
    assert_eq!(get(&cap, "memory"), "4096");
    assert_eq!(get(&alloc, "memory"), "3072");
    assert_eq!(get(&cap, "pods"), "50");
    assert_eq!(get(&alloc, "ephemeral-storage"), "1000");
}

#[test]
fn conditions_reflect_pressure_and_runtime_readiness() {
    let mut i = info();
    let state = |i: &SystemInfo, r: Result<(), String>| {
        condition_states(i, r)
            .into_iter()
            .map(|(k, on, reason, _)| (k, on, reason))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        state(&i, Ok(())),
        [
            ("MemoryPressure", false, "KubeletHasSufficientMemory"),
            ("DiskPressure", false, "KubeletHasNoDiskPressure"),
            ("PIDPressure", false, "KubeletHasSufficientPID"),
            ("Ready", true, "KubeletReady"),
        ]
    );
    i.memory_available_bytes = 1;
    i.disk_available_bytes = 50;
    i.processes = 950;
    let s = state(&i, Err("runtime down".into()));
    assert!(
        s.iter()
            .all(|(k, on, _)| if *k == "Ready" { !on } else { *on }),
        "{s:?}"
    );
}

#[test]
fn only_real_changes_count_as_changes() {
    let s = settings();
    let t = |secs| Timestamp::from_second(secs).expect("t");
    let a = node_status(&s, &info(), Ok(()), "fake://1", None, t(1));
    let mut busier = info();
    busier.memory_available_bytes -= 4096;
    let b = node_status(&s, &busier, Ok(()), "fake://1", Some(&a), t(2));
    assert!(
        !status_changed(Some(&a), &b),
        "heartbeat and message numbers do not count"
    );
    let c = node_status(&s, &info(), Err("down".into()), "fake://1", Some(&a), t(3));
    assert!(status_changed(Some(&a), &c));
    let ready = c
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.last_transition_time, Some(Time(t(3))));
    let mem = b
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "MemoryPressure")
        .expect("MemoryPressure");
    assert_eq!(
        mem.last_transition_time,
        Some(Time(t(1))),
        "unchanged keeps its time"
    );
    let info = b.node_info.expect("nodeInfo");
    assert_eq!(info.container_runtime_version, "fake://1");
    assert_eq!(info.architecture, kube_arch());
}

fn agent(api: Arc<FakeApi>) -> NodeAgent<FakeApi, FakeRuntime, FakeNetwork> {
    NodeAgent {
        api,
        runtime: Arc::new(FakeRuntime::default()),
        network: Arc::new(FakeNetwork::default()),
        settings: settings(),
    }
}

#[tokio::test]
async fn registration_creates_then_reconciles_and_the_lease_is_created_then_renewed() {
    let api = Arc::new(FakeApi::new());
    let a = agent(api.clone());
    let node = a.register().await.expect("register");
    let labels = node.metadata.labels.clone().expect("labels");
    assert_eq!(labels["kubernetes.io/hostname"], "node-a");
    assert_eq!(labels["kubernetes.io/os"], "linux");
    assert_eq!(labels["kubernetes.io/arch"], kube_arch());
    assert_eq!(labels["zone"], "z1");
    let taints = node.spec.and_then(|s| s.taints).expect("taints");
    assert_eq!(taints[0].key, "dedicated");

    a.register().await.expect("register again reconciles");
    assert!(
        matches!(api.writes().last(), Some(Write::Patch { path, .. }) if path == "/api/v1/nodes/node-a")
    );

    let reported = a
        .report(None, true)
        .await
        .expect("report")
        .expect("patched");
    let stored: Node = api.object(None, "node-a").expect("node");
    let stored = stored.status.expect("status stored");
    assert_eq!(stored.addresses, reported.addresses);
    assert_eq!(
        stored
            .daemon_endpoints
            .as_ref()
            .and_then(|d| d.kubelet_endpoint.as_ref())
            .map(|e| e.port),
        Some(10250),
        "the kubelet API port is reported"
    );
    assert_eq!(stored.capacity, reported.capacity);
    let kinds = |s: &NodeStatus| -> Vec<(String, String)> {
        s.conditions
            .iter()
            .flatten()
            .map(|c| (c.type_.clone(), c.status.clone()))
            .collect()
    };
    assert_eq!(kinds(&stored), kinds(&reported));
    let ready = reported
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "True", "{ready:?}");
    assert!(
        a.report(Some(&reported), false)
            .await
            .expect("report")
            .is_none(),
        "no change, no patch"
    );

    a.renew_lease(Some("uid-node-a"))
        .await
        .expect("create lease");
    let lease: Lease = api.object(Some(LEASE_NAMESPACE), "node-a").expect("lease");
    let spec = lease.spec.clone().expect("spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("node-a"));
    assert_eq!(spec.lease_duration_seconds, Some(40));
    assert_eq!(
        lease.metadata.owner_references.expect("owner")[0].kind,
        "Node"
    );
    let first = spec.renew_time.expect("renewTime");
    tokio::time::sleep(Duration::from_millis(5)).await;
    a.renew_lease(Some("uid-node-a")).await.expect("renew");
    let renewed: Lease = api.object(Some(LEASE_NAMESPACE), "node-a").expect("lease");
    assert!(renewed.spec.and_then(|s| s.renew_time).expect("renewTime") > first);
}
