//! cgroup v1 through `cgroups-rs`: one directory per controller hierarchy.

use cgroups_rs::CgroupPid;
use cgroups_rs::fs::MaxValue;
use cgroups_rs::fs::cgroup::Cgroup;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::cpuacct::CpuAcctController;
use cgroups_rs::fs::cpuset::CpuSetController;
use cgroups_rs::fs::devices::{DevicePermissions, DeviceType, DevicesController};
use cgroups_rs::fs::hierarchies::V1;
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Hierarchy, Subsystem};

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use super::{CgroupError, Cgroups, Resources, SelfJoin, Stats, drain, validate_path};

/// The controllers a container cgroup is created in. `devices` and `freezer` are included so
/// that every process of a container can be found (and frozen) from one place later.
const CONTROLLERS: [&str; 7] = [
    "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
];

/// cgroup v1 manager over the hierarchies mounted on this host.
#[derive(Debug, Default)]
pub struct CgroupsV1;

impl CgroupsV1 {
    pub fn new() -> Self {
        CgroupsV1
    }

    fn load(path: &str) -> Result<Cgroup, CgroupError> {
        validate_path(path)?;
        Ok(Cgroup::load_with_specified_controllers(
            Box::new(HostHierarchies::get()),
            path,
            CONTROLLERS.iter().map(|c| (*c).to_string()).collect(),
        ))
    }
}

/// The host's cgroup v1 hierarchies, found once. `V1::new` reads and parses the whole of
/// `/proc/self/mountinfo`; every container adds a dozen mounts to it, so with a hundred pods
/// running, loading it for each cgroup operation cost more than the operations themselves.
/// Controllers are mounted at boot and stay where they are.
#[derive(Debug, Clone)]
pub(super) struct HostHierarchies(Arc<V1>);

impl HostHierarchies {
    /// Finds the hierarchies now, so that processes forked later inherit them.
    pub(super) fn find() {
        let _ = Self::get();
    }

    fn get() -> HostHierarchies {
        static FOUND: OnceLock<Arc<V1>> = OnceLock::new();
        HostHierarchies(Arc::clone(FOUND.get_or_init(|| Arc::new(V1::new()))))
    }
}

impl Hierarchy for HostHierarchies {
    fn subsystems(&self) -> Vec<Subsystem> {
        self.0.subsystems()
    }

    fn root(&self) -> PathBuf {
        self.0.root()
    }

    fn root_control_group(&self) -> Cgroup {
        self.0.root_control_group()
    }

    fn parent_control_group(&self, path: &str) -> Cgroup {
        self.0.parent_control_group(path)
    }

    fn v2(&self) -> bool {
        false
    }
}

fn v1_err(
    path: &str,
    op: &'static str,
) -> impl FnOnce(cgroups_rs::fs::error::Error) -> CgroupError {
    let path = path.to_string();
    move |e| CgroupError::V1 {
        path,
        op,
        message: error_chain(&e),
    }
}

/// `cgroups-rs` errors keep the OS error as their source; show both.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

fn apply(cg: &Cgroup, path: &str, res: &Resources) -> Result<(), CgroupError> {
    if let Some(cpuset) = cg.controller_of::<CpuSetController>() {
        if let Some(cpus) = &res.cpuset_cpus {
            cpuset
                .set_cpus(cpus)
                .map_err(v1_err(path, "set cpuset.cpus"))?;
        }
        if let Some(mems) = &res.cpuset_mems {
            cpuset
                .set_mems(mems)
                .map_err(v1_err(path, "set cpuset.mems"))?;
        }
    }
    if let Some(cpu) = cg.controller_of::<CpuController>() {
        if let Some(shares) = res.cpu_shares {
            cpu.set_shares(shares)
                .map_err(v1_err(path, "set cpu.shares"))?;
        }
        if let Some(period) = res.cpu_period {
            cpu.set_cfs_period(period)
                .map_err(v1_err(path, "set cpu.cfs_period_us"))?;
        }
        if let Some(quota) = res.cpu_quota {
            cpu.set_cfs_quota(quota)
                .map_err(v1_err(path, "set cpu.cfs_quota_us"))?;
        }
    }
    if let (Some(mem), Some(limit)) = (cg.controller_of::<MemController>(), res.memory_limit) {
        mem.set_limit(limit)
            .map_err(v1_err(path, "set memory.limit_in_bytes"))?;
    }
    if let Some(dev) = cg.controller_of::<DevicesController>() {
        for rule in &res.devices {
            let kind = match rule.kind {
                'b' => DeviceType::Block,
                'c' => DeviceType::Char,
                _ => DeviceType::All,
            };
            let perms: Vec<DevicePermissions> = rule
                .access
                .chars()
                .filter_map(DevicePermissions::from_char)
                .collect();
            let r = if rule.allow {
                dev.allow_device(kind, rule.major, rule.minor, &perms)
            } else {
                dev.deny_device(kind, rule.major, rule.minor, &perms)
            };
            r.map_err(v1_err(path, "set devices rule"))?;
        }
    }
    if let (Some(pids), Some(limit)) = (cg.controller_of::<PidController>(), res.pids_limit) {
        let max = if limit > 0 {
            MaxValue::Value(limit)
        } else {
            MaxValue::Max
        };
        pids.set_pid_max(max)
            .map_err(v1_err(path, "set pids.max"))?;
    }
    Ok(())
}

