//! Writes to `/proc/sys`, which answers for the network namespace of the writing thread.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
#[error("setting sysctl {key} = {value}: {source}")]
pub struct SysctlError {
    pub key: String,
    pub value: String,
    pub source: std::io::Error,
}

/// Sets `key` (dotted or slashed, e.g. `net.ipv4.ip_forward`) to `value`, skipping the
/// write when it already holds that value.
pub fn set(key: &str, value: &str) -> Result<(), SysctlError> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let err = |source| SysctlError {
        key: key.to_string(),
        value: value.to_string(),
        source,
    };
    if std::fs::read_to_string(&path).is_ok_and(|cur| cur.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(err)
}

/// A key under `net/ipv{4,6}/conf/<ifname>/`; interface names may contain dots, so the
/// path is built with slashes.
pub fn set_iface(family: &str, ifname: &str, leaf: &str, value: &str) -> Result<(), SysctlError> {
    let key = format!("net/{family}/conf/{ifname}/{leaf}");
    let path = PathBuf::from("/proc/sys").join(&key);
    let err = |source| SysctlError {
        key: key.clone(),
        value: value.to_string(),
        source,
    };
    if std::fs::read_to_string(&path).is_ok_and(|cur| cur.trim() == value) {
        return Ok(());
    }
    std::fs::write(&path, value).map_err(err)
}
