//! Service proxy benchmark: ferrolet's iptables syncs against `iptables-restore` of a
//! kube-proxy-shaped ruleset for the same Services, on the same backend, in the same run,
//! inside a network namespace the benchmark creates (the host's tables are never touched).
//!
//! Measured per backend (legacy and nf_tables):
//! - full sync on empty tables: ferrolet's first sync vs restoring kube-proxy's full ruleset
//!   (flushing: see `baseline`);
//! - full resync with the rules in place (the periodic full sync) vs restoring it again;
//! - one endpoint change: ferrolet's partial sync vs kube-proxy's partial restore (which
//!   always rewrites KUBE-SERVICES plus the changed Service's chains);
//! - the floor under any change at that table size: `iptables-restore --noflush` of one
//!   empty chain created and deleted (legacy reads and replaces the whole table blob in the
//!   kernel for it; nf_tables fetches and commits only the named chain), and for legacy the
//!   read alone (an empty `*nat` commit, which libiptc does not write back); and one rule
//!   added to a new chain, which is what any change to a Service's endpoints must at least do
//!   (nf_tables validates the whole table in the kernel when a rule is added);
//!
//! and the bytes each writes. Prints a Markdown table and writes JSON.

use std::collections::hash_map::DefaultHasher;
use std::fmt::Write as _;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferrolet::proxy::{
    BackendChoice, Change, HostExec, Iptables, MemoryRecorder, Proxier, ProxyConfig,
};
use ferrolet_bench::{Better, Figure};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(about = "ferrolet service proxy vs a kube-proxy-shaped iptables-restore")]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    services: usize,
    #[arg(long, default_value_t = 5)]
    endpoints: usize,
    /// How many single-endpoint changes to time (the median is reported).
    #[arg(long, default_value_t = 7)]
    changes: usize,
    /// legacy, nft or both.
    #[arg(long, default_value = "both")]
    backend: String,
    #[arg(long, default_value = "bench/out/proxy.json")]
    out: PathBuf,
    /// Leave the namespaces behind (named in the output) to inspect their rules.
    #[arg(long)]
    keep: bool,
}

const NODE: &str = "node-0";
const CLUSTER_CIDR: &str = "10.244.0.0/16";

fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 1)) + i as u32)
}

/// Endpoint `j` of Service `i`; `generation` moves it to another address.
fn endpoint_ip(i: usize, j: usize, per: usize, generation: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 244, 0, 1));
    let off = (i * per + j) as u32 + (generation as u32) * 7919 * 8;
    Ipv4Addr::from(base + off % 65_000)
}

fn service(i: usize) -> Change {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}")},
        "spec": {"clusterIP": cluster_ip(i).to_string(),
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }))
    .expect("static service");
    Change::ServiceUpserted(Box::new(svc))
}

fn slice(i: usize, ips: &[Ipv4Addr]) -> Change {
    let eps: Vec<_> = ips
        .iter()
        .enumerate()
        .map(|(j, ip)| {
            json!({"addresses": [ip.to_string()], "nodeName": format!("node-{}", (i + j) % 100),
                   "conditions": {"ready": true}})
        })
        .collect();
    let s: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("svc-{i}-abcde"),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }))
    .expect("static slice");
    Change::SliceUpserted(Box::new(s))
}

// ---- kube-proxy's shape -------------------------------------------------------------

fn kp_hash(s: &str) -> String {
    let mut h = DefaultHasher::new();
    s.hash(&mut h);
    format!("{:016X}", h.finish())
}

fn kp_svc(i: usize) -> String {
    format!("KUBE-SVC-{}", kp_hash(&format!("bench/svc-{i}:http/tcp")))
}

fn kp_sep(i: usize, ip: Ipv4Addr) -> String {
    format!(
        "KUBE-SEP-{}",
        kp_hash(&format!("bench/svc-{i}:http/tcp/{ip}:8080"))
    )
}

