//! The agent's view of its container runtime: the CRI calls it makes, behind [`Runtime`] so
//! pod workers are unit-tested against a recording fake, and [`CriRuntime`], the real client
//! over a CRI unix socket (ferrolet-shim or containerd).

#[cfg(test)]
pub mod fake;

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrolet_cri::v1;
use ferrolet_cri::v1::image_service_client::ImageServiceClient;
use ferrolet_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::Channel;

/// A failed CRI call, naming the call and the object it was about.
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connecting to the CRI runtime at {path}: {message}")]
    Connect { path: PathBuf, message: String },
    #[error("CRI {call} {target}: {code:?}: {message}")]
    Call {
        call: &'static str,
        target: String,
        code: tonic::Code,
        message: String,
    },
    #[error("CRI {call} {target}: no answer within {timeout:?}")]
    Timeout {
        call: &'static str,
        target: String,
        timeout: Duration,
    },
    #[error("CRI {call} {target}: the runtime's answer lacks {what}")]
    Incomplete {
        call: &'static str,
        target: String,
        what: &'static str,
    },
}

impl CriError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, CriError::Call { code, .. } if *code == tonic::Code::NotFound)
    }
}

/// The outcome of `ExecSync`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecResult {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The CRI calls the agent makes. Label maps filter as CRI's `label_selector` does (all must
/// match).
pub trait Runtime: Send + Sync + 'static {
    fn version(&self) -> impl Future<Output = Result<v1::VersionResponse, CriError>> + Send;
    /// The runtime's conditions (`RuntimeReady`, `NetworkReady`).
    fn status(&self) -> impl Future<Output = Result<Vec<v1::RuntimeCondition>, CriError>> + Send;

    fn run_pod_sandbox(
        &self,
        config: v1::PodSandboxConfig,
    ) -> impl Future<Output = Result<String, CriError>> + Send;
    fn stop_pod_sandbox(&self, id: &str) -> impl Future<Output = Result<(), CriError>> + Send;
    fn remove_pod_sandbox(&self, id: &str) -> impl Future<Output = Result<(), CriError>> + Send;
    /// The sandbox's status and the runtime's verbose info, or `None` if it is gone.
    fn pod_sandbox_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<SandboxStatus>, CriError>> + Send;
    fn list_pod_sandboxes(
        &self,
        labels: HashMap<String, String>,
    ) -> impl Future<Output = Result<Vec<v1::PodSandbox>, CriError>> + Send;

    fn create_container(
        &self,
        sandbox_id: &str,
        config: v1::ContainerConfig,
        sandbox_config: v1::PodSandboxConfig,
    ) -> impl Future<Output = Result<String, CriError>> + Send;
    fn start_container(&self, id: &str) -> impl Future<Output = Result<(), CriError>> + Send;
    /// Stops with SIGTERM, then SIGKILL after `timeout_seconds`.
    fn stop_container(
        &self,
        id: &str,
        timeout_seconds: i64,
    ) -> impl Future<Output = Result<(), CriError>> + Send;
    fn remove_container(&self, id: &str) -> impl Future<Output = Result<(), CriError>> + Send;
    fn list_containers(
        &self,
        sandbox_id: Option<&str>,
        labels: HashMap<String, String>,
    ) -> impl Future<Output = Result<Vec<v1::Container>, CriError>> + Send;
    /// `None` if the container is gone.
    fn container_status(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<v1::ContainerStatus>, CriError>> + Send;
    fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> impl Future<Output = Result<ExecResult, CriError>> + Send;

    /// The image if the runtime has it.
    fn image_status(
        &self,
        image: &str,
    ) -> impl Future<Output = Result<Option<v1::Image>, CriError>> + Send;
    /// Pulls and returns the image reference the runtime resolved.
    fn pull_image(
        &self,
        image: &str,
        sandbox_config: v1::PodSandboxConfig,
    ) -> impl Future<Output = Result<String, CriError>> + Send;
    /// Every image the runtime has.
    fn list_images(&self) -> impl Future<Output = Result<Vec<v1::Image>, CriError>> + Send;
    /// Removes an image by id; an image already gone is not an error.
    fn remove_image(&self, id: &str) -> impl Future<Output = Result<(), CriError>> + Send;
    /// Usage of the filesystem(s) holding images.
    fn image_fs_info(
        &self,
    ) -> impl Future<Output = Result<Vec<v1::FilesystemUsage>, CriError>> + Send;
}

