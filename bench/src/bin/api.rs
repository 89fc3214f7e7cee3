//! API server benchmark: the real `ferrolet-control-plane` binary, started as a child process
//! serving HTTPS on loopback, once over its embedded SQLite store and once over a real etcd,
//! in the same run on the same machine.
//!
//! Measures, for each store: pod create throughput (N pods from C concurrent clients), the
//! latency of listing all N pods (median of several lists, timed to the last byte of the body),
//! watch delivery latency to W concurrent watchers (from the write's acknowledgement, and
//! from the write being sent, to each watcher holding the parsed event), and the server's
//! resident memory while it holds the N pods. CPU time of the server (and of etcd) is
//! reported beside wall time because these machines are shared and noisy.
//!
//! Prints text lines with the ratio SQLite vs etcd and the targets, then one JSON
//! document with every figure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferrolet_bench::procfs::{process_cpu, status_kib};
use ferrolet_bench::{Better, Figure};
use ferrolet_control_plane::storage::testing::EtcdServer;
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Compare the API server over SQLite and over etcd")]
struct Args {
    /// The server binary; default: `ferrolet-control-plane` beside this program.
    #[arg(long)]
    server: Option<PathBuf>,
    /// Extra server arguments, space-separated. By default the API server runs alone: the
    /// in-process scheduler and controllers would otherwise act on the benchmark's pods and
    /// their memory and CPU would count as the API server's.
    #[arg(
        long,
        allow_hyphen_values = true,
        value_delimiter = ' ',
        default_value = "--controllers=none --scheduler=false"
    )]
    server_args: Vec<String>,
    /// Pods to create.
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    /// Concurrent creating clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How many times to list all pods (the median is reported).
    #[arg(long, default_value_t = 7)]
    lists: usize,
    /// Concurrent watchers for the delivery-latency test.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Writes whose delivery is timed.
    #[arg(long, default_value_t = 300)]
    watched_writes: usize,
    /// Pause between timed writes, so the figure is delivery latency, not queueing.
    #[arg(long, default_value_t = 5)]
    write_gap_ms: u64,
    /// Where to write the JSON report (the headline figures go beside it).
    #[arg(long, default_value = "bench/out/api.json")]
    out: PathBuf,
}

/// The server process; killed and its data dir removed on drop.
struct Server {
    child: Child,
    _dir: tempfile::TempDir,
    url: String,
    client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Server {
    async fn start(binary: &Path, store_args: &[String], extra: &[String]) -> Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("ferrolet-api-bench-")
            .tempdir()?;
        let data = dir.path().join("data");
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(binary)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .args(store_args)
            .args(extra.iter().filter(|a| !a.is_empty()))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let kubeconfig = data.join("admin.kubeconfig");
        let url = wait_for("admin.kubeconfig", Duration::from_secs(60), async || {
            let text = std::fs::read_to_string(&kubeconfig).ok()?;
            let line = text
                .lines()
                .find(|l| l.trim_start().starts_with("server: "))?;
            Some(line.trim_start().trim_start_matches("server: ").to_owned())
        })
        .await?;
        let ca = std::fs::read(data.join("pki/ca.crt")).context("reading the server's CA")?;
        let tokens = std::fs::read_to_string(data.join("tokens.csv")).context("reading tokens")?;
        let token = tokens
            .lines()
            .find_map(|l| l.split(',').next().filter(|t| !t.is_empty()))
            .context("no token in tokens.csv")?
            .to_owned();
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse()?,
        );
        let client = reqwest::Client::builder()
            .tls_backend_rustls()
            .tls_certs_only(reqwest::Certificate::from_pem_bundle(&ca)?)
            .default_headers(headers)
            .pool_max_idle_per_host(256)
            .build()?;
        let server = Server {
            child,
            _dir: dir,
            url,
            client,
        };
        wait_for("the API to answer", Duration::from_secs(30), async || {
            let resp = server.get("/readyz").send().await.ok()?;
            resp.status().is_success().then_some(())
        })
        .await?;
        Ok(server)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(format!("{}{path}", self.url))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self
            .client
            .post(format!("{}{path}", self.url))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("POST {path}: {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

/// A pod about the size and shape of a small real one.
fn pod(namespace: &str, name: &str, i: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": "bench", "shard": (i % 16).to_string()},
            "annotations": {"bench.ferrolet.dev/index": i.to_string()},
        },
        "spec": {
            "containers": [{
                "name": "app",
                "image": "registry.local/bench/app:1.0",
                "command": ["/bin/app", "--serve", "--port=8080"],
                "ports": [{"name": "http", "containerPort": 8080}],
                "env": [{"name": "MODE", "value": "bench"}, {"name": "INDEX", "value": i.to_string()}],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
                "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 5},
            }],
        },
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The pid of the etcd serving `data_dir`, found by its command line.
fn etcd_pid(data_dir: &Path) -> Option<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let entry = entry.ok()?;
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("etcd") && cmdline.contains(&needle)).then_some(pid)
    })
}

