//! Agent benchmark: pod startup and footprint of a whole one-node stack, `ferrolet` on
//! `ferrolet-shim` with our CNI plugins against the same `ferrolet` on containerd 1.6 + runc
//! with the reference CNI plugins, both nodes up at once in the same run (the one-node harness
//! of `ferrolet_tests::cluster`: the real control plane, the real runtimes, real pods).
//!
//! A pod is a busybox `httpd` on the pod network with a TCP readiness probe (every second,
//! or every `--probe-period` seconds), bound to the node by `spec.nodeName` (so the
//! scheduler does not count). Measured from the pod's create
//! call to the watch event that shows it `Running`, and to the one that shows it `Ready`:
//! - N pods one after another (each waits for the one before to be Ready), the two nodes
//!   taking turns pod by pod so drifts in machine load hit both;
//! - a burst of M pods created at once on an empty node: when the last is Running and Ready;
//! - the agent's RSS (`VmRSS`) idle, and with the burst running after its CPU was measured
//!   over 10 s with the burst's pods idle (their probes still running); its peak (`VmHWM`).
//!
//! Build: `cargo build --release -p ferrolet-bench -p ferrolet -p ferrolet-shim
//! -p ferrolet-control-plane -p ferrolet-cni --bins`; run as root: `target/release/agent`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use ferrolet_bench::procfs::{loadavg, process_cpu, status_kib};
use ferrolet_bench::{Better, Figure};
use ferrolet_control_plane::controllers::client::{
    ClusterClient, DeleteOptions, ResourceType, WatchEvent,
};
use ferrolet_control_plane::controllers::http::HttpClient;
use ferrolet_tests::cluster::{Cluster, ClusterOptions, NodeRuntime, condition};
use ferrolet_tests::images::BUSYBOX_IMAGE;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Pod startup and agent footprint: ferrolet on ferrolet-shim vs on containerd")]
struct Args {
    /// Pods started one after another, per node.
    #[arg(long, default_value_t = 20)]
    sequential: usize,
    /// Pods created at once, per node.
    #[arg(long, default_value_t = 30)]
    burst: usize,
    /// How long the idle CPU of the agent is measured, in seconds.
    #[arg(long, default_value_t = 10)]
    idle_secs: u64,
    /// The pods' readiness probe period, in seconds (Kubernetes' default is 10; 1 makes the
    /// agent probe every pod every second, and notice readiness soonest).
    #[arg(long, default_value_t = 1)]
    probe_period: u32,
    /// Where to write the JSON report (the headline figures go beside it).
    #[arg(long, default_value = "bench/out/agent.json")]
    out: PathBuf,
}

const NAMESPACE: &str = "default";
/// How long one pod may take to become Ready before the run fails.
const POD_DEADLINE: Duration = Duration::from_secs(60);
/// How long a whole burst may take.
const BURST_DEADLINE: Duration = Duration::from_secs(300);

/// When the watch first showed a pod Running and Ready, and whether it saw it deleted.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    running: Option<Instant>,
    ready: Option<Instant>,
    deleted: bool,
}

type SeenMap = Arc<Mutex<HashMap<String, Seen>>>;

/// One node under test: its cluster, an API client and a watch over its pods.
struct Node {
    label: &'static str,
    cluster: Cluster,
    client: Arc<HttpClient>,
    agent_pid: u32,
    seen: SeenMap,
    changed: tokio::sync::watch::Receiver<u64>,
    watcher: tokio::task::JoinHandle<Result<()>>,
}

