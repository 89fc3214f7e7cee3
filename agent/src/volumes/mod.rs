//! Pod volumes made ready on the host before containers start: emptyDir, hostPath,
//! configMap, secret, downwardAPI and projected. API-backed volumes are rewritten on every
//! sync, each file replaced by rename, so an updated ConfigMap reaches running containers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume,
};

use crate::api::{Api, ApiError};
use crate::pods::spec::HostVolume;

/// A volume that could not be made ready; names the volume and the cause.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {volume}: {path}: {source}")]
    Io {
        volume: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume {volume}: {message}")]
    Invalid { volume: String, message: String },
    #[error("volume {volume}: {kind} {namespace}/{name} not found")]
    Missing {
        volume: String,
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("volume {volume}: {source}")]
    Api { volume: String, source: ApiError },
}

fn io(volume: &str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let volume = volume.to_owned();
    let path = path.to_path_buf();
    move |source| VolumeError::Io {
        volume,
        path,
        source,
    }
}

/// The directory that holds the pod's volumes of one kind.
fn kind_dir(pod_dir: &Path, kind: &str) -> PathBuf {
    pod_dir.join("volumes").join(kind)
}

/// Makes every volume of `pod` ready under `pod_dir` and returns them by name.
pub async fn prepare<A: Api>(
    api: &A,
    pod: &Pod,
    pod_dir: &Path,
) -> Result<HashMap<String, HostVolume>, VolumeError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut out = HashMap::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for volume in &volumes {
        let host = prepare_one(api, pod, namespace, volume, pod_dir).await?;
        out.insert(volume.name.clone(), host);
    }
    Ok(out)
}

async fn prepare_one<A: Api>(
    api: &A,
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
    pod_dir: &Path,
) -> Result<HostVolume, VolumeError> {
    let name = &volume.name;
    if name.is_empty() || name.contains('/') || name == ".." {
        return Err(VolumeError::Invalid {
            volume: name.clone(),
            message: "volume name must be a DNS label".into(),
        });
    }
    if volume.empty_dir.is_some() {
        let path = kind_dir(pod_dir, "empty-dir").join(name);
        std::fs::create_dir_all(&path).map_err(io(name, &path))?;
        return Ok(HostVolume {
            path,
            read_only: false,
        });
    }
    if let Some(hp) = &volume.host_path {
        let path = PathBuf::from(&hp.path);
        host_path(name, &path, hp.type_.as_deref().unwrap_or(""))?;
        return Ok(HostVolume {
            path,
            read_only: false,
        });
    }
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let dir;
    if let Some(cm) = &volume.config_map {
        dir = kind_dir(pod_dir, "configmap").join(name);
        config_map_files(
            api,
            name,
            namespace,
            &cm.name,
            cm.items.as_deref(),
            cm.optional.unwrap_or(false),
            &mut files,
        )
        .await?;
    } else if let Some(s) = &volume.secret {
        dir = kind_dir(pod_dir, "secret").join(name);
        let secret_name = s.secret_name.clone().unwrap_or_default();
        secret_files(
            api,
            name,
            namespace,
            &secret_name,
            s.items.as_deref(),
            s.optional.unwrap_or(false),
            &mut files,
        )
        .await?;
    } else if let Some(d) = &volume.downward_api {
        dir = kind_dir(pod_dir, "downward-api").join(name);
        downward_files(
            name,
            pod,
            d.items.as_deref().unwrap_or_default(),
            &mut files,
        )?;
    } else if let Some(p) = &volume.projected {
        dir = kind_dir(pod_dir, "projected").join(name);
        for source in p.sources.iter().flatten() {
            if let Some(cm) = &source.config_map {
                config_map_files(
                    api,
                    name,
                    namespace,
                    &cm.name,
                    cm.items.as_deref(),
                    cm.optional.unwrap_or(false),
                    &mut files,
                )
                .await?;
            }
            if let Some(s) = &source.secret {
                secret_files(
                    api,
                    name,
                    namespace,
                    &s.name,
                    s.items.as_deref(),
                    s.optional.unwrap_or(false),
                    &mut files,
                )
                .await?;
            }
            if let Some(d) = &source.downward_api {
                downward_files(
                    name,
                    pod,
                    d.items.as_deref().unwrap_or_default(),
                    &mut files,
                )?;
            }
        }
    } else {
        return Err(VolumeError::Invalid {
            volume: name.clone(),
            message: "volume type is not supported by this agent".into(),
        });
    }
    write_files(name, &dir, &files)?;
    Ok(HostVolume {
        path: dir,
        read_only: true,
    })
}

