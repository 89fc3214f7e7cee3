//! Control groups: one trait, a cgroup v1 implementation (per-controller hierarchies, as on
//! this machine) and a cgroup v2 implementation (unified hierarchy, as on most hosts).
//!
//! Paths are relative to the hierarchy root (`ferrolet/pod-x/ctr-y`); a path that is absolute
//! or climbs with `..` is refused so no code path can touch cgroups outside the given parent.

mod v1;
mod v2;

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use v1::CgroupsV1;
pub use v2::{CgroupfsV2, CgroupsV2, RealCgroupfs};

/// Errors of cgroup management.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("cgroup {path}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}: {op}: {message}")]
    V1 {
        path: String,
        op: &'static str,
        message: String,
    },
    #[error("cgroup {path}: processes still running after SIGKILL: {pids:?}")]
    Busy { path: String, pids: Vec<u32> },
    #[error("cgroup {path}: bad value in {file}: {value:?}")]
    Parse {
        path: String,
        file: &'static str,
        value: String,
    },
}

/// Resource limits the runtime applies; `None` leaves the kernel default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Relative CPU weight in cgroup v1 units (2..=262144).
    pub cpu_shares: Option<u64>,
    /// CFS quota in microseconds per period; negative or absent means unlimited.
    pub cpu_quota: Option<i64>,
    /// CFS period in microseconds.
    pub cpu_period: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// Maximum number of processes; `Some(-1)` or absent means unlimited.
    pub pids_limit: Option<i64>,
    /// Device access rules, applied in order (normally "deny all" then the allowed ones).
    #[serde(default)]
    pub devices: Vec<DeviceRule>,
}

/// One device cgroup rule: allow or deny `access` (`r`, `w`, `m`) to a device class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRule {
    pub allow: bool,
    /// `a` (all), `c` or `b`.
    pub kind: char,
    /// -1 for any.
    pub major: i64,
    /// -1 for any.
    pub minor: i64,
    pub access: String,
}

impl Resources {
    /// Reads the resources of an OCI runtime spec.
    pub fn from_oci(res: &oci_spec::runtime::LinuxResources) -> Self {
        let mut out = Resources::default();
        if let Some(cpu) = res.cpu() {
            out.cpu_shares = cpu.shares().filter(|s| *s > 0);
            out.cpu_quota = cpu.quota().filter(|q| *q > 0);
            out.cpu_period = cpu.period().filter(|p| *p > 0);
            out.cpuset_cpus = cpu.cpus().clone().filter(|s| !s.is_empty());
            out.cpuset_mems = cpu.mems().clone().filter(|s| !s.is_empty());
        }
        if let Some(mem) = res.memory() {
            out.memory_limit = mem.limit().filter(|l| *l > 0);
        }
        if let Some(pids) = res.pids() {
            out.pids_limit = Some(pids.limit()).filter(|l| *l > 0);
        }
        for d in res.devices().as_deref().unwrap_or_default() {
            let kind = match d.typ() {
                Some(oci_spec::runtime::LinuxDeviceType::B) => 'b',
                Some(
                    oci_spec::runtime::LinuxDeviceType::C | oci_spec::runtime::LinuxDeviceType::U,
                ) => 'c',
                _ => 'a',
            };
            out.devices.push(DeviceRule {
                allow: d.allow(),
                kind,
                major: d.major().unwrap_or(-1),
                minor: d.minor().unwrap_or(-1),
                access: d.access().clone().unwrap_or_else(|| "rwm".to_string()),
            });
        }
        out
    }
}

/// Usage figures for CRI stats.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Cumulative CPU time in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Memory usage minus inactive file cache: what the kernel could not reclaim.
    pub memory_working_set: u64,
    pub memory_usage: u64,
    pub pids: u64,
    /// How many times the OOM killer killed a process of this cgroup.
    pub oom_kills: u64,
}

/// What the runtime needs from a cgroup hierarchy.
pub trait Cgroups: Send + Sync + std::fmt::Debug {
    /// Creates the cgroup (and its missing parents) and applies `res`.
    fn create(&self, path: &str, res: &Resources) -> Result<(), CgroupError>;
    /// Changes the limits of an existing cgroup.
    fn update(&self, path: &str, res: &Resources) -> Result<(), CgroupError>;
    /// Moves a process (all its threads) into the cgroup.
    fn add_process(&self, path: &str, pid: u32) -> Result<(), CgroupError>;
    /// Opens the files through which a single-threaded process moves itself into the
    /// cgroup, or `None` when the hierarchy offers nothing faster than [`add_process`].
    ///
    /// [`add_process`]: Cgroups::add_process
    fn self_join(&self, _path: &str) -> Result<Option<SelfJoin>, CgroupError> {
        Ok(None)
    }
    /// Processes in the cgroup itself (not its children).
    fn processes(&self, path: &str) -> Result<Vec<u32>, CgroupError>;
    fn stats(&self, path: &str) -> Result<Stats, CgroupError>;
    /// Whether the cgroup directory exists (in any controller for v1).
    fn exists(&self, path: &str) -> bool;
    /// Kills what still runs in the cgroup and removes it; absent cgroups are fine.
    fn remove(&self, path: &str) -> Result<(), CgroupError>;
}

