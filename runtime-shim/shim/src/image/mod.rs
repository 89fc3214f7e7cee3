//! The image store: imported images by id (config digest), their names, and their layers
//! unpacked once each (by diff id) for use as overlay lower directories.
//!
//! Layout under the store root: `images/<id-hex>.json` per image, `layers/<diff-id-hex>/`
//! per unpacked layer. A layer is unpacked into a temporary directory and renamed into place,
//! and an image record is written only after all its layers are in place, so a failed import
//! (corrupt layer, digest mismatch) leaves no partial image behind.

pub mod pause;
pub mod pull;
pub mod unpack;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use ferrolet_oci_image::{ImageReference, LayerCompression, LoadedImage, ReadOptions};
use serde::{Deserialize, Serialize};

use crate::monitor::write_atomic;

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("read image {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: ferrolet_oci_image::ReadError,
    },
    #[error("unpack layer {diff_id}: {source}")]
    Unpack {
        diff_id: String,
        #[source]
        source: unpack::UnpackError,
    },
    #[error("image store {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {0:?} not found")]
    NotFound(String),
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("build pause image: {0}")]
    Pause(String),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ImageError {
    let path = path.to_path_buf();
    move |source| ImageError::Io { op, path, source }
}

/// What a container started from the image runs by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub user: String,
    pub stop_signal: String,
}

/// One image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// `sha256:<hex>` of the image config: the image id, as containerd reports it.
    pub id: String,
    pub repo_tags: Vec<String>,
    pub repo_digests: Vec<String>,
    pub manifest_digest: String,
    /// Diff ids of the layers, base first.
    pub layers: Vec<String>,
    /// Bytes of the image's blobs (compressed layers and config).
    pub size: u64,
    pub config: ImageConfig,
}

/// The store; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    images: RwLock<BTreeMap<String, ImageRecord>>,
    /// Serialises imports and removals (which touch several files).
    write: Mutex<()>,
}

