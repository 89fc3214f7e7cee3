//! Linux namespaces of a container: which ones are new, which are joined by path.
//!
//! Joining (`setns`) happens only in the container's own process, which is single-threaded
//! and created by the monitor, never on a shared tokio thread.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use oci_spec::runtime::{LinuxNamespace, LinuxNamespaceType};
use serde::{Deserialize, Serialize};

/// Errors about namespaces.
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("namespace {0} is listed twice")]
    Duplicate(&'static str),
    #[error("{0} namespaces are not supported")]
    Unsupported(&'static str),
    #[error("a container needs its own mount namespace (no path for \"mount\")")]
    MountMustBeNew,
    #[error("open {kind} namespace {path}: {source}")]
    Open {
        kind: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("join {kind} namespace {path}: {source}")]
    Join {
        kind: &'static str,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// The namespace kinds the runtime handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Mount,
    Uts,
    Ipc,
    Pid,
    Net,
    Cgroup,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mount => "mnt",
            Kind::Uts => "uts",
            Kind::Ipc => "ipc",
            Kind::Pid => "pid",
            Kind::Net => "net",
            Kind::Cgroup => "cgroup",
        }
    }

    pub fn clone_flag(self) -> CloneFlags {
        match self {
            Kind::Mount => CloneFlags::CLONE_NEWNS,
            Kind::Uts => CloneFlags::CLONE_NEWUTS,
            Kind::Ipc => CloneFlags::CLONE_NEWIPC,
            Kind::Pid => CloneFlags::CLONE_NEWPID,
            Kind::Net => CloneFlags::CLONE_NEWNET,
            Kind::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        }
    }

    fn from_oci(t: LinuxNamespaceType) -> Result<Self, NamespaceError> {
        Ok(match t {
            LinuxNamespaceType::Mount => Kind::Mount,
            LinuxNamespaceType::Uts => Kind::Uts,
            LinuxNamespaceType::Ipc => Kind::Ipc,
            LinuxNamespaceType::Pid => Kind::Pid,
            LinuxNamespaceType::Network => Kind::Net,
            LinuxNamespaceType::Cgroup => Kind::Cgroup,
            LinuxNamespaceType::User => return Err(NamespaceError::Unsupported("user")),
            LinuxNamespaceType::Time => return Err(NamespaceError::Unsupported("time")),
        })
    }
}

/// An existing namespace to enter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Join {
    pub kind: Kind,
    pub path: PathBuf,
}

/// New namespaces (created by clone) and joined ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespacePlan {
    pub new: Vec<Kind>,
    pub join: Vec<Join>,
}

impl NamespacePlan {
    /// Reads `linux.namespaces`; kinds not listed are shared with the host.
    pub fn from_oci(list: &[LinuxNamespace]) -> Result<Self, NamespaceError> {
        let mut plan = NamespacePlan::default();
        for ns in list {
            let kind = Kind::from_oci(ns.typ())?;
            if plan.new.contains(&kind) || plan.join.iter().any(|j| j.kind == kind) {
                return Err(NamespaceError::Duplicate(kind.name()));
            }
            match ns.path() {
                Some(p) if !p.as_os_str().is_empty() => {
                    if kind == Kind::Mount {
                        return Err(NamespaceError::MountMustBeNew);
                    }
                    plan.join.push(Join {
                        kind,
                        path: p.clone(),
                    });
                }
                _ => plan.new.push(kind),
            }
        }
        if !plan.new.contains(&Kind::Mount) {
            return Err(NamespaceError::MountMustBeNew);
        }
        Ok(plan)
    }

    /// Flags for clone(2): every new namespace.
    pub fn clone_flags(&self) -> CloneFlags {
        self.new
            .iter()
            .fold(CloneFlags::empty(), |acc, k| acc | k.clone_flag())
    }

    pub fn is_new(&self, kind: Kind) -> bool {
        self.new.contains(&kind)
    }

    /// The PID namespace to join, if any: it must be entered by the parent before clone,
    /// because setns on a PID namespace only applies to children.
    pub fn pid_join(&self) -> Option<&Path> {
        self.join
            .iter()
            .find(|j| j.kind == Kind::Pid)
            .map(|j| j.path.as_path())
    }
}

/// Enters the namespace at `path`. Changes the calling thread: call only from a dedicated,
/// single-threaded process (the container's init or the monitor).
pub fn enter(kind: Kind, path: &Path) -> Result<(), NamespaceError> {
    let f = std::fs::File::open(path).map_err(|source| NamespaceError::Open {
        kind: kind.name(),
        path: path.to_path_buf(),
        source,
    })?;
    nix::sched::setns(f.as_fd(), kind.clone_flag()).map_err(|source| NamespaceError::Join {
        kind: kind.name(),
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(v: serde_json::Value) -> Vec<LinuxNamespace> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn new_and_joined_namespaces_are_separated() {
        let plan = NamespacePlan::from_oci(&list(serde_json::json!([
            {"type": "mount"}, {"type": "pid"},
            {"type": "network", "path": "/run/netns/x"}, {"type": "ipc", "path": "/proc/1/ns/ipc"}
        ])))
        .unwrap();
        assert_eq!(plan.new, vec![Kind::Mount, Kind::Pid]);
        assert_eq!(plan.join.len(), 2);
        assert_eq!(
            plan.clone_flags(),
            CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID
        );
        assert_eq!(plan.pid_join(), None);
    }

    #[test]
    fn bad_namespace_lists_are_refused() {
        let dup = list(serde_json::json!([{"type": "mount"}, {"type": "mount"}]));
        assert!(matches!(
            NamespacePlan::from_oci(&dup),
            Err(NamespaceError::Duplicate("mnt"))
        ));
        let user = list(serde_json::json!([{"type": "mount"}, {"type": "user"}]));
        assert!(matches!(
            NamespacePlan::from_oci(&user),
            Err(NamespaceError::Unsupported("user"))
        ));
        let no_mnt = list(serde_json::json!([{"type": "pid"}]));
        assert!(matches!(
            NamespacePlan::from_oci(&no_mnt),
            Err(NamespaceError::MountMustBeNew)
        ));
    }
}
