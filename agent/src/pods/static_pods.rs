//! Static pods: pods read from manifest files in a directory (`staticPodPath`) rather than
//! from the API, run by this agent alone, and shown in the API through a mirror pod that
//! carries their status. As upstream, a static pod's name gets the node name appended, its
//! uid is a hash of the manifest, and the mirror pod is marked with the
//! `kubernetes.io/config.mirror` annotation so no agent runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Pod;
use sha2::{Digest as _, Sha256};

pub const SOURCE: &str = "kubernetes.io/config.source";
pub const HASH: &str = "kubernetes.io/config.hash";
pub const MIRROR: &str = "kubernetes.io/config.mirror";

/// A manifest that cannot become a static pod.
#[derive(Debug, thiserror::Error)]
pub enum StaticPodError {
    #[error("static pod manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("static pod manifest {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// Whether `pod` is the API's mirror of a static pod (never run from the API).
pub fn is_mirror(pod: &Pod) -> bool {
    annotation(pod, MIRROR).is_some()
}

/// Whether `pod` came from a manifest file.
pub fn is_static(pod: &Pod) -> bool {
    annotation(pod, SOURCE) == Some("file")
}

/// The static pod a manifest describes, on node `node`.
pub fn from_manifest(path: &Path, text: &str, node: &str) -> Result<Pod, StaticPodError> {
    let invalid = |message: String| StaticPodError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let value: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| invalid(format!("not YAML or JSON: {e}")))?;
    let kind = value.get("kind").and_then(serde_yaml::Value::as_str);
    if kind != Some("Pod") {
        return Err(invalid(format!("kind is {kind:?}, want \"Pod\"")));
    }
    let mut pod: Pod =
        serde_yaml::from_value(value).map_err(|e| invalid(format!("not a Pod: {e}")))?;
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("metadata.name is missing".into()))?;
    if pod.spec.as_ref().is_none_or(|s| s.containers.is_empty()) {
        return Err(invalid("spec.containers is empty".into()));
    }
    let mut hasher = Sha256::new();
    hasher.update(node.as_bytes());
    hasher.update([0]);
    hasher.update(path.as_os_str().as_encoded_bytes());
    hasher.update([0]);
    hasher.update(text.as_bytes());
    let hash: String = hasher
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    pod.metadata.name = Some(format!("{name}-{node}"));
    pod.metadata.namespace = Some(
        pod.metadata
            .namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
    );
    pod.metadata.uid = Some(hash.clone());
    pod.metadata.resource_version = None;
    let annotations = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(SOURCE.into(), "file".into());
    annotations.insert(HASH.into(), hash);
    if let Some(spec) = pod.spec.as_mut() {
        spec.node_name = Some(node.to_owned());
    }
    pod.status = None;
    Ok(pod)
}

/// Every static pod in `dir` (files ending in .yaml, .yml or .json; hidden files
/// skipped), and the errors of the manifests that are not pods. A missing dir has none.
pub fn load_dir(dir: &Path, node: &str) -> (Vec<Pod>, Vec<StaticPodError>) {
    let mut pods = Vec::new();
    let mut errors = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (pods, errors);
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default();
            !name.starts_with('.')
                && [".yaml", ".yml", ".json"]
                    .iter()
                    .any(|ext| name.ends_with(ext))
        })
        .collect();
    paths.sort();
    for path in paths {
        match std::fs::read_to_string(&path) {
            Ok(text) => match from_manifest(&path, &text, node) {
                Ok(pod) => pods.push(pod),
                Err(e) => errors.push(e),
            },
            Err(source) => errors.push(StaticPodError::Read { path, source }),
        }
    }
    (pods, errors)
}

/// The mirror pod to create in the API for static pod `pod`.
pub fn mirror_of(pod: &Pod) -> Pod {
    let mut mirror = pod.clone();
    mirror.metadata.uid = None;
    mirror.metadata.resource_version = None;
    let hash = annotation(pod, HASH).unwrap_or_default().to_owned();
    mirror
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(MIRROR.into(), hash);
    mirror.status = None;
    mirror
}
