//! Pod volumes made ready on the host before containers start: emptyDir (on disk, or on a
//! tmpfs for `medium: Memory`), hostPath, configMap, secret and projected (on a tmpfs the
//! agent mounts under the pod dir and unmounts at teardown), downwardAPI. API-backed
//! volumes are checked on every sync and swapped atomically ([`atomic`]) when their
//! source changed, so an updated ConfigMap reaches running containers all at once.
//! Projected service account tokens come from the API's TokenRequest and are replaced the
//! same way once 80% of their lifetime has passed ([`token`]).

pub mod atomic;
pub mod mount;
pub mod resource_field;
pub mod token;

pub use mount::{FakeMounter, HostMounter, Mounter};

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume,
};

use crate::api::{Api, ApiError};
use crate::config::Quantity;
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
/// `allocatable` is the node's, for `resourceFieldRef` limits the containers do not set.
pub async fn prepare<A: Api>(
    api: &A,
    mounter: &dyn Mounter,
    pod: &Pod,
    pod_dir: &Path,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<HashMap<String, HostVolume>, VolumeError> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let mut out = HashMap::new();
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.clone())
        .unwrap_or_default();
    for volume in &volumes {
        let host = prepare_one(api, mounter, pod, namespace, volume, pod_dir, allocatable).await?;
        out.insert(volume.name.clone(), host);
    }
    Ok(out)
}

/// Mounts a tmpfs at `dir` unless one is there already.
fn ensure_tmpfs(
    mounter: &dyn Mounter,
    volume: &str,
    dir: &Path,
    size: Option<u64>,
) -> Result<(), VolumeError> {
    std::fs::create_dir_all(dir).map_err(io(volume, dir))?;
    if !mounter.is_mounted(dir) {
        mounter.mount_tmpfs(dir, size).map_err(io(volume, dir))?;
    }
    Ok(())
}

/// A volume's `defaultMode`: permission bits only (0644 when unset).
fn file_mode(volume: &str, mode: Option<i32>) -> Result<u32, VolumeError> {
    let mode = mode.unwrap_or(0o644);
    u32::try_from(mode)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| VolumeError::Invalid {
            volume: volume.into(),
            message: format!("defaultMode {mode} is not between 0 and 0777 (511)"),
        })
}

/// The per-file `mode`s the volume's items set, by file path.
fn item_modes(volume: &Volume) -> Result<BTreeMap<String, u32>, VolumeError> {
    let mut pairs: Vec<(&str, Option<i32>)> = Vec::new();
    fn key_items(items: Option<&Vec<KeyToPath>>) -> impl Iterator<Item = (&str, Option<i32>)> {
        items
            .into_iter()
            .flatten()
            .map(|i| (i.path.as_str(), i.mode))
    }
    if let Some(cm) = &volume.config_map {
        pairs.extend(key_items(cm.items.as_ref()));
    }
    if let Some(sec) = &volume.secret {
        pairs.extend(key_items(sec.items.as_ref()));
    }
    if let Some(d) = &volume.downward_api {
        pairs.extend(d.items.iter().flatten().map(|i| (i.path.as_str(), i.mode)));
    }
    if let Some(p) = &volume.projected {
        for src in p.sources.iter().flatten() {
            if let Some(cm) = &src.config_map {
                pairs.extend(key_items(cm.items.as_ref()));
            }
            if let Some(sec) = &src.secret {
                pairs.extend(key_items(sec.items.as_ref()));
            }
            if let Some(d) = &src.downward_api {
                pairs.extend(d.items.iter().flatten().map(|i| (i.path.as_str(), i.mode)));
            }
        }
    }
    let mut out = BTreeMap::new();
    for (path, mode) in pairs {
        if let Some(m) = mode {
            let bits = u32::try_from(m)
                .ok()
                .filter(|b| *b <= 0o777)
                .ok_or_else(|| VolumeError::Invalid {
                    volume: volume.name.clone(),
                    message: format!("mode {m} of item {path:?} is not between 0 and 0777 (511)"),
                })?;
            out.insert(path.to_owned(), bits);
        }
    }
    Ok(out)
}