/// `PodSandboxStatus` plus the runtime's verbose `info` (where runtimes put the netns path).
#[derive(Debug, Clone, Default)]
pub struct SandboxStatus {
    pub status: v1::PodSandboxStatus,
    pub info: HashMap<String, String>,
}

/// Per-call deadline; pulls get longer. A hung runtime call fails one pod sync, never the agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
const PULL_TIMEOUT: Duration = Duration::from_secs(600);

/// The real CRI client.
#[derive(Clone, Debug)]
pub struct CriRuntime {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

impl CriRuntime {
    /// Connects to the CRI socket at `path`.
    pub async fn connect(path: &Path) -> Result<CriRuntime, CriError> {
        let channel = ferrolet_cri::connect_unix(path)
            .await
            .map_err(|e| CriError::Connect {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(CriRuntime {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}

async fn call<T>(
    name: &'static str,
    target: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CriError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(status)) => Err(CriError::Call {
            call: name,
            target: target.to_owned(),
            code: status.code(),
            message: status.message().to_owned(),
        }),
        Err(_) => Err(CriError::Timeout {
            call: name,
            target: target.to_owned(),
            timeout,
        }),
    }
}

fn not_found_is_none<T>(r: Result<T, CriError>) -> Result<Option<T>, CriError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

impl Runtime for CriRuntime {
    async fn version(&self) -> Result<v1::VersionResponse, CriError> {
        let mut c = self.runtime.clone();
        let req = v1::VersionRequest {
            version: ferrolet_cri::API_VERSION.into(),
        };
        call("Version", "", CALL_TIMEOUT, c.version(req)).await
    }

    async fn status(&self) -> Result<Vec<v1::RuntimeCondition>, CriError> {
        let mut c = self.runtime.clone();
        let resp = call(
            "Status",
            "",
            CALL_TIMEOUT,
            c.status(v1::StatusRequest { verbose: false }),
        )
        .await?;
        Ok(resp.status.map(|s| s.conditions).unwrap_or_default())
    }

    async fn run_pod_sandbox(&self, config: v1::PodSandboxConfig) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let target = config
            .metadata
            .as_ref()
            .map(|m| format!("{}/{}", m.namespace, m.name))
            .unwrap_or_default();
        let req = v1::RunPodSandboxRequest {
            config: Some(config),
            runtime_handler: String::new(),
        };
        // Sandbox creation includes network setup in runtimes that do their own CNI.
        let resp = call(
            "RunPodSandbox",
            &target,
            PULL_TIMEOUT,
            c.run_pod_sandbox(req),
        )
        .await?;
        Ok(resp.pod_sandbox_id)
    }

    async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = v1::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        call("StopPodSandbox", id, CALL_TIMEOUT, c.stop_pod_sandbox(req))
            .await
            .map(|_| ())
    }

    async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = v1::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        call(
            "RemovePodSandbox",
            id,
            CALL_TIMEOUT,
            c.remove_pod_sandbox(req),
        )
        .await
        .map(|_| ())
    }

    async fn pod_sandbox_status(&self, id: &str) -> Result<Option<SandboxStatus>, CriError> {
        let mut c = self.runtime.clone();
        let req = v1::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: true,
        };
        let resp = not_found_is_none(
            call(
                "PodSandboxStatus",
                id,
                CALL_TIMEOUT,
                c.pod_sandbox_status(req),
            )
            .await,
        )?;
        let Some(resp) = resp else { return Ok(None) };
        let status = resp.status.ok_or(CriError::Incomplete {
            call: "PodSandboxStatus",
            target: id.into(),
            what: "status",
        })?;
        Ok(Some(SandboxStatus {
            status,
            info: resp.info,
        }))
    }

    async fn list_pod_sandboxes(
        &self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<v1::PodSandbox>, CriError> {
        let mut c = self.runtime.clone();
        let req = v1::ListPodSandboxRequest {
            filter: Some(v1::PodSandboxFilter {
                label_selector: labels,
                ..Default::default()
            }),
        };
        let resp = call("ListPodSandbox", "", CALL_TIMEOUT, c.list_pod_sandbox(req)).await?;
        Ok(resp.items)
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: v1::ContainerConfig,
        sandbox_config: v1::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut c = self.runtime.clone();
        let target = format!(
            "{sandbox_id}/{}",
            config
                .metadata
                .as_ref()
                .map(|m| m.name.as_str())
                .unwrap_or_default()
        );
        let req = v1::CreateContainerRequest {
            pod_sandbox_id: sandbox_id.into(),
            config: Some(config),
            sandbox_config: Some(sandbox_config),
        };
        let resp = call(
            "CreateContainer",
            &target,
            CALL_TIMEOUT,
            c.create_container(req),
        )
        .await?;
        Ok(resp.container_id)
    }

    async fn start_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = v1::StartContainerRequest {
            container_id: id.into(),
        };
        call("StartContainer", id, CALL_TIMEOUT, c.start_container(req))
            .await
            .map(|_| ())
    }

