//! The probes of one pod: a task per probe of each running container (keyed by container
//! ID, so a restarted container starts over with fresh counters and its initial delay),
//! and the table of results the pod worker reads.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{Action, Kind, Outcome, Prober, Target, Thresholds, Verdict};
use crate::api::events::Recorder;
use crate::cri::Runtime;
use crate::pods::observed::{Observed, RunState, ns_to_system_time};

/// A container a failed liveness or startup probe wants killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kill {
    pub container_id: String,
    pub name: String,
    pub kind: Kind,
    pub message: String,
    /// The probe's own `terminationGracePeriodSeconds`, if it sets one.
    pub grace_seconds: Option<i64>,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    name: String,
    has_startup: bool,
    has_readiness: bool,
    started: bool,
    ready: bool,
    kill: Option<Kill>,
}

impl Entry {
    fn started(&self) -> bool {
        !self.has_startup || self.started
    }
}

type Table = Arc<Mutex<HashMap<String, Entry>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// See the module docs. Dropping it stops every probe task.
pub struct ProbeManager<R> {
    runtime: Arc<R>,
    prober: Prober,
    /// Woken whenever a verdict changes, so the worker syncs at once.
    notify: Arc<Notify>,
    events: Recorder,
    table: Table,
    tasks: HashMap<(String, Kind), JoinHandle<()>>,
}

impl<R> Drop for ProbeManager<R> {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

fn probes_of(c: &Container) -> Vec<(Kind, Probe)> {
    [
        (Kind::Startup, c.startup_probe.clone()),
        (Kind::Liveness, c.liveness_probe.clone()),
        (Kind::Readiness, c.readiness_probe.clone()),
    ]
    .into_iter()
    .filter_map(|(k, p)| p.map(|p| (k, p)))
    .collect()
}

struct Job<R> {
    runtime: Arc<R>,
    prober: Prober,
    notify: Arc<Notify>,
    events: Recorder,
    table: Table,
    kind: Kind,
    probe: Probe,
    container: Container,
    target: Target,
    started_at: SystemTime,
}

impl<R: Runtime> ProbeManager<R> {
    pub fn new(
        runtime: Arc<R>,
        prober: Prober,
        notify: Arc<Notify>,
        events: Recorder,
    ) -> ProbeManager<R> {
        ProbeManager {
            runtime,
            prober,
            notify,
            events,
            table: Arc::default(),
            tasks: HashMap::new(),
        }
    }

    /// Starts probing newly running containers of `pod` and stops probing those that are
    /// no longer running. `default_host` is where network probes go without a `host`.
    pub fn sync(&mut self, pod: &Pod, obs: &Observed, default_host: Option<&str>) {
        let spec = pod.spec.clone().unwrap_or_default();
        let mut live: HashSet<String> = HashSet::new();
        for c in &spec.containers {
            let Some(latest) = obs.latest(&c.name).filter(|l| l.state == RunState::Running) else {
                continue;
            };
            let probes = probes_of(c);
            if probes.is_empty() {
                continue;
            }
            live.insert(latest.id.clone());
            lock(&self.table)
                .entry(latest.id.clone())
                .or_insert_with(|| Entry {
                    name: c.name.clone(),
                    has_startup: c.startup_probe.is_some(),
                    has_readiness: c.readiness_probe.is_some(),
                    ..Default::default()
                });
            for (kind, probe) in probes {
                let key = (latest.id.clone(), kind);
                if self.tasks.contains_key(&key) {
                    continue;
                }
                let job = Job {
                    runtime: self.runtime.clone(),
                    prober: self.prober.clone(),
                    notify: self.notify.clone(),
                    events: self.events.clone(),
                    table: self.table.clone(),
                    kind,
                    probe,
                    container: c.clone(),
                    target: Target {
                        container_id: latest.id.clone(),
                        default_host: default_host.map(str::to_owned),
                    },
                    started_at: ns_to_system_time(latest.started_at),
                };
                let span = info_span!("probe", kind = kind.name(), container = %c.name);
                self.tasks
                    .insert(key, tokio::spawn(job.run().instrument(span)));
            }
        }
        self.tasks.retain(|(id, _), task| {
            let keep = live.contains(id);
            if !keep {
                task.abort();
            }
            keep
        });
        lock(&self.table).retain(|id, _| live.contains(id));
    }

