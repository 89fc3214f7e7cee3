//! One image layer from a directory tree: a deterministic tar, gzip-compressed, with its
//! digest (of the compressed blob) and diff id (of the uncompressed tar).
//!
//! Determinism: entries are written depth-first in byte order of their names, every mtime is
//! zero, user and group names are left empty, and gzip carries no timestamp, so the same tree
//! gives the same digest on any machine and at any time.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use flate2::{Compression, GzBuilder};
use oci_spec::image::Digest;
use tar::{EntryType, Header};

use crate::digest::HashingWriter;

/// Files whose name starts with this mark deletions in layered images; a tree built into a
/// single layer must not contain them, or readers would delete files instead of adding them.
pub const WHITEOUT_PREFIX: &str = ".wh.";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("root filesystem directory {path} does not exist")]
    RootfsMissing { path: PathBuf },
    #[error("root filesystem {path} is not a directory")]
    RootfsNotDirectory { path: PathBuf },
    #[error("cannot read {path} in the root filesystem: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} changed size while it was being added to the layer")]
    Changed { path: PathBuf },
    #[error("{path} is a {kind}, which a layer cannot hold")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },
    #[error(
        "{path} has a whiteout name ({WHITEOUT_PREFIX}*), which would delete files when the layer is applied"
    )]
    WhiteoutName { path: PathBuf },
    #[error("cannot write the layer to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// Who owns the files in the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ownership {
    /// The uid and gid the files have on disk.
    #[default]
    Preserve,
    /// Every file owned by these ids, e.g. root when an unprivileged user builds the image.
    Fixed { uid: u32, gid: u32 },
}

/// A layer written to disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBlob {
    /// Digest of the gzip-compressed blob, as the manifest lists it.
    pub digest: Digest,
    /// Size in bytes of the compressed blob.
    pub size: u64,
    /// Digest of the uncompressed tar, as the config's `rootfs.diff_ids` lists it.
    pub diff_id: Digest,
}

/// Writes the tree under `rootfs` as a gzip-compressed tar to the new file `out`.
/// On error `out` may hold a partial blob; the caller owns the file and removes it.
pub fn write_layer(
    rootfs: &Path,
    ownership: Ownership,
    out: &Path,
) -> Result<LayerBlob, LayerError> {
    match fs::metadata(rootfs) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(LayerError::RootfsNotDirectory {
                path: rootfs.to_owned(),
            });
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(LayerError::RootfsMissing {
                path: rootfs.to_owned(),
            });
        }
        Err(source) => {
            return Err(LayerError::Read {
                path: rootfs.to_owned(),
                source,
            });
        }
    }
    let write_err = |source| LayerError::Write {
        path: out.to_owned(),
        source,
    };
    let file = File::create_new(out).map_err(write_err)?;
    let compressed = HashingWriter::new(BufWriter::new(file));
    let gzip = GzBuilder::new()
        .mtime(0)
        .write(compressed, Compression::default());
    let uncompressed = HashingWriter::new(gzip);
    let mut writer = LayerWriter {
        tar: tar::Builder::new(uncompressed),
        ownership,
        links: HashMap::new(),
        out,
    };
    writer.add_children(rootfs, Path::new(""))?;
    let uncompressed = writer.tar.into_inner().map_err(write_err)?;
    let (gzip, diff_id, _) = uncompressed.into_parts();
    let compressed = gzip.finish().map_err(write_err)?;
    let (buffered, digest, size) = compressed.into_parts();
    let file = buffered
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    file.sync_all().map_err(write_err)?;
    Ok(LayerBlob {
        digest,
        size,
        diff_id,
    })
}

type TarSink = HashingWriter<flate2::write::GzEncoder<HashingWriter<BufWriter<File>>>>;

struct LayerWriter<'a> {
    tar: tar::Builder<TarSink>,
    ownership: Ownership,
    /// First path seen for each (device, inode) with more than one link.
    links: HashMap<(u64, u64), PathBuf>,
    out: &'a Path,
}

