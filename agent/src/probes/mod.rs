//! Container probes (liveness, readiness, startup) and the actions lifecycle hooks share
//! with them. Each probe of a running container runs in its own task on its own period, so
//! a slow probe never holds up the pod worker; results land in a per-pod table the worker
//! reads: readiness feeds the container's `ready`, startup gates the other two and feeds
//! `started`, and a liveness or startup failure asks the worker to kill the container.

pub mod action;
pub mod manager;

#[cfg(test)]
pub(crate) mod tests;

use std::time::Duration;

use k8s_openapi::api::core::v1::Probe;

pub use action::{Action, Outcome, Prober, Target};
pub use manager::{Kill, ProbeManager};

/// A probe or hook the agent cannot run as specified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("the handler specifies no action (exec, httpGet, tcpSocket)")]
    NoHandler,
    #[error("exec command is empty")]
    EmptyCommand,
    #[error("{what} is not supported by this agent")]
    Unsupported { what: &'static str },
    #[error("port {port} is not a valid port number")]
    BadPort { port: String },
    #[error("port name {name:?} is not declared by container {container}")]
    UnknownPortName { name: String, container: String },
    #[error("httpGet scheme {scheme:?} is neither HTTP nor HTTPS")]
    BadScheme { scheme: String },
    #[error("sleep seconds {seconds} is negative")]
    BadSleep { seconds: i64 },
    #[error("no host given and the pod has no IP yet")]
    NoAddress,
    #[error("building the probe HTTP client: {0}")]
    Setup(String),
}

/// The three probe kinds, named as events and logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

/// A probe's timing and thresholds with the API's defaults filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success: u32,
    pub failure: u32,
}

fn secs(v: Option<i32>, default: u64, min: u64) -> Duration {
    Duration::from_secs(
        v.and_then(|n| u64::try_from(n).ok())
            .unwrap_or(default)
            .max(min),
    )
}

fn count(v: Option<i32>, default: u32) -> u32 {
    v.and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

impl Thresholds {
    /// Defaults as the API documents them: no delay, every 10s, 1s timeout, 1 success,
    /// 3 failures. Liveness and startup need exactly one success.
    pub fn of(probe: &Probe, kind: Kind) -> Thresholds {
        let success = match kind {
            Kind::Readiness => count(probe.success_threshold, 1),
            Kind::Liveness | Kind::Startup => 1,
        };
        Thresholds {
            initial_delay: secs(probe.initial_delay_seconds, 0, 0),
            period: secs(probe.period_seconds, 10, 1),
            timeout: secs(probe.timeout_seconds, 1, 1),
            success,
            failure: count(probe.failure_threshold, 3),
        }
    }
}

/// A probe's verdict so far: it changes only after `success` successes or `failure`
/// failures in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    thresholds: Thresholds,
    /// `None` until the first verdict.
    pub healthy: Option<bool>,
    successes: u32,
    failures: u32,
}

impl Verdict {
    pub fn new(thresholds: Thresholds) -> Verdict {
        Verdict {
            thresholds,
            healthy: None,
            successes: 0,
            failures: 0,
        }
    }

    /// Takes one probe result; true if the verdict changed.
    pub fn record(&mut self, ok: bool) -> bool {
        let before = self.healthy;
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if self.successes >= self.thresholds.success {
                self.healthy = Some(true);
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.thresholds.failure {
                self.healthy = Some(false);
            }
        }
        before != self.healthy
    }
}
