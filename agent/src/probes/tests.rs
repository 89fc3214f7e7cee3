//! Probe thresholds and actions: the pure verdict rules, and real HTTP/TCP probes against
//! listeners on loopback, exec through the fake runtime.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerPort, ExecAction, GRPCAction, HTTPGetAction, HTTPHeader, LifecycleHandler,
    Probe, SleepAction, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;
use crate::cri::fake::FakeRuntime;

/// An HTTP server on loopback answering every request with the status it is set to
/// (0: accept and never answer), counting requests and keeping the last one's head.
pub(crate) struct HttpStub {
    pub port: u16,
    pub status: Arc<AtomicU16>,
    pub hits: Arc<AtomicUsize>,
    pub last: Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpStub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpStub {
    pub async fn start(status: u16) -> HttpStub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let port = listener.local_addr().expect("addr").port();
        let status = Arc::new(AtomicU16::new(status));
        let hits = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(std::sync::Mutex::new(String::new()));
        let (s, h, l) = (status.clone(), hits.clone(), last.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (s, h, l) = (s.clone(), h.clone(), l.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    *l.lock().expect("lock") = String::from_utf8_lossy(&head).into_owned();
                    let code = s.load(Ordering::SeqCst);
                    if code == 0 {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        return;
                    }
                    let resp = format!(
                        "HTTP/1.1 {code} X\r\nContent-Length: 0\r\nLocation: http://192.0.2.9/\r\nConnection: close\r\n\r\n"
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        HttpStub {
            port,
            status,
            hits,
            last,
            task,
        }
    }

    pub fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }
}

/// A loopback port nothing listens on.
pub(crate) fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

fn th(success: u32, failure: u32) -> Thresholds {
    Thresholds {
        initial_delay: Duration::ZERO,
        period: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
        success,
        failure,
    }
}

#[test]
fn verdicts_change_only_after_threshold_runs_in_a_row() {
    let mut v = Verdict::new(th(2, 3));
    assert_eq!(v.healthy, None);
    assert!(!v.record(true), "one success of two");
    assert!(v.record(true));
    assert_eq!(v.healthy, Some(true));
    assert!(!v.record(false));
    assert!(!v.record(false));
    assert!(!v.record(true), "a success resets the failure run");
    assert!(!v.record(false));
    assert!(!v.record(false));
    assert_eq!(v.healthy, Some(true));
    assert!(v.record(false), "third failure in a row");
    assert_eq!(v.healthy, Some(false));
    assert!(!v.record(true));
    assert!(v.record(true));
}

#[test]
fn thresholds_take_the_api_defaults_and_liveness_needs_one_success() {
    let d = Thresholds::of(&Probe::default(), Kind::Readiness);
    assert_eq!(
        d,
        Thresholds {
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            success: 1,
            failure: 3,
        }
    );
    let p = Probe {
        initial_delay_seconds: Some(5),
        period_seconds: Some(0),
        timeout_seconds: Some(4),
        success_threshold: Some(3),
        failure_threshold: Some(-1),
        ..Default::default()
    };
    let r = Thresholds::of(&p, Kind::Readiness);
    assert_eq!(r.initial_delay, Duration::from_secs(5));
    assert_eq!(r.period, Duration::from_secs(1), "period is at least 1s");
    assert_eq!(r.timeout, Duration::from_secs(4));
    assert_eq!((r.success, r.failure), (3, 3));
    assert_eq!(Thresholds::of(&p, Kind::Liveness).success, 1);
    assert_eq!(Thresholds::of(&p, Kind::Startup).success, 1);
}

fn web() -> Container {
    Container {
        name: "web".into(),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: 8080,
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn target(host: Option<&str>) -> Target {
    Target {
        container_id: "c1".into(),
        default_host: host.map(str::to_owned),
    }
}

#[test]
fn actions_resolve_named_ports_default_hosts_and_reject_bad_specs() {
    let http = Probe {
        http_get: Some(HTTPGetAction {
            port: IntOrString::String("http".into()),
            path: Some("healthz".into()),
            http_headers: Some(vec![HTTPHeader {
                name: "X-Probe".into(),
                value: "1".into(),
            }]),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        Action::of_probe(&http, &web(), &target(Some("10.1.0.4"))),
        Ok(Action::Http {
            scheme: "http".into(),
            host: "10.1.0.4".into(),
            port: 8080,
            path: "/healthz".into(),
            headers: vec![("X-Probe".into(), "1".into())],
        })
    );
    assert_eq!(
        Action::of_probe(&http, &web(), &target(None)),
        Err(ProbeError::NoAddress)
    );
    let tcp = |port: IntOrString, host: Option<&str>| Probe {
        tcp_socket: Some(TCPSocketAction {
            port,
            host: host.map(str::to_owned),
        }),
        ..Default::default()
    };
    assert_eq!(
        Action::of_probe(
            &tcp(IntOrString::Int(53), Some("127.0.0.1")),
            &web(),
            &target(Some("10.1.0.4"))
        ),
        Ok(Action::Tcp {
            host: "127.0.0.1".into(),
            port: 53
        }),
        "an explicit host wins"
    );
    assert_eq!(
        Action::of_probe(
            &tcp(IntOrString::String("grpc".into()), None),
            &web(),
            &target(Some("h"))
        ),
        Err(ProbeError::UnknownPortName {
            name: "grpc".into(),
            container: "web".into()
        })
    );
    assert_eq!(
        Action::of_probe(
            &tcp(IntOrString::Int(70000), None),
            &web(),
            &target(Some("h"))
        ),
        Err(ProbeError::BadPort {
            port: "70000".into()
        })
    );
    let exec = |cmd: Vec<&str>| Probe {
        exec: Some(ExecAction {
            command: Some(cmd.into_iter().map(str::to_owned).collect()),
        }),
        ..Default::default()
    };
    assert_eq!(
        Action::of_probe(&exec(vec!["cat", "/ok"]), &web(), &target(None)),
        Ok(Action::Exec(vec!["cat".into(), "/ok".into()]))
    );
    assert_eq!(
        Action::of_probe(&exec(vec![]), &web(), &target(None)),
        Err(ProbeError::EmptyCommand)
    );
    assert_eq!(
        Action::of_probe(&Probe::default(), &web(), &target(None)),
        Err(ProbeError::NoHandler)
    );
    let grpc = Probe {
        grpc: Some(GRPCAction {
            port: 9000,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(
        Action::of_probe(&grpc, &web(), &target(None)),
        Err(ProbeError::Unsupported { what: "grpc" })
    );
    let mut bad_scheme = http.clone();
    if let Some(h) = bad_scheme.http_get.as_mut() {
        h.scheme = Some("FTP".into());
    }
    assert_eq!(
        Action::of_probe(&bad_scheme, &web(), &target(Some("h"))),
        Err(ProbeError::BadScheme {
            scheme: "FTP".into()
        })
    );
    let sleep = LifecycleHandler {
        sleep: Some(SleepAction { seconds: -1 }),
        ..Default::default()
    };
    assert_eq!(
        Action::of_hook(&sleep, &web(), &target(None)),
        Err(ProbeError::BadSleep { seconds: -1 })
    );
}

#[tokio::test]
async fn http_probes_succeed_on_2xx_and_3xx_and_fail_on_errors_and_timeouts() {
    let stub = HttpStub::start(200).await;
    let prober = Prober::new().expect("prober");
    let runtime = FakeRuntime::default();
    let action = Action::Http {
        scheme: "http".into(),
        host: "127.0.0.1".into(),
        port: stub.port,
        path: "/healthz".into(),
        headers: vec![("X-Probe".into(), "yes".into())],
    };
    let t = target(None);
    let run = |a: Action| {
        let prober = prober.clone();
        let runtime = &runtime;
        let t = t.clone();
        async move { prober.run(runtime, &a, &t, Duration::from_secs(1)).await }
    };
    assert_eq!(run(action.clone()).await, Outcome::Success);
    let head = stub.last.lock().expect("lock").clone();
    assert!(head.starts_with("GET /healthz HTTP/1.1"), "{head}");
    assert!(head.to_ascii_lowercase().contains("x-probe: yes"), "{head}");
    stub.set(302);
    assert_eq!(
        run(action.clone()).await,
        Outcome::Success,
        "redirects are not followed"
    );
    stub.set(500);
    assert_eq!(
        run(action.clone()).await,
        Outcome::Failure("HTTP probe failed with statuscode: 500".into())
    );
    stub.set(0);
    let Outcome::Failure(m) = run(action.clone()).await else {
        panic!("a server that never answers fails the probe");
    };
    assert!(m.contains("no answer within 1s"), "{m}");
    let port = closed_port();
    let Outcome::Failure(m) = run(Action::Http {
        scheme: "http".into(),
        host: "127.0.0.1".into(),
        port,
        path: "/".into(),
        headers: vec![],
    })
    .await
    else {
        panic!("refused fails");
    };
    assert!(m.contains(&format!("127.0.0.1:{port}")), "{m}");
}

#[tokio::test]
async fn tcp_probes_connect_and_exec_probes_run_through_the_runtime() {
    let stub = HttpStub::start(200).await;
    let prober = Prober::new().expect("prober");
    let runtime = FakeRuntime::default();
    let t = target(None);
    let ok = prober
        .run(
            &runtime,
            &Action::Tcp {
                host: "127.0.0.1".into(),
                port: stub.port,
            },
            &t,
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(ok, Outcome::Success);
    let port = closed_port();
    let refused = prober
        .run(
            &runtime,
            &Action::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            &t,
            Duration::from_secs(1),
        )
        .await;
    let Outcome::Failure(m) = refused else {
        panic!("nothing listens on {port}");
    };
    assert!(
        m.starts_with(&format!("dial tcp 127.0.0.1:{port}: ")),
        "{m}"
    );
    let exec = prober
        .run(
            &runtime,
            &Action::Exec(vec!["cat".into(), "/ready".into()]),
            &t,
            Duration::from_secs(1),
        )
        .await;
    assert_eq!(exec, Outcome::Success);
    assert_eq!(runtime.calls(), ["ExecSync c1 cat /ready"]);
}
