//! The controllers: level-triggered, idempotent reconcile loops that are clients of the API.
//! Each compares desired with actual state from watch-fed caches and acts through
//! [`client::ClusterClient`]; after a restart they list again and converge from there.

pub mod cache;
pub mod client;
pub mod deployment;
pub mod endpoints;
pub mod events;
pub mod fake;
pub mod gc;
pub mod http;
pub mod leader;
pub mod local;
pub mod manager;
pub mod namespace;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod pods;
pub mod queue;
pub mod replicaset;
pub mod selector;

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use queue::WorkQueue;
use tracing::Instrument;

/// Delay before retrying a key whose reconcile failed.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(1);

/// Runs `workers` loops taking keys from `queue` and reconciling them; a failed key is
/// retried after a delay, a key that asks for it is reconciled again after its delay.
pub async fn run_workers<F, Fut, E>(queue: WorkQueue, workers: usize, reconcile: F)
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Option<Duration>, E>> + Send,
    E: Display + Send,
{
    let mut tasks = Vec::new();
    for _ in 0..workers.max(1) {
        let queue = queue.clone();
        let reconcile = reconcile.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let key = queue.next().await;
                let span = tracing::debug_span!("reconcile", key = %key);
                match reconcile(key.clone()).instrument(span).await {
                    Ok(Some(after)) => queue.add_after(key.clone(), after),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(key = %key, error = %e, "reconcile failed; retrying");
                        queue.add_after(key.clone(), RETRY_AFTER_ERROR);
                    }
                }
                queue.done(&key);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Settings of the controller manager; the binary maps its flags onto these.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// `--cluster-cidr`; node IPAM runs only when set.
    pub cluster_cidr: Option<String>,
    /// Prefix length of each node's range (`--node-cidr-mask-size`).
    pub node_cidr_mask_size: u8,
    pub lifecycle: nodelifecycle::LifecycleConfig,
    pub gc_interval: Duration,
    pub workers: usize,
    pub enabled: manager::EnabledControllers,
    /// The cluster CA (PEM) the namespace controller publishes as `kube-root-ca.crt`.
    pub root_ca_pem: Option<String>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            cluster_cidr: None,
            node_cidr_mask_size: 24,
            lifecycle: nodelifecycle::LifecycleConfig::default(),
            gc_interval: Duration::from_secs(5),
            workers: 2,
            enabled: manager::EnabledControllers::all(),
            root_ca_pem: None,
        }
    }
}

impl ManagerConfig {
    /// Checks what would otherwise fail only once the controllers start.
    pub fn validate(&self) -> Result<(), ManagerError> {
        self.node_ipam().map(|_| ())
    }

    fn node_ipam(&self) -> Result<Option<nodeipam::CidrAllocator>, ManagerError> {
        match &self.cluster_cidr {
            Some(cidr) if self.enabled.is_enabled("nodeipam") => Ok(Some(
                nodeipam::CidrAllocator::new(cidr, self.node_cidr_mask_size)?,
            )),
            _ => Ok(None),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("node IPAM: {0}")]
    Ipam(#[from] nodeipam::IpamError),
    #[error("{identity} lost leadership")]
    LostLeadership { identity: String },
}

/// Starts every controller on `client` and runs until one of them ends (they run forever, so
/// in practice until the task is dropped). Bad configuration fails before anything starts.
pub async fn run_all(
    client: std::sync::Arc<dyn client::ClusterClient>,
    config: ManagerConfig,
) -> Result<(), ManagerError> {
    use std::sync::Arc;
    let ipam = config.node_ipam()?;
    let on = |name| config.enabled.is_enabled(name);
    let w = config.workers;
    let mut tasks = tokio::task::JoinSet::new();
    if on("replicaset") {
        tasks.spawn(replicaset::ReplicaSetController::new(Arc::clone(&client)).run(w));
    }
    if on("deployment") {
        tasks.spawn(deployment::DeploymentController::new(Arc::clone(&client)).run(w));
    }
    if on("endpoint") {
        tasks.spawn(endpoints::EndpointsController::new(Arc::clone(&client)).run(w));
    }
    if on("namespace") {
        let mut c = namespace::NamespaceController::new(Arc::clone(&client));
        if let Some(pem) = config.root_ca_pem.clone() {
            c = c.with_root_ca(pem);
        }
        tasks.spawn(c.run(w));
    }
    if on("nodelifecycle") {
        tasks.spawn(
            Arc::new(nodelifecycle::NodeLifecycleController::new(
                Arc::clone(&client),
                config.lifecycle,
            ))
            .run(),
        );
    }
    if on("garbagecollector") {
        tasks.spawn(
            gc::GarbageCollector::new(Arc::clone(&client), gc::default_types())
                .run(config.gc_interval),
        );
    }
    if let Some(alloc) = ipam {
        tasks.spawn(
            Arc::new(nodeipam::NodeIpamController::new(
                Arc::clone(&client),
                alloc,
            ))
            .run(),
        );
    }
    if tasks.is_empty() {
        std::future::pending::<()>().await;
    }
    tasks.join_next().await;
    Ok(())
}
