//! Service account tokens. The `serviceaccounts/{name}/token` subresource (an
//! `authentication.k8s.io/v1` TokenRequest) issues a JWT signed with HMAC-SHA256 under a key
//! kept in the data dir; bearer authentication accepts such a token while it is unexpired,
//! names this API server's audience, and the service account (and the pod it is bound to,
//! if any) still exist with the uids the token carries. That last check is why a token
//! stops working when its pod is deleted, as upstream's bound tokens do.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ApiError, FieldError};

/// The audience (and issuer) of tokens meant for this API server, upstream's default.
pub const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";
/// Shortest lifetime a TokenRequest may ask for (upstream: 10 minutes).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// Longest lifetime a TokenRequest may ask for (upstream: 2^32 seconds).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// Lifetime when the request names none (upstream: one hour).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("service account signing key {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("service account signing key {path}: expected 64 hex digits")]
    KeyContent { path: PathBuf },
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    #[error("token signature is invalid")]
    Signature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token is not meant for this API server (audiences {0:?})")]
    Audience(Vec<String>),
}

/// An object a token names by name and uid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

/// The `kubernetes.io` claim: whose token this is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
}

/// The claims of a service account token, named as upstream names them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

impl Claims {
    /// The user name the token authenticates as.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.kubernetes.namespace, self.kubernetes.serviceaccount.name
        )
    }
}

/// Signs and checks service account tokens.
pub struct TokenIssuer {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenIssuer")
    }
}

impl TokenIssuer {
    pub fn from_secret(secret: &[u8]) -> TokenIssuer {
        TokenIssuer {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Reads the key at `path` (64 hex digits), making one (mode 0600) when there is none,
    /// so tokens survive a restart of the API server.
    pub fn load_or_create(path: &Path) -> Result<TokenIssuer, TokenError> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let file_err = |source| TokenError::KeyFile {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let secret = hex::decode(text.trim())
                    .ok()
                    .filter(|k| k.len() == 32)
                    .ok_or_else(|| TokenError::KeyContent {
                        path: path.to_path_buf(),
                    })?;
                Ok(TokenIssuer::from_secret(&secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret: [u8; 32] = rand::random();
                // Written beside and renamed, so a crash leaves no half key.
                let tmp = path.with_extension("tmp");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(file_err)?;
                f.write_all(hex::encode(secret).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(file_err)?;
                std::fs::rename(&tmp, path).map_err(file_err)?;
                Ok(TokenIssuer::from_secret(&secret))
            }
            Err(e) => Err(file_err(e)),
        }
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload =
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap_or_else(|_| b"{}".to_vec()));
        let signing_input = format!("{header}.{payload}");
        let tag = hmac::sign(&self.key, signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The token's claims if its signature is ours, it is valid at `now` (unix seconds)
    /// and it names [`API_AUDIENCE`]. Whether its service account still exists is the
    /// caller's check.
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let signing_input = &token[..header.len() + 1 + payload.len()];
        hmac::verify(&self.key, signing_input.as_bytes(), &signature)
            .map_err(|_| TokenError::Signature)?;
        let header: Value = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or(TokenError::Malformed("header is not base64url JSON"))?;
        if header["alg"] != "HS256" {
            return Err(TokenError::Malformed("unexpected algorithm"));
        }
        let claims: Claims = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|p| serde_json::from_slice(&p).ok())
            .ok_or(TokenError::Malformed("claims are not base64url JSON"))?;
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if now < claims.nbf {
            return Err(TokenError::NotYetValid);
        }
        if !claims.aud.iter().any(|a| a == API_AUDIENCE) {
            return Err(TokenError::Audience(claims.aud));
        }
        Ok(claims)
    }
}

/// The object a TokenRequest binds its token to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundObject {
    pub kind: String,
    pub name: String,
    pub uid: Option<String>,
}

/// A TokenRequest's spec, checked and defaulted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequestSpec {
    pub audiences: Vec<String>,
    pub expiration_seconds: i64,
    pub bound: Option<BoundObject>,
}

