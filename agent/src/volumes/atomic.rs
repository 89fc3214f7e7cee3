//! Atomic updates of a volume's files, laid out as the kubelet lays out configMap, secret,
//! downwardAPI and projected volumes: the files of one version live in a hidden
//! `..<stamp>` directory, `..data` is a symlink to the current one, and every visible name
//! is a symlink through `..data`. An update writes a new version beside the old one and
//! swaps `..data` with one rename, so a reader sees either the old set or the new one,
//! never a mix.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::VolumeError;

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

fn io(volume: &str, path: &Path) -> impl FnOnce(std::io::Error) -> VolumeError {
    let volume = volume.to_owned();
    let path = path.to_path_buf();
    move |source| VolumeError::Io {
        volume,
        path,
        source,
    }
}

/// Checks that `rel` is a plain relative path that stays in the volume and does not clash
/// with the hidden `..` entries.
pub fn check_path(volume: &str, rel: &str) -> Result<(), VolumeError> {
    let p = Path::new(rel);
    let plain = !rel.is_empty()
        && p.components().all(|c| matches!(c, Component::Normal(_)))
        && !p
            .components()
            .next()
            .is_some_and(|c| c.as_os_str().to_string_lossy().starts_with(".."));
    if plain {
        Ok(())
    } else {
        Err(VolumeError::Invalid {
            volume: volume.into(),
            message: format!("file path {rel:?} must be relative and stay in the volume"),
        })
    }
}

/// Every file below `dir` by relative path, with its content.
fn read_tree(
    dir: &Path,
    prefix: &Path,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let rel = prefix.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            read_tree(&entry.path(), &rel, out)?;
        } else {
            out.insert(
                rel.to_string_lossy().into_owned(),
                std::fs::read(entry.path())?,
            );
        }
    }
    Ok(())
}

/// The first component of each path: the names visible at the top of the volume.
fn top_names(files: &BTreeMap<String, Vec<u8>>) -> BTreeSet<String> {
    files
        .keys()
        .filter_map(|k| Path::new(k).components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect()
}

/// Makes `dir` hold exactly `files` (relative path to content), each with permission
/// `mode` unless `modes` names its own; true if anything changed. Nothing is written
/// unless every path is valid.
pub fn write_atomic(
    volume: &str,
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    mode: u32,
    modes: &BTreeMap<String, u32>,
) -> Result<bool, VolumeError> {
    write_atomic_owned(volume, dir, files, mode, modes, &BTreeMap::new())
}

/// [`write_atomic`], with the files `owners` names owned by that uid; they are chowned
/// before the swap, so a reader never sees one it cannot open.
pub fn write_atomic_owned(
    volume: &str,
    dir: &Path,
    files: &BTreeMap<String, Vec<u8>>,
    mode: u32,
    modes: &BTreeMap<String, u32>,
    owners: &BTreeMap<String, u32>,
) -> Result<bool, VolumeError> {
    use std::os::unix::fs::MetadataExt as _;
    for rel in files.keys() {
        check_path(volume, rel)?;
    }
    std::fs::create_dir_all(dir).map_err(io(volume, dir))?;
    let data = dir.join(DATA);
    let current = std::fs::read_link(&data).ok();
    if current.is_some() {
        let mut have = BTreeMap::new();
        let same = read_tree(&data, Path::new(""), &mut have).is_ok()
            && &have == files
            && files.keys().all(|rel| {
                let want = modes.get(rel).copied().unwrap_or(mode);
                std::fs::metadata(data.join(rel)).is_ok_and(|m| {
                    m.permissions().mode() & 0o777 == want
                        && owners.get(rel).is_none_or(|uid| m.uid() == *uid)
                })
            })
            && top_names(files).iter().all(|n| {
                std::fs::read_link(dir.join(n)).is_ok_and(|t| t == Path::new(DATA).join(n))
            });
        if same {
            return Ok(false);
        }
    }

    // A new version beside the old one.
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let stamp = format!("..{nanos}.{}", SERIAL.fetch_add(1, Ordering::Relaxed));
    let version = dir.join(&stamp);
    std::fs::create_dir(&version).map_err(io(volume, &version))?;
    let written = (|| {
        for (rel, content) in files {
            let path = version.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(volume, parent))?;
            }
            std::fs::write(&path, content).map_err(io(volume, &path))?;
            let bits = modes.get(rel).copied().unwrap_or(mode);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(bits))
                .map_err(io(volume, &path))?;
            if let Some(uid) = owners.get(rel) {
                std::os::unix::fs::chown(&path, Some(*uid), None).map_err(io(volume, &path))?;
            }
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&version);
        return Err(e);
    }

    // The swap: a new symlink renamed over `..data` in one step.
    let tmp = dir.join(DATA_TMP);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&stamp, &tmp).map_err(io(volume, &tmp))?;
    std::fs::rename(&tmp, &data).map_err(io(volume, &data))?;

    // Visible names through `..data`; names gone from the set disappear.
    let names = top_names(files);
    for name in &names {
        let link = dir.join(name);
        let want = Path::new(DATA).join(name);
        match std::fs::read_link(&link) {
            Ok(t) if t == want => continue,
            Ok(_) => std::fs::remove_file(&link).map_err(io(volume, &link))?,
            Err(_) => {
                // A plain file or directory from an older layout.
                if let Ok(meta) = std::fs::symlink_metadata(&link) {
                    if meta.is_dir() {
                        std::fs::remove_dir_all(&link).map_err(io(volume, &link))?;
                    } else {
                        std::fs::remove_file(&link).map_err(io(volume, &link))?;
                    }
                }
            }
        }
        std::os::unix::fs::symlink(&want, &link).map_err(io(volume, &link))?;
    }
    for entry in std::fs::read_dir(dir).map_err(io(volume, dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        let stale = if name.starts_with("..") {
            name != DATA && name != stamp
        } else {
            !names.contains(&name)
        };
        if !stale {
            continue;
        }
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        removed.map_err(io(volume, &path))?;
    }
    Ok(true)
}

/// The directory `..data` points at now, if the volume has been written.
pub fn current_version(dir: &Path) -> Option<PathBuf> {
    std::fs::read_link(dir.join(DATA)).ok().map(|t| dir.join(t))
}
