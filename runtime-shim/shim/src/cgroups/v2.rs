//! cgroup v2: the unified hierarchy, driven by plain file writes under a root directory.
//!
//! `cgroups-rs` hard-codes `/sys/fs/cgroup` as the v2 root, which rules out testing against a
//! fake cgroupfs in a temp dir; the v2 interface is a handful of files, so it is written
//! directly here, with the filesystem behind [`CgroupfsV2`].

use std::io;
use std::path::{Path, PathBuf};

use super::{CgroupError, Cgroups, Resources, Stats, drain, validate_path};

/// Controllers enabled for the children of every level down to a container's cgroup.
const WANTED: [&str; 4] = ["cpu", "cpuset", "memory", "pids"];

/// The few filesystem operations a v2 cgroup tree needs.
pub trait CgroupfsV2: Send + Sync + std::fmt::Debug {
    fn read(&self, path: &Path) -> io::Result<String>;
    fn write(&self, path: &Path, value: &str) -> io::Result<()>;
    fn mkdir(&self, path: &Path) -> io::Result<()>;
    /// Removes a cgroup directory (on cgroupfs a plain rmdir, whatever files it shows).
    fn rmdir(&self, path: &Path) -> io::Result<()>;
    fn exists(&self, path: &Path) -> bool;
}

/// The kernel's cgroupfs.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealCgroupfs;

impl CgroupfsV2 for RealCgroupfs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }
    fn write(&self, path: &Path, value: &str) -> io::Result<()> {
        // cgroupfs files exist already; never create one by accident.
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(value.as_bytes())
    }
    fn mkdir(&self, path: &Path) -> io::Result<()> {
        match std::fs::create_dir(path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        }
    }
    fn rmdir(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_dir(path)
    }
    fn exists(&self, path: &Path) -> bool {
        path.is_dir()
    }
}

/// cgroup v2 manager rooted at `root` (normally `/sys/fs/cgroup`).
#[derive(Debug)]
pub struct CgroupsV2<F: CgroupfsV2> {
    root: PathBuf,
    fs: F,
}

/// Converts cgroup v1 `cpu.shares` (2..=262144) to v2 `cpu.weight` (1..=10000), with the
/// linear mapping the OCI runtimes agree on.
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

impl<F: CgroupfsV2> CgroupsV2<F> {
    pub fn new(root: PathBuf, fs: F) -> Self {
        CgroupsV2 { root, fs }
    }

    fn dir(&self, path: &str) -> Result<PathBuf, CgroupError> {
        validate_path(path)?;
        Ok(self.root.join(path))
    }

    fn write(&self, dir: &Path, file: &'static str, value: &str) -> Result<(), CgroupError> {
        self.fs
            .write(&dir.join(file), value)
            .map_err(|source| CgroupError::Io {
                path: dir.display().to_string(),
                op: file,
                source,
            })
    }

    fn read(&self, dir: &Path, file: &'static str) -> Result<String, CgroupError> {
        self.fs
            .read(&dir.join(file))
            .map_err(|source| CgroupError::Io {
                path: dir.display().to_string(),
                op: file,
                source,
            })
    }

    fn read_u64(&self, dir: &Path, file: &'static str) -> Result<u64, CgroupError> {
        let s = self.read(dir, file)?;
        s.trim().parse().map_err(|_| CgroupError::Parse {
            path: dir.display().to_string(),
            file,
            value: s,
        })
    }

    fn apply(&self, dir: &Path, res: &Resources) -> Result<(), CgroupError> {
        if let Some(shares) = res.cpu_shares {
            self.write(dir, "cpu.weight", &shares_to_weight(shares).to_string())?;
        }
        if res.cpu_quota.is_some() || res.cpu_period.is_some() {
            let period = res.cpu_period.unwrap_or(100_000);
            let quota = match res.cpu_quota {
                Some(q) if q > 0 => q.to_string(),
                _ => "max".to_string(),
            };
            self.write(dir, "cpu.max", &format!("{quota} {period}"))?;
        }
        if let Some(cpus) = &res.cpuset_cpus {
            self.write(dir, "cpuset.cpus", cpus)?;
        }
        if let Some(mems) = &res.cpuset_mems {
            self.write(dir, "cpuset.mems", mems)?;
        }
        if let Some(limit) = res.memory_limit {
            self.write(dir, "memory.max", &limit.to_string())?;
        }
        if let Some(limit) = res.pids_limit {
            let v = if limit > 0 {
                limit.to_string()
            } else {
                "max".to_string()
            };
            self.write(dir, "pids.max", &v)?;
        }
        if !res.devices.is_empty() {
            // cgroup v2 controls devices with an eBPF program attached to the cgroup, which
            // this runtime does not load yet: say so instead of pretending.
            tracing::warn!(cgroup = %dir.display(), "device rules are not enforced on cgroup v2");
        }
        Ok(())
    }

