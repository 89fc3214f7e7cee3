//! The OCI container runtime: create, start, signal, wait for and delete containers described
//! by an OCI runtime spec. State lives on disk under the runtime's root, one directory per
//! container, so a restarted shim finds its containers (and the exits it missed) again.

pub mod caps;
pub mod defaults;
pub mod init;
pub mod plan;
mod state;

use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use crate::cgroups::{CgroupDriver, CgroupError, Resources, Stats};
use crate::monitor::zygote::ZygoteSlot;
use crate::monitor::{self, CgroupRef, ExitRecord, MonitorConfig, Report};
use crate::mounts::{MountError, RootfsSource};
pub use plan::{InitPlan, PlanError, UserLookup};
use state::Record;
pub use state::{ContainerState, Status};

/// Errors of the container runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "invalid container id {0:?}: use 1-128 characters of [A-Za-z0-9_.-], not starting with '.'"
    )]
    InvalidId(String),
    #[error("container {0} already exists")]
    AlreadyExists(String),
    #[error("container {0} not found")]
    NotFound(String),
    #[error("container {id}: invalid spec: {source}")]
    Spec {
        id: String,
        #[source]
        source: PlanError,
    },
    #[error("container {id}: {source}")]
    Mount {
        id: String,
        #[source]
        source: MountError,
    },
    #[error("container {id}: {source}")]
    Cgroup {
        id: String,
        #[source]
        source: CgroupError,
    },
    #[error("container {id}: {op} {path}: {source}")]
    Io {
        id: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("container {id}: start failed: {message}")]
    Start { id: String, message: String },
    #[error("container {0} was already started")]
    AlreadyStarted(String),
    #[error("container {0} is not running")]
    NotRunning(String),
    #[error("container {0} is still running")]
    StillRunning(String),
    #[error("container {id}: {op}: {source}")]
    Sys {
        id: String,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
}

/// What a caller gives to create a container.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    pub id: String,
    pub spec: Spec,
    pub rootfs: RootfsSource,
    /// CRI log file; `None` discards the output.
    pub log_path: Option<PathBuf>,
    /// Look the user up in the container's `/etc/passwd` instead of the spec's numeric ids.
    pub user: Option<UserLookup>,
}

/// Runtime rooted at a state directory.
#[derive(Debug, Clone)]
pub struct Runtime {
    root: PathBuf,
    monitor_exe: PathBuf,
    cgroups: CgroupDriver,
    /// Forks monitors without an exec each; started on the first container start.
    zygote: Arc<ZygoteSlot>,
}

/// Checks an id against the characters that are safe as a directory name.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidId(id.to_string()))
    }
}

/// Unix time in nanoseconds.
pub fn now_ns() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default()
}