/// Open `tasks` files of one cgroup, one per controller, through which the calling thread
/// moves itself (it writes `0`, meaning "me").
///
/// Moving another process (its pid into `cgroup.procs`) takes the kernel's cgroup
/// threadgroup lock for writing, and taking it after a quiet moment waits for an RCU grace
/// period: 6 to 15 ms on this machine, paid by every container start. A thread that moves
/// only itself needs no such lock on current kernels (this machine runs 6.18), and
/// a freshly cloned child, before it starts any thread, is its whole process. A kernel that
/// takes the lock anyway only makes the move as slow as the other way.
#[derive(Debug)]
pub struct SelfJoin {
    files: Vec<(PathBuf, std::fs::File)>,
}

impl SelfJoin {
    fn open(files: impl IntoIterator<Item = PathBuf>) -> Result<SelfJoin, CgroupError> {
        let files = files
            .into_iter()
            .map(|p| {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .map_err(|source| CgroupError::Io {
                        path: p.display().to_string(),
                        op: "open for joining",
                        source,
                    })?;
                Ok((p, f))
            })
            .collect::<Result<_, CgroupError>>()?;
        Ok(SelfJoin { files })
    }

    /// Moves the calling thread into the cgroup. Call it only from a single-threaded
    /// process, or the other threads stay behind.
    pub fn join(&self) -> Result<(), CgroupError> {
        use std::io::Write;
        for (path, f) in &self.files {
            (&*f).write_all(b"0").map_err(|source| CgroupError::Io {
                path: path.display().to_string(),
                op: "join",
                source,
            })?;
        }
        Ok(())
    }
}

/// A serialisable choice of hierarchy, so that the monitor process opens the same one as the
/// shim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupDriver {
    V1,
    V2 { root: PathBuf },
}

impl CgroupDriver {
    /// cgroup v2 when `/sys/fs/cgroup` is the unified hierarchy, else v1 (hybrid hosts too).
    pub fn detect() -> Self {
        match nix::sys::statfs::statfs("/sys/fs/cgroup") {
            Ok(st) if st.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC => {
                CgroupDriver::V2 {
                    root: PathBuf::from("/sys/fs/cgroup"),
                }
            }
            _ => CgroupDriver::V1,
        }
    }

    /// Does the one-time work of opening this hierarchy (finding the v1 mounts) now, in a
    /// process whose forked children will open it many times.
    pub fn prepare(&self) {
        if *self == CgroupDriver::V1 {
            v1::HostHierarchies::find();
        }
    }

    pub fn open(&self) -> Box<dyn Cgroups> {
        match self {
            CgroupDriver::V1 => Box::new(CgroupsV1::new()),
            CgroupDriver::V2 { root } => Box::new(CgroupsV2::new(root.clone(), RealCgroupfs)),
        }
    }
}

/// Checks that `path` is a plain relative path below the hierarchy root.
pub fn validate_path(path: &str) -> Result<(), CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: path.to_string(),
        reason,
    };
    if path.is_empty() {
        return Err(invalid("empty"));
    }
    for c in Path::new(path).components() {
        match c {
            Component::Normal(_) => {}
            Component::RootDir => return Err(invalid("must be relative to the hierarchy root")),
            _ => return Err(invalid("must not contain '.' or '..'")),
        }
    }
    Ok(())
}

/// Sends SIGKILL to every listed process, ignoring ones that are already gone.
fn kill_all(pids: &[u32]) {
    for pid in pids {
        if let Ok(p) = i32::try_from(*pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Kills the processes of a cgroup and waits (bounded) until it is empty.
fn drain(cg: &dyn Cgroups, path: &str) -> Result<(), CgroupError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pids = cg.processes(path)?;
        if pids.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(CgroupError::Busy {
                path: path.to_string(),
                pids,
            });
        }
        kill_all(&pids);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_below_the_root() {
        assert!(validate_path("ferrolet/pod/ctr").is_ok());
        assert!(validate_path("").is_err());
        assert!(validate_path("/ferrolet").is_err());
        assert!(validate_path("ferrolet/../system").is_err());
        assert!(validate_path("./x").is_err());
    }

    #[test]
    fn oci_resources_are_read_and_zero_means_unset() {
        let spec: oci_spec::runtime::LinuxResources = serde_json::from_value(serde_json::json!({
            "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": ""},
            "memory": {"limit": 67108864},
            "pids": {"limit": 0}
        }))
        .unwrap();
        let r = Resources::from_oci(&spec);
        assert_eq!(r.cpu_shares, Some(512));
        assert_eq!(r.cpu_quota, Some(50000));
        assert_eq!(r.cpu_period, Some(100_000));
        assert_eq!(r.cpuset_cpus, None);
        assert_eq!(r.memory_limit, Some(64 << 20));
        assert_eq!(r.pids_limit, None);
    }
}
