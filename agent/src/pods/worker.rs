//! One pod's worker: observes the pod's sandbox and containers in the runtime, carries out
//! the [`plan`](super::plan) (sandbox, network, images, volumes, env, containers), reports
//! status on change, and on deletion stops everything gracefully, detaches the network,
//! removes the sandbox and finally deletes the pod object.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use ferrolet_cri::v1;
use k8s_openapi::api::core::v1::{Container, Pod, PodStatus};
use tokio::sync::{Notify, watch};
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::api::events::{EventSink, Recorder};
use crate::api::{Api, DeleteParams, Patch};
use crate::cni::{Attachment, Network};
use crate::cri::Runtime;
use crate::probes::{Kind, ProbeManager, Prober, Target};
use crate::volumes;

use super::PodError;
use super::backoff::Backoff;
use super::cgroups::remove_pod_cgroup;
use super::lifecycle::{container_spec, default_host, kill_container, run_hook};
use super::observed::{ContainerObs, Observed, RunState, SandboxObs};
use super::plan::{Start, plan};
use super::spec::{HostVolume, PodContext, PodKey, container_config, sandbox_config, uid_selector};
use super::status::{self, StatusContext, Waiting, pod_status};

/// How often a worker looks at its pod when nothing else wakes it: the time it takes to
/// notice a container exit.
pub const POLL: Duration = Duration::from_secs(2);
/// How often a finished pod is looked at.
const IDLE_POLL: Duration = Duration::from_secs(30);
/// Attempts of one container kept in the runtime (newest first); older dead ones go.
const KEEP_ATTEMPTS: usize = 2;
/// How long a postStart hook may run.
const POST_START_LIMIT: Duration = Duration::from_secs(30);

/// What every worker shares.
pub struct Deps<A, R, N> {
    pub api: Arc<A>,
    pub runtime: Arc<R>,
    pub network: Arc<N>,
    pub ctx: PodContext,
    /// The cgroupfs mount, `/sys/fs/cgroup` on a host.
    pub cgroupfs: PathBuf,
    /// Where events about pods go.
    pub events: Arc<dyn EventSink>,
    /// Mounts the agent makes for volumes (tmpfs).
    pub mounter: Arc<dyn volumes::Mounter>,
}

/// The worker of one pod.
pub struct PodWorker<A, R, N> {
    deps: Arc<Deps<A, R, N>>,
    pod: Pod,
    key: PodKey,
    backoff: Backoff,
    pull_backoff: Backoff,
    pull_failed_at: HashMap<String, SystemTime>,
    /// Containers held back by this worker (image or create errors), by name.
    held: BTreeMap<String, Waiting>,
    last_status: Option<PodStatus>,
    readiness: HashMap<String, bool>,
    started: HashMap<String, bool>,
    probes: Option<ProbeManager<R>>,
    /// Woken by probes when a verdict changes.
    wake: Arc<Notify>,
    events: Recorder,
    /// Backoffs already reported as events, by container name and attempt, so a wait is
    /// reported once, not on every sync.
    reported_backoffs: HashSet<(String, u32)>,
    /// The last volume failure reported as a FailedMount event, so it is reported once.
    reported_volume_error: Option<String>,
    /// True while the runtime's event stream wakes this worker: it then looks on its own
    /// only every `relist`.
    event_driven: Arc<AtomicBool>,
    relist: Duration,
}

fn obs_from(status: &v1::ContainerStatus) -> ContainerObs {
    let state = match v1::ContainerState::try_from(status.state) {
        Ok(v1::ContainerState::ContainerCreated) => RunState::Created,
        Ok(v1::ContainerState::ContainerRunning) => RunState::Running,
        Ok(v1::ContainerState::ContainerExited) => RunState::Exited,
        _ => RunState::Unknown,
    };
    let meta = status.metadata.clone().unwrap_or_default();
    ContainerObs {
        id: status.id.clone(),
        name: meta.name,
        attempt: meta.attempt,
        state,
        exit_code: status.exit_code,
        reason: status.reason.clone(),
        message: status.message.clone(),
        created_at: status.created_at,
        started_at: status.started_at,
        finished_at: status.finished_at,
        image_ref: status.image_ref.clone(),
    }
}

