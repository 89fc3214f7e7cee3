//! Pod logic against fakes: the pure phase/plan/status rules, and whole workers driving a
//! recording runtime, network and API.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;

use super::backoff::Backoff;
use super::observed::{ContainerObs, Observed, RunState, SandboxObs};
use super::plan::{Start, plan};
use super::spec::PodContext;
use super::status::{StatusContext, phase, pod_status};
use super::worker::{Deps, PodWorker};
use crate::api::events::RecordingSink;
use crate::api::fake::{FakeApi, Write};
use crate::cni::fake::FakeNetwork;
use crate::cri::fake::FakeRuntime;
use crate::volumes::FakeMounter;

const IMAGE: &str = "ferrolet.local/busybox:1";

fn container(name: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(IMAGE.into()),
        ..Default::default()
    }
}

fn pod(name: &str, init: &[&str], apps: &[&str], policy: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some("node-a".into()),
            restart_policy: Some(policy.into()),
            init_containers: (!init.is_empty())
                .then(|| init.iter().map(|n| container(n)).collect()),
            containers: apps.iter().map(|n| container(n)).collect(),
            termination_grace_period_seconds: Some(7),
            ..Default::default()
        }),
        status: None,
    }
}

fn obs_container(name: &str, attempt: u32, state: RunState, exit_code: i32) -> ContainerObs {
    ContainerObs {
        id: format!("{name}-{attempt}"),
        name: name.into(),
        attempt,
        state,
        exit_code,
        reason: String::new(),
        message: String::new(),
        created_at: 1_000 + i64::from(attempt),
        started_at: 2_000_000_000,
        finished_at: if state == RunState::Exited {
            3_000_000_000
        } else {
            0
        },
        image_ref: "sha256:abc".into(),
    }
}

fn observed(containers: Vec<ContainerObs>) -> Observed {
    Observed {
        sandbox: Some(SandboxObs {
            id: "sb".into(),
            ready: true,
            attempt: 0,
            ips: vec!["10.88.0.5".into()],
        }),
        containers,
    }
}

fn spec_of(p: &Pod) -> &PodSpec {
    p.spec.as_ref().expect("spec")
}

#[test]
fn phase_follows_the_kubelet_rules() {
    use RunState::{Exited, Running};
    let cases: Vec<(&str, &[&str], Vec<ContainerObs>, &str)> = vec![
        ("Always", &[], vec![], phase::PENDING),
        (
            "Always",
            &[],
            vec![obs_container("a", 0, Running, 0)],
            phase::RUNNING,
        ),
        (
            "Always",
            &[],
            vec![obs_container("a", 0, Exited, 0)],
            phase::RUNNING,
        ),
        (
            "Never",
            &[],
            vec![obs_container("a", 0, Exited, 0)],
            phase::SUCCEEDED,
        ),
        (
            "Never",
            &[],
            vec![obs_container("a", 0, Exited, 2)],
            phase::FAILED,
        ),
        (
            "OnFailure",
            &[],
            vec![obs_container("a", 0, Exited, 2)],
            phase::RUNNING,
        ),
        (
            "OnFailure",
            &[],
            vec![obs_container("a", 0, Exited, 0)],
            phase::SUCCEEDED,
        ),
        (
            "Never",
            &["i"],
            vec![obs_container("i", 0, Exited, 1)],
            phase::FAILED,
        ),
        (
            "Always",
            &["i"],
            vec![obs_container("i", 0, Exited, 1)],
            phase::PENDING,
        ),
        (
            "Always",
            &["i"],
            vec![obs_container("i", 0, Running, 0)],
            phase::PENDING,
        ),
        (
            "Always",
            &["i"],
            vec![
                obs_container("i", 0, Exited, 0),
                obs_container("a", 0, Running, 0),
            ],
            phase::RUNNING,
        ),
    ];
    for (policy, init, containers, want) in cases {
        let p = pod("p", init, &["a"], policy);
        let got = phase(spec_of(&p), &observed(containers.clone()));
        assert_eq!(got, want, "{policy} init={init:?} {containers:?}");
    }
}

#[test]
fn plan_creates_a_sandbox_first_and_replaces_a_dead_one() {
    let p = pod("p", &[], &["a"], "Always");
    let now = SystemTime::now();
    let fresh = plan(spec_of(&p), &Observed::default(), &Backoff::default(), now);
    assert_eq!(fresh.create_sandbox, Some(0));
    assert!(fresh.start.is_empty());
    let mut dead = observed(vec![obs_container("a", 0, RunState::Exited, 137)]);
    if let Some(sb) = dead.sandbox.as_mut() {
        sb.ready = false;
        sb.attempt = 2;
    }
    let replaced = plan(spec_of(&p), &dead, &Backoff::default(), now);
    assert_eq!(replaced.create_sandbox, Some(3));
}

#[test]
fn plan_runs_init_containers_one_at_a_time_in_order_then_all_apps() {
    let p = pod("p", &["i1", "i2"], &["a", "b"], "Always");
    let b = Backoff::default();
    let now = SystemTime::now();
    let names = |obs: Observed| -> Vec<String> {
        plan(spec_of(&p), &obs, &b, now)
            .start
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    assert_eq!(names(observed(vec![])), ["i1"]);
    assert!(names(observed(vec![obs_container("i1", 0, RunState::Running, 0)])).is_empty());
    assert_eq!(
        names(observed(vec![obs_container("i1", 0, RunState::Exited, 0)])),
        ["i2"]
    );
    assert_eq!(
        names(observed(vec![
            obs_container("i1", 0, RunState::Exited, 0),
            obs_container("i2", 0, RunState::Exited, 0),
        ])),
        ["a", "b"]
    );
}

#[test]
fn plan_restarts_per_policy_with_backoff() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(4);
    let exited = |code| observed(vec![obs_container("a", 3, RunState::Exited, code)]);
    let fresh = Backoff::default();
    let always = pod("p", &[], &["a"], "Always");
    let got = plan(spec_of(&always), &exited(0), &fresh, now);
    assert_eq!(
        got.start,
        [Start {
            name: "a".into(),
            init: false,
            attempt: 4,
            restart: true
        }]
    );
    let on_failure = pod("p", &[], &["a"], "OnFailure");
    assert_eq!(
        plan(spec_of(&on_failure), &exited(1), &fresh, now)
            .start
            .len(),
        1
    );
    assert!(plan(spec_of(&on_failure), &exited(0), &fresh, now).finished);
    let never = pod("p", &[], &["a"], "Never");
    let done = plan(spec_of(&never), &exited(1), &fresh, now);
    assert!(done.finished && done.start.is_empty());

    // After a restart, the next exit waits (CrashLoopBackOff) and says so.
    let mut b = Backoff::default();
    b.restarted("a", now);
    let held = plan(spec_of(&always), &exited(1), &b, now);
    assert!(held.start.is_empty());
    let w = held.waiting.get("a").expect("held back");
    assert_eq!(w.reason, "CrashLoopBackOff");
    assert!(w.message.contains("exit code 1"), "{}", w.message);
    let requeue = held.requeue_after.expect("requeue");
    assert!(requeue <= Duration::from_secs(10), "{requeue:?}");
}

