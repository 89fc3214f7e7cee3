//! The per-container monitor: a re-exec of the shim binary (`ferrolet-shim monitor DIR`)
//! that detaches from the shim, creates the container's init process as its child, copies
//! the container's stdout/stderr into the CRI log file and records the exit status.
//!
//! Because the monitor, not the shim, is the container's parent, the container keeps running
//! and its exit is recorded when the shim is killed or restarted. The monitor is
//! single-threaded and does no async work, which keeps it small and makes `clone` safe.

pub mod zygote;

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroups::CgroupDriver;
use crate::container::init::{self, InitFds};
use crate::container::plan::InitPlan;
use crate::logs::{LineSplitter, Stream, rfc3339_nano};
use crate::namespaces::{self, Kind};

/// File in the container's state dir with the monitor's instructions.
pub const CONFIG_FILE: &str = "init.json";
/// File in the container's state dir with the exit status, written once by the monitor.
pub const EXIT_FILE: &str = "exit.json";

/// Errors of the monitor before the container runs.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error("read monitor config {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse monitor config {path}: {source}")]
    ConfigParse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("open log file {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: {source}")]
    Sys {
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("join pid namespace: {0}")]
    PidNamespace(#[from] namespaces::NamespaceError),
    #[error("move container into cgroup: {0}")]
    Cgroup(#[from] crate::cgroups::CgroupError),
    #[error("{0}")]
    Init(String),
}

/// A container's cgroup, as the monitor needs to find it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupRef {
    pub driver: CgroupDriver,
    pub path: String,
}

/// What the shim tells the monitor (stored as [`CONFIG_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorConfig {
    pub id: String,
    pub plan: InitPlan,
    pub cgroup: Option<CgroupRef>,
    pub log_path: Option<PathBuf>,
}

/// How the container ended (stored as [`EXIT_FILE`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit status; 128 + signal number when killed by a signal (shell convention).
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub oom_killed: bool,
    /// Unix time in nanoseconds.
    pub finished_at: i64,
}

/// The monitor's first words to the shim on the report pipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    Started {
        pid: u32,
        monitor_pid: u32,
        started_at: i64,
    },
    Failed(String),
}

impl Report {
    pub fn encode(&self) -> String {
        match self {
            Report::Started {
                pid,
                monitor_pid,
                started_at,
            } => format!("OK {pid} {monitor_pid} {started_at}\n"),
            Report::Failed(msg) => format!("ERR {}\n", msg.replace('\n', " ")),
        }
    }

    pub fn decode(s: &str) -> Option<Report> {
        let s = s.trim_end_matches('\n');
        if let Some(msg) = s.strip_prefix("ERR ") {
            return Some(Report::Failed(msg.to_string()));
        }
        let mut it = s.strip_prefix("OK ")?.split(' ');
        Some(Report::Started {
            pid: it.next()?.parse().ok()?,
            monitor_pid: it.next()?.parse().ok()?,
            started_at: it.next()?.parse().ok()?,
        })
    }
}

fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

fn sys(op: &'static str) -> impl FnOnce(nix::Error) -> MonitorError {
    move |source| MonitorError::Sys { op, source }
}

/// Writes `content` to `dir/name` through a temporary file and a rename, so readers never
/// see half a file.
///
/// No fsync: this state must survive the shim or a monitor being killed, which the page
/// cache does; after a crash of the host no container survives either, and the records
/// are reconciled against what runs. An fsync per write cost milliseconds on every pod
/// start and stop.
pub fn write_atomic(dir: &Path, name: &str, content: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, dir.join(name))
}

