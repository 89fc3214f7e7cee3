//! Where allocations live: one file per IP under `<dataDir>/<network>/`, holding
//! `<containerid>\r\n<ifname>`, plus `last_reserved_ip.<rangeset index>` and a `lock`
//! file; the same layout as the reference host-local, so either plugin can take over.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

const LINE_BREAK: &str = "\r\n";
const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: nix::Error },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// One allocation found in the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub ip: IpAddr,
    pub container_id: String,
    /// Empty for files written by old versions that stored the id alone.
    pub ifname: String,
}

/// Allocation state, held under a lock for as long as the value lives.
pub trait Store {
    /// Claims `ip` for (`id`, `ifname`); `false` when it is already taken.
    fn reserve(
        &mut self,
        id: &str,
        ifname: &str,
        ip: IpAddr,
        range_id: usize,
    ) -> Result<bool, StoreError>;
    fn last_reserved(&self, range_id: usize) -> Result<Option<IpAddr>, StoreError>;
    fn release(&mut self, ip: IpAddr) -> Result<(), StoreError>;
    fn allocations(&self) -> Result<Vec<Allocation>, StoreError>;

    /// Frees every IP of (`id`, `ifname`) and returns them.
    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        let mine: Vec<IpAddr> = self
            .allocations()?
            .into_iter()
            .filter(|a| a.container_id == id && (a.ifname == ifname || a.ifname.is_empty()))
            .map(|a| a.ip)
            .collect();
        for ip in &mine {
            self.release(*ip)?;
        }
        Ok(mine)
    }

    fn get_by_id(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        Ok(self
            .allocations()?
            .into_iter()
            .filter(|a| a.container_id == id && a.ifname == ifname)
            .map(|a| a.ip)
            .collect())
    }
}

/// The on-disk store of one network.
#[derive(Debug)]
pub struct DiskStore {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl DiskStore {
    /// Opens (creating) `<data_dir>/<network>` and takes its exclusive lock, waiting for
    /// other invocations on the same network.
    pub fn open(data_dir: &Path, network: &str) -> Result<Self, StoreError> {
        let dir = data_dir.join(network);
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let lock_path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, source)| StoreError::Lock {
                path: lock_path,
                source,
            })?;
        Ok(Self { dir, _lock: lock })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl DiskStore {
    /// IPs whose files name (`id`, `ifname`), or with `legacy` also `id` alone as old
    /// versions wrote it.
    /// Files whose size cannot match are skipped without being opened: a node with many
    /// containers pays one stat per allocation instead of an open, read and close.
    fn find(&self, id: &str, ifname: &str, legacy: bool) -> Result<Vec<IpAddr>, StoreError> {
        let full = (id.len() + LINE_BREAK.len() + ifname.len()) as u64;
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("listing", &self.dir))? {
            let entry = entry.map_err(io("listing", &self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let size = match entry.metadata() {
                Ok(m) => m.len(),
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("inspecting", &entry.path())(e)),
            };
            // Sizes from id.len() up to full + a trailing newline cover both layouts.
            if size < id.len() as u64 || size > full + 2 {
                continue;
            }
            let path = entry.path();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("reading", &path)(e)),
            };
            let mut lines = text.trim().lines();
            let (file_id, file_if) = (
                lines.next().unwrap_or_default().trim(),
                lines.next().unwrap_or_default().trim(),
            );
            if file_id == id && (file_if == ifname || (legacy && file_if.is_empty())) {
                out.push(ip);
            }
        }
        Ok(out)
    }
}

/// Replaces the contents of `path` with `data` without truncating it to zero first.
///
/// On ext4, truncating a file with data to zero length and writing it again makes the
/// close start writeback of the new data (the `auto_da_alloc` safeguard), which cost
/// up to milliseconds per ADD here; writing in place and then cutting the file to the
/// new length does not. Readers take the store lock, so none sees the file half done.
fn overwrite(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    f.write_all_at(data, 0)?;
    f.set_len(data.len() as u64)
}

