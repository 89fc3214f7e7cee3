//! Pulling images from OCI distribution registries (Docker registry API v2).
//!
//! The manifest (through an index or manifest list, picking this host's platform), the config
//! and the layers are downloaded into a temporary OCI layout, which is then imported like any
//! local image: the layout reader checks every blob against its digest and size, so a
//! corrupt or tampered download is refused and nothing of it is kept. Layers download
//! concurrently; concurrent pulls of the same reference are done once.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ferrolet_oci_image::ImageReference;
use serde::Deserialize;
use sha2::Digest as _;

use super::{ImageError, ImageRecord, ImageStore, normalize};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Errors of a pull.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference: {0}")]
    Reference(#[source] ImageError),
    #[error("{url}: {message}")]
    Http { url: String, message: String },
    #[error("{url}: registry answered {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("manifest of {reference} has digest {actual}, expected {expected}")]
    ManifestDigest {
        reference: String,
        expected: String,
        actual: String,
    },
    #[error("{reference}: {message}")]
    Manifest { reference: String, message: String },
    #[error("image {reference} has no manifest for linux/{arch}")]
    NoPlatform { reference: String, arch: String },
    #[error("write pulled blobs to {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("import pulled image: {0}")]
    Import(#[source] ImageError),
}

/// Credentials from the CRI `AuthConfig`.
#[derive(Clone, Default)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// A bearer token to use as is (`registry_token` / `identity_token`).
    pub token: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

#[derive(Debug, Deserialize)]
struct ManifestDoc {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    #[serde(default)]
    manifests: Vec<Descriptor>,
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// Serialises pulls per reference.
#[derive(Debug, Default)]
pub struct PullLocks {
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl PullLocks {
    fn lock_for(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self
            .locks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(key.to_string()).or_default().clone()
    }
}

fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

/// Registries on loopback are spoken to over plain HTTP, all others over HTTPS.
fn base_url(domain: &str) -> String {
    let host = domain.rsplit_once(':').map_or(domain, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let domain = if domain == "docker.io" {
        "registry-1.docker.io"
    } else {
        domain
    };
    if loopback {
        format!("http://{domain}")
    } else {
        format!("https://{domain}")
    }
}

/// Parses `Bearer realm="...",service="...",scope="..."` into its parameters.
fn parse_challenge(header: &str) -> Option<(String, HashMap<String, String>)> {
    let (scheme, rest) = header.trim().split_once(' ')?;
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], q[end + 1..].trim_start_matches(',').trim_start())
        } else {
            match after.split_once(',') {
                Some((v, n)) => (v, n.trim_start()),
                None => (after, ""),
            }
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_string());
        rest = next;
    }
    Some((scheme.to_ascii_lowercase(), params))
}

struct Session {
    client: reqwest::Client,
    base: String,
    repo: String,
    creds: Credentials,
    auth: Option<String>,
}

impl Session {
    async fn get(
        &mut self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<reqwest::Response, PullError> {
        let url = format!("{}/v2/{}/{path}", self.base, self.repo);
        let mut retried = false;
        loop {
            let mut req = self.client.get(&url);
            if let Some(a) = accept {
                req = req.header("Accept", a);
            }
            if let Some(auth) = &self.auth {
                req = req.header("Authorization", auth);
            }
            let resp = req.send().await.map_err(|e| PullError::Http {
                url: url.clone(),
                message: e.to_string(),
            })?;
            if resp.status().as_u16() == 401 && !retried {
                retried = true;
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                self.authenticate(&url, &challenge).await?;
                continue;
            }
            if !resp.status().is_success() {
                let status = resp.status().as_u16();
                let body = resp.text().await.unwrap_or_default();
                return Err(PullError::Status {
                    url,
                    status,
                    body: body.chars().take(300).collect(),
                });
            }
            return Ok(resp);
        }
    }

    async fn authenticate(&mut self, url: &str, challenge: &str) -> Result<(), PullError> {
        if !self.creds.token.is_empty() {
            self.auth = Some(format!("Bearer {}", self.creds.token));
            return Ok(());
        }
        let err = |message: String| PullError::Http {
            url: url.to_string(),
            message,
        };
        let (scheme, params) = parse_challenge(challenge)
            .ok_or_else(|| err(format!("unauthorized: {challenge:?}")))?;
        let basic = || {
            use std::io::Write as _;
            let mut raw = Vec::new();
            let _ = write!(raw, "{}:{}", self.creds.username, self.creds.password);
            format!("Basic {}", base64(&raw))
        };
        if scheme == "basic" {
            if self.creds.username.is_empty() {
                return Err(err(
                    "the registry wants credentials and none were given".into()
                ));
            }
            self.auth = Some(basic());
            return Ok(());
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| err(format!("bearer challenge without realm: {challenge:?}")))?;
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(s) = params.get("service") {
            query.push(("service", s.clone()));
        }
        query.push((
            "scope",
            params
                .get("scope")
                .cloned()
                .unwrap_or_else(|| format!("repository:{}:pull", self.repo)),
        ));
        let qs: Vec<String> = query
            .iter()
            .map(|(k, v)| format!("{k}={}", url_encode(v)))
            .collect();
        let sep = if realm.contains('?') { '&' } else { '?' };
        let mut req = self.client.get(format!("{realm}{sep}{}", qs.join("&")));
        if !self.creds.username.is_empty() {
            req = req.header("Authorization", basic());
        }
        let resp = req
            .send()
            .await
            .map_err(|e| err(format!("token request: {e}")))?;
        if !resp.status().is_success() {
            return Err(err(format!("token request answered {}", resp.status())));
        }
        let v: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| err(format!("token response: {e}")))?;
        let token = v["token"]
            .as_str()
            .or_else(|| v["access_token"].as_str())
            .ok_or_else(|| err("token response has no token".into()))?;
        self.auth = Some(format!("Bearer {token}"));
        Ok(())
    }

