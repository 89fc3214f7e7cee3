//! The scheduler: binds each pending pod that names this scheduler to the best node that fits.
//!
//! [`schedule`] is the pure decision over a [`ClusterState`]; [`Scheduler`] is the loop that
//! keeps the state current from watches, binds through `pods/binding`, marks pods that fit
//! nowhere `PodScheduled=False` with an Event, and retries them when nodes or pods change.

pub mod filters;
pub mod resources;
pub mod scores;
pub mod state;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use k8s_openapi::api::core::v1::{Node, Pod};
use serde_json::json;
use tokio::sync::mpsc;

use crate::controllers::cache::{Event, reflect};
use crate::controllers::client::{ClientError, ClusterClient, ResourceType};
use crate::controllers::events::EventRecorder;
use filters::{PodNeeds, Reason, run_filters};
pub use state::ClusterState;

pub const DEFAULT_SCHEDULER_NAME: &str = "default-scheduler";

/// The outcome of one scheduling attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Bind(String),
    /// Fits nowhere; the message says why per filter.
    Unschedulable(String),
}

/// "0/3 nodes are available: 1 node(s) had untolerated taint {a: b}, 2 Insufficient cpu."
pub fn unschedulable_message(total: usize, reasons: &HashMap<Reason, usize>) -> String {
    let mut parts: Vec<String> = reasons.iter().map(|(r, n)| format!("{n} {r}")).collect();
    parts.sort();
    if parts.is_empty() {
        format!("0/{total} nodes are available.")
    } else {
        format!("0/{total} nodes are available: {}.", parts.join(", "))
    }
}

/// How many feasible nodes are enough to pick from, as upstream's adaptive
/// `percentageOfNodesToScore`: every node of a small cluster, about 42% of 1,000 nodes, never
/// fewer than 100. Scoring all of a big cluster for every pod buys little and costs O(nodes).
pub fn nodes_to_find(total: usize) -> usize {
    const MIN: usize = 100;
    if total <= MIN {
        return total;
    }
    let percent = 50usize.saturating_sub(total / 125).max(5);
    (total * percent / 100).max(MIN)
}

/// Picks the node for `pod`: filter every node, score those left, highest score wins, ties go
/// to the node name first in order so decisions are reproducible.
pub fn schedule(pod: &Pod, cluster: &ClusterState) -> Decision {
    schedule_from(pod, cluster, 0).0
}

/// [`schedule`] looking at nodes from the `start`th on (wrapping) and stopping once
/// [`nodes_to_find`] feasible ones are found; also returns how many nodes it looked at, so the
/// next pod starts after them and every node gets its turn.
pub fn schedule_from(pod: &Pod, cluster: &ClusterState, start: usize) -> (Decision, usize) {
    let needs = PodNeeds::of(pod);
    let mut reasons: HashMap<Reason, usize> = HashMap::new();
    let mut feasible = Vec::new();
    let total = cluster.node_count();
    let enough = nodes_to_find(total);
    let start = if total == 0 { 0 } else { start % total };
    let mut looked = 0;
    for info in cluster
        .nodes()
        .skip(start)
        .chain(cluster.nodes().take(start))
    {
        looked += 1;
        let failed = run_filters(&needs, info);
        if failed.is_empty() {
            feasible.push(info);
            if feasible.len() >= enough {
                break;
            }
        }
        for r in failed {
            *reasons.entry(r).or_insert(0) += 1;
        }
    }
    (decide(pod, &needs, feasible, total, &reasons), looked)
}

fn decide(
    pod: &Pod,
    needs: &PodNeeds<'_>,
    feasible: Vec<&state::NodeInfo>,
    total: usize,
    reasons: &HashMap<Reason, usize>,
) -> Decision {
    if feasible.is_empty() {
        return Decision::Unschedulable(unschedulable_message(total, reasons));
    }
    let owner = state::controller_uid(pod);
    let max_owned = owner.as_ref().map_or(0, |o| {
        feasible
            .iter()
            .map(|i| i.owners.get(o).copied().unwrap_or(0))
            .max()
            .unwrap_or(0)
    });
    let want = scores::scoring_requests(&needs.requests);
    let mut best: Option<(i64, &str)> = None;
    for info in feasible {
        let score =
            scores::least_allocated(want, info) + scores::spread(owner.as_deref(), info, max_owned);
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, info.name()));
        }
    }
    match best {
        Some((_, node)) => Decision::Bind(node.to_owned()),
        None => Decision::Unschedulable(unschedulable_message(total, reasons)),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("binding pod {pod} to node {node}: {source}")]
    Bind {
        pod: String,
        node: String,
        #[source]
        source: ClientError,
    },
    #[error("marking pod {pod} unschedulable: {source}")]
    Status {
        pod: String,
        #[source]
        source: ClientError,
    },
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

