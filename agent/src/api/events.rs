//! Events (core/v1 `Event`) about the objects the agent manages: image pulls, container
//! starts and kills, probe failures, backoffs. Code that reports an event hands it to an
//! [`EventSink`], which never blocks; [`ApiEventSink`] writes them to the API from its own
//! task, merging repeats into one Event with a growing `count` as the kubelet does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{Api, Patch};

/// `Normal` or `Warning`, as the API spells them.
pub const NORMAL: &str = "Normal";
pub const WARNING: &str = "Warning";

/// One event to report.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub object: ObjectReference,
    pub type_: &'static str,
    pub reason: String,
    pub message: String,
}

/// Where events go. `emit` must return at once: callers are pod workers and probes.
pub trait EventSink: Send + Sync + 'static {
    fn emit(&self, event: EventRecord);
}

/// Reports events about one pod (and its containers) to a sink.
#[derive(Clone)]
pub struct Recorder {
    sink: Arc<dyn EventSink>,
    object: ObjectReference,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("object", &self.object)
            .finish_non_exhaustive()
    }
}

impl Recorder {
    /// A recorder for events about `pod`.
    pub fn for_pod(sink: Arc<dyn EventSink>, pod: &Pod) -> Recorder {
        Recorder {
            sink,
            object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: pod.metadata.namespace.clone(),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
                resource_version: pod.metadata.resource_version.clone(),
                field_path: None,
            },
        }
    }

    fn emit(&self, type_: &'static str, reason: &str, message: &str, container: Option<&str>) {
        let mut object = self.object.clone();
        // Upstream names the container the event is about this way; kubectl shows it.
        object.field_path = container.map(|c| format!("spec.containers{{{c}}}"));
        self.sink.emit(EventRecord {
            object,
            type_,
            reason: reason.to_owned(),
            message: message.to_owned(),
        });
    }

    pub fn normal(&self, reason: &str, message: &str, container: Option<&str>) {
        self.emit(NORMAL, reason, message, container);
    }

    pub fn warning(&self, reason: &str, message: &str, container: Option<&str>) {
        self.emit(WARNING, reason, message, container);
    }
}

/// A sink that keeps every event, for tests and for callers that report no events.
#[derive(Debug, Default)]
pub struct RecordingSink {
    events: Mutex<Vec<EventRecord>>,
}

impl RecordingSink {
    pub fn events(&self) -> Vec<EventRecord> {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// `reason: message` of every event, in order.
    pub fn reasons(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .map(|e| format!("{}: {}", e.reason, e.message))
            .collect()
    }
}

impl EventSink for RecordingSink {
    fn emit(&self, event: EventRecord) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }
}

/// Events waiting to be written; beyond this, new events are dropped (and logged) rather
/// than slowing the agent down.
const QUEUE: usize = 1024;
/// Repeats are merged while their Event is remembered; the memory is cleared beyond this.
const REMEMBERED: usize = 4096;

/// Writes events to the API from a task of its own.
pub struct ApiEventSink {
    tx: mpsc::Sender<EventRecord>,
}

/// What makes two events the same event (then only the count grows).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    uid: String,
    field_path: String,
    type_: &'static str,
    reason: String,
    message: String,
}

struct Seen {
    name: String,
    count: i32,
}

impl ApiEventSink {
    /// Starts the writer task (needs a tokio runtime). `component` and `host` fill the
    /// Event's `source` (`kubelet`, the node name).
    pub fn spawn<A: Api>(api: Arc<A>, component: &str, host: &str) -> Arc<ApiEventSink> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let source = EventSource {
            component: Some(component.to_owned()),
            host: Some(host.to_owned()),
        };
        tokio::spawn(write_events(api, source, rx));
        Arc::new(ApiEventSink { tx })
    }
}

impl EventSink for ApiEventSink {
    fn emit(&self, event: EventRecord) {
        if let Err(e) = self.tx.try_send(event) {
            debug!(error = %e, "event dropped");
        }
    }
}

