//! Linux capabilities: names, the default set containers get, and applying the five sets.

use serde::{Deserialize, Serialize};

/// Capability names in kernel number order (`CAP_CHOWN` is 0).
pub const NAMES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The set a non-privileged container starts with (the one containerd and CRI-O use).
pub const DEFAULT: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Errors about capabilities.
#[derive(Debug, thiserror::Error)]
pub enum CapsError {
    #[error("unknown capability {0:?}")]
    Unknown(String),
    #[error("{op}: {source}")]
    Syscall {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Normalises `sys_admin`, `SYS_ADMIN` and `CAP_SYS_ADMIN` to the kernel name, and checks it.
pub fn normalize(name: &str) -> Result<String, CapsError> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    if NAMES.contains(&full.as_str()) {
        Ok(full)
    } else {
        Err(CapsError::Unknown(name.to_string()))
    }
}

/// The kernel number of a capability name (with or without `CAP_`).
pub fn number(name: &str) -> Result<u32, CapsError> {
    let full = normalize(name)?;
    let idx = NAMES.iter().position(|n| *n == full);
    idx.and_then(|i| u32::try_from(i).ok())
        .ok_or_else(|| CapsError::Unknown(name.to_string()))
}

/// A set of capabilities as a bit mask.
pub fn mask<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<u64, CapsError> {
    names
        .into_iter()
        .try_fold(0u64, |acc, n| Ok(acc | (1u64 << number(n)?)))
}

/// Every capability this runtime knows, for privileged containers.
pub fn all_mask() -> u64 {
    (1u64 << NAMES.len()) - 1
}

/// The five sets as bit masks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapSets {
    pub bounding: u64,
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
    pub ambient: u64,
}

impl CapSets {
    /// Reads the OCI process capabilities.
    pub fn from_oci(c: &oci_spec::runtime::LinuxCapabilities) -> Result<Self, CapsError> {
        let conv = |set: &Option<oci_spec::runtime::Capabilities>| -> Result<u64, CapsError> {
            let Some(set) = set else { return Ok(0) };
            let mut m = 0u64;
            for cap in set {
                // The enum serialises to the kernel name; that is the one stable mapping.
                let name = serde_json::to_value(cap)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                m |= 1u64 << number(&name)?;
            }
            Ok(m)
        };
        Ok(CapSets {
            bounding: conv(c.bounding())?,
            effective: conv(c.effective())?,
            permitted: conv(c.permitted())?,
            inheritable: conv(c.inheritable())?,
            ambient: conv(c.ambient())?,
        })
    }
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
}

fn sys_err(op: &'static str) -> CapsError {
    CapsError::Syscall {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Drops from the bounding set everything not in `bounding`. Needs CAP_SETPCAP, so it runs
/// before the user switch.
pub fn drop_bounding(bounding: u64) -> Result<(), CapsError> {
    for cap in 0..=last_cap() {
        if cap < 64 && bounding & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only; no memory is passed.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
        if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(sys_err("drop bounding capability"));
        }
    }
    Ok(())
}

/// Keeps the permitted set across setuid from root (cleared again after the switch).
pub fn set_keep_caps(keep: bool) -> Result<(), CapsError> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, libc::c_ulong::from(keep), 0, 0, 0) };
    if r != 0 {
        return Err(sys_err("prctl(PR_SET_KEEPCAPS)"));
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;

/// Sets the effective, permitted and inheritable sets of the calling thread, then raises the
/// ambient ones (ambient capabilities must be permitted and inheritable).
pub fn apply_process_sets(sets: &CapSets) -> Result<(), CapsError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let split = |m: u64| (m as u32, (m >> 32) as u32);
    let (e0, e1) = split(sets.effective);
    let (p0, p1) = split(sets.permitted);
    let (i0, i1) = split(sets.inheritable);
    let mut data = [
        CapData {
            effective: e0,
            permitted: p0,
            inheritable: i0,
        },
        CapData {
            effective: e1,
            permitted: p1,
            inheritable: i1,
        },
    ];
    // SAFETY: header and data are valid, properly laid out (#[repr(C)]) structures of the
    // sizes capset(2) expects for version 3 (two data elements).
    let r = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, data.as_mut_ptr()) };
    if r != 0 {
        return Err(sys_err("capset"));
    }
    for cap in 0..64u32 {
        if sets.ambient & (1u64 << cap) == 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let r = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                libc::c_ulong::from(cap),
                0,
                0,
            )
        };
        if r != 0 {
            return Err(sys_err("raise ambient capability"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_numbers_and_masks() {
        assert_eq!(number("CAP_CHOWN").unwrap(), 0);
        assert_eq!(number("sys_admin").unwrap(), 21);
        assert_eq!(number("NET_ADMIN").unwrap(), 12);
        assert_eq!(number("CAP_CHECKPOINT_RESTORE").unwrap(), 40);
        assert!(matches!(number("CAP_FLY"), Err(CapsError::Unknown(_))));
        assert_eq!(mask(["CAP_CHOWN", "CAP_KILL"]).unwrap(), 0b10_0001);
        assert_eq!(all_mask().count_ones(), 41);
        assert_eq!(mask(DEFAULT).unwrap().count_ones(), 14);
    }

    #[test]
    fn oci_sets_are_read() {
        let c: oci_spec::runtime::LinuxCapabilities = serde_json::from_value(serde_json::json!({
            "bounding": ["CAP_KILL", "CAP_NET_ADMIN"],
            "effective": ["CAP_KILL"],
            "ambient": []
        }))
        .unwrap();
        let s = CapSets::from_oci(&c).unwrap();
        assert_eq!(s.bounding, (1 << 5) | (1 << 12));
        assert_eq!(s.effective, 1 << 5);
        assert_eq!(s.permitted, 0);
    }
}
