use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Parser};
use ferrolet_control_plane::controllers::ManagerConfig;
use ferrolet_control_plane::controllers::client::ClusterClient;
use ferrolet_control_plane::controllers::leader::{self, LeaderConfig};
use ferrolet_control_plane::controllers::local::LocalClient;
use ferrolet_control_plane::controllers::manager::{
    self, EnabledControllers, LoopsConfig, parse_duration,
};
use ferrolet_control_plane::controllers::nodelifecycle::LifecycleConfig;
use ferrolet_control_plane::server::{self, Config};
use ferrolet_control_plane::storage::Store;
use ferrolet_control_plane::storage::compactor;
use ferrolet_control_plane::storage::etcd::EtcdStore;
use ferrolet_control_plane::storage::sqlite::SqliteStore;
use ipnet::IpNet;

/// ferrolet-control-plane: a Kubernetes-compatible API server, with the scheduler, the
/// controllers and the store compactor in the same process.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// State: certificates, admin.kubeconfig, and the SQLite store.
    #[arg(long, default_value = "/var/lib/ferrolet-control-plane")]
    data_dir: PathBuf,
    /// Address and port to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:6443")]
    listen: SocketAddr,
    /// Comma-separated etcd v3 endpoints; when given, etcd is the store instead of SQLite.
    #[arg(long, value_delimiter = ',')]
    etcd_servers: Vec<String>,
    /// Range Service ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/12")]
    service_cluster_ip_range: IpNet,
    /// Range of pod IPs in the cluster.
    #[arg(long)]
    cluster_cidr: Option<IpNet>,
    /// Static bearer tokens (token,user,uid[,groups]); default: <data-dir>/tokens.csv, made once.
    #[arg(long)]
    token_auth_file: Option<PathBuf>,
    /// Key service account tokens are signed with (64 hex digits); default:
    /// <data-dir>/service-account.key, made once. API servers sharing a store share it.
    #[arg(long)]
    service_account_key_file: Option<PathBuf>,
    /// Controllers to run: `*` for all, `name` to add one, `-name` to leave one out, `none`.
    /// Known: deployment, endpoint, garbagecollector, namespace, nodeipam, nodelifecycle,
    /// replicaset.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "*",
        allow_hyphen_values = true
    )]
    controllers: Vec<String>,
    /// Run the scheduler.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    scheduler: bool,
    /// Pods naming this schedulerName are the scheduler's.
    #[arg(long, default_value = "default-scheduler")]
    scheduler_name: String,
    /// Elect one leader through a Lease before scheduling or reconciling, so several control
    /// planes can share one etcd.
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, default_value = "ferrolet-control-plane")]
    leader_elect_resource_name: String,
    #[arg(long, default_value = "kube-system")]
    leader_elect_resource_namespace: String,
    /// How long a leader's Lease holds without renewal before a standby takes over.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    leader_elect_lease_duration: Duration,
    /// How often the leader renews and a standby tries to acquire.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    leader_elect_retry_period: Duration,
    /// A node whose Lease is not renewed for this long becomes Ready=Unknown and unreachable.
    #[arg(long, default_value = "40s", value_parser = parse_duration)]
    node_monitor_grace_period: Duration,
    /// How often node health is checked.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    node_monitor_period: Duration,
    /// How long pods without their own toleration stay on an unreachable node.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pod_eviction_timeout: Duration,
    /// Prefix length of each node's pod range out of --cluster-cidr.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// How often the garbage collector sweeps ownerReferences.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    garbage_collector_period: Duration,
    /// Workers per controller.
    #[arg(long, default_value_t = 2)]
    concurrent_syncs: usize,
    /// Store history older than this is compacted (watchers further behind get 410 Gone);
    /// 0 turns compaction off.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    etcd_compaction_interval: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // Flags are checked before anything is made on disk.
    let enabled = EnabledControllers::parse(&args.controllers)?;
    let mut loops = LoopsConfig {
        scheduler: args.scheduler.then(|| args.scheduler_name.clone()),
        manager: ManagerConfig {
            cluster_cidr: args.cluster_cidr.map(|c| c.to_string()),
            node_cidr_mask_size: args.node_cidr_mask_size,
            lifecycle: LifecycleConfig {
                grace_period: args.node_monitor_grace_period,
                default_toleration: args.pod_eviction_timeout,
                check_every: args.node_monitor_period,
            },
            gc_interval: args.garbage_collector_period,
            workers: args.concurrent_syncs,
            enabled,
            // Known once the certificates exist.
            root_ca_pem: None,
        },
        leader: args.leader_elect.then(|| LeaderConfig {
            namespace: args.leader_elect_resource_namespace.clone(),
            name: args.leader_elect_resource_name.clone(),
            // Set once the data dir exists.
            identity: String::new(),
            lease_duration: args.leader_elect_lease_duration,
            renew_every: args.leader_elect_retry_period,
        }),
    };
    loops.manager.validate()?;
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    if let Some(leader) = loops.leader.as_mut() {
        leader.identity = leader::persistent_identity(&args.data_dir)
            .with_context(|| format!("leader identity under {}", args.data_dir.display()))?;
    }
    let store: Arc<dyn Store> = if args.etcd_servers.is_empty() {
        let path = args.data_dir.join("state.db");
        Arc::new(SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?)
    } else {
        Arc::new(
            EtcdStore::connect(&args.etcd_servers, "/ferrolet")
                .await
                .context("connecting to etcd")?,
        )
    };
    let config = Config {
        data_dir: args.data_dir,
        listen: args.listen,
        service_cluster_ip_range: args.service_cluster_ip_range,
        cluster_cidr: args.cluster_cidr,
        token_auth_file: args.token_auth_file,
        service_account_key_file: args.service_account_key_file,
    };
    let prepared = server::prepare(config, Arc::clone(&store)).await?;
    loops.manager.root_ca_pem = Some(prepared.root_ca_pem().to_owned());
    let client: Arc<dyn ClusterClient> = Arc::new(LocalClient::new(prepared.api()));
    let compaction = async {
        if args.etcd_compaction_interval.is_zero() {
            std::future::pending::<()>().await;
        } else {
            compactor::run(store, args.etcd_compaction_interval).await;
        }
    };
    tokio::select! {
        r = prepared.serve() => r?,
        r = manager::run_loops(client, loops) => r?,
        () = compaction => {}
    }
    Ok(())
}
