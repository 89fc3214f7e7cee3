//! Network namespace handles and running netlink work inside one.
//!
//! A netlink socket belongs to the namespace it was created in, whichever thread uses
//! it later. So a short-lived thread with a small stack enters the namespace, opens the
//! socket and exits (taking its namespace membership with it); the netlink work then
//! runs on the caller's thread. Keeping the tokio runtime, the connection and their
//! memory off that extra thread made a container-side step measurably cheaper.

use std::fs::File;
use std::future::Future;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use rtnetlink::sys::TokioSocket;

/// `_IO(0xb7, 0x3)`: which kind of namespace an nsfs fd refers to.
const NS_GET_NSTYPE: libc::Ioctl = 0xb703;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace {0} does not exist")]
    NotFound(PathBuf),
    #[error("{0} is not a network namespace")]
    NotNetns(PathBuf),
    #[error("opening network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("starting the netlink runtime in {path}: {source}")]
    Runtime {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the thread working in network namespace {0} panicked")]
    Panicked(PathBuf),
}

/// An open network namespace file.
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
}

impl Netns {
    /// Opens `path` and checks that it is a namespace file.
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let file = File::open(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                NetnsError::NotFound(path.to_path_buf())
            } else {
                NetnsError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
        let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| NetnsError::Open {
            path: path.to_path_buf(),
            source: e.into(),
        })?;
        // Namespace files, bind mounts of them and /proc/<pid>/ns/net all open as nsfs;
        // checking first keeps the ioctl below away from arbitrary devices.
        if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
            return Err(NetnsError::NotNetns(path.to_path_buf()));
        }
        // SAFETY: NS_GET_NSTYPE takes no argument and only reads the open fd's namespace.
        let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE) };
        if kind != libc::CLONE_NEWNET {
            return Err(NetnsError::NotNetns(path.to_path_buf()));
        }
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Runs `f` with an rtnetlink handle bound to this namespace, on the calling thread.
    pub fn run<F, Fut, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce(rtnetlink::Handle) -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let socket = self.netlink_socket()?;
        run_netlink(Some(socket), f).map_err(|source| NetnsError::Runtime {
            path: self.path.clone(),
            source,
        })
    }

    /// A blocking netlink route socket inside this namespace, opened on a dedicated
    /// thread.
    pub fn netlink_socket(&self) -> Result<OwnedFd, NetnsError> {
        let runtime = |source| NetnsError::Runtime {
            path: self.path.clone(),
            source,
        };
        std::thread::scope(|s| {
            // The thread makes two system calls; the default 2 MiB stack is waste.
            let worker = std::thread::Builder::new()
                .stack_size(64 << 10)
                .spawn_scoped(s, || {
                    nix::sched::setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(
                        |source| {
                            if source == nix::Error::EINVAL {
                                NetnsError::NotNetns(self.path.clone())
                            } else {
                                NetnsError::Enter {
                                    path: self.path.clone(),
                                    source,
                                }
                            }
                        },
                    )?;
                    // SAFETY: plain socket(2); the result is checked before use.
                    let fd = unsafe {
                        libc::socket(
                            libc::AF_NETLINK,
                            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                            libc::NETLINK_ROUTE,
                        )
                    };
                    if fd < 0 {
                        return Err(runtime(std::io::Error::last_os_error()));
                    }
                    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
                    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
                })
                .map_err(runtime)?;
            worker
                .join()
                .map_err(|_| NetnsError::Panicked(self.path.clone()))?
        })
    }
}

/// Runs `f` with an rtnetlink handle in the calling thread's namespace, on a
/// current-thread runtime. Plugins are short-lived processes, so the caller's thread
/// is the right place; library users inside a tokio runtime call this from
/// `spawn_blocking` or a thread of their own.
pub fn block_on_netlink<F, Fut, T>(f: F) -> Result<T, std::io::Error>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: Future<Output = T>,
{
    run_netlink(None, f)
}

/// Runs `f` on a current-thread runtime with a connection over `socket`, or over a new
/// socket in the calling thread's namespace.
fn run_netlink<F, Fut, T>(socket: Option<OwnedFd>, f: F) -> Result<T, std::io::Error>
where
    F: FnOnce(rtnetlink::Handle) -> Fut,
    Fut: Future<Output = T>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async {
        let (conn, handle, _) = match socket {
            None => rtnetlink::new_connection()?,
            Some(fd) => {
                // SAFETY: `fd` is an open netlink socket whose ownership moves into the
                // tokio socket; this runs inside the runtime its registration needs.
                let socket = unsafe { TokioSocket::from_raw_fd(fd.into_raw_fd()) };
                rtnetlink::from_socket(socket)
            }
        };
        let task = tokio::spawn(conn);
        let out = f(handle).await;
        task.abort();
        Ok(out)
    })
}
