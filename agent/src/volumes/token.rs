//! Projected `serviceAccountToken` sources: a token for the pod's service account, bound to
//! the pod, from the API's TokenRequest (`POST serviceaccounts/{name}/token`). The token in
//! the volume is kept while it is young and asked for again once 80% of its lifetime has
//! passed, as the kubelet's token manager does; the caller swaps the new one in atomically
//! with the rest of the volume.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount, ServiceAccountTokenProjection};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::VolumeError;
use crate::api::Api;

/// Shortest lifetime a projection may ask for (upstream validation: 10 minutes).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// Longest (upstream: 2^32 seconds).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// When the projection names none (upstream default: one hour).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

/// What the agent reads back from a token it wrote: its lifetime and audiences. The token
/// is not verified here; the API server does that when it is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenTimes {
    pub issued_at: i64,
    pub expires_at: i64,
    pub audiences: Vec<String>,
}

/// The `iat`, `exp` and `aud` claims of a JWT, `None` when it is not one.
pub fn read_claims(jwt: &str) -> Option<TokenTimes> {
    let payload = jwt.trim().split('.').nth(1)?;
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    let audiences = match &claims["aud"] {
        serde_json::Value::String(a) => vec![a.clone()],
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    Some(TokenTimes {
        issued_at: claims["iat"].as_i64()?,
        expires_at: claims["exp"].as_i64()?,
        audiences,
    })
}

/// Whether a token with these claims must be asked for again at `now` (unix seconds): past
/// 80% of its lifetime, or meant for another audience than the projection's.
pub fn needs_refresh(times: &TokenTimes, audience: Option<&str>, now: i64) -> bool {
    let lifetime = times.expires_at.saturating_sub(times.issued_at);
    let refresh_at = times
        .issued_at
        .saturating_add(lifetime.saturating_mul(8) / 10);
    let wrong_audience = audience.is_some_and(|a| !times.audiences.iter().any(|t| t == a));
    lifetime <= 0 || now >= refresh_at || wrong_audience
}

/// The projection's lifetime, checked as upstream validates pods.
pub fn expiration_seconds(
    volume: &str,
    source: &ServiceAccountTokenProjection,
) -> Result<i64, VolumeError> {
    let seconds = source
        .expiration_seconds
        .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    if seconds < MIN_EXPIRATION_SECONDS {
        return Err(VolumeError::Invalid {
            volume: volume.into(),
            message: format!(
                "serviceAccountToken expirationSeconds {seconds} is less than the minimum of {MIN_EXPIRATION_SECONDS} (10 minutes)"
            ),
        });
    }
    if seconds > MAX_EXPIRATION_SECONDS {
        return Err(VolumeError::Invalid {
            volume: volume.into(),
            message: format!(
                "serviceAccountToken expirationSeconds {seconds} is more than the maximum of 2^32"
            ),
        });
    }
    Ok(seconds)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The token the projection's file should hold: the one at `current` (the file the volume
/// holds now) while it is fresh, otherwise a new one from the API server.
pub async fn token_file<A: Api>(
    api: &A,
    volume: &str,
    pod: &Pod,
    source: &ServiceAccountTokenProjection,
    current: Option<&Path>,
) -> Result<String, VolumeError> {
    let seconds = expiration_seconds(volume, source)?;
    let audience = source.audience.as_deref().filter(|a| !a.is_empty());
    let now = unix_now();
    let held = current
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| read_claims(&text).map(|times| (text, times)));
    if let Some((text, times)) = &held
        && !needs_refresh(times, audience, now)
    {
        return Ok(text.clone());
    }
    match request_token(api, volume, pod, audience, seconds).await {
        Ok(token) => Ok(token),
        // The token held still works for a while: keep it and try again on the next sync,
        // as the kubelet does, rather than hold back containers.
        Err(e) => match held {
            Some((text, times))
                if now < times.expires_at
                    && audience.is_none_or(|a| times.audiences.iter().any(|t| t == a)) =>
            {
                tracing::warn!(volume, error = %e, expires_at = times.expires_at, "refreshing the service account token failed; keeping the current one");
                Ok(text)
            }
            _ => Err(e),
        },
    }
}

/// A new token for the pod's service account, bound to the pod.
async fn request_token<A: Api>(
    api: &A,
    volume: &str,
    pod: &Pod,
    audience: Option<&str>,
    seconds: i64,
) -> Result<String, VolumeError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let account = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let request = TokenRequest {
        metadata: ObjectMeta {
            name: Some(account.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(TokenRequestSpec {
            attestations: None,
            audiences: Some(audience.map(|a| vec![a.to_owned()]).unwrap_or_default()),
            expiration_seconds: Some(seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: pod.metadata.name.clone(),
                uid: pod.metadata.uid.clone(),
            }),
        }),
        status: None,
    };
    let answer = api
        .create_subresource::<ServiceAccount, TokenRequest>(
            Some(namespace),
            account,
            "token",
            &request,
        )
        .await
        .map_err(|source| {
            if source.is_not_found() {
                VolumeError::Missing {
                    volume: volume.into(),
                    kind: "serviceaccount",
                    namespace: namespace.into(),
                    name: account.into(),
                }
            } else {
                VolumeError::Api {
                    volume: volume.into(),
                    source,
                }
            }
        })?;
    answer
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| VolumeError::Invalid {
            volume: volume.into(),
            message: format!(
                "the API server answered the TokenRequest for serviceaccount {namespace}/{account} without a token"
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unsigned JWT with these claims: the agent never checks signatures.
    pub fn jwt(iat: i64, exp: i64, aud: &[&str]) -> String {
        let claims = serde_json::json!({"iat": iat, "exp": exp, "aud": aud});
        format!(
            "e30.{}.c2ln",
            URL_SAFE_NO_PAD.encode(claims.to_string().as_bytes())
        )
    }

    #[test]
    fn claims_are_read_from_a_jwt_and_garbage_is_none() {
        let t = read_claims(&jwt(100, 700, &["api"])).expect("claims");
        assert_eq!(
            t,
            TokenTimes {
                issued_at: 100,
                expires_at: 700,
                audiences: vec!["api".into()]
            }
        );
        for bad in ["", "nodots", "a.!!!.c", "a.e30.c"] {
            assert_eq!(read_claims(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_token_is_refreshed_at_80_percent_of_its_life_or_for_another_audience() {
        let t = read_claims(&jwt(1000, 2000, &["api"])).expect("claims");
        assert!(!needs_refresh(&t, None, 1000));
        assert!(!needs_refresh(&t, Some("api"), 1799));
        assert!(needs_refresh(&t, None, 1800));
        assert!(needs_refresh(&t, None, 2500));
        assert!(needs_refresh(&t, Some("vault"), 1000));
        let broken = read_claims(&jwt(2000, 1000, &[])).expect("claims");
        assert!(needs_refresh(&broken, None, 0));
    }

    #[test]
    fn expiration_below_ten_minutes_or_above_two_to_the_32_is_refused() {
        let source = |s: Option<i64>| ServiceAccountTokenProjection {
            expiration_seconds: s,
            path: "token".into(),
            ..Default::default()
        };
        assert_eq!(expiration_seconds("v", &source(None)).ok(), Some(3600));
        assert_eq!(expiration_seconds("v", &source(Some(600))).ok(), Some(600));
        let err = expiration_seconds("v", &source(Some(599))).expect_err("short");
        assert!(
            err.to_string().contains("less than the minimum of 600"),
            "{err}"
        );
        let err = expiration_seconds("v", &source(Some((1 << 32) + 1))).expect_err("long");
        assert!(err.to_string().contains("maximum"), "{err}");
    }
}
