//! What the runtime says about one pod, reduced to what the pod logic decides on. Built from
//! CRI answers by the worker; built by hand in unit tests.

use std::time::{Duration, SystemTime};

/// Labels and annotations the agent puts on sandboxes and containers, named as the kubelet
/// names them so tools like `crictl` show the same.
pub mod labels {
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.container.name";
    /// Which agent made the object; sandboxes without it are not ours to clean up.
    pub const MANAGED_BY: &str = "ferrolet.io/managed-by";
    pub const MANAGED_BY_VALUE: &str = "ferrolet";
    pub const RESTART_COUNT: &str = "io.kubernetes.container.restartCount";
    pub const INIT_CONTAINER: &str = "ferrolet.io/init-container";
    pub const GRACE_PERIOD: &str = "io.kubernetes.pod.terminationGracePeriod";
}

/// The pod's sandbox as the runtime reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SandboxObs {
    pub id: String,
    pub ready: bool,
    pub attempt: u32,
    /// Pod IPs: the runtime's, or those CNI ADD gave.
    pub ips: Vec<String>,
}

/// CRI container states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Created,
    Running,
    Exited,
    Unknown,
}

/// One container attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerObs {
    pub id: String,
    pub name: String,
    pub attempt: u32,
    pub state: RunState,
    pub exit_code: i32,
    /// The runtime's reason (`Completed`, `Error`, `OOMKilled`), may be empty.
    pub reason: String,
    pub message: String,
    /// Nanoseconds since the epoch; 0 when not reached.
    pub created_at: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub image_ref: String,
}

impl ContainerObs {
    pub fn finished_time(&self) -> SystemTime {
        ns_to_system_time(self.finished_at)
    }
}

/// Nanoseconds since the epoch as a `SystemTime` (negative clamps to the epoch).
pub fn ns_to_system_time(ns: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(ns).unwrap_or(0))
}

/// Everything the runtime says about one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    /// The newest sandbox of the pod.
    pub sandbox: Option<SandboxObs>,
    /// The containers of that sandbox, every attempt still present.
    pub containers: Vec<ContainerObs>,
}

impl Observed {
    /// The newest attempt of container `name`.
    pub fn latest(&self, name: &str) -> Option<&ContainerObs> {
        self.containers
            .iter()
            .filter(|c| c.name == name)
            .max_by_key(|c| (c.attempt, c.created_at))
    }

    /// The attempt before the newest of container `name`.
    pub fn previous(&self, name: &str) -> Option<&ContainerObs> {
        let latest = self.latest(name)?;
        self.containers
            .iter()
            .filter(|c| c.name == name && c.id != latest.id)
            .max_by_key(|c| (c.attempt, c.created_at))
    }
}

/// Exited attempts of each container beyond its newest `keep` attempts, oldest included:
/// what garbage collection removes.
pub fn dead_beyond(obs: &Observed, keep: usize) -> Vec<String> {
    let mut by_name: std::collections::BTreeMap<&str, Vec<&ContainerObs>> =
        std::collections::BTreeMap::new();
    for c in &obs.containers {
        by_name.entry(c.name.as_str()).or_default().push(c);
    }
    let mut out = Vec::new();
    for attempts in by_name.values_mut() {
        attempts.sort_by_key(|c| std::cmp::Reverse((c.attempt, c.created_at)));
        out.extend(
            attempts
                .iter()
                .skip(keep)
                .filter(|c| c.state == RunState::Exited)
                .map(|c| c.id.clone()),
        );
    }
    out
}
