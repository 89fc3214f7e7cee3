//! A recording in-memory [`Runtime`] for unit tests. Containers run until the test ends
//! them with [`FakeRuntime::exit`], or exit at once with a code set by
//! [`FakeRuntime::exit_on_start`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ferrolet_cri::v1;

use super::{CriError, ExecResult, Runtime, SandboxStatus};

#[derive(Debug, Clone)]
struct Sandbox {
    config: v1::PodSandboxConfig,
    ready: bool,
    created_at: i64,
}

#[derive(Debug, Clone)]
struct Container {
    sandbox_id: String,
    config: v1::ContainerConfig,
    state: i32,
    created_at: i64,
    started_at: i64,
    finished_at: i64,
    exit_code: i32,
}

#[derive(Default)]
struct State {
    next_id: u64,
    clock: i64,
    sandboxes: HashMap<String, Sandbox>,
    containers: HashMap<String, Container>,
    images: Vec<String>,
    /// Sizes of images that have one (others count 0 bytes).
    image_sizes: HashMap<String, u64>,
    pinned_images: Vec<String>,
    /// Images whose removal fails.
    stuck_images: Vec<String>,
    /// Fails ImageFsInfo when set.
    image_fs_down: bool,
    exit_on_start: HashMap<String, i32>,
    calls: Vec<String>,
    sandbox_ip: Option<String>,
}

/// See the module docs.
#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

fn labels_match(have: &HashMap<String, String>, want: &HashMap<String, String>) -> bool {
    want.iter().all(|(k, v)| have.get(k) == Some(v))
}

impl FakeRuntime {
    /// A runtime that has `images` and gives sandboxes `sandbox_ip` (None: it leaves
    /// networking to the agent).
    pub fn new(images: &[&str], sandbox_ip: Option<&str>) -> FakeRuntime {
        let me = FakeRuntime::default();
        {
            let mut s = me.lock();
            s.images = images.iter().map(|s| (*s).to_owned()).collect();
            s.sandbox_ip = sandbox_ip.map(str::to_owned);
        }
        me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every call made, in order, as `Call target`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// Containers named `name` exit with `code` as soon as they start.
    pub fn exit_on_start(&self, name: &str, code: i32) {
        self.lock().exit_on_start.insert(name.to_owned(), code);
    }

    /// Stops auto-exiting containers named `name`.
    pub fn keep_running(&self, name: &str) {
        self.lock().exit_on_start.remove(name);
    }

    /// Ends every running container named `name` with `code`.
    pub fn exit(&self, name: &str, code: i32) {
        let mut s = self.lock();
        let now = s.tick();
        for c in s.containers.values_mut() {
            if c.config.metadata.as_ref().is_some_and(|m| m.name == name)
                && c.state == v1::ContainerState::ContainerRunning as i32
            {
                c.state = v1::ContainerState::ContainerExited as i32;
                c.exit_code = code;
                c.finished_at = now;
            }
        }
    }

    /// Names of containers in state running.
    pub fn running(&self) -> Vec<String> {
        let s = self.lock();
        let mut names: Vec<String> = s
            .containers
            .values()
            .filter(|c| c.state == v1::ContainerState::ContainerRunning as i32)
            .filter_map(|c| c.config.metadata.as_ref().map(|m| m.name.clone()))
            .collect();
        names.sort();
        names
    }

    pub fn sandbox_count(&self) -> usize {
        self.lock().sandboxes.len()
    }

    /// The config a sandbox was created with.
    pub fn sandbox_configs(&self) -> Vec<v1::PodSandboxConfig> {
        self.lock()
            .sandboxes
            .values()
            .map(|s| s.config.clone())
            .collect()
    }

    /// The config the newest container named `name` was created with.
    pub fn container_config(&self, name: &str) -> Option<v1::ContainerConfig> {
        let s = self.lock();
        s.containers
            .values()
            .filter(|c| c.config.metadata.as_ref().is_some_and(|m| m.name == name))
            .max_by_key(|c| c.created_at)
            .map(|c| c.config.clone())
    }

    /// Adds an image of `size` bytes; a pinned one is what runtimes report for their
    /// sandbox (pause) image.
    pub fn add_image(&self, name: &str, size: u64, pinned: bool) {
        let mut s = self.lock();
        s.images.push(name.to_owned());
        s.image_sizes.insert(name.to_owned(), size);
        if pinned {
            s.pinned_images.push(name.to_owned());
        }
    }

    /// Names of the images the runtime has, sorted.
    pub fn image_names(&self) -> Vec<String> {
        let mut names = self.lock().images.clone();
        names.sort();
        names
    }

    /// RemoveImage of `name` fails from now on.
    pub fn refuse_removal(&self, name: &str) {
        self.lock().stuck_images.push(name.to_owned());
    }

    /// ImageFsInfo fails from now on.
    pub fn break_image_fs(&self) {
        self.lock().image_fs_down = true;
    }

    fn record(&self, call: String) {
        self.lock().calls.push(call);
    }
}

impl State {
    /// Advances the fake clock: real time, but strictly increasing so order is visible.
    fn tick(&mut self) -> i64 {
        let real = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        self.clock = (self.clock + 1_000).max(real);
        self.clock
    }
}

fn not_found(call: &'static str, id: &str) -> CriError {
    CriError::Call {
        call,
        target: id.to_owned(),
        code: tonic::Code::NotFound,
        message: format!("{id} not found"),
    }
}

impl Runtime for FakeRuntime {
    async fn version(&self) -> Result<v1::VersionResponse, CriError> {
        Ok(v1::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "fake".into(),
            runtime_version: "1.0".into(),
            runtime_api_version: "v1".into(),
        })
    }