fn host_path(volume: &str, path: &Path, kind: &str) -> Result<(), VolumeError> {
    use std::os::unix::fs::FileTypeExt as _;
    if !path.is_absolute() {
        return Err(VolumeError::Invalid {
            volume: volume.into(),
            message: format!("hostPath {} is not absolute", path.display()),
        });
    }
    let meta = std::fs::metadata(path);
    let wrong = |want: &str| VolumeError::Invalid {
        volume: volume.into(),
        message: format!("hostPath {} is not a {want}", path.display()),
    };
    match kind {
        "" => Ok(()),
        "DirectoryOrCreate" => std::fs::create_dir_all(path).map_err(io(volume, path)),
        "FileOrCreate" => {
            if meta.is_err() {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io(volume, parent))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(io(volume, path))?;
            }
            Ok(())
        }
        "Directory" => meta
            .ok()
            .filter(std::fs::Metadata::is_dir)
            .map(|_| ())
            .ok_or_else(|| wrong("directory")),
        "File" => meta
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|_| ())
            .ok_or_else(|| wrong("file")),
        "Socket" => meta
            .ok()
            .filter(|m| m.file_type().is_socket())
            .map(|_| ())
            .ok_or_else(|| wrong("socket")),
        "CharDevice" => meta
            .ok()
            .filter(|m| m.file_type().is_char_device())
            .map(|_| ())
            .ok_or_else(|| wrong("character device")),
        "BlockDevice" => meta
            .ok()
            .filter(|m| m.file_type().is_block_device())
            .map(|_| ())
            .ok_or_else(|| wrong("block device")),
        other => Err(VolumeError::Invalid {
            volume: volume.into(),
            message: format!("hostPath type {other:?} is unknown"),
        }),
    }
}

fn select_items(
    volume: &str,
    data: BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    files: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), VolumeError> {
    match items {
        None => files.extend(data),
        Some(items) => {
            for item in items {
                let value = data.get(&item.key).ok_or_else(|| VolumeError::Invalid {
                    volume: volume.into(),
                    message: format!("key {:?} is not in the source", item.key),
                })?;
                files.insert(item.path.clone(), value.clone());
            }
        }
    }
    Ok(())
}

async fn config_map_files<A: Api>(
    api: &A,
    volume: &str,
    namespace: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: bool,
    files: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), VolumeError> {
    let cm: Option<ConfigMap> =
        api.get(Some(namespace), name)
            .await
            .map_err(|source| VolumeError::Api {
                volume: volume.into(),
                source,
            })?;
    let Some(cm) = cm else {
        if optional {
            return Ok(());
        }
        return Err(VolumeError::Missing {
            volume: volume.into(),
            kind: "configmap",
            namespace: namespace.into(),
            name: name.into(),
        });
    };
    let mut data: BTreeMap<String, Vec<u8>> = cm
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.into_bytes()))
        .collect();
    data.extend(
        cm.binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0)),
    );
    select_items(volume, data, items, files)
}