async fn write_events<A: Api>(
    api: Arc<A>,
    source: EventSource,
    mut rx: mpsc::Receiver<EventRecord>,
) {
    let mut seen: HashMap<Key, Seen> = HashMap::new();
    let mut serial: u64 = 0;
    while let Some(event) = rx.recv().await {
        let namespace = event
            .object
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let key = Key {
            namespace: namespace.clone(),
            uid: event.object.uid.clone().unwrap_or_default(),
            field_path: event.object.field_path.clone().unwrap_or_default(),
            type_: event.type_,
            reason: event.reason.clone(),
            message: event.message.clone(),
        };
        let now = Time(super::now());
        if let Some(s) = seen.get_mut(&key) {
            let count = s.count.saturating_add(1);
            let body = serde_json::json!({"count": count, "lastTimestamp": now});
            match api
                .patch::<Event>(Some(&namespace), &s.name, None, &Patch::Merge(body))
                .await
            {
                Ok(_) => {
                    s.count = count;
                    continue;
                }
                Err(e) if e.is_not_found() => {
                    // Expired or deleted: start a new Event below.
                    seen.remove(&key);
                }
                Err(e) => {
                    warn!(error = %e, reason = %event.reason, "updating an event failed");
                    continue;
                }
            }
        }
        serial = serial.wrapping_add(1);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        // `<object>.<hex>` as upstream names events; the serial keeps same-instant ones apart.
        let name = format!(
            "{}.{:x}",
            event.object.name.as_deref().unwrap_or("object"),
            nanos.wrapping_add(u128::from(serial))
        );
        let object = Event {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            },
            involved_object: event.object.clone(),
            reason: Some(event.reason.clone()),
            message: Some(event.message.clone()),
            type_: Some(event.type_.to_owned()),
            count: Some(1),
            first_timestamp: Some(now.clone()),
            last_timestamp: Some(now),
            source: Some(source.clone()),
            reporting_component: source.component.clone(),
            reporting_instance: source.host.clone(),
            ..Default::default()
        };
        match api.create(Some(&namespace), &object).await {
            Ok(_) => {
                if seen.len() >= REMEMBERED {
                    seen.clear();
                }
                seen.insert(key, Seen { name, count: 1 });
            }
            Err(e) => warn!(error = %e, reason = %event.reason, "writing an event failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::fake::{FakeApi, Write};
    use crate::api::{ApiResource, ListParams};

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    async fn events<K: ApiResource>(api: &FakeApi, want: usize) -> Vec<K> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let list = api
                .list::<K>(Some("ns"), &ListParams::default())
                .await
                .expect("list");
            if list.items.len() >= want || std::time::Instant::now() > deadline {
                return list.items;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn repeats_merge_into_one_event_with_a_count_and_others_stay_apart() {
        let api = Arc::new(FakeApi::new());
        let sink = ApiEventSink::spawn(api.clone(), "kubelet", "node-a");
        let rec = Recorder::for_pod(sink, &pod());
        rec.warning(
            "BackOff",
            "Back-off restarting failed container",
            Some("app"),
        );
        rec.warning(
            "BackOff",
            "Back-off restarting failed container",
            Some("app"),
        );
        rec.warning(
            "BackOff",
            "Back-off restarting failed container",
            Some("app"),
        );
        rec.normal("Started", "Started container app", Some("app"));
        rec.normal("Started", "Started container side", Some("side"));
        // Wait until the third BackOff is merged (two patches) and the others are created.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while api
            .writes()
            .iter()
            .filter(|w| matches!(w, Write::Patch { .. }))
            .count()
            < 2
            || events::<Event>(&api, 3).await.len() < 3
        {
            assert!(std::time::Instant::now() < deadline, "{:?}", api.writes());
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let all: Vec<Event> = events(&api, 3).await;
        assert_eq!(all.len(), 3, "{all:?}");
        let backoff = all
            .iter()
            .find(|e| e.reason.as_deref() == Some("BackOff"))
            .expect("BackOff event");
        assert_eq!(backoff.count, Some(3));
        assert_eq!(backoff.type_.as_deref(), Some("Warning"));
        assert_eq!(backoff.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(backoff.involved_object.uid.as_deref(), Some("u-1"));
        assert_eq!(
            backoff.involved_object.field_path.as_deref(),
            Some("spec.containers{app}")
        );
        assert_eq!(
            backoff.source.as_ref().and_then(|s| s.host.as_deref()),
            Some("node-a")
        );
        assert!(
            backoff
                .metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("web.")),
            "{:?}",
            backoff.metadata.name
        );
        let started: Vec<&Event> = all
            .iter()
            .filter(|e| e.reason.as_deref() == Some("Started"))
            .collect();
        assert_eq!(
            started.len(),
            2,
            "different containers are different events"
        );
    }

    #[tokio::test]
    async fn a_deleted_event_is_created_again_on_the_next_repeat() {
        let api = Arc::new(FakeApi::new());
        let sink = ApiEventSink::spawn(api.clone(), "kubelet", "node-a");
        let rec = Recorder::for_pod(sink, &pod());
        rec.warning("Unhealthy", "Liveness probe failed", Some("app"));
        let first: Vec<Event> = events(&api, 1).await;
        assert_eq!(first.len(), 1);
        let name = first[0].metadata.name.clone().expect("name");
        api.delete::<Event>(Some("ns"), &name, &Default::default())
            .await
            .expect("delete");
        rec.warning("Unhealthy", "Liveness probe failed", Some("app"));
        let again: Vec<Event> = events(&api, 1).await;
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!(again[0].count, Some(1));
        assert_ne!(again[0].metadata.name.as_deref(), Some(name.as_str()));
    }
}
