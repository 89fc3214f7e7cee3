//! Running extra processes in a container (CRI ExecSync): a helper process
//! (`ferrolet-shim exec`) enters the container's namespaces and cgroup, forks, and the child
//! becomes the command with the container's user and capabilities. The helper relays the
//! exit status. Namespaces are entered only in that single-threaded helper.

use std::os::fd::AsFd;
use std::path::Path;

use nix::sys::wait::{WaitStatus, waitpid};

use crate::container::init;
use crate::monitor::{CONFIG_FILE, MonitorConfig};

/// Exit code of the helper when it cannot set the command up (like `docker exec`).
pub const SETUP_FAILED: i32 = 126;

/// Entry point of `ferrolet-shim exec --pid PID [--tty] DIR -- ARGS`; returns the exit code.
/// With `tty` the helper's stdin is a terminal that becomes the command's controlling one.
pub fn main(pid: u32, dir: &Path, args: &[String], tty: bool) -> i32 {
    match run(pid, dir, args, tty) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("ferrolet-shim exec: {msg}");
            SETUP_FAILED
        }
    }
}

fn run(pid: u32, dir: &Path, args: &[String], tty: bool) -> Result<i32, String> {
    let data = std::fs::read(dir.join(CONFIG_FILE))
        .map_err(|e| format!("read {}: {e}", dir.join(CONFIG_FILE).display()))?;
    let cfg: MonitorConfig =
        serde_json::from_slice(&data).map_err(|e| format!("parse container config: {e}"))?;
    // Open every namespace before entering any: after the mount namespace changes, this
    // process's view of /proc is the container's.
    let mut files = Vec::new();
    for (name, flag) in [
        ("ipc", nix::sched::CloneFlags::CLONE_NEWIPC),
        ("uts", nix::sched::CloneFlags::CLONE_NEWUTS),
        ("net", nix::sched::CloneFlags::CLONE_NEWNET),
        ("pid", nix::sched::CloneFlags::CLONE_NEWPID),
        ("mnt", nix::sched::CloneFlags::CLONE_NEWNS),
    ] {
        let path = format!("/proc/{pid}/ns/{name}");
        let f = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
        files.push((name, flag, f));
    }
    if let Some(cg) = &cfg.cgroup {
        // This helper is single-threaded, so moving itself moves all of it, and the command
        // forked below starts in the cgroup too.
        let driver = cg.driver.open();
        match driver.self_join(&cg.path) {
            Ok(Some(join)) => join.join(),
            Ok(None) => driver.add_process(&cg.path, std::process::id()),
            Err(e) => Err(e),
        }
        .map_err(|e| format!("join the container's cgroup: {e}"))?;
    }
    for (name, flag, f) in &files {
        nix::sched::setns(f.as_fd(), *flag).map_err(|e| format!("enter {name} namespace: {e}"))?;
    }
    drop(files);
    // SAFETY: this helper is single-threaded, so the child is a consistent copy.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        nix::unistd::ForkResult::Child => {
            if tty {
                // A session of its own with the terminal as controlling terminal, so that
                // job control and ^C reach the command.
                let _ = nix::unistd::setsid();
                // SAFETY: TIOCSCTTY takes an integer argument and touches no memory.
                unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
            }
            let Err(e) = init::exec_process(&cfg.plan, args);
            eprintln!("ferrolet-shim exec: {e}");
            let code = if matches!(e, init::InitError::NotInPath(_)) {
                127
            } else {
                SETUP_FAILED
            };
            // SAFETY: ends the child without running the helper's exit handlers.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => loop {
            match waitpid(child, None) {
                Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                Ok(_) | Err(nix::Error::EINTR) => {}
                Err(e) => return Err(format!("wait for the command: {e}")),
            }
        },
    }
}