async fn secret_files<A: Api>(
    api: &A,
    volume: &str,
    namespace: &str,
    name: &str,
    items: Option<&[KeyToPath]>,
    optional: bool,
    files: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), VolumeError> {
    let secret: Option<Secret> =
        api.get(Some(namespace), name)
            .await
            .map_err(|source| VolumeError::Api {
                volume: volume.into(),
                source,
            })?;
    let Some(secret) = secret else {
        if optional {
            return Ok(());
        }
        return Err(VolumeError::Missing {
            volume: volume.into(),
            kind: "secret",
            namespace: namespace.into(),
            name: name.into(),
        });
    };
    let mut data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.0))
        .collect();
    data.extend(
        secret
            .string_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes())),
    );
    select_items(volume, data, items, files)
}

/// The value of a `fieldRef` path such as `metadata.labels['app']`, for env and downwardAPI.
pub fn field_value(pod: &Pod, path: &str) -> Option<String> {
    let meta = &pod.metadata;
    let map_entry = |map: &Option<BTreeMap<String, String>>, prefix: &str| {
        let key = path
            .strip_prefix(prefix)?
            .strip_prefix("['")?
            .strip_suffix("']")?;
        map.as_ref()?.get(key).cloned()
    };
    let all = |map: &Option<BTreeMap<String, String>>| {
        map.iter()
            .flatten()
            .map(|(k, v)| format!("{k}={v:?}\n"))
            .collect::<String>()
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    match path {
        "metadata.name" => meta.name.clone(),
        "metadata.namespace" => meta.namespace.clone(),
        "metadata.uid" => meta.uid.clone(),
        "metadata.labels" => Some(all(&meta.labels)),
        "metadata.annotations" => Some(all(&meta.annotations)),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()),
        "spec.serviceAccountName" => spec.and_then(|s| s.service_account_name.clone()),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        "status.podIPs" => status.and_then(|s| {
            s.pod_ips.as_ref().map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
        }),
        "status.hostIPs" => status.and_then(|s| {
            s.host_ips.as_ref().map(|ips| {
                ips.iter()
                    .map(|i| i.ip.clone())
                    .collect::<Vec<_>>()
                    .join(",")
            })
        }),
        _ => map_entry(&meta.labels, "metadata.labels")
            .or_else(|| map_entry(&meta.annotations, "metadata.annotations")),
    }
}

fn downward_files(
    volume: &str,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    files: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), VolumeError> {
    for item in items {
        let Some(field) = &item.field_ref else {
            return Err(VolumeError::Invalid {
                volume: volume.into(),
                message: format!(
                    "downwardAPI item {:?}: only fieldRef is supported",
                    item.path
                ),
            });
        };
        let value = field_value(pod, &field.field_path).ok_or_else(|| VolumeError::Invalid {
            volume: volume.into(),
            message: format!("fieldRef {:?} is not supported", field.field_path),
        })?;
        files.insert(item.path.clone(), value.into_bytes());
    }
    Ok(())
}

/// Writes `files` under `dir`, each replaced atomically by rename; removes files no longer
/// in the set. Paths must be relative and stay inside `dir`.
fn write_files(
    volume: &str,
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(io(volume, dir))?;
    for (rel, content) in files {
        let rel_path = Path::new(rel);
        if rel.is_empty()
            || !rel_path
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
            || rel_path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
        {
            return Err(VolumeError::Invalid {
                volume: volume.into(),
                message: format!("file path {rel:?} must be relative and stay in the volume"),
            });
        }
        let path = dir.join(rel_path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(volume, parent))?;
        }
        if std::fs::read(&path).is_ok_and(|old| &old == content) {
            continue;
        }
        let tmp = path.with_file_name(format!(
            "..tmp.{}",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ));
        std::fs::write(&tmp, content).map_err(io(volume, &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(volume, &path))?;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let keep = files
                .keys()
                .any(|k| k == &name || k.starts_with(&format!("{name}/")));
            if !keep && entry.file_type().is_ok_and(|t| t.is_file()) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

/// Removes the pod's volume directories (hostPath volumes are not under it).
pub fn cleanup(pod_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(pod_dir.join("volumes")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