fn hex_of(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

/// The canonical name of a reference (`docker.io/library/busybox:latest` for `busybox`).
pub fn normalize(reference: &str) -> Result<ImageReference, ImageError> {
    ImageReference::parse(reference)
        .map(ImageReference::docker_normalized)
        .map_err(|e| ImageError::BadReference {
            reference: reference.to_string(),
            reason: e.to_string(),
        })
}

/// Every readable image record in `dir`, by id; unreadable ones are skipped with a warning.
fn load_records(dir: &Path) -> Result<BTreeMap<String, ImageRecord>, ImageError> {
    let mut images = BTreeMap::new();
    for e in std::fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .flatten()
    {
        let Ok(data) = std::fs::read(e.path()) else {
            continue;
        };
        match serde_json::from_slice::<ImageRecord>(&data) {
            Ok(rec) => {
                images.insert(rec.id.clone(), rec);
            }
            Err(err) => {
                tracing::warn!(path = %e.path().display(), %err, "skipping unreadable image record");
            }
        }
    }
    Ok(images)
}

impl ImageStore {
    /// Opens (or creates) the store at `root` and loads its image records.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        for sub in ["images", "layers", "tmp"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(io_err("create", &d))?;
        }
        // Leftovers of imports that were interrupted.
        let tmp = root.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let images = load_records(&root.join("images"))?;
        Ok(ImageStore {
            root,
            images: RwLock::new(images),
            write: Mutex::new(()),
        })
    }

    /// Reads the image records from disk again: `ferrolet-shim images import` may have added
    /// or retagged images while the server had this store open.
    pub fn reload(&self) {
        let _guard = self
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match load_records(&self.root.join("images")) {
            Ok(images) => *self.write_images() = images,
            Err(err) => tracing::warn!(%err, "re-reading the image records"),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn read_images(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ImageRecord>> {
        self.images
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write_images(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ImageRecord>> {
        self.images
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Imports every image of an OCI layout, OCI archive or docker-archive at `path`.
    pub fn import(&self, path: &Path) -> Result<Vec<ImageRecord>, ImageError> {
        let opts = ReadOptions {
            scratch_dir: Some(self.root.join("tmp")),
            ..ReadOptions::default()
        };
        let loaded =
            ferrolet_oci_image::read_images(path, &opts).map_err(|source| ImageError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        loaded.into_iter().map(|img| self.add(&img)).collect()
    }

    /// Adds one verified image: unpacks missing layers, then writes the record.
    pub fn add(&self, img: &LoadedImage) -> Result<ImageRecord, ImageError> {
        let _guard = self
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut layers = Vec::new();
        for layer in &img.layers {
            let diff = layer.diff_id.to_string();
            self.unpack(&diff, &layer.path, layer.compression)?;
            layers.push(diff);
        }
        let mut names = Vec::new();
        for n in &img.names {
            if let Ok(r) = normalize(n) {
                names.push(r.to_string());
            }
        }
        let repo_digests = names
            .iter()
            .filter_map(|n| ImageReference::parse(n).ok())
            .map(|r| format!("{}@{}", r.repository(), img.manifest_digest))
            .collect();
        let cfg = img.config.config().as_ref();
        let config = ImageConfig {
            entrypoint: cfg.and_then(|c| c.entrypoint().clone()).unwrap_or_default(),
            cmd: cfg.and_then(|c| c.cmd().clone()).unwrap_or_default(),
            env: cfg.and_then(|c| c.env().clone()).unwrap_or_default(),
            working_dir: cfg
                .and_then(|c| c.working_dir().clone())
                .unwrap_or_default(),
            user: cfg.and_then(|c| c.user().clone()).unwrap_or_default(),
            stop_signal: cfg
                .and_then(|c| c.stop_signal().clone())
                .unwrap_or_default(),
        };
        let mut rec = ImageRecord {
            id: img.config_digest.to_string(),
            repo_tags: names,
            repo_digests,
            manifest_digest: img.manifest_digest.to_string(),
            layers,
            size: img.layers.iter().map(|l| l.size).sum::<u64>() + img.config_bytes.len() as u64,
            config,
        };
        let mut images = self.write_images();
        if let Some(old) = images.get(&rec.id) {
            for t in &old.repo_tags {
                if !rec.repo_tags.contains(t) {
                    rec.repo_tags.push(t.clone());
                }
            }
            for d in &old.repo_digests {
                if !rec.repo_digests.contains(d) {
                    rec.repo_digests.push(d.clone());
                }
            }
        }
        // A name points at one image: the new one takes it from any other.
        let mut changed = Vec::new();
        for (id, other) in images.iter_mut() {
            if *id == rec.id {
                continue;
            }
            let before = other.repo_tags.len();
            other.repo_tags.retain(|t| !rec.repo_tags.contains(t));
            if other.repo_tags.len() != before {
                changed.push(other.clone());
            }
        }
        for other in &changed {
            self.save(other)?;
        }
        self.save(&rec)?;
        images.insert(rec.id.clone(), rec.clone());
        tracing::info!(image = %rec.id, names = ?rec.repo_tags, "image imported");
        Ok(rec)
    }

    fn save(&self, rec: &ImageRecord) -> Result<(), ImageError> {
        let dir = self.root.join("images");
        let data = serde_json::to_vec(rec).map_err(|e| ImageError::Io {
            op: "encode",
            path: dir.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&dir, &format!("{}.json", hex_of(&rec.id)), &data)
            .map_err(io_err("write record", &dir))
    }

    /// Directory of an unpacked layer.
    pub fn layer_dir(&self, diff_id: &str) -> PathBuf {
        self.root.join("layers").join(hex_of(diff_id))
    }

    fn unpack(
        &self,
        diff_id: &str,
        blob: &Path,
        compression: LayerCompression,
    ) -> Result<(), ImageError> {
        let dest = self.layer_dir(diff_id);
        if dest.exists() {
            return Ok(());
        }
        let tmp =
            self.root
                .join("tmp")
                .join(format!("layer-{}-{}", hex_of(diff_id), std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let result = (|| {
            let f = std::fs::File::open(blob).map_err(io_err("open", blob))?;
            let reader = std::io::BufReader::new(f);
            let res = match compression {
                LayerCompression::Gzip => {
                    unpack::unpack_layer(flate2::read::MultiGzDecoder::new(reader), &tmp)
                }
                LayerCompression::None => unpack::unpack_layer(reader, &tmp),
            };
            res.map_err(|source| ImageError::Unpack {
                diff_id: diff_id.to_string(),
                source,
            })?;
            std::fs::rename(&tmp, &dest).map_err(io_err("rename", &dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// All images, sorted by id.
    pub fn list(&self) -> Vec<ImageRecord> {
        self.reload();
        self.read_images().values().cloned().collect()
    }

    /// Finds an image by id (`sha256:...`, or the bare hex), by name, or by `name@digest`;
    /// on a miss, looks at the records on disk again before saying no.
    pub fn resolve(&self, reference: &str) -> Option<ImageRecord> {
        self.resolve_loaded(reference).or_else(|| {
            self.reload();
            self.resolve_loaded(reference)
        })
    }

    fn resolve_loaded(&self, reference: &str) -> Option<ImageRecord> {
        let images = self.read_images();
        let reference = reference.trim();
        if reference.is_empty() {
            return None;
        }
        let bare = hex_of(reference);
        if bare.len() == 64 && bare.bytes().all(|b| b.is_ascii_hexdigit()) {
            let id = format!("sha256:{bare}");
            if let Some(r) = images.get(&id) {
                return Some(r.clone());
            }
            if let Some(r) = images.values().find(|r| r.manifest_digest == id) {
                return Some(r.clone());
            }
        }
        let r = normalize(reference).ok()?;
        if let Some(d) = r.digest() {
            let want = format!("{}@{d}", r.repository());
            return images
                .values()
                .find(|rec| rec.repo_digests.contains(&want))
                .cloned();
        }
        let name = r.to_string();
        images
            .values()
            .find(|rec| rec.repo_tags.contains(&name))
            .cloned()
    }

    /// Lower directories for an overlay of the image, topmost first.
    pub fn lower_dirs(&self, rec: &ImageRecord) -> Vec<PathBuf> {
        rec.layers.iter().rev().map(|d| self.layer_dir(d)).collect()
    }

    /// Removes an image and the layers no other image uses. Returns whether it existed.
    pub fn remove(&self, id: &str) -> Result<bool, ImageError> {
        let _guard = self
            .write
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut images = self.write_images();
        let Some(rec) = images.remove(id) else {
            return Ok(false);
        };
        let file = self
            .root
            .join("images")
            .join(format!("{}.json", hex_of(&rec.id)));
        if let Err(e) = std::fs::remove_file(&file)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            images.insert(rec.id.clone(), rec);
            return Err(io_err("remove", &file)(e));
        }
        for layer in &rec.layers {
            if !images.values().any(|r| r.layers.contains(layer)) {
                let dir = self.layer_dir(layer);
                // Rename first so a half-deleted layer is never mistaken for a complete one.
                let trash = self.root.join("tmp").join(format!("rm-{}", hex_of(layer)));
                if std::fs::rename(&dir, &trash).is_ok() {
                    let _ = std::fs::remove_dir_all(&trash);
                }
            }
        }
        Ok(true)
    }

    /// Bytes and inodes used by unpacked layers.
    pub fn usage(&self) -> (u64, u64) {
        let mut bytes = 0;
        let mut inodes = 0;
        let mut stack = vec![self.root.join("layers")];
        while let Some(d) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in entries.flatten() {
                inodes += 1;
                if let Ok(md) = e.metadata() {
                    if md.is_dir() {
                        stack.push(e.path());
                    } else {
                        bytes += md.len();
                    }
                }
            }
        }
        (bytes, inodes)
    }
}