    async fn status(&self) -> Result<Vec<v1::RuntimeCondition>, CriError> {
        Ok(["RuntimeReady", "NetworkReady"]
            .iter()
            .map(|t| v1::RuntimeCondition {
                r#type: (*t).into(),
                status: true,
                ..Default::default()
            })
            .collect())
    }

    async fn run_pod_sandbox(&self, config: v1::PodSandboxConfig) -> Result<String, CriError> {
        let mut s = self.lock();
        s.next_id += 1;
        s.tick();
        let id = format!("sandbox-{}", s.next_id);
        let name = config
            .metadata
            .as_ref()
            .map(|m| format!("{}/{} attempt {}", m.namespace, m.name, m.attempt))
            .unwrap_or_default();
        s.calls.push(format!("RunPodSandbox {name}"));
        let created_at = s.clock;
        s.sandboxes.insert(
            id.clone(),
            Sandbox {
                config,
                ready: true,
                created_at,
            },
        );
        Ok(id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        self.record(format!("StopPodSandbox {id}"));
        let mut s = self.lock();
        let now = s.tick();
        if let Some(sb) = s.sandboxes.get_mut(id) {
            sb.ready = false;
        }
        for c in s.containers.values_mut().filter(|c| c.sandbox_id == id) {
            if c.state == v1::ContainerState::ContainerRunning as i32 {
                c.state = v1::ContainerState::ContainerExited as i32;
                c.exit_code = 137;
                c.finished_at = now;
            }
        }
        Ok(())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        self.record(format!("RemovePodSandbox {id}"));
        let mut s = self.lock();
        s.sandboxes.remove(id);
        s.containers.retain(|_, c| c.sandbox_id != id);
        Ok(())
    }

    async fn pod_sandbox_status(&self, id: &str) -> Result<Option<SandboxStatus>, CriError> {
        let s = self.lock();
        let Some(sb) = s.sandboxes.get(id) else {
            return Ok(None);
        };
        Ok(Some(SandboxStatus {
            status: v1::PodSandboxStatus {
                id: id.into(),
                metadata: sb.config.metadata.clone(),
                state: if sb.ready {
                    v1::PodSandboxState::SandboxReady as i32
                } else {
                    v1::PodSandboxState::SandboxNotready as i32
                },
                created_at: sb.created_at,
                network: s.sandbox_ip.as_ref().map(|ip| v1::PodSandboxNetworkStatus {
                    ip: ip.clone(),
                    additional_ips: Vec::new(),
                }),
                labels: sb.config.labels.clone(),
                annotations: sb.config.annotations.clone(),
                ..Default::default()
            },
            info: HashMap::from([("netns".to_owned(), format!("/run/netns/{id}"))]),
        }))
    }

    async fn list_pod_sandboxes(
        &self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<v1::PodSandbox>, CriError> {
        let s = self.lock();
        Ok(s.sandboxes
            .iter()
            .filter(|(_, sb)| labels_match(&sb.config.labels, &labels))
            .map(|(id, sb)| v1::PodSandbox {
                id: id.clone(),
                metadata: sb.config.metadata.clone(),
                state: if sb.ready {
                    v1::PodSandboxState::SandboxReady as i32
                } else {
                    v1::PodSandboxState::SandboxNotready as i32
                },
                created_at: sb.created_at,
                labels: sb.config.labels.clone(),
                annotations: sb.config.annotations.clone(),
                runtime_handler: String::new(),
            })
            .collect())
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: v1::ContainerConfig,
        _sandbox_config: v1::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut s = self.lock();
        if !s.sandboxes.contains_key(sandbox_id) {
            return Err(not_found("CreateContainer", sandbox_id));
        }
        s.next_id += 1;
        s.tick();
        let id = format!("container-{}", s.next_id);
        let meta = config.metadata.clone().unwrap_or_default();
        s.calls.push(format!(
            "CreateContainer {} attempt {}",
            meta.name, meta.attempt
        ));
        let created_at = s.clock;
        s.containers.insert(
            id.clone(),
            Container {
                sandbox_id: sandbox_id.into(),
                config,
                state: v1::ContainerState::ContainerCreated as i32,
                created_at,
                started_at: 0,
                finished_at: 0,
                exit_code: 0,
            },
        );
        Ok(id)
    }

    async fn start_container(&self, id: &str) -> Result<(), CriError> {
        let mut s = self.lock();
        let now = s.tick();
        let exit = {
            let Some(c) = s.containers.get(id) else {
                return Err(not_found("StartContainer", id));
            };
            let name = c.config.metadata.as_ref().map(|m| m.name.clone());
            name.and_then(|n| s.exit_on_start.get(&n).copied())
        };
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found("StartContainer", id))?;
        let name = c.config.metadata.as_ref().map(|m| m.name.clone());
        c.started_at = now;
        match exit {
            Some(code) => {
                c.state = v1::ContainerState::ContainerExited as i32;
                c.exit_code = code;
                c.finished_at = now;
            }
            None => c.state = v1::ContainerState::ContainerRunning as i32,
        }
        s.calls
            .push(format!("StartContainer {}", name.unwrap_or_default()));
        Ok(())
    }

    async fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<(), CriError> {
        let mut s = self.lock();
        let now = s.tick();
        let c = s
            .containers
            .get_mut(id)
            .ok_or_else(|| not_found("StopContainer", id))?;
        let name = c.config.metadata.as_ref().map(|m| m.name.clone());
        if c.state == v1::ContainerState::ContainerRunning as i32 {
            c.state = v1::ContainerState::ContainerExited as i32;
            c.exit_code = 143;
            c.finished_at = now;
        }
        s.calls.push(format!(
            "StopContainer {} {timeout_seconds}",
            name.unwrap_or_default()
        ));
        Ok(())
    }

    async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut s = self.lock();
        let c = s
            .containers
            .remove(id)
            .ok_or_else(|| not_found("RemoveContainer", id))?;
        let name = c.config.metadata.map(|m| m.name).unwrap_or_default();
        s.calls.push(format!("RemoveContainer {name}"));
        Ok(())
    }

