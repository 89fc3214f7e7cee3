//! One probe or lifecycle-hook action, resolved from the spec (named ports looked up, the
//! host defaulted to the pod's IP) and carried out once: exec through CRI `ExecSync`, an
//! HTTP GET, a TCP connect, or a sleep (hooks only).

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ExecAction, HTTPGetAction, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::ProbeError;
use crate::cri::Runtime;

/// What a probe or hook does, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Exec(Vec<String>),
    Http {
        /// `http` or `https`.
        scheme: String,
        host: String,
        port: u16,
        /// Starts with `/`.
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    Sleep(Duration),
}

/// The outcome of running an action once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Failed, with the message events and logs show.
    Failure(String),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success)
    }
}

/// Where an action runs: the container (for exec) and the address a network action uses
/// when its spec names no host (the pod IP; the host's for hostNetwork pods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub container_id: String,
    pub default_host: Option<String>,
}

fn port_of(port: &IntOrString, container: &Container) -> Result<u16, ProbeError> {
    match port {
        IntOrString::Int(n) => {
            u16::try_from(*n)
                .ok()
                .filter(|p| *p > 0)
                .ok_or(ProbeError::BadPort {
                    port: n.to_string(),
                })
        }
        IntOrString::String(name) => {
            if let Ok(n) = name.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| ProbeError::UnknownPortName {
                    name: name.clone(),
                    container: container.name.clone(),
                })
        }
    }
}

fn host_of(explicit: Option<&String>, target: &Target) -> Result<String, ProbeError> {
    explicit
        .filter(|h| !h.is_empty())
        .cloned()
        .or_else(|| target.default_host.clone())
        .ok_or(ProbeError::NoAddress)
}

fn exec_action(e: &ExecAction) -> Result<Action, ProbeError> {
    let cmd = e.command.clone().unwrap_or_default();
    if cmd.is_empty() {
        return Err(ProbeError::EmptyCommand);
    }
    Ok(Action::Exec(cmd))
}

fn http_action(
    h: &HTTPGetAction,
    container: &Container,
    target: &Target,
) -> Result<Action, ProbeError> {
    let scheme = match h.scheme.as_deref().unwrap_or("HTTP") {
        "HTTP" | "http" => "http",
        "HTTPS" | "https" => "https",
        other => {
            return Err(ProbeError::BadScheme {
                scheme: other.to_owned(),
            });
        }
    };
    let path = h.path.clone().unwrap_or_default();
    let path = if path.starts_with('/') {
        path
    } else {
        format!("/{path}")
    };
    Ok(Action::Http {
        scheme: scheme.to_owned(),
        host: host_of(h.host.as_ref(), target)?,
        port: port_of(&h.port, container)?,
        path,
        headers: h
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    })
}

fn tcp_action(
    t: &TCPSocketAction,
    container: &Container,
    target: &Target,
) -> Result<Action, ProbeError> {
    Ok(Action::Tcp {
        host: host_of(t.host.as_ref(), target)?,
        port: port_of(&t.port, container)?,
    })
}

impl Action {
    /// The action of a probe of `container`.
    pub fn of_probe(
        probe: &Probe,
        container: &Container,
        target: &Target,
    ) -> Result<Action, ProbeError> {
        if let Some(e) = &probe.exec {
            return exec_action(e);
        }
        if let Some(h) = &probe.http_get {
            return http_action(h, container, target);
        }
        if let Some(t) = &probe.tcp_socket {
            return tcp_action(t, container, target);
        }
        if probe.grpc.is_some() {
            return Err(ProbeError::Unsupported { what: "grpc" });
        }
        Err(ProbeError::NoHandler)
    }

    /// The action of a lifecycle hook of `container`.
    pub fn of_hook(
        hook: &LifecycleHandler,
        container: &Container,
        target: &Target,
    ) -> Result<Action, ProbeError> {
        if let Some(e) = &hook.exec {
            return exec_action(e);
        }
        if let Some(h) = &hook.http_get {
            return http_action(h, container, target);
        }
        if let Some(s) = &hook.sleep {
            let secs = u64::try_from(s.seconds)
                .map_err(|_| ProbeError::BadSleep { seconds: s.seconds })?;
            return Ok(Action::Sleep(Duration::from_secs(secs)));
        }
        if hook.tcp_socket.is_some() {
            // Deprecated upstream and never run there either.
            return Err(ProbeError::Unsupported {
                what: "tcpSocket in a lifecycle hook",
            });
        }
        Err(ProbeError::NoHandler)
    }
}

