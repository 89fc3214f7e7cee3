//! The container's filesystem: the root (overlayfs over image layers, or a plain directory),
//! the mounts of the spec, `/dev`, `pivot_root`, masked and read-only paths.
//!
//! Everything here runs inside the container's fresh mount namespace, so every mount
//! disappears with the container's last process: nothing can leak onto the host table.

mod options;

use std::os::unix::fs::{FileTypeExt, symlink};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use serde::{Deserialize, Serialize};

pub use options::{ParsedOptions, parse_options};

/// Errors while planning or performing mounts.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount destination {0:?} must be an absolute path")]
    RelativeDestination(String),
    #[error("mount on {destination}: unknown option {option:?}")]
    UnknownOption { destination: String, option: String },
    #[error("mount on {destination}: filesystem type {fstype:?} is not supported")]
    UnsupportedType { destination: String, fstype: String },
    #[error("bind mount source {path} for {destination}: {error}")]
    BadSource {
        path: PathBuf,
        destination: String,
        error: std::io::Error,
    },
    #[error("mount {what} on {target}: {source}")]
    Mount {
        what: String,
        target: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("prepare mount point {target}: {source}")]
    Prepare {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("too many levels of symbolic links resolving {0} inside the root")]
    SymlinkLoop(String),
    #[error("overlay rootfs needs at least one lower layer")]
    NoLayers,
    #[error("pivot_root to {root}: {source}")]
    Pivot {
        root: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("create device {path}: {source}")]
    Device {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Where the container's root filesystem comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RootfsSource {
    /// An overlay of read-only layer directories (topmost first) with a writable upper dir.
    Overlay {
        lower: Vec<PathBuf>,
        upper: PathBuf,
        work: PathBuf,
    },
    /// An existing directory, bind-mounted.
    Dir(PathBuf),
}

/// One mount of the spec, checked and with its options turned into flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    pub destination: String,
    pub fstype: String,
    pub source: String,
    pub bind: bool,
    pub recursive: bool,
    /// `MsFlags` bits for the mount (or the remount of a bind mount).
    pub flags: u64,
    /// `MsFlags` propagation bits applied after mounting.
    pub propagation: u64,
    pub data: String,
}

const SUPPORTED_TYPES: [&str; 7] = [
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "bind", "overlay",
];

impl MountPlan {
    pub fn from_oci(m: &oci_spec::runtime::Mount) -> Result<Self, MountError> {
        let destination = m.destination().to_string_lossy().into_owned();
        if !destination.starts_with('/') {
            return Err(MountError::RelativeDestination(destination));
        }
        let opts = parse_options(m.options().as_deref().unwrap_or(&[]), &destination)?;
        let fstype = m.typ().clone().unwrap_or_default();
        let bind = opts.bind || fstype == "bind";
        if !bind && !SUPPORTED_TYPES.contains(&fstype.as_str()) {
            return Err(MountError::UnsupportedType {
                destination,
                fstype,
            });
        }
        let source = m
            .source()
            .as_ref()
            .map_or_else(|| fstype.clone(), |s| s.to_string_lossy().into_owned());
        Ok(MountPlan {
            destination,
            fstype,
            source,
            bind,
            recursive: opts.recursive,
            flags: opts.flags.bits(),
            propagation: opts.propagation.bits(),
            data: opts.data.join(","),
        })
    }

    /// For a bind mount, checks on the host that the source exists, so a typo fails the
    /// create call with the source named instead of a mount error at start.
    pub fn check_source(&self) -> Result<(), MountError> {
        if self.bind {
            std::fs::metadata(&self.source).map_err(|error| MountError::BadSource {
                path: PathBuf::from(&self.source),
                destination: self.destination.clone(),
                error,
            })?;
        }
        Ok(())
    }
}

