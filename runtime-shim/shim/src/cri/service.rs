//! gRPC adapters: each call parses its request, runs the blocking `Shim` method on the
//! blocking pool, and maps errors to statuses. Plus the unix-socket server, the watchers
//! that turn container exits into events, and ExecSync.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferrolet_cri::v1;
use ferrolet_cri::v1::image_service_server::{ImageService, ImageServiceServer};
use ferrolet_cri::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use tokio::io::unix::AsyncFd;
use tonic::{Request, Response, Status};

use super::{CriError, Shim};
use crate::container::process_start_time;
use crate::streaming::{ExecSession, StreamError, StreamServer};

type Result<T> = std::result::Result<Response<T>, Status>;
type EventStream = tonic::codegen::BoxStream<v1::ContainerEventResponse>;

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("listen on {path}: {source}")]
    Listen {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("serve: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error(transparent)]
    Streaming(#[from] StreamError),
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, CriError> + Send + 'static,
) -> std::result::Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("task failed: {e}"))),
    }
}

/// The gRPC face of a [`Shim`].
#[derive(Debug, Clone)]
pub struct CriService {
    shim: Arc<Shim>,
    streaming: Arc<StreamServer>,
}

impl CriService {
    pub fn new(shim: Arc<Shim>, streaming: Arc<StreamServer>) -> Self {
        CriService { shim, streaming }
    }

    /// Watches a started container's monitor and reports its exit as an event.
    fn watch(&self, id: String) {
        watch_exit(self.shim.clone(), id);
    }
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Waits (without a thread) for the container's monitor to exit, then emits the stopped
/// event. The monitor exits only after recording the container's exit.
pub fn watch_exit(shim: Arc<Shim>, id: String) {
    tokio::spawn(async move {
        let Some((pid, start)) = shim.monitor_of(&id) else {
            return;
        };
        let Some(fd) = pidfd_open(pid) else {
            shim.container_exited(&id);
            return;
        };
        if process_start_time(pid) != Some(start) {
            shim.container_exited(&id);
            return;
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, stays open for its whole life and
        // always returns the same descriptor.
        let registered =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
        if let Ok(afd) = registered {
            let _ = afd.readable().await;
        }
        let s = shim.clone();
        let _ = tokio::task::spawn_blocking(move || s.container_exited(&id)).await;
    });
}

fn str_req(id: &str, field: &str) -> std::result::Result<String, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument(format!("{field} is required")));
    }
    Ok(id.to_string())
}

#[tonic::async_trait]
impl RuntimeService for CriService {
    async fn version(&self, _req: Request<v1::VersionRequest>) -> Result<v1::VersionResponse> {
        Ok(Response::new(v1::VersionResponse {
            version: "0.1.0".into(),
            runtime_name: "ferrolet-shim".into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: ferrolet_cri::API_VERSION.into(),
        }))
    }

    async fn status(&self, _req: Request<v1::StatusRequest>) -> Result<v1::StatusResponse> {
        let cond = |t: &str| v1::RuntimeCondition {
            r#type: t.to_string(),
            status: true,
            ..Default::default()
        };
        Ok(Response::new(v1::StatusResponse {
            status: Some(v1::RuntimeStatus {
                conditions: vec![cond("RuntimeReady"), cond("NetworkReady")],
            }),
            ..Default::default()
        }))
    }

    async fn run_pod_sandbox(
        &self,
        req: Request<v1::RunPodSandboxRequest>,
    ) -> Result<v1::RunPodSandboxResponse> {
        let shim = self.shim.clone();
        let r = req.into_inner();
        let id = blocking(move || shim.run_pod_sandbox(&r)).await?;
        Ok(Response::new(v1::RunPodSandboxResponse {
            pod_sandbox_id: id,
        }))
    }

    async fn stop_pod_sandbox(
        &self,
        req: Request<v1::StopPodSandboxRequest>,
    ) -> Result<v1::StopPodSandboxResponse> {
        let id = str_req(&req.into_inner().pod_sandbox_id, "pod_sandbox_id")?;
        let shim = self.shim.clone();
        blocking(move || shim.stop_pod_sandbox(&id)).await?;
        Ok(Response::new(v1::StopPodSandboxResponse {}))
    }

