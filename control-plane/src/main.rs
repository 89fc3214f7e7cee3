use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use ferrolet_control_plane::server::{self, Config};
use ferrolet_control_plane::storage::Store;
use ferrolet_control_plane::storage::etcd::EtcdStore;
use ferrolet_control_plane::storage::sqlite::SqliteStore;
use ipnet::IpNet;

/// ferrolet-control-plane: a Kubernetes-compatible API server.
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
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
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
    };
    server::run(config, store).await?;
    Ok(())
}
