//! A tonic channel to a CRI server listening on a unix socket.

use std::io;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::service_fn;

/// Failure to reach a CRI socket.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The socket path was empty.
    #[error("CRI socket path is empty")]
    EmptyPath,
    /// Dialling the socket or the HTTP/2 handshake failed; the source says why
    /// (e.g. no such file, connection refused).
    #[error("cannot connect to CRI socket {}", path.display())]
    Connect {
        /// The socket that was dialled.
        path: PathBuf,
        /// What tonic reported; its own source is the `io::Error` of the dial.
        #[source]
        source: tonic::transport::Error,
    },
}

/// Opens a gRPC channel to the CRI server listening on the unix socket at `path`
/// (for example `/run/containerd/containerd.sock`).
///
/// The first connection is made before this returns, so a missing or dead socket is
/// reported here. The channel re-dials the same path if the server restarts later.
/// Wrap it in `RuntimeServiceClient::new` / `ImageServiceClient::new`; clones are cheap.
///
/// # Errors
/// [`ConnectError::EmptyPath`] for an empty path, [`ConnectError::Connect`] when the socket
/// cannot be dialled or does not speak HTTP/2.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Channel, ConnectError> {
    let path = path.as_ref();
    if path.as_os_str().is_empty() {
        return Err(ConnectError::EmptyPath);
    }
    let socket = path.to_path_buf();
    // The URI only fills the HTTP/2 :authority header; the connector ignores it and always
    // dials the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|source| ConnectError::Connect {
            path: path.to_path_buf(),
            source,
        })
}