fn default_pull_policy(image: &str) -> &'static str {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        "IfNotPresent"
    } else {
        match last.split_once(':') {
            None => "Always",
            Some((_, "latest")) => "Always",
            Some(_) => "IfNotPresent",
        }
    }
}

fn grace_seconds(pod: &Pod) -> i64 {
    pod.metadata
        .deletion_grace_period_seconds
        .or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
        })
        .unwrap_or(30)
        .max(0)
}

/// The pod's own termination grace period (not a deletion's), for kills by probes.
fn spec_grace_seconds(pod: &Pod) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30)
        .max(0)
}

impl<A: Api, R: Runtime, N: Network> PodWorker<A, R, N> {
    pub fn new(deps: Arc<Deps<A, R, N>>, pod: Pod) -> PodWorker<A, R, N> {
        let key = PodKey::of(&pod);
        let last_status = pod.status.clone();
        let wake = Arc::new(Notify::new());
        let events = Recorder::for_pod(deps.events.clone(), &pod);
        let probes = match Prober::shared() {
            Ok(prober) => Some(ProbeManager::new(
                deps.runtime.clone(),
                prober,
                wake.clone(),
                events.clone(),
            )),
            Err(e) => {
                warn!(error = %e, "probes cannot run");
                None
            }
        };
        PodWorker {
            deps,
            pod,
            key,
            backoff: Backoff::default(),
            pull_backoff: Backoff::default(),
            pull_failed_at: HashMap::new(),
            held: BTreeMap::new(),
            last_status,
            readiness: HashMap::new(),
            started: HashMap::new(),
            probes,
            wake,
            events,
            reported_backoffs: HashSet::new(),
            reported_volume_error: None,
            event_driven: Arc::default(),
            relist: POLL,
        }
    }

    /// What wakes this worker for a sync now (runtime events, probes).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// While `flag` is true the worker polls only every `relist` (events wake it).
    pub fn set_event_driven(&mut self, flag: Arc<AtomicBool>, relist: Duration) {
        self.event_driven = flag;
        self.relist = relist;
    }

    /// How long to wait for a look on our own.
    fn poll(&self) -> Duration {
        if self.event_driven.load(Ordering::Relaxed) {
            self.relist
        } else {
            POLL
        }
    }

    pub fn key(&self) -> &PodKey {
        &self.key
    }

    /// Takes in a newer version of the pod from the API.
    pub fn update(&mut self, pod: Pod) {
        self.pod = pod;
    }

    /// What the runtime says about this pod now.
    pub async fn observe(&self) -> Result<Observed, PodError> {
        let runtime = &self.deps.runtime;
        let sandboxes = runtime
            .list_pod_sandboxes(uid_selector(&self.key.uid))
            .await?;
        let Some(newest) = sandboxes
            .iter()
            .max_by_key(|s| (s.metadata.as_ref().map_or(0, |m| m.attempt), s.created_at))
        else {
            return Ok(Observed::default());
        };
        let mut ips = Vec::new();
        if let Some(st) = runtime.pod_sandbox_status(&newest.id).await?
            && let Some(net) = &st.status.network
            && !net.ip.is_empty()
        {
            ips.push(net.ip.clone());
            ips.extend(net.additional_ips.iter().map(|i| i.ip.clone()));
        }
        if ips.is_empty() {
            ips = self.deps.network.ips(&newest.id);
        }
        let sandbox = SandboxObs {
            id: newest.id.clone(),
            ready: newest.state == v1::PodSandboxState::SandboxReady as i32,
            attempt: newest.metadata.as_ref().map_or(0, |m| m.attempt),
            ips,
        };
        let mut containers = Vec::new();
        for c in runtime
            .list_containers(Some(&newest.id), uid_selector(&self.key.uid))
            .await?
        {
            if let Some(status) = runtime.container_status(&c.id).await? {
                containers.push(obs_from(&status));
            }
        }
        Ok(Observed {
            sandbox: Some(sandbox),
            containers,
        })
    }