/// Resolves `path` inside `root` as the container would see it: symlinks (absolute or
/// relative) and `..` never lead outside `root`. Missing components are kept as written.
pub fn secure_join(root: &Path, path: &str) -> Result<PathBuf, MountError> {
    let mut pending: Vec<String> = components(path);
    pending.reverse();
    let mut resolved: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(comp) = pending.pop() {
        if comp == ".." {
            resolved.pop();
            continue;
        }
        let candidate = root.join(resolved.join("/")).join(&comp);
        match std::fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(MountError::SymlinkLoop(path.to_string()));
                }
                let target =
                    std::fs::read_link(&candidate).map_err(|source| MountError::Prepare {
                        target: candidate.clone(),
                        source,
                    })?;
                let target = target.to_string_lossy().into_owned();
                if target.starts_with('/') {
                    resolved.clear();
                }
                for c in components(&target).into_iter().rev() {
                    pending.push(c);
                }
            }
            _ => resolved.push(comp),
        }
    }
    Ok(root.join(resolved.join("/")))
}

fn components(path: &str) -> Vec<String> {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            Component::ParentDir => Some("..".to_string()),
            _ => None,
        })
        .collect()
}

fn mount_err(what: impl Into<String>, target: &Path) -> impl FnOnce(nix::Error) -> MountError {
    let what = what.into();
    let target = target.to_path_buf();
    move |source| MountError::Mount {
        what,
        target,
        source,
    }
}

fn prepare_err(target: &Path) -> impl FnOnce(std::io::Error) -> MountError {
    let target = target.to_path_buf();
    move |source| MountError::Prepare { target, source }
}

/// Makes every mount of the (new) namespace stop propagating back to the host.
pub fn make_private_root(propagation: MsFlags) -> Result<(), MountError> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        propagation | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("propagation", Path::new("/")))
}

/// Mounts the root filesystem on `target`.
pub fn mount_rootfs(src: &RootfsSource, target: &Path) -> Result<(), MountError> {
    match src {
        RootfsSource::Dir(dir) => mount(
            Some(dir.as_path()),
            target,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(mount_err(dir.display().to_string(), target)),
        RootfsSource::Overlay { lower, upper, work } => {
            if lower.is_empty() {
                return Err(MountError::NoLayers);
            }
            let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
            let data = format!(
                "lowerdir={},upperdir={},workdir={}",
                lowers.join(":"),
                upper.display(),
                work.display()
            );
            mount(
                Some("overlay"),
                target,
                Some("overlay"),
                MsFlags::empty(),
                Some(data.as_str()),
            )
            .map_err(mount_err("overlay", target))
        }
    }
}

/// Performs one mount of the spec below `rootfs`.
pub fn mount_one(rootfs: &Path, m: &MountPlan) -> Result<(), MountError> {
    let target = secure_join(rootfs, &m.destination)?;
    let flags = MsFlags::from_bits_truncate(m.flags);
    let data = (!m.data.is_empty()).then_some(m.data.as_str());
    if m.bind {
        let src_md = std::fs::metadata(&m.source).map_err(|error| MountError::BadSource {
            path: PathBuf::from(&m.source),
            destination: m.destination.clone(),
            error,
        })?;
        if src_md.is_dir() {
            std::fs::create_dir_all(&target).map_err(prepare_err(&target))?;
        } else {
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(prepare_err(parent))?;
            }
            if std::fs::symlink_metadata(&target).is_err() {
                std::fs::File::create(&target).map_err(prepare_err(&target))?;
            }
        }
        let mut bind = MsFlags::MS_BIND;
        if m.recursive {
            bind |= MsFlags::MS_REC;
        }
        mount(
            Some(m.source.as_str()),
            &target,
            None::<&str>,
            bind,
            None::<&str>,
        )
        .map_err(mount_err(m.source.clone(), &target))?;
        // Flags of a bind mount only take effect through a remount of the new mount.
        let extra = flags - MsFlags::MS_BIND - MsFlags::MS_REC;
        if !extra.is_empty() {
            mount(
                None::<&str>,
                &target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | extra,
                None::<&str>,
            )
            .map_err(mount_err(format!("remount of {}", m.source), &target))?;
        }
    } else {
        std::fs::create_dir_all(&target).map_err(prepare_err(&target))?;
        mount(
            Some(m.source.as_str()),
            &target,
            Some(m.fstype.as_str()),
            flags,
            data,
        )
        .map_err(mount_err(format!("{} ({})", m.source, m.fstype), &target))?;
    }
    let prop = MsFlags::from_bits_truncate(m.propagation);
    if !prop.is_empty() {
        mount(None::<&str>, &target, None::<&str>, prop, None::<&str>)
            .map_err(mount_err("propagation", &target))?;
    }
    Ok(())
}

