//! The agent's routes to other nodes' pod ranges, programmed for real through rtnetlink in a
//! network namespace this test creates (and deletes, pass or fail).

mod proxy_support;

use ferrolet::node::routes::{NetlinkRouteTable, sync};
use k8s_openapi::api::core::v1::Node;
use proxy_support::{Netns, require_root};
use serde_json::json;

fn node(name: &str, pod_cidr: &str, ip: &str) -> Node {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"podCIDR": pod_cidr},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    }))
    .expect("node")
}

/// `ip route` lines of the main table, sorted.
fn routes(ns: &Netns) -> Vec<String> {
    let mut lines: Vec<String> = ns
        .ip(&["-4", "route", "show"])
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    lines.sort();
    lines
}

fn sync_in(ns: &Netns, nodes: Vec<Node>) {
    ns.within(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let table = NetlinkRouteTable::connect().expect("netlink");
            sync(
                &table,
                &nodes,
                "self",
                "10.244.0.0/16".parse().expect("cidr"),
            )
            .await
            .expect("sync");
        });
    });
}

#[test]
fn routes_follow_the_nodes_and_leave_foreign_routes_alone() {
    require_root();
    let ns = Netns::new(format!("fl-routes-{}", std::process::id()));
    ns.ip(&["link", "add", "d0", "type", "bridge"]);
    ns.ip(&["addr", "add", "172.31.250.1/24", "dev", "d0"]);
    ns.ip(&["link", "set", "d0", "up"]);
    // An admin's route inside the cluster CIDR, and a route with our protocol outside it:
    // neither is ours to touch.
    ns.ip(&["route", "add", "10.244.50.0/24", "via", "172.31.250.50"]);
    ns.ip(&[
        "route",
        "add",
        "192.168.77.0/24",
        "via",
        "172.31.250.77",
        "proto",
        "70",
    ]);
    let foreign = [
        "10.244.50.0/24 via 172.31.250.50 dev d0",
        "192.168.77.0/24 via 172.31.250.77 dev d0 proto 70",
    ];

    sync_in(
        &ns,
        vec![
            node("self", "10.244.0.0/24", "172.31.250.1"),
            node("b", "10.244.1.0/24", "172.31.250.2"),
            node("c", "10.244.2.0/24", "172.31.250.3"),
        ],
    );
    let now = routes(&ns);
    for want in [
        "10.244.1.0/24 via 172.31.250.2 dev d0 proto 70",
        "10.244.2.0/24 via 172.31.250.3 dev d0 proto 70",
    ]
    .iter()
    .chain(&foreign)
    {
        assert!(now.iter().any(|l| l == want), "{want:?} missing: {now:#?}");
    }
    assert!(
        !now.iter().any(|l| l.starts_with("10.244.0.0/24")),
        "no route to our own range: {now:#?}"
    );

    // b is gone, c moved to another address.
    sync_in(&ns, vec![node("c", "10.244.2.0/24", "172.31.250.33")]);
    let now = routes(&ns);
    assert!(
        now.iter()
            .any(|l| l == "10.244.2.0/24 via 172.31.250.33 dev d0 proto 70"),
        "{now:#?}"
    );
    assert!(
        !now.iter().any(|l| l.starts_with("10.244.1.0/24")),
        "{now:#?}"
    );
    assert!(!now.iter().any(|l| l.contains("172.31.250.3 ")), "{now:#?}");
    for want in foreign {
        assert!(now.iter().any(|l| l == want), "{want:?} missing: {now:#?}");
    }
}