    fn host_network(&self) -> bool {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false)
    }

    /// Runs a new sandbox and attaches its network when the runtime did not.
    async fn create_sandbox(&self, attempt: u32) -> Result<String, PodError> {
        let ctx = &self.deps.ctx;
        let config = sandbox_config(&self.pod, attempt, ctx);
        let log_dir = ctx.log_dir(&self.key);
        let _ = std::fs::create_dir_all(&log_dir);
        let id = self.deps.runtime.run_pod_sandbox(config.clone()).await?;
        info!(sandbox = %id, attempt, "sandbox created");
        if self.host_network() {
            return Ok(id);
        }
        let status = self.deps.runtime.pod_sandbox_status(&id).await?;
        let has_ip = status
            .as_ref()
            .and_then(|s| s.status.network.as_ref())
            .is_some_and(|n| !n.ip.is_empty());
        if has_ip {
            return Ok(id);
        }
        let netns = status
            .as_ref()
            .and_then(|s| netns_path(&s.info))
            .ok_or_else(|| {
                PodError::Config(format!(
                    "sandbox {id}: the runtime reports neither a pod IP nor a network namespace path"
                ))
            })?;
        let attachment = Attachment {
            sandbox_id: id.clone(),
            netns,
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            uid: self.key.uid.clone(),
            port_mappings: config
                .port_mappings
                .iter()
                .map(|p| {
                    let proto = match v1::Protocol::try_from(p.protocol) {
                        Ok(v1::Protocol::Udp) => "UDP",
                        Ok(v1::Protocol::Sctp) => "SCTP",
                        _ => "TCP",
                    };
                    (
                        p.host_port,
                        p.container_port,
                        proto.to_owned(),
                        p.host_ip.clone(),
                    )
                })
                .collect(),
        };
        match self.deps.network.add(&attachment).await {
            Ok(ips) => {
                info!(sandbox = %id, ?ips, "network attached");
                Ok(id)
            }
            Err(e) => {
                // Leave nothing behind: the next sync makes a fresh sandbox.
                let _ = self.deps.runtime.stop_pod_sandbox(&id).await;
                let _ = self.deps.runtime.remove_pod_sandbox(&id).await;
                Err(e.into())
            }
        }
    }

    async fn ensure_image(&mut self, container: &Container) -> Result<(), PodError> {
        let image = container.image.clone().unwrap_or_default();
        if image.is_empty() {
            return Err(PodError::Config(format!(
                "container {} has no image",
                container.name
            )));
        }
        let policy = container
            .image_pull_policy
            .clone()
            .unwrap_or_else(|| default_pull_policy(&image).to_owned());
        let present = self.deps.runtime.image_status(&image).await?.is_some();
        let name = container.name.as_str();
        let pull = match policy.as_str() {
            "Never" if !present => {
                self.events.warning(
                    "ErrImageNeverPull",
                    &format!("Container image {image:?} is not present with pull policy of Never"),
                    Some(name),
                );
                return Err(PodError::Image {
                    image,
                    message: "ErrImageNeverPull: not present and the pull policy is Never".into(),
                });
            }
            "Never" => false,
            "Always" => true,
            _ => !present,
        };
        if !pull {
            self.events.normal(
                "Pulled",
                &format!("Container image {image:?} already present on machine"),
                Some(name),
            );
            return Ok(());
        }
        let now = SystemTime::now();
        if let Some(failed) = self.pull_failed_at.get(&container.name)
            && let Some(wait) = self.pull_backoff.remaining(&container.name, *failed, now)
        {
            let secs = failed
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if self.reported_backoffs.insert((
                format!("image {name}"),
                u32::try_from(secs % (1 << 31)).unwrap_or(0),
            )) {
                self.events.normal(
                    "BackOff",
                    &format!("Back-off pulling image {image:?}"),
                    Some(name),
                );
            }
            return Err(PodError::Image {
                image,
                message: format!("ImagePullBackOff: back-off {}s pulling", wait.as_secs()),
            });
        }
        let sandbox = sandbox_config(&self.pod, 0, &self.deps.ctx);
        self.events
            .normal("Pulling", &format!("Pulling image {image:?}"), Some(name));
        let began = std::time::Instant::now();
        match self.deps.runtime.pull_image(&image, sandbox).await {
            Ok(image_ref) => {
                info!(container = %container.name, %image, %image_ref, "pulled image");
                self.events.normal(
                    "Pulled",
                    &format!(
                        "Successfully pulled image {image:?} in {:.3}s",
                        began.elapsed().as_secs_f64()
                    ),
                    Some(name),
                );
                self.pull_failed_at.remove(&container.name);
                self.pull_backoff.forget(&container.name);
                Ok(())
            }
            Err(e) => {
                self.events.warning(
                    "Failed",
                    &format!("Failed to pull image {image:?}: {e}"),
                    Some(name),
                );
                self.events
                    .warning("Failed", "Error: ErrImagePull", Some(name));
                self.pull_failed_at.insert(container.name.clone(), now);
                self.pull_backoff.restarted(&container.name, now);
                Err(PodError::Image {
                    image,
                    message: format!("ErrImagePull: {e}"),
                })
            }
        }
    }

    async fn start_container(
        &mut self,
        start: &Start,
        sandbox_id: &str,
        sandbox_ips: &[String],
        volumes: &HashMap<String, HostVolume>,
    ) -> Result<(), PodError> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let list = if start.init {
            spec.init_containers.unwrap_or_default()
        } else {
            spec.containers
        };
        let container = list
            .into_iter()
            .find(|c| c.name == start.name)
            .ok_or_else(|| PodError::Config(format!("container {} not in spec", start.name)))?;
        self.ensure_image(&container).await?;
        let env = super::env::resolve(
            self.deps.api.as_ref(),
            &self.pod,
            &container,
            &self.deps.ctx.allocatable,
        )
        .await?;
        let sub_paths = resolve_sub_paths(&container, volumes, &env)?;
        let config = container_config(
            &self.pod,
            &container,
            start.init,
            start.attempt,
            env,
            volumes,
            &sub_paths,
        );
        let sandbox = sandbox_config(&self.pod, 0, &self.deps.ctx);
        let runtime = self.deps.runtime.clone();
        let name = start.name.as_str();
        let id = match runtime.create_container(sandbox_id, config, sandbox).await {
            Ok(id) => id,
            Err(e) => {
                self.events
                    .warning("Failed", &format!("Error: {e}"), Some(name));
                return Err(e.into());
            }
        };
        self.events
            .normal("Created", &format!("Created container: {name}"), Some(name));
        if let Err(e) = runtime.start_container(&id).await {
            self.events
                .warning("Failed", &format!("Error: {e}"), Some(name));
            let _ = runtime.remove_container(&id).await;
            return Err(e.into());
        }
        self.events
            .normal("Started", &format!("Started container {name}"), Some(name));
        info!(container = %start.name, id = %id, attempt = start.attempt, "container started");
        if let Some(hook) = container
            .lifecycle
            .as_ref()
            .and_then(|l| l.post_start.as_ref())
        {
            let target = Target {
                container_id: id.clone(),
                default_host: self.default_host(sandbox_ips),
            };
            if let Err(message) = run_hook(
                runtime.as_ref(),
                &container,
                hook,
                &target,
                POST_START_LIMIT,
            )
            .await
            {
                // As upstream: the container is killed (without its preStop hook) and
                // restarted per the restart policy.
                warn!(container = %name, %message, "postStart hook failed; killing the container");
                self.events.warning(
                    "FailedPostStartHook",
                    &format!("PostStartHook failed: {message}"),
                    Some(name),
                );
                self.events
                    .normal("Killing", "FailedPostStartHook", Some(name));
                let _ = runtime
                    .stop_container(&id, spec_grace_seconds(&self.pod))
                    .await;
            }
        }
        Ok(())
    }

    fn default_host(&self, sandbox_ips: &[String]) -> Option<String> {
        default_host(&self.pod, sandbox_ips, &self.deps.ctx.host_ips)
    }

    /// The API's phase says the pod is done (it finished before, perhaps before a restart).
    fn api_finished(&self) -> bool {
        matches!(
            self.pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some(status::phase::SUCCEEDED | status::phase::FAILED)
        )
    }

    /// One pass toward the spec; returns when to look again.
    pub async fn sync(&mut self) -> Result<Duration, PodError> {
        let spec = self.pod.spec.clone().unwrap_or_default();
        self.kill_unhealthy().await;
        let obs = self.observe().await?;
        let now = SystemTime::now();
        let mut plan = plan(&spec, &obs, &self.backoff, now);
        if self.api_finished() {
            plan = super::plan::Plan {
                finished: true,
                ..Default::default()
            };
        }
        if let Some(attempt) = plan.create_sandbox {
            if let Some(old) = &obs.sandbox {
                info!(sandbox = %old.id, "sandbox is not ready; replacing it");
                self.remove_sandbox(&old.id, 0).await?;
            }
            self.create_sandbox(attempt).await?;
            return Ok(Duration::ZERO);
        }
        let mut acted = false;
        let has_api_volumes = spec.volumes.iter().flatten().any(|v| {
            v.config_map.is_some()
                || v.secret.is_some()
                || v.projected.is_some()
                || v.downward_api.is_some()
        });
        if !plan.start.is_empty() || (has_api_volumes && !plan.finished) {
            let pod_dir = self.deps.ctx.pod_dir(&self.key.uid);
            match volumes::prepare(
                self.deps.api.as_ref(),
                self.deps.mounter.as_ref(),
                &self.pod,
                &pod_dir,
                &self.deps.ctx.allocatable,
            )
            .await
            {
                Ok(vols) => {
                    self.reported_volume_error = None;
                    let (sandbox_id, sandbox_ips) = obs
                        .sandbox
                        .as_ref()
                        .map(|s| (s.id.clone(), s.ips.clone()))
                        .unwrap_or_default();
                    for start in &plan.start {
                        match self
                            .start_container(start, &sandbox_id, &sandbox_ips, &vols)
                            .await
                        {
                            Ok(()) => {
                                self.held.remove(&start.name);
                                if start.restart {
                                    self.backoff.restarted(&start.name, now);
                                }
                                acted = true;
                            }
                            Err(e) => {
                                warn!(container = %start.name, error = %e, "container not started");
                                self.held.insert(start.name.clone(), waiting_for(&e));
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "volumes not ready");
                    let message = format!("MountVolume.SetUp failed: {e}");
                    if self.reported_volume_error.as_deref() != Some(message.as_str()) {
                        self.events.warning("FailedMount", &message, None);
                        self.reported_volume_error = Some(message);
                    }
                    for start in &plan.start {
                        self.held.insert(
                            start.name.clone(),
                            Waiting {
                                reason: "ContainerCreating".into(),
                                message: e.to_string(),
                            },
                        );
                    }
                }
            }
        }
        let obs = if acted { self.observe().await? } else { obs };
        self.report_backoffs(&plan.waiting, &obs);
        let ips = obs
            .sandbox
            .as_ref()
            .map(|s| s.ips.clone())
            .unwrap_or_default();
        let host = self.default_host(&ips);
        if let Some(probes) = self.probes.as_mut() {
            probes.sync(&self.pod, &obs, host.as_deref());
            self.readiness = probes.readiness();
            self.started = probes.started();
        }
        let mut waiting = self.held.clone();
        waiting.extend(plan.waiting.clone());
        self.report(&obs, &waiting).await?;
        self.collect_garbage(&obs).await;
        if plan.finished {
            if let Some(sb) = obs.sandbox.as_ref().filter(|s| s.ready) {
                info!(sandbox = %sb.id, "pod finished; stopping its sandbox");
                self.stop_sandbox(&sb.id, grace_seconds(&self.pod)).await?;
            }
            return Ok(IDLE_POLL);
        }
        if acted {
            return Ok(Duration::ZERO);
        }
        let poll = self.poll();
        Ok(plan.requeue_after.map_or(poll, |r| r.min(poll)))
    }

    /// Kills the containers whose liveness or startup probe failed; the plan then
    /// restarts them per the restart policy, with backoff.
    async fn kill_unhealthy(&mut self) {
        let Some(probes) = self.probes.as_mut() else {
            return;
        };
        let kills = probes.take_kills();
        let restarts = status::RestartPolicy::of(&self.pod.spec.clone().unwrap_or_default())
            != status::RestartPolicy::Never;
        for kill in kills {
            let kind = match kill.kind {
                Kind::Startup => "startup",
                Kind::Liveness => "liveness",
                Kind::Readiness => "readiness",
            };
            let then = if restarts { ", will be restarted" } else { "" };
            self.events.normal(
                "Killing",
                &format!("Container {} failed {kind} probe{then}", kill.name),
                Some(&kill.name),
            );
            let grace = kill
                .grace_seconds
                .unwrap_or_else(|| spec_grace_seconds(&self.pod));
            let target = Target {
                container_id: kill.container_id.clone(),
                default_host: self.default_host(&[]),
            };
            let container = container_spec(&self.pod, &kill.name);
            if let Err(e) = kill_container(
                self.deps.runtime.as_ref(),
                container,
                &target,
                grace,
                Some(&self.events),
            )
            .await
                && !e.is_not_found()
            {
                warn!(container = %kill.name, error = %e, "killing an unhealthy container failed");
            }
        }
    }

    /// Removes dead container attempts beyond the newest two of each name (the status
    /// needs the last one; logs of the one before stay readable with `--previous`).
    async fn collect_garbage(&self, obs: &Observed) {
        for id in super::observed::dead_beyond(obs, KEEP_ATTEMPTS) {
            match self.deps.runtime.remove_container(&id).await {
                Ok(()) => debug!(container = %id, "removed a dead container"),
                Err(e) if e.is_not_found() => {}
                Err(e) => warn!(container = %id, error = %e, "removing a dead container failed"),
            }
        }
    }

    /// Reports each container's entry into CrashLoopBackOff once per attempt.
    fn report_backoffs(&mut self, waiting: &BTreeMap<String, Waiting>, obs: &Observed) {
        for (name, w) in waiting {
            if w.reason != "CrashLoopBackOff" {
                continue;
            }
            let attempt = obs.latest(name).map_or(0, |l| l.attempt);
            if self.reported_backoffs.insert((name.clone(), attempt)) {
                self.events.warning(
                    "BackOff",
                    &format!(
                        "Back-off restarting failed container {name} in pod {}_{}({})",
                        self.key.name, self.key.namespace, self.key.uid
                    ),
                    Some(name),
                );
            }
        }
    }

    /// Computes the status and patches it if it changed.
    async fn report(
        &mut self,
        obs: &Observed,
        waiting: &BTreeMap<String, Waiting>,
    ) -> Result<(), PodError> {
        let ctx = &self.deps.ctx;
        let mut pod = self.pod.clone();
        pod.status.clone_from(&self.last_status);
        let status = pod_status(
            &pod,
            obs,
            &StatusContext {
                host_ips: &ctx.host_ips,
                runtime_name: &ctx.runtime_name,
                now: crate::api::now(),
                waiting,
                readiness: &self.readiness,
                started: &self.started,
            },
        );
        if !status::differs(self.last_status.as_ref(), &status) {
            return Ok(());
        }
        // A static pod's status goes to its mirror, whose uid the API chose.
        let body = if super::static_pods::is_static(&self.pod) {
            serde_json::json!({ "status": status })
        } else {
            serde_json::json!({
                "metadata": {"uid": self.key.uid},
                "status": status,
            })
        };
        let _: Pod = self
            .deps
            .api
            .patch(
                Some(&self.key.namespace),
                &self.key.name,
                Some("status"),
                &Patch::Merge(body),
            )
            .await?;
        debug!(phase = ?status.phase, "status patched");
        self.last_status = Some(status);
        Ok(())
    }

    async fn stop_sandbox(&self, sandbox_id: &str, grace: i64) -> Result<(), PodError> {
        stop_sandbox(&self.deps, &self.pod, sandbox_id, grace).await
    }

    async fn remove_sandbox(&self, sandbox_id: &str, grace: i64) -> Result<(), PodError> {
        self.stop_sandbox(sandbox_id, grace).await?;
        remove_sandbox(&self.deps, sandbox_id).await
    }

    /// Drives the pod until it is gone. `updates` carries the newest pod, `None` once it
    /// was deleted from the API; when the sender is dropped (agent shutdown) the worker
    /// stops without touching the pod, so containers outlive the agent.
    pub fn run(
        mut self,
        mut updates: watch::Receiver<Option<Pod>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let span = info_span!("pod", pod = %self.key, uid = %self.key.uid);
        // The steps run boxed: a task keeps the size of its largest state for its whole
        // life, and a pod spends its life waiting between syncs. Unboxed, every idle pod
        // held a sync's worth (tens of KiB) of runtime and API call state.
        async move {
            loop {
                let current = updates.borrow_and_update().clone();
                match current {
                    Some(pod) => self.update(pod),
                    None => {
                        info!("pod deleted from the API; tearing down");
                        let grace = grace_seconds(&self.pod);
                        Box::pin(self.teardown_until_done(grace, &mut updates)).await;
                        return;
                    }
                }
                if self.pod.metadata.deletion_timestamp.is_some() {
                    let grace = grace_seconds(&self.pod);
                    info!(grace, "pod is being deleted; stopping it");
                    if !Box::pin(self.teardown_until_done(grace, &mut updates)).await {
                        return;
                    }
                    let params = DeleteParams {
                        grace_period_seconds: Some(0),
                        uid: Some(self.key.uid.clone()),
                    };
                    match Box::pin(self.deps.api.delete::<Pod>(
                        Some(&self.key.namespace),
                        &self.key.name,
                        &params,
                    ))
                    .await
                    {
                        Ok(()) => info!("pod deleted"),
                        Err(e) if e.is_not_found() || e.is_conflict() => {}
                        Err(e) => warn!(error = %e, "final delete failed"),
                    }
                    return;
                }
                let wait = match Box::pin(self.sync()).await {
                    Ok(d) => d,
                    Err(e) => {
                        warn!(error = %e, "pod sync failed");
                        POLL
                    }
                };
                let wake = self.wake.clone();
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() {
                            return;
                        }
                    }
                    () = wake.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
        .instrument(span)
    }

    /// Tears down, retrying until done; false if the agent shut down meanwhile.
    async fn teardown_until_done(
        &mut self,
        grace: i64,
        updates: &mut watch::Receiver<Option<Pod>>,
    ) -> bool {
        loop {
            match teardown(&self.deps, &self.pod, &self.key.uid, grace).await {
                Ok(()) => return true,
                Err(e) => warn!(error = %e, "teardown failed; retrying"),
            }
            tokio::select! {
                changed = updates.changed() => {
                    if changed.is_err() {
                        return false;
                    }
                }
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

/// The host paths of the container's `subPath`/`subPathExpr` mounts, by mount path,
/// checked to stay inside their volumes.
fn resolve_sub_paths(
    container: &Container,
    volumes: &HashMap<String, HostVolume>,
    env: &[(String, String)],
) -> Result<HashMap<String, PathBuf>, PodError> {
    let vars: HashMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut out = HashMap::new();
    for m in container.volume_mounts.iter().flatten() {
        let sub = match (&m.sub_path, &m.sub_path_expr) {
            (Some(s), _) if !s.is_empty() => s.clone(),
            (_, Some(e)) if !e.is_empty() => super::spec::expand(e, &vars),
            _ => continue,
        };
        let volume = volumes.get(&m.name).ok_or_else(|| {
            PodError::Config(format!(
                "volumeMount {:?} of container {} names no volume of the pod",
                m.name, container.name
            ))
        })?;
        let path = volumes::sub_path(&m.name, volume, &sub)
            .map_err(|e| PodError::Config(e.to_string()))?;
        out.insert(m.mount_path.clone(), path);
    }
    Ok(out)
}

fn waiting_for(e: &PodError) -> Waiting {
    match e {
        PodError::Image { message, .. } => {
            let (reason, rest) = message
                .split_once(": ")
                .unwrap_or(("ErrImagePull", message.as_str()));
            Waiting {
                reason: reason.to_owned(),
                message: rest.to_owned(),
            }
        }
        PodError::Config(m) => Waiting {
            reason: "CreateContainerConfigError".into(),
            message: m.clone(),
        },
        other => Waiting {
            reason: "CreateContainerError".into(),
            message: other.to_string(),
        },
    }
}

/// The network namespace path from a sandbox's verbose info: `netns` (ferrolet-shim) or
/// containerd's `info` JSON.
pub fn netns_path(info: &HashMap<String, String>) -> Option<String> {
    if let Some(p) = info.get("netns").filter(|p| !p.is_empty()) {
        return Some(p.clone());
    }
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    v.get("netNamespacePath")
        .and_then(serde_json::Value::as_str)
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

/// Runs preStop hooks and stops the sandbox's running containers (concurrently, each with
/// `grace` seconds), detaches its network and stops it.
pub async fn stop_sandbox<A: Api, R: Runtime, N: Network>(
    deps: &Deps<A, R, N>,
    pod: &Pod,
    sandbox_id: &str,
    grace: i64,
) -> Result<(), PodError> {
    let runtime = &deps.runtime;
    let containers = runtime
        .list_containers(Some(sandbox_id), HashMap::new())
        .await?;
    // Orphans (deleted while the agent was down) have no pod object to report about.
    let events = pod
        .metadata
        .name
        .is_some()
        .then(|| Recorder::for_pod(deps.events.clone(), pod));
    let host = default_host(pod, &[], &deps.ctx.host_ips);
    let stops = containers
        .iter()
        .filter(|c| c.state == v1::ContainerState::ContainerRunning as i32)
        .map(|c| {
            let name = c
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default();
            let spec = container_spec(pod, &name);
            let target = Target {
                container_id: c.id.clone(),
                default_host: host.clone(),
            };
            let events = events.as_ref();
            async move {
                if let Some(ev) = events {
                    ev.normal(
                        "Killing",
                        &format!("Stopping container {name}"),
                        Some(&name),
                    );
                }
                kill_container(runtime.as_ref(), spec, &target, grace, events).await
            }
        });
    let mut first_error = None;
    for r in futures::future::join_all(stops).await {
        if let Err(e) = r
            && !e.is_not_found()
        {
            first_error.get_or_insert(PodError::from(e));
        }
    }
    if let Err(e) = deps.network.del(sandbox_id).await {
        first_error.get_or_insert(e.into());
    }
    if let Err(e) = runtime.stop_pod_sandbox(sandbox_id).await
        && !e.is_not_found()
    {
        first_error.get_or_insert(e.into());
    }
    first_error.map_or(Ok(()), Err)
}

/// Removes a stopped sandbox and its containers.
pub async fn remove_sandbox<A: Api, R: Runtime, N: Network>(
    deps: &Deps<A, R, N>,
    sandbox_id: &str,
) -> Result<(), PodError> {
    let runtime = &deps.runtime;
    for c in runtime
        .list_containers(Some(sandbox_id), HashMap::new())
        .await?
    {
        if let Err(e) = runtime.remove_container(&c.id).await
            && !e.is_not_found()
        {
            return Err(e.into());
        }
    }
    match runtime.remove_pod_sandbox(sandbox_id).await {
        Err(e) if !e.is_not_found() => Err(e.into()),
        _ => Ok(()),
    }
}

/// Stops and removes everything of the pod with `uid`: containers (gracefully), network,
/// sandboxes, volumes and its cgroup parent. Keeps going after errors and reports the first.
pub async fn teardown<A: Api, R: Runtime, N: Network>(
    deps: &Deps<A, R, N>,
    pod: &Pod,
    uid: &str,
    grace: i64,
) -> Result<(), PodError> {
    let sandboxes = deps.runtime.list_pod_sandboxes(uid_selector(uid)).await?;
    let mut first_error = None;
    for sb in &sandboxes {
        if let Err(e) = stop_sandbox(deps, pod, &sb.id, grace).await {
            first_error.get_or_insert(e);
            continue;
        }
        if let Err(e) = remove_sandbox(deps, &sb.id).await {
            first_error.get_or_insert(e);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let pod_dir = deps.ctx.pod_dir(uid);
    // A volume still mounted keeps the pod dir (and the pod) for the next try.
    volumes::cleanup(deps.mounter.as_ref(), &pod_dir)?;
    let _ = std::fs::remove_dir_all(&pod_dir);
    for (path, e) in remove_pod_cgroup(&deps.cgroupfs, &deps.ctx.cgroup_parent(uid)) {
        warn!(path = %path.display(), error = %e, "removing pod cgroup");
    }
    info!(sandboxes = sandboxes.len(), "pod torn down");
    Ok(())
}
