//! Store benchmark: the SQLite store against the etcd store, in the same run, on the same
//! machine, through the same `Store` trait the API server uses.
//!
//! Measures, for each store: create throughput (N objects from C concurrent clients), the
//! latency of listing all N objects, and watch delivery latency (from the write being
//! issued to each of W watchers receiving it). Prints each number and the ratio
//! SQLite / etcd, and whether the target (SQLite creates >= 2x etcd's) is met.
//! SQLite runs twice: with its default durability (acknowledged writes survive kill -9)
//! and fsyncing every group commit (they survive power loss too), to show that cost.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use ferrolet_bench::{Better, Figure};
use ferrolet_control_plane::storage::etcd::{DEFAULT_ROOT, EtcdStore};
use ferrolet_control_plane::storage::sqlite::{Durability, SqliteStore};
use ferrolet_control_plane::storage::testing::EtcdServer;
use ferrolet_control_plane::storage::{ListOptions, Store};
use futures::StreamExt;

#[derive(Parser, Debug)]
#[command(about = "Compare the SQLite and etcd stores")]
struct Args {
    /// Objects to create.
    #[arg(long, default_value_t = 10_000)]
    objects: usize,
    /// Concurrent creating clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Bytes per object (about a small pod's JSON).
    #[arg(long, default_value_t = 2048)]
    value_size: usize,
    /// How many times to list all objects (the median is reported).
    #[arg(long, default_value_t = 5)]
    lists: usize,
    /// Concurrent watchers for the delivery-latency test.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// Writes whose delivery is timed.
    #[arg(long, default_value_t = 200)]
    watched_writes: usize,
    /// Where to write the JSON report (the headline figures go beside it).
    #[arg(long, default_value = "bench/out/store.json")]
    out: PathBuf,
}

struct Report {
    creates_per_sec: f64,
    list_all: Duration,
    watch_p50: Duration,
    watch_p99: Duration,
}

