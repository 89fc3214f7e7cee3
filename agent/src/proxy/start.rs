//! The proxy as the agent runs it: one call starts the watches, the sync loop and the
//! health check node ports, and reports what it cannot program as Kubernetes Events.

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::config::ProxyConfig;
use super::events::{EventRecorder, ProxyEvent};
use super::health::{Binder, HealthServer, HostBinder};
use super::iptables::{Exec, HostExec, Iptables, IptablesError};
use super::proxier::{Proxier, SyncReport};
use super::run::run;
use super::source::{Kind, ProxySource, reflect};
use crate::api::events::{EventRecord, EventSink, WARNING};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("service proxy: {0}")]
    Iptables(#[from] IptablesError),
}

/// Hands the proxy's problems to an agent [`EventSink`] as Warning Events about the Service
/// or EndpointSlice concerned.
pub struct SinkRecorder {
    sink: Arc<dyn EventSink>,
}

impl SinkRecorder {
    pub fn new(sink: Arc<dyn EventSink>) -> Self {
        Self { sink }
    }
}

impl EventRecorder for SinkRecorder {
    fn record(&self, event: ProxyEvent) {
        let api_version = match event.kind {
            "EndpointSlice" => "discovery.k8s.io/v1",
            _ => "v1",
        };
        self.sink.emit(EventRecord {
            object: ObjectReference {
                api_version: Some(api_version.to_owned()),
                kind: Some(event.kind.to_owned()),
                namespace: Some(event.namespace),
                name: Some(event.name),
                uid: event.uid,
                ..Default::default()
            },
            type_: WARNING,
            reason: event.reason.to_owned(),
            message: event.message,
        });
    }
}

/// What the proxy touches on the host: the tools it runs and where health check node
/// ports listen. [`start`] uses this host; tests pass fakes or a network namespace.
#[derive(Clone)]
pub struct ProxyHost {
    pub exec: Arc<dyn Exec>,
    pub binder: Arc<dyn Binder>,
    /// Receives every sync's outcome (for tests and diagnostics).
    pub synced: Option<mpsc::UnboundedSender<Result<SyncReport, String>>>,
}

impl Default for ProxyHost {
    fn default() -> Self {
        Self {
            exec: Arc::new(HostExec::new()),
            binder: Arc::new(HostBinder),
            synced: None,
        }
    }
}

/// Starts the service proxy on this host: watches `source`, programs iptables (the backend
/// `config.backend` picks), serves health check node ports, and reports bad Services and
/// EndpointSlices to `events`. Needs a tokio runtime. The task ends when `shutdown` turns
/// true (or its sender is dropped); the rules stay in place, as kube-proxy leaves them.
pub fn start<S: ProxySource>(
    source: S,
    events: Arc<dyn EventSink>,
    config: ProxyConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, StartError> {
    start_on(source, events, config, ProxyHost::default(), shutdown)
}

/// [`start`] with the host's side effects passed in.
pub fn start_on<S: ProxySource>(
    source: S,
    events: Arc<dyn EventSink>,
    config: ProxyConfig,
    host: ProxyHost,
    mut shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, StartError> {
    let ipt = Iptables::detect(host.exec.clone(), config.backend)?;
    let timing = config.timing;
    let node_name = config.node_name.clone();
    let recorder: Arc<dyn EventRecorder> = Arc::new(SinkRecorder::new(events));
    let proxier = Arc::new(Mutex::new(Proxier::new(config, ipt, host.exec, recorder)));
    let source = Arc::new(source);
    let (tx, mut rx) = mpsc::channel(4096);
    let (listed_tx, mut listed_rx) = mpsc::unbounded_channel();
    let reflectors: Vec<JoinHandle<()>> = [Kind::Services, Kind::EndpointSlices, Kind::Node]
        .into_iter()
        .map(|kind| {
            tokio::spawn(reflect(
                source.clone(),
                kind,
                node_name.clone(),
                tx.clone(),
                listed_tx.clone(),
                shutdown.clone(),
            ))
        })
        .collect();
    drop(tx);
    drop(listed_tx);
    let binder = host.binder;
    let synced = host.synced;
    Ok(tokio::spawn(async move {
        // A sync before Services and EndpointSlices are both listed would delete the rules
        // of every Service not yet seen (all of them, after an agent restart).
        let (mut services, mut slices) = (false, false);
        while !(services && slices) {
            tokio::select! {
                change = rx.recv() => match change {
                    Some(c) => super::run::lock(&proxier).apply(c),
                    None => break,
                },
                kind = listed_rx.recv() => match kind {
                    Some(Kind::Services) => services = true,
                    Some(Kind::EndpointSlices) => slices = true,
                    Some(Kind::Node) => {}
                    None => break,
                },
                _ = shutdown.wait_for(|s| *s) => {
                    reflectors.iter().for_each(JoinHandle::abort);
                    return;
                }
            }
        }
        {
            let mut p = super::run::lock(&proxier);
            while let Ok(c) = rx.try_recv() {
                p.apply(c);
            }
        }
        tracing::info!("service proxy: Services and EndpointSlices listed; syncing");
        let health = HealthServer::new(binder);
        run(proxier, rx, timing, Some(health), shutdown, synced).await;
        reflectors.iter().for_each(JoinHandle::abort);
    }))
}

#[cfg(test)]
#[path = "start_tests.rs"]
mod tests;