async fn prepare_one<A: Api>(
    api: &A,
    mounter: &dyn Mounter,
    pod: &Pod,
    namespace: &str,
    volume: &Volume,
    pod_dir: &Path,
    allocatable: &BTreeMap<String, Quantity>,
) -> Result<HostVolume, VolumeError> {
    let name = &volume.name;
    if name.is_empty() || name.contains('/') || name == ".." {
        return Err(VolumeError::Invalid {
            volume: name.clone(),
            message: "volume name must be a DNS label".into(),
        });
    }
    if let Some(ed) = &volume.empty_dir {
        let path = kind_dir(pod_dir, "empty-dir").join(name);
        match ed.medium.as_deref().unwrap_or("") {
            "" => std::fs::create_dir_all(&path).map_err(io(name, &path))?,
            "Memory" => {
                let size = match &ed.size_limit {
                    None => None,
                    Some(q) => Some(
                        Quantity::parse(&q.0)
                            .map_err(|e| VolumeError::Invalid {
                                volume: name.clone(),
                                message: format!("sizeLimit {:?}: {e}", q.0),
                            })?
                            .units_ceil(),
                    )
                    .map(|b| u64::try_from(b).unwrap_or(u64::MAX)),
                };
                ensure_tmpfs(mounter, name, &path, size)?;
            }
            other => {
                return Err(VolumeError::Invalid {
                    volume: name.clone(),
                    message: format!("emptyDir medium {other:?} is not supported (\"\" or Memory)"),
                });
            }
        }
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
    let mode;
    // Secrets (and projections, which may hold them) stay off the disk.
    let mut in_memory = false;
    // Token files are private to the pod's user unless the volume says otherwise.
    let mut private_paths: Vec<String> = Vec::new();
    if let Some(cm) = &volume.config_map {
        dir = kind_dir(pod_dir, "configmap").join(name);
        mode = file_mode(name, cm.default_mode)?;
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
        mode = file_mode(name, s.default_mode)?;
        in_memory = true;
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
        mode = file_mode(name, d.default_mode)?;
        downward_files(
            name,
            pod,
            d.items.as_deref().unwrap_or_default(),
            allocatable,
            &mut files,
        )?;
    } else if let Some(p) = &volume.projected {
        dir = kind_dir(pod_dir, "projected").join(name);
        mode = file_mode(name, p.default_mode)?;
        in_memory = true;
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
                    allocatable,
                    &mut files,
                )?;
            }
            if let Some(t) = &source.service_account_token {
                let current = atomic::current_version(&dir).map(|v| v.join(&t.path));
                let jwt = token::token_file(api, name, pod, t, current.as_deref()).await?;
                files.insert(t.path.clone(), jwt.into_bytes());
                if p.default_mode.is_none() {
                    private_paths.push(t.path.clone());
                }
            }
        }
    } else {
        return Err(VolumeError::Invalid {
            volume: name.clone(),
            message: "volume type is not supported by this agent".into(),
        });
    }
    for rel in files.keys() {
        atomic::check_path(name, rel)?;
    }
    if in_memory {
        ensure_tmpfs(mounter, name, &dir, None)?;
    }
    let mut modes = item_modes(volume)?;
    let owner = token_owner(pod);
    let mut owners = BTreeMap::new();
    for path in private_paths {
        if let Some(uid) = owner {
            owners.insert(path.clone(), uid);
        }
        modes.insert(path, 0o600);
    }
    atomic::write_atomic_owned(name, &dir, &files, mode, &modes, &owners)?;
    Ok(HostVolume {
        path: dir,
        read_only: true,
    })
}

