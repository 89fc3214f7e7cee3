//! `ferrolet-pause`: the infra process of a pod.
//!
//! It holds the pod's namespaces open by doing nothing, exits 0 on SIGTERM or SIGINT, and reaps
//! every child that is handed to it, which matters when it runs as PID 1 of a PID namespace:
//! orphans of the pod are reparented to it and would otherwise stay zombies forever.
//!
//! It is built statically and stays free of an async runtime and of argument-parsing crates so
//! that the image holding it is a single small file.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

const VERSION: &str = env!("CARGO_PKG_VERSION");

static STOP: AtomicBool = AtomicBool::new(false);
static CHILD_EXITED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_child(_signal: libc::c_int) {
    CHILD_EXITED.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => {}
        (Some("-v" | "--version"), None) => {
            println!("ferrolet-pause {VERSION}");
            return ExitCode::SUCCESS;
        }
        (Some(other), _) => {
            let _ = writeln!(
                std::io::stderr(),
                "ferrolet-pause: unexpected argument {other:?}\nusage: ferrolet-pause [-v]"
            );
            return ExitCode::from(2);
        }
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(std::io::stderr(), "ferrolet-pause: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for signals until told to stop.
///
/// The three signals are blocked outside `sigsuspend`, so a signal that arrives between the
/// flag checks and the next suspend stays pending and wakes that suspend instead of being lost.
fn run() -> std::io::Result<()> {
    let watched = signal_set(&[libc::SIGTERM, libc::SIGINT, libc::SIGCHLD])?;
    // SAFETY: watched is an initialised sigset_t; the old mask is not wanted (null).
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &watched, std::ptr::null_mut()) })?;

    install(libc::SIGTERM, on_stop)?;
    install(libc::SIGINT, on_stop)?;
    install(libc::SIGCHLD, on_child)?;

    // Children may have been handed over before the handler existed.
    reap_children();
    let wait_mask = empty_signal_set()?;
    loop {
        if CHILD_EXITED.swap(false, Ordering::SeqCst) {
            reap_children();
        }
        if STOP.load(Ordering::SeqCst) {
            return Ok(());
        }
        // SAFETY: wait_mask is an initialised sigset_t. sigsuspend always returns -1 with
        // EINTR after a handler ran; there is nothing to check.
        unsafe { libc::sigsuspend(&wait_mask) };
    }
}

/// Collects the exit status of every child that has exited, without blocking.
fn reap_children() {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer; WNOHANG makes the call non-blocking.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        // 0: children remain but none has exited; -1: no children at all (ECHILD).
        if pid <= 0 {
            return;
        }
    }
}

fn install(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> std::io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags) that is then
    // filled in field by field.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = handler as libc::sighandler_t;
    // A stopped child needs no reaping, so only exits wake the loop.
    action.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
    // SAFETY: sa_mask is a valid sigset_t inside action.
    check(unsafe { libc::sigemptyset(&mut action.sa_mask) })?;
    // SAFETY: action is fully initialised; the handlers only store to atomics, which is
    // async-signal-safe.
    check(unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) })
}

fn empty_signal_set() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: set is a valid, writable sigset_t.
    check(unsafe { libc::sigemptyset(&mut set) })?;
    Ok(set)
}

fn signal_set(signals: &[libc::c_int]) -> std::io::Result<libc::sigset_t> {
    let mut set = empty_signal_set()?;
    for &signal in signals {
        // SAFETY: set is an initialised sigset_t and signal is a valid signal number.
        check(unsafe { libc::sigaddset(&mut set, signal) })?;
    }
    Ok(set)
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
