//! Routes to the other nodes' pods. Every other Node whose `spec.podCIDR` lies inside the
//! cluster CIDR and that reports an IPv4 `InternalIP` gets `podCIDR via InternalIP` in this
//! host's main routing table, so pods reach pods on other nodes without an overlay (the
//! nodes share one L2 segment, as with flannel's host-gw).
//!
//! The routes the agent adds carry its own route protocol number ([`ROUTE_PROTOCOL`]); only
//! those, and only inside the cluster CIDR, are ever replaced or deleted, so the bridge's
//! own connected route and whatever an admin or another program set up stay untouched.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteType,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{Api, ApiError, ListParams, WatchEvent};

/// The route protocol (`ip route ... proto 70`) marking routes this agent owns.
pub const ROUTE_PROTOCOL: u8 = 70;
/// How often the routes are checked against the table even without a Node change, to put
/// back a route someone deleted.
const RESYNC: Duration = Duration::from_secs(30);
const RT_TABLE_MAIN: u8 = 254;

/// A failed route table operation.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("opening a netlink socket: {0}")]
    Connect(std::io::Error),
    #[error("{op}: {source}")]
    Netlink {
        op: String,
        source: rtnetlink::Error,
    },
}

/// One route to another node's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRoute {
    pub dst: Ipv4Net,
    pub via: Ipv4Addr,
}

impl std::fmt::Display for PodRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} via {}", self.dst, self.via)
    }
}

/// The node's IPv4 pod range: `spec.podCIDR`, else the first IPv4 of `spec.podCIDRs`.
fn pod_cidr(node: &Node) -> Option<Ipv4Net> {
    let spec = node.spec.as_ref()?;
    spec.pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .find_map(|c| c.parse::<Ipv4Net>().ok())
        .map(|n| n.trunc())
}

/// The node's first IPv4 `InternalIP`.
fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The routes this host should have: one per other node with a pod range inside `cluster`
/// and an InternalIP. When two nodes claim the same range (which nodeipam never does), the
/// one whose name sorts first wins, so every agent picks the same.
pub fn desired_routes<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    own_node: &str,
    cluster: Ipv4Net,
) -> Vec<PodRoute> {
    let mut by_name: Vec<&Node> = nodes
        .into_iter()
        .filter(|n| n.metadata.name.as_deref() != Some(own_node))
        .collect();
    by_name.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    let mut routes: BTreeMap<Ipv4Net, Ipv4Addr> = BTreeMap::new();
    for node in by_name {
        let (Some(dst), Some(via)) = (pod_cidr(node), internal_ip(node)) else {
            continue;
        };
        if cluster.contains(&dst) {
            routes.entry(dst).or_insert(via);
        }
    }
    routes
        .into_iter()
        .map(|(dst, via)| PodRoute { dst, via })
        .collect()
}

/// What to change in the table to get from `current` (our routes there now) to `desired`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Routes to add, or to replace a route of ours with the same destination.
    pub replace: Vec<PodRoute>,
    pub delete: Vec<PodRoute>,
}

impl RoutePlan {
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.delete.is_empty()
    }
}

/// The changes; routes of `current` outside `cluster` are left alone.
pub fn plan(current: &[PodRoute], desired: &[PodRoute], cluster: Ipv4Net) -> RoutePlan {
    let replace = desired
        .iter()
        .filter(|r| !current.contains(r))
        .copied()
        .collect();
    let delete = current
        .iter()
        .filter(|r| cluster.contains(&r.dst))
        .filter(|r| !desired.iter().any(|d| d.dst == r.dst))
        .copied()
        .collect();
    RoutePlan { replace, delete }
}

/// The host's routing table, as far as the agent's own routes go.
pub trait RouteTable: Send + Sync + 'static {
    /// The IPv4 main-table routes carrying [`ROUTE_PROTOCOL`].
    fn list(&self) -> impl Future<Output = Result<Vec<PodRoute>, RouteError>> + Send;
    /// Adds the route, or replaces the one with the same destination.
    fn replace(&self, route: PodRoute) -> impl Future<Output = Result<(), RouteError>> + Send;
    fn delete(&self, route: PodRoute) -> impl Future<Output = Result<(), RouteError>> + Send;
}

/// The real table, over rtnetlink, in the network namespace of the thread that connected.
#[derive(Debug, Clone)]
pub struct NetlinkRouteTable {
    handle: rtnetlink::Handle,
}

impl NetlinkRouteTable {
    /// Opens a netlink socket in the calling thread's network namespace; its connection runs
    /// as a task on the current tokio runtime.
    pub fn connect() -> Result<NetlinkRouteTable, RouteError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(RouteError::Connect)?;
        tokio::spawn(connection);
        Ok(NetlinkRouteTable { handle })
    }

    fn message(route: PodRoute) -> RouteMessage {
        rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(route.dst.network(), route.dst.prefix_len())
            .gateway(route.via)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .kind(RouteType::Unicast)
            .build()
    }
}

fn netlink(op: String) -> impl FnOnce(rtnetlink::Error) -> RouteError {
    move |source| RouteError::Netlink { op, source }
}