#[test]
fn status_reports_states_restart_counts_conditions_and_ips() {
    let p = pod("p", &["i"], &["a", "b"], "Always");
    let obs = observed(vec![
        obs_container("i", 0, RunState::Exited, 0),
        obs_container("a", 0, RunState::Exited, 1),
        obs_container("a", 1, RunState::Running, 0),
        obs_container("b", 2, RunState::Exited, 3),
    ]);
    let waiting = BTreeMap::from([(
        "b".to_owned(),
        super::status::Waiting {
            reason: "CrashLoopBackOff".into(),
            message: "back-off".into(),
        },
    )]);
    let readiness = HashMap::new();
    let ctx = StatusContext {
        host_ips: &["192.0.2.1".to_owned()],
        runtime_name: "containerd",
        now: Timestamp::UNIX_EPOCH,
        waiting: &waiting,
        readiness: &readiness,
        started: &HashMap::new(),
    };
    let s = pod_status(&p, &obs, &ctx);
    assert_eq!(s.phase.as_deref(), Some("Running"));
    assert_eq!(s.pod_ip.as_deref(), Some("10.88.0.5"));
    assert_eq!(s.host_ip.as_deref(), Some("192.0.2.1"));
    let cs = s.container_statuses.expect("statuses");
    let a = &cs[0];
    assert_eq!(a.restart_count, 1);
    assert!(a.ready && a.state.as_ref().is_some_and(|s| s.running.is_some()));
    let last = a
        .last_state
        .as_ref()
        .and_then(|l| l.terminated.as_ref())
        .expect("lastState");
    assert_eq!((last.exit_code, last.reason.as_deref()), (1, Some("Error")));
    assert_eq!(a.container_id.as_deref(), Some("containerd://a-1"));
    let b = &cs[1];
    assert_eq!(b.restart_count, 2);
    assert!(!b.ready);
    assert_eq!(
        b.state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref()),
        Some("CrashLoopBackOff")
    );
    assert_eq!(
        b.last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .map(|t| t.exit_code),
        Some(3)
    );
    let cond = |t: &str| {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == t)
            .map(|c| c.status.clone())
    };
    assert_eq!(cond("Initialized").as_deref(), Some("True"));
    assert_eq!(cond("Ready").as_deref(), Some("False"));
    assert_eq!(cond("PodScheduled").as_deref(), Some("True"));
    assert!(s.start_time.is_some());
}

#[test]
fn condition_transition_times_are_kept_while_unchanged() {
    let p0 = pod("p", &[], &["a"], "Always");
    let obs = observed(vec![obs_container("a", 0, RunState::Running, 0)]);
    let waiting = BTreeMap::new();
    let readiness = HashMap::new();
    let started = HashMap::new();
    let at = |secs: i64| StatusContext {
        host_ips: &[],
        runtime_name: "fake",
        now: Timestamp::from_second(secs).expect("time"),
        waiting: &waiting,
        readiness: &readiness,
        started: &started,
    };
    let first = pod_status(&p0, &obs, &at(100));
    let mut p1 = p0.clone();
    p1.status = Some(first.clone());
    let second = pod_status(&p1, &obs, &at(200));
    assert_eq!(first, second, "nothing changed, nothing to patch");
    let ready_time = |s: &PodStatus| -> Option<Time> {
        s.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Ready")
            .and_then(|c| c.last_transition_time.clone())
    };
    assert_eq!(
        ready_time(&second),
        Some(Time(Timestamp::from_second(100).expect("t")))
    );
}

struct Rig {
    api: Arc<FakeApi>,
    events: Arc<RecordingSink>,
    runtime: Arc<FakeRuntime>,
    network: Arc<FakeNetwork>,
    deps: Arc<Deps<FakeApi, FakeRuntime, FakeNetwork>>,
    _root: tempfile::TempDir,
}

fn rig(runtime: FakeRuntime) -> Rig {
    let root = tempfile::tempdir().expect("tempdir");
    let api = Arc::new(FakeApi::new());
    let runtime = Arc::new(runtime);
    let network = Arc::new(FakeNetwork::default());
    let events = Arc::new(RecordingSink::default());
    let mounter = Arc::new(FakeMounter::default());
    let deps = Arc::new(Deps {
        api: api.clone(),
        runtime: runtime.clone(),
        network: network.clone(),
        ctx: PodContext {
            node_name: "node-a".into(),
            root_dir: root.path().to_path_buf(),
            cgroup_root: "/ferrolet-unit".into(),
            cluster_dns: vec![],
            cluster_domain: "cluster.local".into(),
            resolv_conf: root.path().join("resolv.conf"),
            host_ips: vec!["192.0.2.1".into()],
            runtime_name: "fake".into(),
            allocatable: BTreeMap::new(),
        },
        cgroupfs: root.path().join("cgroupfs"),
        events: events.clone(),
        mounter,
    });
    Rig {
        api,
        events,
        runtime,
        network,
        deps,
        _root: root,
    }
}

/// Syncs until the worker has nothing left to do right now.
async fn settle(w: &mut PodWorker<FakeApi, FakeRuntime, FakeNetwork>) {
    for _ in 0..10 {
        let next = w.sync().await.expect("sync");
        if !next.is_zero() {
            return;
        }
    }
    panic!("worker did not settle");
}