/// Reads the start time (clock ticks since boot) of a process, to tell it from a later
/// process that reused its pid.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses; fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn pidfd_open(pid: u32) -> Result<OwnedFd, nix::Error> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(nix::Error::last());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Runtime {
    /// A runtime keeping state under `root`, running `monitor_exe monitor DIR` per container.
    pub fn new(
        root: impl Into<PathBuf>,
        monitor_exe: impl Into<PathBuf>,
        cgroups: CgroupDriver,
    ) -> Result<Self, RuntimeError> {
        let root = root.into();
        let dir = root.join("containers");
        std::fs::create_dir_all(&dir).map_err(|source| RuntimeError::Io {
            id: String::new(),
            op: "create state dir",
            path: dir,
            source,
        })?;
        Ok(Runtime {
            root,
            monitor_exe: monitor_exe.into(),
            cgroups,
            zygote: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pid of the process that forks this runtime's monitors, once the first container
    /// started (for diagnostics and tests).
    pub fn zygote_pid(&self) -> Option<u32> {
        self.zygote.pid()
    }

    pub fn cgroup_driver(&self) -> &CgroupDriver {
        &self.cgroups
    }

    /// The state directory of a container.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join("containers").join(id)
    }

    fn io(id: &str, op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError {
        let id = id.to_string();
        let path = path.to_path_buf();
        move |source| RuntimeError::Io {
            id,
            op,
            path,
            source,
        }
    }

    /// Checks the spec, creates the container's cgroup with its limits and its state dir.
    /// Nothing runs yet. On error nothing is left behind.
    pub fn create(&self, cfg: ContainerConfig) -> Result<(), RuntimeError> {
        let id = cfg.id.clone();
        validate_id(&id)?;
        let dir = self.dir(&id);
        let spec_err = |source| RuntimeError::Spec {
            id: id.clone(),
            source,
        };
        let plan = InitPlan::from_spec(
            &cfg.spec,
            cfg.rootfs.clone(),
            dir.join("rootfs"),
            cfg.user.as_ref(),
        )
        .map_err(spec_err)?;
        plan.check_sources().map_err(|source| RuntimeError::Mount {
            id: id.clone(),
            source,
        })?;
        let linux = cfg.spec.linux().as_ref();
        let cgroup_path = linux
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().trim_start_matches('/').to_string())
            .filter(|p| !p.is_empty());
        let resources = linux
            .and_then(|l| l.resources().as_ref())
            .map(Resources::from_oci)
            .unwrap_or_default();

        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(RuntimeError::AlreadyExists(id));
            }
            Err(e) => return Err(Self::io(&id, "create", &dir)(e)),
        }
        let result = self.create_in(&cfg, &dir, plan, cgroup_path.as_deref(), &resources);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }

    fn create_in(
        &self,
        cfg: &ContainerConfig,
        dir: &Path,
        plan: InitPlan,
        cgroup_path: Option<&str>,
        resources: &Resources,
    ) -> Result<(), RuntimeError> {
        let id = &cfg.id;
        let rootfs = dir.join("rootfs");
        std::fs::create_dir(&rootfs).map_err(Self::io(id, "create", &rootfs))?;
        let cgroup = cgroup_path.map(|path| CgroupRef {
            driver: self.cgroups.clone(),
            path: path.to_string(),
        });
        if let Some(cg) = &cgroup {
            self.cgroups
                .open()
                .create(&cg.path, resources)
                .map_err(|source| RuntimeError::Cgroup {
                    id: id.clone(),
                    source,
                })?;
        }
        let mcfg = MonitorConfig {
            id: id.clone(),
            plan,
            cgroup: cgroup.clone(),
            log_path: cfg.log_path.clone(),
        };
        let record = Record {
            created_at: now_ns(),
            cgroup: cgroup.clone(),
            log_path: cfg.log_path.clone(),
            ..Record::default()
        };
        let written = serde_json::to_vec(&mcfg)
            .map_err(std::io::Error::other)
            .and_then(|data| monitor::write_atomic(dir, monitor::CONFIG_FILE, &data))
            .and_then(|()| record.save(dir));
        if let Err(e) = written {
            if let Some(cg) = &cgroup {
                let _ = self.cgroups.open().remove(&cg.path);
            }
            return Err(Self::io(id, "write state", dir)(e));
        }
        Ok(())
    }

    /// Starts the container's process through a new monitor. Returns its pid once the
    /// program has been exec'd; a failure (missing binary, bad cwd, bad mount, unknown
    /// user) comes back as [`RuntimeError::Start`] with the reason.
    pub fn start(&self, id: &str) -> Result<u32, RuntimeError> {
        let dir = self.existing_dir(id)?;
        let mut record = Record::load(&dir).map_err(Self::io(id, "read state", &dir))?;
        if record.pid.is_some() || record.start_error.is_some() {
            return Err(RuntimeError::AlreadyStarted(id.to_string()));
        }
        let report = self.spawn_monitor(id, &dir);
        match report {
            Ok(Report::Started {
                pid,
                monitor_pid,
                started_at,
            }) => {
                record.pid = Some(pid);
                record.pid_start = process_start_time(pid);
                record.monitor_pid = Some(monitor_pid);
                record.monitor_start = process_start_time(monitor_pid);
                record.started_at = Some(started_at);
                record
                    .save(&dir)
                    .map_err(Self::io(id, "write state", &dir))?;
                tracing::debug!(container = id, pid, "container started");
                Ok(pid)
            }
            Ok(Report::Failed(message)) | Err(RuntimeError::Start { message, .. }) => {
                record.start_error = Some(message.clone());
                record.finished_at = Some(now_ns());
                let _ = record.save(&dir);
                Err(RuntimeError::Start {
                    id: id.to_string(),
                    message,
                })
            }
            Err(e) => Err(e),
        }
    }

    fn spawn_monitor(&self, id: &str, dir: &Path) -> Result<Report, RuntimeError> {
        let sys = |op| {
            let id = id.to_string();
            move |source| RuntimeError::Sys { id, op, source }
        };
        let (read_end, write_end) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(sys("pipe"))?;
        match self.zygote.start(&self.monitor_exe, dir, &write_end) {
            Ok(()) => drop(write_end),
            Err(e) => {
                tracing::warn!(container = id, "{e}; starting the monitor by exec");
                self.exec_monitor(id, dir, write_end)?;
            }
        }
        self.read_report(id, dir, read_end)
    }

    /// Starts a monitor the slow way, as a new process of `monitor_exe`.
    fn exec_monitor(&self, id: &str, dir: &Path, write_end: OwnedFd) -> Result<(), RuntimeError> {
        let log_path = dir.join("monitor.log");
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log_path)
            .map_err(Self::io(id, "open", &log_path))?;
        let raw = write_end.as_raw_fd();
        let mut cmd = std::process::Command::new(&self.monitor_exe);
        cmd.arg("monitor")
            .arg(dir)
            .arg("--report-fd")
            .arg("3")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        monitor::pass_as_fd_3(&mut cmd, raw);
        let mut child = cmd
            .spawn()
            .map_err(Self::io(id, "spawn monitor", &self.monitor_exe))?;
        drop(write_end);
        // The first monitor process exits at once after forking the long-lived one.
        let _ = child.wait();
        Ok(())
    }

    /// Reads the monitor's report until the pipe closes (within 60 s).
    fn read_report(&self, id: &str, dir: &Path, read_end: OwnedFd) -> Result<Report, RuntimeError> {
        let sys = |op| {
            let id = id.to_string();
            move |source| RuntimeError::Sys { id, op, source }
        };
        let log_path = dir.join("monitor.log");
        let mut text = String::new();
        let mut f = std::fs::File::from(read_end);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut pfd = [nix::poll::PollFd::new(
                f.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            match nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms)) {
                Ok(0) if Instant::now() >= deadline => {
                    return Err(RuntimeError::Start {
                        id: id.to_string(),
                        message: "the monitor did not report within 60s".into(),
                    });
                }
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(sys("poll report pipe")(e)),
            }
            let mut chunk = [0u8; 4096];
            match f.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&chunk[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Self::io(id, "read monitor report", dir)(e)),
            }
        }
        Report::decode(&text).ok_or_else(|| RuntimeError::Start {
            id: id.to_string(),
            message: if text.is_empty() {
                format!(
                    "the monitor exited without a report (see {})",
                    log_path.display()
                )
            } else {
                format!("unexpected monitor report {text:?}")
            },
        })
    }

    fn existing_dir(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        validate_id(id).map_err(|_| RuntimeError::NotFound(id.to_string()))?;
        let dir = self.dir(id);
        if dir.join(state::RECORD_FILE).exists() {
            Ok(dir)
        } else {
            Err(RuntimeError::NotFound(id.to_string()))
        }
    }

    /// The container's current state, derived from its files and the live processes.
    pub fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let dir = self.existing_dir(id)?;
        let record = Record::load(&dir).map_err(Self::io(id, "read state", &dir))?;
        let exit = read_exit(&dir);
        Ok(state::derive(id, &record, exit.as_ref()))
    }

    /// Ids of all containers under the root.
    pub fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let dir = self.root.join("containers");
        let mut ids = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(Self::io("", "list", &dir))? {
            let e = e.map_err(Self::io("", "list", &dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if validate_id(&name).is_ok() && e.path().join(state::RECORD_FILE).exists() {
                ids.push(name);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Sends a signal to the container's init process (checked against pid reuse).
    pub fn kill(&self, id: &str, sig: Signal) -> Result<(), RuntimeError> {
        let dir = self.existing_dir(id)?;
        let record = Record::load(&dir).map_err(Self::io(id, "read state", &dir))?;
        let (Some(pid), Some(start)) = (record.pid, record.pid_start) else {
            return Err(RuntimeError::NotRunning(id.to_string()));
        };
        if read_exit(&dir).is_some() {
            return Err(RuntimeError::NotRunning(id.to_string()));
        }
        let fd = pidfd_open(pid).map_err(|_| RuntimeError::NotRunning(id.to_string()))?;
        // Checked after opening the pidfd: if the start time still matches, the pidfd refers
        // to the container's process and not to a newer one with the same number.
        if process_start_time(pid) != Some(start) {
            return Err(RuntimeError::NotRunning(id.to_string()));
        }
        // SAFETY: pidfd_send_signal with a descriptor we own and no siginfo.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                sig as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r != 0 {
            let e = nix::Error::last();
            if e == nix::Error::ESRCH {
                return Err(RuntimeError::NotRunning(id.to_string()));
            }
            return Err(RuntimeError::Sys {
                id: id.to_string(),
                op: "send signal",
                source: e,
            });
        }
        Ok(())
    }

    /// Waits until the container has exited and its exit is recorded, or `timeout` passes.
    /// Returns the state either way.
    pub fn wait(&self, id: &str, timeout: Duration) -> Result<ContainerState, RuntimeError> {
        let dir = self.existing_dir(id)?;
        let record = Record::load(&dir).map_err(Self::io(id, "read state", &dir))?;
        let deadline = Instant::now() + timeout;
        // The monitor exits right after writing the exit file: its pidfd says when.
        let monitor_fd = match (record.monitor_pid, record.monitor_start) {
            (Some(pid), Some(start)) => pidfd_open(pid)
                .ok()
                .filter(|_| process_start_time(pid) == Some(start)),
            _ => None,
        };
        loop {
            let st = self.state(id)?;
            if st.status != Status::Running {
                return Ok(st);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(st);
            }
            let step = left.min(Duration::from_millis(100));
            match &monitor_fd {
                Some(fd) => {
                    let mut pfd = [nix::poll::PollFd::new(
                        fd.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    let ms = u16::try_from(step.as_millis()).unwrap_or(100);
                    let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(ms));
                }
                None => std::thread::sleep(step.min(Duration::from_millis(10))),
            }
        }
    }

    /// SIGTERM (or `sig`), then SIGKILL after `timeout`; returns the final state.
    pub fn stop(
        &self,
        id: &str,
        sig: Signal,
        timeout: Duration,
    ) -> Result<ContainerState, RuntimeError> {
        match self.kill(id, sig) {
            Ok(()) | Err(RuntimeError::NotRunning(_)) => {}
            Err(e) => return Err(e),
        }
        let st = self.wait(id, timeout)?;
        if st.status != Status::Running {
            return Ok(st);
        }
        match self.kill(id, Signal::SIGKILL) {
            Ok(()) | Err(RuntimeError::NotRunning(_)) => {}
            Err(e) => return Err(e),
        }
        self.wait(id, Duration::from_secs(30))
    }

    /// Removes a container that is not running: its cgroup and its state dir. With `force`
    /// a running container is killed first.
    pub fn delete(&self, id: &str, force: bool) -> Result<(), RuntimeError> {
        let dir = self.existing_dir(id)?;
        let st = self.state(id)?;
        if st.status == Status::Running {
            if !force {
                return Err(RuntimeError::StillRunning(id.to_string()));
            }
            let st = self.stop(id, Signal::SIGKILL, Duration::from_secs(10))?;
            if st.status == Status::Running {
                return Err(RuntimeError::StillRunning(id.to_string()));
            }
        }
        let record = Record::load(&dir).map_err(Self::io(id, "read state", &dir))?;
        if let Some(cg) = &record.cgroup {
            cg.driver
                .open()
                .remove(&cg.path)
                .map_err(|source| RuntimeError::Cgroup {
                    id: id.to_string(),
                    source,
                })?;
        }
        std::fs::remove_dir_all(&dir).map_err(Self::io(id, "remove", &dir))
    }

    /// Asks the monitor to reopen the log file (after it was rotated away) and waits until
    /// the file exists again.
    pub fn reopen_log(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.existing_dir(id)?;
        let record = Record::load(&dir).map_err(Self::io(id, "read state", &dir))?;
        let (Some(pid), Some(start)) = (record.monitor_pid, record.monitor_start) else {
            return Err(RuntimeError::NotRunning(id.to_string()));
        };
        if read_exit(&dir).is_some() || process_start_time(pid) != Some(start) {
            return Err(RuntimeError::NotRunning(id.to_string()));
        }
        let raw = i32::try_from(pid).map_err(|_| RuntimeError::NotRunning(id.to_string()))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), Signal::SIGUSR1).map_err(
            |source| RuntimeError::Sys {
                id: id.to_string(),
                op: "signal monitor",
                source,
            },
        )?;
        let Some(log) = record.log_path else {
            return Ok(());
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !log.exists() {
            if Instant::now() > deadline {
                return Err(RuntimeError::Io {
                    id: id.to_string(),
                    op: "reopen log",
                    path: log,
                    source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// cgroup usage of the container.
    pub fn stats(&self, id: &str) -> Result<Stats, RuntimeError> {
        let dir = self.existing_dir(id)?;
        let record = Record::load(&dir).map_err(Self::io(id, "read state", &dir))?;
        match &record.cgroup {
            Some(cg) => cg
                .driver
                .open()
                .stats(&cg.path)
                .map_err(|source| RuntimeError::Cgroup {
                    id: id.to_string(),
                    source,
                }),
            None => Ok(Stats::default()),
        }
    }
}

fn read_exit(dir: &Path) -> Option<ExitRecord> {
    let data = std::fs::read(dir.join(monitor::EXIT_FILE)).ok()?;
    serde_json::from_slice(&data).ok()
}

/// Exit information for callers that only need the result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    pub code: i32,
    pub oom_killed: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("abc-123_x.y").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b", &"x".repeat(129)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_start_time_is_readable() {
        assert!(process_start_time(std::process::id()).is_some());
        assert!(process_start_time(u32::MAX).is_none());
    }
}