impl Node {
    async fn new(label: &'static str, mut cluster: Cluster) -> Result<Node> {
        let agent_pid = cluster.agent().context("the agent is not running")?.pid();
        let client =
            Arc::new(HttpClient::from_data_dir(&cluster.dir.join("cp")).context("API client")?);
        let pods = ResourceType::of::<Pod>();
        let list = client.list(pods, Some(NAMESPACE)).await?;
        let mut stream = client
            .watch(pods, Some(NAMESPACE), &list.resource_version)
            .await?;
        let seen: SeenMap = Arc::default();
        let (tx, changed) = tokio::sync::watch::channel(0_u64);
        let map = Arc::clone(&seen);
        let watcher = tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let now = Instant::now();
                let (pod, deleted) = match event.context("pod watch")? {
                    WatchEvent::Added(p) | WatchEvent::Modified(p) => (p, false),
                    WatchEvent::Deleted(p) => (p, true),
                    WatchEvent::Bookmark(_) => continue,
                };
                let name = pod["metadata"]["name"].as_str().unwrap_or("").to_owned();
                {
                    let mut map = map.lock().unwrap_or_else(PoisonError::into_inner);
                    let s = map.entry(name).or_default();
                    if s.running.is_none() && pod["status"]["phase"] == "Running" {
                        s.running = Some(now);
                    }
                    if s.ready.is_none() && condition(&pod, "Ready") == Some("True") {
                        s.ready = Some(now);
                    }
                    s.deleted |= deleted;
                }
                tx.send_modify(|n| *n += 1);
            }
            bail!("the pod watch ended")
        });
        Ok(Node {
            label,
            cluster,
            client,
            agent_pid,
            seen,
            changed,
            watcher,
        })
    }

    /// Creates the pod `name`; returns when the create call was made.
    async fn create(&self, name: &str, probe_period: u32) -> Result<Instant> {
        let at = Instant::now();
        self.client
            .create(
                ResourceType::of::<Pod>(),
                Some(NAMESPACE),
                web_pod(name, &self.cluster.node_name, probe_period),
            )
            .await
            .with_context(|| format!("{}: creating pod {name}", self.label))?;
        Ok(at)
    }

    /// Waits until every pod of `names` is Ready (or, with `gone`, deleted); returns what
    /// the watch saw of each.
    async fn wait(&mut self, names: &[String], within: Duration, gone: bool) -> Result<Vec<Seen>> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            self.changed.borrow_and_update();
            {
                let map = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                let done = names.iter().all(|n| {
                    map.get(n)
                        .is_some_and(|s| if gone { s.deleted } else { s.ready.is_some() })
                });
                if done {
                    return Ok(names.iter().map(|n| map[n]).collect());
                }
            }
            if self.watcher.is_finished() {
                bail!("{}: the pod watch stopped", self.label);
            }
            if tokio::time::timeout_at(deadline, self.changed.changed())
                .await
                .is_err()
            {
                let waiting: Vec<&String> = {
                    let map = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
                    names
                        .iter()
                        .filter(|n| {
                            !map.get(*n)
                                .is_some_and(|s| if gone { s.deleted } else { s.ready.is_some() })
                        })
                        .collect()
                };
                bail!(
                    "{}: pods {waiting:?} not {} within {within:?}\n{}",
                    self.label,
                    if gone { "deleted" } else { "Ready" },
                    self.cluster.logs()
                );
            }
        }
    }

    /// Deletes the pods at once (grace 0) and waits until they are gone.
    async fn delete_all(&mut self, names: &[String]) -> Result<()> {
        for name in names {
            self.client
                .delete(
                    ResourceType::of::<Pod>(),
                    Some(NAMESPACE),
                    name,
                    DeleteOptions {
                        grace_period_seconds: Some(0),
                        ..DeleteOptions::default()
                    },
                )
                .await
                .with_context(|| format!("{}: deleting pod {name}", self.label))?;
        }
        self.wait(names, BURST_DEADLINE, true).await?;
        Ok(())
    }

    fn rss_mib(&self) -> f64 {
        status_kib(self.agent_pid, "VmRSS:") as f64 / 1024.0
    }
}

/// A busybox httpd on the pod network, bound to `node`, Ready once it accepts connections.
fn web_pod(name: &str, node: &str, probe_period: u32) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "bench"}},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "web",
                "image": BUSYBOX_IMAGE,
                "imagePullPolicy": "Never",
                "command": ["httpd", "-f", "-p", "8080", "-h", "/"],
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": probe_period},
            }],
        },
    })
}

/// Nearest-rank percentile of milliseconds.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms_since(from: Instant, to: Option<Instant>) -> f64 {
    to.map_or(f64::NAN, |t| {
        t.saturating_duration_since(from).as_secs_f64() * 1000.0
    })
}

/// What one node measured.
#[derive(Debug, Default)]
struct Results {
    /// Create to Running and to Ready of each sequential pod, ms, sorted.
    seq_running: Vec<f64>,
    seq_ready: Vec<f64>,
    /// Create of the burst's first pod to its last pod Running and Ready, ms.
    burst_all_running: f64,
    burst_all_ready: f64,
    /// Per pod of the burst, from the burst's start, ms, sorted.
    burst_running: Vec<f64>,
    rss_idle_mib: f64,
    /// With the burst's pods running, after the idle period: the settled figure.
    rss_burst_mib: f64,
    /// The agent's peak RSS over the whole run (`VmHWM`).
    rss_peak_mib: f64,
    /// CPU of the agent with the burst's pods idle, % of one core.
    cpu_idle_pods_pct: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the agent benchmark runs whole nodes and needs root"
    );
    ensure!(
        args.sequential > 0 && args.burst > 0,
        "--sequential and --burst must be at least 1"
    );
    ensure!(
        (1..=300).contains(&args.probe_period),
        "--probe-period must be 1 to 300 seconds"
    );
    ensure!(
        args.sequential <= 200 && args.burst <= 200,
        "at most 200 pods per phase (a /24 pod network, 110 pods per node by default)"
    );
    let load_before = loadavg();
    eprintln!("starting a node on ferrolet-shim and one on containerd...");
    let shim = Cluster::start(ClusterOptions::default()).context("the ferrolet-shim node")?;
    let containerd = Cluster::start(ClusterOptions {
        runtime: NodeRuntime::Containerd,
        ..ClusterOptions::default()
    })
    .context("the containerd node")?;
    let rt = tokio::runtime::Runtime::new()?;
    let results = rt.block_on(async {
        let mut nodes = [
            Node::new("ferrolet-shim", shim).await?,
            Node::new("containerd", containerd).await?,
        ];
        let results = run(&args, &mut nodes).await;
        for n in &nodes {
            n.watcher.abort();
        }
        if let Err(e) = &results {
            // Tearing the nodes down can take a while; say what failed first.
            eprintln!("the benchmark failed, tearing the nodes down: {e:#}");
        }
        results
    })?;
    let load_after = loadavg();
    report(&args, &results, &load_before, &load_after)
}