fn api_pod(rig: &Rig, name: &str) -> Pod {
    rig.api
        .object::<Pod>(Some("default"), name)
        .expect("pod in API")
}

#[tokio::test]
async fn a_pod_gets_sandbox_network_init_then_apps_and_reports_running() {
    let rig = rig(FakeRuntime::new(&[IMAGE], None));
    rig.runtime.exit_on_start("init", 0);
    let p = pod("web", &["init"], &["a", "b"], "Always");
    rig.api.insert(Some("default"), &p);
    let mut w = PodWorker::new(rig.deps.clone(), p);
    settle(&mut w).await;

    let calls = rig.runtime.calls();
    let order: Vec<&str> = calls
        .iter()
        .map(String::as_str)
        .filter(|c| c.starts_with("RunPodSandbox") || c.starts_with("StartContainer"))
        .collect();
    assert_eq!(
        order,
        [
            "RunPodSandbox default/web attempt 0",
            "StartContainer init",
            "StartContainer a",
            "StartContainer b"
        ]
    );
    assert_eq!(rig.network.calls(), ["ADD sandbox-1"]);
    let config = &rig.runtime.sandbox_configs()[0];
    assert_eq!(
        config.linux.as_ref().map(|l| l.cgroup_parent.as_str()),
        Some("/ferrolet-unit/poduid-web")
    );
    let status = api_pod(&rig, "web").status.expect("status patched");
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.pod_ip.as_deref(), Some("10.88.0.2"));
    assert_eq!(status.host_ip.as_deref(), Some("192.0.2.1"));
    let ready: Vec<bool> = status
        .container_statuses
        .iter()
        .flatten()
        .map(|c| c.ready)
        .collect();
    assert_eq!(ready, [true, true]);
}

#[tokio::test]
async fn the_runtimes_own_pod_ip_skips_cni_and_host_network_uses_host_ip() {
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("10.22.0.9")));
    let p = pod("p", &[], &["a"], "Always");
    rig.api.insert(Some("default"), &p);
    let mut w = PodWorker::new(rig.deps.clone(), p);
    settle(&mut w).await;
    assert!(rig.network.calls().is_empty(), "runtime did networking");
    assert_eq!(
        api_pod(&rig, "p").status.and_then(|s| s.pod_ip).as_deref(),
        Some("10.22.0.9")
    );

    let rig = rig_host_network().await;
    let status = rig.1;
    assert_eq!(status.pod_ip.as_deref(), Some("192.0.2.1"));
    assert!(rig.0.network.calls().is_empty());
}

async fn rig_host_network() -> (Rig, PodStatus) {
    let rig = rig(FakeRuntime::new(&[IMAGE], None));
    let mut p = pod("h", &[], &["a"], "Always");
    if let Some(s) = p.spec.as_mut() {
        s.host_network = Some(true);
    }
    rig.api.insert(Some("default"), &p);
    let mut w = PodWorker::new(rig.deps.clone(), p);
    settle(&mut w).await;
    let status = api_pod(&rig, "h").status.expect("status");
    (rig, status)
}

#[tokio::test]
async fn never_policy_failure_ends_failed_and_stops_the_sandbox() {
    let rig = rig(FakeRuntime::new(&[IMAGE], None));
    rig.runtime.exit_on_start("a", 3);
    let p = pod("p", &[], &["a"], "Never");
    rig.api.insert(Some("default"), &p);
    let mut w = PodWorker::new(rig.deps.clone(), p);
    settle(&mut w).await;
    let status = api_pod(&rig, "p").status.expect("status");
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    let term = status
        .container_statuses
        .as_ref()
        .and_then(|c| c[0].state.clone());
    assert_eq!(
        term.and_then(|s| s.terminated).map(|t| t.exit_code),
        Some(3)
    );
    let calls = rig.runtime.calls();
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("StartContainer"))
            .count(),
        1
    );
    assert!(
        calls.iter().any(|c| c.starts_with("StopPodSandbox")),
        "{calls:?}"
    );
    assert_eq!(rig.network.calls(), ["ADD sandbox-1", "DEL sandbox-1"]);
    // A later sync does not bring it back.
    w.sync().await.expect("sync");
    assert_eq!(rig.runtime.sandbox_count(), 1);
    assert!(rig.runtime.running().is_empty());
}

#[tokio::test]
async fn a_crashing_container_restarts_once_then_backs_off() {
    let rig = rig(FakeRuntime::new(&[IMAGE], None));
    rig.runtime.exit_on_start("a", 1);
    let p = pod("p", &[], &["a"], "Always");
    rig.api.insert(Some("default"), &p);
    let mut w = PodWorker::new(rig.deps.clone(), p);
    settle(&mut w).await;
    let calls = rig.runtime.calls();
    let creates: Vec<&String> = calls
        .iter()
        .filter(|c| c.starts_with("CreateContainer"))
        .collect();
    assert_eq!(
        creates,
        ["CreateContainer a attempt 0", "CreateContainer a attempt 1"]
    );
    let status = api_pod(&rig, "p").status.expect("status");
    let a = &status.container_statuses.expect("statuses")[0];
    assert_eq!(a.restart_count, 1);
    assert_eq!(
        a.state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref()),
        Some("CrashLoopBackOff")
    );
    assert_eq!(status.phase.as_deref(), Some("Running"));
}

#[tokio::test]
async fn image_pull_policies_are_honoured() {
    let rig = rig(FakeRuntime::new(&[], None));
    let mut p = pod("p", &[], &["never", "always", "missing"], "Always");
    if let Some(s) = p.spec.as_mut() {
        s.containers[0].image_pull_policy = Some("Never".into());
        s.containers[1].image = Some("ferrolet.local/x:latest".into());
        s.containers[2].image = Some("ferrolet.local/missing:1".into());
    }
    rig.api.insert(Some("default"), &p);
    let mut w = PodWorker::new(rig.deps.clone(), p);
    settle(&mut w).await;
    let calls = rig.runtime.calls();
    assert!(
        !calls.iter().any(|c| c.contains(IMAGE)),
        "Never pulls nothing: {calls:?}"
    );
    assert!(
        calls.contains(&"PullImage ferrolet.local/x:latest".to_owned()),
        "{calls:?}"
    );
    let status = api_pod(&rig, "p").status.expect("status");
    let reason = |i: usize| {
        status.container_statuses.as_ref().and_then(|c| {
            c[i].state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.clone())
        })
    };
    assert_eq!(reason(0).as_deref(), Some("ErrImageNeverPull"));
    // The failed pull (ErrImagePull) is not retried on the next sync: ImagePullBackOff.
    assert_eq!(reason(2).as_deref(), Some("ImagePullBackOff"));
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    // Within the backoff the pull is not retried.
    w.sync().await.expect("sync");
    let pulls = rig
        .runtime
        .calls()
        .iter()
        .filter(|c| c.as_str() == "PullImage ferrolet.local/missing:1")
        .count();
    assert_eq!(pulls, 1);
}

