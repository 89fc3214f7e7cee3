//! The health check node ports of `externalTrafficPolicy: Local` Services: load balancers
//! ask each node whether it has local endpoints. 200 with a count when it does, 503 when it
//! does not, as kube-proxy answers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::proxier::HealthCheck;

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot listen on health check node port {port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
}

/// Opens the listening socket of a port (in whichever network namespace it chooses).
pub trait Binder: Send + Sync {
    fn bind(&self, port: u16) -> std::io::Result<std::net::TcpListener>;
}

/// Listens on every address of this host's network namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostBinder;

impl Binder for HostBinder {
    fn bind(&self, port: u16) -> std::io::Result<std::net::TcpListener> {
        std::net::TcpListener::bind(("0.0.0.0", port))
    }
}

struct Listening {
    state: watch::Sender<HealthCheck>,
    task: JoinHandle<()>,
}

/// Serves one listener per health check node port; must be used inside a tokio runtime.
pub struct HealthServer {
    binder: Arc<dyn Binder>,
    ports: HashMap<u16, Listening>,
}

impl HealthServer {
    pub fn new(binder: Arc<dyn Binder>) -> Self {
        Self {
            binder,
            ports: HashMap::new(),
        }
    }

    /// Opens, updates and closes listeners to match `checks`. A port that cannot be opened
    /// is reported and retried on the next update; the others keep working.
    pub fn update(&mut self, checks: &BTreeMap<u16, HealthCheck>) -> Vec<HealthError> {
        self.ports.retain(|port, l| {
            let keep = checks.contains_key(port);
            if !keep {
                l.task.abort();
            }
            keep
        });
        let mut errors = Vec::new();
        for (port, check) in checks {
            if let Some(l) = self.ports.get(port) {
                l.state.send_if_modified(|cur| {
                    let changed = cur != check;
                    if changed {
                        *cur = check.clone();
                    }
                    changed
                });
                continue;
            }
            let listener = match self.binder.bind(*port).and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            }) {
                Ok(l) => l,
                Err(source) => {
                    tracing::warn!(port, error = %source, "health check node port not served");
                    errors.push(HealthError::Bind {
                        port: *port,
                        source,
                    });
                    continue;
                }
            };
            let (tx, rx) = watch::channel(check.clone());
            let task = tokio::spawn(async move {
                loop {
                    let Ok((conn, _)) = listener.accept().await else {
                        continue;
                    };
                    let current = rx.borrow().clone();
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(Duration::from_secs(5), answer(conn, current))
                            .await;
                    });
                }
            });
            self.ports.insert(*port, Listening { state: tx, task });
        }
        errors
    }

    /// The ports being served.
    pub fn ports(&self) -> Vec<u16> {
        let mut p: Vec<u16> = self.ports.keys().copied().collect();
        p.sort_unstable();
        p
    }
}

impl Drop for HealthServer {
    fn drop(&mut self) {
        for l in self.ports.values() {
            l.task.abort();
        }
    }
}

/// The response for `check`: status code and body.
pub fn response(check: &HealthCheck) -> (u16, String) {
    let body = serde_json::json!({
        "service": {"namespace": check.service.namespace, "name": check.service.name},
        "localEndpoints": check.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let code = if check.local_endpoints > 0 { 200 } else { 503 };
    (code, body)
}

async fn answer(mut conn: TcpStream, check: HealthCheck) -> std::io::Result<()> {
    // Read the request head; whatever the path, the answer is the same.
    let mut buf = [0u8; 4096];
    let mut seen = Vec::new();
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 16 * 1024 {
        let n = conn.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let (code, body) = response(&check);
    let reason = if code == 200 {
        "OK"
    } else {
        "Service Unavailable"
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::state::ServiceKey;
    use std::sync::Mutex;

    /// Binds loopback ephemeral ports and remembers which one stands for which node port.
    #[derive(Default)]
    struct LoopbackBinder(Mutex<HashMap<u16, u16>>);
    impl Binder for LoopbackBinder {
        fn bind(&self, port: u16) -> std::io::Result<std::net::TcpListener> {
            if port == 1 {
                return Err(std::io::Error::from(std::io::ErrorKind::AddrInUse));
            }
            let l = std::net::TcpListener::bind("127.0.0.1:0")?;
            self.0.lock().unwrap().insert(port, l.local_addr()?.port());
            Ok(l)
        }
    }

    async fn get(port: u16) -> String {
        let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut s = String::new();
        c.read_to_string(&mut s).await.unwrap();
        s
    }

    #[tokio::test]
    async fn answers_with_local_endpoint_count_and_follows_updates() {
        let binder = Arc::new(LoopbackBinder::default());
        let mut hs = HealthServer::new(binder.clone());
        let check = |n| HealthCheck {
            service: ServiceKey::new("ns", "web"),
            local_endpoints: n,
        };
        let errs = hs.update(&[(31000, check(2)), (1, check(1))].into());
        assert_eq!(errs.len(), 1, "port 1 cannot be bound");
        assert!(errs[0].to_string().contains("health check node port 1"));
        let real = binder.0.lock().unwrap()[&31000];

        let r = get(real).await;
        assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
        assert!(r.contains("\"localEndpoints\":2"), "{r}");
        assert!(r.contains("\"namespace\":\"ns\""), "{r}");

        hs.update(&[(31000, check(0))].into());
        let r = get(real).await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");

        hs.update(&BTreeMap::new());
        assert!(hs.ports().is_empty());
    }
}