/// Makes `fd` the child's descriptor 3 (inherited across exec), where `ferrolet-monitor`
/// finds its report pipe or its zygote socket.
pub(crate) fn pass_as_fd_3(cmd: &mut std::process::Command, fd: RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls dup2 and fcntl, which are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                let flags = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            } else if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Entry point of `ferrolet-shim monitor DIR` with the report pipe on `report_fd`.
/// Returns the process exit code.
pub fn main(dir: &Path, report_fd: RawFd) -> i32 {
    // SAFETY: the shim passes the write end of the report pipe on this descriptor number
    // and nothing else in this fresh process owns it.
    let report = unsafe { OwnedFd::from_raw_fd(report_fd) };
    let mut report = std::fs::File::from(report);
    let cfg = match load_config(dir) {
        Ok(c) => c,
        Err(e) => {
            let _ = report.write_all(Report::Failed(e.to_string()).encode().as_bytes());
            return 1;
        }
    };
    // Detach: the shim waits for this first process; the second one lives on, reparented
    // away from the shim, in its own session so that signals to the shim's group miss it.
    // SAFETY: this process is single-threaded (nothing has spawned a thread yet).
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Parent { .. }) => return 0,
        Ok(nix::unistd::ForkResult::Child) => {}
        Err(e) => {
            let msg = format!("fork monitor: {e}");
            let _ = report.write_all(Report::Failed(msg).encode().as_bytes());
            return 1;
        }
    }
    let _ = nix::unistd::setsid();
    match Monitor::start(&cfg) {
        Ok(mut m) => {
            let r = Report::Started {
                pid: m.child.as_raw().unsigned_abs(),
                monitor_pid: std::process::id(),
                started_at: now_ns(),
            };
            let _ = report.write_all(r.encode().as_bytes());
            drop(report);
            m.run(dir, &cfg);
            0
        }
        Err(e) => {
            let _ = report.write_all(Report::Failed(e.to_string()).encode().as_bytes());
            1
        }
    }
}

