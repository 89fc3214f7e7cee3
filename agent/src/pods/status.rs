//! The pod status the agent reports, computed from the pod spec and what the runtime says:
//! phase, conditions, container statuses, IPs. Pure, so every rule is unit-tested.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodSpec, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

use super::observed::{ContainerObs, Observed, RunState};

/// Pod phases as the API spells them.
pub mod phase {
    pub const PENDING: &str = "Pending";
    pub const RUNNING: &str = "Running";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
}

/// Restart policies as the API spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    pub fn of(spec: &PodSpec) -> RestartPolicy {
        match spec.restart_policy.as_deref() {
            Some("Never") => RestartPolicy::Never,
            Some("OnFailure") => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        }
    }

    /// Whether a container that exited with `exit_code` runs again.
    pub fn restarts(self, exit_code: i32, init: bool) -> bool {
        match self {
            RestartPolicy::Never => false,
            RestartPolicy::OnFailure => exit_code != 0,
            // Init containers that succeeded are done, whatever the pod's policy.
            RestartPolicy::Always => !init || exit_code != 0,
        }
    }
}

/// A container waiting for something the agent knows about (backoff, an image pull error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// Facts from outside the pod that its status carries.
#[derive(Debug, Clone)]
pub struct StatusContext<'a> {
    pub host_ips: &'a [String],
    /// CRI runtime name, the scheme of container IDs (`containerd://...`).
    pub runtime_name: &'a str,
    pub now: Timestamp,
    /// Containers held back and why, by name.
    pub waiting: &'a BTreeMap<String, Waiting>,
    /// Readiness by container name; a running container missing here is ready.
    pub readiness: &'a HashMap<String, bool>,
    /// Whether a running container passed its startup probe, by name; missing: it has.
    pub started: &'a HashMap<String, bool>,
}

/// Whether all init containers completed successfully.
pub fn initialized(spec: &PodSpec, obs: &Observed) -> bool {
    spec.init_containers.iter().flatten().all(|c| {
        obs.latest(&c.name)
            .is_some_and(|l| l.state == RunState::Exited && l.exit_code == 0)
    })
}

/// The pod phase, following the kubelet's rules.
pub fn phase(spec: &PodSpec, obs: &Observed) -> &'static str {
    let policy = RestartPolicy::of(spec);
    for c in spec.init_containers.iter().flatten() {
        match obs.latest(&c.name) {
            Some(l) if l.state == RunState::Exited && l.exit_code == 0 => {}
            Some(l) if l.state == RunState::Exited && policy == RestartPolicy::Never => {
                return phase::FAILED;
            }
            _ => return phase::PENDING,
        }
    }
    let (mut running, mut waiting, mut succeeded, mut failed) = (0, 0, 0, 0);
    for c in &spec.containers {
        match obs.latest(&c.name) {
            Some(l) if l.state == RunState::Running => running += 1,
            Some(l) if l.state == RunState::Exited && l.exit_code == 0 => succeeded += 1,
            Some(l) if l.state == RunState::Exited => failed += 1,
            _ => waiting += 1,
        }
    }
    if waiting > 0 {
        return phase::PENDING;
    }
    if running > 0 {
        return phase::RUNNING;
    }
    match policy {
        RestartPolicy::Always => phase::RUNNING,
        RestartPolicy::OnFailure if failed > 0 => phase::RUNNING,
        RestartPolicy::Never if failed > 0 => phase::FAILED,
        _ if succeeded > 0 || spec.containers.is_empty() => phase::SUCCEEDED,
        _ => phase::PENDING,
    }
}

fn time(ns: i64) -> Option<Time> {
    if ns <= 0 {
        return None;
    }
    Timestamp::from_nanosecond(i128::from(ns)).ok().map(Time)
}

fn terminated(obs: &ContainerObs, runtime_name: &str) -> ContainerState {
    let reason = if obs.reason.is_empty() {
        if obs.exit_code == 0 {
            "Completed"
        } else {
            "Error"
        }
        .to_owned()
    } else {
        obs.reason.clone()
    };
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: obs.exit_code,
            reason: Some(reason),
            message: Some(obs.message.clone()).filter(|m| !m.is_empty()),
            started_at: time(obs.started_at),
            finished_at: time(obs.finished_at),
            container_id: Some(format!("{runtime_name}://{}", obs.id)),
            signal: None,
        }),
        ..Default::default()
    }
}

fn waiting_state(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_owned()),
            message: Some(message.to_owned()).filter(|m| !m.is_empty()),
        }),
        ..Default::default()
    }
}