/// Checks a TokenRequest body as upstream validates it: an empty audience list means this
/// API server's audience; the lifetime defaults to an hour and must be between 10 minutes
/// and 2^32 seconds; a bound object must be a Pod (the only kind this server binds) with a
/// name.
pub fn parse_request(body: &Value, name: &str) -> Result<TokenRequestSpec, ApiError> {
    let invalid = |causes| ApiError::invalid("TokenRequest", "authentication.k8s.io", name, causes);
    let spec = &body["spec"];
    let mut causes = Vec::new();
    let audiences: Vec<String> = match &spec["audiences"] {
        Value::Null => Vec::new(),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .filter_map(|(i, a)| match a.as_str() {
                Some(s) if !s.is_empty() => Some(s.to_owned()),
                _ => {
                    causes.push(FieldError::invalid(
                        format!("spec.audiences[{i}]"),
                        &a.to_string(),
                        "must be a non-empty string",
                    ));
                    None
                }
            })
            .collect(),
        other => {
            causes.push(FieldError::invalid(
                "spec.audiences",
                &other.to_string(),
                "must be a list of strings",
            ));
            Vec::new()
        }
    };
    let audiences = if audiences.is_empty() {
        vec![API_AUDIENCE.to_owned()]
    } else {
        audiences
    };
    let expiration_seconds = match &spec["expirationSeconds"] {
        Value::Null => DEFAULT_EXPIRATION_SECONDS,
        v => match v.as_i64() {
            Some(s) if s < MIN_EXPIRATION_SECONDS => {
                causes.push(FieldError::invalid(
                    "spec.expirationSeconds",
                    &s.to_string(),
                    "may not specify a duration less than 10 minutes",
                ));
                s
            }
            Some(s) if s > MAX_EXPIRATION_SECONDS => {
                causes.push(FieldError::invalid(
                    "spec.expirationSeconds",
                    &s.to_string(),
                    "may not specify a duration larger than 2^32 seconds",
                ));
                s
            }
            Some(s) => s,
            None => {
                causes.push(FieldError::invalid(
                    "spec.expirationSeconds",
                    &v.to_string(),
                    "must be an integer",
                ));
                0
            }
        },
    };
    let bound = match &spec["boundObjectRef"] {
        Value::Null => None,
        r => {
            let kind = r["kind"].as_str().unwrap_or_default().to_owned();
            let bound_name = r["name"].as_str().unwrap_or_default().to_owned();
            if kind != "Pod" {
                causes.push(FieldError::not_supported(
                    "spec.boundObjectRef.kind",
                    &kind,
                    &["Pod"],
                ));
            }
            if bound_name.is_empty() {
                causes.push(FieldError::required("spec.boundObjectRef.name"));
            }
            Some(BoundObject {
                kind,
                name: bound_name,
                uid: r["uid"]
                    .as_str()
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned),
            })
        }
    };
    if !causes.is_empty() {
        return Err(invalid(causes));
    }
    Ok(TokenRequestSpec {
        audiences,
        expiration_seconds,
        bound,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claims(exp: i64, aud: &[&str]) -> Claims {
        Claims {
            iss: API_AUDIENCE.into(),
            sub: "system:serviceaccount:default:default".into(),
            aud: aud.iter().map(|a| (*a).to_owned()).collect(),
            exp,
            iat: exp - 3600,
            nbf: exp - 3600,
            kubernetes: KubernetesClaims {
                namespace: "default".into(),
                serviceaccount: ObjectRef {
                    name: "default".into(),
                    uid: "sa-uid".into(),
                },
                pod: Some(ObjectRef {
                    name: "web".into(),
                    uid: "pod-uid".into(),
                }),
            },
        }
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let issuer = TokenIssuer::from_secret(b"0123456789abcdef0123456789abcdef");
        let c = claims(10_000, &[API_AUDIENCE]);
        let token = issuer.sign(&c);
        assert_eq!(issuer.verify(&token, 9_999).expect("valid"), c);
        assert_eq!(
            c.clone().username(),
            "system:serviceaccount:default:default"
        );
        assert!(matches!(
            issuer.verify(&token, 10_000),
            Err(TokenError::Expired)
        ));
        assert!(matches!(
            issuer.verify(&token, 1_000),
            Err(TokenError::NotYetValid)
        ));
    }

    #[test]
    fn tampered_foreign_and_malformed_tokens_are_refused() {
        let issuer = TokenIssuer::from_secret(b"0123456789abcdef0123456789abcdef");
        let token = issuer.sign(&claims(10_000, &[API_AUDIENCE]));
        // Another namespace in the claims, old signature.
        let forged_claims = {
            let mut c = claims(10_000, &[API_AUDIENCE]);
            c.kubernetes.namespace = "kube-system".into();
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).expect("json"))
        };
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{forged_claims}.{}", parts[0], parts[2]);
        assert!(matches!(
            issuer.verify(&forged, 9_000),
            Err(TokenError::Signature)
        ));
        let other = TokenIssuer::from_secret(b"another key, another cluster....");
        assert!(matches!(
            other.verify(&token, 9_000),
            Err(TokenError::Signature)
        ));
        for bad in ["", "abc", "a.b", "a.b.c.d", "a.b.!!!"] {
            assert!(
                matches!(issuer.verify(bad, 9_000), Err(TokenError::Malformed(_))),
                "{bad:?} accepted"
            );
        }
        let vault = issuer.sign(&claims(10_000, &["vault"]));
        assert!(matches!(
            issuer.verify(&vault, 9_000),
            Err(TokenError::Audience(a)) if a == ["vault"]
        ));
    }

    #[test]
    fn the_key_is_made_once_kept_private_and_a_corrupt_one_is_an_error() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sa.key");
        let first = TokenIssuer::load_or_create(&path).expect("made");
        let mode = std::fs::metadata(&path).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let token = first.sign(&claims(10_000, &[API_AUDIENCE]));
        let again = TokenIssuer::load_or_create(&path).expect("read");
        assert!(
            again.verify(&token, 9_000).is_ok(),
            "key changed on restart"
        );
        std::fs::write(&path, "not hex").expect("write");
        let err = TokenIssuer::load_or_create(&path).expect_err("corrupt key");
        assert!(err.to_string().contains("64 hex digits"), "{err}");
    }

    #[test]
    fn token_requests_are_defaulted_and_checked_as_upstream_does() {
        let spec = parse_request(&json!({"spec": {}}), "default").expect("empty spec");
        assert_eq!(spec.audiences, [API_AUDIENCE]);
        assert_eq!(spec.expiration_seconds, 3600);
        assert_eq!(spec.bound, None);
        let spec = parse_request(&json!({"spec": {"audiences": []}}), "default")
            .expect("empty audience list");
        assert_eq!(spec.audiences, [API_AUDIENCE]);
        let spec = parse_request(
            &json!({"spec": {"audiences": ["vault"], "expirationSeconds": 600,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": "web", "uid": "u1"}}}),
            "default",
        )
        .expect("full spec");
        assert_eq!(spec.audiences, ["vault"]);
        assert_eq!(spec.expiration_seconds, 600);
        assert_eq!(
            spec.bound,
            Some(BoundObject {
                kind: "Pod".into(),
                name: "web".into(),
                uid: Some("u1".into()),
            })
        );
        for (body, field) in [
            (
                json!({"spec": {"expirationSeconds": 599}}),
                "less than 10 minutes",
            ),
            (
                json!({"spec": {"expirationSeconds": 5_000_000_000_i64}}),
                "larger than 2^32",
            ),
            (
                json!({"spec": {"expirationSeconds": "1h"}}),
                "must be an integer",
            ),
            (json!({"spec": {"audiences": [""]}}), "spec.audiences[0]"),
            (json!({"spec": {"audiences": "vault"}}), "list of strings"),
            (
                json!({"spec": {"boundObjectRef": {"kind": "Node", "name": "n1"}}}),
                "spec.boundObjectRef.kind",
            ),
            (
                json!({"spec": {"boundObjectRef": {"kind": "Pod"}}}),
                "spec.boundObjectRef.name",
            ),
        ] {
            let err = parse_request(&body, "default").expect_err(field);
            assert_eq!(err.code(), 422, "{body}");
            assert!(err.to_string().contains(field), "{body}: {err}");
        }
    }
}