    /// Readiness of every probed running container, by name: false until started, and
    /// with a readiness probe false until it succeeds.
    pub fn readiness(&self) -> HashMap<String, bool> {
        lock(&self.table)
            .values()
            .map(|e| {
                let ready = e.started() && (!e.has_readiness || e.ready) && e.kill.is_none();
                (e.name.clone(), ready)
            })
            .collect()
    }

    /// Whether each probed running container has passed its startup probe, by name.
    pub fn started(&self) -> HashMap<String, bool> {
        lock(&self.table)
            .values()
            .map(|e| (e.name.clone(), e.started()))
            .collect()
    }

    /// Containers to kill for failed liveness or startup probes; each is handed out once.
    pub fn take_kills(&mut self) -> Vec<Kill> {
        lock(&self.table)
            .values_mut()
            .filter_map(|e| e.kill.take())
            .collect()
    }

    /// Number of probe tasks running.
    pub fn task_count(&self) -> usize {
        self.tasks.values().filter(|t| !t.is_finished()).count()
    }
}

impl<R: Runtime> Job<R> {
    async fn run(self) {
        let th = Thresholds::of(&self.probe, self.kind);
        let first = self.started_at + th.initial_delay;
        if let Ok(wait) = first.duration_since(SystemTime::now()) {
            tokio::time::sleep(wait).await;
        }
        let action = match Action::of_probe(&self.probe, &self.container, &self.target) {
            Ok(a) => a,
            Err(e) => {
                // As upstream: a probe that cannot run gives no verdict (readiness stays
                // false, liveness never kills).
                warn!(error = %e, "probe cannot run");
                self.events.warning(
                    "Unhealthy",
                    &format!("{} probe errored: {e}", self.kind.name()),
                    Some(&self.container.name),
                );
                return;
            }
        };
        let mut verdict = Verdict::new(th);
        let mut ticker = tokio::time::interval(th.period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (gated, done) = {
                let table = lock(&self.table);
                let Some(e) = table.get(&self.target.container_id) else {
                    return;
                };
                (
                    self.kind != Kind::Startup && !e.started(),
                    self.kind == Kind::Startup && e.started,
                )
            };
            if done {
                return;
            }
            if gated {
                continue;
            }
            // Boxed: the task sleeps between probes, and an unboxed probe call (a runtime
            // exec among them) would be part of its size for all that time.
            let outcome =
                Box::pin(
                    self.prober
                        .run(self.runtime.as_ref(), &action, &self.target, th.timeout),
                )
                .await;
            if let Outcome::Failure(message) = &outcome {
                debug!(%message, "probe failed");
                self.events.warning(
                    "Unhealthy",
                    &format!("{} probe failed: {message}", self.kind.name()),
                    Some(&self.container.name),
                );
            }
            if !verdict.record(outcome.is_success()) {
                continue;
            }
            let healthy = verdict.healthy == Some(true);
            let stop = self.publish(healthy, &outcome);
            self.notify.notify_one();
            if stop {
                return;
            }
        }
    }

    /// Writes a changed verdict to the table; true if this probe is done.
    fn publish(&self, healthy: bool, outcome: &Outcome) -> bool {
        let mut table = lock(&self.table);
        let Some(e) = table.get_mut(&self.target.container_id) else {
            return true;
        };
        match (self.kind, healthy) {
            (Kind::Readiness, ready) => {
                info!(ready, "readiness changed");
                e.ready = ready;
                false
            }
            (Kind::Startup, true) => {
                info!("startup probe succeeded");
                e.started = true;
                true
            }
            (Kind::Liveness, true) => false,
            (Kind::Startup | Kind::Liveness, false) => {
                let message = match outcome {
                    Outcome::Failure(m) => m.clone(),
                    Outcome::Success => String::new(),
                };
                info!(%message, "probe failed its threshold; the container will be killed");
                e.kill = Some(Kill {
                    container_id: self.target.container_id.clone(),
                    name: self.container.name.clone(),
                    kind: self.kind,
                    message,
                    grace_seconds: self.probe.termination_grace_period_seconds,
                });
                true
            }
        }
    }
}
