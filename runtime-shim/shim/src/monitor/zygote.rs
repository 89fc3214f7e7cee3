//! The monitor zygote: one small single-threaded process, started once per runtime, that
//! forks a monitor for each container start.
//!
//! Starting a monitor by `fork` + `exec` from the shim costs about 2 ms on this machine: the
//! shim is large and multi-threaded, so its fork copies many page tables, and every exec of
//! a Rust binary pays the dynamic loader, its relocations and (in this VM) trapped `cpuid`
//! instructions. A pod start starts two monitors (pause and container). The zygote pays the
//! exec once; each start is then a message on a socket and the fork of a small process.
//!
//! Protocol, on a `SOCK_SEQPACKET` socket pair: the shim sends one packet whose bytes are
//! the container's state directory and whose one `SCM_RIGHTS` descriptor is the write end of
//! the report pipe; the zygote answers `ok` once it has forked, or an error text. The forked
//! process runs [`super::main`] as an exec'd monitor would, so the report, the detach and
//! everything after are the same. The zygote exits when the shim's end closes, which is how
//! a killed shim takes it along; running monitors do not depend on it.

use std::ffi::OsStr;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

/// Longest state directory path a request may carry.
const MAX_PATH: usize = 4096;
/// Answer of a successful fork.
const OK: &[u8] = b"ok";

/// The shim's handle on a running zygote.
#[derive(Debug)]
pub struct Zygote {
    sock: OwnedFd,
    child: std::process::Child,
}

/// Why a start through the zygote did not happen; the caller falls back to exec.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("zygote socket: {0}")]
    Socket(nix::Error),
    #[error("start zygote {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("zygote closed its socket")]
    Gone,
    #[error("zygote: {0}")]
    Refused(String),
}

impl Zygote {
    /// Starts `exe zygote --fd 3` with one end of a new socket pair as descriptor 3.
    pub fn spawn(exe: &Path) -> Result<Zygote, ZygoteError> {
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(ZygoteError::Socket)?;
        let raw = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["zygote", "--fd", "3"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        super::pass_as_fd_3(&mut cmd, raw);
        let child = cmd.spawn().map_err(|source| ZygoteError::Spawn {
            exe: exe.to_path_buf(),
            source,
        })?;
        drop(theirs);
        Ok(Zygote { sock: mine, child })
    }

    /// Asks the zygote to fork a monitor for the container in `dir` that reports on
    /// `report`. Returns once the fork happened.
    pub fn start(&self, dir: &Path, report: &OwnedFd) -> Result<(), ZygoteError> {
        let fds = [report.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        let bytes = dir.as_os_str().as_bytes();
        sendmsg::<()>(
            self.sock.as_raw_fd(),
            &[IoSlice::new(bytes)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| match e {
            nix::Error::EPIPE | nix::Error::ECONNRESET => ZygoteError::Gone,
            e => ZygoteError::Socket(e),
        })?;
        let mut answer = [0u8; 512];
        let n = loop {
            match nix::sys::socket::recv(self.sock.as_raw_fd(), &mut answer, MsgFlags::empty()) {
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(ZygoteError::Socket(e)),
                Ok(n) => break n,
            }
        };
        match &answer[..n] {
            [] => Err(ZygoteError::Gone),
            OK => Ok(()),
            other => Err(ZygoteError::Refused(
                String::from_utf8_lossy(other).into_owned(),
            )),
        }
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        // Closing our end makes the zygote exit; reap it so no zombie is left.
        let _ = nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        let _ = self.child.wait();
    }
}

/// A lazily started zygote shared by the clones of one runtime. A zygote that has died is
/// replaced on the next start.
#[derive(Debug, Default)]
pub struct ZygoteSlot(Mutex<Option<Zygote>>);

impl ZygoteSlot {
    /// The running zygote's pid, if one was started.
    pub fn pid(&self) -> Option<u32> {
        let slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        slot.as_ref().map(|z| z.child.id())
    }

    /// Forks a monitor through the zygote, starting one first if needed.
    pub fn start(&self, exe: &Path, dir: &Path, report: &OwnedFd) -> Result<(), ZygoteError> {
        let mut slot = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for _ in 0..2 {
            if slot.is_none() {
                *slot = Some(Zygote::spawn(exe)?);
            }
            let Some(z) = slot.as_ref() else { continue };
            match z.start(dir, report) {
                Err(ZygoteError::Gone) => {
                    tracing::warn!("monitor zygote went away; starting a new one");
                    *slot = None;
                }
                other => return other,
            }
        }
        Err(ZygoteError::Gone)
    }
}

/// Entry point of `ferrolet-monitor zygote --fd N`: serves fork requests on the socket
/// until the shim closes it. Returns the exit code.
pub fn main(fd: RawFd) -> i32 {
    // SAFETY: the shim passes its socket on this descriptor and nothing else owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // Every monitor opens the host's cgroups; find them once here.
    crate::cgroups::CgroupDriver::detect().prepare();
    // First monitor processes forked and not yet reaped; while there are any, wake up now
    // and then to reap them, so that none lingers as a zombie while no request comes.
    let mut unreaped = 0usize;
    loop {
        unreaped -= reap(unreaped);
        let timeout = if unreaped > 0 {
            PollTimeout::from(20u8)
        } else {
            PollTimeout::NONE
        };
        let mut fds = [PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) | Err(nix::Error::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return 1,
        }
        let mut buf = vec![0u8; MAX_PATH];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let (len, report) = {
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(nix::Error::EINTR) => continue,
                Err(_) => return 0,
                Ok(m) => m,
            };
            let mut report = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(fds) = c {
                        for fd in fds {
                            // SAFETY: the kernel installed this descriptor for us.
                            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                            if report.is_none() {
                                report = Some(owned);
                            }
                        }
                    }
                }
            }
            (msg.bytes, report)
        };
        if len == 0 {
            // The shim closed its end.
            return 0;
        }
        let dir = PathBuf::from(OsStr::from_bytes(&buf[..len]));
        let Some(report) = report else {
            answer(&sock, b"request without a report descriptor");
            continue;
        };
        // SAFETY: this process is single-threaded, so the child is a consistent copy.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                drop(sock);
                std::process::exit(run_monitor(&dir, report));
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => {
                unreaped += 1;
                drop(report);
                answer(&sock, OK);
            }
            Err(e) => answer(&sock, format!("fork: {e}").as_bytes()),
        }
    }
}

/// In the forked child: the container's `monitor.log` becomes stderr, as it is for an
/// exec'd monitor; then the monitor proper runs.
fn run_monitor(dir: &Path, report: OwnedFd) -> i32 {
    if let Ok(log) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(dir.join("monitor.log"))
    {
        // SAFETY: dup2 onto stderr of descriptors this process owns.
        unsafe { libc::dup2(log.as_raw_fd(), 2) };
    }
    let fd = report.as_raw_fd();
    std::mem::forget(report);
    super::main(dir, fd)
}

fn answer(sock: &OwnedFd, text: &[u8]) {
    let _ = nix::sys::socket::send(sock.as_raw_fd(), text, MsgFlags::MSG_NOSIGNAL);
}

/// Reaps what has exited of the `pending` short-lived first monitor processes (they exit
/// right after forking the long-lived one); returns how many.
fn reap(pending: usize) -> usize {
    let mut reaped = 0;
    while reaped < pending {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => break,
            Ok(_) => reaped += 1,
        }
    }
    reaped
}