#[tokio::test]
async fn deletion_stops_gracefully_detaches_removes_and_deletes_with_grace_zero() {
    let rig = rig(FakeRuntime::new(&[IMAGE], None));
    let p = pod("p", &[], &["a"], "Always");
    rig.api.insert(Some("default"), &p);
    let (tx, rx) = tokio::sync::watch::channel(Some(p.clone()));
    let worker = PodWorker::new(rig.deps.clone(), p.clone());
    let task = tokio::spawn(worker.run(rx));
    let running = async {
        while rig.runtime.running() != ["a"] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("container running");
    let mut deleting = api_pod(&rig, "p");
    deleting.metadata.deletion_timestamp = Some(Time(crate::api::now()));
    deleting.metadata.deletion_grace_period_seconds = Some(5);
    tx.send_replace(Some(deleting));
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("worker ends")
        .expect("worker task");
    let calls = rig.runtime.calls();
    let tail: Vec<&str> = calls
        .iter()
        .map(String::as_str)
        .filter(|c| c.starts_with("Stop") || c.starts_with("Remove"))
        .collect();
    assert_eq!(
        tail,
        [
            "StopContainer a 5",
            "StopPodSandbox sandbox-1",
            "RemoveContainer a",
            "RemovePodSandbox sandbox-1"
        ]
    );
    assert_eq!(rig.network.calls(), ["ADD sandbox-1", "DEL sandbox-1"]);
    assert_eq!(rig.runtime.sandbox_count(), 0);
    let delete = rig
        .api
        .writes()
        .into_iter()
        .find(|w| matches!(w, Write::Delete { .. }))
        .expect("final delete");
    assert_eq!(
        delete,
        Write::Delete {
            path: "/api/v1/namespaces/default/pods/p".into(),
            params: crate::api::DeleteParams {
                grace_period_seconds: Some(0),
                uid: Some("uid-p".into())
            }
        }
    );
}

#[tokio::test]
async fn a_pod_gone_from_the_api_is_torn_down_and_shutdown_leaves_pods_running() {
    let rig = rig(FakeRuntime::new(&[IMAGE], None));
    let p = pod("p", &[], &["a"], "Always");
    rig.api.insert(Some("default"), &p);
    let (tx, rx) = tokio::sync::watch::channel(Some(p.clone()));
    let task = tokio::spawn(PodWorker::new(rig.deps.clone(), p.clone()).run(rx));
    let wait_running = async {
        while rig.runtime.running().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait_running)
        .await
        .expect("running");
    // Agent shutdown: the sender goes away; the container must keep running.
    drop(tx);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("worker ends")
        .expect("task");
    assert_eq!(rig.runtime.running(), ["a"]);

    // A new worker (agent restarted) adopts the pod without restarting anything.
    let (tx, rx) = tokio::sync::watch::channel(Some(api_pod(&rig, "p")));
    let task = tokio::spawn(PodWorker::new(rig.deps.clone(), api_pod(&rig, "p")).run(rx));
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx.send_replace(None);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("worker ends")
        .expect("task");
    let calls = rig.runtime.calls();
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("RunPodSandbox"))
            .count(),
        1
    );
    assert_eq!(
        calls
            .iter()
            .filter(|c| c.starts_with("StartContainer"))
            .count(),
        1
    );
    assert_eq!(rig.runtime.sandbox_count(), 0, "torn down: {calls:?}");
    assert!(
        !rig.api
            .writes()
            .iter()
            .any(|w| matches!(w, Write::Delete { .. })),
        "a pod already gone is not deleted again"
    );
}

#[tokio::test]
async fn a_failing_network_add_leaves_no_sandbox_behind() {
    let root = tempfile::tempdir().expect("tempdir");
    let api = Arc::new(FakeApi::new());
    let runtime = Arc::new(FakeRuntime::new(&[IMAGE], None));
    let network = Arc::new(FakeNetwork::failing());
    let deps = Arc::new(Deps {
        api: api.clone(),
        runtime: runtime.clone(),
        network,
        ctx: rig(FakeRuntime::default()).deps.ctx.clone(),
        cgroupfs: root.path().to_path_buf(),
        events: Arc::new(RecordingSink::default()),
        mounter: Arc::new(FakeMounter::default()),
    });
    let p = pod("p", &[], &["a"], "Always");
    api.insert(Some("default"), &p);
    let mut w = PodWorker::new(deps, p);
    let err = w.sync().await.expect_err("CNI ADD fails");
    assert!(err.to_string().contains("no IPs left"), "{err}");
    assert_eq!(runtime.sandbox_count(), 0);
    assert!(
        runtime
            .calls()
            .iter()
            .any(|c| c.starts_with("RemovePodSandbox"))
    );
}

// ---- probes driving the worker (real HTTP/TCP on loopback, the fake runtime's pod IP is
// 127.0.0.1) ----

use crate::probes::tests::{HttpStub, closed_port};
use k8s_openapi::api::core::v1::{
    ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, Probe, TCPSocketAction,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn http_probe(port: u16, failure: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            port: IntOrString::Int(i32::from(port)),
            path: Some("/healthz".into()),
            ..Default::default()
        }),
        period_seconds: Some(1),
        failure_threshold: Some(failure),
        ..Default::default()
    }
}

fn with_container(mut p: Pod, f: impl FnOnce(&mut Container)) -> Pod {
    if let Some(c) = p.spec.as_mut().and_then(|s| s.containers.first_mut()) {
        f(c);
    }
    p
}