/// Our route from a kernel route message, if it is one.
fn pod_route_of(m: &RouteMessage) -> Option<PodRoute> {
    if m.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
        return None;
    }
    let mut table = u32::from(m.header.table);
    let mut dst = None;
    let mut via = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = Some(*g),
            RouteAttribute::Table(t) => table = *t,
            _ => {}
        }
    }
    if table != u32::from(RT_TABLE_MAIN) {
        return None;
    }
    Some(PodRoute {
        dst: Ipv4Net::new(dst?, m.header.destination_prefix_length).ok()?,
        via: via?,
    })
}

impl RouteTable for NetlinkRouteTable {
    async fn list(&self) -> Result<Vec<PodRoute>, RouteError> {
        let query = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut stream = self.handle.route().get(query).execute();
        let mut out = Vec::new();
        while let Some(m) = stream
            .try_next()
            .await
            .map_err(netlink("listing routes".into()))?
        {
            out.extend(pod_route_of(&m));
        }
        Ok(out)
    }

    async fn replace(&self, route: PodRoute) -> Result<(), RouteError> {
        self.handle
            .route()
            .add(Self::message(route))
            .replace()
            .execute()
            .await
            .map_err(netlink(format!("adding route {route}")))
    }

    async fn delete(&self, route: PodRoute) -> Result<(), RouteError> {
        self.handle
            .route()
            .del(Self::message(route))
            .execute()
            .await
            .map_err(netlink(format!("deleting route {route}")))
    }
}

/// Brings the table in line with `nodes`; returns what it changed. Every change is tried
/// even after one fails; the first error is returned after all were tried.
pub async fn sync<T: RouteTable>(
    table: &T,
    nodes: &[Node],
    own_node: &str,
    cluster: Ipv4Net,
) -> Result<RoutePlan, RouteError> {
    let desired = desired_routes(nodes, own_node, cluster);
    let current = table.list().await?;
    let plan = plan(&current, &desired, cluster);
    let mut first_error = None;
    for route in &plan.delete {
        match table.delete(*route).await {
            Ok(()) => info!(route = %route, "removed the route to a node's pods"),
            Err(e) => {
                warn!(route = %route, error = %e, "removing a pod route failed");
                first_error.get_or_insert(e);
            }
        }
    }
    for route in &plan.replace {
        match table.replace(*route).await {
            Ok(()) => info!(route = %route, "routed a node's pods"),
            Err(e) => {
                warn!(route = %route, error = %e, "adding a pod route failed");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(plan),
    }
}

/// Keeps the routes to the other nodes' pods while the agent runs: lists and watches Nodes,
/// syncing after every change and every [`RESYNC`].
pub struct PodRoutes<A, T> {
    pub api: Arc<A>,
    pub table: T,
    pub node_name: String,
    pub cluster_cidr: Ipv4Net,
}

impl<A: Api, T: RouteTable> PodRoutes<A, T> {
    async fn sync_now(&self, nodes: &BTreeMap<String, Node>) {
        let nodes: Vec<Node> = nodes.values().cloned().collect();
        if let Err(e) = sync(&self.table, &nodes, &self.node_name, self.cluster_cidr).await {
            warn!(error = %e, "pod route sync failed; retrying at the next change or resync");
        }
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let params = ListParams::default();
        loop {
            let list = match self.api.list::<Node>(None, &params).await {
                Ok(l) => l,
                Err(e) => {
                    warn!(error = %e, "listing nodes for pod routes failed; retrying");
                    if sleep_or_shutdown(&mut shutdown, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            let mut nodes: BTreeMap<String, Node> = list
                .items
                .into_iter()
                .filter_map(|n| Some((n.metadata.name.clone()?, n)))
                .collect();
            self.sync_now(&nodes).await;
            let mut stream = match self
                .api
                .watch::<Node>(None, &params, &list.resource_version)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "watching nodes for pod routes failed; relisting");
                    if sleep_or_shutdown(&mut shutdown, Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            };
            let mut resync = tokio::time::interval(RESYNC);
            resync.reset();
            loop {
                let event = tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = resync.tick() => {
                        self.sync_now(&nodes).await;
                        continue;
                    }
                    e = stream.next() => e,
                };
                match event {
                    Some(Ok(WatchEvent::Added(n) | WatchEvent::Modified(n))) => {
                        if let Some(name) = n.metadata.name.clone() {
                            nodes.insert(name, n);
                        }
                    }
                    Some(Ok(WatchEvent::Deleted(n))) => {
                        if let Some(name) = &n.metadata.name {
                            nodes.remove(name);
                        }
                    }
                    Some(Ok(WatchEvent::Bookmark(_))) => continue,
                    Some(Err(ApiError::Gone { .. })) => {
                        info!("node watch expired (410); relisting");
                        break;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "node watch failed; relisting");
                        break;
                    }
                    None => break,
                }
                self.sync_now(&nodes).await;
            }
            if sleep_or_shutdown(&mut shutdown, Duration::from_millis(200)).await {
                return;
            }
        }
    }
}

/// Sleeps for `d`; true if shutdown was requested meanwhile.
async fn sleep_or_shutdown(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.changed() => true,
        () = tokio::time::sleep(d) => *shutdown.borrow(),
    }
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
