//! A real etcd server for tests: its own loopback ports and data dir, started and checked
//! healthy with a deadline, killed and removed on drop. Used by the store's conformance and
//! durability tests and by the API server's tests against etcd.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The etcd binary; override with `FERROLET_ETCD`.
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("FERROLET_ETCD").map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from)
}

/// How long etcd may take to answer after it was started.
const START_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum EtcdTestError {
    #[error("create etcd data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("find a free loopback port: {0}")]
    Port(std::io::Error),
    #[error("start {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error("etcd at {endpoint} exited early ({status}); its log: {log}")]
    Exited {
        endpoint: String,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("etcd at {endpoint} not healthy within {deadline:?}; its log: {log}")]
    NotHealthy {
        endpoint: String,
        deadline: Duration,
        log: String,
    },
}

/// A running etcd owned by a test. Dropping it kills etcd (SIGKILL) and removes its data.
pub struct EtcdServer {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

/// Two distinct free loopback ports (both listeners are held until both are picked).
fn free_ports() -> Result<(u16, u16), EtcdTestError> {
    let a = TcpListener::bind("127.0.0.1:0").map_err(EtcdTestError::Port)?;
    let b = TcpListener::bind("127.0.0.1:0").map_err(EtcdTestError::Port)?;
    let port = |l: &TcpListener| {
        l.local_addr()
            .map(|a| a.port())
            .map_err(EtcdTestError::Port)
    };
    Ok((port(&a)?, port(&b)?))
}

impl EtcdServer {
    /// Starts an etcd with a fresh data dir and waits until it serves requests.
    pub async fn start() -> Result<EtcdServer, EtcdTestError> {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferrolet-etcd-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        // A leftover of an earlier run with the same pid is stale.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| EtcdTestError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let (client_port, peer_port) = free_ports()?;
        let mut server = EtcdServer {
            child: None,
            dir,
            client_port,
            peer_port,
        };
        let mut tries = 1;
        loop {
            match server.launch().await {
                Ok(()) => return Ok(server),
                // The ports were free when picked, but another process may have taken one
                // before etcd bound it: pick again.
                Err(EtcdTestError::Exited { .. }) if tries < 3 => {
                    tries += 1;
                    let _ = std::fs::remove_dir_all(server.data_dir());
                    (server.client_port, server.peer_port) = free_ports()?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The client URL, e.g. `http://127.0.0.1:23790`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The data dir (kept across `kill` + `restart`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Kills etcd with SIGKILL, as a crash would; the data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data (after `kill`).
    pub async fn restart(&mut self) -> Result<(), EtcdTestError> {
        self.kill();
        self.launch().await
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    async fn launch(&mut self) -> Result<(), EtcdTestError> {
        let binary = etcd_binary();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|source| EtcdTestError::DataDir {
                path: self.log_path(),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| EtcdTestError::DataDir {
            path: self.log_path(),
            source,
        })?;
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&binary)
            .arg("--name=test")
            .arg(format!("--data-dir={}", path_str(&self.data_dir())))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| EtcdTestError::Spawn { binary, source })?;
        self.child = Some(child);
        self.wait_healthy().await
    }

    async fn wait_healthy(&mut self) -> Result<(), EtcdTestError> {
        let deadline = Instant::now() + START_DEADLINE;
        let endpoint = self.endpoint();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(EtcdTestError::Exited {
                    endpoint,
                    status,
                    log: self.log(),
                });
            }
            let options = etcd_client::ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(1))
                .with_timeout(Duration::from_secs(2));
            if let Ok(mut client) =
                etcd_client::Client::connect([endpoint.as_str()], Some(options)).await
                && client.status().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(EtcdTestError::NotHealthy {
                    endpoint,
                    deadline: START_DEADLINE,
                    log: self.log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