    async fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = v1::StopContainerRequest {
            container_id: id.into(),
            timeout: timeout_seconds,
        };
        let grace = Duration::from_secs(u64::try_from(timeout_seconds).unwrap_or(0));
        call(
            "StopContainer",
            id,
            CALL_TIMEOUT + grace,
            c.stop_container(req),
        )
        .await
        .map(|_| ())
    }

    async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let req = v1::RemoveContainerRequest {
            container_id: id.into(),
        };
        call("RemoveContainer", id, CALL_TIMEOUT, c.remove_container(req))
            .await
            .map(|_| ())
    }

    async fn list_containers(
        &self,
        sandbox_id: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<v1::Container>, CriError> {
        let mut c = self.runtime.clone();
        let req = v1::ListContainersRequest {
            filter: Some(v1::ContainerFilter {
                pod_sandbox_id: sandbox_id.unwrap_or_default().into(),
                label_selector: labels,
                ..Default::default()
            }),
        };
        let resp = call(
            "ListContainers",
            sandbox_id.unwrap_or_default(),
            CALL_TIMEOUT,
            c.list_containers(req),
        )
        .await?;
        Ok(resp.containers)
    }

    async fn container_status(&self, id: &str) -> Result<Option<v1::ContainerStatus>, CriError> {
        let mut c = self.runtime.clone();
        let req = v1::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        let resp = not_found_is_none(
            call("ContainerStatus", id, CALL_TIMEOUT, c.container_status(req)).await,
        )?;
        Ok(resp.and_then(|r| r.status))
    }

    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecResult, CriError> {
        let mut c = self.runtime.clone();
        let req = v1::ExecSyncRequest {
            container_id: id.into(),
            cmd,
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        let resp = call("ExecSync", id, timeout + CALL_TIMEOUT, c.exec_sync(req)).await?;
        Ok(ExecResult {
            exit_code: resp.exit_code,
            stdout: resp.stdout,
            stderr: resp.stderr,
        })
    }

    async fn image_status(&self, image: &str) -> Result<Option<v1::Image>, CriError> {
        let mut c = self.images.clone();
        let req = v1::ImageStatusRequest {
            image: Some(v1::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            verbose: false,
        };
        let resp = call("ImageStatus", image, CALL_TIMEOUT, c.image_status(req)).await?;
        Ok(resp.image)
    }

    async fn pull_image(
        &self,
        image: &str,
        sandbox_config: v1::PodSandboxConfig,
    ) -> Result<String, CriError> {
        let mut c = self.images.clone();
        let req = v1::PullImageRequest {
            image: Some(v1::ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            auth: None,
            sandbox_config: Some(sandbox_config),
        };
        let resp = call("PullImage", image, PULL_TIMEOUT, c.pull_image(req)).await?;
        Ok(resp.image_ref)
    }

    async fn list_images(&self) -> Result<Vec<v1::Image>, CriError> {
        let mut c = self.images.clone();
        let req = v1::ListImagesRequest { filter: None };
        let resp = call("ListImages", "", CALL_TIMEOUT, c.list_images(req)).await?;
        Ok(resp.images)
    }

    async fn remove_image(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.images.clone();
        let req = v1::RemoveImageRequest {
            image: Some(v1::ImageSpec {
                image: id.into(),
                ..Default::default()
            }),
        };
        not_found_is_none(call("RemoveImage", id, CALL_TIMEOUT, c.remove_image(req)).await)?;
        Ok(())
    }

    async fn image_fs_info(&self) -> Result<Vec<v1::FilesystemUsage>, CriError> {
        let mut c = self.images.clone();
        let resp = call(
            "ImageFsInfo",
            "",
            CALL_TIMEOUT,
            c.image_fs_info(v1::ImageFsInfoRequest {}),
        )
        .await?;
        Ok(resp.image_filesystems)
    }
}
