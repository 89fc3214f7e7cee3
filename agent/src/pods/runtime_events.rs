//! The runtime's container event stream (CRI `GetContainerEvents`): when the runtime has
//! one, a container's start or exit wakes its pod's worker at once, and workers relist on
//! a long period only as a safety net. Runtimes without it (containerd 1.6) answer
//! `Unimplemented`; then workers keep polling on their short period.

use std::future::Future;
use std::path::Path;

use ferrolet_cri::v1;
use ferrolet_cri::v1::runtime_service_client::RuntimeServiceClient;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use tonic::transport::Channel;

use super::observed::labels;
use crate::cri::CriError;

/// One container event, reduced to what routes it: the pod it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub container_id: String,
    /// The pod's uid from the sandbox's or container's labels, if the runtime sent them.
    pub pod_uid: Option<String>,
}

/// A source of container events.
pub trait ContainerEvents: Send + Sync + 'static {
    /// Opens the stream; `CriError::Call` with `Unimplemented` if the runtime has none.
    fn subscribe(
        &self,
    ) -> impl Future<Output = Result<BoxStream<'static, Result<ContainerEvent, CriError>>, CriError>>
    + Send;
}

/// Whether `e` says the runtime has no event stream at all (as opposed to a broken one).
pub fn is_unsupported(e: &CriError) -> bool {
    matches!(e, CriError::Call { code, .. } if *code == tonic::Code::Unimplemented)
}

/// The pod uid an event is about.
pub fn pod_uid_of(resp: &v1::ContainerEventResponse) -> Option<String> {
    resp.pod_sandbox_status
        .as_ref()
        .and_then(|s| s.labels.get(labels::POD_UID).cloned())
        .or_else(|| {
            resp.containers_statuses
                .iter()
                .find_map(|c| c.labels.get(labels::POD_UID).cloned())
        })
}

/// `GetContainerEvents` over a CRI socket.
#[derive(Clone, Debug)]
pub struct CriEvents {
    client: RuntimeServiceClient<Channel>,
}

impl CriEvents {
    pub async fn connect(path: &Path) -> Result<CriEvents, CriError> {
        let channel = ferrolet_cri::connect_unix(path)
            .await
            .map_err(|e| CriError::Connect {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        Ok(CriEvents {
            client: RuntimeServiceClient::new(channel),
        })
    }
}

fn call_error(status: &tonic::Status) -> CriError {
    CriError::Call {
        call: "GetContainerEvents",
        target: String::new(),
        code: status.code(),
        message: status.message().to_owned(),
    }
}

impl ContainerEvents for CriEvents {
    async fn subscribe(
        &self,
    ) -> Result<BoxStream<'static, Result<ContainerEvent, CriError>>, CriError> {
        let mut client = self.client.clone();
        let stream = client
            .get_container_events(v1::GetEventsRequest {})
            .await
            .map_err(|s| call_error(&s))?
            .into_inner();
        Ok(stream
            .map(|item| {
                item.map(|resp| ContainerEvent {
                    pod_uid: pod_uid_of(&resp),
                    container_id: resp.container_id,
                })
                .map_err(|s| call_error(&s))
            })
            .boxed())
    }
}
