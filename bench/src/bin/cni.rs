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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use ferrolet_bench::procfs::loadavg;
use ferrolet_bench::{Better, Figure};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "Benchmark bridge + host-local ADD/DEL: ferrolet vs reference CNI plugins")]
struct Args {
    /// Number of network namespaces (ADD+DEL samples) per implementation.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Directory with our `bridge` and `host-local` (default: next to this program).
    /// Give it more than once to compare builds (e.g. glibc and static musl).
    #[arg(long)]
    ours: Vec<PathBuf>,
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
    /// Where the plugins came from (shown in the report).
    dir: PathBuf,
    /// Where they run from: `dir`, or an installed copy of it.
    bin: PathBuf,
    conf: Value,
    _data: tempfile::TempDir,
    _installed: Option<tempfile::TempDir>,
}

impl Impl {
    /// With `install` (used for every implementation, so all are treated alike), the
    /// plugins are copied into a bin directory of their own and run from there, as a
    /// runtime runs installed plugins. Run straight out of a cargo
    /// target directory, the linker-written files measured up to 0.5 ms more CPU per
    /// ADD here (their page cache is laid out differently, so exec faults in more
    /// often), which would say something about cargo, not about the plugins.
    fn new(
        label: &'static str,
        dir: &Path,
        tag: &str,
        subnet: &str,
        install: bool,
    ) -> Result<Self> {
        for p in ["bridge", "host-local"] {
            ensure!(dir.join(p).exists(), "{} is missing", dir.join(p).display());
        }
        let installed = if install {
            let bin = tempfile::tempdir()?;
            for p in ["bridge", "host-local"] {
                std::fs::copy(dir.join(p), bin.path().join(p))
                    .with_context(|| format!("installing {}", dir.join(p).display()))?;
            }
            Some(bin)
        } else {
            None
        };
        let bin = installed
            .as_ref()
            .map_or_else(|| dir.to_path_buf(), |d| d.path().to_path_buf());
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
            bin,
            conf,
            _data: data,
            _installed: installed,
        })
    }

    /// Runs the bridge plugin; returns its wall time and the CPU time it and
    /// its IPAM child used (CPU time is steadier than wall time on a busy machine).
    fn invoke(&self, command: &str, id: &str, netns: &Path) -> Result<Sample> {
        let mut cmd = Command::new(self.bin.join("bridge"));
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &self.bin);
        timed(cmd, self.conf.to_string().as_bytes())
            .with_context(|| format!("{} {command}", self.label))
    }
}

/// Runs `cmd` with `stdin` in this thread's network namespace (the benchmark's host
/// namespace, see [`enter`]); fails unless it exits 0.
fn timed(mut cmd: Command, stdin: &[u8]) -> Result<Sample> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
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
fn ip_floor(command: &str, i: usize, netns: &Ns) -> Result<Sample> {
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
    timed(cmd, b"")
}

/// The start of a process that does nothing: what any plugin pays before its first
/// line of code (exec, dynamic loader, libc start-up).
fn exec_floor() -> Result<Sample> {
    timed(Command::new("/bin/true"), b"")
}

