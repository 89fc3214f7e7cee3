//! The container's first process: runs in the child the monitor clones, already inside the
//! new namespaces, and turns itself into the container's program.
//!
//! This code runs in a single-threaded process (the monitor never starts threads), so it may
//! allocate and use the standard library freely. Any error goes back to the monitor through
//! a close-on-exec pipe; a successful exec closes the pipe without a word.

use std::convert::Infallible;
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use super::caps::{self, CapSets, CapsError};
use super::plan::{InitPlan, UserPlan};
use crate::mounts::{self, MountError};
use crate::namespaces::{self, Kind, NamespaceError};

/// Errors of the container's init process; their text is what the caller of Start sees.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("{0}")]
    Namespace(#[from] NamespaceError),
    #[error("{0}")]
    Mount(#[from] MountError),
    #[error("capabilities: {0}")]
    Caps(#[from] CapsError),
    #[error("set hostname {name:?}: {source}")]
    Hostname {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("write sysctl {key}: {source}")]
    Sysctl {
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setrlimit {resource}: {source}")]
    Rlimit {
        resource: u32,
        #[source]
        source: nix::Error,
    },
    #[error("user {0:?} not found in /etc/passwd of the container")]
    UnknownUser(String),
    #[error("read {path} of the container: {source}")]
    ReadUserDb {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}({id}): {source}")]
    SetId {
        op: &'static str,
        id: u32,
        #[source]
        source: nix::Error,
    },
    #[error("prctl(PR_SET_NO_NEW_PRIVS): {0}")]
    NoNewPrivs(std::io::Error),
    #[error("chdir to cwd {cwd:?} in the container: {source}")]
    Cwd {
        cwd: String,
        #[source]
        source: nix::Error,
    },
    #[error("executable file {0:?} not found in $PATH")]
    NotInPath(String),
    #[error("exec {path:?}: {source}")]
    Exec {
        path: String,
        #[source]
        source: nix::Error,
    },
    #[error("argument or environment contains a NUL byte: {0:?}")]
    Nul(String),
    #[error("set up stdio: {0}")]
    Stdio(nix::Error),
}

/// File descriptors the monitor hands to the child.
#[derive(Debug, Clone, Copy)]
pub struct InitFds {
    pub stdin: i32,
    pub stdout: i32,
    pub stderr: i32,
}

/// Sets up the container and execs its program. Returns only on error.
pub fn run(plan: &InitPlan, fds: InitFds) -> Result<Infallible, InitError> {
    // The monitor blocks signals for its signalfd; the program must start with none blocked
    // and default dispositions.
    reset_signals();
    let _ = nix::unistd::setsid();
    for (from, to) in [(fds.stdin, 0), (fds.stdout, 1), (fds.stderr, 2)] {
        if from != to {
            // SAFETY: dup2 on descriptors this process owns; it does not touch memory.
            if unsafe { libc::dup2(from, to) } < 0 {
                return Err(InitError::Stdio(nix::Error::last()));
            }
        }
    }

    for j in &plan.namespaces.join {
        if j.kind != Kind::Pid {
            namespaces::enter(j.kind, &j.path)?;
        }
    }

    mounts::make_private_root(MsFlags::from_bits_truncate(plan.root_propagation))?;
    let root = &plan.rootfs_mountpoint;
    mounts::mount_rootfs(&plan.rootfs, root)?;
    for m in &plan.mounts {
        mounts::mount_one(root, m)?;
    }
    mounts::create_devices(root, &plan.devices)?;
    mounts::pivot_root(root)?;
    for p in &plan.readonly_paths {
        mounts::readonly_path(p)?;
    }
    for p in &plan.masked_paths {
        mounts::mask_path(p)?;
    }
    if plan.readonly_root {
        mounts::remount_readonly(Path::new("/"))?;
    }

    if let Some(h) = &plan.hostname {
        nix::unistd::sethostname(h).map_err(|source| InitError::Hostname {
            name: h.clone(),
            source,
        })?;
    }
    for (k, v) in &plan.sysctl {
        let path = PathBuf::from("/proc/sys").join(k.replace('.', "/"));
        std::fs::write(&path, v).map_err(|source| InitError::Sysctl {
            key: k.clone(),
            source,
        })?;
    }
    for r in &plan.rlimits {
        set_rlimit(r.resource, r.soft, r.hard).map_err(|source| InitError::Rlimit {
            resource: r.resource,
            source,
        })?;
    }

    let (uid, gid, groups) = resolve_user(&plan.user)?;
    let env = with_home(&plan.env, uid);
    let exe = find_executable(&plan.args[0], &env)?;

    switch_user(uid, gid, &groups, &plan.caps)?;
    if plan.no_new_privs {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(InitError::NoNewPrivs(std::io::Error::last_os_error()));
        }
    }
    nix::unistd::chdir(plan.cwd.as_str()).map_err(|source| InitError::Cwd {
        cwd: plan.cwd.clone(),
        source,
    })?;

    close_other_fds();
    let c_exe = cstring(&exe)?;
    let c_args = plan
        .args
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env
        .iter()
        .map(|e| cstring(e))
        .collect::<Result<Vec<_>, _>>()?;
    let err = nix::unistd::execve(&c_exe, &c_args, &c_env).unwrap_err();
    Err(InitError::Exec {
        path: exe,
        source: err,
    })
}

/// Runs `args` as an additional process of a running container (exec): the caller has
/// already entered the container's namespaces and cgroup; this applies the container's user,
/// capabilities, environment and working directory, then execs. Returns only on error.
pub fn exec_process(plan: &InitPlan, args: &[String]) -> Result<Infallible, InitError> {
    reset_signals();
    let arg0 = args.first().ok_or(InitError::NotInPath(String::new()))?;
    let (uid, gid, groups) = resolve_user(&plan.user)?;
    let env = with_home(&plan.env, uid);
    let exe = find_executable(arg0, &env)?;
    switch_user(uid, gid, &groups, &plan.caps)?;
    if plan.no_new_privs {
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(InitError::NoNewPrivs(std::io::Error::last_os_error()));
        }
    }
    // Set after the user switch, which clears it: the exec'd process dies with its helper
    // when the shim gives up on it (ExecSync timeout).
    // SAFETY: prctl with integer arguments only.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    nix::unistd::chdir(plan.cwd.as_str()).map_err(|source| InitError::Cwd {
        cwd: plan.cwd.clone(),
        source,
    })?;
    close_other_fds();
    let c_exe = cstring(&exe)?;
    let c_args = args
        .iter()
        .map(|a| cstring(a))
        .collect::<Result<Vec<_>, _>>()?;
    let c_env = env
        .iter()
        .map(|e| cstring(e))
        .collect::<Result<Vec<_>, _>>()?;
    let err = nix::unistd::execve(&c_exe, &c_args, &c_env).unwrap_err();
    Err(InitError::Exec {
        path: exe,
        source: err,
    })
}

