//! The subset of a kubeconfig file the agent needs: the current context's server, CA and
//! credentials (client certificate and key, or a bearer token), with `*-data` fields inline
//! or file paths relative to the kubeconfig's own directory, as kubectl reads them.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

/// Why a kubeconfig could not be used; each names the file and what is wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("reading kubeconfig {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing kubeconfig {path}: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("kubeconfig {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct File {
    #[serde(default)]
    clusters: Vec<Named<ClusterEntry>>,
    #[serde(default)]
    users: Vec<Named<UserEntry>>,
    #[serde(default)]
    contexts: Vec<Named<ContextEntry>>,
    current_context: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: T,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterEntry {
    server: Option<String>,
    certificate_authority: Option<PathBuf>,
    certificate_authority_data: Option<String>,
    #[serde(default)]
    insecure_skip_tls_verify: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct UserEntry {
    client_certificate: Option<PathBuf>,
    client_certificate_data: Option<String>,
    client_key: Option<PathBuf>,
    client_key_data: Option<String>,
    token: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
struct ContextEntry {
    cluster: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// What the client needs from a kubeconfig, resolved: PEM bytes, not paths.
#[derive(Clone)]
pub struct Kubeconfig {
    /// `https://host:port`, without a trailing slash.
    pub server: String,
    /// CA bundle (PEM) that signs the server's certificate.
    pub ca_pem: Option<Vec<u8>>,
    pub insecure_skip_tls_verify: bool,
    /// Client certificate followed by its key (PEM), as one identity.
    pub identity_pem: Option<Vec<u8>>,
    pub token: Option<String>,
    pub namespace: Option<String>,
}

impl std::fmt::Debug for Kubeconfig {
    // Keys and tokens are secrets: never in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kubeconfig")
            .field("server", &self.server)
            .field("ca", &self.ca_pem.is_some())
            .field("insecure_skip_tls_verify", &self.insecure_skip_tls_verify)
            .field(
                "identity",
                &self.identity_pem.as_ref().map(|_| "<redacted>"),
            )
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Kubeconfig {
    /// Reads and resolves the kubeconfig at `path`.
    pub fn load(path: &Path) -> Result<Kubeconfig, KubeconfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| KubeconfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Kubeconfig::parse(&text, path)
    }

    /// Resolves kubeconfig text; relative file names are taken from `path`'s directory.
    pub fn parse(text: &str, path: &Path) -> Result<Kubeconfig, KubeconfigError> {
        let invalid = |message: String| KubeconfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: File = serde_yaml::from_str(text).map_err(|source| KubeconfigError::Parse {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let context = match &file.current_context {
            Some(name) => file
                .contexts
                .iter()
                .find(|c| &c.name == name)
                .map(|c| &c.value)
                .ok_or_else(|| invalid(format!("current-context {name:?} is not in contexts")))?,
            None => match file.contexts.as_slice() {
                [only] => &only.value,
                [] => return Err(invalid("no contexts".into())),
                _ => return Err(invalid("several contexts and no current-context".into())),
            },
        };
        let cluster = file
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .map(|c| &c.value)
            .ok_or_else(|| invalid(format!("cluster {:?} is not in clusters", context.cluster)))?;
        let user = match &context.user {
            Some(name) => Some(
                file.users
                    .iter()
                    .find(|u| &u.name == name)
                    .map(|u| &u.value)
                    .ok_or_else(|| invalid(format!("user {name:?} is not in users")))?,
            ),
            None => None,
        };
        let server = cluster
            .server
            .clone()
            .ok_or_else(|| invalid(format!("cluster {:?} has no server", context.cluster)))?;
        if !server.starts_with("https://") && !server.starts_with("http://") {
            return Err(invalid(format!("server {server:?} is not an http(s) URL")));
        }
        let ca_pem = data_or_file(
            cluster.certificate_authority_data.as_deref(),
            cluster.certificate_authority.as_deref(),
            base,
            "certificate-authority",
        )
        .map_err(invalid)?;
        let mut identity_pem = None;
        let mut token = None;
        if let Some(user) = user {
            let cert = data_or_file(
                user.client_certificate_data.as_deref(),
                user.client_certificate.as_deref(),
                base,
                "client-certificate",
            )
            .map_err(invalid)?;
            let key = data_or_file(
                user.client_key_data.as_deref(),
                user.client_key.as_deref(),
                base,
                "client-key",
            )
            .map_err(invalid)?;
            identity_pem = match (cert, key) {
                (Some(mut cert), Some(key)) => {
                    if !cert.ends_with(b"\n") {
                        cert.push(b'\n');
                    }
                    cert.extend_from_slice(&key);
                    Some(cert)
                }
                (None, None) => None,
                _ => {
                    return Err(invalid(
                        "client-certificate and client-key must be given together".into(),
                    ));
                }
            };
            token = match (&user.token, &user.token_file) {
                (Some(t), _) => Some(t.clone()),
                (None, Some(file)) => {
                    let file = base.join(file);
                    let t = std::fs::read_to_string(&file).map_err(|e| {
                        invalid(format!("reading token-file {}: {e}", file.display()))
                    })?;
                    Some(t.trim().to_owned())
                }
                (None, None) => None,
            };
        }
        Ok(Kubeconfig {
            server: server.trim_end_matches('/').to_owned(),
            ca_pem,
            insecure_skip_tls_verify: cluster.insecure_skip_tls_verify,
            identity_pem,
            token,
            namespace: context.namespace.clone(),
        })
    }
}

fn data_or_file(
    data: Option<&str>,
    file: Option<&Path>,
    base: &Path,
    field: &str,
) -> Result<Option<Vec<u8>>, String> {
    if let Some(data) = data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| format!("{field}-data is not base64: {e}"))?;
        return Ok(Some(bytes));
    }
    match file {
        Some(file) => {
            let file = base.join(file);
            std::fs::read(&file)
                .map(Some)
                .map_err(|e| format!("reading {field} {}: {e}", file.display()))
        }
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn inline_data_and_current_context_resolve() {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:6443/\n    certificate-authority-data: {}\nusers:\n- name: u\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n    namespace: ns\ncurrent-context: x\n",
            b64("CA"),
            b64("CERT"),
            b64("KEY")
        );
        let k = Kubeconfig::parse(&text, Path::new("/k/config")).expect("valid");
        assert_eq!(k.server, "https://127.0.0.1:6443");
        assert_eq!(k.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert_eq!(k.identity_pem.as_deref(), Some(&b"CERT\nKEY"[..]));
        assert_eq!(k.namespace.as_deref(), Some("ns"));
        assert!(
            !format!("{k:?}").contains("KEY"),
            "Debug must redact the key"
        );
    }

    #[test]
    fn relative_files_and_token_file_are_read_from_the_kubeconfig_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ca.pem"), "CA").expect("write");
        std::fs::write(dir.path().join("token"), "secret\n").expect("write");
        let text = "clusters:\n- name: c\n  cluster:\n    server: https://h:1\n    certificate-authority: ca.pem\nusers:\n- name: u\n  user:\n    token-file: token\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n";
        let k = Kubeconfig::parse(text, &dir.path().join("kubeconfig")).expect("valid");
        assert_eq!(k.ca_pem.as_deref(), Some(&b"CA"[..]));
        assert_eq!(k.token.as_deref(), Some("secret"));
    }

    #[test]
    fn bad_kubeconfigs_name_what_is_wrong() {
        let cases = [
            ("clusters: []\ncontexts: []\n", "no contexts"),
            (
                "contexts:\n- name: x\n  context:\n    cluster: c\ncurrent-context: y\n",
                "current-context \"y\"",
            ),
            (
                "contexts:\n- name: x\n  context:\n    cluster: c\n",
                "cluster \"c\" is not in clusters",
            ),
            (
                "clusters:\n- name: c\n  cluster:\n    server: h:1\ncontexts:\n- name: x\n  context:\n    cluster: c\n",
                "not an http(s) URL",
            ),
            (
                "clusters:\n- name: c\n  cluster:\n    server: https://h\n    certificate-authority-data: '!!'\ncontexts:\n- name: x\n  context:\n    cluster: c\n",
                "certificate-authority-data is not base64",
            ),
            (
                "clusters:\n- name: c\n  cluster:\n    server: https://h\nusers:\n- name: u\n  user:\n    client-certificate-data: Q0VSVA==\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: u\n",
                "given together",
            ),
            ("clusters: 7\n", "parsing kubeconfig"),
        ];
        for (text, want) in cases {
            let err = Kubeconfig::parse(text, Path::new("/k/config"))
                .expect_err(text)
                .to_string();
            assert!(err.contains(want), "{text:?}: {err} lacks {want:?}");
            assert!(err.contains("/k/config"), "{err}");
        }
    }
}