    /// Enables the wanted controllers for the children of every level from the root down to
    /// the parent of `leaf`, as far as the root offers them.
    fn enable_controllers(&self, leaf: &Path) -> Result<(), CgroupError> {
        let available = self.read(&self.root, "cgroup.controllers")?;
        let enable: Vec<String> = available
            .split_whitespace()
            .filter(|c| WANTED.contains(c))
            .map(|c| format!("+{c}"))
            .collect();
        if enable.is_empty() {
            return Ok(());
        }
        let line = enable.join(" ");
        let mut level = self.root.clone();
        let rel = leaf.strip_prefix(&self.root).unwrap_or(leaf);
        for comp in rel.components() {
            self.write(&level, "cgroup.subtree_control", &line)?;
            level.push(comp);
        }
        Ok(())
    }

    /// Directories from `dir` up to (not including) the root, deepest first.
    fn created_levels(&self, dir: &Path) -> Vec<PathBuf> {
        dir.ancestors()
            .take_while(|p| *p != self.root)
            .map(Path::to_path_buf)
            .collect()
    }
}

impl<F: CgroupfsV2> Cgroups for CgroupsV2<F> {
    fn create(&self, path: &str, res: &Resources) -> Result<(), CgroupError> {
        let dir = self.dir(path)?;
        let mut made = Vec::new();
        for level in self.created_levels(&dir).into_iter().rev() {
            if self.fs.exists(&level) {
                continue;
            }
            self.fs.mkdir(&level).map_err(|source| CgroupError::Io {
                path: level.display().to_string(),
                op: "mkdir",
                source,
            })?;
            made.push(level);
        }
        let result = self
            .enable_controllers(&dir)
            .and_then(|()| self.apply(&dir, res));
        if result.is_err() {
            for level in made.iter().rev() {
                let _ = self.fs.rmdir(level);
            }
        }
        result
    }

    fn update(&self, path: &str, res: &Resources) -> Result<(), CgroupError> {
        let dir = self.dir(path)?;
        self.apply(&dir, res)
    }

    fn add_process(&self, path: &str, pid: u32) -> Result<(), CgroupError> {
        let dir = self.dir(path)?;
        self.write(&dir, "cgroup.procs", &pid.to_string())
    }