    async fn remove_pod_sandbox(
        &self,
        req: Request<v1::RemovePodSandboxRequest>,
    ) -> Result<v1::RemovePodSandboxResponse> {
        let id = str_req(&req.into_inner().pod_sandbox_id, "pod_sandbox_id")?;
        let shim = self.shim.clone();
        blocking(move || shim.remove_pod_sandbox(&id)).await?;
        Ok(Response::new(v1::RemovePodSandboxResponse {}))
    }

    async fn pod_sandbox_status(
        &self,
        req: Request<v1::PodSandboxStatusRequest>,
    ) -> Result<v1::PodSandboxStatusResponse> {
        let id = str_req(&req.into_inner().pod_sandbox_id, "pod_sandbox_id")?;
        let shim = self.shim.clone();
        let (status, info, containers) = blocking(move || {
            let st = shim.sandbox_status(&id)?;
            let containers = shim
                .list_containers(Some(&v1::ContainerFilter {
                    pod_sandbox_id: st.id.clone(),
                    ..Default::default()
                }))
                .into_iter()
                .filter_map(|c| shim.container_status(&c.id).ok())
                .collect();
            Ok((st.clone(), shim.sandbox_info(&st.id), containers))
        })
        .await?;
        Ok(Response::new(v1::PodSandboxStatusResponse {
            status: Some(status),
            info,
            containers_statuses: containers,
            timestamp: crate::container::now_ns(),
        }))
    }

    async fn list_pod_sandbox(
        &self,
        req: Request<v1::ListPodSandboxRequest>,
    ) -> Result<v1::ListPodSandboxResponse> {
        let shim = self.shim.clone();
        let filter = req.into_inner().filter;
        let items = blocking(move || Ok(shim.list_pod_sandbox(filter.as_ref()))).await?;
        Ok(Response::new(v1::ListPodSandboxResponse { items }))
    }

    async fn create_container(
        &self,
        req: Request<v1::CreateContainerRequest>,
    ) -> Result<v1::CreateContainerResponse> {
        let shim = self.shim.clone();
        let r = req.into_inner();
        str_req(&r.pod_sandbox_id, "pod_sandbox_id")?;
        let id = blocking(move || shim.create_container(&r)).await?;
        Ok(Response::new(v1::CreateContainerResponse {
            container_id: id,
        }))
    }

    async fn start_container(
        &self,
        req: Request<v1::StartContainerRequest>,
    ) -> Result<v1::StartContainerResponse> {
        let id = str_req(&req.into_inner().container_id, "container_id")?;
        let shim = self.shim.clone();
        let full = blocking(move || {
            let full = shim.container(&id)?.id;
            shim.start_container(&full)?;
            Ok(full)
        })
        .await?;
        self.watch(full);
        Ok(Response::new(v1::StartContainerResponse {}))
    }

    async fn stop_container(
        &self,
        req: Request<v1::StopContainerRequest>,
    ) -> Result<v1::StopContainerResponse> {
        let r = req.into_inner();
        let id = str_req(&r.container_id, "container_id")?;
        let shim = self.shim.clone();
        blocking(move || shim.stop_container(&id, r.timeout)).await?;
        Ok(Response::new(v1::StopContainerResponse {}))
    }

    async fn remove_container(
        &self,
        req: Request<v1::RemoveContainerRequest>,
    ) -> Result<v1::RemoveContainerResponse> {
        let id = str_req(&req.into_inner().container_id, "container_id")?;
        let shim = self.shim.clone();
        blocking(move || shim.remove_container(&id)).await?;
        Ok(Response::new(v1::RemoveContainerResponse {}))
    }

    async fn list_containers(
        &self,
        req: Request<v1::ListContainersRequest>,
    ) -> Result<v1::ListContainersResponse> {
        let shim = self.shim.clone();
        let filter = req.into_inner().filter;
        let containers = blocking(move || Ok(shim.list_containers(filter.as_ref()))).await?;
        Ok(Response::new(v1::ListContainersResponse { containers }))
    }

    async fn container_status(
        &self,
        req: Request<v1::ContainerStatusRequest>,
    ) -> Result<v1::ContainerStatusResponse> {
        let id = str_req(&req.into_inner().container_id, "container_id")?;
        let shim = self.shim.clone();
        let status = blocking(move || shim.container_status(&id)).await?;
        Ok(Response::new(v1::ContainerStatusResponse {
            status: Some(status),
            info: Default::default(),
        }))
    }

