//! Facts about this host read from /proc, /sys and /etc: CPUs, memory, disk, PIDs, ids and
//! OS names. Read into a plain struct so node status is computed (and tested) from data.

use std::path::Path;

/// A snapshot of the host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SystemInfo {
    pub cpus: u64,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
    pub disk_bytes: u64,
    pub disk_available_bytes: u64,
    pub pid_max: u64,
    pub processes: u64,
    pub kernel_version: String,
    pub os_image: String,
    pub machine_id: String,
    pub system_uuid: String,
    pub boot_id: String,
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// `MemTotal`/`MemAvailable` style lines of /proc/meminfo, in bytes.
pub fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// `PRETTY_NAME` of an os-release file.
pub fn os_pretty_name(text: &str) -> Option<String> {
    text.lines().find_map(|l| {
        let v = l.strip_prefix("PRETTY_NAME=")?;
        Some(v.trim_matches('"').to_owned())
    })
}

fn statvfs(path: &Path) -> (u64, u64) {
    filesystem_bytes(path).unwrap_or((0, 0))
}

/// Total and available bytes of the filesystem holding `path`.
pub fn filesystem_bytes(path: &Path) -> std::io::Result<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut buf: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `buf` a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &raw mut buf) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    #[allow(
        clippy::unnecessary_cast,
        reason = "field widths differ between libc targets"
    )]
    let (blocks, available, frsize) = (
        buf.f_blocks as u64,
        buf.f_bavail as u64,
        buf.f_frsize as u64,
    );
    Ok((blocks * frsize.max(1), available * frsize.max(1)))
}

impl SystemInfo {
    /// Reads the host; `disk_path` is where pod data lives (the agent's root dir).
    pub fn read(disk_path: &Path) -> SystemInfo {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let cpus = std::fs::read_to_string("/proc/cpuinfo")
            .map(|t| t.lines().filter(|l| l.starts_with("processor")).count() as u64)
            .ok()
            .filter(|n| *n > 0)
            .or_else(|| {
                std::thread::available_parallelism()
                    .ok()
                    .map(|n| n.get() as u64)
            })
            .unwrap_or(1);
        let mut probe = disk_path.to_path_buf();
        while !probe.exists() {
            if !probe.pop() {
                break;
            }
        }
        let (disk_bytes, disk_available_bytes) = statvfs(&probe);
        let processes = std::fs::read_dir("/proc").map_or(0, |d| {
            d.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count() as u64
        });
        let machine_id = read_trim("/etc/machine-id");
        let system_uuid = Some(read_trim("/sys/class/dmi/id/product_uuid"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| machine_id.clone());
        SystemInfo {
            cpus,
            memory_bytes: meminfo_field(&meminfo, "MemTotal").unwrap_or(0),
            memory_available_bytes: meminfo_field(&meminfo, "MemAvailable").unwrap_or(0),
            disk_bytes,
            disk_available_bytes,
            pid_max: read_trim("/proc/sys/kernel/pid_max")
                .parse()
                .unwrap_or(32768),
            processes,
            kernel_version: read_trim("/proc/sys/kernel/osrelease"),
            os_image: os_pretty_name(
                &std::fs::read_to_string("/etc/os-release").unwrap_or_default(),
            )
            .unwrap_or_else(|| "Linux".into()),
            machine_id,
            system_uuid,
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_and_os_release_parse() {
        let m = "MemTotal:        2000 kB\nMemFree:  10 kB\nMemAvailable:    1000 kB\n";
        assert_eq!(meminfo_field(m, "MemTotal"), Some(2_048_000));
        assert_eq!(meminfo_field(m, "MemAvailable"), Some(1_024_000));
        assert_eq!(meminfo_field(m, "Nope"), None);
        assert_eq!(
            os_pretty_name("NAME=x\nPRETTY_NAME=\"Debian GNU/Linux 13\"\n").as_deref(),
            Some("Debian GNU/Linux 13")
        );
    }

    #[test]
    fn this_host_reads_sensibly() {
        let info = SystemInfo::read(Path::new("/tmp/does/not/exist"));
        assert!(info.cpus >= 1);
        assert!(info.memory_bytes > info.memory_available_bytes);
        assert!(
            info.disk_bytes > 0,
            "statvfs fell back to an existing parent"
        );
        assert!(!info.kernel_version.is_empty());
        assert!(info.processes > 0 && info.pid_max > info.processes);
    }
}
