//! Unpacks a layer tar into a directory that overlayfs can use as a lower layer: OCI
//! whiteouts (`.wh.NAME`) become overlay whiteouts (0:0 character devices) and opaque
//! markers (`.wh..wh..opq`) become the `trusted.overlay.opaque` attribute.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use ferrolet_oci_image::WHITEOUT_PREFIX;

const OPAQUE: &str = ".wh..wh..opq";

/// Errors while unpacking a layer.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {0:?} leaves the layer root")]
    UnsafePath(String),
    #[error("read layer tar: {0}")]
    Read(#[source] std::io::Error),
    #[error("unpack layer entry {entry:?}: {source}")]
    Entry {
        entry: String,
        #[source]
        source: std::io::Error,
    },
    #[error("whiteout {path}: {source}")]
    Whiteout {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

fn relative(name: &str) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir | Component::RootDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// Unpacks the (uncompressed) tar stream `tar` into `dest`.
pub fn unpack_layer(tar: impl Read, dest: &Path) -> Result<(), UnpackError> {
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let rel = relative(&name).ok_or_else(|| UnpackError::UnsafePath(name.clone()))?;
        let file_name = rel
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX) {
            let parent = dest.join(rel.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&parent).map_err(|source| UnpackError::Entry {
                entry: name.clone(),
                source,
            })?;
            if file_name == OPAQUE {
                xattr_set(&parent, "trusted.overlay.opaque", b"y").map_err(|source| {
                    UnpackError::Whiteout {
                        path: parent.clone(),
                        source,
                    }
                })?;
            } else {
                let target = parent.join(hidden);
                let _ = std::fs::remove_dir_all(&target);
                let _ = std::fs::remove_file(&target);
                nix::sys::stat::mknod(
                    &target,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    nix::sys::stat::makedev(0, 0),
                )
                .map_err(|source| UnpackError::Whiteout {
                    path: target.clone(),
                    source,
                })?;
            }
            continue;
        }
        entry.unpack_in(dest).map_err(|source| UnpackError::Entry {
            entry: name.clone(),
            source,
        })?;
    }
    Ok(())
}

fn xattr_set(path: &Path, name: &str, value: &[u8]) -> Result<(), nix::Error> {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| nix::Error::EINVAL)?;
    let n = std::ffi::CString::new(name).map_err(|_| nix::Error::EINVAL)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; value points to
    // value.len() readable bytes.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r != 0 {
        return Err(nix::Error::last());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            match data {
                Some(d) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(d.len() as u64);
                    h.set_mode(0o644);
                    h.set_cksum();
                    b.append_data(&mut h, name, *d).unwrap();
                }
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    h.set_cksum();
                    b.append_data(&mut h, name, &[][..]).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn files_and_whiteouts() {
        if !nix::unistd::geteuid().is_root() {
            panic!("unpacking whiteouts needs root (mknod, trusted.* xattrs)");
        }
        let t = tempfile::tempdir().unwrap();
        let data = tar_of(&[
            ("etc/", None),
            ("etc/hello", Some(b"hi")),
            ("etc/.wh.gone", Some(b"")),
            ("var/", None),
            ("var/.wh..wh..opq", Some(b"")),
        ]);
        unpack_layer(&data[..], t.path()).unwrap();
        assert_eq!(std::fs::read(t.path().join("etc/hello")).unwrap(), b"hi");
        let md = std::fs::symlink_metadata(t.path().join("etc/gone")).unwrap();
        assert!(md.file_type().is_char_device());
        assert!(!t.path().join("etc/.wh.gone").exists());
        let mut buf = [0u8; 4];
        let p =
            std::ffi::CString::new(t.path().join("var").as_os_str().as_encoded_bytes()).unwrap();
        let n = std::ffi::CString::new("trusted.overlay.opaque").unwrap();
        // SAFETY: valid C strings and a 4-byte buffer.
        let len = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), 4) };
        assert_eq!(len, 1);
        assert_eq!(buf[0], b'y');
    }

    #[test]
    fn escaping_entries_are_refused() {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        // The builder refuses "..", so write the name bytes directly.
        h.as_mut_bytes()[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        let mut data = h.as_bytes().to_vec();
        data.extend_from_slice(b"x");
        data.resize(1024 + 512 * 2, 0);
        let t = tempfile::tempdir().unwrap();
        let err = unpack_layer(&data[..], &t.path().join("root")).unwrap_err();
        assert!(matches!(err, UnpackError::UnsafePath(_)), "{err}");
    }
}
