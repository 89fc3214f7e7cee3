//! Scheduler benchmark: the real `ferrolet-control-plane` binary (API server, scheduler and
//! controllers in one process, SQLite store) started as a child process on loopback, 1,000
//! fake Node objects registered over HTTPS (no agents), then 10,000 pods created over HTTPS by
//! concurrent clients while a watch counts the pods the scheduler binds.
//!
//! Reports pods/s from the first pod create to the last pod bound (the figure; target
//! 1,000 pods/s or more), the create rate alone, how long binding trails the last create, and
//! the server's CPU time beside wall time, since these machines are shared and noisy. Prints
//! text lines, then one JSON document.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferrolet_bench::procfs::process_cpu;
use ferrolet_bench::{Better, Figure};
use ferrolet_control_plane::controllers::client::{ClusterClient, ResourceType, WatchEvent};
use ferrolet_control_plane::controllers::http::HttpClient;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Schedule pods onto fake nodes through the real control plane")]
struct Args {
    /// The server binary; default: `ferrolet-control-plane` beside this program.
    #[arg(long)]
    server: Option<PathBuf>,
    /// Fake nodes to register.
    #[arg(long, default_value_t = 1_000)]
    nodes: usize,
    /// Pods to schedule.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Concurrent creating clients (requests in flight).
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Extra flags for the server (repeat), e.g. `--server-arg=--controllers=none`.
    #[arg(long)]
    server_arg: Vec<String>,
    /// Where to write the JSON report (the headline figures go beside it).
    #[arg(long, default_value = "bench/out/scheduler.json")]
    out: PathBuf,
}

struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    client: Arc<HttpClient>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn default_server_binary() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("this program has no directory")?;
    Ok(dir.join("ferrolet-control-plane"))
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start(binary: &Path, extra: &[String]) -> Result<Server> {
    let dir = tempfile::Builder::new()
        .prefix("ferrolet-bench-sched-")
        .tempdir()?;
    let data = dir.path().join("data");
    let log = std::fs::File::create(dir.path().join("server.log"))?;
    let child = Command::new(binary)
        .arg("--data-dir")
        .arg(&data)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()?))
        // Fake nodes renew no Lease; keep them Ready for the whole run.
        .arg("--node-monitor-grace-period=1h")
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let client = loop {
        if let Ok(c) = HttpClient::from_data_dir(&data)
            && c.list(ResourceType::of::<Namespace>(), None).await.is_ok()
        {
            break c;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            bail!("the control plane did not come up within 60 s; its log:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok(Server {
        child,
        _dir: dir,
        client: Arc::new(client),
    })
}

fn own_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is a valid target.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec * 1000) as u32);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn fake_node(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("node-{i:04}"),
                     "labels": {"kubernetes.io/hostname": format!("node-{i:04}"),
                                "topology.kubernetes.io/zone": format!("zone-{}", i % 3)}},
        "spec": {},
        "status": {
            "allocatable": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "capacity": {"cpu": "32", "memory": "128Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    })
}

fn bench_pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("pod-{i:05}"), "namespace": "bench",
                     "labels": {"app": format!("app-{}", i % 100)}},
        "spec": {"containers": [{"name": "c", "image": "busybox",
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]},
    })
}

