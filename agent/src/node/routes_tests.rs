//! Which routes the agent wants and how it gets there, against a recording fake table.

use std::sync::Mutex;

use k8s_openapi::api::core::v1::{NodeAddress, NodeSpec, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;

fn cluster() -> Ipv4Net {
    "10.244.0.0/16".parse().expect("cidr")
}

fn node(name: &str, pod_cidr: Option<&str>, addresses: &[(&str, &str)]) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: pod_cidr.map(Into::into),
            ..Default::default()
        }),
        status: Some(NodeStatus {
            addresses: Some(
                addresses
                    .iter()
                    .map(|(t, a)| NodeAddress {
                        type_: (*t).into(),
                        address: (*a).into(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

fn route(dst: &str, via: &str) -> PodRoute {
    PodRoute {
        dst: dst.parse().expect("dst"),
        via: via.parse().expect("via"),
    }
}

#[test]
fn every_other_node_with_a_range_and_an_internal_ip_is_routed() {
    let nodes = [
        node("a", Some("10.244.0.0/24"), &[("InternalIP", "172.31.0.1")]),
        node("b", Some("10.244.1.0/24"), &[("InternalIP", "172.31.0.2")]),
        node(
            "c",
            Some("10.244.2.0/24"),
            &[("Hostname", "c"), ("InternalIP", "172.31.0.3")],
        ),
    ];
    assert_eq!(
        desired_routes(&nodes, "a", cluster()),
        vec![
            route("10.244.1.0/24", "172.31.0.2"),
            route("10.244.2.0/24", "172.31.0.3")
        ]
    );
}

#[test]
fn nodes_without_range_or_address_or_outside_the_cluster_cidr_are_skipped() {
    let nodes = [
        node("no-range", None, &[("InternalIP", "172.31.0.2")]),
        node(
            "bad-range",
            Some("not-a-cidr"),
            &[("InternalIP", "172.31.0.2")],
        ),
        node("no-address", Some("10.244.3.0/24"), &[("Hostname", "x")]),
        node(
            "v6-only",
            Some("10.244.4.0/24"),
            &[("InternalIP", "fd00::4"), ("ExternalIP", "198.51.100.4")],
        ),
        node(
            "outside",
            Some("10.99.0.0/24"),
            &[("InternalIP", "172.31.0.5")],
        ),
        node(
            "wider-than-cluster",
            Some("10.0.0.0/8"),
            &[("InternalIP", "172.31.0.6")],
        ),
    ];
    assert_eq!(desired_routes(&nodes, "self", cluster()), vec![]);
}

#[test]
fn a_range_given_only_in_pod_cidrs_or_with_host_bits_is_used_as_its_network() {
    let mut n = node("b", None, &[("InternalIP", "172.31.0.2")]);
    n.spec.as_mut().expect("spec").pod_cidrs =
        Some(vec!["fd00:1::/64".into(), "10.244.7.9/24".into()]);
    assert_eq!(
        desired_routes([&n], "a", cluster()),
        vec![route("10.244.7.0/24", "172.31.0.2")]
    );
}

#[test]
fn of_two_nodes_claiming_one_range_the_first_by_name_wins() {
    let nodes = [
        node("z", Some("10.244.1.0/24"), &[("InternalIP", "172.31.0.9")]),
        node("m", Some("10.244.1.0/24"), &[("InternalIP", "172.31.0.2")]),
    ];
    assert_eq!(
        desired_routes(&nodes, "a", cluster()),
        vec![route("10.244.1.0/24", "172.31.0.2")]
    );
}

#[test]
fn the_plan_adds_missing_replaces_moved_and_deletes_gone_routes_inside_the_cluster_only() {
    let current = [
        route("10.244.1.0/24", "172.31.0.2"),
        route("10.244.2.0/24", "172.31.0.3"),
        route("10.244.9.0/24", "172.31.0.9"),
        route("192.168.5.0/24", "172.31.0.9"),
    ];
    let desired = [
        route("10.244.1.0/24", "172.31.0.2"),
        route("10.244.2.0/24", "172.31.0.33"),
        route("10.244.3.0/24", "172.31.0.4"),
    ];
    assert_eq!(
        plan(&current, &desired, cluster()),
        RoutePlan {
            replace: vec![
                route("10.244.2.0/24", "172.31.0.33"),
                route("10.244.3.0/24", "172.31.0.4")
            ],
            delete: vec![route("10.244.9.0/24", "172.31.0.9")],
        }
    );
    assert!(plan(&desired, &desired, cluster()).is_empty());
}

/// A table in memory that records every change and can refuse one destination.
#[derive(Default)]
struct FakeTable {
    routes: Mutex<Vec<PodRoute>>,
    calls: Mutex<Vec<String>>,
    refuse: Option<Ipv4Net>,
}

impl RouteTable for FakeTable {
    async fn list(&self) -> Result<Vec<PodRoute>, RouteError> {
        Ok(self.routes.lock().expect("lock").clone())
    }

    async fn replace(&self, route: PodRoute) -> Result<(), RouteError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("replace {route}"));
        if self.refuse == Some(route.dst) {
            return Err(RouteError::Connect(std::io::Error::other("refused")));
        }
        let mut routes = self.routes.lock().expect("lock");
        routes.retain(|r| r.dst != route.dst);
        routes.push(route);
        Ok(())
    }

    async fn delete(&self, route: PodRoute) -> Result<(), RouteError> {
        self.calls
            .lock()
            .expect("lock")
            .push(format!("delete {route}"));
        self.routes.lock().expect("lock").retain(|r| *r != route);
        Ok(())
    }
}

#[tokio::test]
async fn sync_converges_and_a_second_sync_changes_nothing() {
    let table = FakeTable {
        routes: Mutex::new(vec![route("10.244.5.0/24", "172.31.0.5")]),
        ..Default::default()
    };
    let nodes = [
        node("a", Some("10.244.0.0/24"), &[("InternalIP", "172.31.0.1")]),
        node("b", Some("10.244.1.0/24"), &[("InternalIP", "172.31.0.2")]),
    ];
    sync(&table, &nodes, "a", cluster()).await.expect("sync");
    assert_eq!(
        *table.routes.lock().expect("lock"),
        vec![route("10.244.1.0/24", "172.31.0.2")]
    );
    assert_eq!(
        *table.calls.lock().expect("lock"),
        vec![
            "delete 10.244.5.0/24 via 172.31.0.5",
            "replace 10.244.1.0/24 via 172.31.0.2"
        ]
    );
    let again = sync(&table, &nodes, "a", cluster()).await.expect("sync");
    assert!(again.is_empty());
}

#[tokio::test]
async fn one_refused_route_does_not_stop_the_others_and_the_error_is_returned() {
    let table = FakeTable {
        refuse: Some("10.244.1.0/24".parse().expect("cidr")),
        ..Default::default()
    };
    let nodes = [
        node("b", Some("10.244.1.0/24"), &[("InternalIP", "172.31.0.2")]),
        node("c", Some("10.244.2.0/24"), &[("InternalIP", "172.31.0.3")]),
    ];
    let err = sync(&table, &nodes, "a", cluster())
        .await
        .expect_err("one route was refused");
    assert!(err.to_string().contains("refused"), "{err}");
    assert_eq!(
        *table.routes.lock().expect("lock"),
        vec![route("10.244.2.0/24", "172.31.0.3")]
    );
}
