//! The pause program run as a real process: signals, exit codes and zombie reaping as PID 1.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const PAUSE: &str = env!("CARGO_BIN_EXE_ferrolet-pause");
const DEADLINE: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// Kills what a test started if the test ends early, so no process outlives it.
struct KillOnDrop {
    pids: Vec<libc::pid_t>,
    children: Vec<Child>,
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.pids {
            send(pid, libc::SIGKILL);
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn send(pid: libc::pid_t, signal: libc::c_int) {
    // SAFETY: kill has no memory-safety preconditions; a stale pid only yields ESRCH.
    unsafe { libc::kill(pid, signal) };
}

fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    poll("the process to exit", || {
        child.try_wait().expect("try_wait")
    })
}

/// True once `pid` has installed a handler for `signal` (the `SigCgt` mask in /proc), which is
/// when the pause program is ready: a signal sent before that would hit the default action.
fn catches(pid: libc::pid_t, signal: libc::c_int) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (signal - 1)) != 0)
}

fn children_of(pid: libc::pid_t) -> Vec<libc::pid_t> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn stat_state(pid: libc::pid_t) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name, which may itself contain ") ".
    stat.rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next())
}

fn pid_of(child: &Child) -> libc::pid_t {
    libc::pid_t::try_from(child.id()).expect("pid fits pid_t")
}

fn spawn_pause() -> Child {
    Command::new(PAUSE)
        .stdin(Stdio::null())
        .spawn()
        .expect("start ferrolet-pause")
}

fn exits_zero_on(signal: libc::c_int) {
    let mut guard = KillOnDrop {
        pids: Vec::new(),
        children: vec![spawn_pause()],
    };
    let pid = pid_of(&guard.children[0]);
    poll("the signal handlers", || catches(pid, signal).then_some(()));
    assert_eq!(
        guard.children[0].try_wait().expect("try_wait"),
        None,
        "pause exited before it was signalled"
    );
    send(pid, signal);
    let status = wait_exit(&mut guard.children[0]);
    assert_eq!(status.code(), Some(0), "pause exit status: {status:?}");
}

#[test]
fn exits_zero_on_sigterm() {
    exits_zero_on(libc::SIGTERM);
}

#[test]
fn exits_zero_on_sigint() {
    exits_zero_on(libc::SIGINT);
}

#[test]
fn version_flag_prints_version() {
    let out = Command::new(PAUSE)
        .arg("-v")
        .output()
        .expect("run pause -v");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ferrolet-pause {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_argument_is_rejected() {
    let out = Command::new(PAUSE)
        .arg("--frobnicate")
        .output()
        .expect("run pause");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unexpected argument \"--frobnicate\""),
        "{stderr}"
    );
}

/// Runs pause as PID 1 of a new PID namespace, hands it an orphan through a shell that exits,
/// kills the orphan and checks it does not stay a zombie. Needs root (unshare, nsenter).
#[test]
fn reaps_orphans_as_pid_1() {
    assert!(
        Path::new("/usr/bin/unshare").exists() && Path::new("/usr/bin/nsenter").exists(),
        "this test needs util-linux unshare and nsenter"
    );
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child", PAUSE])
        .stdin(Stdio::null())
        .spawn()
        .expect("start unshare");
    let mut guard = KillOnDrop {
        pids: Vec::new(),
        children: vec![unshare],
    };
    let unshare_pid = pid_of(&guard.children[0]);
    let pause_pid = poll("pause to start under unshare", || {
        let pause = *children_of(unshare_pid).first()?;
        catches(pause, libc::SIGCHLD).then_some(pause)
    });
    guard.pids.push(pause_pid);

    // The shell runs inside pause's PID namespace and exits at once, so its `sleep` is
    // reparented to the namespace's init: pause.
    let status = Command::new("nsenter")
        .args(["--target", &pause_pid.to_string(), "--pid", "--"])
        .args(["/bin/sh", "-c", "sleep 1000 & exit 0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run nsenter");
    assert!(status.success(), "nsenter: {status:?}");
    let orphan = poll("the orphan to be reparented to pause", || {
        children_of(pause_pid).into_iter().find(|&child| {
            std::fs::read_to_string(format!("/proc/{child}/comm"))
                .is_ok_and(|c| c.trim() == "sleep")
        })
    });
    guard.pids.push(orphan);

    send(orphan, libc::SIGKILL);
    let deadline = Instant::now() + DEADLINE;
    while let Some(state) = stat_state(orphan) {
        assert!(
            Instant::now() < deadline,
            "orphan {orphan} was not reaped by pause as PID 1 (state {state})"
        );
        std::thread::sleep(POLL);
    }
    assert!(
        children_of(pause_pid).is_empty(),
        "pause still has children: {:?}",
        children_of(pause_pid)
    );

    // From the parent namespace SIGTERM reaches a namespace init only because pause handles it.
    send(pause_pid, libc::SIGTERM);
    let status = wait_exit(&mut guard.children[0]);
    assert_eq!(
        status.code(),
        Some(0),
        "pause as PID 1 exit status: {status:?}"
    );
}