#[derive(Default)]
struct Report {
    create_wall: Duration,
    creates_per_sec: f64,
    create_server_cpu: Duration,
    create_store_cpu: Duration,
    list_median: Duration,
    list_min: Duration,
    list_bytes: usize,
    list_server_cpu_each: Duration,
    rss_kb: u64,
    hwm_kb: u64,
    watch_ack_p50: Duration,
    watch_ack_p99: Duration,
    watch_sent_p50: Duration,
    watch_sent_p99: Duration,
    watch_events: usize,
    watch_server_cpu: Duration,
}

async fn create_pods(server: &Arc<Server>, args: &Args) -> Result<()> {
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let server = server.clone();
        let (pods, clients) = (args.pods, args.clients);
        tasks.push(tokio::spawn(async move {
            for i in (client..pods).step_by(clients) {
                let name = format!("pod-{i:06}");
                server
                    .post("/api/v1/namespaces/default/pods", &pod("default", &name, i))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("create task")??;
    }
    Ok(())
}

async fn list_pods(server: &Server, expected: usize) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let resp = server.get("/api/v1/namespaces/default/pods").send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    // Timed to the last byte received: the server's share, not this client's JSON parser.
    let took = started.elapsed();
    let list: Value = serde_json::from_slice(&body).context("list is not JSON")?;
    if !status.is_success() {
        bail!("list: {status}");
    }
    let items = list["items"].as_array().map_or(0, Vec::len);
    if items != expected {
        bail!("listed {items} pods, created {expected}");
    }
    Ok((took, body.len()))
}

/// One watcher: the time each named pod's ADDED event was parsed.
async fn watch(resp: reqwest::Response, expected: usize) -> Result<HashMap<String, Instant>> {
    let mut seen = HashMap::with_capacity(expected);
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    while seen.len() < expected {
        let chunk = match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
            Ok(Some(chunk)) => chunk?,
            Ok(None) => bail!("watch ended after {} events", seen.len()),
            Err(_) => bail!("watch stalled after {} events", seen.len()),
        };
        buf.extend_from_slice(&chunk);
        while let Some(end) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            let event: Value = serde_json::from_slice(&line).context("watch event")?;
            let now = Instant::now();
            if event["type"] != "ADDED" {
                bail!("unexpected watch event {event}");
            }
            if let Some(name) = event["object"]["metadata"]["name"].as_str() {
                seen.insert(name.to_owned(), now);
            }
        }
    }
    Ok(seen)
}

