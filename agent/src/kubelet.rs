//! The kubelet half of the agent put together: connects to the API and the CRI runtime,
//! then runs node registration/status/lease and the pod manager until shutdown.

use std::net::{IpAddr, ToSocketAddrs as _, UdpSocket};
use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

use crate::api::{ApiError, Client, Kubeconfig, KubeconfigError};
use crate::cni::Cni;
use crate::config::AgentConfig;
use crate::cri::{CriError, CriRuntime, Runtime};
use crate::node::image_gc::{HostFs, ImageGc, ImageGcPolicy};
use crate::node::routes::{NetlinkRouteTable, PodRoutes};
use crate::node::{NodeAgent, NodeSettings};
use crate::pods::worker::Deps;
use crate::pods::{PodContext, PodManager};
use crate::proxy::{ApiSource, ProxyConfig};
use crate::server::{KubeletApi, ServerError, ServerSettings};

/// What stops the kubelet from starting.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Runtime(#[from] CriError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Routes(#[from] crate::node::routes::RouteError),
    #[error(transparent)]
    ProxyConfig(#[from] crate::proxy::ConfigError),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::StartError),
    #[error("creating {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The address this host uses to reach `server` (`https://host:port`): connecting a UDP
/// socket picks the route without sending anything.
pub fn host_ip_towards(server: &str) -> Option<IpAddr> {
    let rest = server.split("://").nth(1)?;
    let authority = rest.split('/').next()?;
    let with_port = if authority.starts_with('[') {
        if authority.contains("]:") {
            authority.to_owned()
        } else {
            format!("{authority}:443")
        }
    } else if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:443")
    };
    let target = with_port.to_socket_addrs().ok()?.next()?;
    let bind: IpAddr = if target.is_ipv4() {
        IpAddr::from([0, 0, 0, 0])
    } else {
        IpAddr::from([0u16; 8])
    };
    let socket = UdpSocket::bind((bind, 0)).ok()?;
    socket.connect(target).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

/// Runs the kubelet until `shutdown` becomes true. Containers keep running after it returns.
pub async fn run(config: AgentConfig, shutdown: watch::Receiver<bool>) -> Result<(), KubeletError> {
    let kubeconfig = Kubeconfig::load(&config.kubeconfig)?;
    let api = Arc::new(Client::new(&kubeconfig)?);
    let runtime = Arc::new(CriRuntime::connect(&config.runtime_socket()).await?);
    let version = runtime.version().await?;
    info!(runtime = %version.runtime_name, version = %version.runtime_version, "connected to the CRI runtime");
    let cache_dir = config.root_dir.join("cni/results");
    std::fs::create_dir_all(&cache_dir).map_err(|source| KubeletError::Io {
        path: cache_dir.clone(),
        source,
    })?;
    let network = Arc::new(Cni {
        bin_dir: config.cni_bin_dir.clone(),
        conf_dir: config.cni_conf_dir.clone(),
        cache_dir,
    });
    let host_ips: Vec<String> = host_ip_towards(&kubeconfig.server)
        .map(|ip| vec![ip.to_string()])
        .unwrap_or_default();
    let ctx = PodContext {
        node_name: config.node_name.clone(),
        root_dir: config.root_dir.clone(),
        cgroup_root: config.cgroup_root.clone(),
        cluster_dns: config.cluster_dns.clone(),
        cluster_domain: config.cluster_domain.clone(),
        resolv_conf: config.resolv_conf.clone(),
        host_ips: host_ips.clone(),
        runtime_name: version.runtime_name.clone(),
        allocatable: crate::node::allocatable(
            &NodeSettings::from_config(&config, host_ips.clone()),
            &crate::node::SystemInfo::read(&config.root_dir),
        ),
    };
    // Bound before anything runs, so a taken port or bad certificate fails the start.
    let server = crate::server::bind(&ServerSettings {
        address: config.address,
        port: config.port,
        root_dir: config.root_dir.clone(),
        node_name: config.node_name.clone(),
        host_ips: host_ips.clone(),
        tls_cert_file: config.tls_cert_file.clone(),
        tls_private_key_file: config.tls_private_key_file.clone(),
        client_ca_pem: kubeconfig.ca_pem.clone(),
    })
    .await?;
    let kubelet_api = Arc::new(KubeletApi {
        api: api.clone(),
        runtime: runtime.clone(),
        ctx: ctx.clone(),
    });
    // Routes to the other nodes' pod ranges, only when the cluster CIDR says which routes
    // are the agent's to manage.
    let routes = match &config.cluster_cidr {
        Some(cidr) => Some(PodRoutes {
            api: api.clone(),
            table: NetlinkRouteTable::connect()?,
            node_name: config.node_name.clone(),
            cluster_cidr: crate::config::parse_cluster_cidr(cidr)?,
        }),
        None => {
            info!("no clusterCIDR configured: not routing other nodes' pod ranges");
            None
        }
    };
    let _routes_task = routes.map(|r| tokio::spawn(r.run(shutdown.clone())));
    let node = Arc::new(NodeAgent {
        api: api.clone(),
        runtime: runtime.clone(),
        network: network.clone(),
        settings: NodeSettings::from_config(&config, host_ips),
    });
    // The service proxy, configured before anything starts so a bad range fails the start.
    let proxy_config = if config.service_proxy {
        Some(ProxyConfig::for_node(
            &config.node_name,
            config.cluster_cidr.as_deref(),
            config.service_cluster_ip_range.as_deref(),
        )?)
    } else {
        None
    };
    let _proxy_task = match proxy_config {
        Some(proxy_config) => Some(crate::proxy::start(
            ApiSource::new(api.clone(), &config.node_name),
            crate::api::events::ApiEventSink::spawn(api.clone(), "kube-proxy", &config.node_name),
            proxy_config,
            shutdown.clone(),
        )?),
        None => None,
    };
    let events = crate::api::events::ApiEventSink::spawn(api.clone(), "kubelet", &config.node_name);
    let image_gc = ImageGc::new(
        runtime.clone(),
        Arc::new(HostFs),
        events.clone(),
        &config.node_name,
        ImageGcPolicy {
            high_percent: config.image_gc_high_threshold_percent,
            low_percent: config.image_gc_low_threshold_percent,
            min_age: config.image_minimum_gc_age,
        },
    )
    .with_state_file(config.root_dir.join(crate::node::image_gc::STATE_FILE));
    let _image_gc_task = tokio::spawn(image_gc.run(shutdown.clone()));
    let deps = Arc::new(Deps {
        events,
        mounter: Arc::new(crate::volumes::HostMounter),
        api,
        runtime,
        network,
        ctx,
        cgroupfs: "/sys/fs/cgroup".into(),
    });
    let pods = Arc::new(PodManager::new(deps));
    // Container exits wake their pod's worker when the runtime streams events.
    let _events_task =
        match crate::pods::runtime_events::CriEvents::connect(&config.runtime_socket()).await {
            Ok(events) => Some(tokio::spawn(
                pods.clone()
                    .watch_runtime(Arc::new(events), shutdown.clone()),
            )),
            Err(e) => {
                tracing::warn!(error = %e, "no runtime event stream; pod workers poll");
                None
            }
        };
    // Static pods: manifests re-read every 20s (upstream's file check period).
    let _static_task = config.static_pod_path.clone().map(|dir| {
        let period = std::time::Duration::from_secs(20);
        tokio::spawn(pods.clone().run_static(dir, period, shutdown.clone()))
    });
    let _trim_task = tokio::spawn(trim_heap(shutdown.clone()));
    let server_task = tokio::spawn(crate::server::serve(server, kubelet_api, shutdown.clone()));
    let node_task = tokio::spawn(node.run(shutdown.clone()));
    let pods_task = tokio::spawn(pods.run(shutdown));
    let _ = node_task.await;
    let _ = pods_task.await;
    let _ = server_task.await;
    Ok(())
}

/// Hands the heap's free pages back to the kernel every 10 s. A burst of pod starts frees
/// most of what it allocated (JSON, TLS and gRPC buffers), but glibc keeps the freed pages
/// in its arenas, where they count as the agent's memory long after the burst;
/// `malloc_trim` returns them from every arena. It takes well under a millisecond.
async fn trim_heap(mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() {
                return;
            },
        }
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim takes a plain integer and only works on glibc's own heap,
        // under its own locks.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
