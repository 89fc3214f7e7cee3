//! What the CRI layer remembers about sandboxes and containers, on disk as JSON so that a
//! restarted shim serves the same pods.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferrolet_cri::v1;
use serde::{Deserialize, Serialize};

use crate::monitor::write_atomic;

/// A pod sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub attempt: u32,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    pub created_at: i64,
    /// False once stopped.
    pub ready: bool,
    pub hostname: String,
    pub log_directory: String,
    /// Pinned network namespace; `None` for host-network pods.
    pub netns: Option<PathBuf>,
    /// The pod's cgroup (parent of its containers' cgroups).
    pub cgroup: String,
    /// `NamespaceMode` values of the pod.
    pub network_mode: i32,
    pub pid_mode: i32,
    pub ipc_mode: i32,
    pub runtime_handler: String,
    /// Pid of the pause process while it runs, to join its namespaces.
    pub pause_pid: Option<u32>,
}

impl SandboxRecord {
    pub fn metadata(&self) -> v1::PodSandboxMetadata {
        v1::PodSandboxMetadata {
            name: self.name.clone(),
            uid: self.uid.clone(),
            namespace: self.namespace.clone(),
            attempt: self.attempt,
        }
    }
}

/// A container as CRI sees it (its process state lives in the OCI runtime).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub sandbox_id: String,
    pub name: String,
    pub attempt: u32,
    /// The image as the client named it.
    pub image: String,
    pub image_id: String,
    pub image_ref: String,
    pub labels: HashMap<String, String>,
    pub annotations: HashMap<String, String>,
    pub log_path: String,
    pub created_at: i64,
    /// `(container_path, host_path, readonly, propagation)` of the config's mounts.
    pub mounts: Vec<(String, String, bool, i32)>,
    /// Signal number for StopContainer.
    pub stop_signal: i32,
    pub uid: Option<i64>,
    pub gid: Option<i64>,
}

impl ContainerRecord {
    pub fn metadata(&self) -> v1::ContainerMetadata {
        v1::ContainerMetadata {
            name: self.name.clone(),
            attempt: self.attempt,
        }
    }

    pub fn image_spec(&self) -> v1::ImageSpec {
        v1::ImageSpec {
            image: self.image.clone(),
            ..Default::default()
        }
    }

    pub fn cri_mounts(&self) -> Vec<v1::Mount> {
        self.mounts
            .iter()
            .map(|(c, h, ro, p)| v1::Mount {
                container_path: c.clone(),
                host_path: h.clone(),
                readonly: *ro,
                propagation: *p,
                ..Default::default()
            })
            .collect()
    }
}

/// Saves a record as `dir/<id>.json`.
pub fn save<T: Serialize>(dir: &Path, id: &str, rec: &T) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let data = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
    write_atomic(dir, &format!("{id}.json"), &data)
}

/// Removes `dir/<id>.json`; missing is fine.
pub fn remove(dir: &Path, id: &str) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(format!("{id}.json"))) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Loads every record of a directory, skipping unreadable ones (with a warning).
pub fn load_all<T: for<'de> Deserialize<'de>>(dir: &Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&p).map(|d| serde_json::from_slice::<T>(&d)) {
            Ok(Ok(rec)) => out.push(rec),
            Ok(Err(err)) => tracing::warn!(path = %p.display(), %err, "unreadable record"),
            Err(err) => tracing::warn!(path = %p.display(), %err, "unreadable record"),
        }
    }
    out
}