async fn run(
    binary: &Path,
    store_args: &[String],
    store_pid: Option<u32>,
    args: &Args,
) -> Result<Report> {
    let server = Arc::new(Server::start(binary, store_args, &args.server_args).await?);
    let pid = server.pid();
    let store_cpu = || store_pid.map_or(Duration::ZERO, process_cpu);
    let mut report = Report::default();

    let (cpu0, store0) = (process_cpu(pid), store_cpu());
    let started = Instant::now();
    create_pods(&server, args).await?;
    report.create_wall = started.elapsed();
    report.creates_per_sec = args.pods as f64 / report.create_wall.as_secs_f64();
    report.create_server_cpu = process_cpu(pid).saturating_sub(cpu0);
    report.create_store_cpu = store_cpu().saturating_sub(store0);

    let cpu0 = process_cpu(pid);
    let mut lists = Vec::new();
    for _ in 0..args.lists.max(1) {
        let (took, bytes) = list_pods(&server, args.pods).await?;
        lists.push(took);
        report.list_bytes = bytes;
    }
    report.list_server_cpu_each = process_cpu(pid).saturating_sub(cpu0) / lists.len() as u32;
    lists.sort();
    report.list_median = lists[lists.len() / 2];
    report.list_min = lists[0];
    report.rss_kb = status_kib(pid, "VmRSS:");

    // Watch delivery, in a namespace of its own so watchers see only the timed writes.
    server
        .post(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "bench-watch"}}),
        )
        .await?;
    let list: Value = server
        .get("/api/v1/namespaces/bench-watch/pods")
        .send()
        .await?
        .json()
        .await?;
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .context("list without resourceVersion")?
        .to_owned();
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let resp = server
            .get(&format!(
                "/api/v1/namespaces/bench-watch/pods?watch=true&resourceVersion={rv}"
            ))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("watch: {}", resp.status());
        }
        watchers.push(tokio::spawn(watch(resp, args.watched_writes)));
    }
    let cpu0 = process_cpu(pid);
    let mut times = HashMap::new();
    for i in 0..args.watched_writes {
        let name = format!("watched-{i:05}");
        let sent = Instant::now();
        server
            .post(
                "/api/v1/namespaces/bench-watch/pods",
                &pod("bench-watch", &name, i),
            )
            .await?;
        times.insert(name, (sent, Instant::now()));
        tokio::time::sleep(Duration::from_millis(args.write_gap_ms)).await;
    }
    let (mut from_ack, mut from_sent) = (Vec::new(), Vec::new());
    for watcher in watchers {
        for (name, at) in watcher.await.context("watcher task")?? {
            let (sent, acked) = times.get(&name).context("event for an unknown write")?;
            from_ack.push(at.saturating_duration_since(*acked));
            from_sent.push(at.saturating_duration_since(*sent));
        }
    }
    report.watch_server_cpu = process_cpu(pid).saturating_sub(cpu0);
    from_ack.sort();
    from_sent.sort();
    report.watch_events = from_ack.len();
    report.watch_ack_p50 = percentile(&from_ack, 0.50);
    report.watch_ack_p99 = percentile(&from_ack, 0.99);
    report.watch_sent_p50 = percentile(&from_sent, 0.50);
    report.watch_sent_p99 = percentile(&from_sent, 0.99);
    report.hwm_kb = status_kib(pid, "VmHWM:");
    Ok(report)
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn to_json(r: &Report) -> Value {
    json!({
        "create_wall_s": r.create_wall.as_secs_f64(),
        "creates_per_sec": r.creates_per_sec.round(),
        "create_server_cpu_s": r.create_server_cpu.as_secs_f64(),
        "create_store_process_cpu_s": r.create_store_cpu.as_secs_f64(),
        "list_median_ms": ms(r.list_median),
        "list_min_ms": ms(r.list_min),
        "list_body_bytes": r.list_bytes,
        "list_server_cpu_ms_each": ms(r.list_server_cpu_each),
        "rss_mb_holding_pods": r.rss_kb as f64 / 1024.0,
        "peak_rss_mb": r.hwm_kb as f64 / 1024.0,
        "watch_from_ack_p50_ms": ms(r.watch_ack_p50),
        "watch_from_ack_p99_ms": ms(r.watch_ack_p99),
        "watch_from_send_p50_ms": ms(r.watch_sent_p50),
        "watch_from_send_p99_ms": ms(r.watch_sent_p99),
        "watch_events": r.watch_events,
        "watch_server_cpu_s": r.watch_server_cpu.as_secs_f64(),
    })
}