/// One Service's chains the way kube-proxy's iptables mode writes them.
fn kp_service(out_decl: &mut String, out_rules: &mut String, i: usize, ips: &[Ipv4Addr]) {
    let svc = kp_svc(i);
    let name = format!("bench/svc-{i}:http");
    let cip = cluster_ip(i);
    let _ = writeln!(out_decl, ":{svc} - [0:0]");
    let _ = writeln!(
        out_rules,
        "-A {svc} -m comment --comment \"{name} cluster IP\" -m tcp -p tcp -d {cip}/32 --dport 80 ! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ"
    );
    let n = ips.len();
    for (j, ip) in ips.iter().enumerate() {
        let sep = kp_sep(i, *ip);
        let _ = write!(
            out_rules,
            "-A {svc} -m comment --comment \"{name} -> {ip}:8080\""
        );
        if j + 1 < n {
            let _ = write!(
                out_rules,
                " -m statistic --mode random --probability {:.10}",
                1.0 / (n - j) as f64
            );
        }
        let _ = writeln!(out_rules, " -j {sep}");
        let _ = writeln!(out_decl, ":{sep} - [0:0]");
        let _ = writeln!(
            out_rules,
            "-A {sep} -m comment --comment {name} -s {ip}/32 -j KUBE-MARK-MASQ"
        );
        let _ = writeln!(
            out_rules,
            "-A {sep} -m comment --comment {name} -m tcp -p tcp -j DNAT --to-destination {ip}:8080"
        );
    }
}

fn kp_services_chain(out: &mut String, services: usize) {
    for i in 0..services {
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -m comment --comment \"bench/svc-{i}:http cluster IP\" -m tcp -p tcp -d {}/32 --dport 80 -j {}",
            cluster_ip(i),
            kp_svc(i)
        );
    }
    out.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
}

const KP_FILTER: &str = "*filter\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-FIREWALL - [0:0]\n:KUBE-FORWARD - [0:0]\n:KUBE-PROXY-FIREWALL - [0:0]\n\
-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n\
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n";

const KP_NAT_HEAD: &str = "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n";

const KP_NAT_FIXED: &str = "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n";

fn kp_full(services: usize, per: usize) -> String {
    let mut decl = String::new();
    let mut rules = String::new();
    for i in 0..services {
        let ips: Vec<_> = (0..per).map(|j| endpoint_ip(i, j, per, 0)).collect();
        kp_service(&mut decl, &mut rules, i, &ips);
    }
    let mut out = String::from(KP_FILTER);
    out.push_str(KP_NAT_HEAD);
    out.push_str(&decl);
    out.push_str(KP_NAT_FIXED);
    // kube-proxy hooks its chains into the built-in ones with separate iptables calls; the
    // flushing restore would drop those jumps, so they are part of the full payload. Without
    // them the kernel never walks the Services' chains when a rule is added (nf_tables
    // validates the table from its base chains), and every change looked cheaper than
    // kube-proxy's is.
    out.push_str(KP_NAT_HOOKS);
    kp_services_chain(&mut out, services);
    out.push_str(&rules);
    out.push_str("COMMIT\n");
    out
}

/// The jumps from the built-in nat chains to kube-proxy's.
const KP_NAT_HOOKS: &str = "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n";

/// kube-proxy's partial sync after Service `i`'s endpoint 0 moved from `old` to the new
/// address: the always-written chains plus the changed Service's chains, and the stale
/// endpoint chain deleted.
fn kp_partial(services: usize, i: usize, ips: &[Ipv4Addr], old: Ipv4Addr) -> String {
    let mut decl = String::new();
    let mut rules = String::new();
    kp_service(&mut decl, &mut rules, i, ips);
    let stale = kp_sep(i, old);
    let mut out = String::from(KP_FILTER);
    out.push_str(KP_NAT_HEAD);
    out.push_str(&decl);
    let _ = writeln!(out, ":{stale} - [0:0]");
    out.push_str(KP_NAT_FIXED);
    kp_services_chain(&mut out, services);
    out.push_str(&rules);
    let _ = writeln!(out, "-X {stale}");
    out.push_str("COMMIT\n");
    out
}