fn container_status(
    c: &Container,
    init: bool,
    pod_initialized: bool,
    policy: RestartPolicy,
    obs: &Observed,
    ctx: &StatusContext<'_>,
) -> ContainerStatus {
    let latest = obs.latest(&c.name);
    let previous = obs.previous(&c.name);
    let held = ctx.waiting.get(&c.name);
    let mut last_state = previous.map(|p| terminated(p, ctx.runtime_name));
    let mut ready = false;
    let state = match latest {
        None => match held {
            Some(w) => waiting_state(&w.reason, &w.message),
            None if !init && !pod_initialized => waiting_state("PodInitializing", ""),
            None => waiting_state("ContainerCreating", ""),
        },
        Some(l) => match l.state {
            RunState::Running => {
                ready = ctx.readiness.get(&c.name).copied().unwrap_or(true);
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: time(l.started_at),
                    }),
                    ..Default::default()
                }
            }
            RunState::Exited => match held {
                Some(w) if policy.restarts(l.exit_code, init) => {
                    last_state = Some(terminated(l, ctx.runtime_name));
                    waiting_state(&w.reason, &w.message)
                }
                _ => terminated(l, ctx.runtime_name),
            },
            RunState::Created => waiting_state("ContainerCreating", ""),
            RunState::Unknown => waiting_state("ContainerStatusUnknown", ""),
        },
    };
    let running = state.running.is_some();
    let started = running && ctx.started.get(&c.name).copied().unwrap_or(true);
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: latest.map(|l| l.image_ref.clone()).unwrap_or_default(),
        container_id: latest.map(|l| format!("{}://{}", ctx.runtime_name, l.id)),
        restart_count: latest.map_or(0, |l| i32::try_from(l.attempt).unwrap_or(i32::MAX)),
        ready,
        started: Some(started),
        state: Some(state),
        last_state: Some(last_state.unwrap_or_default()),
        ..Default::default()
    }
}

fn condition(
    old: Option<&PodStatus>,
    kind: &str,
    ok: bool,
    reason: Option<&str>,
    now: &Timestamp,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let previous = old
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == kind));
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Some(Time(*now)),
    };
    PodCondition {
        type_: kind.to_owned(),
        status: status.to_owned(),
        reason: if ok { None } else { reason.map(str::to_owned) },
        last_transition_time,
        ..Default::default()
    }
}

/// The full status to report for `pod`.
pub fn pod_status(pod: &Pod, obs: &Observed, ctx: &StatusContext<'_>) -> PodStatus {
    let empty = PodSpec::default();
    let spec = pod.spec.as_ref().unwrap_or(&empty);
    let old = pod.status.as_ref();
    let policy = RestartPolicy::of(spec);
    let pod_initialized = initialized(spec, obs);
    let phase = phase(spec, obs);
    let init_statuses: Vec<ContainerStatus> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| container_status(c, true, pod_initialized, policy, obs, ctx))
        .collect();
    let statuses: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| container_status(c, false, pod_initialized, policy, obs, ctx))
        .collect();
    let terminal = phase == phase::SUCCEEDED || phase == phase::FAILED;
    let all_ready = !terminal && statuses.iter().all(|s| s.ready);
    let not_ready_reason = if terminal {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let conditions = vec![
        condition(old, "PodScheduled", true, None, &ctx.now),
        condition(
            old,
            "Initialized",
            pod_initialized,
            Some("ContainersNotInitialized"),
            &ctx.now,
        ),
        condition(
            old,
            "ContainersReady",
            all_ready,
            Some(not_ready_reason),
            &ctx.now,
        ),
        condition(old, "Ready", all_ready, Some(not_ready_reason), &ctx.now),
    ];
    let pod_ips = obs
        .sandbox
        .as_ref()
        .filter(|_| !terminal)
        .map(|s| s.ips.clone())
        .unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    let pod_ips = if host_network {
        ctx.host_ips.to_vec()
    } else {
        pod_ips
    };
    PodStatus {
        phase: Some(phase.to_owned()),
        conditions: Some(conditions),
        init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
        container_statuses: Some(statuses),
        pod_ip: pod_ips.first().cloned(),
        pod_ips: (!pod_ips.is_empty())
            .then(|| pod_ips.iter().map(|ip| PodIP { ip: ip.clone() }).collect()),
        host_ip: ctx.host_ips.first().cloned(),
        host_ips: (!ctx.host_ips.is_empty()).then(|| {
            ctx.host_ips
                .iter()
                .map(|ip| HostIP { ip: ip.clone() })
                .collect()
        }),
        start_time: old
            .and_then(|s| s.start_time.clone())
            .or(Some(Time(ctx.now))),
        qos_class: old.and_then(|s| s.qos_class.clone()),
        ..Default::default()
    }
}

/// Whether two statuses differ in anything but condition probe/heartbeat times, so the agent
/// patches only on change.
pub fn differs(old: Option<&PodStatus>, new: &PodStatus) -> bool {
    match old {
        None => true,
        Some(old) => old != new,
    }
}
