//! Problems the proxy reports about the objects it was given. The agent posts them as
//! Kubernetes Events; tests collect them.

use std::sync::Mutex;

/// A Warning about one object (a Service or an EndpointSlice) that could not be fully
/// programmed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyEvent {
    /// `Service` or `EndpointSlice`.
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// The object's uid, when known (`kubectl describe` finds Events by it).
    pub uid: Option<String>,
    /// A CamelCase reason, as Kubernetes Events carry.
    pub reason: &'static str,
    pub message: String,
}

pub trait EventRecorder: Send + Sync {
    fn record(&self, event: ProxyEvent);
}

/// Keeps every event in memory, for tests and for an agent that drains them.
#[derive(Debug, Default)]
pub struct MemoryRecorder {
    events: Mutex<Vec<ProxyEvent>>,
}

impl MemoryRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the events recorded so far.
    pub fn drain(&self) -> Vec<ProxyEvent> {
        std::mem::take(
            &mut *self
                .events
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}

impl EventRecorder for MemoryRecorder {
    fn record(&self, event: ProxyEvent) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }
}
