//! Container lifecycle hooks and graceful kills: postStart right after a start, preStop
//! before a stop, the hook's time taken out of the grace period the stop gets.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, LifecycleHandler, Pod};
use tracing::{info, warn};

use crate::api::events::Recorder;
use crate::cri::{CriError, Runtime};
use crate::probes::{Action, Outcome, Prober, Target};

/// The least time a stop gets after a preStop hook, as upstream (2s).
const MIN_GRACE_AFTER_HOOK: i64 = 2;

/// Runs `hook` of `container` once, within `limit`; `Err` carries the failure message.
pub async fn run_hook<R: Runtime>(
    runtime: &R,
    container: &Container,
    hook: &LifecycleHandler,
    target: &Target,
    limit: Duration,
) -> Result<(), String> {
    let action = Action::of_hook(hook, container, target).map_err(|e| e.to_string())?;
    let prober = Prober::shared().map_err(|e| e.to_string())?;
    match prober.run(runtime, &action, target, limit).await {
        Outcome::Success => Ok(()),
        Outcome::Failure(m) => Err(m),
    }
}

/// Where hooks of a pod's containers send network requests when they name no host: the
/// pod's IP, or the host's for hostNetwork pods.
pub fn default_host(pod: &Pod, pod_ips: &[String], host_ips: &[String]) -> Option<String> {
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    let ips = if host_network { host_ips } else { pod_ips };
    ips.first()
        .cloned()
        .or_else(|| pod.status.as_ref().and_then(|s| s.pod_ip.clone()))
}

/// The spec of the container `name` of `pod` (app or init container).
pub fn container_spec<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

/// Stops a running container gracefully: its preStop hook first (if it has one), then
/// `StopContainer` with what is left of `grace` seconds.
pub async fn kill_container<R: Runtime>(
    runtime: &R,
    container: Option<&Container>,
    target: &Target,
    grace: i64,
    events: Option<&Recorder>,
) -> Result<(), CriError> {
    let started = Instant::now();
    let name = container.map(|c| c.name.as_str()).unwrap_or_default();
    let pre_stop = container
        .and_then(|c| c.lifecycle.as_ref())
        .and_then(|l| l.pre_stop.as_ref());
    let mut left = grace.max(0);
    if let (Some(c), Some(hook)) = (container, pre_stop) {
        let limit = Duration::from_secs(u64::try_from(grace).unwrap_or(0).max(1));
        match run_hook(runtime, c, hook, target, limit).await {
            Ok(()) => info!(container = %name, "preStop hook ran"),
            Err(message) => {
                warn!(container = %name, %message, "preStop hook failed");
                if let Some(ev) = events {
                    ev.warning(
                        "FailedPreStopHook",
                        &format!("PreStopHook failed: {message}"),
                        Some(name),
                    );
                }
            }
        }
        let spent = i64::try_from(started.elapsed().as_secs()).unwrap_or(grace);
        left = (grace - spent).max(grace.min(MIN_GRACE_AFTER_HOOK));
    }
    let r = runtime.stop_container(&target.container_id, left).await;
    info!(container = %name, grace = left, "container stopped");
    r
}