/// Shared state of the network actions: one HTTP client for every probe of the node.
#[derive(Clone, Debug)]
pub struct Prober {
    http: reqwest::Client,
}

/// `host:port` with IPv6 literals bracketed.
fn authority(host: &str, port: u16) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{host}]:{port}"),
        _ => format!("{host}:{port}"),
    }
}

impl Prober {
    pub fn new() -> Result<Prober, ProbeError> {
        // Probes never follow redirects (a 3xx counts as success, as upstream) and check no
        // certificates: the kubelet's HTTPS probes do not either.
        let http = reqwest::Client::builder()
            .tls_backend_rustls()
            .tls_danger_accept_invalid_certs(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(0)
            .user_agent(concat!("ferrolet-probe/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProbeError::Setup(e.to_string()))?;
        Ok(Prober { http })
    }

    /// One prober for the whole process (its HTTP client pools nothing, but building one
    /// per pod would cost a TLS setup each).
    pub fn shared() -> Result<Prober, ProbeError> {
        static SHARED: std::sync::OnceLock<Result<Prober, ProbeError>> = std::sync::OnceLock::new();
        SHARED.get_or_init(Prober::new).clone()
    }

    /// Runs `action` once against `target`, giving up after `timeout`.
    pub async fn run<R: Runtime>(
        &self,
        runtime: &R,
        action: &Action,
        target: &Target,
        timeout: Duration,
    ) -> Outcome {
        match action {
            Action::Exec(cmd) => {
                let call = runtime.exec_sync(&target.container_id, cmd.clone(), timeout);
                // The runtime enforces the timeout; this bounds a runtime that does not.
                match tokio::time::timeout(timeout + Duration::from_secs(5), call).await {
                    Err(_) => Outcome::Failure(format!(
                        "command {cmd:?} timed out after {}s",
                        timeout.as_secs()
                    )),
                    Ok(Err(e)) => Outcome::Failure(e.to_string()),
                    Ok(Ok(r)) if r.exit_code == 0 => Outcome::Success,
                    Ok(Ok(r)) => {
                        let mut out = String::from_utf8_lossy(&r.stdout).into_owned();
                        out.push_str(&String::from_utf8_lossy(&r.stderr));
                        let out = out.trim();
                        Outcome::Failure(if out.is_empty() {
                            format!("command {cmd:?} exited with {}", r.exit_code)
                        } else {
                            format!("command {cmd:?} exited with {}: {out}", r.exit_code)
                        })
                    }
                }
            }
            Action::Http {
                scheme,
                host,
                port,
                path,
                headers,
            } => {
                let url = format!("{scheme}://{}{path}", authority(host, *port));
                let mut req = self.http.get(&url).timeout(timeout);
                for (k, v) in headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                match req.send().await {
                    Err(e) if e.is_timeout() => Outcome::Failure(format!(
                        "Get {url}: no answer within {}s",
                        timeout.as_secs()
                    )),
                    Err(e) => Outcome::Failure(format!("Get {url}: {}", error_chain(&e))),
                    Ok(resp) if (200..400).contains(&resp.status().as_u16()) => Outcome::Success,
                    Ok(resp) => Outcome::Failure(format!(
                        "HTTP probe failed with statuscode: {}",
                        resp.status().as_u16()
                    )),
                }
            }
            Action::Tcp { host, port } => {
                let addr = authority(host, *port);
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&addr)).await {
                    Err(_) => Outcome::Failure(format!(
                        "dial tcp {addr}: no connection within {}s",
                        timeout.as_secs()
                    )),
                    Ok(Err(e)) => Outcome::Failure(format!("dial tcp {addr}: {e}")),
                    Ok(Ok(_)) => Outcome::Success,
                }
            }
            Action::Sleep(d) => {
                tokio::time::sleep((*d).min(timeout)).await;
                Outcome::Success
            }
        }
    }
}

/// An error with its causes, `outer: inner: ...` (reqwest hides the useful part inside).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
