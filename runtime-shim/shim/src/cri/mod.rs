//! The CRI server: pod sandboxes and containers over the OCI runtime, images over the image
//! store, served on a unix socket. `Shim` holds the logic with plain (blocking) methods;
//! `service` adapts it to the generated gRPC traits.

pub mod netns;
pub mod records;
pub mod service;
pub mod spec;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrolet_cri::v1;
use nix::sys::signal::Signal;

use crate::cgroups::{CgroupDriver, Resources};
use crate::container::{self, ContainerConfig, Runtime, RuntimeError, Status};
use crate::image::{ImageError, ImageStore};
use crate::mounts::RootfsSource;
use records::{ContainerRecord, SandboxRecord};
use spec::{Namespaces, NsMode, SandboxFiles};

/// Errors of CRI calls; each maps to a gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    DeadlineExceeded(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Internal(String),
}

impl From<RuntimeError> for CriError {
    fn from(e: RuntimeError) -> Self {
        match &e {
            RuntimeError::NotFound(_) => CriError::NotFound(e.to_string()),
            RuntimeError::InvalidId(_) | RuntimeError::Spec { .. } | RuntimeError::Mount { .. } => {
                CriError::InvalidArgument(e.to_string())
            }
            RuntimeError::AlreadyExists(_) => CriError::AlreadyExists(e.to_string()),
            RuntimeError::AlreadyStarted(_)
            | RuntimeError::NotRunning(_)
            | RuntimeError::StillRunning(_) => CriError::FailedPrecondition(e.to_string()),
            _ => CriError::Internal(e.to_string()),
        }
    }
}

impl From<ImageError> for CriError {
    fn from(e: ImageError) -> Self {
        match &e {
            ImageError::NotFound(_) => CriError::NotFound(e.to_string()),
            ImageError::BadReference { .. }
            | ImageError::Read { .. }
            | ImageError::Unpack { .. } => CriError::InvalidArgument(e.to_string()),
            _ => CriError::Internal(e.to_string()),
        }
    }
}

impl From<CriError> for tonic::Status {
    fn from(e: CriError) -> Self {
        let msg = e.to_string();
        match e {
            CriError::NotFound(_) => tonic::Status::not_found(msg),
            CriError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            CriError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            CriError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            CriError::DeadlineExceeded(_) => tonic::Status::deadline_exceeded(msg),
            CriError::Unimplemented(_) => tonic::Status::unimplemented(msg),
            CriError::Internal(_) => tonic::Status::internal(msg),
        }
    }
}

fn internal(what: &str) -> impl FnOnce(std::io::Error) -> CriError {
    let what = what.to_string();
    move |e| CriError::Internal(format!("{what}: {e}"))
}

/// Settings of a shim.
#[derive(Debug, Clone)]
pub struct ShimConfig {
    /// Persistent directory: images and the containers' writable layers.
    pub root: PathBuf,
    /// Volatile state: runtime and CRI records, sandbox files, mount points, network
    /// namespaces. Best on tmpfs (like `/run/containerd`); may be the same as `root`.
    pub state: PathBuf,
    /// The binary to re-exec as exec helper (normally the shim itself).
    pub exe: PathBuf,
    /// The binary run as each container's monitor with `monitor DIR`: the lean
    /// `ferrolet-monitor`, or the shim itself.
    pub monitor_exe: PathBuf,
    pub cgroups: CgroupDriver,
    /// Parent cgroup of pods that do not name one.
    pub cgroup_parent: String,
    pub pause_image: String,
    /// The static pause binary the pause image is built from when missing.
    pub pause_binary: Option<PathBuf>,
    /// Where the streaming server (Exec URLs) listens; loopback, port 0 for any.
    pub stream_address: std::net::SocketAddr,
}

/// A 64-hex-digit random id.
pub fn new_id() -> String {
    let mut buf = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut buf);
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// The shim's state and logic.
#[derive(Debug)]
pub struct Shim {
    cfg: ShimConfig,
    runtime: Runtime,
    pub images: Arc<ImageStore>,
    pub pulls: crate::image::pull::PullLocks,
    sandboxes: Mutex<HashMap<String, SandboxRecord>>,
    containers: Mutex<HashMap<String, ContainerRecord>>,
    events: tokio::sync::broadcast::Sender<v1::ContainerEventResponse>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The first id in `ids` that equals `want` or, failing that, the only one it prefixes.
fn match_id<'a>(ids: impl Iterator<Item = &'a String>, want: &str) -> Option<String> {
    let mut prefixed = Vec::new();
    for id in ids {
        if id == want {
            return Some(id.clone());
        }
        if !want.is_empty() && id.starts_with(want) {
            prefixed.push(id.clone());
        }
    }
    (prefixed.len() == 1).then(|| prefixed.remove(0))
}