    async fn update_container_resources(
        &self,
        req: Request<v1::UpdateContainerResourcesRequest>,
    ) -> Result<v1::UpdateContainerResourcesResponse> {
        let r = req.into_inner();
        let id = str_req(&r.container_id, "container_id")?;
        let shim = self.shim.clone();
        blocking(move || shim.update_resources(&id, r.linux.as_ref())).await?;
        Ok(Response::new(v1::UpdateContainerResourcesResponse {}))
    }

    async fn reopen_container_log(
        &self,
        req: Request<v1::ReopenContainerLogRequest>,
    ) -> Result<v1::ReopenContainerLogResponse> {
        let id = str_req(&req.into_inner().container_id, "container_id")?;
        let shim = self.shim.clone();
        blocking(move || shim.reopen_log(&id)).await?;
        Ok(Response::new(v1::ReopenContainerLogResponse {}))
    }

    async fn exec_sync(&self, req: Request<v1::ExecSyncRequest>) -> Result<v1::ExecSyncResponse> {
        let r = req.into_inner();
        let id = str_req(&r.container_id, "container_id")?;
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is required"));
        }
        let shim = self.shim.clone();
        let (pid, dir) = blocking(move || shim.exec_target(&id)).await?;
        let timeout = (r.timeout > 0).then(|| Duration::from_secs(r.timeout.unsigned_abs()));
        let out = exec_sync(&self.shim.config().exe, pid, &dir, &r.cmd, timeout).await?;
        Ok(Response::new(out))
    }

    async fn exec(&self, req: Request<v1::ExecRequest>) -> Result<v1::ExecResponse> {
        let r = req.into_inner();
        let id = str_req(&r.container_id, "container_id")?;
        if r.cmd.is_empty() {
            return Err(Status::invalid_argument("cmd is required"));
        }
        if !(r.stdin || r.stdout || r.stderr) {
            return Err(Status::invalid_argument(
                "one of stdin, stdout and stderr must be true",
            ));
        }
        if r.tty && r.stderr {
            return Err(Status::invalid_argument(
                "tty and stderr cannot both be true: a terminal merges stderr into stdout",
            ));
        }
        let shim = self.shim.clone();
        let (pid, dir) = blocking(move || shim.exec_target(&id)).await?;
        let url = self.streaming.register_exec(ExecSession {
            container_id: r.container_id,
            pid,
            dir,
            cmd: r.cmd,
            tty: r.tty,
            stdin: r.stdin,
            stdout: r.stdout,
            stderr: r.stderr,
        });
        Ok(Response::new(v1::ExecResponse { url }))
    }

    async fn attach(&self, _req: Request<v1::AttachRequest>) -> Result<v1::AttachResponse> {
        Err(Status::unimplemented(
            "Attach is not implemented by ferrolet-shim: containers run with stdin closed and \
             their output goes to the CRI log; use Exec",
        ))
    }

    async fn pod_sandbox_stats(
        &self,
        req: Request<v1::PodSandboxStatsRequest>,
    ) -> Result<v1::PodSandboxStatsResponse> {
        let id = str_req(&req.into_inner().pod_sandbox_id, "pod_sandbox_id")?;
        let shim = self.shim.clone();
        let stats = blocking(move || shim.pod_sandbox_stats(&id)).await?;
        Ok(Response::new(v1::PodSandboxStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_pod_sandbox_stats(
        &self,
        req: Request<v1::ListPodSandboxStatsRequest>,
    ) -> Result<v1::ListPodSandboxStatsResponse> {
        let shim = self.shim.clone();
        let filter = req.into_inner().filter;
        let stats = blocking(move || Ok(shim.list_pod_sandbox_stats(filter.as_ref()))).await?;
        Ok(Response::new(v1::ListPodSandboxStatsResponse { stats }))
    }

    async fn container_stats(
        &self,
        req: Request<v1::ContainerStatsRequest>,
    ) -> Result<v1::ContainerStatsResponse> {
        let id = str_req(&req.into_inner().container_id, "container_id")?;
        let shim = self.shim.clone();
        let stats = blocking(move || shim.container_stats(&id)).await?;
        Ok(Response::new(v1::ContainerStatsResponse {
            stats: Some(stats),
        }))
    }

    async fn list_container_stats(
        &self,
        req: Request<v1::ListContainerStatsRequest>,
    ) -> Result<v1::ListContainerStatsResponse> {
        let shim = self.shim.clone();
        let filter = req.into_inner().filter;
        let stats = blocking(move || Ok(shim.list_container_stats(filter.as_ref()))).await?;
        Ok(Response::new(v1::ListContainerStatsResponse { stats }))
    }

    async fn update_runtime_config(
        &self,
        _req: Request<v1::UpdateRuntimeConfigRequest>,
    ) -> Result<v1::UpdateRuntimeConfigResponse> {
        // The pod CIDR matters to runtimes that run CNI themselves; the agent does that here.
        Ok(Response::new(v1::UpdateRuntimeConfigResponse {}))
    }

    async fn get_container_events(
        &self,
        _req: Request<v1::GetEventsRequest>,
    ) -> Result<EventStream> {
        let rx = self.shim.subscribe();
        let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(|r| async move {
            // A lagging client loses events; it must relist, as after any reconnect.
            r.ok().map(Ok)
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

use futures::StreamExt;

#[tonic::async_trait]
impl ImageService for CriService {
    async fn list_images(
        &self,
        req: Request<v1::ListImagesRequest>,
    ) -> Result<v1::ListImagesResponse> {
        let want = req
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|i| i.image)
            .filter(|i| !i.is_empty());
        let shim = self.shim.clone();
        let images = blocking(move || {
            let all = shim.images.list();
            let picked = match want {
                Some(w) => shim.images.resolve(&w).into_iter().collect(),
                None => all,
            };
            let pause = shim.pause_image_id();
            Ok(picked
                .iter()
                .map(|r| to_cri_image(r, pause.as_ref() == Some(&r.id)))
                .collect())
        })
        .await?;
        Ok(Response::new(v1::ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        req: Request<v1::ImageStatusRequest>,
    ) -> Result<v1::ImageStatusResponse> {
        let image = req.into_inner().image.map(|i| i.image).unwrap_or_default();
        let image = str_req(&image, "image.image")?;
        let shim = self.shim.clone();
        let found = blocking(move || {
            Ok(shim
                .images
                .resolve(&image)
                .map(|r| to_cri_image(&r, shim.pause_image_id() == Some(r.id.clone()))))
        })
        .await?;
        Ok(Response::new(v1::ImageStatusResponse {
            image: found,
            info: Default::default(),
        }))
    }

    async fn pull_image(
        &self,
        req: Request<v1::PullImageRequest>,
    ) -> Result<v1::PullImageResponse> {
        let r = req.into_inner();
        let image = r.image.map(|i| i.image).unwrap_or_default();
        let image = str_req(&image, "image.image")?;
        let creds = r
            .auth
            .map(|a| {
                let (mut username, mut password) = (a.username, a.password);
                if username.is_empty()
                    && let Some((u, p)) = decode_basic(&a.auth)
                {
                    username = u;
                    password = p;
                }
                let token = if a.registry_token.is_empty() {
                    a.identity_token
                } else {
                    a.registry_token
                };
                crate::image::pull::Credentials {
                    username,
                    password,
                    token,
                }
            })
            .unwrap_or_default();
        let rec = self
            .shim
            .images
            .pull(&self.shim.pulls, &image, creds)
            .await
            .map_err(pull_status)?;
        Ok(Response::new(v1::PullImageResponse { image_ref: rec.id }))
    }

    async fn remove_image(
        &self,
        req: Request<v1::RemoveImageRequest>,
    ) -> Result<v1::RemoveImageResponse> {
        let image = req.into_inner().image.map(|i| i.image).unwrap_or_default();
        let image = str_req(&image, "image.image")?;
        let shim = self.shim.clone();
        blocking(move || {
            let Some(rec) = shim.images.resolve(&image) else {
                return Ok(());
            };
            if shim.images_in_use().contains(&rec.id) {
                return Err(CriError::FailedPrecondition(format!(
                    "image {image:?} ({}) is in use by a container",
                    rec.id
                )));
            }
            shim.images.remove(&rec.id)?;
            Ok(())
        })
        .await?;
        Ok(Response::new(v1::RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _req: Request<v1::ImageFsInfoRequest>,
    ) -> Result<v1::ImageFsInfoResponse> {
        let shim = self.shim.clone();
        let (bytes, inodes) = blocking(move || Ok(shim.images.usage())).await?;
        let usage = v1::FilesystemUsage {
            timestamp: crate::container::now_ns(),
            fs_id: Some(v1::FilesystemIdentifier {
                mountpoint: self.shim.images.root().display().to_string(),
            }),
            used_bytes: Some(v1::UInt64Value { value: bytes }),
            inodes_used: Some(v1::UInt64Value { value: inodes }),
        };
        Ok(Response::new(v1::ImageFsInfoResponse {
            image_filesystems: vec![usage.clone()],
            container_filesystems: vec![usage],
        }))
    }
}

fn pull_status(e: crate::image::pull::PullError) -> Status {
    use crate::image::pull::PullError as E;
    let msg = e.to_string();
    match e {
        E::Status { status: 404, .. } => Status::not_found(msg),
        E::Status {
            status: 401 | 403, ..
        } => Status::permission_denied(msg),
        E::Http { .. } | E::Status { .. } => Status::unavailable(msg),
        E::Io { .. } => Status::internal(msg),
        _ => Status::invalid_argument(msg),
    }
}

/// The `auth` field of an AuthConfig: base64 of `user:password`.
fn decode_basic(auth: &str) -> Option<(String, String)> {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in auth.trim().bytes().filter(|c| *c != b'=') {
        let v = u32::try_from(T.iter().position(|t| *t == c)?).ok()?;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push(u8::try_from((bits >> n) & 0xff).ok()?);
        }
    }
    let s = String::from_utf8(out).ok()?;
    let (u, p) = s.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// `pinned` marks the sandbox image, which the kubelet's image GC must never remove.
fn to_cri_image(rec: &crate::image::ImageRecord, pinned: bool) -> v1::Image {
    let uid = rec
        .config
        .user
        .split(':')
        .next()
        .and_then(|u| u.parse::<i64>().ok());
    v1::Image {
        id: rec.id.clone(),
        repo_tags: rec.repo_tags.clone(),
        repo_digests: rec.repo_digests.clone(),
        size: rec.size,
        uid: uid.map(|value| v1::Int64Value { value }),
        username: if uid.is_none() {
            rec.config
                .user
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string()
        } else {
            String::new()
        },
        spec: Some(v1::ImageSpec {
            image: rec.id.clone(),
            ..Default::default()
        }),
        pinned,
    }
}

/// Runs a command in a container through the exec helper and collects its output.
pub async fn exec_sync(
    exe: &Path,
    pid: u32,
    dir: &Path,
    cmd: &[String],
    timeout: Option<Duration>,
) -> std::result::Result<v1::ExecSyncResponse, Status> {
    let mut c = tokio::process::Command::new(exe);
    c.arg("exec")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(dir)
        .arg("--")
        .args(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = c
        .spawn()
        .map_err(|e| Status::internal(format!("start exec helper: {e}")))?;
    let out = match timeout {
        Some(t) => match tokio::time::timeout(t, child.wait_with_output()).await {
            Ok(r) => r,
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "command {cmd:?} timed out after {}s",
                    t.as_secs()
                )));
            }
        },
        None => child.wait_with_output().await,
    }
    .map_err(|e| Status::internal(format!("exec helper: {e}")))?;
    use std::os::unix::process::ExitStatusExt;
    let code = out
        .status
        .code()
        .or_else(|| out.status.signal().map(|s| 128 + s))
        .unwrap_or(-1);
    Ok(v1::ExecSyncResponse {
        stdout: out.stdout,
        stderr: out.stderr,
        exit_code: code,
    })
}

/// Serves RuntimeService and ImageService on the unix socket `socket` until `shutdown`
/// resolves. Running containers of an earlier shim are watched again.
pub async fn serve(
    shim: Arc<Shim>,
    socket: &Path,
    shutdown: impl Future<Output = ()> + Send,
) -> std::result::Result<(), ServeError> {
    if let Some(parent) = socket.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket).map_err(|source| ServeError::Listen {
        path: socket.to_path_buf(),
        source,
    })?;
    let streaming =
        StreamServer::bind(shim.config().stream_address, shim.config().exe.clone()).await?;
    let svc = CriService::new(shim.clone(), streaming);
    let running = {
        let s = shim.clone();
        tokio::task::spawn_blocking(move || s.running_containers())
            .await
            .unwrap_or_default()
    };
    for id in running {
        watch_exit(shim.clone(), id);
    }
    tracing::info!(socket = %socket.display(), "serving CRI");
    tonic::transport::Server::builder()
        .add_service(RuntimeServiceServer::new(svc.clone()))
        .add_service(ImageServiceServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn basic_auth_field_decodes() {
        assert_eq!(
            super::decode_basic("dXNlcjpwYXNz"),
            Some(("user".to_string(), "pass".to_string()))
        );
        assert_eq!(super::decode_basic("!!"), None);
    }
}