/// Runs `p` under a pod manager (the real worker loop, woken by probes) until `cond` holds
/// for its API status.
async fn run_until(
    rig: &Rig,
    manager: &super::PodManager<FakeApi, FakeRuntime, FakeNetwork>,
    p: &Pod,
    what: &str,
    cond: impl Fn(&PodStatus, &Rig) -> bool,
) -> PodStatus {
    if rig
        .api
        .object::<Pod>(Some("default"), p.metadata.name.as_deref().unwrap_or(""))
        .is_none()
    {
        rig.api.insert(Some("default"), p);
        manager.dispatch(p.clone());
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let name = p.metadata.name.as_deref().unwrap_or_default();
        if let Some(s) = api_pod(rig, name).status
            && cond(&s, rig)
        {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}; events {:?}; calls {:?}",
            rig.events.reasons(),
            rig.runtime.calls()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn first_status(s: &PodStatus) -> k8s_openapi::api::core::v1::ContainerStatus {
    s.container_statuses
        .iter()
        .flatten()
        .next()
        .cloned()
        .unwrap_or_default()
}

fn condition(s: &PodStatus, kind: &str) -> Option<String> {
    s.conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

#[tokio::test]
async fn a_failing_liveness_probe_kills_and_restarts_the_container_then_backs_off() {
    let stub = HttpStub::start(500).await;
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("127.0.0.1")));
    let manager = super::PodManager::new(rig.deps.clone());
    let p = with_container(pod("live", &[], &["a"], "Always"), |c| {
        c.liveness_probe = Some(http_probe(stub.port, 2));
    });
    let s = run_until(&rig, &manager, &p, "a restart", |s, _| {
        first_status(s).restart_count >= 1
    })
    .await;
    let cs = first_status(&s);
    assert!(
        cs.last_state.and_then(|l| l.terminated).is_some(),
        "the killed attempt is the last state"
    );
    let reasons = rig.events.reasons();
    assert!(
        reasons.iter().any(
            |r| r == "Unhealthy: Liveness probe failed: HTTP probe failed with statuscode: 500"
        ),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r == "Killing: Container a failed liveness probe, will be restarted"),
        "{reasons:?}"
    );
    // Killed with the pod's grace period.
    assert!(rig.runtime.calls().iter().any(|c| c == "StopContainer a 7"));
    let unhealthy = rig
        .events
        .events()
        .into_iter()
        .find(|e| e.reason == "Unhealthy")
        .expect("Unhealthy event");
    assert_eq!(unhealthy.type_, "Warning");
    assert_eq!(
        unhealthy.object.field_path.as_deref(),
        Some("spec.containers{a}")
    );

    // Still failing: the second kill puts the container into CrashLoopBackOff.
    let s = run_until(&rig, &manager, &p, "CrashLoopBackOff", |s, _| {
        first_status(s)
            .state
            .and_then(|st| st.waiting)
            .and_then(|w| w.reason)
            .as_deref()
            == Some("CrashLoopBackOff")
    })
    .await;
    assert_eq!(first_status(&s).restart_count, 1);
    assert!(
        rig.events.reasons().iter().any(|r| r.starts_with(
            "BackOff: Back-off restarting failed container a in pod live_default(uid-live)"
        )),
        "{:?}",
        rig.events.reasons()
    );
}

#[tokio::test]
async fn readiness_drives_ready_and_the_pod_conditions_without_restarts() {
    let stub = HttpStub::start(503).await;
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("127.0.0.1")));
    let manager = super::PodManager::new(rig.deps.clone());
    let mut probe = http_probe(stub.port, 1);
    probe.success_threshold = Some(2);
    let p = with_container(pod("ready", &[], &["a"], "Always"), |c| {
        c.readiness_probe = Some(probe);
    });
    let s = run_until(&rig, &manager, &p, "running, not ready", |s, _| {
        s.phase.as_deref() == Some("Running")
            && stub.hits.load(std::sync::atomic::Ordering::SeqCst) >= 2
    })
    .await;
    assert!(!first_status(&s).ready);
    assert_eq!(first_status(&s).started, Some(true));
    assert_eq!(condition(&s, "Ready").as_deref(), Some("False"));
    assert_eq!(condition(&s, "ContainersReady").as_deref(), Some("False"));

    stub.set(200);
    let s = run_until(&rig, &manager, &p, "ready", |s, _| first_status(s).ready).await;
    assert_eq!(condition(&s, "Ready").as_deref(), Some("True"));
    assert_eq!(condition(&s, "ContainersReady").as_deref(), Some("True"));

    stub.set(500);
    let s = run_until(&rig, &manager, &p, "not ready again", |s, _| {
        !first_status(s).ready
    })
    .await;
    assert_eq!(condition(&s, "Ready").as_deref(), Some("False"));
    assert_eq!(
        first_status(&s).restart_count,
        0,
        "readiness never restarts"
    );
}

#[tokio::test]
async fn a_startup_probe_gates_liveness_and_kills_when_it_never_succeeds() {
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("127.0.0.1")));
    let manager = super::PodManager::new(rig.deps.clone());
    let exec_liveness = Probe {
        exec: Some(ExecAction {
            command: Some(vec!["true".into()]),
        }),
        period_seconds: Some(1),
        ..Default::default()
    };
    let port = closed_port();
    let p = with_container(pod("slow", &[], &["a"], "Always"), |c| {
        c.startup_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(port)),
                host: None,
            }),
            period_seconds: Some(1),
            failure_threshold: Some(2),
            ..Default::default()
        });
        c.liveness_probe = Some(exec_liveness.clone());
    });
    let s = run_until(&rig, &manager, &p, "running, not started", |s, _| {
        s.phase.as_deref() == Some("Running")
    })
    .await;
    assert_eq!(first_status(&s).started, Some(false));
    assert!(!first_status(&s).ready, "not ready before started");
    run_until(&rig, &manager, &p, "the startup kill", |_, rig| {
        rig.events
            .reasons()
            .iter()
            .any(|r| r == "Killing: Container a failed startup probe, will be restarted")
    })
    .await;
    assert!(
        !rig.runtime
            .calls()
            .iter()
            .any(|c| c.starts_with("ExecSync")),
        "liveness never ran before startup succeeded: {:?}",
        rig.runtime.calls()
    );

    // A startup probe that succeeds lets liveness run.
    let stub = HttpStub::start(200).await;
    let p = with_container(pod("fast", &[], &["a"], "Always"), |c| {
        c.startup_probe = Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(stub.port)),
                host: None,
            }),
            period_seconds: Some(1),
            ..Default::default()
        });
        c.liveness_probe = Some(exec_liveness);
    });
    let s = run_until(&rig, &manager, &p, "started and live", |s, rig| {
        first_status(s).started == Some(true)
            && rig
                .runtime
                .calls()
                .iter()
                .any(|c| c.ends_with(" true") && c.starts_with("ExecSync"))
    })
    .await;
    assert!(first_status(&s).ready);
}