    async fn list_containers(
        &self,
        sandbox_id: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<v1::Container>, CriError> {
        let s = self.lock();
        Ok(s.containers
            .iter()
            .filter(|(_, c)| sandbox_id.is_none_or(|id| c.sandbox_id == id))
            .filter(|(_, c)| labels_match(&c.config.labels, &labels))
            .map(|(id, c)| v1::Container {
                id: id.clone(),
                pod_sandbox_id: c.sandbox_id.clone(),
                metadata: c.config.metadata.clone(),
                image: c.config.image.clone(),
                image_ref: "sha256:fake".into(),
                state: c.state,
                created_at: c.created_at,
                labels: c.config.labels.clone(),
                annotations: c.config.annotations.clone(),
                image_id: String::new(),
            })
            .collect())
    }

    async fn container_status(&self, id: &str) -> Result<Option<v1::ContainerStatus>, CriError> {
        let s = self.lock();
        Ok(s.containers.get(id).map(|c| v1::ContainerStatus {
            id: id.into(),
            metadata: c.config.metadata.clone(),
            state: c.state,
            created_at: c.created_at,
            started_at: c.started_at,
            finished_at: c.finished_at,
            exit_code: c.exit_code,
            image: c.config.image.clone(),
            image_ref: "sha256:fake".into(),
            reason: if c.state == v1::ContainerState::ContainerExited as i32 {
                if c.exit_code == 0 {
                    "Completed"
                } else {
                    "Error"
                }
                .into()
            } else {
                String::new()
            },
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            ..Default::default()
        }))
    }

    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        _timeout: Duration,
    ) -> Result<ExecResult, CriError> {
        self.record(format!("ExecSync {id} {}", cmd.join(" ")));
        Ok(ExecResult::default())
    }