// ---- running ------------------------------------------------------------------------

struct Netns(String);

impl Netns {
    fn new(name: String) -> Result<Self> {
        run(&["ip", "netns", "add", &name])?;
        Ok(Self(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .with_context(|| format!("running {args:?}"))?;
    if !st.success() {
        bail!("{args:?} failed: {st}");
    }
    Ok(())
}

/// Runs `f` on a thread that has entered `ns`: the tools it starts inherit the namespace.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || -> Result<T> {
        let file = File::open(&path).with_context(|| format!("open {path}"))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?
}

/// Wall time and CPU time (this process plus the tools it waited for) of a span. On a busy
/// machine the CPU time is the steadier figure.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    wall: Duration,
    /// This process and the tools it waited for.
    cpu: Duration,
    /// The tools alone (`iptables-restore`, `conntrack`).
    tools: Duration,
}

fn cpu_of(who: nix::sys::resource::UsageWho) -> Duration {
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(u64::try_from(t.tv_sec()).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec()).unwrap_or(0))
    };
    nix::sys::resource::getrusage(who)
        .map(|u| tv(u.user_time()) + tv(u.system_time()))
        .unwrap_or_default()
}

/// (this thread, the children waited for). The benchmark's work runs on one thread; other
/// threads of the process are idle, but the thread figure keeps them out anyway.
fn cpu_now() -> (Duration, Duration) {
    use nix::sys::resource::UsageWho;
    (
        cpu_of(UsageWho::RUSAGE_THREAD),
        cpu_of(UsageWho::RUSAGE_CHILDREN),
    )
}

struct Clock(Instant, (Duration, Duration));

impl Clock {
    fn start() -> Self {
        Self(Instant::now(), cpu_now())
    }
    fn stop(&self) -> Cost {
        let (own, tools) = cpu_now();
        let tools = tools.saturating_sub(self.1.1);
        Cost {
            wall: self.0.elapsed(),
            cpu: own.saturating_sub(self.1.0) + tools,
            tools,
        }
    }
}

