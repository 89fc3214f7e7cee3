//! Helpers for the privileged tests: namespaces the test owns, plugin invocation
//! inside a test-owned "host" namespace, and leak checks. Everything is removed on drop.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique across tests, processes and helpers running at the same time.
pub fn unique(tag: &str) -> String {
    format!(
        "{tag}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Fails the test (never passes silently) when not root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    );
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Ns {
    pub name: String,
    pub path: PathBuf,
}

impl Ns {
    pub fn new(tag: &str) -> Self {
        require_root();
        let name = unique(&format!("fc{tag}"));
        sh(&["ip", "netns", "add", &name]);
        let ns = Self {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Runs a command in this namespace; panics on failure.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs a command in this namespace; returns (success, stdout+stderr).
    pub fn try_exec(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("running ip netns exec");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// Runs `f` on a thread inside this namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = File::open(&self.path).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                f()
            })
            .join()
            .unwrap()
        })
    }

    /// Names of the links in this namespace.
    pub fn links(&self) -> Vec<String> {
        self.exec(&["ip", "-o", "link", "show"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    /// `iptables-save`/`ip6tables-save` of the nat table.
    pub fn nat_rules(&self, v6: bool) -> String {
        let save = if v6 {
            "ip6tables-save"
        } else {
            "iptables-save"
        };
        self.exec(&[save, "-t", "nat"])
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawning command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Our plugin binaries.
pub fn ours(name: &str) -> PathBuf {
    match name {
        "bridge" => PathBuf::from(env!("CARGO_BIN_EXE_bridge")),
        "host-local" => PathBuf::from(env!("CARGO_BIN_EXE_host-local")),
        "loopback" => PathBuf::from(env!("CARGO_BIN_EXE_loopback")),
        "portmap" => PathBuf::from(env!("CARGO_BIN_EXE_portmap")),
        other => panic!("no plugin {other}"),
    }
}

pub const REFERENCE_DIR: &str = "/usr/lib/cni";

/// A CNI_PATH directory whose plugins are symlinks to chosen binaries.
pub struct PluginDir {
    pub dir: tempfile::TempDir,
}

impl PluginDir {
    pub fn ours() -> Self {
        Self::with(&[
            ("bridge", ours("bridge")),
            ("host-local", ours("host-local")),
            ("loopback", ours("loopback")),
            ("portmap", ours("portmap")),
        ])
    }

    pub fn with(entries: &[(&str, PathBuf)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        for (name, target) in entries {
            std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap();
        }
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// One plugin invocation's outcome.
#[derive(Debug)]
pub struct Answer {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?} / {}",
                self.stdout, self.stderr
            )
        })
    }

    /// Asserts success and returns the parsed stdout (or Null when empty).
    pub fn ok(&self) -> Value {
        assert!(
            self.success,
            "plugin failed: {} {}",
            self.stdout, self.stderr
        );
        if self.stdout.trim().is_empty() {
            Value::Null
        } else {
            self.json()
        }
    }

    /// Asserts a CNI error object with `code` and a non-zero exit; returns the object.
    pub fn err(&self, code: u64) -> Value {
        assert!(
            !self.success,
            "expected failure with code {code}, got success: {}",
            self.stdout
        );
        let v = self.json();
        assert_eq!(
            v["code"], code,
            "unexpected error object: {v} (stderr {})",
            self.stderr
        );
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error without msg: {v}"
        );
        assert!(v["cniVersion"].is_string(), "error without cniVersion: {v}");
        v
    }
}

/// The `CNI_*` parameters of one invocation.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: Option<&'a Path>,
    pub ifname: &'a str,
    pub cni_path: &'a Path,
    pub args: Option<&'a str>,
}

impl<'a> Call<'a> {
    pub fn new(
        command: &'a str,
        container_id: &'a str,
        netns: Option<&'a Path>,
        cni_path: &'a Path,
    ) -> Self {
        Self {
            command,
            container_id,
            netns,
            ifname: "eth0",
            cni_path,
            args: None,
        }
    }
}

/// Runs `bin` with the call's environment and `stdin`, inside namespace `host`.
pub fn invoke_raw(bin: &Path, host: &Ns, call: &Call<'_>, stdin: &[u8]) -> Answer {
    let host_fd = File::open(&host.path).unwrap();
    let raw = host_fd.as_raw_fd();
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_PATH", call.cni_path);
    if let Some(ns) = call.netns {
        cmd.env("CNI_NETNS", ns);
    }
    if let Some(a) = call.args {
        cmd.env("CNI_ARGS", a);
    }
    // SAFETY: only the async-signal-safe setns(2) runs between fork and exec, on an fd
    // that stays open in the parent until the child has been spawned.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    drop(host_fd);
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Answer {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn invoke(bin: &Path, host: &Ns, call: &Call<'_>, conf: &Value) -> Answer {
    invoke_raw(bin, host, call, conf.to_string().as_bytes())
}

/// A bridge + host-local configuration with a unique network and bridge name.
pub struct Net {
    pub name: String,
    pub bridge: String,
    pub data: tempfile::TempDir,
}

impl Net {
    pub fn new() -> Self {
        Self {
            name: unique("net"),
            bridge: unique("br"),
            data: tempfile::tempdir().unwrap(),
        }
    }

    /// `ranges` is the host-local `ranges` value.
    pub fn conf(&self, version: &str, ranges: Value) -> Value {
        serde_json::json!({
            "cniVersion": version,
            "name": self.name,
            "type": "bridge",
            "bridge": self.bridge,
            "isGateway": true,
            "ipam": {
                "type": "host-local",
                "dataDir": self.data.path(),
                "ranges": ranges,
            }
        })
    }

    pub fn v4(&self, subnet: &str) -> Value {
        self.conf("1.0.0", serde_json::json!([[{ "subnet": subnet }]]))
    }

    pub fn store(&self) -> PathBuf {
        self.data.path().join(&self.name)
    }

    /// IP files in the host-local store.
    pub fn allocated(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.store()) else {
            return Vec::new();
        };
        let mut v: Vec<String> = rd
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
            .collect();
        v.sort();
        v
    }

    /// Asserts the store's lock file is not held by anyone.
    pub fn assert_unlocked(&self) {
        let path = self.store().join("lock");
        if !path.exists() {
            return;
        }
        let f = File::open(&path).unwrap();
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock);
        assert!(lock.is_ok(), "the host-local lock is still held");
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

/// Polls `f` until it returns `Some` or the deadline passes.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a veth whose name starts with "veth" exists in `ns`.
pub fn veths(ns: &Ns) -> Vec<String> {
    ns.links()
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .collect()
}