/// Creates `count` objects made by `make` with `clients` requests in flight.
async fn create_all(
    client: &Arc<HttpClient>,
    rt: ResourceType,
    namespace: Option<&'static str>,
    count: usize,
    clients: usize,
    make: fn(usize) -> Value,
) -> Result<()> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let client = Arc::clone(client);
        tasks.push(tokio::spawn(async move {
            for i in (c..count).step_by(clients) {
                client
                    .create(rt, namespace, make(i))
                    .await
                    .with_context(|| format!("creating {rt} #{i}"))?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let binary = match &args.server {
        Some(b) => b.clone(),
        None => default_server_binary()?,
    };
    if !binary.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p ferrolet-control-plane` or pass --server",
            binary.display()
        );
    }
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let server = start(&binary, &args.server_arg).await?;
    let pid = server.child.id();
    let client = Arc::clone(&server.client);
    let pods_rt = ResourceType::of::<Pod>();

    let t_nodes = Instant::now();
    create_all(
        &client,
        ResourceType::of::<Node>(),
        None,
        args.nodes,
        args.clients,
        fake_node,
    )
    .await?;
    let nodes_wall = t_nodes.elapsed();
    client
        .create(
            ResourceType::of::<Namespace>(),
            None,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench"}}),
        )
        .await
        .context("creating namespace bench")?;

    // Count bindings from a watch that starts before the first pod exists.
    let list = client.list(pods_rt, Some("bench")).await?;
    let mut stream = client
        .watch(pods_rt, Some("bench"), &list.resource_version)
        .await?;
    let total = args.pods;
    let counter = tokio::spawn(async move {
        let mut bound: HashSet<String> = HashSet::with_capacity(total);
        while bound.len() < total {
            match stream.next().await {
                Some(Ok(WatchEvent::Added(p) | WatchEvent::Modified(p))) => {
                    if p.pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .is_some_and(|n| !n.is_empty())
                    {
                        bound.insert(p["metadata"]["name"].as_str().unwrap_or("").to_owned());
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow::anyhow!("pod watch failed: {e}")),
                None => bail!("pod watch ended with {} of {total} bound", bound.len()),
            }
        }
        Ok(Instant::now())
    });

    let cpu_before = process_cpu(pid);
    let own_before = own_cpu();
    let started = Instant::now();
    create_all(
        &client,
        pods_rt,
        Some("bench"),
        total,
        args.clients,
        bench_pod,
    )
    .await?;
    let created = started.elapsed();
    let all_bound_at = tokio::time::timeout(Duration::from_secs(args.timeout_secs), counter)
        .await
        .context("timed out waiting for every pod to be bound")???;
    let wall = all_bound_at - started;
    let server_cpu = process_cpu(pid).saturating_sub(cpu_before);
    let bench_cpu = own_cpu().saturating_sub(own_before);
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    // Spot check: pods of one app spread over many nodes, nobody over its pod limit.
    let list = client.list(pods_rt, Some("bench")).await?;
    let mut per_node = std::collections::HashMap::<String, usize>::new();
    for p in &list.items {
        if let Some(n) = p.pointer("/spec/nodeName").and_then(Value::as_str) {
            *per_node.entry(n.to_owned()).or_default() += 1;
        }
    }
    let busiest = per_node.values().copied().max().unwrap_or(0);

    let pods_per_sec = total as f64 / wall.as_secs_f64();
    let creates_per_sec = total as f64 / created.as_secs_f64();
    let lag = wall.saturating_sub(created);
    let loads = |s: &str| s.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    println!(
        "scheduler benchmark: {} pods onto {} fake nodes through ferrolet-control-plane over HTTPS ({} clients)",
        total, args.nodes, args.clients
    );
    println!(
        "load average before {} after {}",
        loads(&load_before),
        loads(&load_after)
    );
    println!(
        "scheduled {total} pods in {:.2} s = {pods_per_sec:.0} pods/s (target >= 1000: {}); creates alone {creates_per_sec:.0}/s, last bind {:.2} s after last create; server CPU {:.2} s, bench client CPU {:.2} s; nodes used {}, busiest node {busiest} pods",
        wall.as_secs_f64(),
        if pods_per_sec >= 1000.0 {
            "met"
        } else {
            "MISSED"
        },
        lag.as_secs_f64(),
        server_cpu.as_secs_f64(),
        bench_cpu.as_secs_f64(),
        per_node.len(),
    );
    let report = json!({
        "benchmark": "scheduler",
        "nodes": args.nodes,
        "pods": total,
        "clients": args.clients,
        "server_args": args.server_arg,
        "node_register_wall_s": nodes_wall.as_secs_f64(),
        "wall_s": wall.as_secs_f64(),
        "pods_per_sec": pods_per_sec.round(),
        "creates_per_sec": creates_per_sec.round(),
        "bind_lag_after_last_create_s": lag.as_secs_f64(),
        "server_cpu_s": server_cpu.as_secs_f64(),
        "bench_cpu_s": bench_cpu.as_secs_f64(),
        "nodes_used": per_node.len(),
        "busiest_node_pods": busiest,
        "target_pods_per_sec": 1000,
        "target_met": pods_per_sec >= 1000.0,
        "loadavg_before": loads(&load_before),
        "loadavg_after": loads(&load_after),
    });
    println!("{report}");
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let figures = [
        Figure::alone(
            &format!(
                "{total} pods onto {} nodes, first create to last bind",
                args.nodes
            ),
            "pods/s",
            pods_per_sec,
            Better::Higher,
        )
        .target(">= 1,000 pods/s", pods_per_sec >= 1000.0),
        Figure::alone(
            "pod creates alone",
            "pods/s",
            creates_per_sec,
            Better::Higher,
        ),
        Figure::alone(
            "last bind after last create",
            "s",
            lag.as_secs_f64(),
            Better::Lower,
        ),
        Figure::alone(
            "server CPU (API + scheduler)",
            "s",
            server_cpu.as_secs_f64(),
            Better::Lower,
        ),
    ];
    ferrolet_bench::write_figures(&args.out, &figures)
        .with_context(|| format!("writing the figures beside {}", args.out.display()))?;
    Ok(())
}
