//! IPAM delegation for the bridge plugin, with an in-process path for our own
//! host-local.
//!
//! The spec's contract is "run the IPAM executable found in CNI_PATH". When that file
//! is the very `host-local` built alongside this `bridge` (same device and inode as our
//! sibling executable), running it as a process would execute this same code at the
//! cost of a fork, an exec and a second program start; so it is called directly. Any
//! other IPAM plugin, the reference host-local included, is executed as usual.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::invoke::{Command, DelegateError, Plugin, Request, exec_delegate, find_in_path};
use crate::spec::{CniError, CniResult};

use super::host_local::HostLocal;

/// Whether `found` is the host-local executable next to the running program.
fn is_our_host_local(found: &Path) -> bool {
    let Ok(me) = std::env::current_exe() else {
        return false;
    };
    let sibling = me.with_file_name("host-local");
    match (std::fs::metadata(found), std::fs::metadata(&sibling)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Runs IPAM plugin `name` for `command` with this invocation's configuration.
pub fn ipam(
    name: &str,
    command: Command,
    req: &Request,
) -> Result<Option<CniResult>, DelegateError> {
    let path = find_in_path(name, &req.path)?;
    if name != "host-local" || !is_our_host_local(&path) {
        return exec_delegate(name, command, req);
    }
    tracing::debug!(path = %path.display(), "host-local runs in process");
    let mut sub = req.clone();
    sub.command = command;
    let failed = |error: CniError| DelegateError::Failed {
        name: name.to_string(),
        error,
    };
    match command {
        Command::Add => HostLocal.add(&sub).map(Some).map_err(failed),
        Command::Del => HostLocal.del(&sub).map(|()| None).map_err(failed),
        Command::Check => HostLocal.check(&sub).map(|()| None).map_err(failed),
        Command::Status => HostLocal.status(&sub).map(|()| None).map_err(failed),
        Command::Gc => HostLocal.gc(&sub).map(|()| None).map_err(failed),
    }
}
