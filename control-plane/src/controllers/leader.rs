//! Leader election through a coordination.k8s.io Lease, so that of several control-plane
//! processes sharing one store only one schedules and reconciles. The holder renews the lease;
//! a standby takes it over once it has not been renewed for its duration. Writes carry the
//! resourceVersion read, so two candidates racing for an expired lease cannot both win.

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;

use super::client::{ClientError, ClusterClient, Typed};

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

impl LeaderConfig {
    pub fn new(identity: impl Into<String>) -> Self {
        LeaderConfig {
            namespace: "kube-system".into(),
            name: "ferrolet-control-plane".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(2),
        }
    }
}

/// This process's candidate identity (`<hostname>_<uuid>`), kept in `<data-dir>/leader-identity`
/// so that a control plane restarted on the same data dir takes its own unexpired Lease back
/// at once instead of waiting for it to run out. Other data dirs, other identities.
pub fn persistent_identity(data_dir: &Path) -> Result<String, std::io::Error> {
    let path = data_dir.join("leader-identity");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let id = format!("{host}_{}", uuid::Uuid::new_v4());
    let tmp = data_dir.join("leader-identity.tmp");
    std::fs::write(&tmp, format!("{id}\n"))?;
    std::fs::rename(&tmp, &path)?;
    Ok(id)
}

/// What to write, given the lease as read.
#[derive(Debug, Clone, PartialEq)]
pub enum LeaseDecision {
    /// No lease: create one held by us.
    Create(Lease),
    /// Write this (renewal or takeover), conditional on the version read.
    Update(Lease),
    /// Someone else holds a live lease.
    Follow { holder: String },
}

/// Decides what `identity` does with `current` at `now`.
pub fn decide(current: Option<&Lease>, cfg: &LeaderConfig, now: Timestamp) -> LeaseDecision {
    let duration = cfg.lease_duration.as_secs() as i32;
    let fresh_spec = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.identity.clone()),
        lease_duration_seconds: Some(duration),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(current) = current else {
        return LeaseDecision::Create(Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(fresh_spec(0, None)),
        });
    };
    let spec = current.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let transitions = spec.lease_transitions.unwrap_or(0);
    let mut next = current.clone();
    if holder == cfg.identity {
        next.spec = Some(fresh_spec(transitions, spec.acquire_time.clone()));
        return LeaseDecision::Update(next);
    }
    let held_for = i64::from(spec.lease_duration_seconds.unwrap_or(duration));
    let expired = holder.is_empty()
        || spec
            .renew_time
            .as_ref()
            .is_none_or(|t| now.as_second() - t.0.as_second() > held_for);
    if expired {
        next.spec = Some(fresh_spec(transitions + 1, None));
        LeaseDecision::Update(next)
    } else {
        LeaseDecision::Follow { holder }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("reading or writing lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: ClientError,
    },
}

/// Tries once to become or stay leader. Ok(true) = we hold the lease now.
pub async fn try_acquire(
    client: &dyn ClusterClient,
    cfg: &LeaderConfig,
) -> Result<bool, LeaderError> {
    let api = Typed::<Lease>::new(client);
    let err = |source| LeaderError::Api {
        namespace: cfg.namespace.clone(),
        name: cfg.name.clone(),
        source,
    };
    let current = match api.get(Some(&cfg.namespace), &cfg.name).await {
        Ok(l) => Some(l),
        Err(e) if e.is_not_found() => None,
        Err(e) => return Err(err(e)),
    };
    match decide(current.as_ref(), cfg, super::pods::now()) {
        LeaseDecision::Create(l) => match api.create(&l).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_already_exists() => Ok(false),
            Err(e) => Err(err(e)),
        },
        LeaseDecision::Update(l) => match api.update(&l).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_conflict() => Ok(false),
            Err(e) => Err(err(e)),
        },
        LeaseDecision::Follow { .. } => Ok(false),
    }
}

/// Waits until this process leads, then runs `work` while renewing; returns when leadership is
/// lost (the renewal failed for a whole lease duration) or `work` ends. The caller should exit
/// on return so a fresh process starts over from a clean list.
pub async fn run_as_leader<F>(client: Arc<dyn ClusterClient>, cfg: LeaderConfig, work: F)
where
    F: Future<Output = ()> + Send,
{
    loop {
        match try_acquire(client.as_ref(), &cfg).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
        }
        tokio::time::sleep(cfg.renew_every).await;
    }
    tracing::info!(identity = %cfg.identity, "became leader");
    let renew = async {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(cfg.renew_every).await;
            match try_acquire(client.as_ref(), &cfg).await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "renewing leadership failed");
                    if last_ok.elapsed() > cfg.lease_duration {
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = work => {}
        () = renew => tracing::warn!(identity = %cfg.identity, "lost leadership"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controllers::fake::FakeClient;

    fn cfg(id: &str) -> LeaderConfig {
        LeaderConfig::new(id)
    }

    #[test]
    fn decisions() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let LeaseDecision::Create(l) = decide(None, &cfg("a"), t0) else {
            panic!("no lease: create")
        };
        assert_eq!(
            l.spec.as_ref().unwrap().holder_identity.as_deref(),
            Some("a")
        );
        assert!(
            matches!(decide(Some(&l), &cfg("b"), t0), LeaseDecision::Follow { ref holder } if holder == "a")
        );
        let LeaseDecision::Update(renewed) = decide(Some(&l), &cfg("a"), t0) else {
            panic!("holder renews")
        };
        assert_eq!(renewed.spec.unwrap().lease_transitions, Some(0));
        let later: Timestamp = "2026-01-01T00:00:16Z".parse().unwrap();
        let LeaseDecision::Update(taken) = decide(Some(&l), &cfg("b"), later) else {
            panic!("expired lease is taken over")
        };
        let spec = taken.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(spec.lease_transitions, Some(1));
    }

    #[test]
    fn the_identity_survives_a_restart_and_differs_per_data_dir() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = persistent_identity(a.path()).unwrap();
        assert_eq!(persistent_identity(a.path()).unwrap(), first);
        assert_ne!(persistent_identity(b.path()).unwrap(), first);
        let missing = a.path().join("no-such-dir");
        assert!(persistent_identity(&missing).is_err());
    }

    #[tokio::test]
    async fn only_one_of_two_candidates_leads() {
        let fake = FakeClient::new();
        assert!(try_acquire(&fake, &cfg("a")).await.unwrap());
        assert!(!try_acquire(&fake, &cfg("b")).await.unwrap());
        assert!(
            try_acquire(&fake, &cfg("a")).await.unwrap(),
            "the holder renews"
        );
    }

    #[tokio::test]
    async fn a_stale_read_cannot_take_over() {
        let fake = FakeClient::new();
        assert!(try_acquire(&fake, &cfg("a")).await.unwrap());
        let api = Typed::<Lease>::new(&fake);
        let stale = api
            .get(Some("kube-system"), "ferrolet-control-plane")
            .await
            .unwrap();
        // a renews; b then writes from its older read.
        assert!(try_acquire(&fake, &cfg("a")).await.unwrap());
        let mut grab = stale.clone();
        grab.spec.as_mut().unwrap().holder_identity = Some("b".into());
        assert!(api.update(&grab).await.unwrap_err().is_conflict());
    }
}
