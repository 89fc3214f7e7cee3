//! The handlers against the in-memory API and runtime fakes, with real log files.

use std::collections::HashMap;
use std::sync::Arc;

use ferrolet_cri::v1;
use http_body_util::BodyExt as _;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::api::fake::FakeApi;
use crate::cri::fake::FakeRuntime;

struct Setup {
    api: KubeletApi<FakeApi, FakeRuntime>,
    _root: tempfile::TempDir,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().expect("tempdir");
    let ctx = PodContext {
        node_name: "node-a".into(),
        root_dir: root.path().to_path_buf(),
        cgroup_root: "/ferrolet-unit".into(),
        cluster_dns: vec![],
        cluster_domain: "cluster.local".into(),
        resolv_conf: root.path().join("resolv.conf"),
        host_ips: vec!["192.0.2.1".into()],
        runtime_name: "fake".into(),
        allocatable: BTreeMap::new(),
    };
    Setup {
        api: KubeletApi {
            api: Arc::new(FakeApi::new()),
            runtime: Arc::new(FakeRuntime::new(&[], None)),
            ctx,
        },
        _root: root,
    }
}

fn pod_labels(uid: &str) -> HashMap<String, String> {
    HashMap::from([
        (labels::POD_NAMESPACE.to_owned(), "default".to_owned()),
        (labels::POD_NAME.to_owned(), "web".to_owned()),
        (labels::POD_UID.to_owned(), uid.to_owned()),
        (
            labels::MANAGED_BY.to_owned(),
            labels::MANAGED_BY_VALUE.to_owned(),
        ),
    ])
}

/// A sandbox for default/web and one container `app` per attempt, each with a log file
/// holding `attempt <n>`; the last attempt keeps running.
async fn pod_with_attempts(s: &Setup, attempts: u32) {
    let rt = &s.api.runtime;
    let sandbox = v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: "web".into(),
            namespace: "default".into(),
            uid: "uid-1".into(),
            attempt: 0,
        }),
        labels: pod_labels("uid-1"),
        ..Default::default()
    };
    let id = rt.run_pod_sandbox(sandbox.clone()).await.expect("sandbox");
    let key = PodKey {
        namespace: "default".into(),
        name: "web".into(),
        uid: "uid-1".into(),
    };
    let dir = s.api.ctx.log_dir(&key).join("app");
    std::fs::create_dir_all(&dir).expect("log dir");
    for attempt in 0..attempts {
        let mut container_labels = pod_labels("uid-1");
        container_labels.insert(labels::CONTAINER_NAME.into(), "app".into());
        let config = v1::ContainerConfig {
            metadata: Some(v1::ContainerMetadata {
                name: "app".into(),
                attempt,
            }),
            labels: container_labels,
            ..Default::default()
        };
        std::fs::write(
            dir.join(format!("{attempt}.log")),
            format!(
                "2026-11-22T08:00:0{attempt}Z stdout F attempt {attempt}\n2026-11-22T08:00:0{attempt}.5Z stderr F done {attempt}\n"
            ),
        )
        .expect("log");
        let cid = rt
            .create_container(&id, config, sandbox.clone())
            .await
            .expect("create");
        rt.start_container(&cid).await.expect("start");
        if attempt + 1 < attempts {
            rt.exit("app", 1);
        }
    }
}

async fn get(s: &Setup, path: &str, query: Option<&str>) -> (u16, String) {
    let resp = s.api.handle("GET", path, query, true).await;
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn every_endpoint_needs_a_client_certificate() {
    let s = setup();
    for path in ["/healthz", "/pods", "/metrics", "/containerLogs/a/b/c"] {
        let resp = s.api.handle("GET", path, None, false).await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{path}");
    }
}

#[tokio::test]
async fn healthz_pods_and_bad_paths() {
    let s = setup();
    assert_eq!(get(&s, "/healthz", None).await, (200, "ok\n".into()));
    s.api.api.insert(
        Some("default"),
        &Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::core::v1::PodSpec {
                node_name: Some("node-a".into()),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let (code, body) = get(&s, "/pods", None).await;
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(list["kind"], "PodList");
    assert_eq!(list["items"][0]["metadata"]["name"], "web");
    let (code, body) = get(&s, "/nothing", None).await;
    assert_eq!(code, 404);
    assert!(body.contains("/nothing"), "{body}");
    let resp = s.api.handle("DELETE", "/pods", None, true).await;
    assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn logs_of_the_current_and_previous_container() {
    let s = setup();
    pod_with_attempts(&s, 2).await;
    let path = "/containerLogs/default/web/app";
    assert_eq!(
        get(&s, path, None).await,
        (200, "attempt 1\ndone 1\n".into())
    );
    assert_eq!(
        get(&s, path, Some("previous=true")).await,
        (200, "attempt 0\ndone 0\n".into())
    );
    assert_eq!(
        get(&s, path, Some("tailLines=1&timestamps=true")).await,
        (200, "2026-11-22T08:00:01.5Z done 1\n".into())
    );
    assert_eq!(
        get(&s, path, Some("limitBytes=3")).await,
        (200, "att".into())
    );
}

#[tokio::test]
async fn log_requests_for_what_is_not_there_say_what_is_missing() {
    let s = setup();
    let (code, body) = get(&s, "/containerLogs/default/ghost/app", None).await;
    assert_eq!(code, 404);
    assert!(
        body.contains("default/ghost not found on node node-a"),
        "{body}"
    );
    pod_with_attempts(&s, 1).await;
    let (code, body) = get(&s, "/containerLogs/default/web/app", Some("previous=1")).await;
    assert_eq!(code, 400);
    assert!(
        body.contains("previous terminated container \"app\""),
        "{body}"
    );
    let (code, body) = get(&s, "/containerLogs/default/web/other", None).await;
    assert_eq!(code, 400);
    assert!(body.contains("\"other\""), "{body}");
    let (code, body) = get(&s, "/containerLogs/default/web/app", Some("tailLines=x")).await;
    assert_eq!(code, 400);
    assert!(body.contains("tailLines"), "{body}");
}

#[tokio::test]
async fn followed_logs_end_when_the_container_exits() {
    let s = setup();
    pod_with_attempts(&s, 1).await;
    let resp = s
        .api
        .handle(
            "GET",
            "/containerLogs/default/web/app",
            Some("follow=true"),
            true,
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body
        .frame()
        .await
        .expect("a frame")
        .expect("data")
        .into_data()
        .expect("bytes");
    assert_eq!(first.as_ref(), b"attempt 0\ndone 0\n");
    s.api.runtime.exit("app", 0);
    // The stream ends once the exit is seen.
    let rest = body.collect().await.expect("rest").to_bytes();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn metrics_count_pods_and_containers() {
    let s = setup();
    pod_with_attempts(&s, 2).await;
    let (code, body) = get(&s, "/metrics", None).await;
    assert_eq!(code, 200);
    assert!(body.contains("kubelet_running_pods 1\n"), "{body}");
    assert!(
        body.contains("kubelet_running_containers{container_state=\"running\"} 1\n"),
        "{body}"
    );
    assert!(
        body.contains("kubelet_running_containers{container_state=\"exited\"} 1\n"),
        "{body}"
    );
    assert!(body.contains("process_resident_memory_bytes "), "{body}");
}