impl Store for DiskStore {
    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        let mine = self.find(id, ifname, true)?;
        for ip in &mine {
            self.release(*ip)?;
        }
        Ok(mine)
    }

    fn get_by_id(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, StoreError> {
        self.find(id, ifname, false)
    }

    fn reserve(
        &mut self,
        id: &str,
        ifname: &str,
        ip: IpAddr,
        range_id: usize,
    ) -> Result<bool, StoreError> {
        let path = self.dir.join(ip.to_string());
        let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io("creating", &path)(e)),
        };
        if let Err(e) = f.write_all(format!("{id}{LINE_BREAK}{ifname}").as_bytes()) {
            let _ = std::fs::remove_file(&path);
            return Err(io("writing", &path)(e));
        }
        let last = self.dir.join(format!("{LAST_RESERVED_PREFIX}{range_id}"));
        overwrite(&last, ip.to_string().as_bytes()).map_err(io("writing", &last))?;
        Ok(true)
    }

    fn last_reserved(&self, range_id: usize) -> Result<Option<IpAddr>, StoreError> {
        let path = self.dir.join(format!("{LAST_RESERVED_PREFIX}{range_id}"));
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(s.trim().parse().ok()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &path)(e)),
        }
    }

    fn release(&mut self, ip: IpAddr) -> Result<(), StoreError> {
        let path = self.dir.join(ip.to_string());
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &path)(e)),
        }
    }

    fn allocations(&self) -> Result<Vec<Allocation>, StoreError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir).map_err(io("listing", &self.dir))? {
            let entry = entry.map_err(io("listing", &self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<IpAddr>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("reading", &path)(e)),
            };
            let mut lines = text.trim().lines();
            let container_id = lines.next().unwrap_or_default().trim().to_string();
            let ifname = lines.next().unwrap_or_default().trim().to_string();
            out.push(Allocation {
                ip,
                container_id,
                ifname,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_match_the_reference_layout() {
        let d = tempfile::tempdir().unwrap();
        let mut s = DiskStore::open(d.path(), "net1").unwrap();
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(s.reserve("c1", "eth0", ip, 0).unwrap());
        assert!(!s.reserve("c2", "eth0", ip, 0).unwrap());
        let dir = d.path().join("net1");
        assert_eq!(
            std::fs::read_to_string(dir.join("10.0.0.2")).unwrap(),
            "c1\r\neth0"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("last_reserved_ip.0")).unwrap(),
            "10.0.0.2"
        );
        assert!(dir.join("lock").exists());
        assert_eq!(s.get_by_id("c1", "eth0").unwrap(), vec![ip]);
        assert!(s.get_by_id("c1", "eth1").unwrap().is_empty());
        assert_eq!(s.release_by_id("c1", "eth0").unwrap(), vec![ip]);
        assert!(!dir.join("10.0.0.2").exists());
        assert_eq!(s.last_reserved(0).unwrap(), Some(ip));
    }

    #[test]
    fn last_reserved_is_rewritten_whole_when_it_gets_shorter() {
        let d = tempfile::tempdir().unwrap();
        let mut s = DiskStore::open(d.path(), "n").unwrap();
        let long: IpAddr = "10.0.100.200".parse().unwrap();
        let short: IpAddr = "10.0.0.3".parse().unwrap();
        assert!(s.reserve("c1", "eth0", long, 0).unwrap());
        assert!(s.reserve("c2", "eth0", short, 0).unwrap());
        assert_eq!(
            std::fs::read_to_string(d.path().join("n/last_reserved_ip.0")).unwrap(),
            "10.0.0.3"
        );
        assert_eq!(s.last_reserved(0).unwrap(), Some(short));
    }

    #[test]
    fn legacy_files_without_ifname_are_released_by_id() {
        let d = tempfile::tempdir().unwrap();
        let mut s = DiskStore::open(d.path(), "n").unwrap();
        std::fs::write(d.path().join("n/fd00::5"), "old").unwrap();
        assert_eq!(s.release_by_id("old", "eth0").unwrap().len(), 1);
    }

    #[test]
    fn lookups_skip_files_that_cannot_match_but_find_those_that_do() {
        let d = tempfile::tempdir().unwrap();
        let mut s = DiskStore::open(d.path(), "n").unwrap();
        let dir = d.path().join("n");
        // Written by hand with a trailing newline, and a same-length file of another id.
        std::fs::write(dir.join("10.0.0.9"), "c1\r\neth0\n").unwrap();
        std::fs::write(dir.join("10.0.0.8"), "c2\r\neth0").unwrap();
        std::fs::write(dir.join("10.0.0.7"), "a-much-longer-container-id\r\neth0").unwrap();
        let nine: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(s.get_by_id("c1", "eth0").unwrap(), vec![nine]);
        assert!(s.get_by_id("c1", "eth1").unwrap().is_empty());
        assert_eq!(s.release_by_id("c1", "eth0").unwrap(), vec![nine]);
        assert_eq!(s.allocations().unwrap().len(), 2);
    }
}