    fn processes(&self, path: &str) -> Result<Vec<u32>, CgroupError> {
        let dir = self.dir(path)?;
        if !self.fs.exists(&dir) {
            return Ok(Vec::new());
        }
        let s = self.read(&dir, "cgroup.procs")?;
        Ok(s.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    fn stats(&self, path: &str) -> Result<Stats, CgroupError> {
        let dir = self.dir(path)?;
        let mut st = Stats::default();
        let cpu = self.read(&dir, "cpu.stat")?;
        st.cpu_usage_ns = keyed(&cpu, "usage_usec").saturating_mul(1000);
        st.memory_usage = self.read_u64(&dir, "memory.current")?;
        let mem = self.read(&dir, "memory.stat")?;
        st.memory_working_set = st.memory_usage.saturating_sub(keyed(&mem, "inactive_file"));
        st.pids = self.read_u64(&dir, "pids.current")?;
        st.oom_kills = keyed(&self.read(&dir, "memory.events")?, "oom_kill");
        Ok(st)
    }

    fn exists(&self, path: &str) -> bool {
        self.dir(path).is_ok_and(|d| self.fs.exists(&d))
    }

    fn remove(&self, path: &str) -> Result<(), CgroupError> {
        let dir = self.dir(path)?;
        if !self.fs.exists(&dir) {
            return Ok(());
        }
        // cgroup.kill (5.14+) kills the whole subtree at once; older kernels get per-pid kills.
        let _ = self.fs.write(&dir.join("cgroup.kill"), "1");
        drain(self, path)?;
        self.fs.rmdir(&dir).map_err(|source| CgroupError::Io {
            path: dir.display().to_string(),
            op: "rmdir",
            source,
        })
    }
}

/// The value of `key` in a flat-keyed cgroup file (`key value` per line); 0 when absent.
fn keyed(content: &str, key: &str) -> u64 {
    content
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroupfs stand-in in a temp dir: ordinary files, and rmdir that removes the files a
    /// real cgroupfs directory would show.
    #[derive(Debug)]
    struct FakeFs;

    impl CgroupfsV2 for FakeFs {
        fn read(&self, path: &Path) -> io::Result<String> {
            std::fs::read_to_string(path)
        }
        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            std::fs::write(path, value)
        }
        fn mkdir(&self, path: &Path) -> io::Result<()> {
            std::fs::create_dir(path)
        }
        fn rmdir(&self, path: &Path) -> io::Result<()> {
            std::fs::remove_dir_all(path)
        }
        fn exists(&self, path: &Path) -> bool {
            path.is_dir()
        }
    }

    fn fake_root() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        std::fs::write(
            t.path().join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        t
    }

    #[test]
    fn create_makes_levels_enables_controllers_and_writes_limits() {
        let root = fake_root();
        let cg = CgroupsV2::new(root.path().to_path_buf(), FakeFs);
        let res = Resources {
            cpu_shares: Some(1024),
            cpu_quota: Some(50_000),
            cpu_period: Some(100_000),
            memory_limit: Some(64 << 20),
            pids_limit: Some(100),
            ..Resources::default()
        };
        cg.create("ferrolet/pod1/ctr1", &res).unwrap();
        let d = root.path().join("ferrolet/pod1/ctr1");
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&d.join("cpu.weight")), "39");
        assert_eq!(read(&d.join("cpu.max")), "50000 100000");
        assert_eq!(read(&d.join("memory.max")), (64u64 << 20).to_string());
        assert_eq!(read(&d.join("pids.max")), "100");
        for level in ["", "ferrolet", "ferrolet/pod1"] {
            assert_eq!(
                read(&root.path().join(level).join("cgroup.subtree_control")),
                "+cpuset +cpu +memory +pids",
                "level {level:?}"
            );
        }
        assert!(!d.join("cgroup.subtree_control").exists());
        assert!(cg.exists("ferrolet/pod1/ctr1"));
    }

    #[test]
    fn unlimited_quota_and_pids_are_written_as_max() {
        let root = fake_root();
        let cg = CgroupsV2::new(root.path().to_path_buf(), FakeFs);
        cg.create("ferrolet/c", &Resources::default()).unwrap();
        let res = Resources {
            cpu_period: Some(50_000),
            pids_limit: Some(-1),
            ..Resources::default()
        };
        cg.update("ferrolet/c", &res).unwrap();
        let d = root.path().join("ferrolet/c");
        assert_eq!(
            std::fs::read_to_string(d.join("cpu.max")).unwrap(),
            "max 50000"
        );
        assert_eq!(std::fs::read_to_string(d.join("pids.max")).unwrap(), "max");
    }

    #[test]
    fn failed_create_removes_the_levels_it_made() {
        let root = fake_root();
        std::fs::create_dir_all(root.path().join("ferrolet")).unwrap();
        let res = Resources {
            memory_limit: Some(1),
            ..Resources::default()
        };
        let cg = CgroupsV2::new(root.path().to_path_buf(), FailingWrite("memory.max"));
        let err = cg.create("ferrolet/bad/inner", &res).unwrap_err();
        assert!(err.to_string().contains("memory.max"), "{err}");
        assert!(!root.path().join("ferrolet/bad").exists());
        assert!(
            root.path().join("ferrolet").exists(),
            "pre-existing level kept"
        );
    }

    #[derive(Debug)]
    struct FailingWrite(&'static str);

    impl CgroupfsV2 for FailingWrite {
        fn read(&self, path: &Path) -> io::Result<String> {
            FakeFs.read(path)
        }
        fn write(&self, path: &Path, value: &str) -> io::Result<()> {
            if path.ends_with(self.0) {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            FakeFs.write(path, value)
        }
        fn mkdir(&self, path: &Path) -> io::Result<()> {
            FakeFs.mkdir(path)
        }
        fn rmdir(&self, path: &Path) -> io::Result<()> {
            FakeFs.rmdir(path)
        }
        fn exists(&self, path: &Path) -> bool {
            FakeFs.exists(path)
        }
    }

    #[test]
    fn stats_read_usage_working_set_pids_and_oom_kills() {
        let root = fake_root();
        let cg = CgroupsV2::new(root.path().to_path_buf(), FakeFs);
        cg.create("ferrolet/s", &Resources::default()).unwrap();
        let d = root.path().join("ferrolet/s");
        std::fs::write(d.join("cpu.stat"), "usage_usec 1500\nuser_usec 1000\n").unwrap();
        std::fs::write(d.join("memory.current"), "10000\n").unwrap();
        std::fs::write(d.join("memory.stat"), "anon 6000\ninactive_file 3000\n").unwrap();
        std::fs::write(d.join("pids.current"), "3\n").unwrap();
        std::fs::write(d.join("memory.events"), "low 0\noom 1\noom_kill 2\n").unwrap();
        let st = cg.stats("ferrolet/s").unwrap();
        assert_eq!(
            st,
            Stats {
                cpu_usage_ns: 1_500_000,
                memory_working_set: 7000,
                memory_usage: 10000,
                pids: 3,
                oom_kills: 2,
            }
        );
    }

    #[test]
    fn processes_and_remove() {
        let root = fake_root();
        let cg = CgroupsV2::new(root.path().to_path_buf(), FakeFs);
        cg.create("ferrolet/r", &Resources::default()).unwrap();
        cg.add_process("ferrolet/r", 4242).unwrap();
        assert_eq!(cg.processes("ferrolet/r").unwrap(), vec![4242]);
        std::fs::write(root.path().join("ferrolet/r/cgroup.procs"), "").unwrap();
        cg.remove("ferrolet/r").unwrap();
        assert!(!cg.exists("ferrolet/r"));
        cg.remove("ferrolet/r").unwrap();
        assert!(cg.create("../escape", &Resources::default()).is_err());
    }

    #[test]
    fn weight_conversion_bounds() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262_144), 10000);
        assert_eq!(shares_to_weight(0), 1);
    }
}