fn cstring(s: &str) -> Result<CString, InitError> {
    CString::new(s).map_err(|_| InitError::Nul(s.to_string()))
}

fn reset_signals() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, sigprocmask};
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing the default disposition runs no handler code of ours.
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    }
}

fn set_rlimit(resource: u32, soft: u64, hard: u64) -> Result<(), nix::Error> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit that lives across the call.
    let r = unsafe { libc::setrlimit(resource as _, &raw const lim) };
    if r != 0 {
        return Err(nix::Error::last());
    }
    Ok(())
}

/// A `/etc/passwd` entry: name, uid, gid, home.
fn passwd_entries(content: &str) -> impl Iterator<Item = (&str, u32, u32, &str)> {
    content.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        if f.len() < 4 {
            return None;
        }
        let uid = f[2].parse().ok()?;
        let gid = f[3].parse().ok()?;
        Some((f[0], uid, gid, f.get(5).copied().unwrap_or("/")))
    })
}

/// Groups from `/etc/group` that list `user` as a member.
fn member_groups(content: &str, user: &str) -> Vec<u32> {
    content
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let gid: u32 = f.get(2)?.parse().ok()?;
            f.get(3)?.split(',').any(|m| m == user).then_some(gid)
        })
        .collect()
}

fn read_db(path: &'static str) -> Result<String, InitError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(InitError::ReadUserDb { path, source }),
    }
}