fn load_config(dir: &Path) -> Result<MonitorConfig, MonitorError> {
    let path = dir.join(CONFIG_FILE);
    let data = std::fs::read(&path).map_err(|source| MonitorError::Config {
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&data).map_err(|source| MonitorError::ConfigParse { path, source })
}

fn open_log(path: Option<&Path>) -> Result<Option<std::fs::File>, MonitorError> {
    let Some(path) = path else { return Ok(None) };
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map(Some)
        .map_err(|source| MonitorError::Log {
            path: path.to_path_buf(),
            source,
        })
}

/// A running monitor: the container's pid and the ends of its output pipes.
struct Monitor {
    child: Pid,
    out: Option<OwnedFd>,
    err: Option<OwnedFd>,
    signals: SignalFd,
    log: Option<std::fs::File>,
}

impl Monitor {
    /// Creates the container's process and waits until it has exec'd its program.
    fn start(cfg: &MonitorConfig) -> Result<Monitor, MonitorError> {
        let mut mask = SigSet::empty();
        for s in [
            Signal::SIGCHLD,
            Signal::SIGUSR1,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGPIPE,
        ] {
            mask.add(s);
        }
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None).map_err(sys("block signals"))?;
        let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
            .map_err(sys("signalfd"))?;
        let log = open_log(cfg.log_path.as_deref())?;

        let (out_r, out_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        let (err_r, err_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        let (fail_r, fail_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        let (sync_r, sync_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        let devnull = nix::fcntl::open(
            "/dev/null",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(sys("open /dev/null"))?;

        if let Some(p) = cfg.plan.namespaces.pid_join() {
            namespaces::enter(Kind::Pid, p)?;
        }
        // The child moves itself into its cgroup when the hierarchy allows it: that skips a
        // wait in the kernel that a move made from here pays (see `SelfJoin`).
        let cgroups = cfg.cgroup.as_ref().map(|cg| cg.driver.open());
        let self_join = match (&cgroups, &cfg.cgroup) {
            (Some(driver), Some(cg)) => driver.self_join(&cg.path)?,
            _ => None,
        };
        let flags = cfg.plan.namespaces.clone_flags();
        // SAFETY: a raw clone without CLONE_VM behaves like fork: the child gets a copy of
        // this single-threaded process, so no lock can be held by a vanished thread.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone,
                (flags.bits() as libc::c_ulong) | (libc::SIGCHLD as libc::c_ulong),
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if ret < 0 {
            return Err(MonitorError::Sys {
                op: "clone container process",
                source: nix::Error::last(),
            });
        }
        if ret == 0 {
            drop(fail_r);
            drop(sync_w);
            let mut byte = [0u8; 1];
            let go = std::fs::File::from(sync_r).read(&mut byte).unwrap_or(0);
            let joined = match &self_join {
                Some(j) if go == 1 => j.join().map_err(|e| format!("move into cgroup: {e}")),
                _ => Ok(()),
            };
            if let Err(msg) = joined {
                let _ = std::fs::File::from(fail_w).write_all(msg.as_bytes());
            } else if go == 1 {
                let fds = InitFds {
                    stdin: devnull.as_raw_fd(),
                    stdout: out_w.as_raw_fd(),
                    stderr: err_w.as_raw_fd(),
                };
                let Err(e) = init::run(&cfg.plan, fds);
                let _ = std::fs::File::from(fail_w).write_all(e.to_string().as_bytes());
            }
            // SAFETY: _exit ends the child without running the parent's atexit handlers
            // or flushing buffers it shares with the monitor.
            unsafe { libc::_exit(127) };
        }
        let child = Pid::from_raw(i32::try_from(ret).unwrap_or(-1));
        drop((out_w, err_w, fail_w, sync_r, devnull));

        let cleanup = |e: MonitorError| {
            let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
            let _ = waitpid(child, None);
            e
        };
        let child_moves_itself = self_join.is_some();
        drop(self_join);
        if let (Some(driver), Some(cg), false) = (&cgroups, &cfg.cgroup, child_moves_itself) {
            driver
                .add_process(&cg.path, child.as_raw().unsigned_abs())
                .map_err(|e| cleanup(e.into()))?;
        }
        if let Some(adj) = cfg.plan.oom_score_adj {
            set_oom_score_adj(child, adj, &cfg.id);
        }
        std::fs::File::from(sync_w).write_all(&[1]).map_err(|e| {
            cleanup(MonitorError::Init(format!(
                "release container process: {e}"
            )))
        })?;
        let mut msg = String::new();
        let _ = std::fs::File::from(fail_r).read_to_string(&mut msg);
        if !msg.is_empty() {
            let _ = waitpid(child, None);
            return Err(MonitorError::Init(msg));
        }
        Ok(Monitor {
            child,
            out: Some(out_r),
            err: Some(err_r),
            signals,
            log,
        })
    }

    /// Copies output to the log until the container exits, then records its exit.
    fn run(&mut self, dir: &Path, cfg: &MonitorConfig) {
        let mut split_out = LineSplitter::new(Stream::Stdout);
        let mut split_err = LineSplitter::new(Stream::Stderr);
        let mut buf = vec![0u8; 32 * 1024];
        let mut status: Option<WaitStatus> = None;
        while status.is_none() || self.out.is_some() || self.err.is_some() {
            let exited = status.is_some();
            if exited {
                // The container's init is gone; whatever still holds the pipes open (a
                // process left in a shared PID namespace) must not keep the monitor alive.
                for fd in [self.out.as_ref(), self.err.as_ref()].into_iter().flatten() {
                    let _ = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK));
                }
            }
            let mut fds = vec![PollFd::new(self.signals.as_fd(), PollFlags::POLLIN)];
            let out_idx = self.out.as_ref().map(|fd| {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let err_idx = self.err.as_ref().map(|fd| {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                fds.len() - 1
            });
            let timeout = if exited {
                PollTimeout::ZERO
            } else {
                PollTimeout::NONE
            };
            match poll(&mut fds, timeout) {
                Err(nix::Error::EINTR) => continue,
                Err(_) => break,
                Ok(0) if exited => break,
                Ok(_) => {}
            }
            let ready = |i: Option<usize>| {
                i.and_then(|i| fds[i].revents())
                    .is_some_and(|r| !r.is_empty())
            };
            let sig_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
            let (out_ready, err_ready) = (ready(out_idx), ready(err_idx));
            drop(fds);
            if out_ready {
                self.pump(Stream::Stdout, &mut split_out, &mut buf);
            }
            if err_ready {
                self.pump(Stream::Stderr, &mut split_err, &mut buf);
            }
            if sig_ready {
                self.handle_signals(cfg, &mut status);
            }
        }
        let now = rfc3339_nano(chrono::Utc::now());
        let mut tail = Vec::new();
        split_out.finish(&now, &mut tail);
        split_err.finish(&now, &mut tail);
        self.write_log(&tail);

        let (exit_code, signal) = match status {
            Some(WaitStatus::Exited(_, code)) => (code, None),
            Some(WaitStatus::Signaled(_, sig, _)) => (128 + sig as i32, Some(sig as i32)),
            _ => (255, None),
        };
        let oom_killed = cfg.cgroup.as_ref().is_some_and(|cg| {
            cg.driver
                .open()
                .stats(&cg.path)
                .is_ok_and(|s| s.oom_kills > 0)
        });
        let rec = ExitRecord {
            exit_code,
            signal,
            oom_killed,
            finished_at: now_ns(),
        };
        if let Ok(data) = serde_json::to_vec(&rec)
            && let Err(e) = write_atomic(dir, EXIT_FILE, &data)
        {
            eprintln!("container {}: write exit status: {e}", cfg.id);
        }
    }

    /// Reads what is available on one stream and logs complete lines.
    fn pump(&mut self, stream: Stream, split: &mut LineSplitter, buf: &mut [u8]) {
        let slot = match stream {
            Stream::Stdout => &mut self.out,
            Stream::Stderr => &mut self.err,
        };
        let Some(fd) = slot.as_ref() else { return };
        match nix::unistd::read(fd, buf) {
            Ok(n) if n > 0 => {
                let now = rfc3339_nano(chrono::Utc::now());
                let mut out = Vec::with_capacity(n + 64);
                split.feed(&buf[..n], &now, &mut out);
                self.write_log(&out);
            }
            Err(nix::Error::EINTR) => {}
            // EOF; or, once the container exited and the pipe is non-blocking, nothing left.
            _ => *slot = None,
        }
    }

    fn write_log(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        if let Some(f) = self.log.as_mut() {
            let _ = f.write_all(data);
        }
    }

    fn handle_signals(&mut self, cfg: &MonitorConfig, status: &mut Option<WaitStatus>) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => loop {
                    match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                        Ok(WaitStatus::StillAlive) | Err(_) => break,
                        Ok(ws) => {
                            if ws.pid() == Some(self.child) {
                                *status = Some(ws);
                            }
                        }
                    }
                },
                Ok(Signal::SIGUSR1) => match open_log(cfg.log_path.as_deref()) {
                    Ok(f) => self.log = f,
                    Err(e) => eprintln!("container {}: reopen log: {e}", cfg.id),
                },
                _ => {}
            }
        }
    }
}

/// Sets the container's OOM score adjustment. This process may not lower it below its own
/// value (no CAP_SYS_RESOURCE in some sandboxes): then the current value is kept, and logged.
fn set_oom_score_adj(child: Pid, wanted: i32, id: &str) {
    let own: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let path = format!("/proc/{child}/oom_score_adj");
    if std::fs::write(&path, wanted.to_string()).is_ok() {
        return;
    }
    if wanted < own {
        eprintln!("container {id}: cannot lower oom_score_adj to {wanted}; keeping {own}");
        let _ = std::fs::write(&path, own.to_string());
    } else {
        eprintln!("container {id}: cannot set oom_score_adj to {wanted}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        let ok = Report::Started {
            pid: 42,
            monitor_pid: 41,
            started_at: 1_700_000_000_000_000_000,
        };
        assert_eq!(Report::decode(&ok.encode()), Some(ok));
        let err = Report::Failed("exec \"x\":\nENOENT".into());
        assert_eq!(
            Report::decode(&err.encode()),
            Some(Report::Failed("exec \"x\": ENOENT".into()))
        );
        assert_eq!(Report::decode("garbage"), None);
    }
}