impl Cgroups for CgroupsV1 {
    fn create(&self, path: &str, res: &Resources) -> Result<(), CgroupError> {
        let cg = Self::load(path)?;
        cg.create().map_err(v1_err(path, "create"))?;
        if let Err(e) = apply(&cg, path, res) {
            let _ = cg.delete();
            return Err(e);
        }
        Ok(())
    }

    fn update(&self, path: &str, res: &Resources) -> Result<(), CgroupError> {
        apply(&Self::load(path)?, path, res)
    }

    fn add_process(&self, path: &str, pid: u32) -> Result<(), CgroupError> {
        Self::load(path)?
            .add_task_by_tgid(CgroupPid::from(u64::from(pid)))
            .map_err(v1_err(path, "add process"))
    }

    /// Each controller's `tasks` file: a write of `0` there moves only the writing thread.
    fn self_join(&self, path: &str) -> Result<Option<SelfJoin>, CgroupError> {
        let cg = Self::load(path)?;
        let files = cg
            .subsystems()
            .iter()
            .map(|sub| sub.to_controller().path().join("tasks"))
            .collect::<Vec<_>>();
        SelfJoin::open(files).map(Some)
    }

    fn processes(&self, path: &str) -> Result<Vec<u32>, CgroupError> {
        let cg = Self::load(path)?;
        let mut pids: Vec<u32> = cg
            .procs()
            .into_iter()
            .filter_map(|p| u32::try_from(p.pid).ok())
            .collect();
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    fn stats(&self, path: &str) -> Result<Stats, CgroupError> {
        let cg = Self::load(path)?;
        let mut st = Stats::default();
        if let Some(acct) = cg.controller_of::<CpuAcctController>() {
            st.cpu_usage_ns = acct.cpuacct().usage;
        }
        if let Some(mem) = cg.controller_of::<MemController>() {
            let m = mem.memory_stat();
            st.memory_usage = m.usage_in_bytes;
            st.memory_working_set = m.usage_in_bytes.saturating_sub(m.stat.total_inactive_file);
            st.oom_kills = m.oom_control.oom_kill;
        }
        if let Some(pids) = cg.controller_of::<PidController>() {
            st.pids = pids.get_pid_current().unwrap_or(0);
        }
        Ok(st)
    }

    fn exists(&self, path: &str) -> bool {
        Self::load(path).is_ok_and(|cg| cg.exists())
    }

    fn remove(&self, path: &str) -> Result<(), CgroupError> {
        let cg = Self::load(path)?;
        if !cg.exists() {
            return Ok(());
        }
        drain(self, path)?;
        // `Cgroup::delete` stops at the first controller that fails; go on through the rest
        // so that one stuck directory does not leave the others behind.
        let mut first_err = None;
        for sub in cg.subsystems() {
            let dir = sub.to_controller().path().to_path_buf();
            if let Err(e) = std::fs::remove_dir(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
                && first_err.is_none()
            {
                first_err = Some(CgroupError::Io {
                    path: dir.display().to_string(),
                    op: "remove",
                    source: e,
                });
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
