//! The streaming server behind CRI Exec: the RPC only registers a session under a one-time
//! token that expires, and returns a URL on this loopback HTTP server; the client (the
//! kubelet, or a test) then opens a WebSocket there and speaks the Kubernetes remote-command
//! protocol (`protocol`). The command runs through the same exec helper as ExecSync, with
//! pipes or a pseudo-terminal (`pty`) for its stdio.

pub mod protocol;
mod pty;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{self, HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::Message;

use protocol::{ClientMessage, Outcome, Protocol};

/// How long a URL returned by Exec stays valid (the kubelet's streaming server uses one
/// minute too).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// How long output is still relayed after the command exited, for processes it left
/// behind that hold its stdout open.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(500);

/// Errors of the streaming server.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("listen for streaming on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The command of an exec session and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecSession {
    pub container_id: String,
    /// Pid of the container's init process, whose namespaces the command joins.
    pub pid: u32,
    /// The container's state directory.
    pub dir: PathBuf,
    pub cmd: Vec<String>,
    pub tty: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

struct Pending {
    session: ExecSession,
    expires: Instant,
}

/// The loopback server and its pending sessions.
pub struct StreamServer {
    base: String,
    exe: PathBuf,
    pending: Mutex<HashMap<String, Pending>>,
}

impl std::fmt::Debug for StreamServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamServer")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl StreamServer {
    /// Listens on `addr` (port 0 picks a free one) and serves sessions from a task of the
    /// current tokio runtime; `exe` is the shim binary that runs the exec helper.
    pub async fn bind(addr: SocketAddr, exe: PathBuf) -> Result<Arc<StreamServer>, StreamError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StreamError::Listen { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| StreamError::Listen { addr, source })?;
        let server = Arc::new(StreamServer {
            base: format!("http://{local}"),
            exe,
            pending: Mutex::new(HashMap::new()),
        });
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((conn, _)) => {
                        // Exec and attach output goes out in small writes as the process
                        // makes it; Nagle would hold each behind the client's delayed ACK.
                        if let Err(e) = conn.set_nodelay(true) {
                            tracing::debug!(error = %e, "streaming server: TCP_NODELAY");
                        }
                        let s = s.clone();
                        tokio::spawn(async move { s.handle(conn).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "streaming server: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        tracing::info!(url = %server.base, "streaming server listening");
        Ok(server)
    }

    /// `http://ADDR:PORT` of the server.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Registers an exec session and returns the one-time URL to run it.
    pub fn register_exec(&self, session: ExecSession) -> String {
        let token = crate::cri::new_id();
        let now = Instant::now();
        let mut pending = lock(&self.pending);
        pending.retain(|_, p| p.expires > now);
        pending.insert(
            token.clone(),
            Pending {
                session,
                expires: now + TOKEN_TTL,
            },
        );
        format!("{}/exec/{token}", self.base)
    }

    /// Takes the session of a token, once, if it has not expired.
    fn take(&self, token: &str) -> Option<ExecSession> {
        let p = lock(&self.pending).remove(token)?;
        (p.expires > Instant::now()).then_some(p.session)
    }

    async fn handle(self: Arc<Self>, conn: TcpStream) {
        let mut accepted = None;
        // The callback's type, and the size of its error, are tungstenite's.
        #[allow(clippy::result_large_err)]
        let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
            let offered = req
                .headers()
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect::<Vec<_>>()
                .join(",");
            let proto = protocol::choose(&offered)
                .map_err(|e| refusal(StatusCode::BAD_REQUEST, &e.to_string()))?;
            let token = req
                .uri()
                .path()
                .strip_prefix("/exec/")
                .ok_or_else(|| refusal(StatusCode::NOT_FOUND, "unknown streaming path"))?;
            let session = self.take(token).ok_or_else(|| {
                refusal(
                    StatusCode::NOT_FOUND,
                    "unknown or expired streaming token: call Exec again for a new URL",
                )
            })?;
            resp.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(proto.name()),
            );
            accepted = Some((proto, session));
            Ok(resp)
        };
        let ws = match tokio_tungstenite::accept_hdr_async(conn, callback).await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "streaming handshake refused");
                return;
            }
        };
        let Some((proto, session)) = accepted else {
            return;
        };
        let id = session.container_id.clone();
        if let Err(e) = run_exec(&self.exe, ws, proto, session).await {
            tracing::debug!(container = %id, error = %e, "exec session ended with an error");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn refusal(code: StatusCode, msg: &str) -> ErrorResponse {
    let mut resp = http::Response::new(Some(msg.to_string()));
    *resp.status_mut() = code;
    resp
}

type Reader = Pin<Box<dyn AsyncRead + Send>>;
type Writer = Pin<Box<dyn AsyncWrite + Send>>;

async fn read_some(r: &mut Option<Reader>, buf: &mut [u8]) -> std::io::Result<usize> {
    match r {
        Some(r) => r.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Runs one exec session on an accepted WebSocket until the command has exited and its
/// output is relayed; then sends the status on the error channel and closes.
async fn run_exec(
    exe: &std::path::Path,
    ws: tokio_tungstenite::WebSocketStream<TcpStream>,
    proto: Protocol,
    s: ExecSession,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let (mut sink, mut incoming) = ws.split();
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("exec").arg("--pid").arg(s.pid.to_string());
    if s.tty {
        cmd.arg("--tty");
    }
    cmd.arg(&s.dir).arg("--").args(&s.cmd).kill_on_drop(true);

    let mut out: Option<Reader> = None;
    let mut err: Option<Reader> = None;
    let mut input: Option<Writer> = None;
    let mut resizer: Option<pty::Resizer> = None;
    let spawned = if s.tty {
        pty::open().and_then(|t| {
            cmd.stdin(Stdio::from(t.slave.try_clone()?))
                .stdout(Stdio::from(t.slave.try_clone()?))
                .stderr(Stdio::from(t.slave));
            // The command's end of the terminal is closed here once spawned, so the reader
            // sees the end when the command (and whatever it left behind) is done with it.
            let child = cmd.spawn()?;
            if s.stdout {
                out = Some(Box::pin(t.reader) as Reader);
            }
            if s.stdin {
                input = Some(Box::pin(t.writer) as Writer);
            }
            resizer = Some(t.resizer);
            Ok(child)
        })
    } else {
        let pipe = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
        cmd.stdin(pipe(s.stdin))
            .stdout(pipe(s.stdout))
            .stderr(pipe(s.stderr));
        cmd.spawn().map(|mut child| {
            out = child.stdout.take().map(|o| Box::pin(o) as Reader);
            err = child.stderr.take().map(|e| Box::pin(e) as Reader);
            input = child.stdin.take().map(|i| Box::pin(i) as Writer);
            child
        })
    };
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let st = protocol::status(&Outcome::Failed(format!("start exec helper: {e}")));
            sink.send(Message::binary(st)).await?;
            return sink.close().await;
        }
    };

    let mut out_buf = vec![0u8; 16 * 1024];
    let mut err_buf = vec![0u8; 16 * 1024];
    let mut exit: Option<std::process::ExitStatus> = None;
    let mut client_open = true;
    // Armed when the command exits.
    let drain_deadline = tokio::time::sleep(Duration::from_secs(365 * 24 * 3600));
    tokio::pin!(drain_deadline);
    loop {
        if exit.is_some() && out.is_none() && err.is_none() {
            break;
        }
        tokio::select! {
            r = read_some(&mut out, &mut out_buf) => match r {
                Ok(n) if n > 0 => sink.send(Message::binary(protocol::frame(protocol::STDOUT, &out_buf[..n]))).await?,
                _ => out = None,
            },
            r = read_some(&mut err, &mut err_buf) => match r {
                Ok(n) if n > 0 => sink.send(Message::binary(protocol::frame(protocol::STDERR, &err_buf[..n]))).await?,
                _ => err = None,
            },
            st = child.wait(), if exit.is_none() => {
                exit = Some(st.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(255 << 8)));
                drain_deadline.as_mut().reset(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            },
            () = &mut drain_deadline, if exit.is_some() => break,
            m = incoming.next(), if client_open => match m {
                Some(Ok(Message::Binary(data))) => match protocol::parse(proto, &data) {
                    Ok(ClientMessage::Stdin(bytes)) => {
                        if let Some(w) = input.as_mut()
                            && w.write_all(bytes).await.is_err()
                        {
                            input = None;
                        }
                    }
                    Ok(ClientMessage::CloseStdin) => {
                        if s.tty {
                            // A terminal has no end of file; ^D at the start of a line is one.
                            if let Some(w) = input.as_mut() {
                                let _ = w.write_all(&[4]).await;
                            }
                        }
                        input = None;
                    }
                    Ok(ClientMessage::Resize(size)) => {
                        if let Some(r) = resizer.as_ref() {
                            let _ = r.resize(size);
                        }
                    }
                    Err(e) => tracing::debug!(container = %s.container_id, error = %e, "ignoring a bad streaming message"),
                },
                Some(Ok(Message::Close(_)) | Err(_)) | None => {
                    // The client is gone: nobody will read the output or the status.
                    client_open = false;
                    let _ = child.start_kill();
                }
                Some(Ok(_)) => {}
            },
        }
    }
    if !client_open {
        return Ok(());
    }
    let outcome = match exit {
        Some(st) => {
            use std::os::unix::process::ExitStatusExt;
            Outcome::Exited(
                st.code()
                    .or_else(|| st.signal().map(|n| 128 + n))
                    .unwrap_or(255),
            )
        }
        None => Outcome::Failed("the exec helper vanished".into()),
    };
    sink.send(Message::binary(protocol::status(&outcome)))
        .await?;
    sink.close().await
}
