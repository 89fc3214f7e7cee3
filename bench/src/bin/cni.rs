//! CNI benchmark: ADD and DEL of bridge + host-local for N network namespaces, ours
//! against the reference plugins in the same run, on the same machine.
//!
//! Everything happens in namespaces this program creates: one "host" namespace where
//! the plugins run (so bridges, sysctls and addresses never touch the real host) and
//! one container namespace per sample and implementation. All are removed at the end.
//!
//! Build the plugins first: `cargo build --release -p ferrolet-cni -p ferrolet-bench`,
//! then run `target/release/cni` as root.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Benchmark bridge + host-local ADD/DEL: ferrolet vs reference CNI plugins")]
struct Args {
    /// Number of network namespaces (ADD+DEL samples) per implementation.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Directory with our `bridge` and `host-local` (default: next to this program).
    #[arg(long)]
    ours: Option<PathBuf>,
    /// Directory with the reference plugins.
    #[arg(long, default_value = "/usr/lib/cni")]
    reference: PathBuf,
    /// Where to write the JSON report.
    #[arg(long, default_value = "bench/out/cni.json")]
    out: PathBuf,
}

/// A named network namespace, deleted on drop.
struct Ns {
    name: String,
    path: PathBuf,
}

impl Ns {
    fn new(name: String) -> Result<Self> {
        run(&["ip", "netns", "add", &name])?;
        let path = PathBuf::from(format!("/run/netns/{name}"));
        Ok(Self { name, path })
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn run(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .with_context(|| format!("{args:?}"))?;
    ensure!(st.success(), "{args:?} failed: {st}");
    Ok(())
}

/// One implementation under test: a CNI_PATH with `bridge` and `host-local`.
struct Impl {
    label: &'static str,
    dir: PathBuf,
    conf: Value,
    _data: tempfile::TempDir,
}

impl Impl {
    fn new(label: &'static str, dir: &Path, tag: &str, subnet: &str) -> Result<Self> {
        for p in ["bridge", "host-local"] {
            ensure!(dir.join(p).exists(), "{} is missing", dir.join(p).display());
        }
        let data = tempfile::tempdir()?;
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": format!("bench-{tag}"),
            "type": "bridge",
            "bridge": format!("bbr-{tag}"),
            "isGateway": true,
            "ipam": {"type": "host-local", "dataDir": data.path(), "ranges": [[{"subnet": subnet}]]},
        });
        Ok(Self {
            label,
            dir: dir.to_path_buf(),
            conf,
            _data: data,
        })
    }

    /// Runs the bridge plugin in `host`; returns its wall time and the CPU time it and
    /// its IPAM child used (CPU time is steadier than wall time on a busy machine).
    fn invoke(&self, host: &File, command: &str, id: &str, netns: &Path) -> Result<Sample> {
        let mut cmd = Command::new(self.dir.join("bridge"));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.dir);
        timed(host, cmd, self.conf.to_string().as_bytes())
            .with_context(|| format!("{} {command}", self.label))
    }
}