/// A device node to create in the container's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePlan {
    pub path: String,
    /// `c`, `b` or `p`.
    pub kind: char,
    pub major: u64,
    pub minor: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// The devices every container gets.
pub fn default_devices() -> Vec<DevicePlan> {
    [
        ("/dev/null", 1, 3),
        ("/dev/zero", 1, 5),
        ("/dev/full", 1, 7),
        ("/dev/random", 1, 8),
        ("/dev/urandom", 1, 9),
        ("/dev/tty", 5, 0),
    ]
    .into_iter()
    .map(|(path, major, minor)| DevicePlan {
        path: path.to_string(),
        kind: 'c',
        major,
        minor,
        mode: 0o666,
        uid: 0,
        gid: 0,
    })
    .collect()
}

/// Creates device nodes and the usual `/dev` symlinks below `rootfs`.
pub fn create_devices(rootfs: &Path, devices: &[DevicePlan]) -> Result<(), MountError> {
    for d in devices {
        let path = secure_join(rootfs, &d.path)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(prepare_err(parent))?;
        }
        let kind = match d.kind {
            'b' => SFlag::S_IFBLK,
            'p' => SFlag::S_IFIFO,
            _ => SFlag::S_IFCHR,
        };
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            let same = match d.kind {
                'b' => md.file_type().is_block_device(),
                'p' => md.file_type().is_fifo(),
                _ => md.file_type().is_char_device(),
            };
            if same {
                continue;
            }
            let _ = std::fs::remove_file(&path);
        }
        mknod(
            &path,
            kind,
            Mode::from_bits_truncate(d.mode & 0o7777),
            makedev(d.major, d.minor),
        )
        .map_err(|source| MountError::Device {
            path: path.clone(),
            source,
        })?;
        // mknod applies the umask; set the mode and owner the spec asked for.
        nix::sys::stat::fchmodat(
            nix::fcntl::AT_FDCWD,
            &path,
            Mode::from_bits_truncate(d.mode & 0o7777),
            nix::sys::stat::FchmodatFlags::FollowSymlink,
        )
        .map_err(|source| MountError::Device {
            path: path.clone(),
            source,
        })?;
        nix::unistd::chown(
            &path,
            Some(nix::unistd::Uid::from_raw(d.uid)),
            Some(nix::unistd::Gid::from_raw(d.gid)),
        )
        .map_err(|source| MountError::Device {
            path: path.clone(),
            source,
        })?;
    }
    let dev = secure_join(rootfs, "/dev")?;
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let p = dev.join(link);
        if std::fs::symlink_metadata(&p).is_err() {
            symlink(target, &p).map_err(prepare_err(&p))?;
        }
    }
    Ok(())
}

/// Makes `rootfs` the root of the mount namespace and detaches the old root.
pub fn pivot_root(rootfs: &Path) -> Result<(), MountError> {
    let err = |source| MountError::Pivot {
        root: rootfs.to_path_buf(),
        source,
    };
    nix::unistd::chdir(rootfs).map_err(err)?;
    // Stacking the old root under the new one and lazily unmounting it needs no spare
    // directory inside the image.
    nix::unistd::pivot_root(".", ".").map_err(err)?;
    umount2(".", MntFlags::MNT_DETACH).map_err(err)?;
    nix::unistd::chdir("/").map_err(err)
}

/// Hides a path: `/dev/null` over a file, an empty read-only tmpfs over a directory.
/// Paths that do not exist are fine (kernels differ).
pub fn mask_path(path: &str) -> Result<(), MountError> {
    let target = Path::new(path);
    let Ok(md) = std::fs::metadata(target) else {
        return Ok(());
    };
    if md.is_dir() {
        mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            None::<&str>,
        )
        .map_err(mount_err("tmpfs mask", target))
    } else {
        mount(
            Some("/dev/null"),
            target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(mount_err("/dev/null mask", target))
    }
}