/// Who owns a pod's private token files: the uid every (init and app) container runs as,
/// when they all name the same non-root one (pod or container `runAsUser`), as upstream's
/// `FsUserFrom`; otherwise root. Without this a pod running as non-root could not read
/// its own 0600 token.
pub fn token_owner(pod: &Pod) -> Option<u32> {
    let spec = pod.spec.as_ref()?;
    let pod_user = spec.security_context.as_ref().and_then(|s| s.run_as_user);
    let mut owner = None;
    for c in spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
    {
        let user = c
            .security_context
            .as_ref()
            .and_then(|s| s.run_as_user)
            .or(pod_user)?;
        match owner {
            None => owner = Some(user),
            Some(o) if o != user => return None,
            Some(_) => {}
        }
    }
    owner
        .and_then(|u| u32::try_from(u).ok())
        .filter(|u| *u != 0)
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
    allocatable: &BTreeMap<String, Quantity>,
    files: &mut BTreeMap<String, Vec<u8>>,
) -> Result<(), VolumeError> {
    let invalid = |message: String| VolumeError::Invalid {
        volume: volume.into(),
        message,
    };
    for item in items {
        let value = match (&item.field_ref, &item.resource_field_ref) {
            (Some(field), None) => field_value(pod, &field.field_path).ok_or_else(|| {
                invalid(format!("fieldRef {:?} is not supported", field.field_path))
            })?,
            // A volume belongs to no container: the item names its own.
            (None, Some(r)) => resource_field::value(pod, None, r, allocatable)
                .map_err(|e| invalid(format!("downwardAPI item {:?}: {e}", item.path)))?,
            _ => {
                return Err(invalid(format!(
                    "downwardAPI item {:?}: exactly one of fieldRef and resourceFieldRef is required",
                    item.path
                )));
            }
        };
        files.insert(item.path.clone(), value.into_bytes());
    }
    Ok(())
}

/// Unmounts the pod's tmpfs volumes and removes its volume directories (hostPath volumes
/// are not under it). Goes on after errors and reports the first; nothing is removed under
/// a mount that would not go away, so a retry finds it again.
pub fn cleanup(mounter: &dyn Mounter, pod_dir: &Path) -> Result<(), VolumeError> {
    let root = pod_dir.join("volumes");
    let mut first = None;
    match mounter.mounts_under(&root) {
        Ok(points) => {
            for p in points {
                if let Err(source) = mounter.unmount(&p) {
                    first.get_or_insert(VolumeError::Io {
                        volume: volume_of(&p),
                        path: p.clone(),
                        source,
                    });
                }
            }
        }
        Err(source) => {
            first.get_or_insert(VolumeError::Io {
                volume: String::new(),
                path: "/proc/self/mountinfo".into(),
                source,
            });
        }
    }
    if let Some(e) = first {
        return Err(e);
    }
    match std::fs::remove_dir_all(&root) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(VolumeError::Io {
            volume: String::new(),
            path: root,
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The volume name of a path `.../volumes/<kind>/<name>[/...]`, for error messages.
fn volume_of(path: &Path) -> String {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts
        .iter()
        .position(|p| p == "volumes")
        .and_then(|i| parts.get(i + 2))
        .cloned()
        .unwrap_or_default()
}

/// The host path a `subPath` of `volume` names, made ready: a plain relative path that
/// stays inside the volume even after following symlinks; created as a directory in a
/// writable volume when missing, as upstream does.
pub fn sub_path(name: &str, volume: &HostVolume, sub: &str) -> Result<PathBuf, VolumeError> {
    let rel = Path::new(sub);
    if sub.is_empty()
        || !rel
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(VolumeError::Invalid {
            volume: name.into(),
            message: format!("subPath {sub:?} must be a relative path without '..'"),
        });
    }
    let path = volume.path.join(rel);
    if !volume.read_only && std::fs::symlink_metadata(&path).is_err() {
        std::fs::create_dir_all(&path).map_err(io(name, &path))?;
    }
    let root = volume.path.canonicalize().map_err(io(name, &volume.path))?;
    let real = path.canonicalize().map_err(io(name, &path))?;
    if !real.starts_with(&root) {
        return Err(VolumeError::Invalid {
            volume: name.into(),
            message: format!(
                "subPath {sub:?} resolves to {} outside the volume",
                real.display()
            ),
        });
    }
    Ok(real)
}

#[cfg(test)]
mod tests;