fn labels_match(labels: &HashMap<String, String>, selector: &HashMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl Shim {
    /// Opens the state under `cfg.state` and `cfg.root` and recovers sandboxes and
    /// containers from it.
    pub fn open(cfg: ShimConfig) -> Result<Arc<Shim>, CriError> {
        let runtime = Runtime::new(&cfg.state, &cfg.monitor_exe, cfg.cgroups.clone())?;
        let images = Arc::new(ImageStore::open(cfg.root.join("images"))?);
        let sandboxes: HashMap<String, SandboxRecord> =
            records::load_all::<SandboxRecord>(&cfg.state.join("cri/sandboxes"))
                .into_iter()
                .map(|s| (s.id.clone(), s))
                .collect();
        let containers: HashMap<String, ContainerRecord> =
            records::load_all::<ContainerRecord>(&cfg.state.join("cri/containers"))
                .into_iter()
                .map(|c| (c.id.clone(), c))
                .collect();
        let (events, _) = tokio::sync::broadcast::channel(1024);
        let shim = Arc::new(Shim {
            cfg,
            runtime,
            images,
            pulls: crate::image::pull::PullLocks::default(),
            sandboxes: Mutex::new(sandboxes),
            containers: Mutex::new(containers),
            events,
        });
        shim.reconcile();
        Ok(shim)
    }

    pub fn config(&self) -> &ShimConfig {
        &self.cfg
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Removes runtime containers that no CRI record owns (a crash between the two writes).
    fn reconcile(&self) {
        let known: Vec<String> = {
            let s = lock(&self.sandboxes);
            let c = lock(&self.containers);
            s.keys().chain(c.keys()).cloned().collect()
        };
        if let Ok(ids) = self.runtime.list() {
            for id in ids.iter().filter(|id| !known.contains(id)) {
                tracing::warn!(container = %id, "removing a runtime container without a CRI record");
                let _ = self.runtime.delete(id, true);
                let _ = std::fs::remove_dir_all(self.snapshot_dir(id));
            }
        }
        // Writable layers whose container is unknown: the volatile state was lost (the host
        // rebooted and `state` is on tmpfs), so nothing will ever remove them otherwise.
        if let Ok(entries) = std::fs::read_dir(self.cfg.root.join("snapshots")) {
            for e in entries.flatten() {
                let id = e.file_name().to_string_lossy().into_owned();
                if !known.contains(&id) {
                    tracing::warn!(container = %id, "removing a writable layer without a container");
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// Ids of containers that are running now, to watch for their exits.
    pub fn running_containers(&self) -> Vec<String> {
        let ids: Vec<String> = lock(&self.containers).keys().cloned().collect();
        ids.into_iter()
            .filter(|id| {
                self.runtime
                    .state(id)
                    .is_ok_and(|s| s.status == Status::Running)
            })
            .collect()
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<v1::ContainerEventResponse> {
        self.events.subscribe()
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.cfg.state.join("cri/sandbox-files").join(id)
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.root.join("snapshots").join(id)
    }

    fn sandbox(&self, id: &str) -> Result<SandboxRecord, CriError> {
        let s = lock(&self.sandboxes);
        let key = match_id(s.keys(), id)
            .ok_or_else(|| CriError::NotFound(format!("pod sandbox {id:?} not found")))?;
        Ok(s[&key].clone())
    }

    fn container(&self, id: &str) -> Result<ContainerRecord, CriError> {
        let c = lock(&self.containers);
        let key = match_id(c.keys(), id)
            .ok_or_else(|| CriError::NotFound(format!("container {id:?} not found")))?;
        Ok(c[&key].clone())
    }

    fn save_sandbox(&self, rec: &SandboxRecord) -> Result<(), CriError> {
        records::save(&self.cfg.state.join("cri/sandboxes"), &rec.id, rec)
            .map_err(internal("save sandbox"))?;
        lock(&self.sandboxes).insert(rec.id.clone(), rec.clone());
        Ok(())
    }

    fn emit(&self, id: &str, kind: v1::ContainerEventType) {
        let status = self.container_status(id).ok();
        let sandbox = status
            .as_ref()
            .and(self.container(id).ok())
            .and_then(|c| self.sandbox_status(&c.sandbox_id).ok());
        let ev = v1::ContainerEventResponse {
            container_id: id.to_string(),
            container_event_type: kind as i32,
            created_at: container::now_ns(),
            pod_sandbox_status: sandbox,
            containers_statuses: status.into_iter().collect(),
        };
        let _ = self.events.send(ev);
    }

    /// Emits the stopped event of a container whose exit was just seen.
    pub fn container_exited(&self, id: &str) {
        tracing::debug!(container = id, "container exited");
        self.emit(id, v1::ContainerEventType::ContainerStoppedEvent);
    }

    // ---- sandboxes ----

    /// RunPodSandbox: network namespace, sandbox files, pod cgroup, pause container.
    pub fn run_pod_sandbox(&self, req: &v1::RunPodSandboxRequest) -> Result<String, CriError> {
        let config = req
            .config
            .as_ref()
            .ok_or_else(|| CriError::InvalidArgument("config is required".into()))?;
        let md = config
            .metadata
            .as_ref()
            .ok_or_else(|| CriError::InvalidArgument("config.metadata is required".into()))?;
        for (field, v) in [
            ("name", &md.name),
            ("uid", &md.uid),
            ("namespace", &md.namespace),
        ] {
            if v.is_empty() {
                return Err(CriError::InvalidArgument(format!(
                    "config.metadata.{field} is required"
                )));
            }
        }
        {
            let s = lock(&self.sandboxes);
            if let Some(other) = s.values().find(|o| {
                o.name == md.name
                    && o.uid == md.uid
                    && o.namespace == md.namespace
                    && o.attempt == md.attempt
            }) {
                return Err(CriError::AlreadyExists(format!(
                    "pod sandbox {}/{} attempt {} already exists as {}",
                    md.namespace, md.name, md.attempt, other.id
                )));
            }
        }
        let linux = config.linux.as_ref();
        let ns_opts = linux
            .and_then(|l| l.security_context.as_ref())
            .and_then(|s| s.namespace_options.clone())
            .unwrap_or_default();
        let id = new_id();
        let mut undo = Undo::default();
        let result = self.run_pod_sandbox_in(&id, config, linux, &ns_opts, req, &mut undo);
        if result.is_err() {
            undo.run(self);
        }
        result.map(|()| id)
    }

    fn run_pod_sandbox_in(
        &self,
        id: &str,
        config: &v1::PodSandboxConfig,
        linux: Option<&v1::LinuxPodSandboxConfig>,
        ns_opts: &v1::NamespaceOption,
        req: &v1::RunPodSandboxRequest,
        undo: &mut Undo,
    ) -> Result<(), CriError> {
        let md = config.metadata.clone().unwrap_or_default();
        let host_net = ns_opts.network == v1::NamespaceMode::Node as i32;
        let netns = if host_net {
            None
        } else {
            let p = self.cfg.state.join("netns").join(id);
            netns::create(&p).map_err(|e| CriError::Internal(e.to_string()))?;
            undo.netns = Some(p.clone());
            Some(p)
        };

        let files_dir = self.sandbox_dir(id);
        std::fs::create_dir_all(&files_dir).map_err(internal("create sandbox dir"))?;
        undo.files = Some(files_dir.clone());
        let hostname = if host_net {
            nix::unistd::gethostname()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else if config.hostname.is_empty() {
            md.name.clone()
        } else {
            config.hostname.clone()
        };
        let files = self.sandbox_files(id);
        let hosts = if host_net {
            std::fs::read_to_string("/etc/hosts").unwrap_or_default()
        } else {
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_string()
        };
        let resolv = match &config.dns_config {
            Some(d) if !d.servers.is_empty() || !d.searches.is_empty() || !d.options.is_empty() => {
                spec::resolv_conf(d)
            }
            _ => std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        };
        for (path, content) in [
            (&files.hosts, hosts),
            (&files.hostname, format!("{hostname}\n")),
            (&files.resolv_conf, resolv),
        ] {
            std::fs::write(path, content).map_err(internal("write sandbox file"))?;
        }

        let cgroup = linux
            .map(|l| l.cgroup_parent.trim_matches('/').to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| format!("{}/pod-{id}", self.cfg.cgroup_parent.trim_matches('/')));
        let pod_res = linux
            .and_then(|l| l.resources.as_ref())
            .map(resources_from_cri)
            .unwrap_or_default();
        self.cfg
            .cgroups
            .open()
            .create(&cgroup, &pod_res)
            .map_err(|e| CriError::InvalidArgument(format!("pod cgroup: {e}")))?;
        undo.cgroup = Some(cgroup.clone());

        let pause = self.pause_image()?;
        let ns = Namespaces {
            net: netns.clone().map_or(NsMode::Host, NsMode::Join),
            ipc: if ns_opts.ipc == v1::NamespaceMode::Node as i32 {
                NsMode::Host
            } else {
                NsMode::New
            },
            uts: if host_net { NsMode::Host } else { NsMode::New },
            pid: if ns_opts.pid == v1::NamespaceMode::Node as i32 {
                NsMode::Host
            } else {
                NsMode::New
            },
        };
        let mut args = pause.config.entrypoint.clone();
        args.extend(pause.config.cmd.iter().cloned());
        let sysctls = linux.map(|l| l.sysctls.clone()).unwrap_or_default();
        let pause_spec = spec::pause_spec(
            &args,
            Some(&hostname),
            &ns,
            &format!("{cgroup}/{id}"),
            &sysctls,
        )?;
        let snap = self.snapshot_dir(id);
        let (upper, work) = (snap.join("upper"), snap.join("work"));
        for d in [&upper, &work] {
            std::fs::create_dir_all(d).map_err(internal("create snapshot"))?;
        }
        undo.snapshot = Some(snap);
        self.runtime.create(ContainerConfig {
            id: id.to_string(),
            spec: pause_spec,
            rootfs: RootfsSource::Overlay {
                lower: self.images.lower_dirs(&pause),
                upper,
                work,
            },
            log_path: None,
            user: None,
        })?;
        undo.container = Some(id.to_string());
        let pid = self.runtime.start(id)?;
        let rec = SandboxRecord {
            id: id.to_string(),
            name: md.name.clone(),
            uid: md.uid.clone(),
            namespace: md.namespace.clone(),
            attempt: md.attempt,
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            created_at: container::now_ns(),
            ready: true,
            hostname,
            log_directory: config.log_directory.clone(),
            netns,
            cgroup,
            network_mode: ns_opts.network,
            pid_mode: ns_opts.pid,
            ipc_mode: ns_opts.ipc,
            runtime_handler: req.runtime_handler.clone(),
            pause_pid: Some(pid),
        };
        self.save_sandbox(&rec)?;
        tracing::info!(sandbox = id, pod = %md.name, namespace = %md.namespace, "pod sandbox running");
        Ok(())
    }

    fn sandbox_files(&self, id: &str) -> SandboxFiles {
        let d = self.sandbox_dir(id);
        SandboxFiles {
            hosts: d.join("hosts"),
            hostname: d.join("hostname"),
            resolv_conf: d.join("resolv.conf"),
        }
    }

    fn pause_image(&self) -> Result<crate::image::ImageRecord, CriError> {
        if let Some(r) = self.images.resolve(&self.cfg.pause_image) {
            return Ok(r);
        }
        let bin = self.cfg.pause_binary.as_ref().ok_or_else(|| {
            CriError::FailedPrecondition(format!(
                "pause image {} is not in the store and no pause binary is configured",
                self.cfg.pause_image
            ))
        })?;
        Ok(self.images.ensure_pause(&self.cfg.pause_image, bin)?)
    }

    /// Whether the sandbox's pause container still runs.
    fn sandbox_ready(&self, rec: &SandboxRecord) -> bool {
        rec.ready
            && self
                .runtime
                .state(&rec.id)
                .is_ok_and(|s| s.status == Status::Running)
    }

    fn containers_of(&self, sandbox_id: &str) -> Vec<String> {
        lock(&self.containers)
            .values()
            .filter(|c| c.sandbox_id == sandbox_id)
            .map(|c| c.id.clone())
            .collect()
    }

    /// StopPodSandbox: kills the pod's containers and pause, releases the network
    /// namespace. Idempotent.
    pub fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let mut rec = self.sandbox(id)?;
        for c in self.containers_of(&rec.id) {
            self.stop_container(&c, 0)?;
        }
        match self
            .runtime
            .stop(&rec.id, Signal::SIGKILL, Duration::from_secs(10))
        {
            Ok(_) | Err(RuntimeError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(p) = &rec.netns {
            netns::remove(p).map_err(|e| CriError::Internal(e.to_string()))?;
        }
        if rec.ready || rec.pause_pid.is_some() {
            rec.ready = false;
            rec.pause_pid = None;
            self.save_sandbox(&rec)?;
        }
        Ok(())
    }

    /// RemovePodSandbox: stops it and deletes everything of it. Unknown ids are fine.
    pub fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let rec = match self.sandbox(id) {
            Ok(r) => r,
            Err(CriError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.stop_pod_sandbox(&rec.id)?;
        for c in self.containers_of(&rec.id) {
            self.remove_container(&c)?;
        }
        let mut errors = Vec::new();
        match self.runtime.delete(&rec.id, true) {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(e) => errors.push(e.to_string()),
        }
        if let Err(e) = self.cfg.cgroups.open().remove(&rec.cgroup) {
            errors.push(e.to_string());
        }
        for d in [self.snapshot_dir(&rec.id), self.sandbox_dir(&rec.id)] {
            if let Err(e) = std::fs::remove_dir_all(&d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                errors.push(format!("remove {}: {e}", d.display()));
            }
        }
        if !errors.is_empty() {
            return Err(CriError::Internal(format!(
                "remove pod sandbox {}: {}",
                rec.id,
                errors.join("; ")
            )));
        }
        records::remove(&self.cfg.state.join("cri/sandboxes"), &rec.id)
            .map_err(internal("remove sandbox record"))?;
        lock(&self.sandboxes).remove(&rec.id);
        Ok(())
    }

    pub fn sandbox_status(&self, id: &str) -> Result<v1::PodSandboxStatus, CriError> {
        let rec = self.sandbox(id)?;
        let state = if self.sandbox_ready(&rec) {
            v1::PodSandboxState::SandboxReady
        } else {
            v1::PodSandboxState::SandboxNotready
        };
        Ok(v1::PodSandboxStatus {
            id: rec.id.clone(),
            metadata: Some(rec.metadata()),
            state: state as i32,
            created_at: rec.created_at,
            network: Some(v1::PodSandboxNetworkStatus::default()),
            linux: Some(v1::LinuxPodSandboxStatus {
                namespaces: Some(v1::Namespace {
                    options: Some(v1::NamespaceOption {
                        network: rec.network_mode,
                        pid: rec.pid_mode,
                        ipc: rec.ipc_mode,
                        ..Default::default()
                    }),
                }),
            }),
            labels: rec.labels.clone(),
            annotations: rec.annotations.clone(),
            runtime_handler: rec.runtime_handler.clone(),
        })
    }

    /// Information beside the status: where the network namespace is, for CNI.
    pub fn sandbox_info(&self, id: &str) -> HashMap<String, String> {
        let mut info = HashMap::new();
        if let Ok(rec) = self.sandbox(id) {
            let v = serde_json::json!({
                "netns": rec.netns,
                "pid": rec.pause_pid,
                "cgroup": rec.cgroup,
            });
            info.insert("info".to_string(), v.to_string());
            if let Some(p) = rec.netns {
                info.insert("netns".to_string(), p.display().to_string());
            }
        }
        info
    }

    pub fn list_pod_sandbox(&self, filter: Option<&v1::PodSandboxFilter>) -> Vec<v1::PodSandbox> {
        let recs: Vec<SandboxRecord> = lock(&self.sandboxes).values().cloned().collect();
        let mut out = Vec::new();
        for rec in recs {
            // The id and labels first: the state reads the sandbox's files and processes,
            // and an agent asks for one pod's sandboxes out of hundreds.
            if let Some(f) = filter
                && ((!f.id.is_empty() && !rec.id.starts_with(&f.id))
                    || !labels_match(&rec.labels, &f.label_selector))
            {
                continue;
            }
            let state = if self.sandbox_ready(&rec) {
                v1::PodSandboxState::SandboxReady
            } else {
                v1::PodSandboxState::SandboxNotready
            } as i32;
            if let Some(s) = filter.and_then(|f| f.state.as_ref())
                && s.state != state
            {
                continue;
            }
            out.push(v1::PodSandbox {
                id: rec.id.clone(),
                metadata: Some(rec.metadata()),
                state,
                created_at: rec.created_at,
                labels: rec.labels.clone(),
                annotations: rec.annotations.clone(),
                runtime_handler: rec.runtime_handler.clone(),
            });
        }
        out.sort_by_key(|s| s.created_at);
        out
    }

    // ---- containers ----

    pub fn create_container(&self, req: &v1::CreateContainerRequest) -> Result<String, CriError> {
        let sandbox = self.sandbox(&req.pod_sandbox_id)?;
        if !self.sandbox_ready(&sandbox) {
            return Err(CriError::FailedPrecondition(format!(
                "pod sandbox {} is not ready",
                sandbox.id
            )));
        }
        let config = req
            .config
            .as_ref()
            .ok_or_else(|| CriError::InvalidArgument("config is required".into()))?;
        let md = config
            .metadata
            .as_ref()
            .filter(|m| !m.name.is_empty())
            .ok_or_else(|| CriError::InvalidArgument("config.metadata.name is required".into()))?;
        let image_name = config
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .filter(|i| !i.is_empty())
            .ok_or_else(|| CriError::InvalidArgument("config.image.image is required".into()))?;
        let image = self
            .images
            .resolve(&image_name)
            .ok_or_else(|| CriError::NotFound(format!("image {image_name:?} not found")))?;
        {
            let c = lock(&self.containers);
            if let Some(other) = c.values().find(|o| {
                o.sandbox_id == sandbox.id && o.name == md.name && o.attempt == md.attempt
            }) {
                return Err(CriError::AlreadyExists(format!(
                    "container {:?} attempt {} already exists in pod sandbox {} as {}",
                    md.name, md.attempt, sandbox.id, other.id
                )));
            }
        }
        let pause_pid = sandbox.pause_pid.ok_or_else(|| {
            CriError::FailedPrecondition(format!("pod sandbox {} has no running pause", sandbox.id))
        })?;
        let pod_ns = |kind: &str| PathBuf::from(format!("/proc/{pause_pid}/ns/{kind}"));
        let ns = Namespaces {
            net: sandbox.netns.clone().map_or(NsMode::Host, NsMode::Join),
            ipc: if sandbox.ipc_mode == v1::NamespaceMode::Node as i32 {
                NsMode::Host
            } else {
                NsMode::Join(pod_ns("ipc"))
            },
            uts: if sandbox.network_mode == v1::NamespaceMode::Node as i32 {
                NsMode::Host
            } else {
                NsMode::Join(pod_ns("uts"))
            },
            pid: match container_pid_mode(config, &sandbox) {
                m if m == v1::NamespaceMode::Node as i32 => NsMode::Host,
                m if m == v1::NamespaceMode::Pod as i32 => NsMode::Join(pod_ns("pid")),
                _ => NsMode::New,
            },
        };
        let id = new_id();
        let plan = spec::container_spec(
            config,
            &image.config,
            &ns,
            &self.sandbox_files(&sandbox.id),
            &sandbox.hostname,
            &format!("{}/{id}", sandbox.cgroup),
        )?;
        let log_path = if sandbox.log_directory.is_empty() || config.log_path.is_empty() {
            String::new()
        } else {
            Path::new(&sandbox.log_directory)
                .join(&config.log_path)
                .display()
                .to_string()
        };
        let snap = self.snapshot_dir(&id);
        let (upper, work) = (snap.join("upper"), snap.join("work"));
        let made = [&upper, &work]
            .iter()
            .try_for_each(std::fs::create_dir_all)
            .map_err(internal("create snapshot"));
        let created = made.and_then(|()| {
            self.runtime
                .create(ContainerConfig {
                    id: id.clone(),
                    spec: plan.spec.clone(),
                    rootfs: RootfsSource::Overlay {
                        lower: self.images.lower_dirs(&image),
                        upper,
                        work,
                    },
                    log_path: (!log_path.is_empty()).then(|| PathBuf::from(&log_path)),
                    user: plan.user.clone(),
                })
                .map_err(CriError::from)
        });
        if let Err(e) = created {
            let _ = std::fs::remove_dir_all(&snap);
            return Err(e);
        }
        let stop_signal = stop_signal_of(config.stop_signal, &image.config.stop_signal);
        let user = plan.spec.process().as_ref().map(|p| p.user().clone());
        let rec = ContainerRecord {
            id: id.clone(),
            sandbox_id: sandbox.id.clone(),
            name: md.name.clone(),
            attempt: md.attempt,
            image: image_name,
            image_id: image.id.clone(),
            image_ref: image
                .repo_digests
                .first()
                .cloned()
                .unwrap_or(image.id.clone()),
            labels: config.labels.clone(),
            annotations: config.annotations.clone(),
            log_path,
            created_at: container::now_ns(),
            mounts: config
                .mounts
                .iter()
                .map(|m| {
                    (
                        m.container_path.clone(),
                        m.host_path.clone(),
                        m.readonly,
                        m.propagation,
                    )
                })
                .collect(),
            stop_signal,
            uid: user.as_ref().map(|u| i64::from(u.uid())),
            gid: user.as_ref().map(|u| i64::from(u.gid())),
        };
        if let Err(e) = records::save(&self.cfg.state.join("cri/containers"), &id, &rec) {
            let _ = self.runtime.delete(&id, true);
            let _ = std::fs::remove_dir_all(&snap);
            return Err(CriError::Internal(format!("save container record: {e}")));
        }
        lock(&self.containers).insert(id.clone(), rec);
        self.emit(&id, v1::ContainerEventType::ContainerCreatedEvent);
        Ok(id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let rec = self.container(id)?;
        let result = self.runtime.start(&rec.id);
        match result {
            Ok(_) => {
                self.emit(&rec.id, v1::ContainerEventType::ContainerStartedEvent);
                Ok(())
            }
            Err(e) => {
                self.emit(&rec.id, v1::ContainerEventType::ContainerStoppedEvent);
                Err(e.into())
            }
        }
    }

    /// StopContainer: the stop signal, `timeout` seconds, then SIGKILL. Stopped or never
    /// started containers are fine.
    pub fn stop_container(&self, id: &str, timeout: i64) -> Result<(), CriError> {
        let rec = self.container(id)?;
        let st = self.runtime.state(&rec.id)?;
        if st.status != Status::Running {
            return Ok(());
        }
        let sig = Signal::try_from(rec.stop_signal).unwrap_or(Signal::SIGTERM);
        let wait = Duration::from_secs(u64::try_from(timeout).unwrap_or(0));
        let st = self.runtime.stop(&rec.id, sig, wait)?;
        if st.status == Status::Running {
            return Err(CriError::Internal(format!(
                "container {} did not stop after SIGKILL",
                rec.id
            )));
        }
        Ok(())
    }

    /// RemoveContainer: kills it if needed and deletes it. Unknown ids are fine.
    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let rec = match self.container(id) {
            Ok(r) => r,
            Err(CriError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        match self.runtime.delete(&rec.id, true) {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let snap = self.snapshot_dir(&rec.id);
        if let Err(e) = std::fs::remove_dir_all(&snap)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(CriError::Internal(format!(
                "remove {}: {e}",
                snap.display()
            )));
        }
        records::remove(&self.cfg.state.join("cri/containers"), &rec.id)
            .map_err(internal("remove container record"))?;
        lock(&self.containers).remove(&rec.id);
        let ev = v1::ContainerEventResponse {
            container_id: rec.id.clone(),
            container_event_type: v1::ContainerEventType::ContainerDeletedEvent as i32,
            created_at: container::now_ns(),
            pod_sandbox_status: self.sandbox_status(&rec.sandbox_id).ok(),
            containers_statuses: Vec::new(),
        };
        let _ = self.events.send(ev);
        Ok(())
    }

    fn cri_state(&self, id: &str) -> (v1::ContainerState, Option<container::ContainerState>) {
        match self.runtime.state(id) {
            Ok(st) => {
                let s = match st.status {
                    Status::Created => v1::ContainerState::ContainerCreated,
                    Status::Running => v1::ContainerState::ContainerRunning,
                    Status::Stopped => v1::ContainerState::ContainerExited,
                };
                (s, Some(st))
            }
            Err(_) => (v1::ContainerState::ContainerUnknown, None),
        }
    }

    pub fn container_status(&self, id: &str) -> Result<v1::ContainerStatus, CriError> {
        let rec = self.container(id)?;
        let (state, st) = self.cri_state(&rec.id);
        let st = st.ok_or_else(|| {
            CriError::Internal(format!("container {} has no runtime state", rec.id))
        })?;
        let (reason, message) = match st.status {
            Status::Stopped if st.oom_killed => ("OOMKilled".to_string(), String::new()),
            Status::Stopped if st.message.is_some() && st.started_at.is_none() => (
                "StartError".to_string(),
                st.message.clone().unwrap_or_default(),
            ),
            Status::Stopped if st.exit_code == Some(0) => ("Completed".to_string(), String::new()),
            Status::Stopped => ("Error".to_string(), st.message.clone().unwrap_or_default()),
            _ => (String::new(), String::new()),
        };
        Ok(v1::ContainerStatus {
            id: rec.id.clone(),
            metadata: Some(rec.metadata()),
            state: state as i32,
            created_at: rec.created_at,
            started_at: st.started_at.unwrap_or(0),
            finished_at: if st.status == Status::Stopped {
                st.finished_at.unwrap_or(0)
            } else {
                0
            },
            exit_code: st.exit_code.unwrap_or(0),
            image: Some(rec.image_spec()),
            image_ref: rec.image_ref.clone(),
            reason,
            message,
            labels: rec.labels.clone(),
            annotations: rec.annotations.clone(),
            mounts: rec.cri_mounts(),
            log_path: rec.log_path.clone(),
            image_id: rec.image_id.clone(),
            user: rec.uid.map(|uid| v1::ContainerUser {
                linux: Some(v1::LinuxContainerUser {
                    uid,
                    gid: rec.gid.unwrap_or(0),
                    supplemental_groups: Vec::new(),
                }),
            }),
            ..Default::default()
        })
    }

    pub fn list_containers(&self, filter: Option<&v1::ContainerFilter>) -> Vec<v1::Container> {
        let recs: Vec<ContainerRecord> = lock(&self.containers).values().cloned().collect();
        let mut out = Vec::new();
        for rec in recs {
            if let Some(f) = filter {
                if !f.id.is_empty() && !rec.id.starts_with(&f.id) {
                    continue;
                }
                if !f.pod_sandbox_id.is_empty() && !rec.sandbox_id.starts_with(&f.pod_sandbox_id) {
                    continue;
                }
                if !labels_match(&rec.labels, &f.label_selector) {
                    continue;
                }
            }
            let (state, _) = self.cri_state(&rec.id);
            if let Some(s) = filter.and_then(|f| f.state.as_ref())
                && s.state != state as i32
            {
                continue;
            }
            out.push(v1::Container {
                id: rec.id.clone(),
                pod_sandbox_id: rec.sandbox_id.clone(),
                metadata: Some(rec.metadata()),
                image: Some(rec.image_spec()),
                image_ref: rec.image_ref.clone(),
                state: state as i32,
                created_at: rec.created_at,
                labels: rec.labels.clone(),
                annotations: rec.annotations.clone(),
                image_id: rec.image_id.clone(),
            });
        }
        out.sort_by_key(|c| c.created_at);
        out
    }

    pub fn reopen_log(&self, id: &str) -> Result<(), CriError> {
        let rec = self.container(id)?;
        Ok(self.runtime.reopen_log(&rec.id)?)
    }

    pub fn update_resources(
        &self,
        id: &str,
        res: Option<&v1::LinuxContainerResources>,
    ) -> Result<(), CriError> {
        let rec = self.container(id)?;
        let Some(res) = res else { return Ok(()) };
        let st = self.runtime.state(&rec.id)?;
        let path = st.cgroup_path.ok_or_else(|| {
            CriError::FailedPrecondition(format!("container {} has no cgroup", rec.id))
        })?;
        self.cfg
            .cgroups
            .open()
            .update(&path, &resources_from_cri(res))
            .map_err(|e| CriError::InvalidArgument(e.to_string()))
    }

    pub fn container_stats(&self, id: &str) -> Result<v1::ContainerStats, CriError> {
        let rec = self.container(id)?;
        let st = self.runtime.stats(&rec.id).unwrap_or_default();
        let now = container::now_ns();
        let (used, inodes) = dir_usage(&self.snapshot_dir(&rec.id).join("upper"));
        Ok(v1::ContainerStats {
            attributes: Some(v1::ContainerAttributes {
                id: rec.id.clone(),
                metadata: Some(rec.metadata()),
                labels: rec.labels.clone(),
                annotations: rec.annotations.clone(),
            }),
            cpu: Some(v1::CpuUsage {
                timestamp: now,
                usage_core_nano_seconds: Some(v1::UInt64Value {
                    value: st.cpu_usage_ns,
                }),
                ..Default::default()
            }),
            memory: Some(v1::MemoryUsage {
                timestamp: now,
                working_set_bytes: Some(v1::UInt64Value {
                    value: st.memory_working_set,
                }),
                usage_bytes: Some(v1::UInt64Value {
                    value: st.memory_usage,
                }),
                ..Default::default()
            }),
            writable_layer: Some(v1::FilesystemUsage {
                timestamp: now,
                fs_id: Some(v1::FilesystemIdentifier {
                    mountpoint: self.cfg.root.join("snapshots").display().to_string(),
                }),
                used_bytes: Some(v1::UInt64Value { value: used }),
                inodes_used: Some(v1::UInt64Value { value: inodes }),
            }),
            ..Default::default()
        })
    }

    pub fn list_container_stats(
        &self,
        filter: Option<&v1::ContainerStatsFilter>,
    ) -> Vec<v1::ContainerStats> {
        let cf = filter.map(|f| v1::ContainerFilter {
            id: f.id.clone(),
            pod_sandbox_id: f.pod_sandbox_id.clone(),
            label_selector: f.label_selector.clone(),
            state: None,
        });
        self.list_containers(cf.as_ref())
            .into_iter()
            .filter_map(|c| self.container_stats(&c.id).ok())
            .collect()
    }

    /// PodSandboxStats: the pod cgroup's usage (pids.current counts every process of the
    /// pod, pause included) and the stats of each of its containers.
    pub fn pod_sandbox_stats(&self, id: &str) -> Result<v1::PodSandboxStats, CriError> {
        let rec = self.sandbox(id)?;
        let st = self
            .cfg
            .cgroups
            .open()
            .stats(&rec.cgroup)
            .unwrap_or_default();
        let now = container::now_ns();
        let containers = self
            .containers_of(&rec.id)
            .iter()
            .filter_map(|c| self.container_stats(c).ok())
            .collect();
        Ok(v1::PodSandboxStats {
            attributes: Some(v1::PodSandboxAttributes {
                id: rec.id.clone(),
                metadata: Some(rec.metadata()),
                labels: rec.labels.clone(),
                annotations: rec.annotations.clone(),
            }),
            linux: Some(v1::LinuxPodSandboxStats {
                cpu: Some(v1::CpuUsage {
                    timestamp: now,
                    usage_core_nano_seconds: Some(v1::UInt64Value {
                        value: st.cpu_usage_ns,
                    }),
                    ..Default::default()
                }),
                memory: Some(v1::MemoryUsage {
                    timestamp: now,
                    working_set_bytes: Some(v1::UInt64Value {
                        value: st.memory_working_set,
                    }),
                    usage_bytes: Some(v1::UInt64Value {
                        value: st.memory_usage,
                    }),
                    ..Default::default()
                }),
                process: Some(v1::ProcessUsage {
                    timestamp: now,
                    process_count: Some(v1::UInt64Value { value: st.pids }),
                }),
                containers,
                ..Default::default()
            }),
            windows: None,
        })
    }

    /// ListPodSandboxStats with an id prefix and label filter.
    pub fn list_pod_sandbox_stats(
        &self,
        filter: Option<&v1::PodSandboxStatsFilter>,
    ) -> Vec<v1::PodSandboxStats> {
        let pf = filter.map(|f| v1::PodSandboxFilter {
            id: f.id.clone(),
            state: None,
            label_selector: f.label_selector.clone(),
        });
        self.list_pod_sandbox(pf.as_ref())
            .into_iter()
            .filter_map(|p| self.pod_sandbox_stats(&p.id).ok())
            .collect()
    }

    /// What ExecSync needs: the container's pid and state dir, if it runs.
    pub fn exec_target(&self, id: &str) -> Result<(u32, PathBuf), CriError> {
        let rec = self.container(id)?;
        let st = self.runtime.state(&rec.id)?;
        match (st.status, st.pid) {
            (Status::Running, Some(pid)) => Ok((pid, self.runtime.dir(&rec.id))),
            _ => Err(CriError::FailedPrecondition(format!(
                "container {} is not running",
                rec.id
            ))),
        }
    }

    /// Pids of the monitors of running containers (for exit watching).
    pub fn monitor_of(&self, id: &str) -> Option<(u32, u64)> {
        let data = std::fs::read(self.runtime.dir(id).join("state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&data).ok()?;
        let pid = u32::try_from(v["monitor_pid"].as_u64()?).ok()?;
        Some((pid, v["monitor_start"].as_u64()?))
    }

    // ---- images ----

    /// The id of the sandbox (pause) image, once the store has it.
    pub fn pause_image_id(&self) -> Option<String> {
        self.images.resolve(&self.cfg.pause_image).map(|p| p.id)
    }

    /// Image ids used by any container (refused by RemoveImage).
    pub fn images_in_use(&self) -> Vec<String> {
        let mut ids: Vec<String> = lock(&self.containers)
            .values()
            .map(|c| c.image_id.clone())
            .collect();
        if let Some(p) = self.images.resolve(&self.cfg.pause_image)
            && !lock(&self.sandboxes).is_empty()
        {
            ids.push(p.id);
        }
        ids
    }
}

fn container_pid_mode(config: &v1::ContainerConfig, sandbox: &SandboxRecord) -> i32 {
    config
        .linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.as_ref())
        .map_or(sandbox.pid_mode, |n| n.pid)
}

fn stop_signal_of(cri: i32, image: &str) -> i32 {
    use std::str::FromStr;
    let from_name = |n: &str| {
        let n = n.trim().to_ascii_uppercase();
        let n = if n.starts_with("SIG") {
            n
        } else {
            format!("SIG{n}")
        };
        Signal::from_str(&n).ok()
    };
    if cri != 0
        && let Ok(s) = v1::Signal::try_from(cri)
        && let Some(sig) = from_name(s.as_str_name())
    {
        return sig as i32;
    }
    if let Some(sig) = from_name(image) {
        return sig as i32;
    }
    if let Ok(n) = image.trim().parse::<i32>()
        && Signal::try_from(n).is_ok()
    {
        return n;
    }
    Signal::SIGTERM as i32
}

/// CRI container resources in runtime terms.
pub fn resources_from_cri(r: &v1::LinuxContainerResources) -> Resources {
    Resources {
        cpu_shares: u64::try_from(r.cpu_shares).ok().filter(|v| *v > 0),
        cpu_quota: Some(r.cpu_quota).filter(|v| *v > 0),
        cpu_period: u64::try_from(r.cpu_period).ok().filter(|v| *v > 0),
        cpuset_cpus: Some(r.cpuset_cpus.clone()).filter(|s| !s.is_empty()),
        cpuset_mems: Some(r.cpuset_mems.clone()).filter(|s| !s.is_empty()),
        memory_limit: Some(r.memory_limit_in_bytes).filter(|v| *v > 0),
        pids_limit: None,
        devices: Vec::new(),
    }
}

fn dir_usage(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut inodes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            inodes += 1;
            if let Ok(md) = e.metadata() {
                if md.is_dir() {
                    stack.push(e.path());
                } else {
                    bytes += md.len();
                }
            }
        }
    }
    (bytes, inodes)
}

/// What a failed RunPodSandbox created, undone in reverse.
#[derive(Debug, Default)]
struct Undo {
    netns: Option<PathBuf>,
    files: Option<PathBuf>,
    cgroup: Option<String>,
    snapshot: Option<PathBuf>,
    container: Option<String>,
}

impl Undo {
    fn run(self, shim: &Shim) {
        if let Some(id) = &self.container {
            let _ = shim.runtime.delete(id, true);
        }
        if let Some(p) = &self.snapshot {
            let _ = std::fs::remove_dir_all(p);
        }
        if let Some(cg) = &self.cgroup {
            let _ = shim.cfg.cgroups.open().remove(cg);
        }
        if let Some(p) = &self.files {
            let _ = std::fs::remove_dir_all(p);
        }
        if let Some(p) = &self.netns {
            let _ = netns::remove(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_match_exactly_or_by_unique_prefix() {
        let ids = ["abc1".to_string(), "abc2".to_string(), "xyz".to_string()];
        assert_eq!(match_id(ids.iter(), "abc1"), Some("abc1".into()));
        assert_eq!(match_id(ids.iter(), "x"), Some("xyz".into()));
        assert_eq!(match_id(ids.iter(), "abc"), None);
        assert_eq!(match_id(ids.iter(), ""), None);
        assert_eq!(new_id().len(), 64);
    }

    #[test]
    fn stop_signals_come_from_the_config_then_the_image() {
        assert_eq!(stop_signal_of(0, ""), Signal::SIGTERM as i32);
        assert_eq!(stop_signal_of(0, "SIGQUIT"), Signal::SIGQUIT as i32);
        assert_eq!(stop_signal_of(0, "usr1"), Signal::SIGUSR1 as i32);
        assert_eq!(stop_signal_of(0, "9"), 9);
        assert_eq!(
            stop_signal_of(v1::Signal::Sigint as i32, "SIGQUIT"),
            Signal::SIGINT as i32
        );
    }

    #[test]
    fn label_selectors_need_every_pair() {
        let labels: HashMap<String, String> = [
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]
        .into();
        assert!(labels_match(&labels, &HashMap::new()));
        assert!(labels_match(
            &labels,
            &[("a".to_string(), "1".to_string())].into()
        ));
        assert!(!labels_match(
            &labels,
            &[("a".to_string(), "2".to_string())].into()
        ));
    }
}