/// Runs `cmd` inside namespace `host` with `stdin`; fails unless it exits 0.
fn timed(host: &File, mut cmd: Command, stdin: &[u8]) -> Result<Sample> {
    let fd = host.as_raw_fd();
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only the async-signal-safe setns(2) runs between fork and exec, on an
    // fd the parent keeps open until the child is spawned.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let cpu_before = children_cpu();
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    let wall = start.elapsed();
    let cpu = children_cpu().saturating_sub(cpu_before);
    if !out.status.success() {
        bail!(
            "failed: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Sample { wall, cpu })
}

/// The floor under any CNI plugin here: one `ip` process that creates (or deletes) a
/// veth pair with its peer in the container namespace, i.e. a program start plus the
/// kernel's own work, without addresses, routes or IPAM.
fn floor(host: &File, command: &str, i: usize, netns: &Ns) -> Result<Sample> {
    let mut cmd = Command::new("ip");
    if command == "ADD" {
        cmd.args([
            "link",
            "add",
            &format!("fl{i}"),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
        ])
        .args(["netns", &netns.name]);
    } else {
        cmd.args(["link", "del", &format!("fl{i}")]);
    }
    timed(host, cmd, b"")
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

/// User plus system time of all reaped children so far.
fn children_cpu() -> Duration {
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid pointer to a rusage struct.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
}

/// Nearest-rank percentiles in milliseconds.
fn stats(samples: &[Duration]) -> Stats {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let idx = ((p / 100.0) * ms.len() as f64).ceil() as usize;
        ms[idx.clamp(1, ms.len()) - 1]
    };
    Stats {
        p50: rank(50.0),
        p99: rank(99.0),
        mean: ms.iter().sum::<f64>() / ms.len() as f64,
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the CNI benchmark needs root"
    );
    ensure!(args.count > 0, "--count must be at least 1");
    let ours_dir = match args.ours {
        Some(d) => d,
        None => std::env::current_exe()?
            .parent()
            .context("program has no directory")?
            .to_path_buf(),
    };
    let ours_dir = ours_dir.canonicalize().with_context(|| {
        format!(
            "{}: build our plugins with cargo build --release -p ferrolet-cni",
            ours_dir.display()
        )
    })?;
    let tag = format!("{}", std::process::id() % 100_000);
    let impls = [
        Impl::new("ferrolet", &ours_dir, &format!("o{tag}"), "10.90.0.0/16")?,
        Impl::new(
            "reference",
            &args.reference,
            &format!("r{tag}"),
            "10.91.0.0/16",
        )?,
    ];

    eprintln!("creating {} network namespaces...", 3 * args.count + 2);
    let host_ns = Ns::new(format!("cnibench-h{tag}"))?;
    let host = File::open(&host_ns.path)?;
    let mut ctrs: Vec<Vec<Ns>> = Vec::new();
    for k in 0..3 {
        let set = (0..args.count)
            .map(|i| Ns::new(format!("cnibench-{tag}-{k}-{i}")))
            .collect::<Result<Vec<_>>>()?;
        ctrs.push(set);
    }
    let warm = Ns::new(format!("cnibench-w{tag}"))?;

    // Warm up page cache and the bridges (created by the first ADD) outside the timing.
    for im in &impls {
        for n in 0..3 {
            let id = format!("warm{n}");
            im.invoke(&host, "ADD", &id, &warm.path)?;
            im.invoke(&host, "DEL", &id, &warm.path)?;
        }
    }

    // Interleave implementations sample by sample so drifts in machine load hit both.
    let mut add: Vec<Vec<Sample>> = vec![Vec::new(), Vec::new(), Vec::new()];
    let mut del: Vec<Vec<Sample>> = vec![Vec::new(), Vec::new(), Vec::new()];
    for (command, samples) in [("ADD", &mut add), ("DEL", &mut del)] {
        for (i, ((a, b), c)) in ctrs[0].iter().zip(&ctrs[1]).zip(&ctrs[2]).enumerate() {
            let id = format!("c{i}");
            samples[0].push(impls[0].invoke(&host, command, &id, &a.path)?);
            samples[1].push(impls[1].invoke(&host, command, &id, &b.path)?);
            samples[2].push(floor(&host, command, i, c)?);
        }
    }

    let wall = |v: &[Sample]| stats(&v.iter().map(|x| x.wall).collect::<Vec<_>>());
    let cpu = |v: &[Sample]| stats(&v.iter().map(|x| x.cpu).collect::<Vec<_>>());
    println!(
        "CNI bridge + host-local, {} network namespaces, cniVersion 1.0.0\n",
        args.count
    );
    println!(
        "| op | ferrolet p50 | ferrolet p99 | reference p50 | reference p99 | speedup p50 | speedup p99 | ip(8) veth floor p50 |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut report = serde_json::Map::new();
    for (op, samples) in [("ADD", &add), ("DEL", &del)] {
        for (kind, f) in [
            ("wall", &wall as &dyn Fn(&[Sample]) -> Stats),
            ("cpu", &cpu),
        ] {
            let (o, r, fl) = (f(&samples[0]), f(&samples[1]), f(&samples[2]));
            println!(
                "| {op} {kind} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {:.1}x | {:.1}x | {:.2} ms |",
                o.p50,
                o.p99,
                r.p50,
                r.p99,
                r.p50 / o.p50,
                r.p99 / o.p99,
                fl.p50
            );
            let side = |st: Stats| json!({"p50_ms": st.p50, "p99_ms": st.p99, "mean_ms": st.mean});
            report.insert(
                format!("{}_{kind}", op.to_lowercase()),
                json!({"ferrolet": side(o), "reference": side(r), "ip_veth_floor": side(fl),
                       "speedup_p50": r.p50 / o.p50, "speedup_p99": r.p99 / o.p99}),
            );
        }
    }
    let mut load = String::new();
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        load = l.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
        println!("\nload average during the run: {load}");
    }
    report.insert("benchmark".into(), json!("cni bridge+host-local"));
    report.insert("namespaces".into(), json!(args.count));
    report.insert("cni_version".into(), json!("1.0.0"));
    report.insert("ours".into(), json!(ours_dir));
    report.insert("reference".into(), json!(args.reference));
    report.insert("loadavg".into(), json!(load));
    let report = Value::Object(report);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    drop(warm);
    drop(ctrs);
    drop(host_ns);
    Ok(())
}
