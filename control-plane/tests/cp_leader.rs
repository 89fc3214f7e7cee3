//! Leader election between two real `ferrolet-control-plane` processes sharing one real etcd:
//! only one leads (schedules and reconciles); when it is killed with SIGKILL, the other takes
//! over within the lease duration and schedules what is pending.

mod cp_support;

use std::sync::Arc;
use std::time::Duration;

use cp_support::{
    ControlPlane, leases, namespace, node, node_of, nodes, pods, test_dir, unique, wait_for,
};
use ferrolet_control_plane::controllers::client::ClusterClient;
use ferrolet_control_plane::storage::testing::EtcdServer;
use serde_json::{Value, json};

const LEASE: Duration = Duration::from_secs(4);

fn pod(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
           "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
}

fn leads(cp: &ControlPlane) -> bool {
    cp.log().contains("became leader")
}

async fn holder(client: &dyn ClusterClient) -> Result<String, String> {
    let l = client
        .get(leases(), Some("kube-system"), "ferrolet-control-plane")
        .await
        .map_err(|e| e.to_string())?;
    l.pointer("/spec/holderIdentity")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("{l}"))
}

async fn wait_bound(client: &dyn ClusterClient, ns: &str, name: &str, within: Duration) -> String {
    wait_for(&format!("pod {name} bound"), within, || async {
        let p = client
            .get(pods(), Some(ns), name)
            .await
            .map_err(|e| e.to_string())?;
        node_of(&p)
            .map(str::to_owned)
            .ok_or_else(|| "not yet".to_owned())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_control_planes_leads_and_the_other_takes_over_when_it_dies() {
    let etcd = EtcdServer::start().await.expect("start etcd");
    let endpoint = etcd.endpoint();
    let flags = [
        "--etcd-servers",
        endpoint.as_str(),
        "--leader-elect-lease-duration=4s",
        "--leader-elect-retry-period=500ms",
    ];
    let (d1, d2) = (test_dir(), test_dir());
    let mut first = ControlPlane::start_in(d1.path(), &flags).await;
    let mut second = ControlPlane::start_in(d2.path(), &flags).await;
    wait_for("a leader", Duration::from_secs(30), || async {
        (leads(&first) || leads(&second))
            .then_some(())
            .ok_or_else(|| "no leader yet".to_owned())
    })
    .await;
    let (leader, standby) = if leads(&first) {
        (&mut first, &mut second)
    } else {
        (&mut second, &mut first)
    };
    let held_by = holder(standby.client.as_ref()).await.expect("lease");
    assert!(
        leader.log().contains(&held_by),
        "the Lease names the leader: {held_by}"
    );

    // Both serve the API; only the leader schedules.
    let client: Arc<dyn ClusterClient> = standby.client.clone();
    let n = unique("ha");
    client
        .create(nodes(), None, node(&n, "4", json!({}), json!([])))
        .await
        .expect("node");
    let ns = unique("ha");
    namespace(client.as_ref(), &ns).await;
    client
        .create(pods(), Some(&ns), pod(&ns, "before"))
        .await
        .expect("pod");
    assert_eq!(
        wait_bound(client.as_ref(), &ns, "before", Duration::from_secs(30)).await,
        n
    );
    assert!(
        !leads(standby),
        "the standby never led while the leader lived"
    );
    assert_eq!(holder(client.as_ref()).await.expect("lease"), held_by);

    leader.kill();
    client
        .create(pods(), Some(&ns), pod(&ns, "after"))
        .await
        .expect("pod");
    // The lease runs out LEASE after its last renewal (compared in whole seconds); the standby
    // retries every 500ms; the rest is slack for a loaded machine and etcd's latency.
    let takeover = LEASE + Duration::from_secs(6);
    let new_holder = wait_for("the standby to take the Lease", takeover, || async {
        match holder(client.as_ref()).await {
            Ok(h) if h != held_by => Ok(h),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        standby.log().contains(&new_holder),
        "the standby holds the Lease now"
    );
    assert!(leads(standby));
    assert_eq!(
        wait_bound(client.as_ref(), &ns, "after", Duration::from_secs(30)).await,
        n
    );
    drop(etcd);
}