fn restore(tool: &str, payload: &str, noflush: bool) -> Result<Cost> {
    let start = Clock::start();
    let args: &[&str] = if noflush {
        &["-w", "5", "--noflush"]
    } else {
        &["-w", "5"]
    };
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {tool}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(payload.as_bytes())?;
    let out = child.wait_with_output()?;
    let took = start.stop();
    if !out.status.success() {
        bail!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

fn median(v: &[Cost]) -> Cost {
    let pick = |f: fn(&Cost) -> Duration| {
        let mut x: Vec<Duration> = v.iter().map(f).collect();
        x.sort();
        x.get(x.len() / 2).copied().unwrap_or_default()
    };
    Cost {
        wall: pick(|c| c.wall),
        cpu: pick(|c| c.cpu),
        tools: pick(|c| c.tools),
    }
}

/// The cheapest changes `tool` can make to the nat table as it stands: (create and delete
/// one empty chain, read the table without writing it, add one rule to a new chain), medians
/// of `n` runs.
fn floors(tool: &str, n: usize) -> Result<(Cost, Cost, Cost)> {
    const DROP_CHAIN: &str = "*nat\n:FERRO-BENCH-FLOOR - [0:0]\n-X FERRO-BENCH-FLOOR\nCOMMIT\n";
    let mut noop = Vec::new();
    let mut read = Vec::new();
    let mut rule = Vec::new();
    for _ in 0..n {
        noop.push(restore(tool, DROP_CHAIN, true)?);
        read.push(restore(tool, "*nat\nCOMMIT\n", true)?);
        rule.push(restore(
            tool,
            "*nat\n:FERRO-BENCH-FLOOR - [0:0]\n-A FERRO-BENCH-FLOOR -p tcp -j ACCEPT\nCOMMIT\n",
            true,
        )?);
        restore(tool, DROP_CHAIN, true)?;
    }
    Ok((median(&noop), median(&read), median(&rule)))
}

#[derive(Debug, Clone, Copy)]
struct Measure {
    ours: Cost,
    ours_bytes: usize,
    base: Cost,
    base_bytes: usize,
}

struct BackendResult {
    backend: &'static str,
    full: Measure,
    resync: Measure,
    change: Measure,
    /// One empty chain created and deleted, on ferrolet's table and on kube-proxy's.
    floor: Measure,
    /// An empty nat commit (legacy: the table read alone).
    read: Measure,
    /// One rule added to a new chain.
    rule: Measure,
}

const FLOOR_RUNS: usize = 7;

type Ours = (Measure, Measure, Measure, Measure, Measure, Measure);

fn ours(args: &Args, choice: BackendChoice, tool: &'static str, ns: &str) -> Result<Ours> {
    let (services, per, changes) = (args.services, args.endpoints, args.changes);
    in_netns(ns, move || {
        let exec = Arc::new(HostExec::new());
        let ipt = Iptables::detect(exec.clone(), choice)?;
        let mut cfg = ProxyConfig::new(NODE);
        cfg.service_cidrs = vec!["10.96.0.0/12".parse()?];
        cfg.cluster_cidr = Some(CLUSTER_CIDR.parse()?);
        let mut p = Proxier::new(cfg, ipt, exec, Arc::new(MemoryRecorder::new()));
        for i in 0..services {
            p.apply(service(i));
            let ips: Vec<_> = (0..per).map(|j| endpoint_ip(i, j, per, 0)).collect();
            p.apply(slice(i, &ips));
        }
        let start = Clock::start();
        let r = p.sync()?;
        let full = (start.stop(), r.bytes);

        p.request_full_sync();
        let start = Clock::start();
        let r = p.sync()?;
        let resync = (start.stop(), r.bytes);

        let mut times = Vec::new();
        let mut bytes = 0;
        for c in 0..changes {
            let i = (c * 1_237) % services;
            let mut ips: Vec<_> = (0..per).map(|j| endpoint_ip(i, j, per, 0)).collect();
            ips[0] = endpoint_ip(i, 0, per, c + 1);
            let start = Clock::start();
            p.apply(slice(i, &ips));
            let r = p.sync()?;
            times.push(start.stop());
            if r.full {
                bail!("an endpoint change ran a full sync");
            }
            bytes = r.bytes;
        }
        let (floor, read, rule) = floors(tool, FLOOR_RUNS)?;
        Ok((full, resync, (median(&times), bytes), floor, read, rule))
    })
    .map(|(full, resync, change, floor, read, rule)| {
        let m = |(t, b): (Cost, usize)| Measure {
            ours: t,
            ours_bytes: b,
            base: Cost::default(),
            base_bytes: 0,
        };
        (
            m(full),
            m(resync),
            m(change),
            m((floor, 0)),
            m((read, 0)),
            m((rule, 0)),
        )
    })
}

fn baseline(args: &Args, tool: &'static str, ns: &str) -> Result<[(Cost, usize); 6]> {
    let (services, per, changes) = (args.services, args.endpoints, args.changes);
    in_netns(ns, move || {
        let full = kp_full(services, per);
        // Flushing restores: kube-proxy passes --noflush, but iptables-nft-restore 1.8.9
        // is quadratic in the chains of a --noflush payload (1,000 kube-proxy-shaped
        // Services: 6.3 s; 2,000: 42 s), so the baseline takes the faster, flushing path.
        // The namespace holds nothing else, so flushing loses nothing.
        let t_full = restore(tool, &full, false)?;
        let t_resync = restore(tool, &full, false)?;
        let mut times = Vec::new();
        let mut bytes = 0;
        for c in 0..changes {
            let i = (c * 1_237) % services;
            let mut ips: Vec<_> = (0..per).map(|j| endpoint_ip(i, j, per, 0)).collect();
            let old = ips[0];
            ips[0] = endpoint_ip(i, 0, per, c + 1);
            let payload = kp_partial(services, i, &ips, old);
            times.push(restore(tool, &payload, true)?);
            bytes = payload.len();
            // Put the Service back so the next change starts from the full ruleset.
            let mut back = ips.clone();
            back[0] = old;
            restore(tool, &kp_partial(services, i, &back, ips[0]), true)?;
        }
        let (floor, read, rule) = floors(tool, FLOOR_RUNS)?;
        Ok([
            (t_full, full.len()),
            (t_resync, full.len()),
            (median(&times), bytes),
            (floor, 0),
            (read, 0),
            (rule, 0),
        ])
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("the proxy benchmark creates network namespaces and must run as root");
    }
    let backends: Vec<(&'static str, BackendChoice, &'static str)> = match args.backend.as_str() {
        "legacy" => vec![("legacy", BackendChoice::Legacy, "iptables-legacy-restore")],
        "nft" => vec![("nf_tables", BackendChoice::Nft, "iptables-nft-restore")],
        "both" => vec![
            ("legacy", BackendChoice::Legacy, "iptables-legacy-restore"),
            ("nf_tables", BackendChoice::Nft, "iptables-nft-restore"),
        ],
        other => bail!("--backend must be legacy, nft or both, not {other:?}"),
    };
    let load_start = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut results = Vec::new();
    for (label, choice, tool) in backends {
        eprintln!(
            "{label}: ferrolet, {} services x {} endpoints",
            args.services, args.endpoints
        );
        let ns = Netns::new(format!("fbench-proxy-{}-{label}-ours", std::process::id()))?;
        let (mut full, mut resync, mut change, mut floor, mut read, mut rule) =
            ours(&args, choice, tool, &ns.0)?;
        if args.keep {
            eprintln!("{label}: keeping namespace {}", ns.0);
            std::mem::forget(ns);
        } else {
            drop(ns);
        }
        eprintln!("{label}: kube-proxy-shaped baseline");
        let ns = Netns::new(format!("fbench-proxy-{}-{label}-kp", std::process::id()))?;
        let [bf, br, bc, bfl, brd, bru] = baseline(&args, tool, &ns.0)?;
        if args.keep {
            eprintln!("{label}: keeping namespace {}", ns.0);
            std::mem::forget(ns);
        } else {
            drop(ns);
        }
        for (m, (t, b)) in [
            (&mut full, bf),
            (&mut resync, br),
            (&mut change, bc),
            (&mut floor, bfl),
            (&mut read, brd),
            (&mut rule, bru),
        ] {
            m.base = t;
            m.base_bytes = b;
        }
        results.push(BackendResult {
            backend: label,
            full,
            resync,
            change,
            floor,
            read,
            rule,
        });
    }

    println!(
        "\n### Service proxy: {} Services x {} endpoints\n",
        args.services, args.endpoints
    );
    println!(
        "| backend | operation | ferrolet wall | baseline wall | wall speedup | ferrolet CPU | baseline CPU | CPU speedup | ferrolet bytes | baseline bytes |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut json_rows = Vec::new();
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    for r in &results {
        for (op, m) in [
            ("full sync (empty tables)", r.full),
            ("full resync (rules in place)", r.resync),
            ("one endpoint change", r.change),
            ("floor: one empty chain created and deleted", r.floor),
            ("floor: empty nat commit (table read)", r.read),
            ("floor: one rule added to a new chain", r.rule),
        ] {
            let wall = ratio(m.base.wall, m.ours.wall);
            let cpu = ratio(m.base.cpu, m.ours.cpu);
            println!(
                "| {} | {op} | {:.1} ms | {:.1} ms | {wall:.2}x | {:.1} ms | {:.1} ms | {cpu:.2}x | {} | {} |",
                r.backend,
                ms(m.ours.wall),
                ms(m.base.wall),
                ms(m.ours.cpu),
                ms(m.base.cpu),
                m.ours_bytes,
                m.base_bytes
            );
            json_rows.push(json!({
                "backend": r.backend, "operation": op,
                "ferrolet_ms": ms(m.ours.wall), "baseline_ms": ms(m.base.wall), "speedup": wall,
                "ferrolet_cpu_ms": ms(m.ours.cpu), "baseline_cpu_ms": ms(m.base.cpu), "cpu_speedup": cpu,
                "ferrolet_bytes": m.ours_bytes, "baseline_bytes": m.base_bytes,
                "ferrolet_tool_cpu_ms": ms(m.ours.tools), "baseline_tool_cpu_ms": ms(m.base.tools),
            }));
        }
    }
    println!();
    for r in &results {
        let c = r.change.ours;
        println!(
            "{}: one endpoint change: {:.1} ms wall, {:.1} ms CPU = {:.1} ms ferrolet + {:.1} ms iptables-restore; the floor of any change at this table size is {:.1} ms wall, {:.1} ms CPU, and of adding one rule {:.1} ms wall, {:.1} ms CPU",
            r.backend,
            ms(c.wall),
            ms(c.cpu),
            ms(c.cpu.saturating_sub(c.tools)),
            ms(c.tools),
            ms(r.floor.ours.wall),
            ms(r.floor.ours.cpu),
            ms(r.rule.ours.wall),
            ms(r.rule.ours.cpu),
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    let start: Vec<&str> = load_start.split_whitespace().take(3).collect();
    println!(
        "\nload average (1, 5, 15 min) at the start of the run: {}; at the end: {} (2 cores)",
        start.join(" "),
        load.join(" ")
    );
    let doc = json!({
        "benchmark": "proxy",
        "loadavg": load,
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "endpoint_changes_timed": args.changes,
        "results": json_rows,
    });
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("write {}", args.out.display()))?;
    let mut figures = Vec::new();
    for r in &results {
        let b = r.backend;
        let peer = format!("iptables-restore of kube-proxy's rules ({b})");
        let scale = format!("{}x{}", args.services, args.endpoints);
        let full = Figure::versus(
            &format!("{b}: full sync, {scale} (empty tables)"),
            "ms",
            ms(r.full.ours.wall),
            ms(r.full.base.wall),
            &peer,
            Better::Lower,
        );
        let full_ratio = ratio(r.full.base.wall, r.full.ours.wall);
        figures.push(full.target(">= 2x faster", full_ratio >= 2.0));
        figures.push(Figure::versus(
            &format!("{b}: full sync CPU"),
            "ms",
            ms(r.full.ours.cpu),
            ms(r.full.base.cpu),
            &peer,
            Better::Lower,
        ));
        figures.push(Figure::versus(
            &format!("{b}: full resync (rules in place)"),
            "ms",
            ms(r.resync.ours.wall),
            ms(r.resync.base.wall),
            &peer,
            Better::Lower,
        ));
        figures.push(
            Figure::versus(
                &format!("{b}: one endpoint change"),
                "ms",
                ms(r.change.ours.wall),
                ms(r.change.base.wall),
                &peer,
                Better::Lower,
            )
            .target("< 50 ms", r.change.ours.wall < Duration::from_millis(50)),
        );
        // What iptables-restore and the kernel take to add any one rule at this table size
        // (measured on ferrolet's table): below it no endpoint change can go.
        figures.push(Figure::versus(
            &format!("{b}: floor, one rule added to a new chain"),
            "ms",
            ms(r.rule.ours.wall),
            ms(r.rule.base.wall),
            &peer,
            Better::Lower,
        ));
    }
    ferrolet_bench::write_figures(&args.out, &figures)
        .with_context(|| format!("write the figures beside {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
