//! Fixtures for the privileged runtime tests: a throwaway busybox root filesystem, a runtime
//! root in a temp dir, and a cgroup parent `ferrolet-test-<pid>-<n>` removed afterwards.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrolet_shim::cgroups::CgroupDriver;
use ferrolet_shim::container::{ContainerConfig, Runtime, defaults};
use ferrolet_shim::mounts::RootfsSource;
use oci_spec::runtime::Spec;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root (namespaces, mounts, cgroups); run it as root"
    );
}

/// Polls `cond` until it holds or `secs` pass; panics with `what` on timeout.
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A root filesystem with busybox and its applets, `/etc/passwd` and `/etc/group`.
pub fn busybox_rootfs(dir: &Path) {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let out = std::process::Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        if applet != "busybox" {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
        }
    }
    for d in ["etc", "tmp", "proc", "sys", "dev", "root", "home/www"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nwww:x:1000:1001:www:/home/www:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\nwww:x:1001:\nextra:x:2000:www\n",
    )
    .unwrap();
}

/// v1 controller directories a container cgroup can appear in.
const V1_CONTROLLERS: [&str; 7] = [
    "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
];

/// Removes a cgroup tree in every v1 controller, deepest first, killing what runs in it.
fn remove_cgroup_tree(name: &str) {
    for c in V1_CONTROLLERS {
        let top = Path::new("/sys/fs/cgroup").join(c).join(name);
        if top.exists() {
            remove_dir_tree(&top);
        }
    }
}

fn remove_dir_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_dir_tree(&e.path());
            }
        }
    }
    for _ in 0..500 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines().filter_map(|l| l.parse::<i32>().ok()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every test's world: runtime root, busybox rootfs, cgroup parent; all removed on drop.
pub struct Fixture {
    pub tmp: tempfile::TempDir,
    pub rt: Runtime,
    pub cgroup_parent: String,
    pub rootfs: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        require_root();
        let tmp = tempfile::tempdir().unwrap();
        let rootfs = tmp.path().join("busybox");
        busybox_rootfs(&rootfs);
        let rt = Runtime::new(
            tmp.path().join("state"),
            env!("CARGO_BIN_EXE_ferrolet-shim"),
            CgroupDriver::detect(),
        )
        .unwrap();
        Fixture {
            tmp,
            rt,
            cgroup_parent: unique("ferrolet-test"),
            rootfs,
        }
    }

    pub fn cgroup_path(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_parent)
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.tmp.path().join("logs").join(format!("{id}.log"))
    }

    /// The base spec with a hostname, this fixture's cgroup and `args`.
    pub fn spec(&self, id: &str, args: &[&str]) -> Spec {
        let args: Vec<String> = args.iter().map(|s| (*s).to_string()).collect();
        let mut v = serde_json::to_value(defaults::base_spec(&args)).unwrap();
        v["hostname"] = serde_json::json!(format!("host-{id}"));
        v["linux"]["cgroupsPath"] = serde_json::json!(self.cgroup_path(id));
        serde_json::from_value(v).unwrap()
    }

    pub fn config(&self, id: &str, spec: Spec) -> ContainerConfig {
        ContainerConfig {
            id: id.to_string(),
            spec,
            rootfs: RootfsSource::Dir(self.rootfs.clone()),
            log_path: Some(self.log_path(id)),
            user: None,
        }
    }

    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.log_path(id)).unwrap_or_default()
    }

    /// Mount table lines of this process that mention the fixture's directory.
    pub fn host_mounts(&self) -> Vec<String> {
        let root = self.tmp.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&root))
            .map(str::to_string)
            .collect()
    }

    /// Processes (other than this one) whose command line mentions the fixture's directory:
    /// monitors and anything they left.
    pub fn fixture_processes(&self) -> Vec<u32> {
        let root = self.tmp.path().to_string_lossy().into_owned();
        let me = std::process::id();
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| *pid != me)
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&root))
            })
            .collect()
    }

    pub fn v1_cgroup_file(&self, controller: &str, id: &str, file: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(self.cgroup_path(id))
            .join(file)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(ids) = self.rt.list() {
            for id in ids {
                let _ = self.rt.delete(&id, true);
            }
        }
        remove_cgroup_tree(&self.cgroup_parent);
    }
}

/// Parses one CRI log record into (timestamp, stream, tag, content).
pub fn parse_record(line: &str) -> (String, String, String, String) {
    let mut it = line.splitn(4, ' ');
    let ts = it.next().unwrap_or_default().to_string();
    let stream = it.next().unwrap_or_default().to_string();
    let tag = it.next().unwrap_or_default().to_string();
    let content = it.next().unwrap_or_default().to_string();
    (ts, stream, tag, content)
}
