//! What a pod worker does next, decided from the spec, what the runtime reports and the
//! restart backoff: make a sandbox, start containers (init containers one at a time and in
//! order, then all app containers), or wait. Pure; the worker carries the plan out.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::PodSpec;

use super::backoff::Backoff;
use super::observed::{Observed, RunState};
use super::status::{self, RestartPolicy, Waiting};

/// One container to (re)start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub name: String,
    pub init: bool,
    pub attempt: u32,
    /// Whether this is a restart (the backoff records it).
    pub restart: bool,
}

/// The worker's next steps for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Make a new sandbox with this attempt number (after tearing down a dead one).
    pub create_sandbox: Option<u32>,
    pub start: Vec<Start>,
    /// Containers held back, with the reason the status shows.
    pub waiting: BTreeMap<String, Waiting>,
    /// When a held-back container may start: sync again then.
    pub requeue_after: Option<Duration>,
    /// The pod has reached Succeeded or Failed: nothing more runs.
    pub finished: bool,
}

impl Plan {
    fn hold(&mut self, name: &str, wait: Duration, exit_code: i32) {
        self.waiting.insert(
            name.to_owned(),
            Waiting {
                reason: "CrashLoopBackOff".into(),
                message: format!(
                    "back-off {}s restarting failed container {name} (last exit code {exit_code})",
                    wait.as_secs().max(1)
                ),
            },
        );
        self.requeue_after = Some(self.requeue_after.map_or(wait, |r| r.min(wait)));
    }
}

/// Decides the next steps for a pod with `spec`, given `obs` and `backoff` at `now`.
pub fn plan(spec: &PodSpec, obs: &Observed, backoff: &Backoff, now: SystemTime) -> Plan {
    let mut plan = Plan::default();
    let phase = status::phase(spec, obs);
    if phase == status::phase::SUCCEEDED || phase == status::phase::FAILED {
        plan.finished = true;
        return plan;
    }
    match &obs.sandbox {
        None => {
            plan.create_sandbox = Some(0);
            return plan;
        }
        Some(sb) if !sb.ready => {
            plan.create_sandbox = Some(sb.attempt + 1);
            return plan;
        }
        Some(_) => {}
    }
    let policy = RestartPolicy::of(spec);

    for c in spec.init_containers.iter().flatten() {
        match obs.latest(&c.name) {
            None => {
                plan.start.push(Start {
                    name: c.name.clone(),
                    init: true,
                    attempt: 0,
                    restart: false,
                });
                return plan;
            }
            Some(l) if l.state == RunState::Exited && l.exit_code == 0 => {}
            Some(l) if l.state == RunState::Exited => {
                // phase() already returned Failed for Never.
                match backoff.remaining(&c.name, l.finished_time(), now) {
                    Some(wait) => plan.hold(&c.name, wait, l.exit_code),
                    None => plan.start.push(Start {
                        name: c.name.clone(),
                        init: true,
                        attempt: l.attempt + 1,
                        restart: true,
                    }),
                }
                return plan;
            }
            // Running, created or unknown: wait for it to finish.
            Some(_) => return plan,
        }
    }

    for c in &spec.containers {
        match obs.latest(&c.name) {
            None => plan.start.push(Start {
                name: c.name.clone(),
                init: false,
                attempt: 0,
                restart: false,
            }),
            Some(l) if l.state == RunState::Exited && policy.restarts(l.exit_code, false) => {
                match backoff.remaining(&c.name, l.finished_time(), now) {
                    Some(wait) => plan.hold(&c.name, wait, l.exit_code),
                    None => plan.start.push(Start {
                        name: c.name.clone(),
                        init: false,
                        attempt: l.attempt + 1,
                        restart: true,
                    }),
                }
            }
            Some(_) => {}
        }
    }
    plan
}