fn value(size: usize, i: usize) -> Bytes {
    let head = format!("{{\"kind\":\"Pod\",\"metadata\":{{\"name\":\"pod-{i}\"}},\"pad\":\"");
    let mut body = head.into_bytes();
    body.resize(size.saturating_sub(2).max(body.len()), b'x');
    body.extend_from_slice(b"\"}");
    Bytes::from(body)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn run(store: Arc<dyn Store>, args: &Args) -> Result<Report> {
    // Creates: every client takes every `clients`-th object.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let store = store.clone();
        let (objects, clients, size) = (args.objects, args.clients, args.value_size);
        tasks.push(tokio::spawn(async move {
            for i in (client..objects).step_by(clients) {
                store
                    .create(&format!("/pods/bench/pod-{i:06}"), value(size, i))
                    .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await.context("create task")??;
    }
    let create_time = started.elapsed();

    let mut lists = Vec::new();
    for _ in 0..args.lists.max(1) {
        let started = Instant::now();
        let listed = store.list("/pods/", ListOptions::default()).await?;
        lists.push(started.elapsed());
        if listed.items.len() != args.objects {
            bail!(
                "listed {} objects, created {}",
                listed.items.len(),
                args.objects
            );
        }
    }
    lists.sort();

    // Watch delivery: each watcher notes when it got each write; the writer notes when it
    // issued it (etcd can deliver an event before the writer has its answer, so timing from
    // the acknowledgement would flatter etcd with zeros).
    let from = store.current_revision().await?;
    let mut watchers = Vec::new();
    for _ in 0..args.watchers {
        let mut stream = store.watch("/watched/", from).await?;
        let expected = args.watched_writes;
        watchers.push(tokio::spawn(async move {
            let mut seen = Vec::with_capacity(expected);
            while seen.len() < expected {
                match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
                    Ok(Some(Ok(event))) => seen.push((event.revision(), Instant::now())),
                    Ok(Some(Err(e))) => bail!("watch failed: {e}"),
                    Ok(None) => bail!("watch ended"),
                    Err(_) => bail!("watch stalled"),
                }
            }
            Ok(seen)
        }));
    }
    let mut acked = std::collections::HashMap::new();
    for i in 0..args.watched_writes {
        let sent = Instant::now();
        let kv = store
            .create(&format!("/watched/{i:06}"), value(args.value_size, i))
            .await?;
        acked.insert(kv.mod_revision, sent);
        // Paced so the number is delivery latency, not queueing behind a burst.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let mut delays = Vec::new();
    for watcher in watchers {
        for (revision, at) in watcher.await.context("watcher task")?? {
            let sent = acked.get(&revision).context("event for an unknown write")?;
            delays.push(at.saturating_duration_since(*sent));
        }
    }
    delays.sort();

    Ok(Report {
        creates_per_sec: args.objects as f64 / create_time.as_secs_f64(),
        list_all: lists[lists.len() / 2],
        watch_p50: percentile(&delays, 0.50),
        watch_p99: percentile(&delays, 0.99),
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();

    let dir = tempfile::tempdir()?;
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open_with(
        &dir.path().join("store.db"),
        Durability::ProcessCrash,
    )?);
    let sqlite = run(sqlite, &args).await.context("sqlite")?;
    let sqlite_fsync: Arc<dyn Store> = Arc::new(SqliteStore::open_with(
        &dir.path().join("store-fsync.db"),
        Durability::PowerLoss,
    )?);
    let sqlite_fsync = run(sqlite_fsync, &args).await.context("sqlite, fsync")?;

    let etcd_server = EtcdServer::start().await?;
    let etcd: Arc<dyn Store> =
        Arc::new(EtcdStore::connect(&[etcd_server.endpoint()], DEFAULT_ROOT).await?);
    let etcd = run(etcd, &args).await.context("etcd")?;

    println!(
        "store benchmark: {} objects of {} bytes, {} clients, {} watchers",
        args.objects, args.value_size, args.clients, args.watchers
    );
    println!(
        "sqlite = default durability (kill -9 safe), sqlite-fsync = power-loss safe; \
         ratio = how many times better sqlite (default) is than etcd"
    );
    println!(
        "{:<24} {:>12} {:>14} {:>12} {:>8}",
        "", "sqlite", "sqlite-fsync", "etcd", "ratio"
    );
    let rate = |r: &Report| format!("{:.0}", r.creates_per_sec);
    println!(
        "{:<24} {:>12} {:>14} {:>12} {:>7.2}x",
        "creates/s",
        rate(&sqlite),
        rate(&sqlite_fsync),
        rate(&etcd),
        sqlite.creates_per_sec / etcd.creates_per_sec
    );
    let latency_row = |name: &str, pick: fn(&Report) -> Duration| {
        let better = pick(&etcd).as_secs_f64() / pick(&sqlite).as_secs_f64().max(1e-9);
        println!(
            "{name:<24} {:>12} {:>14} {:>12} {better:>7.2}x",
            ms(pick(&sqlite)),
            ms(pick(&sqlite_fsync)),
            ms(pick(&etcd)),
        );
    };
    latency_row(&format!("list {} (median)", args.objects), |r| r.list_all);
    latency_row("write-to-watch p50", |r| r.watch_p50);
    latency_row("write-to-watch p99", |r| r.watch_p99);
    let ratio = sqlite.creates_per_sec / etcd.creates_per_sec;
    println!(
        "target sqlite creates >= 2x etcd: {} ({ratio:.2}x)",
        if ratio >= 2.0 { "met" } else { "MISSED" }
    );

    let report = |r: &Report| {
        serde_json::json!({
            "creates_per_sec": r.creates_per_sec,
            "list_all_ms": millis(r.list_all),
            "watch_p50_ms": millis(r.watch_p50),
            "watch_p99_ms": millis(r.watch_p99),
        })
    };
    let doc = serde_json::json!({
        "benchmark": "store",
        "objects": args.objects,
        "value_size": args.value_size,
        "clients": args.clients,
        "watchers": args.watchers,
        "sqlite": report(&sqlite),
        "sqlite_fsync": report(&sqlite_fsync),
        "etcd": report(&etcd),
    });
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let peer = "etcd 3.4 store";
    let figures = [
        Figure::versus(
            &format!("creates ({} clients)", args.clients),
            "objects/s",
            sqlite.creates_per_sec,
            etcd.creates_per_sec,
            peer,
            Better::Higher,
        )
        .target(">= 2x etcd", ratio >= 2.0),
        Figure::versus(
            "creates, fsync every commit",
            "objects/s",
            sqlite_fsync.creates_per_sec,
            etcd.creates_per_sec,
            peer,
            Better::Higher,
        ),
        Figure::versus(
            &format!("list {} objects (median)", args.objects),
            "ms",
            millis(sqlite.list_all),
            millis(etcd.list_all),
            peer,
            Better::Lower,
        ),
        Figure::versus(
            "write-to-watch p50",
            "ms",
            millis(sqlite.watch_p50),
            millis(etcd.watch_p50),
            peer,
            Better::Lower,
        ),
        Figure::versus(
            &format!("write-to-watch p99 ({} watchers)", args.watchers),
            "ms",
            millis(sqlite.watch_p99),
            millis(etcd.watch_p99),
            peer,
            Better::Lower,
        ),
    ];
    ferrolet_bench::write_figures(&args.out, &figures)
        .with_context(|| format!("writing the figures beside {}", args.out.display()))?;
    Ok(())
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