    async fn image_status(&self, image: &str) -> Result<Option<v1::Image>, CriError> {
        let s = self.lock();
        Ok(s.images.iter().any(|i| i == image).then(|| v1::Image {
            id: format!("sha256:{image}"),
            repo_tags: vec![image.into()],
            ..Default::default()
        }))
    }

    async fn pull_image(
        &self,
        image: &str,
        _sandbox_config: v1::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut s = self.lock();
        s.calls.push(format!("PullImage {image}"));
        if image.contains("missing") {
            return Err(CriError::Call {
                call: "PullImage",
                target: image.into(),
                code: tonic::Code::NotFound,
                message: format!("{image}: not found in registry"),
            });
        }
        s.images.push(image.into());
        Ok(format!("sha256:{image}"))
    }

    async fn list_images(&self) -> Result<Vec<v1::Image>, CriError> {
        let s = self.lock();
        Ok(s.images
            .iter()
            .map(|i| v1::Image {
                id: format!("sha256:{i}"),
                repo_tags: vec![i.clone()],
                size: s.image_sizes.get(i).copied().unwrap_or(0),
                pinned: s.pinned_images.contains(i),
                ..Default::default()
            })
            .collect())
    }

    async fn remove_image(&self, id: &str) -> Result<(), CriError> {
        let mut s = self.lock();
        s.calls.push(format!("RemoveImage {id}"));
        let name = id.strip_prefix("sha256:").unwrap_or(id).to_owned();
        if s.stuck_images.contains(&name) {
            return Err(CriError::Call {
                call: "RemoveImage",
                target: id.into(),
                code: tonic::Code::FailedPrecondition,
                message: format!("{name} is stuck"),
            });
        }
        s.images.retain(|i| *i != name);
        Ok(())
    }

    async fn image_fs_info(&self) -> Result<Vec<v1::FilesystemUsage>, CriError> {
        let s = self.lock();
        if s.image_fs_down {
            return Err(CriError::Call {
                call: "ImageFsInfo",
                target: String::new(),
                code: tonic::Code::Unavailable,
                message: "image store unreadable".into(),
            });
        }
        let used: u64 = s
            .images
            .iter()
            .map(|i| s.image_sizes.get(i).copied().unwrap_or(0))
            .sum();
        Ok(vec![v1::FilesystemUsage {
            timestamp: 0,
            fs_id: Some(v1::FilesystemIdentifier {
                mountpoint: "/fake/images".into(),
            }),
            used_bytes: Some(v1::UInt64Value { value: used }),
            inodes_used: None,
        }])
    }
}