#[tokio::test]
async fn post_start_http_hooks_run_and_a_failing_one_kills_the_container() {
    let stub = HttpStub::start(200).await;
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("127.0.0.1")));
    let manager = super::PodManager::new(rig.deps.clone());
    let hook = |port: u16| Lifecycle {
        post_start: Some(LifecycleHandler {
            http_get: Some(HTTPGetAction {
                port: IntOrString::Int(i32::from(port)),
                path: Some("/started".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let p = with_container(pod("hooked", &[], &["a"], "Always"), |c| {
        c.lifecycle = Some(hook(stub.port));
    });
    run_until(&rig, &manager, &p, "running", |s, _| {
        s.phase.as_deref() == Some("Running") && first_status(s).ready
    })
    .await;
    let head = stub.last.lock().expect("lock").clone();
    assert!(head.starts_with("GET /started "), "{head}");
    assert_eq!(
        first_status(&api_pod(&rig, "hooked").status.expect("status")).restart_count,
        0
    );

    let bad = HttpStub::start(500).await;
    let p = with_container(pod("badhook", &[], &["a"], "Always"), |c| {
        c.lifecycle = Some(hook(bad.port));
    });
    run_until(
        &rig,
        &manager,
        &p,
        "restarted after the hook failed",
        |s, _| first_status(s).restart_count >= 1,
    )
    .await;
    let reasons = rig.events.reasons();
    assert!(
        reasons.iter().any(|r| r
            == "FailedPostStartHook: PostStartHook failed: HTTP probe failed with statuscode: 500"),
        "{reasons:?}"
    );
}

#[tokio::test]
async fn deletion_runs_http_pre_stop_hooks_before_stopping_with_the_grace_left() {
    let stub = HttpStub::start(200).await;
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("127.0.0.1")));
    let p = with_container(pod("stopper", &[], &["a"], "Always"), |c| {
        c.lifecycle = Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                http_get: Some(HTTPGetAction {
                    port: IntOrString::Int(i32::from(stub.port)),
                    path: Some("/drain".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    });
    rig.api.insert(Some("default"), &p);
    let (tx, rx) = tokio::sync::watch::channel(Some(p.clone()));
    let task = tokio::spawn(PodWorker::new(rig.deps.clone(), p.clone()).run(rx));
    let running = async {
        while rig.runtime.running() != ["a"] {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("container running");
    assert_eq!(stub.hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    let mut deleting = api_pod(&rig, "stopper");
    deleting.metadata.deletion_timestamp = Some(Time(crate::api::now()));
    deleting.metadata.deletion_grace_period_seconds = Some(6);
    tx.send_replace(Some(deleting));
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("worker ends")
        .expect("worker task");
    assert_eq!(stub.hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    let head = stub.last.lock().expect("lock").clone();
    assert!(head.starts_with("GET /drain "), "{head}");
    // The hook answered at once: the stop gets (nearly) the whole grace period.
    let stop = rig
        .runtime
        .calls()
        .into_iter()
        .find(|c| c.starts_with("StopContainer a"))
        .expect("stopped");
    assert!(
        stop == "StopContainer a 6" || stop == "StopContainer a 5",
        "{stop}"
    );
    assert!(
        rig.events
            .reasons()
            .iter()
            .any(|r| r == "Killing: Stopping container a"),
        "{:?}",
        rig.events.reasons()
    );
}

// ---- the runtime's event stream, and pods that never wait on each other ----

use super::runtime_events::{ContainerEvent, ContainerEvents};
use crate::cri::{CriError, ExecResult, Runtime, SandboxStatus};
use ferrolet_cri::v1;
use futures::StreamExt as _;
use futures::stream::BoxStream;

/// Container events fed by the test; `None` answers as a runtime without the stream.
struct FakeEvents {
    rx: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ContainerEvent>>>,
}

impl ContainerEvents for FakeEvents {
    async fn subscribe(
        &self,
    ) -> Result<BoxStream<'static, Result<ContainerEvent, CriError>>, CriError> {
        let rx = self.rx.lock().expect("lock").take();
        match rx {
            Some(rx) => Ok(tokio_stream_from(rx).map(Ok).boxed()),
            None => Err(CriError::Call {
                call: "GetContainerEvents",
                target: String::new(),
                code: tonic::Code::Unimplemented,
                message: "unknown method GetContainerEvents".into(),
            }),
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::UnboundedReceiver<T>,
) -> BoxStream<'static, T> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) }).boxed()
}

fn restart_count(rig: &Rig, name: &str) -> i32 {
    rig.api
        .object::<Pod>(Some("default"), name)
        .and_then(|p| p.status)
        .map_or(0, |s| first_status(&s).restart_count)
}

#[tokio::test]
async fn runtime_events_wake_the_worker_that_otherwise_waits_for_the_relist() {
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("10.0.0.7")));
    let manager =
        Arc::new(super::PodManager::new(rig.deps.clone()).with_relist(Duration::from_secs(3600)));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let source = Arc::new(FakeEvents {
        rx: std::sync::Mutex::new(Some(rx)),
    });
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(manager.clone().watch_runtime(source, shutdown));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !manager.event_driven() {
        assert!(std::time::Instant::now() < deadline, "stream never came up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let p = pod("evented", &[], &["a"], "Always");
    run_until(&rig, &manager, &p, "running", |s, _| {
        s.phase.as_deref() == Some("Running") && first_status(s).ready
    })
    .await;
    rig.runtime.exit("a", 1);
    // Only an event can wake the worker now (its own look is an hour away).
    tx.send(ContainerEvent {
        container_id: "whatever".into(),
        pod_uid: Some("uid-evented".into()),
    })
    .expect("send");
    run_until(&rig, &manager, &p, "restarted after the event", |s, _| {
        first_status(s).restart_count == 1
    })
    .await;
    assert_eq!(restart_count(&rig, "evented"), 1);
}

#[tokio::test]
async fn without_an_event_stream_workers_keep_polling() {
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("10.0.0.7")));
    let manager =
        Arc::new(super::PodManager::new(rig.deps.clone()).with_relist(Duration::from_secs(3600)));
    let source = Arc::new(FakeEvents {
        rx: std::sync::Mutex::new(None),
    });
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::time::timeout(
        Duration::from_secs(10),
        manager.clone().watch_runtime(source, shutdown),
    )
    .await
    .expect("an unsupported stream ends the watcher at once");
    assert!(!manager.event_driven());
    let p = pod("polled", &[], &["a"], "Always");
    run_until(&rig, &manager, &p, "running", |s, _| {
        s.phase.as_deref() == Some("Running")
    })
    .await;
    rig.runtime.exit("a", 1);
    run_until(&rig, &manager, &p, "restarted by polling", |s, _| {
        first_status(s).restart_count == 1
    })
    .await;
}

/// The fake runtime, except that every call about pod `stuck` never returns.
struct HungForOnePod(FakeRuntime);

fn about_stuck(config: &v1::PodSandboxConfig) -> bool {
    config.metadata.as_ref().is_some_and(|m| m.name == "stuck")
}

impl Runtime for HungForOnePod {
    async fn version(&self) -> Result<v1::VersionResponse, CriError> {
        self.0.version().await
    }
    async fn status(&self) -> Result<Vec<v1::RuntimeCondition>, CriError> {
        self.0.status().await
    }
    async fn run_pod_sandbox(&self, config: v1::PodSandboxConfig) -> Result<String, CriError> {
        if about_stuck(&config) {
            std::future::pending::<()>().await;
        }
        self.0.run_pod_sandbox(config).await
    }
    async fn stop_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        self.0.stop_pod_sandbox(id).await
    }
    async fn remove_pod_sandbox(&self, id: &str) -> Result<(), CriError> {
        self.0.remove_pod_sandbox(id).await
    }
    async fn pod_sandbox_status(&self, id: &str) -> Result<Option<SandboxStatus>, CriError> {
        self.0.pod_sandbox_status(id).await
    }
    async fn list_pod_sandboxes(
        &self,
        labels: HashMap<String, String>,
    ) -> Result<Vec<v1::PodSandbox>, CriError> {
        self.0.list_pod_sandboxes(labels).await
    }
    async fn create_container(
        &self,
        sandbox_id: &str,
        config: v1::ContainerConfig,
        sandbox_config: v1::PodSandboxConfig,
    ) -> Result<String, CriError> {
        self.0
            .create_container(sandbox_id, config, sandbox_config)
            .await
    }
    async fn start_container(&self, id: &str) -> Result<(), CriError> {
        self.0.start_container(id).await
    }
    async fn stop_container(&self, id: &str, timeout_seconds: i64) -> Result<(), CriError> {
        self.0.stop_container(id, timeout_seconds).await
    }
    async fn remove_container(&self, id: &str) -> Result<(), CriError> {
        self.0.remove_container(id).await
    }
    async fn list_containers(
        &self,
        sandbox_id: Option<&str>,
        labels: HashMap<String, String>,
    ) -> Result<Vec<v1::Container>, CriError> {
        self.0.list_containers(sandbox_id, labels).await
    }
    async fn container_status(&self, id: &str) -> Result<Option<v1::ContainerStatus>, CriError> {
        self.0.container_status(id).await
    }
    async fn exec_sync(
        &self,
        id: &str,
        cmd: Vec<String>,
        timeout: Duration,
    ) -> Result<ExecResult, CriError> {
        self.0.exec_sync(id, cmd, timeout).await
    }
    async fn image_status(&self, image: &str) -> Result<Option<v1::Image>, CriError> {
        self.0.image_status(image).await
    }
    async fn pull_image(
        &self,
        image: &str,
        sandbox_config: v1::PodSandboxConfig,
    ) -> Result<String, CriError> {
        self.0.pull_image(image, sandbox_config).await
    }
    async fn list_images(&self) -> Result<Vec<v1::Image>, CriError> {
        self.0.list_images().await
    }
    async fn remove_image(&self, id: &str) -> Result<(), CriError> {
        self.0.remove_image(id).await
    }
    async fn image_fs_info(&self) -> Result<Vec<v1::FilesystemUsage>, CriError> {
        self.0.image_fs_info().await
    }
}

#[tokio::test]
async fn a_hung_runtime_call_for_one_pod_does_not_stall_the_others() {
    let base = rig(FakeRuntime::default());
    let runtime = Arc::new(HungForOnePod(FakeRuntime::new(&[IMAGE], Some("10.0.0.8"))));
    let deps = Arc::new(Deps {
        api: base.api.clone(),
        runtime: runtime.clone(),
        network: base.network.clone(),
        ctx: base.deps.ctx.clone(),
        cgroupfs: base.deps.cgroupfs.clone(),
        events: base.events.clone(),
        mounter: Arc::new(FakeMounter::default()),
    });
    let manager = super::PodManager::new(deps);
    let stuck = pod("stuck", &[], &["a"], "Always");
    base.api.insert(Some("default"), &stuck);
    manager.dispatch(stuck);
    let free = pod("free", &[], &["a"], "Always");
    base.api.insert(Some("default"), &free);
    manager.dispatch(free);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let phase = base
            .api
            .object::<Pod>(Some("default"), "free")
            .and_then(|p| p.status)
            .and_then(|s| s.phase);
        if phase.as_deref() == Some("Running") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "free pod never ran while stuck hung: {:?}",
            runtime.0.calls()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        base.api
            .object::<Pod>(Some("default"), "stuck")
            .and_then(|p| p.status)
            .is_none(),
        "the hung pod reported nothing"
    );
    assert_eq!(manager.worker_count(), 2);
}

#[test]
fn garbage_is_dead_attempts_beyond_the_newest_two_of_each_container() {
    use RunState::{Exited, Running};
    let obs = observed(vec![
        obs_container("a", 0, Exited, 1),
        obs_container("a", 1, Exited, 1),
        obs_container("a", 2, Exited, 1),
        obs_container("a", 3, Running, 0),
        obs_container("b", 0, Exited, 0),
        obs_container("b", 1, Exited, 2),
        obs_container("c", 5, Running, 0),
    ]);
    let mut dead = super::observed::dead_beyond(&obs, 2);
    dead.sort();
    assert_eq!(dead, ["a-0", "a-1"]);
    assert!(super::observed::dead_beyond(&obs, 10).is_empty());
}

#[tokio::test]
async fn a_restarting_container_leaves_at_most_two_attempts_in_the_runtime() {
    let rig = rig(FakeRuntime::new(&[IMAGE], None));
    let p = pod("gc", &[], &["a"], "Always");
    rig.api.insert(Some("default"), &p);
    let mut w = PodWorker::new(rig.deps.clone(), p);
    settle(&mut w).await;
    for round in 1..=3 {
        rig.runtime.exit("a", 1);
        // Backoff lets each restart through once its wait is over; the fake clock is real
        // time, so restart the worker's view instead of waiting: a fresh worker has no
        // backoff yet (as after an agent restart).
        w = PodWorker::new(rig.deps.clone(), api_pod(&rig, "gc"));
        settle(&mut w).await;
        let attempts = rig
            .runtime
            .calls()
            .iter()
            .filter(|c| c.starts_with("CreateContainer a"))
            .count();
        assert_eq!(attempts, round + 1);
    }
    settle(&mut w).await;
    let removed = rig
        .runtime
        .calls()
        .iter()
        .filter(|c| c.as_str() == "RemoveContainer a")
        .count();
    assert_eq!(
        removed,
        2,
        "attempts 0 and 1 removed: {:?}",
        rig.runtime.calls()
    );
    assert_eq!(rig.runtime.running(), ["a"]);
}

// ---- static pods ----

use super::static_pods;

const MANIFEST: &str = "apiVersion: v1
kind: Pod
metadata:
  name: web
  labels: {app: web}
spec:
  containers:
  - name: a
    image: ferrolet.local/busybox:1
";

#[test]
fn manifests_become_node_named_static_pods_and_bad_ones_say_why() {
    let path = std::path::Path::new("/etc/ferrolet/manifests/web.yaml");
    let p = static_pods::from_manifest(path, MANIFEST, "node-a").expect("pod");
    assert_eq!(p.metadata.name.as_deref(), Some("web-node-a"));
    assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
    let uid = p.metadata.uid.clone().expect("uid");
    assert_eq!(uid.len(), 32);
    assert!(static_pods::is_static(&p) && !static_pods::is_mirror(&p));
    assert_eq!(spec_of(&p).node_name.as_deref(), Some("node-a"));
    let again = static_pods::from_manifest(path, MANIFEST, "node-a").expect("pod");
    assert_eq!(
        again.metadata.uid,
        Some(uid.clone()),
        "same manifest, same uid"
    );
    let changed =
        static_pods::from_manifest(path, &MANIFEST.replace("busybox:1", "busybox:2"), "node-a")
            .expect("pod");
    assert_ne!(changed.metadata.uid, Some(uid.clone()));
    let mirror = static_pods::mirror_of(&p);
    assert!(static_pods::is_mirror(&mirror));
    assert_eq!(mirror.metadata.uid, None);

    for (text, want) in [
        (
            "kind: Deployment\nmetadata: {name: x}\n",
            "kind is Some(\"Deployment\")",
        ),
        ("{{{", "not YAML or JSON"),
        (
            "kind: Pod\nspec: {containers: [{name: a}]}\n",
            "metadata.name is missing",
        ),
        (
            "kind: Pod\nmetadata: {name: x}\nspec: {containers: []}\n",
            "spec.containers is empty",
        ),
        ("kind: Pod\nmetadata: {name: 7}\nspec: 3\n", "not a Pod"),
    ] {
        let err = static_pods::from_manifest(path, text, "node-a")
            .expect_err(want)
            .to_string();
        assert!(
            err.contains(want) && err.contains("/etc/ferrolet/manifests/web.yaml"),
            "{err} lacks {want}"
        );
    }
}

#[tokio::test]
async fn static_pods_run_from_the_dir_with_a_mirror_that_carries_their_status() {
    let rig = rig(FakeRuntime::new(&[IMAGE], Some("10.0.0.9")));
    let manager = super::PodManager::new(rig.deps.clone());
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("web.yaml"), MANIFEST).expect("manifest");
    std::fs::write(dir.path().join("broken.yaml"), "kind: Service\n").expect("manifest");
    std::fs::write(dir.path().join("notes.txt"), "not a manifest").expect("file");
    manager.sync_static(dir.path()).await;
    assert_eq!(
        manager.worker_count(),
        1,
        "one pod; the broken manifest is skipped"
    );
    let mirror = rig
        .api
        .object::<Pod>(Some("default"), "web-node-a")
        .expect("mirror pod");
    assert!(static_pods::is_mirror(&mirror));
    let mirror_uid = mirror.metadata.uid.clone().expect("API uid");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let m = api_pod(&rig, "web-node-a");
        if m.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            assert_eq!(
                m.metadata.uid.as_deref(),
                Some(mirror_uid.as_str()),
                "mirror keeps its uid"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mirror never showed Running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The mirror coming back on the API watch starts nothing.
    manager.dispatch(api_pod(&rig, "web-node-a"));
    assert_eq!(manager.worker_count(), 1);
    assert_eq!(rig.runtime.sandbox_count(), 1);

    // Manifest removed: pod torn down, mirror deleted.
    std::fs::remove_file(dir.path().join("web.yaml")).expect("rm");
    manager.sync_static(dir.path()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while rig.runtime.sandbox_count() > 0 || manager.worker_count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "static pod never torn down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        rig.api
            .object::<Pod>(Some("default"), "web-node-a")
            .is_none()
    );

    // Put back: it runs again.
    std::fs::write(dir.path().join("web.yaml"), MANIFEST).expect("manifest");
    manager.sync_static(dir.path()).await;
    assert_eq!(manager.worker_count(), 1);
    assert!(
        rig.api
            .object::<Pod>(Some("default"), "web-node-a")
            .is_some()
    );
}
