//! The control loops of one control-plane process: the scheduler and the controllers, started
//! together behind leader election, with the flag syntax the binary accepts for choosing them
//! (`--controllers`, kube-controller-manager's list form) and for durations (`40s`, `5m`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::client::ClusterClient;
use super::leader::{LeaderConfig, run_as_leader};
use super::{ManagerConfig, ManagerError};
use crate::scheduler::Scheduler;

/// Every controller `--controllers` can name. `endpoint` keeps both Endpoints and
/// EndpointSlices; `namespace` also gives each namespace its `default` ServiceAccount.
pub const CONTROLLERS: &[&str] = &[
    "deployment",
    "endpoint",
    "garbagecollector",
    "namespace",
    "nodeipam",
    "nodelifecycle",
    "replicaset",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FlagError {
    #[error("unknown controller {name:?} in --controllers (known: *, none, {})", CONTROLLERS.join(", "))]
    UnknownController { name: String },
    #[error("invalid duration {value:?}: {why} (expected e.g. 500ms, 40s, 5m, 1h)")]
    Duration { value: String, why: &'static str },
}

/// Which controllers run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnabledControllers(BTreeSet<&'static str>);

impl Default for EnabledControllers {
    fn default() -> Self {
        Self::all()
    }
}

impl EnabledControllers {
    pub fn all() -> Self {
        EnabledControllers(CONTROLLERS.iter().copied().collect())
    }

    pub fn none() -> Self {
        EnabledControllers(BTreeSet::new())
    }

    /// Reads kube-controller-manager's `--controllers` list: `*` turns on every controller
    /// not named with a leading `-`; `name` turns one on, `-name` off, whatever the order.
    /// `none` (or `false`, or an empty list) runs none.
    pub fn parse<S: AsRef<str>>(items: &[S]) -> Result<Self, FlagError> {
        let find = |name: &str| {
            CONTROLLERS
                .iter()
                .copied()
                .find(|c| *c == name)
                .ok_or_else(|| FlagError::UnknownController {
                    name: name.to_owned(),
                })
        };
        let mut star = false;
        let mut on = BTreeSet::new();
        let mut off = BTreeSet::new();
        for item in items {
            match item.as_ref().trim() {
                "" | "none" | "false" => {}
                "*" => star = true,
                name => match name.strip_prefix('-') {
                    Some(name) => {
                        off.insert(find(name)?);
                    }
                    None => {
                        on.insert(find(name)?);
                    }
                },
            }
        }
        if star {
            on.extend(CONTROLLERS.iter().copied());
        }
        Ok(EnabledControllers(on.difference(&off).copied().collect()))
    }

    pub fn is_enabled(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.0.iter().copied()
    }
}

/// Parses a Go-style duration flag: a number with a unit (`ms`, `s`, `m`, `h`), or several in
/// a row (`1m30s`). A bare `0` is zero.
pub fn parse_duration(value: &str) -> Result<Duration, FlagError> {
    let err = |why| FlagError::Duration {
        value: value.to_owned(),
        why,
    };
    let text = value.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.is_empty() {
        return Err(err("empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| err("missing unit"))?;
        if digits == 0 {
            return Err(err("expected a number"));
        }
        let number: f64 = rest[..digits]
            .parse()
            .map_err(|_| err("malformed number"))?;
        let after = &rest[digits..];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let scale = match &after[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err("unknown unit")),
        };
        total += Duration::try_from_secs_f64(number * scale).map_err(|_| err("out of range"))?;
        rest = &after[unit_len..];
    }
    Ok(total)
}

/// What runs besides the API server.
#[derive(Debug, Clone)]
pub struct LoopsConfig {
    /// The scheduler's name (`default-scheduler`); `None` runs no scheduler.
    pub scheduler: Option<String>,
    pub manager: ManagerConfig,
    /// `None` runs without leader election (one control plane only).
    pub leader: Option<LeaderConfig>,
}

/// Runs the scheduler and the enabled controllers, behind leader election when configured.
/// Returns only when leadership is lost (or a loop ends): the caller should then exit so a
/// fresh process starts again from a clean list, as upstream components do.
pub async fn run_loops(
    client: Arc<dyn ClusterClient>,
    config: LoopsConfig,
) -> Result<(), ManagerError> {
    // Bad settings fail now, not after winning an election.
    config.manager.validate()?;
    if config.scheduler.is_none() && config.manager.enabled.is_empty() {
        tracing::info!("no scheduler and no controllers to run");
        return std::future::pending().await;
    }
    let work = {
        let client = Arc::clone(&client);
        async move {
            let scheduler = async {
                match &config.scheduler {
                    Some(name) => {
                        Scheduler::new(Arc::clone(&client), name.clone())
                            .run()
                            .await;
                    }
                    None => std::future::pending().await,
                }
            };
            let controllers = super::run_all(Arc::clone(&client), config.manager);
            tokio::select! {
                () = scheduler => Ok(()),
                r = controllers => r,
            }
        }
    };
    match config.leader {
        None => work.await,
        Some(leader) => {
            let identity = leader.identity.clone();
            let mut outcome = Ok(());
            run_as_leader(client, leader, async {
                outcome = work.await;
            })
            .await;
            outcome?;
            Err(ManagerError::LostLeadership { identity })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(e: &EnabledControllers) -> Vec<&'static str> {
        e.names().collect()
    }

    #[test]
    fn controllers_list_follows_the_kube_syntax() {
        assert_eq!(
            EnabledControllers::parse(&["*"]).unwrap(),
            EnabledControllers::all()
        );
        let e = EnabledControllers::parse(&["-nodeipam", "*", "-garbagecollector"]).unwrap();
        assert!(!e.is_enabled("nodeipam") && !e.is_enabled("garbagecollector"));
        assert!(e.is_enabled("replicaset") && e.is_enabled("deployment"));
        assert_eq!(
            names(&EnabledControllers::parse(&["replicaset", " deployment"]).unwrap()),
            vec!["deployment", "replicaset"]
        );
        for off in [&["none"][..], &["false"], &[""], &[]] {
            assert!(
                EnabledControllers::parse(off).unwrap().is_empty(),
                "{off:?}"
            );
        }
    }

    #[test]
    fn unknown_controllers_are_named_in_the_error() {
        let err = EnabledControllers::parse(&["*", "-replicaset", "cronjob"]).unwrap_err();
        assert_eq!(
            err,
            FlagError::UnknownController {
                name: "cronjob".into()
            }
        );
        assert!(err.to_string().contains("\"cronjob\""), "{err}");
        assert!(EnabledControllers::parse(&["-bogus"]).is_err());
    }

    #[test]
    fn durations_parse_like_go_flags() {
        assert_eq!(parse_duration("40s").unwrap(), Duration::from_secs(40));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "40", "s", "4x", "1..2s", "-1s", "1s2"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(
            parse_duration("40")
                .unwrap_err()
                .to_string()
                .contains("missing unit"),
            "the error says what is wrong"
        );
    }
}
