//! Pod network namespaces kept alive as bind-mounted files, so the agent can run CNI plugins
//! on them and containers can join them by path.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// Errors of network namespace files.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("network namespace file {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("network namespace file {path}: {op}: {source}")]
    Sys {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: nix::Error,
    },
    #[error("network namespace thread panicked")]
    Thread,
}

/// Creates a new network namespace and pins it at `path`.
///
/// `unshare` changes the calling thread, so it runs on a thread of its own that ends right
/// after the bind mount; no shared (tokio) thread ever changes namespace.
pub fn create(path: &Path) -> Result<(), NetnsError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| NetnsError::Io {
            path: parent.to_path_buf(),
            op: "create dir",
            source,
        })?;
    }
    std::fs::File::create(path).map_err(|source| NetnsError::Io {
        path: path.to_path_buf(),
        op: "create",
        source,
    })?;
    let target = path.to_path_buf();
    let result = std::thread::spawn(move || -> Result<(), NetnsError> {
        let sys = |op| {
            let path = target.clone();
            move |source| NetnsError::Sys { path, op, source }
        };
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).map_err(sys("unshare"))?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        nix::mount::mount(
            Some(own.as_str()),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(sys("bind mount"))
    })
    .join()
    .map_err(|_| NetnsError::Thread)?;
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Unpins and removes the namespace file; a missing file is fine.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL | nix::Error::ENOENT) => {}
        Err(source) => {
            return Err(NetnsError::Sys {
                path: path.to_path_buf(),
                op: "unmount",
                source,
            });
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetnsError::Io {
            path: path.to_path_buf(),
            op: "remove",
            source: e,
        }),
        _ => Ok(()),
    }
}