/// Resolves the user inside the container's root, which is `/` by now.
fn resolve_user(user: &UserPlan) -> Result<(u32, u32, Vec<u32>), InitError> {
    match user {
        UserPlan::Ids {
            uid,
            gid,
            additional_gids,
        } => Ok((*uid, *gid, additional_gids.clone())),
        UserPlan::Name {
            name,
            gid,
            additional_gids,
        } => {
            let passwd = read_db("/etc/passwd")?;
            let (_, uid, pgid, _) = passwd_entries(&passwd)
                .find(|(n, ..)| n == name)
                .ok_or_else(|| InitError::UnknownUser(name.clone()))?;
            let mut groups = member_groups(&read_db("/etc/group")?, name);
            groups.extend(additional_gids);
            Ok((uid, gid.unwrap_or(pgid), groups))
        }
        UserPlan::Uid {
            uid,
            additional_gids,
        } => {
            let passwd = read_db("/etc/passwd")?;
            let entry = passwd_entries(&passwd).find(|(_, u, ..)| u == uid);
            let (gid, mut groups) = match entry {
                Some((name, _, gid, _)) => (gid, member_groups(&read_db("/etc/group")?, name)),
                None => (0, Vec::new()),
            };
            groups.extend(additional_gids);
            Ok((*uid, gid, groups))
        }
    }
}

/// Adds `HOME` from `/etc/passwd` when the spec does not set it (as other runtimes do).
fn with_home(env: &[String], uid: u32) -> Vec<String> {
    let mut out = env.to_vec();
    if !env.iter().any(|e| e.starts_with("HOME=")) {
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let home = passwd_entries(&passwd)
            .find(|(_, u, ..)| *u == uid)
            .map_or("/", |(.., h)| h);
        out.push(format!("HOME={home}"));
    }
    out
}

/// Finds the program like execvp would, but with the container's `PATH`.
fn find_executable(arg0: &str, env: &[String]) -> Result<String, InitError> {
    if arg0.contains('/') {
        return Ok(arg0.to_string());
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(arg0);
        if let Ok(md) = std::fs::metadata(&candidate)
            && md.is_file()
            && md.permissions().mode() & 0o111 != 0
        {
            return Ok(candidate.to_string_lossy().into_owned());
        }
    }
    Err(InitError::NotInPath(arg0.to_string()))
}

/// Drops the bounding set, switches to the user while keeping the permitted set, then sets
/// the capability sets the spec asks for.
fn switch_user(uid: u32, gid: u32, groups: &[u32], sets: &CapSets) -> Result<(), InitError> {
    caps::drop_bounding(sets.bounding)?;
    caps::set_keep_caps(true)?;
    let gids: Vec<nix::unistd::Gid> = groups
        .iter()
        .map(|g| nix::unistd::Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).map_err(|source| InitError::SetId {
        op: "setgroups",
        id: gid,
        source,
    })?;
    nix::unistd::setresgid(
        nix::unistd::Gid::from_raw(gid),
        nix::unistd::Gid::from_raw(gid),
        nix::unistd::Gid::from_raw(gid),
    )
    .map_err(|source| InitError::SetId {
        op: "setgid",
        id: gid,
        source,
    })?;
    nix::unistd::setresuid(
        nix::unistd::Uid::from_raw(uid),
        nix::unistd::Uid::from_raw(uid),
        nix::unistd::Uid::from_raw(uid),
    )
    .map_err(|source| InitError::SetId {
        op: "setuid",
        id: uid,
        source,
    })?;
    caps::set_keep_caps(false)?;
    caps::apply_process_sets(sets)?;
    Ok(())
}

/// Marks every descriptor above stderr close-on-exec so nothing of the monitor leaks in.
fn close_other_fds() {
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes descriptor flags of this process.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\nwww:x:33:34:www:/var/www:/bin/false\nbad line\n";
    const GROUP: &str = "root:x:0:\nwww:x:34:\nadm:x:4:www,root\nmail:x:8:other\n";

    #[test]
    fn passwd_and_group_parsing() {
        let e: Vec<_> = passwd_entries(PASSWD).collect();
        assert_eq!(
            e,
            vec![("root", 0, 0, "/root"), ("www", 33, 34, "/var/www")]
        );
        assert_eq!(member_groups(GROUP, "www"), vec![4]);
        assert!(member_groups(GROUP, "nobody").is_empty());
    }
}
