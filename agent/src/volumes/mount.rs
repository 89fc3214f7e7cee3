//! The mounts the agent makes itself: tmpfs for `emptyDir` with `medium: Memory` and for
//! secret and projected volumes (secrets never touch a disk). Behind [`Mounter`] so volume
//! logic is unit-tested with [`FakeMounter`]; [`HostMounter`] calls mount(2).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Mount operations on the host.
pub trait Mounter: Send + Sync + 'static {
    /// Mounts a fresh tmpfs at `target` (an existing directory), limited to `size_bytes`.
    fn mount_tmpfs(&self, target: &Path, size_bytes: Option<u64>) -> std::io::Result<()>;
    /// Detaches the mount at `target`.
    fn unmount(&self, target: &Path) -> std::io::Result<()>;
    /// Whether something is mounted at `target`.
    fn is_mounted(&self, target: &Path) -> bool;
    /// Mount points at or below `dir`, deepest first.
    fn mounts_under(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>>;
}

/// mount(2) and umount2(2) on this host's mount namespace.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostMounter;

fn c_path(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has a NUL byte"))
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let Some(d) = octal {
            let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in a mountinfo text that are `dir` or below it, deepest first.
pub fn mount_points_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut found: BTreeSet<PathBuf> = BTreeSet::new();
    for line in mountinfo.lines() {
        if let Some(point) = line.split(' ').nth(4) {
            let p = PathBuf::from(unescape(point));
            if p.starts_with(dir) {
                found.insert(p);
            }
        }
    }
    let mut v: Vec<PathBuf> = found.into_iter().collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

impl Mounter for HostMounter {
    fn mount_tmpfs(&self, target: &Path, size_bytes: Option<u64>) -> std::io::Result<()> {
        let source = c"tmpfs";
        let target_c = c_path(target)?;
        let mut data = String::from("mode=0755");
        if let Some(size) = size_bytes {
            data.push_str(&format!(",size={size}"));
        }
        let data_c = CString::new(data)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "mount data"))?;
        // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target_c.as_ptr(),
                source.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data_c.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> std::io::Result<()> {
        let target_c = c_path(target)?;
        // SAFETY: a valid NUL-terminated path that outlives the call.
        let rc = unsafe { libc::umount2(target_c.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn is_mounted(&self, target: &Path) -> bool {
        // A mount point sits on another device than its parent (enough for tmpfs).
        let (Ok(me), Some(Ok(parent))) = (
            std::fs::symlink_metadata(target),
            target.parent().map(std::fs::symlink_metadata),
        ) else {
            return false;
        };
        me.dev() != parent.dev()
    }

    fn mounts_under(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")?;
        Ok(mount_points_under(&text, dir))
    }
}

/// A recording mounter for unit tests: mounts are only remembered.
#[derive(Debug, Default)]
pub struct FakeMounter {
    state: Mutex<(BTreeSet<PathBuf>, Vec<String>)>,
}

impl FakeMounter {
    fn lock(&self) -> std::sync::MutexGuard<'_, (BTreeSet<PathBuf>, Vec<String>)> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `tmpfs <path> <size>` and `umount <path>` in call order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().1.clone()
    }

    pub fn mounted(&self) -> Vec<PathBuf> {
        self.lock().0.iter().cloned().collect()
    }
}

impl Mounter for FakeMounter {
    fn mount_tmpfs(&self, target: &Path, size_bytes: Option<u64>) -> std::io::Result<()> {
        let mut s = self.lock();
        s.0.insert(target.to_path_buf());
        let size = size_bytes.map_or_else(|| "-".to_owned(), |b| b.to_string());
        s.1.push(format!("tmpfs {} {size}", target.display()));
        Ok(())
    }

    fn unmount(&self, target: &Path) -> std::io::Result<()> {
        let mut s = self.lock();
        if !s.0.remove(target) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        s.1.push(format!("umount {}", target.display()));
        Ok(())
    }

    fn is_mounted(&self, target: &Path) -> bool {
        self.lock().0.contains(target)
    }

    fn mounts_under(&self, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = self
            .lock()
            .0
            .iter()
            .filter(|p| p.starts_with(dir))
            .cloned()
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_points_below_a_dir_are_found_unescaped_deepest_first() {
        let text = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
90 22 0:50 / /var/lib/ferrolet/pods/u/volumes/secret/creds rw,nosuid,nodev - tmpfs tmpfs rw
91 22 0:51 / /var/lib/ferrolet/pods/u/volumes/empty-dir/my\\040cache rw - tmpfs tmpfs rw
92 90 0:52 / /var/lib/ferrolet/pods/u/volumes/secret/creds/inner rw - tmpfs tmpfs rw
93 22 0:53 / /var/lib/ferrolet/pods/u2/volumes/secret/x rw - tmpfs tmpfs rw
";
        let got = mount_points_under(text, Path::new("/var/lib/ferrolet/pods/u"));
        assert_eq!(
            got,
            [
                PathBuf::from("/var/lib/ferrolet/pods/u/volumes/secret/creds/inner"),
                PathBuf::from("/var/lib/ferrolet/pods/u/volumes/empty-dir/my cache"),
                PathBuf::from("/var/lib/ferrolet/pods/u/volumes/secret/creds"),
            ]
        );
    }
}