async fn run(args: &Args, nodes: &mut [Node; 2]) -> Result<[Results; 2]> {
    let mut results: [Results; 2] = Default::default();
    // Warm caches (images, binaries, snapshots) outside the timings; settle, then idle RSS.
    eprintln!("warming up...");
    for node in nodes.iter_mut() {
        let names = vec!["warm-0".to_owned()];
        node.create(&names[0], args.probe_period).await?;
        node.wait(&names, POD_DEADLINE, false).await?;
        node.delete_all(&names).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (node, r) in nodes.iter().zip(&mut results) {
        r.rss_idle_mib = node.rss_mib();
    }

    eprintln!("{} pods one after another per node...", args.sequential);
    let mut seq_names = Vec::new();
    for i in 0..args.sequential {
        let name = format!("seq-{i:03}");
        for (node, r) in nodes.iter_mut().zip(&mut results) {
            let at = node.create(&name, args.probe_period).await?;
            let seen = node
                .wait(std::slice::from_ref(&name), POD_DEADLINE, false)
                .await?;
            r.seq_running.push(ms_since(at, seen[0].running));
            r.seq_ready.push(ms_since(at, seen[0].ready));
        }
        seq_names.push(name);
    }
    for node in nodes.iter_mut() {
        node.delete_all(&seq_names).await?;
    }

    eprintln!("a burst of {} pods per node...", args.burst);
    let burst_names: Vec<String> = (0..args.burst).map(|i| format!("burst-{i:03}")).collect();
    for (node, r) in nodes.iter_mut().zip(&mut results) {
        let started = Instant::now();
        let creates = burst_names
            .iter()
            .map(|name| node.create(name, args.probe_period));
        for created in futures::future::join_all(creates).await {
            created?;
        }
        let seen = node.wait(&burst_names, BURST_DEADLINE, false).await?;
        r.burst_running = seen.iter().map(|s| ms_since(started, s.running)).collect();
        r.burst_all_running = r.burst_running.iter().copied().fold(0.0, f64::max);
        r.burst_all_ready = seen
            .iter()
            .map(|s| ms_since(started, s.ready))
            .fold(0.0, f64::max);
    }

    // Both nodes with their burst running and nothing to start: the agent's steady cost.
    let before: Vec<Duration> = nodes.iter().map(|n| process_cpu(n.agent_pid)).collect();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.idle_secs)).await;
    let wall = t0.elapsed().as_secs_f64();
    for ((node, r), b) in nodes.iter().zip(&mut results).zip(before) {
        r.cpu_idle_pods_pct =
            process_cpu(node.agent_pid).saturating_sub(b).as_secs_f64() / wall * 100.0;
        r.rss_burst_mib = node.rss_mib();
        r.rss_peak_mib = status_kib(node.agent_pid, "VmHWM:") as f64 / 1024.0;
    }
    for r in &mut results {
        for v in [&mut r.seq_running, &mut r.seq_ready, &mut r.burst_running] {
            v.sort_by(f64::total_cmp);
        }
    }
    Ok(results)
}