impl LayerWriter<'_> {
    fn add_children(&mut self, dir: &Path, in_layer: &Path) -> Result<(), LayerError> {
        let read_err = |source| LayerError::Read {
            path: dir.to_owned(),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_err)? {
            names.push(entry.map_err(read_err)?.file_name());
        }
        names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        for name in names {
            let path = dir.join(&name);
            if name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
                return Err(LayerError::WhiteoutName { path });
            }
            let in_layer = in_layer.join(&name);
            self.add(&path, &in_layer)?;
        }
        Ok(())
    }

    fn add(&mut self, path: &Path, in_layer: &Path) -> Result<(), LayerError> {
        let read_err = |source| LayerError::Read {
            path: path.to_owned(),
            source,
        };
        let meta = fs::symlink_metadata(path).map_err(read_err)?;
        let kind = meta.file_type();
        let mut header = Header::new_gnu();
        header.set_mode(meta.mode() & 0o7777);
        header.set_mtime(0);
        let (uid, gid) = match self.ownership {
            Ownership::Preserve => (meta.uid(), meta.gid()),
            Ownership::Fixed { uid, gid } => (uid, gid),
        };
        header.set_uid(u64::from(uid));
        header.set_gid(u64::from(gid));
        header.set_size(0);

        if !kind.is_dir() && meta.nlink() > 1 {
            let key = (meta.dev(), meta.ino());
            if let Some(first) = self.links.get(&key) {
                header.set_entry_type(EntryType::Link);
                let first = first.clone();
                return self.append_link(&mut header, in_layer, &first);
            }
            self.links.insert(key, in_layer.to_owned());
        }

        if kind.is_dir() {
            header.set_entry_type(EntryType::Directory);
            self.append(&mut header, in_layer, io::empty())?;
            self.add_children(path, in_layer)
        } else if kind.is_file() {
            header.set_entry_type(EntryType::Regular);
            header.set_size(meta.len());
            let file = File::open(path).map_err(read_err)?;
            let mut exact = ExactReader {
                inner: file.take(meta.len()),
                remaining: meta.len(),
                failure: None,
            };
            let result = self.append(&mut header, in_layer, &mut exact);
            if let Some(source) = exact.failure.take() {
                return Err(read_err(source));
            }
            if exact.remaining != 0 {
                return Err(LayerError::Changed {
                    path: path.to_owned(),
                });
            }
            result
        } else if kind.is_symlink() {
            header.set_entry_type(EntryType::Symlink);
            let target = fs::read_link(path).map_err(read_err)?;
            self.append_link(&mut header, in_layer, &target)
        } else if kind.is_fifo() || kind.is_char_device() || kind.is_block_device() {
            let entry_type = if kind.is_fifo() {
                EntryType::Fifo
            } else if kind.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            };
            header.set_entry_type(entry_type);
            if !kind.is_fifo() {
                let rdev = meta.rdev();
                let set = header
                    .set_device_major(libc_major(rdev))
                    .and_then(|()| header.set_device_minor(libc_minor(rdev)));
                set.map_err(read_err)?;
            }
            self.append(&mut header, in_layer, io::empty())
        } else {
            Err(LayerError::UnsupportedFileType {
                path: path.to_owned(),
                kind: if kind.is_socket() {
                    "socket"
                } else {
                    "file of unknown type"
                },
            })
        }
    }

    fn append(
        &mut self,
        header: &mut Header,
        in_layer: &Path,
        data: impl Read,
    ) -> Result<(), LayerError> {
        self.tar
            .append_data(header, in_layer, data)
            .map_err(|source| self.write_err(source))
    }

    fn append_link(
        &mut self,
        header: &mut Header,
        in_layer: &Path,
        target: &Path,
    ) -> Result<(), LayerError> {
        self.tar
            .append_link(header, in_layer, target)
            .map_err(|source| self.write_err(source))
    }

    fn write_err(&self, source: io::Error) -> LayerError {
        LayerError::Write {
            path: self.out.to_owned(),
            source,
        }
    }
}

/// The major and minor numbers of a Linux `dev_t` (glibc's encoding).
fn libc_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)) as u32
}

fn libc_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)) as u32
}

/// Hands out exactly the announced number of bytes. A file that shrank would otherwise leave
/// the tar header promising more bytes than follow, corrupting every later entry; the read
/// error is kept aside so it is reported as a read error rather than a write error.
struct ExactReader<R> {
    inner: R,
    remaining: u64,
    failure: Option<io::Error>,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        match self.inner.read(buf) {
            Ok(0) => Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank")),
            Ok(n) => {
                self.remaining -= n as u64;
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.failure = Some(e);
                Err(io::Error::new(kind, "read failed"))
            }
        }
    }
}