    async fn bytes(
        &mut self,
        path: &str,
        accept: Option<&str>,
    ) -> Result<(Vec<u8>, String), PullError> {
        let resp = self.get(path, accept).await?;
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let url = format!("{}/v2/{}/{path}", self.base, self.repo);
        let body = resp.bytes().await.map_err(|e| PullError::Http {
            url,
            message: e.to_string(),
        })?;
        Ok((body.to_vec(), ct))
    }
}

/// Percent-encodes a query value (RFC 3986 unreserved characters stay).
fn url_encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

fn blob_path(layout: &Path, digest: &str) -> std::path::PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap_or(digest))
}

fn is_index(media_type: &str, doc: &ManifestDoc) -> bool {
    media_type.contains("index")
        || media_type.contains("manifest.list")
        || !doc.manifests.is_empty()
}

/// Safe as a file name: `sha256:` and 64 hex digits.
fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl ImageStore {
    /// Pulls `reference` from its registry into the store.
    pub async fn pull(
        self: &Arc<Self>,
        locks: &PullLocks,
        reference: &str,
        creds: Credentials,
    ) -> Result<ImageRecord, PullError> {
        let r = normalize(reference).map_err(PullError::Reference)?;
        let key = r.to_string();
        let lock = locks.lock_for(&key);
        let _guard = lock.lock().await;
        if let Some(rec) = self.resolve(&key) {
            return Ok(rec);
        }
        let scratch = tempfile::Builder::new()
            .prefix("pull-")
            .tempdir_in(self.root().join("tmp"))
            .map_err(|source| PullError::Io {
                path: self.root().join("tmp"),
                source,
            })?;
        let layout = scratch.path().to_path_buf();
        self.download(&r, creds, &layout).await?;
        let store = self.clone();
        let imported = tokio::task::spawn_blocking(move || store.import(&layout))
            .await
            .map_err(|e| PullError::Import(ImageError::Pause(e.to_string())))?
            .map_err(PullError::Import)?;
        drop(scratch);
        imported
            .into_iter()
            .next()
            .ok_or_else(|| PullError::Manifest {
                reference: key,
                message: "the pulled layout held no image".into(),
            })
    }

    async fn download(
        &self,
        r: &ImageReference,
        creds: Credentials,
        layout: &Path,
    ) -> Result<(), PullError> {
        let reference = r.to_string();
        let domain = r.domain().unwrap_or("docker.io").to_string();
        let client = reqwest::Client::builder()
            .build()
            .map_err(|e| PullError::Http {
                url: domain.clone(),
                message: e.to_string(),
            })?;
        let mut s = Session {
            client,
            base: base_url(&domain),
            repo: r.path().to_string(),
            creds,
            auth: None,
        };
        let wanted = match (r.digest(), r.tag()) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".to_string(),
        };
        let (mut bytes, mut ct) = s
            .bytes(&format!("manifests/{wanted}"), Some(ACCEPT))
            .await?;
        if let Some(d) = r.digest() {
            let actual = sha256_digest(&bytes);
            if actual != d.to_string() {
                return Err(PullError::ManifestDigest {
                    reference,
                    expected: d.to_string(),
                    actual,
                });
            }
        }
        let bad = |message: String| PullError::Manifest {
            reference: reference.clone(),
            message,
        };
        let mut doc: ManifestDoc = serde_json::from_slice(&bytes)
            .map_err(|e| bad(format!("manifest is not JSON: {e}")))?;
        if is_index(
            if doc.media_type.is_empty() {
                &ct
            } else {
                &doc.media_type
            },
            &doc,
        ) {
            let arch = go_arch();
            let pick = doc
                .manifests
                .iter()
                .find(|m| {
                    m.platform
                        .as_ref()
                        .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                })
                .ok_or_else(|| PullError::NoPlatform {
                    reference: reference.clone(),
                    arch: arch.to_string(),
                })?;
            let digest = pick.digest.clone();
            if !valid_digest(&digest) {
                return Err(bad(format!("invalid digest {digest:?}")));
            }
            (bytes, ct) = s
                .bytes(&format!("manifests/{digest}"), Some(ACCEPT))
                .await?;
            let actual = sha256_digest(&bytes);
            if actual != digest {
                return Err(PullError::ManifestDigest {
                    reference,
                    expected: digest,
                    actual,
                });
            }
            doc = serde_json::from_slice(&bytes)
                .map_err(|e| bad(format!("manifest is not JSON: {e}")))?;
        }
        let media_type = if doc.media_type.is_empty() {
            ct.split(';').next().unwrap_or_default().trim().to_string()
        } else {
            doc.media_type.clone()
        };
        let config = doc
            .config
            .as_ref()
            .ok_or_else(|| bad("manifest has no config".into()))?;
        let mut blobs: Vec<&Descriptor> = vec![config];
        blobs.extend(doc.layers.iter());
        for b in &blobs {
            if !valid_digest(&b.digest) {
                return Err(bad(format!("invalid digest {:?}", b.digest)));
            }
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| PullError::Io { path, source }
        };
        let dir = layout.join("blobs/sha256");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        // Blobs download concurrently, each on its own connection of the client's pool.
        let base = s.base.clone();
        let repo = s.repo.clone();
        let auth = s.auth.clone();
        let client = s.client.clone();
        let fetches = blobs.iter().map(|b| {
            let url = format!("{base}/v2/{repo}/blobs/{}", b.digest);
            let path = blob_path(layout, &b.digest);
            let client = client.clone();
            let auth = auth.clone();
            async move {
                use futures::StreamExt;
                use tokio::io::AsyncWriteExt;
                let mut req = client.get(&url);
                if let Some(a) = &auth {
                    req = req.header("Authorization", a);
                }
                let resp = req.send().await.map_err(|e| PullError::Http {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
                if !resp.status().is_success() {
                    return Err(PullError::Status {
                        url,
                        status: resp.status().as_u16(),
                        body: String::new(),
                    });
                }
                let mut file = tokio::fs::File::create(&path).await.map_err(io(&path))?;
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| PullError::Http {
                        url: url.clone(),
                        message: e.to_string(),
                    })?;
                    file.write_all(&chunk).await.map_err(io(&path))?;
                }
                file.flush().await.map_err(io(&path))?;
                Ok::<(), PullError>(())
            }
        });
        for r in futures::future::join_all(fetches).await {
            r?;
        }
        let manifest_digest = sha256_digest(&bytes);
        let mpath = blob_path(layout, &manifest_digest);
        std::fs::write(&mpath, &bytes).map_err(io(&mpath))?;
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": media_type,
                "digest": manifest_digest,
                "size": bytes.len(),
                "annotations": {
                    "io.containerd.image.name": reference,
                    "org.opencontainers.image.ref.name": r.tag().unwrap_or("latest"),
                }
            }]
        });
        let ipath = layout.join("index.json");
        std::fs::write(&ipath, index.to_string()).map_err(io(&ipath))?;
        let lpath = layout.join("oci-layout");
        std::fs::write(&lpath, r#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&lpath))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_are_parsed() {
        let (scheme, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull""#,
        )
        .unwrap();
        assert_eq!(scheme, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull");
        let (scheme, p) = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(
            (scheme.as_str(), p["realm"].as_str()),
            ("basic", "Registry Realm")
        );
        assert!(parse_challenge("garbage").is_none());
    }

    #[test]
    fn loopback_registries_use_plain_http() {
        assert_eq!(base_url("127.0.0.1:5000"), "http://127.0.0.1:5000");
        assert_eq!(base_url("localhost:5000"), "http://localhost:5000");
        assert_eq!(base_url("[::1]:5000"), "http://[::1]:5000");
        assert_eq!(base_url("registry.example"), "https://registry.example");
        assert_eq!(base_url("docker.io"), "https://registry-1.docker.io");
    }

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b""), "");
        assert_eq!(
            url_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }

    #[test]
    fn digests_are_checked_before_use_as_file_names() {
        assert!(valid_digest(&format!("sha256:{}", "a".repeat(64))));
        assert!(!valid_digest("sha256:../../etc"));
        assert!(!valid_digest("md5:abc"));
    }
}