/// Moves the calling thread into network namespace `ns`.
///
/// The benchmark's main thread (a plain thread, no async runtime on it) enters the
/// host namespace once, so children inherit it and `Command` can start them with
/// posix_spawn (vfork), as container runtimes start plugins, instead of a fork with a
/// setns hook whose page-table copy would be billed to every plugin measured.
fn enter(ns: &File) -> Result<()> {
    // SAFETY: setns(2) on an open namespace fd; it changes only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "entering the benchmark's host namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// The kernel alone: the netlink requests our bridge plugin makes for one container,
/// sent from this already running process. ADD: the veth pair (host end attached to
/// a bridge and up, peer created inside the container namespace), then inside the
/// container a lookup of `eth0`, bringing it up and adding its address. DEL: deleting
/// `eth0` in the container (the host end goes with it). What is left of a plugin's
/// time above this is process start, parsing, IPAM and its own code.
struct KernelFloor {
    host: OwnedFd,
    bridge: i32,
    seq: u32,
}

/// A netlink route socket in the namespace of `ns`.
fn netlink_socket_in(ns: &File) -> Result<OwnedFd> {
    let fd = ns.as_raw_fd();
    // The socket belongs to the namespace it was created in, so a short-lived thread
    // enters the namespace, opens it, and leaves with the thread.
    std::thread::scope(|s| {
        s.spawn(|| -> Result<OwnedFd> {
            // SAFETY: setns on this dedicated thread only; `fd` stays open.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            // SAFETY: plain socket(2); the result is checked before use.
            let raw = unsafe {
                libc::socket(
                    libc::AF_NETLINK,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::NETLINK_ROUTE,
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error().into());
            }
            // SAFETY: `raw` is a fresh descriptor owned by nobody else.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("netlink socket thread panicked"))?
    })
}

impl Sample {
    fn plus(self, o: Sample) -> Sample {
        Sample {
            wall: self.wall + o.wall,
            cpu: self.cpu + o.cpu,
        }
    }
}

impl KernelFloor {
    fn new(host: &File, bridge: &str) -> Result<Self> {
        let mut me = Self {
            host: netlink_socket_in(host)?,
            bridge: 0,
            seq: 0,
        };
        let mut info = Vec::new();
        put_attr(&mut info, libc::IFLA_INFO_KIND, b"bridge");
        let mut body = ifinfomsg(0, true);
        put_attr(&mut body, libc::IFLA_IFNAME, &cstr(bridge.as_bytes()));
        put_attr(&mut body, libc::IFLA_LINKINFO, &info);
        let flags = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        let host = me.host.as_raw_fd();
        me.request(host, libc::RTM_NEWLINK, flags, &body, true)?;
        me.bridge = me.link_index(host, bridge)?.1;
        Ok(me)
    }

    /// Sends one request and reads the first answer: the ack (checked) when `ack`,
    /// else the reply message, returned.
    fn request(
        &mut self,
        sock: i32,
        msg_type: u16,
        flags: u16,
        body: &[u8],
        ack: bool,
    ) -> Result<(Sample, Vec<u8>)> {
        self.seq += 1;
        let len = 16 + body.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&u32::try_from(len)?.to_ne_bytes());
        msg.extend_from_slice(&msg_type.to_ne_bytes());
        let mut flags = flags | libc::NLM_F_REQUEST as u16;
        if ack {
            flags |= libc::NLM_F_ACK as u16;
        }
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        let cpu_before = thread_cpu();
        let start = Instant::now();
        // SAFETY: `msg` is a valid buffer of `msg.len()` bytes; the kernel handles a
        // netlink request within send(2), so the answer is queued when it returns.
        let sent = unsafe { libc::send(sock, msg.as_ptr().cast(), msg.len(), 0) };
        ensure!(
            sent >= 0,
            "netlink send: {}",
            std::io::Error::last_os_error()
        );
        let mut buf = vec![0u8; 16384];
        // SAFETY: `buf` is writable for its full length.
        let got = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
        let sample = Sample {
            wall: start.elapsed(),
            cpu: thread_cpu().saturating_sub(cpu_before),
        };
        ensure!(
            got >= 20,
            "netlink recv: {}",
            std::io::Error::last_os_error()
        );
        buf.truncate(usize::try_from(got)?);
        if u16::from_ne_bytes([buf[4], buf[5]]) == libc::NLMSG_ERROR as u16 {
            let err = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
            ensure!(
                err == 0,
                "netlink request {msg_type} failed: {}",
                std::io::Error::from_raw_os_error(-err)
            );
        }
        Ok((sample, buf))
    }

    /// RTM_GETLINK by name: the time it took and the link's index.
    fn link_index(&mut self, sock: i32, name: &str) -> Result<(Sample, i32)> {
        let mut body = ifinfomsg(0, false);
        put_attr(&mut body, libc::IFLA_IFNAME, &cstr(name.as_bytes()));
        let (s, reply) = self.request(sock, libc::RTM_GETLINK, 0, &body, false)?;
        ensure!(reply.len() >= 24, "short RTM_GETLINK answer for {name}");
        Ok((
            s,
            i32::from_ne_bytes([reply[20], reply[21], reply[22], reply[23]]),
        ))
    }

    /// The sockets and namespace files are opened outside the timed requests and
    /// closed again, so the benchmark holds no descriptor per namespace.
    fn add(&mut self, i: usize, ns: &Ns) -> Result<Sample> {
        let netns = File::open(&ns.path)?;
        let sock = netlink_socket_in(&netns)?;
        let csock = sock.as_raw_fd();
        let mut peer = ifinfomsg(0, false);
        put_attr(&mut peer, libc::IFLA_IFNAME, &cstr(b"eth0"));
        put_attr(
            &mut peer,
            libc::IFLA_NET_NS_FD,
            &netns.as_raw_fd().to_ne_bytes(),
        );
        let mut data = Vec::new();
        put_attr(&mut data, 1 /* VETH_INFO_PEER */, &peer);
        let mut info = Vec::new();
        put_attr(&mut info, libc::IFLA_INFO_KIND, b"veth");
        put_attr(&mut info, libc::IFLA_INFO_DATA, &data);
        let mut body = ifinfomsg(0, true);
        put_attr(
            &mut body,
            libc::IFLA_IFNAME,
            &cstr(format!("kf{i}").as_bytes()),
        );
        put_attr(&mut body, libc::IFLA_MASTER, &self.bridge.to_ne_bytes());
        put_attr(&mut body, libc::IFLA_LINKINFO, &info);
        let flags = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        let host = self.host.as_raw_fd();
        let (mut total, _) = self.request(host, libc::RTM_NEWLINK, flags, &body, true)?;
        let (s, index) = self.link_index(csock, "eth0")?;
        total = total.plus(s);
        let (s, _) = self.request(csock, libc::RTM_NEWLINK, 0, &ifinfomsg(index, true), true)?;
        total = total.plus(s);
        // struct ifaddrmsg: family, prefixlen, flags, scope, index.
        let mut addr = vec![libc::AF_INET as u8, 16, 0, 0];
        addr.extend_from_slice(&index.to_ne_bytes());
        let ip = [10u8, 99, u8::try_from(i / 250)?, u8::try_from(i % 250 + 2)?];
        put_attr(&mut addr, libc::IFA_LOCAL, &ip);
        put_attr(&mut addr, libc::IFA_ADDRESS, &ip);
        let (s, _) = self.request(csock, libc::RTM_NEWADDR, flags, &addr, true)?;
        Ok(total.plus(s))
    }

    fn del(&mut self, ns: &Ns) -> Result<Sample> {
        let sock = netlink_socket_in(&File::open(&ns.path)?)?;
        let mut body = ifinfomsg(0, false);
        put_attr(&mut body, libc::IFLA_IFNAME, &cstr(b"eth0"));
        Ok(self
            .request(sock.as_raw_fd(), libc::RTM_DELLINK, 0, &body, true)?
            .0)
    }
}

/// A `struct ifinfomsg` (16 bytes) for link `index`, optionally setting IFF_UP.
fn ifinfomsg(index: i32, up: bool) -> Vec<u8> {
    let mut m = vec![0u8; 4];
    m.extend_from_slice(&index.to_ne_bytes());
    let up = if up { libc::IFF_UP as u32 } else { 0 };
    m.extend_from_slice(&up.to_ne_bytes()); // ifi_flags
    m.extend_from_slice(&up.to_ne_bytes()); // ifi_change
    m
}

fn cstr(s: &[u8]) -> Vec<u8> {
    let mut v = s.to_vec();
    v.push(0);
    v
}

/// Appends one netlink attribute, padded to 4 bytes.
fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    while !buf.len().is_multiple_of(4) {
        buf.push(0);
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_THREAD)
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: Duration,
    cpu: Duration,
}

/// User plus system time of all reaped children so far.
fn children_cpu() -> Duration {
    rusage_cpu(libc::RUSAGE_CHILDREN)
}

fn rusage_cpu(who: libc::c_int) -> Duration {
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid `who` with a valid pointer to a rusage struct.
    if unsafe { libc::getrusage(who, &mut ru) } != 0 {
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

/// What one row of the report measures.
enum Subject<'a> {
    Plugin(&'a Impl),
    IpFloor,
    KernelFloor,
    ExecFloor,
}

impl Subject<'_> {
    fn label(&self) -> String {
        match self {
            Self::Plugin(im) => format!("{} ({})", im.label, im.dir.display()),
            Self::IpFloor => "floor: ip link add/del veth (process + kernel)".into(),
            Self::KernelFloor => {
                "floor: the same netlink requests from a running process (kernel only)".into()
            }
            Self::ExecFloor => "floor: exec /bin/true (process start only)".into(),
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the CNI benchmark needs root"
    );
    ensure!(args.count > 0, "--count must be at least 1");
    let mut ours_dirs = args.ours.clone();
    if ours_dirs.is_empty() {
        ours_dirs.push(
            std::env::current_exe()?
                .parent()
                .context("program has no directory")?
                .to_path_buf(),
        );
    }
    let tag = format!("{}", std::process::id() % 100_000);
    let mut impls = vec![Impl::new(
        "reference",
        &args.reference,
        &format!("r{tag}"),
        "10.91.0.0/16",
        true,
    )?];
    for (k, dir) in ours_dirs.iter().enumerate() {
        let dir = dir.canonicalize().with_context(|| {
            format!(
                "{}: build our plugins with cargo build --release -p ferrolet-cni",
                dir.display()
            )
        })?;
        impls.push(Impl::new(
            "ferrolet",
            &dir,
            &format!("o{k}x{tag}"),
            &format!("10.{}.0.0/16", 92 + k),
            true,
        )?);
    }
    let mut subjects: Vec<Subject> = impls.iter().map(Subject::Plugin).collect();
    subjects.extend([Subject::IpFloor, Subject::KernelFloor, Subject::ExecFloor]);

    let load_before = loadavg();
    eprintln!(
        "creating {} network namespaces (load average {load_before})...",
        subjects.len() * args.count + 2
    );
    let host_ns = Ns::new(format!("cnibench-h{tag}"))?;
    let host = File::open(&host_ns.path)?;
    let mut kernel = KernelFloor::new(&host, &format!("kfbr{tag}"))?;
    // One container namespace per sample and subject (the exec floor needs none, but
    // a uniform layout keeps the loop simple). No descriptors are kept open for them:
    // every child would copy and close them all at exec, hundreds of them, and that
    // cost would be billed to the plugins.
    let ctrs: Vec<Vec<Ns>> = (0..subjects.len())
        .map(|k| {
            (0..args.count)
                .map(|i| Ns::new(format!("cnibench-{tag}-{k}-{i}")))
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    let warm = Ns::new(format!("cnibench-w{tag}"))?;
    enter(&host)?;

    // Warm up page cache and the bridges (created by the first ADD) outside the timing.
    for im in &impls {
        for n in 0..3 {
            let id = format!("warm{n}");
            im.invoke("ADD", &id, &warm.path)?;
            im.invoke("DEL", &id, &warm.path)?;
        }
    }

    // Interleave subjects sample by sample so drifts in machine load hit all of them.
    let mut samples: Vec<[Vec<Sample>; 2]> = subjects.iter().map(|_| [vec![], vec![]]).collect();
    for (o, command) in ["ADD", "DEL"].into_iter().enumerate() {
        for i in 0..args.count {
            let id = format!("c{i}");
            for ((subject, set), out) in subjects.iter().zip(&ctrs).zip(&mut samples) {
                let ns = &set[i];
                let s = match subject {
                    Subject::Plugin(im) => im.invoke(command, &id, &ns.path)?,
                    Subject::IpFloor => ip_floor(command, i, ns)?,
                    Subject::KernelFloor if command == "ADD" => kernel.add(i, ns)?,
                    Subject::KernelFloor => kernel.del(ns)?,
                    Subject::ExecFloor => exec_floor()?,
                };
                out[o].push(s);
            }
        }
    }
    let load_after = loadavg();

    let nproc = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    println!(
        "CNI bridge + host-local (isGateway, no ipMasq), {} network namespaces, cniVersion 1.0.0",
        args.count
    );
    println!(
        "load average before {load_before}, after {load_after} ({nproc} CPUs); \
         CPU = user+sys of the plugin process and its children (getrusage), \
         for the kernel floor of this thread"
    );
    println!("speedup = reference / this row (for a floor: the best any plugin could reach)\n");
    println!("| op | time | implementation | p50 ms | p99 ms | speedup p50 | speedup p99 |");
    println!("|---|---|---|---|---|---|---|");
    let mut report = serde_json::Map::new();
    let mut figures = Vec::new();
    let peer = "reference plugins 1.1 (Go)";
    for (o, op) in ["ADD", "DEL"].into_iter().enumerate() {
        for kind in ["wall", "cpu"] {
            let st = |v: &[Sample]| {
                stats(
                    &v.iter()
                        .map(|x| if kind == "wall" { x.wall } else { x.cpu })
                        .collect::<Vec<_>>(),
                )
            };
            let reference = st(&samples[0][o]);
            // subjects[1] is our first build (the one beside this program by default).
            let ours = st(&samples[1][o]);
            let what = if kind == "wall" {
                op.to_owned()
            } else {
                format!("{op} CPU")
            };
            let p50 = Figure::versus(
                &format!("{what} p50"),
                "ms",
                ours.p50,
                reference.p50,
                peer,
                Better::Lower,
            );
            if kind == "wall" {
                figures.push(p50.target(">= 5x faster", reference.p50 / ours.p50 >= 5.0));
                figures.push(Figure::versus(
                    &format!("{what} p99"),
                    "ms",
                    ours.p99,
                    reference.p99,
                    peer,
                    Better::Lower,
                ));
            } else {
                figures.push(p50);
            }
            let mut rows = serde_json::Map::new();
            for (k, subject) in subjects.iter().enumerate() {
                let this = st(&samples[k][o]);
                let (s50, s99) = (reference.p50 / this.p50, reference.p99 / this.p99);
                println!(
                    "| {op} | {kind} | {} | {:.2} | {:.2} | {s50:.1}x | {s99:.1}x |",
                    subject.label(),
                    this.p50,
                    this.p99,
                );
                rows.insert(
                    subject.label(),
                    json!({"p50_ms": this.p50, "p99_ms": this.p99, "mean_ms": this.mean,
                           "speedup_p50": s50, "speedup_p99": s99}),
                );
            }
            report.insert(format!("{}_{kind}", op.to_lowercase()), Value::Object(rows));
        }
    }
    report.insert("benchmark".into(), json!("cni bridge+host-local"));
    report.insert("namespaces".into(), json!(args.count));
    report.insert("cni_version".into(), json!("1.0.0"));
    report.insert("ours".into(), json!(ours_dirs));
    report.insert("reference".into(), json!(args.reference));
    report.insert("loadavg_before".into(), json!(load_before));
    report.insert("loadavg_after".into(), json!(load_after));
    report.insert("cpus".into(), json!(nproc));
    let report = Value::Object(report);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    ferrolet_bench::write_figures(&args.out, &figures)
        .with_context(|| format!("writing the figures beside {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    drop(warm);
    drop(ctrs);
    drop(host_ns);
    Ok(())
}
