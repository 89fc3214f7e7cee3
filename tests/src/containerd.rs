//! A private containerd for tests: its own config, socket, root and state under a temp dir,
//! so a test never touches the host's containerd (if any) and cleans up after itself.
//!
//! The CRI plugin runs with `restrict_oom_score_adj = true` because processes on these hosts
//! cannot lower their `oom_score_adj`.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::mounts::unmount_below;
use crate::wait::poll_until;

/// Threads that stop a daemon's leftover tasks at once when it is dropped.
const STOP_THREADS: usize = 8;

/// How long one `ctr` command may run.
pub const CTR_DEADLINE: Duration = Duration::from_secs(120);

/// A running containerd owned by one test. Dropping it stops its tasks, the daemon and its
/// shims, unmounts what it mounted and removes its directory.
#[derive(Debug)]
pub struct Containerd {
    /// The gRPC socket (CRI and containerd's own API).
    pub socket: PathBuf,
    /// Everything of this instance lives under here.
    pub root: PathBuf,
    /// Where the daemon's own log goes; printed when start fails.
    pub log: PathBuf,
    /// containerd's `state` directory, when it is not under `root`.
    state: Option<PathBuf>,
    child: Option<Child>,
}

impl Containerd {
    /// Starts containerd and waits until its API answers.
    pub fn start() -> anyhow::Result<Containerd> {
        Containerd::start_with_state(None)
    }

    /// Like [`Containerd::start`], with containerd's volatile `state` directory at `state`
    /// (on a host that is `/run/containerd`, a tmpfs) instead of under its private root.
    pub fn start_with_state(state: Option<PathBuf>) -> anyhow::Result<Containerd> {
        let root = crate::unique_temp_dir("containerd")?;
        let socket = root.join("containerd.sock");
        let log = root.join("containerd.log");
        let config = root.join("config.toml");
        fs::create_dir_all(root.join("cni/net.d"))?;
        let state_dir = state.clone().unwrap_or_else(|| root.join("state"));
        fs::write(&config, config_toml(&root, &state_dir, &socket))?;
        let log_file = fs::File::create(&log)?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting containerd (is the Debian package `containerd` installed?)")?;
        let mut me = Containerd {
            socket,
            root,
            log,
            state,
            child: Some(child),
        };
        let ready = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            me.socket.exists() && me.ctr(&["version"]).is_ok_and(|o| o.status.success())
        });
        if !ready {
            let log = fs::read_to_string(&me.log).unwrap_or_default();
            bail!(
                "containerd did not answer on {} within 30s; its log:\n{log}",
                me.socket.display()
            );
        }
        if let Some(child) = me.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            bail!("containerd exited early with {status}");
        }
        Ok(me)
    }

    /// The daemon's process id (for benchmarks that account its CPU and memory).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Runs `ctr --address <socket> -n k8s.io ARGS` and returns its output (whatever its
    /// status). A ctr that is still running after [`CTR_DEADLINE`] is killed and reported as an
    /// error, so a hung command fails its test instead of blocking the run.
    pub fn ctr(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.socket)
            .args(["-n", "k8s.io"])
            .args(args);
        crate::process::output_within(&mut cmd, CTR_DEADLINE)
            .with_context(|| format!("ctr {}", args.join(" ")))
    }

    /// Like [`Containerd::ctr`] but fails, with ctr's stderr, unless it exits 0; returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.ctr(args)?;
        if !out.status.success() {
            bail!(
                "ctr {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn stop_tasks(&self) {
        let Ok(list) = self.ctr_ok(&["tasks", "ls", "-q"]) else {
            return;
        };
        let ids: Vec<&str> = list
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        // A node with a hundred pods has two hundred tasks: one at a time, each ctr call
        // waiting on the others' teardown, took minutes. A few threads share the list.
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..ids.len().min(STOP_THREADS) {
                s.spawn(|| {
                    while let Some(id) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                        self.stop_task(id);
                    }
                });
            }
        });
    }

    fn stop_task(&self, id: &str) {
        let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        let _ = poll_until(Duration::from_secs(5), Duration::from_millis(20), || {
            self.ctr(&["tasks", "delete", id])
                .map_or(true, |o| o.status.success())
        });
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop_tasks();
        if let Some(mut child) = self.child.take() {
            let _ = nix_kill(child.id(), libc::SIGTERM);
            let stopped = poll_until(Duration::from_secs(10), Duration::from_millis(20), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !stopped {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        kill_processes_mentioning(&self.socket);
        unmount_below(&self.root);
        let _ = fs::remove_dir_all(&self.root);
        if let Some(state) = &self.state {
            unmount_below(state);
            let _ = fs::remove_dir_all(state);
        }
    }
}

fn config_toml(root: &Path, state: &Path, socket: &Path) -> String {
    let r = root.display();
    let st = state.display();
    let mut s = String::new();
    let _ = write!(
        s,
        r#"version = 2
root = "{r}/root"
state = "{st}"

[grpc]
  address = "{sock}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{r}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  # Pod network namespaces under the daemon's own state dir, not /run/netns: a test that
  # dies leaves nothing in the host's mount table when its dir is unmounted.
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{r}/cni/net.d"
"#,
        sock = socket.display()
    );
    s
}

fn nix_kill(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// containerd's shims daemonize away from the test, but carry the daemon's socket path on their
/// command line; find and kill them so no process outlives the test.
fn kill_processes_mentioning(socket: &Path) {
    let needle = socket.as_os_str().as_encoded_bytes();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut found = false;
        if let Ok(entries) = fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                    continue;
                };
                let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                    continue;
                };
                if cmdline.windows(needle.len()).any(|w| w == needle) {
                    found = true;
                    let _ = nix_kill(pid, libc::SIGKILL);
                }
            }
        }
        if !found || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