/// Whether this scheduler should place the pod.
pub fn wants(pod: &Pod, scheduler_name: &str) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.node_name.as_deref().is_none_or(str::is_empty)
        && spec
            .scheduler_name
            .as_deref()
            .unwrap_or(DEFAULT_SCHEDULER_NAME)
            == scheduler_name
        && pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Bindings sent concurrently by one scheduling pass.
pub const BINDS_IN_FLIGHT: usize = 64;

struct BindOutcome {
    pod: Pod,
    node: String,
    result: Result<(), ClientError>,
}

/// POSTs the pod's binding, then records the Scheduled event.
async fn bind(
    client: Arc<dyn ClusterClient>,
    events: EventRecorder,
    pod: Pod,
    node: String,
) -> BindOutcome {
    let key = pod_key(&pod);
    let ns = pod.metadata.namespace.as_deref();
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let binding = json!({
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name, "namespace": ns},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let result = client
        .post_subresource(ResourceType::of::<Pod>(), ns, name, "binding", binding)
        .await
        .map(|_| ());
    if result.is_ok() {
        tracing::debug!(pod = %key, node = %node, "bound");
        events
            .normal(
                &pod,
                "Scheduled",
                &format!("Successfully assigned {key} to {node}"),
            )
            .await;
    }
    BindOutcome { pod, node, result }
}

enum Input {
    Pods(Box<Event<Pod>>),
    Nodes(Box<Event<Node>>),
    Retry,
}

/// The scheduling loop over a client.
pub struct Scheduler {
    client: Arc<dyn ClusterClient>,
    name: String,
    cluster: ClusterState,
    /// Pods to try, in arrival order by key.
    pending: BTreeMap<String, Pod>,
    /// Pods that fit nowhere last time, retried on the next change.
    waiting: BTreeMap<String, Pod>,
    events: EventRecorder,
    /// The unschedulable message last written per pod, so retries that reach the same verdict
    /// write nothing.
    reported: HashMap<String, String>,
    /// How often unschedulable pods are retried even when nothing changed.
    pub retry_every: Duration,
    /// Where the next pod's look at the nodes starts (see [`schedule_from`]).
    next_start: usize,
}

impl Scheduler {
    pub fn new(client: Arc<dyn ClusterClient>, name: impl Into<String>) -> Self {
        let name = name.into();
        Scheduler {
            events: EventRecorder::new(Arc::clone(&client), name.clone()),
            client,
            name,
            cluster: ClusterState::default(),
            pending: BTreeMap::new(),
            waiting: BTreeMap::new(),
            reported: HashMap::new(),
            retry_every: Duration::from_secs(30),
            next_start: 0,
        }
    }

    pub fn cluster(&self) -> &ClusterState {
        &self.cluster
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Feeds one pod event into the state and the queues.
    pub fn on_pod(&mut self, ev: Event<Pod>) {
        let mut freed = false;
        match ev {
            Event::Applied(p) => self.pod_changed(p, &mut freed),
            Event::Deleted(p) => {
                let key = pod_key(&p);
                self.reported.remove(&key);
                self.pending.remove(&key);
                self.waiting.remove(&key);
                self.cluster.remove_pod(&p);
                freed = true;
            }
            Event::Restarted(all) => {
                let mut fresh = ClusterState::default();
                for n in self.cluster.nodes() {
                    fresh.set_node((*n.node).clone());
                }
                self.cluster = fresh;
                self.pending.clear();
                self.waiting.clear();
                for p in all {
                    self.pod_changed(p, &mut freed);
                }
                freed = true;
            }
        }
        if freed {
            self.retry_waiting();
        }
    }

    fn pod_changed(&mut self, p: Pod, freed: &mut bool) {
        let key = pod_key(&p);
        if wants(&p, &self.name) {
            match self.waiting.get_mut(&key) {
                Some(w) => *w = p,
                None => {
                    self.pending.insert(key, p);
                }
            }
        } else {
            self.pending.remove(&key);
            self.waiting.remove(&key);
            self.reported.remove(&key);
            let finished = matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            *freed |= finished || p.metadata.deletion_timestamp.is_some();
            self.cluster.set_pod(&p);
        }
    }

    pub fn on_node(&mut self, ev: Event<Node>) {
        match ev {
            Event::Applied(n) => self.cluster.set_node(n),
            Event::Deleted(n) => self
                .cluster
                .remove_node(n.metadata.name.as_deref().unwrap_or_default()),
            Event::Restarted(all) => {
                let names: Vec<String> =
                    self.cluster.nodes().map(|n| n.name().to_owned()).collect();
                for n in names {
                    self.cluster.remove_node(&n);
                }
                for n in all {
                    self.cluster.set_node(n);
                }
            }
        }
        self.retry_waiting();
    }

    pub fn retry_waiting(&mut self) {
        let waiting = std::mem::take(&mut self.waiting);
        self.pending.extend(waiting);
    }

    /// Schedules every pending pod once. Returns how many were bound.
    ///
    /// Decisions are made one after another on the assumed state (each bound pod counts on its
    /// node at once); the bindings go out concurrently, up to [`BINDS_IN_FLIGHT`], so the API
    /// round trips overlap with the next decisions.
    pub async fn schedule_pending(&mut self) -> usize {
        let mut bound = 0;
        let mut in_flight = FuturesUnordered::new();
        while let Some((key, pod)) = self.pending.pop_first() {
            let (decision, looked) = schedule_from(&pod, &self.cluster, self.next_start);
            self.next_start = self.next_start.wrapping_add(looked);
            match decision {
                Decision::Bind(node) => {
                    self.cluster.assume(&pod, &node);
                    in_flight.push(tokio::spawn(bind(
                        Arc::clone(&self.client),
                        self.events.clone(),
                        pod,
                        node,
                    )));
                    if in_flight.len() >= BINDS_IN_FLIGHT
                        && let Some(done) = in_flight.next().await
                    {
                        bound += self.bind_done(done);
                    }
                }
                Decision::Unschedulable(message) => {
                    if let Err(e) = self.unschedulable(&pod, message).await {
                        tracing::warn!(pod = %key, error = %e, "scheduling failed; will retry");
                    }
                    self.waiting.insert(key, pod);
                }
            }
        }
        while let Some(done) = in_flight.next().await {
            bound += self.bind_done(done);
        }
        bound
    }

    /// Takes in one finished binding; 1 if the pod is placed (or gone), else 0.
    fn bind_done(&mut self, done: Result<BindOutcome, tokio::task::JoinError>) -> usize {
        let outcome = match done {
            Ok(o) => o,
            Err(e) => {
                // The task panicked or was cancelled: its pod comes back with the next list.
                tracing::warn!(error = %e, "binding task failed");
                return 0;
            }
        };
        match outcome.result {
            Ok(()) => 1,
            // Deleted, or bound by someone else meanwhile: the watch will tell.
            Err(e) if e.is_not_found() || e.is_conflict() => {
                self.cluster.forget(&outcome.pod);
                1
            }
            Err(source) => {
                self.cluster.forget(&outcome.pod);
                let key = pod_key(&outcome.pod);
                let e = SchedulerError::Bind {
                    pod: key.clone(),
                    node: outcome.node,
                    source,
                };
                tracing::warn!(pod = %key, error = %e, "scheduling failed; will retry");
                self.waiting.insert(key, outcome.pod);
                0
            }
        }
    }

    /// Marks a pod that fits nowhere, once per distinct verdict.
    async fn unschedulable(&mut self, pod: &Pod, message: String) -> Result<(), SchedulerError> {
        let key = pod_key(pod);
        let ns = pod.metadata.namespace.as_deref();
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let rt = ResourceType::of::<Pod>();
        let already = self.reported.get(&key) == Some(&message)
            || pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
                .is_some_and(|c| {
                    c.status == "False" && c.message.as_deref() == Some(message.as_str())
                });
        if !already {
            tracing::info!(pod = %key, %message, "unschedulable");
            let patch = json!({"status": {"conditions": [{
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": message,
                "lastTransitionTime": chrono::Utc::now()
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }]}});
            match self
                .client
                .patch(
                    rt,
                    ns,
                    name,
                    Some("status"),
                    crate::controllers::client::PatchKind::Merge,
                    patch,
                )
                .await
            {
                Ok(_) => {}
                Err(e) if e.is_not_found() => return Ok(()),
                Err(source) => return Err(SchedulerError::Status { pod: key, source }),
            }
            self.events.warning(pod, "FailedScheduling", &message).await;
            self.reported.insert(key, message);
        }
        Ok(())
    }

    /// Runs forever: watches nodes and pods, schedules what is pending.
    pub async fn run(mut self) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let pods_tx = tx.clone();
        tokio::spawn(reflect::<Pod>(
            Arc::clone(&self.client),
            None,
            Duration::from_secs(1),
            move |ev| {
                let _ = pods_tx.send(Input::Pods(Box::new(ev)));
            },
        ));
        let nodes_tx = tx.clone();
        tokio::spawn(reflect::<Node>(
            Arc::clone(&self.client),
            None,
            Duration::from_secs(1),
            move |ev| {
                let _ = nodes_tx.send(Input::Nodes(Box::new(ev)));
            },
        ));
        let retry_every = self.retry_every;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(retry_every).await;
                if tx.send(Input::Retry).is_err() {
                    return;
                }
            }
        });
        while let Some(first) = rx.recv().await {
            let mut next = Some(first);
            // Take in everything already queued before deciding, so decisions see fresh state.
            while let Some(input) = next {
                match input {
                    Input::Pods(ev) => self.on_pod(*ev),
                    Input::Nodes(ev) => self.on_node(*ev),
                    Input::Retry => self.retry_waiting(),
                }
                next = rx.try_recv().ok();
            }
            self.schedule_pending().await;
        }
    }
}

#[cfg(test)]
mod tests;