/// Makes an existing path read-only by binding it onto itself and remounting.
pub fn readonly_path(path: &str) -> Result<(), MountError> {
    let target = Path::new(path);
    if std::fs::metadata(target).is_err() {
        return Ok(());
    }
    mount(
        Some(target),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(mount_err("read-only bind", target))?;
    remount_readonly(target)
}

/// Remounts an existing mount point read-only, keeping its other flags.
pub fn remount_readonly(target: &Path) -> Result<(), MountError> {
    let keep =
        nix::sys::statvfs::statvfs(target).map_or(MsFlags::empty(), |s| statvfs_to_ms(s.flags()));
    mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | keep,
        None::<&str>,
    )
    .map_err(mount_err("read-only remount", target))
}

/// A remount must repeat the locked flags of the mount or the kernel refuses it.
fn statvfs_to_ms(f: nix::sys::statvfs::FsFlags) -> MsFlags {
    use nix::sys::statvfs::FsFlags;
    let mut out = MsFlags::empty();
    for (a, b) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if f.contains(a) {
            out |= b;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secure_join_keeps_symlinks_inside_the_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir_all(root.join("usr/lib")).unwrap();
        symlink("/usr/lib", root.join("lib")).unwrap();
        symlink("../../../../etc", root.join("usr/escape")).unwrap();
        symlink("loop2", root.join("loop1")).unwrap();
        symlink("loop1", root.join("loop2")).unwrap();
        assert_eq!(secure_join(root, "/lib/x").unwrap(), root.join("usr/lib/x"));
        assert_eq!(
            secure_join(root, "/usr/escape/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(secure_join(root, "/../../etc").unwrap(), root.join("etc"));
        assert_eq!(secure_join(root, "/a/./b").unwrap(), root.join("a/b"));
        assert!(matches!(
            secure_join(root, "/loop1"),
            Err(MountError::SymlinkLoop(_))
        ));
    }

    #[test]
    fn spec_mounts_become_plans() {
        let m: oci_spec::runtime::Mount = serde_json::from_value(serde_json::json!({
            "destination": "/data", "type": "bind", "source": "/srv/data",
            "options": ["rbind", "ro", "rslave"]
        }))
        .unwrap();
        let p = MountPlan::from_oci(&m).unwrap();
        assert!(p.bind && p.recursive);
        assert_eq!(
            MsFlags::from_bits_truncate(p.flags),
            MsFlags::MS_RDONLY | MsFlags::MS_BIND | MsFlags::MS_REC
        );
        assert_eq!(
            MsFlags::from_bits_truncate(p.propagation),
            MsFlags::MS_SLAVE | MsFlags::MS_REC
        );

        let tmpfs: oci_spec::runtime::Mount = serde_json::from_value(serde_json::json!({
            "destination": "/dev", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]
        }))
        .unwrap();
        let p = MountPlan::from_oci(&tmpfs).unwrap();
        assert!(!p.bind);
        assert_eq!(p.data, "mode=755,size=65536k");

        let rel: oci_spec::runtime::Mount =
            serde_json::from_value(serde_json::json!({"destination": "data", "type": "tmpfs"}))
                .unwrap();
        assert!(matches!(
            MountPlan::from_oci(&rel),
            Err(MountError::RelativeDestination(_))
        ));
        let nfs: oci_spec::runtime::Mount =
            serde_json::from_value(serde_json::json!({"destination": "/x", "type": "nfs"}))
                .unwrap();
        assert!(matches!(
            MountPlan::from_oci(&nfs),
            Err(MountError::UnsupportedType { .. })
        ));
    }

    #[test]
    fn a_missing_bind_source_is_named() {
        let m: oci_spec::runtime::Mount = serde_json::from_value(serde_json::json!({
            "destination": "/data", "type": "bind", "source": "/no/such/dir", "options": ["bind"]
        }))
        .unwrap();
        let err = MountPlan::from_oci(&m).unwrap().check_source().unwrap_err();
        assert!(err.to_string().contains("/no/such/dir"), "{err}");
        assert!(err.to_string().contains("/data"), "{err}");
    }
}
