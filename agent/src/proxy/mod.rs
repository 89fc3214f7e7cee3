//! The service proxy: Services and EndpointSlices programmed into iptables, the way
//! kube-proxy's iptables mode does it, with our own chains (`FERRO-*`).
//!
//! - `state`: the watch-fed cache (Services, EndpointSlices, this Node).
//! - `model`: what can be programmed, and events for what cannot.
//! - `rules`: the model as `iptables-restore` lines.
//! - `proxier`: full and partial syncs through `iptables-restore --noflush`.
//! - `iptables`: the tools (legacy or nf_tables), `conntrack`, `sysctl`, behind `Exec`.
//! - `health`: health check node ports of `externalTrafficPolicy: Local` Services.
//! - `run`: the loop that ties them together.
//! - `source`: lists and watches of Services, EndpointSlices and the Node (`ApiSource`
//!   over the agent's API client).
//! - `start`: the one call the agent makes ([`start`]), reporting problems as Events.

pub mod config;
pub mod events;
#[cfg(test)]
mod fake_kernel;
pub mod health;
pub mod iptables;
pub mod model;
pub mod proxier;
pub mod rules;
pub mod run;
pub mod source;
pub mod start;
pub mod state;

pub use config::{ConfigError, NodePortAddresses, ProxyConfig};
pub use events::{EventRecorder, MemoryRecorder, ProxyEvent};
pub use health::{Binder, HealthServer, HostBinder};
pub use iptables::{Backend, BackendChoice, Exec, ExecOutput, HostExec, Iptables, IptablesError};
pub use proxier::{HealthCheck, Proxier, SyncError, SyncReport};
pub use run::Timing;
pub use source::{ApiSource, Kind, Listed, Object, ProxySource, Watched};
pub use start::{ProxyHost, SinkRecorder, StartError, start, start_on};
pub use state::{Change, ProxyState, ServiceKey};