fn default_server_binary() -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().context("this program has no directory")?;
    Ok(dir.join("ferrolet-control-plane"))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
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

    let sqlite = run(&binary, &[], None, &args).await.context("sqlite")?;
    let etcd_server = EtcdServer::start().await?;
    let etcd_pid = etcd_pid(&etcd_server.data_dir());
    let etcd = run(
        &binary,
        &["--etcd-servers".to_owned(), etcd_server.endpoint()],
        etcd_pid,
        &args,
    )
    .await
    .context("etcd")?;
    drop(etcd_server);
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();

    let create_ratio = sqlite.creates_per_sec / etcd.creates_per_sec;
    let lower_is_better = |s: Duration, e: Duration| e.as_secs_f64() / s.as_secs_f64().max(1e-9);
    println!(
        "API server benchmark: {} pods, {} creating clients, {} watchers x {} writes, HTTPS on loopback",
        args.pods, args.clients, args.watchers, args.watched_writes
    );
    println!(
        "load average before {} after {}",
        load_before
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        load_after
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("ratio = how many times better the server over SQLite is than over etcd");
    println!("{:<34} {:>12} {:>12} {:>8}", "", "sqlite", "etcd", "ratio");
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>7.2}x",
        "creates/s", sqlite.creates_per_sec, etcd.creates_per_sec, create_ratio
    );
    let secs = |d: Duration| format!("{:.2} s", d.as_secs_f64());
    println!(
        "{:<34} {:>12} {:>12}",
        "  server CPU during creates",
        secs(sqlite.create_server_cpu),
        secs(etcd.create_server_cpu)
    );
    println!(
        "{:<34} {:>12} {:>12}",
        "  etcd CPU during creates",
        "-",
        secs(etcd.create_store_cpu)
    );
    let row = |name: &str, s: Duration, e: Duration| {
        println!(
            "{name:<34} {:>9.2} ms {:>9.2} ms {:>7.2}x",
            ms(s),
            ms(e),
            lower_is_better(s, e)
        );
    };
    row(
        &format!("list {} pods (median)", args.pods),
        sqlite.list_median,
        etcd.list_median,
    );
    row(
        "  server CPU per list",
        sqlite.list_server_cpu_each,
        etcd.list_server_cpu_each,
    );
    row(
        "watch from ack p50",
        sqlite.watch_ack_p50,
        etcd.watch_ack_p50,
    );
    row(
        "watch from ack p99",
        sqlite.watch_ack_p99,
        etcd.watch_ack_p99,
    );
    row(
        "watch from send p50",
        sqlite.watch_sent_p50,
        etcd.watch_sent_p50,
    );
    row(
        "watch from send p99",
        sqlite.watch_sent_p99,
        etcd.watch_sent_p99,
    );
    let mb = |kb: u64| kb as f64 / 1024.0;
    println!(
        "{:<34} {:>9.1} MB {:>9.1} MB",
        format!("server RSS holding {} pods", args.pods),
        mb(sqlite.rss_kb),
        mb(etcd.rss_kb)
    );
    println!(
        "{:<34} {:>9.1} MB {:>9.1} MB",
        "server peak RSS",
        mb(sqlite.hwm_kb),
        mb(etcd.hwm_kb)
    );
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let worst = |f: fn(&Report) -> Duration| f(&sqlite).max(f(&etcd));
    let list_ok = worst(|r| r.list_median) < Duration::from_millis(100);
    let watch_ok = worst(|r| r.watch_ack_p99) < Duration::from_millis(10);
    let rss_ok = sqlite.rss_kb.max(etcd.rss_kb) < 150 * 1024;
    println!(
        "target sqlite creates >= 2x etcd: {} ({create_ratio:.2}x)",
        verdict(create_ratio >= 2.0)
    );
    println!(
        "target list < 100 ms: {} (worst {:.2} ms)",
        verdict(list_ok),
        ms(worst(|r| r.list_median))
    );
    println!(
        "target watch p99 < 10 ms: {} (worst {:.2} ms)",
        verdict(watch_ok),
        ms(worst(|r| r.watch_ack_p99))
    );
    println!(
        "target RSS < 150 MB: {} (worst {:.1} MB)",
        verdict(rss_ok),
        mb(sqlite.rss_kb.max(etcd.rss_kb))
    );
    let doc = json!({
        "benchmark": "api",
        "pods": args.pods,
        "clients": args.clients,
        "watchers": args.watchers,
        "watched_writes": args.watched_writes,
        "loadavg_before": load_before.trim(),
        "loadavg_after": load_after.trim(),
        "sqlite": to_json(&sqlite),
        "etcd": to_json(&etcd),
        "ratio_sqlite_vs_etcd": {
            "creates": create_ratio,
            "list": lower_is_better(sqlite.list_median, etcd.list_median),
            "watch_p50": lower_is_better(sqlite.watch_ack_p50, etcd.watch_ack_p50),
            "watch_p99": lower_is_better(sqlite.watch_ack_p99, etcd.watch_ack_p99),
        },
        "targets": {
            "sqlite_creates_2x_etcd": create_ratio >= 2.0,
            "list_under_100ms": list_ok,
            "watch_p99_under_10ms": watch_ok,
            "rss_under_150mb": rss_ok,
        },
    });
    println!("{doc}");
    write_report(&args.out, &doc)?;

    let peer = "same server over etcd 3.4";
    let figures = [
        Figure::versus(
            "pod creates (10k, 8 clients)",
            "pods/s",
            sqlite.creates_per_sec,
            etcd.creates_per_sec,
            peer,
            Better::Higher,
        )
        .target(">= 2x etcd", create_ratio >= 2.0),
        Figure::versus(
            &format!("list {} pods (median)", args.pods),
            "ms",
            ms(sqlite.list_median),
            ms(etcd.list_median),
            peer,
            Better::Lower,
        )
        .target("< 100 ms", sqlite.list_median < Duration::from_millis(100)),
        // From the acknowledgement most events are already there (p50 0); from the create
        // request being sent the figure includes the create's own round trip.
        Figure::versus(
            "create sent to watch event, p50",
            "ms",
            ms(sqlite.watch_sent_p50),
            ms(etcd.watch_sent_p50),
            peer,
            Better::Lower,
        ),
        Figure::versus(
            &format!(
                "create sent to watch event, p99 ({} watchers)",
                args.watchers
            ),
            "ms",
            ms(sqlite.watch_sent_p99),
            ms(etcd.watch_sent_p99),
            peer,
            Better::Lower,
        ),
        Figure::versus(
            &format!(
                "create acknowledged to watch event, p99 ({} watchers)",
                args.watchers
            ),
            "ms",
            ms(sqlite.watch_ack_p99),
            ms(etcd.watch_ack_p99),
            peer,
            Better::Lower,
        )
        .target("< 10 ms", sqlite.watch_ack_p99 < Duration::from_millis(10)),
        Figure::versus(
            "server CPU for the creates",
            "s",
            sqlite.create_server_cpu.as_secs_f64(),
            (etcd.create_server_cpu + etcd.create_store_cpu).as_secs_f64(),
            "server + etcd",
            Better::Lower,
        ),
        Figure::versus(
            &format!("server RSS holding {} pods", args.pods),
            "MiB",
            mb(sqlite.rss_kb),
            mb(etcd.rss_kb),
            peer,
            Better::Lower,
        )
        .target("< 150 MB", sqlite.rss_kb < 150 * 1024),
    ];
    ferrolet_bench::write_figures(&args.out, &figures)
        .with_context(|| format!("writing the figures beside {}", args.out.display()))?;
    Ok(())
}

/// Writes the benchmark's whole JSON document to `out`.
fn write_report(out: &Path, doc: &Value) -> Result<()> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(out, serde_json::to_string_pretty(doc)?)
        .with_context(|| format!("writing {}", out.display()))
}