fn report(args: &Args, r: &[Results; 2], load_before: &str, load_after: &str) -> Result<()> {
    let [ours, theirs] = r;
    let p = |v: &[f64], q: f64| percentile(v, q);
    println!(
        "agent pod startup and footprint: ferrolet on ferrolet-shim + our CNI vs on containerd \
         1.6 + runc + reference CNI; {} sequential pods, a burst of {}",
        args.sequential, args.burst
    );
    println!("load average before {load_before}, after {load_after}\n");
    println!("| figure | ferrolet-shim | containerd | ratio |");
    println!("|---|---:|---:|---:|");
    let row = |name: &str, a: f64, b: f64, unit: &str| {
        println!("| {name} | {a:.1} {unit} | {b:.1} {unit} | {:.2}x |", b / a);
    };
    row(
        "create -> Running p50",
        p(&ours.seq_running, 0.5),
        p(&theirs.seq_running, 0.5),
        "ms",
    );
    row(
        "create -> Running p99",
        p(&ours.seq_running, 0.99),
        p(&theirs.seq_running, 0.99),
        "ms",
    );
    row(
        "create -> Ready p50",
        p(&ours.seq_ready, 0.5),
        p(&theirs.seq_ready, 0.5),
        "ms",
    );
    row(
        "create -> Ready p99",
        p(&ours.seq_ready, 0.99),
        p(&theirs.seq_ready, 0.99),
        "ms",
    );
    row(
        "burst: last Running",
        ours.burst_all_running,
        theirs.burst_all_running,
        "ms",
    );
    row(
        "burst: last Ready",
        ours.burst_all_ready,
        theirs.burst_all_ready,
        "ms",
    );
    row(
        "agent RSS idle",
        ours.rss_idle_mib,
        theirs.rss_idle_mib,
        "MiB",
    );
    row(
        "agent RSS with the burst (settled)",
        ours.rss_burst_mib,
        theirs.rss_burst_mib,
        "MiB",
    );
    row(
        "agent peak RSS",
        ours.rss_peak_mib,
        theirs.rss_peak_mib,
        "MiB",
    );
    row(
        "agent CPU, burst pods idle",
        ours.cpu_idle_pods_pct,
        theirs.cpu_idle_pods_pct,
        "%",
    );
    let side = |r: &Results| {
        json!({
            "sequential_running_ms": r.seq_running,
            "sequential_ready_ms": r.seq_ready,
            "burst_running_ms": r.burst_running,
            "burst_all_running_ms": r.burst_all_running,
            "burst_all_ready_ms": r.burst_all_ready,
            "agent_rss_idle_mib": r.rss_idle_mib,
            "agent_rss_burst_mib": r.rss_burst_mib,
            "agent_rss_peak_mib": r.rss_peak_mib,
            "agent_cpu_burst_idle_pct": r.cpu_idle_pods_pct,
        })
    };
    let doc = json!({
        "benchmark": "agent",
        "sequential": args.sequential,
        "burst": args.burst,
        "idle_secs": args.idle_secs,
        "probe_period_secs": args.probe_period,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "ferrolet-shim": side(ours),
        "containerd": side(theirs),
    });
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", args.out.display()))?;

    let peer = "same agent on containerd 1.6 + runc";
    let vs = |name: &str, unit: &str, a: f64, b: f64| {
        Figure::versus(name, unit, a, b, peer, Better::Lower)
    };
    let run50 = p(&ours.seq_running, 0.5);
    let run99 = p(&ours.seq_running, 0.99);
    let mut figures = vec![
        vs(
            "one pod, create to Running p50",
            "ms",
            run50,
            p(&theirs.seq_running, 0.5),
        )
        .target("< 100 ms", run50 < 100.0),
        vs(
            "one pod, create to Running p99",
            "ms",
            run99,
            p(&theirs.seq_running, 0.99),
        )
        .target("< 250 ms", run99 < 250.0),
        vs(
            "one pod, create to Ready p50",
            "ms",
            p(&ours.seq_ready, 0.5),
            p(&theirs.seq_ready, 0.5),
        ),
        vs(
            &format!("burst of {}: last pod Running", args.burst),
            "ms",
            ours.burst_all_running,
            theirs.burst_all_running,
        ),
        vs(
            &format!("burst of {}: last pod Ready", args.burst),
            "ms",
            ours.burst_all_ready,
            theirs.burst_all_ready,
        ),
        vs(
            "agent RSS idle",
            "MiB",
            ours.rss_idle_mib,
            theirs.rss_idle_mib,
        ),
        vs(
            &format!(
                "agent RSS, {} pods (after {} s idle)",
                args.burst, args.idle_secs
            ),
            "MiB",
            ours.rss_burst_mib,
            theirs.rss_burst_mib,
        ),
        vs(
            &format!(
                "agent CPU, {} idle pods ({} s probes)",
                args.burst, args.probe_period
            ),
            "% core",
            ours.cpu_idle_pods_pct,
            theirs.cpu_idle_pods_pct,
        ),
    ];
    // The burst, RSS and CPU targets are for 100 pods: judged only at that size.
    if args.burst >= 100 {
        figures[3] = figures[3].clone().target(
            "100 pods all Running < 5 s",
            ours.burst_all_running < 5000.0,
        );
        figures[6] = figures[6]
            .clone()
            .target("< 30 MB", ours.rss_burst_mib * 1.048_576 < 30.0);
        figures[7] = figures[7]
            .clone()
            .target("< 1% of a core", ours.cpu_idle_pods_pct < 1.0);
    }
    ferrolet_bench::write_figures(&args.out, &figures)
        .with_context(|| format!("writing the figures beside {}", args.out.display()))?;
    Ok(())
}
