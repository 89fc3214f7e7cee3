//! Reading an image back from an OCI layout, an OCI archive or a docker-archive, verifying
//! every digest and size on the way: the blobs against their descriptors and the uncompressed
//! layers against the config's diff ids.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use flate2::bufread::MultiGzDecoder;
use oci_spec::image::{
    Arch, Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, ImageManifestBuilder,
    MediaType, OciLayout, Os,
};
use tempfile::TempDir;

use crate::build::ImageFormat;
use crate::config::host_arch;
use crate::digest::{HashingReader, HashingWriter, sha256_hex, sha256_of};
use crate::layout::{
    ANNOTATION_CONTAINERD_IMAGE_NAME, ANNOTATION_REF_NAME, BLOBS_DIR, DOCKER_MANIFEST_FILE,
    DockerManifestEntry, INDEX_FILE, OCI_LAYOUT_FILE, canonical_json,
};

/// JSON documents (index, manifest, config) larger than this are refused rather than read
/// into memory: real ones are a few KiB.
pub const MAX_JSON_SIZE: u64 = 4 << 20;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_FOREIGN_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot open image {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("{path} is not an image: it has neither {OCI_LAYOUT_FILE} nor {DOCKER_MANIFEST_FILE}")]
    NotAnImage { path: PathBuf },
    #[error("archive entry {entry:?} would be written outside the archive root")]
    UnsafePath { entry: String },
    #[error("archive entry {entry:?} is a {kind}; image archives hold only files and directories")]
    UnsupportedEntry { entry: String, kind: String },
    #[error("cannot unpack the archive {path}: {source}")]
    Unpack { path: PathBuf, source: io::Error },
    #[error("unsupported OCI layout version {found:?} (expected 1.0.0)")]
    LayoutVersion { found: String },
    #[error("{what} is missing from the image ({path})")]
    Missing { what: String, path: PathBuf },
    #[error("cannot read {what} ({path}): {source}")]
    Io {
        what: String,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{what} is not valid JSON of its kind: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
    #[error("{what} is {size} bytes, more than the {MAX_JSON_SIZE} bytes allowed")]
    TooLarge { what: String, size: u64 },
    #[error("{what}: digest {digest} uses an unsupported algorithm (only sha256 is supported)")]
    UnsupportedDigest { what: String, digest: String },
    #[error("{what}: invalid digest {digest:?}: {reason}")]
    BadDigest {
        what: String,
        digest: String,
        reason: String,
    },
    #[error("{what}: content has digest {actual}, expected {expected}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what}: content is {actual} bytes, expected {expected}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: unsupported media type {media_type}")]
    UnsupportedMediaType { what: String, media_type: String },
    #[error("{what}: unsupported schema version {found} (expected 2)")]
    SchemaVersion { what: String, found: u32 },
    #[error("the manifest lists {layers} layers but the config lists {diff_ids} diff ids")]
    LayerCount { layers: usize, diff_ids: usize },
    #[error(
        "layer {index} ({digest}): uncompressed content has digest {actual}, the config says {expected}"
    )]
    DiffIdMismatch {
        index: usize,
        digest: String,
        expected: String,
        actual: String,
    },
    #[error("layer {index} ({path}) cannot be decompressed: {source}")]
    CorruptLayer {
        index: usize,
        path: PathBuf,
        source: io::Error,
    },
    #[error("image index {digest} has no manifest for {os}/{arch}")]
    NoPlatform {
        digest: String,
        os: String,
        arch: String,
    },
    #[error("{path} holds no image")]
    Empty { path: PathBuf },
    #[error("{path} holds {count} images ({names}); expected exactly one")]
    Ambiguous {
        path: PathBuf,
        count: usize,
        names: String,
    },
}

/// How layers are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    None,
    Gzip,
}

/// A verified layer blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedLayer {
    pub media_type: MediaType,
    /// Digest of the blob as stored (compressed).
    pub digest: Digest,
    pub size: u64,
    /// Digest of the uncompressed tar.
    pub diff_id: Digest,
    pub compression: LayerCompression,
    /// Where the blob is; valid while the [`LoadedImage`] lives.
    pub path: PathBuf,
}

/// An image read from disk with all its digests checked.
#[derive(Debug, Clone)]
pub struct LoadedImage {
    pub format: ImageFormat,
    /// Full image names: `io.containerd.image.name` of an OCI index entry, or the `RepoTags`
    /// of a docker-archive.
    pub names: Vec<String>,
    /// The `org.opencontainers.image.ref.name` annotation (usually just the tag).
    pub ref_name: Option<String>,
    pub manifest: ImageManifest,
    /// The manifest bytes as stored. A docker-archive has no manifest: one is made from its
    /// `manifest.json`, so its digest is ours, not what another importer would compute.
    pub manifest_bytes: Vec<u8>,
    pub manifest_digest: Digest,
    pub config: ImageConfiguration,
    pub config_bytes: Vec<u8>,
    pub config_digest: Digest,
    pub layers: Vec<LoadedLayer>,
    /// Keeps an unpacked archive on disk while any image read from it is alive.
    _unpacked: Option<Arc<TempDir>>,
}

/// Where to unpack archives and which platform to pick from a multi-platform index.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Directory for the temporary copy of an unpacked archive (default: the system temp
    /// dir). Put it on the filesystem the blobs will be moved to, so moving is a rename.
    pub scratch_dir: Option<PathBuf>,
    pub os: Os,
    pub arch: Arch,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            scratch_dir: None,
            os: Os::Linux,
            arch: host_arch(),
        }
    }
}

/// Reads the single image at `path`; an error if it holds none or several.
pub fn read_image(path: &Path, options: &ReadOptions) -> Result<LoadedImage, ReadError> {
    let mut images = read_images(path, options)?;
    match images.len() {
        1 => Ok(images.remove(0)),
        0 => Err(ReadError::Empty {
            path: path.to_owned(),
        }),
        count => Err(ReadError::Ambiguous {
            path: path.to_owned(),
            count,
            names: images
                .iter()
                .map(|i| {
                    i.names
                        .first()
                        .map_or(i.manifest_digest.to_string(), Clone::clone)
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// Reads every image at `path`: an OCI layout directory, an OCI archive or a docker-archive
/// (tar, optionally gzip-compressed; the format is detected from the content).
pub fn read_images(path: &Path, options: &ReadOptions) -> Result<Vec<LoadedImage>, ReadError> {
    let meta = fs::metadata(path).map_err(|source| ReadError::Open {
        path: path.to_owned(),
        source,
    })?;
    let (root, unpacked) = if meta.is_dir() {
        (path.to_owned(), None)
    } else {
        let scratch = options
            .scratch_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix(".ferrolet-image-read-")
            .tempdir_in(&scratch)
            .map_err(|source| ReadError::Unpack {
                path: scratch.clone(),
                source,
            })?;
        unpack(path, dir.path())?;
        (dir.path().to_owned(), Some(Arc::new(dir)))
    };
    let reader = Reader {
        root: &root,
        options,
        unpacked,
    };
    if root.join(OCI_LAYOUT_FILE).exists() {
        let format = if meta.is_dir() {
            ImageFormat::OciLayout
        } else {
            ImageFormat::OciArchive
        };
        reader.read_layout(format)
    } else if root.join(DOCKER_MANIFEST_FILE).exists() {
        reader.read_docker()
    } else {
        Err(ReadError::NotAnImage {
            path: path.to_owned(),
        })
    }
}

/// Unpacks a (possibly gzip-compressed) tar of files and directories into `into`, refusing
/// anything that could land outside it.
fn unpack(archive: &Path, into: &Path) -> Result<(), ReadError> {
    let unpack_err = |source| ReadError::Unpack {
        path: archive.to_owned(),
        source,
    };
    let file = File::open(archive).map_err(|source| ReadError::Open {
        path: archive.to_owned(),
        source,
    })?;
    let mut buffered = BufReader::new(file);
    let gzipped = buffered
        .fill_buf()
        .map_err(unpack_err)?
        .starts_with(&GZIP_MAGIC);
    let stream: Box<dyn Read> = if gzipped {
        Box::new(MultiGzDecoder::new(buffered))
    } else {
        Box::new(buffered)
    };
    let mut tar = tar::Archive::new(stream);
    for entry in tar.entries().map_err(unpack_err)? {
        let mut entry = entry.map_err(unpack_err)?;
        let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let Some(relative) = safe_relative(&name) else {
            return Err(ReadError::UnsafePath { entry: name });
        };
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue;
        }
        let target = into.join(&relative);
        if kind.is_dir() {
            fs::create_dir_all(&target).map_err(unpack_err)?;
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            if relative.as_os_str().is_empty() {
                return Err(ReadError::UnsafePath { entry: name });
            }
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(unpack_err)?;
            }
            let mut file = File::create(&target).map_err(unpack_err)?;
            io::copy(&mut entry, &mut file).map_err(unpack_err)?;
        } else {
            return Err(ReadError::UnsupportedEntry {
                entry: name,
                kind: format!("{kind:?}").to_lowercase(),
            });
        }
    }
    Ok(())
}

/// `name` as a path below the archive root, or `None` if it is absolute or climbs out.
fn safe_relative(name: &str) -> Option<PathBuf> {
    let mut path = PathBuf::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => path.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(path)
}

struct Reader<'a> {
    root: &'a Path,
    options: &'a ReadOptions,
    unpacked: Option<Arc<TempDir>>,
}

/// The names an index entry gives its image.
struct Names {
    names: Vec<String>,
    ref_name: Option<String>,
}

impl Reader<'_> {
    fn read_layout(&self, format: ImageFormat) -> Result<Vec<LoadedImage>, ReadError> {
        let layout: OciLayout = parse_json(
            OCI_LAYOUT_FILE,
            &self.read_json_file(OCI_LAYOUT_FILE, &self.root.join(OCI_LAYOUT_FILE))?,
        )?;
        if layout.image_layout_version() != "1.0.0" {
            return Err(ReadError::LayoutVersion {
                found: layout.image_layout_version().clone(),
            });
        }
        let index: ImageIndex = parse_json(
            INDEX_FILE,
            &self.read_json_file(INDEX_FILE, &self.root.join(INDEX_FILE))?,
        )?;
        check_schema(INDEX_FILE, index.schema_version())?;
        let mut images = Vec::new();
        for descriptor in index.manifests() {
            let annotations = descriptor.annotations().clone().unwrap_or_default();
            let names = Names {
                names: annotations
                    .get(ANNOTATION_CONTAINERD_IMAGE_NAME)
                    .cloned()
                    .into_iter()
                    .collect(),
                ref_name: annotations.get(ANNOTATION_REF_NAME).cloned(),
            };
            let media_type = descriptor.media_type();
            if is_manifest(media_type) {
                images.push(self.read_manifest(format, descriptor, names)?);
            } else if is_index(media_type) {
                let what = format!("image index {}", descriptor.digest());
                let nested: ImageIndex =
                    parse_json(&what, &self.read_json_blob(&what, descriptor)?)?;
                check_schema(&what, nested.schema_version())?;
                let chosen = nested
                    .manifests()
                    .iter()
                    .find(|m| is_manifest(m.media_type()) && self.platform_matches(m))
                    .ok_or_else(|| ReadError::NoPlatform {
                        digest: descriptor.digest().to_string(),
                        os: self.options.os.to_string(),
                        arch: self.options.arch.to_string(),
                    })?;
                images.push(self.read_manifest(format, chosen, names)?);
            } else {
                tracing::debug!(media_type = %media_type, "skipping index entry that is not an image");
            }
        }
        Ok(images)
    }

    fn platform_matches(&self, descriptor: &Descriptor) -> bool {
        descriptor
            .platform()
            .as_ref()
            .is_none_or(|p| *p.os() == self.options.os && *p.architecture() == self.options.arch)
    }

    fn read_manifest(
        &self,
        format: ImageFormat,
        descriptor: &Descriptor,
        names: Names,
    ) -> Result<LoadedImage, ReadError> {
        let what = format!("image manifest {}", descriptor.digest());
        let manifest_bytes = self.read_json_blob(&what, descriptor)?;
        let manifest: ImageManifest = parse_json(&what, &manifest_bytes)?;
        check_schema(&what, manifest.schema_version())?;
        let config_descriptor = manifest.config().clone();
        let config_descriptor = &config_descriptor;
        let config_what = format!("image config {}", config_descriptor.digest());
        let config_media = config_descriptor.media_type();
        if !(*config_media == MediaType::ImageConfig || config_media.as_ref() == DOCKER_CONFIG) {
            return Err(ReadError::UnsupportedMediaType {
                what: config_what,
                media_type: config_media.to_string(),
            });
        }
        let config_bytes = self.read_json_blob(&config_what, config_descriptor)?;
        let config: ImageConfiguration = parse_json(&config_what, &config_bytes)?;
        let mut layers = Vec::with_capacity(manifest.layers().len());
        for (index, layer) in manifest.layers().iter().enumerate() {
            let compression = layer_compression(layer.media_type()).ok_or_else(|| {
                ReadError::UnsupportedMediaType {
                    what: format!("layer {index} ({})", layer.digest()),
                    media_type: layer.media_type().to_string(),
                }
            })?;
            let path = self.blob_path(&format!("layer {index}"), layer.digest())?;
            let verified = verify_layer(index, &path, Some(compression))?;
            check_blob(
                &format!("layer {index}"),
                layer,
                &verified.digest,
                verified.size,
            )?;
            layers.push(LoadedLayer {
                media_type: layer.media_type().clone(),
                digest: verified.digest.clone(),
                size: verified.size,
                compression: verified.compression,
                diff_id: verified.diff_id(index, &path)?,
                path,
            });
        }
        check_diff_ids(&config, &layers)?;
        Ok(LoadedImage {
            format,
            names: names.names,
            ref_name: names.ref_name,
            manifest,
            manifest_digest: descriptor.digest().clone(),
            manifest_bytes,
            config,
            config_digest: config_descriptor.digest().clone(),
            config_bytes,
            layers,
            _unpacked: self.unpacked.clone(),
        })
    }

    fn read_docker(&self) -> Result<Vec<LoadedImage>, ReadError> {
        let manifest_path = self.root.join(DOCKER_MANIFEST_FILE);
        let entries: Vec<DockerManifestEntry> = parse_json(
            DOCKER_MANIFEST_FILE,
            &self.read_json_file(DOCKER_MANIFEST_FILE, &manifest_path)?,
        )?;
        let mut images = Vec::with_capacity(entries.len());
        for entry in entries {
            let config_path = self.archive_path(&entry.config)?;
            let config_what = format!("image config {}", entry.config);
            let config_bytes = self.read_json_file(&config_what, &config_path)?;
            let config: ImageConfiguration = parse_json(&config_what, &config_bytes)?;
            let config_digest = sha256_of(&config_bytes);

            let mut layers = Vec::with_capacity(entry.layers.len());
            for (index, name) in entry.layers.iter().enumerate() {
                let path = self.archive_path(name)?;
                let verified = verify_layer(index, &path, None)?;
                let media_type = match verified.compression {
                    LayerCompression::Gzip => MediaType::ImageLayerGzip,
                    LayerCompression::None => MediaType::ImageLayer,
                };
                layers.push(LoadedLayer {
                    media_type,
                    digest: verified.digest.clone(),
                    size: verified.size,
                    compression: verified.compression,
                    diff_id: verified.diff_id(index, &path)?,
                    path,
                });
            }
            check_diff_ids(&config, &layers)?;

            let manifest = ImageManifestBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageManifest)
                .config(Descriptor::new(
                    MediaType::ImageConfig,
                    config_bytes.len() as u64,
                    config_digest.clone(),
                ))
                .layers(
                    layers
                        .iter()
                        .map(|l| Descriptor::new(l.media_type.clone(), l.size, l.digest.clone()))
                        .collect::<Vec<_>>(),
                )
                .build()
                .map_err(|e| ReadError::Json {
                    what: "manifest made from manifest.json".to_owned(),
                    source: serde::de::Error::custom(e),
                })?;
            let manifest_bytes = canonical_json(&manifest).map_err(|source| ReadError::Json {
                what: "manifest made from manifest.json".to_owned(),
                source,
            })?;
            images.push(LoadedImage {
                format: ImageFormat::DockerArchive,
                names: entry.repo_tags.unwrap_or_default(),
                ref_name: None,
                manifest_digest: sha256_of(&manifest_bytes),
                manifest,
                manifest_bytes,
                config,
                config_bytes,
                config_digest,
                layers,
                _unpacked: self.unpacked.clone(),
            });
        }
        Ok(images)
    }

    /// A path named inside a docker-archive's manifest.json, kept inside the archive root.
    fn archive_path(&self, name: &str) -> Result<PathBuf, ReadError> {
        match safe_relative(name) {
            Some(relative) if !relative.as_os_str().is_empty() => Ok(self.root.join(relative)),
            _ => Err(ReadError::UnsafePath {
                entry: name.to_owned(),
            }),
        }
    }

    fn blob_path(&self, what: &str, digest: &Digest) -> Result<PathBuf, ReadError> {
        let hex = sha256_hex(digest).ok_or_else(|| ReadError::UnsupportedDigest {
            what: what.to_owned(),
            digest: digest.to_string(),
        })?;
        Ok(self.root.join(BLOBS_DIR).join(hex))
    }

    /// Reads a small JSON file whole, refusing oversized ones before reading them.
    fn read_json_file(&self, what: &str, path: &Path) -> Result<Vec<u8>, ReadError> {
        let io_err = |source: io::Error| {
            if source.kind() == io::ErrorKind::NotFound {
                ReadError::Missing {
                    what: what.to_owned(),
                    path: path.to_owned(),
                }
            } else {
                ReadError::Io {
                    what: what.to_owned(),
                    path: path.to_owned(),
                    source,
                }
            }
        };
        let file = File::open(path).map_err(io_err)?;
        let size = file.metadata().map_err(io_err)?.len();
        if size > MAX_JSON_SIZE {
            return Err(ReadError::TooLarge {
                what: what.to_owned(),
                size,
            });
        }
        let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        file.take(MAX_JSON_SIZE + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        Ok(bytes)
    }

    /// Reads a JSON blob named by `descriptor` and checks its size and digest.
    fn read_json_blob(&self, what: &str, descriptor: &Descriptor) -> Result<Vec<u8>, ReadError> {
        if descriptor.size() > MAX_JSON_SIZE {
            return Err(ReadError::TooLarge {
                what: what.to_owned(),
                size: descriptor.size(),
            });
        }
        let path = self.blob_path(what, descriptor.digest())?;
        let bytes = self.read_json_file(what, &path)?;
        check_blob(what, descriptor, &sha256_of(&bytes), bytes.len() as u64)?;
        Ok(bytes)
    }
}

fn parse_json<T: serde::de::DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, ReadError> {
    serde_json::from_slice(bytes).map_err(|source| ReadError::Json {
        what: what.to_owned(),
        source,
    })
}

fn check_schema(what: &str, found: u32) -> Result<(), ReadError> {
    if found == 2 {
        Ok(())
    } else {
        Err(ReadError::SchemaVersion {
            what: what.to_owned(),
            found,
        })
    }
}

fn check_blob(
    what: &str,
    descriptor: &Descriptor,
    actual: &Digest,
    size: u64,
) -> Result<(), ReadError> {
    if size != descriptor.size() {
        return Err(ReadError::SizeMismatch {
            what: what.to_owned(),
            expected: descriptor.size(),
            actual: size,
        });
    }
    if actual != descriptor.digest() {
        return Err(ReadError::DigestMismatch {
            what: what.to_owned(),
            expected: descriptor.digest().to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
}

fn check_diff_ids(config: &ImageConfiguration, layers: &[LoadedLayer]) -> Result<(), ReadError> {
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(ReadError::LayerCount {
            layers: layers.len(),
            diff_ids: diff_ids.len(),
        });
    }
    for (index, (layer, expected)) in layers.iter().zip(diff_ids).enumerate() {
        let expected_digest: Digest =
            expected
                .parse()
                .map_err(|e: oci_spec::OciSpecError| ReadError::BadDigest {
                    what: format!("diff id {index}"),
                    digest: expected.clone(),
                    reason: e.to_string(),
                })?;
        if expected_digest != layer.diff_id {
            return Err(ReadError::DiffIdMismatch {
                index,
                digest: layer.digest.to_string(),
                expected: expected.clone(),
                actual: layer.diff_id.to_string(),
            });
        }
    }
    Ok(())
}

fn is_manifest(media_type: &MediaType) -> bool {
    *media_type == MediaType::ImageManifest || media_type.as_ref() == DOCKER_MANIFEST
}

fn is_index(media_type: &MediaType) -> bool {
    *media_type == MediaType::ImageIndex || media_type.as_ref() == DOCKER_MANIFEST_LIST
}

fn layer_compression(media_type: &MediaType) -> Option<LayerCompression> {
    match media_type {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => {
            Some(LayerCompression::None)
        }
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => {
            Some(LayerCompression::Gzip)
        }
        MediaType::Other(other) => match other.as_str() {
            DOCKER_LAYER_TAR => Some(LayerCompression::None),
            DOCKER_LAYER_GZIP | DOCKER_FOREIGN_LAYER_GZIP => Some(LayerCompression::Gzip),
            _ => None,
        },
        _ => None,
    }
}

struct VerifiedLayer {
    digest: Digest,
    size: u64,
    /// Why the content could not be decompressed, if it could not; the blob digest is still
    /// computed so a tampered blob is reported as such rather than as corrupt.
    diff_id: Result<Digest, io::Error>,
    compression: LayerCompression,
}

impl VerifiedLayer {
    fn diff_id(self, index: usize, path: &Path) -> Result<Digest, ReadError> {
        self.diff_id.map_err(|source| ReadError::CorruptLayer {
            index,
            path: path.to_owned(),
            source,
        })
    }
}

/// Hashes a layer blob and its uncompressed content in one pass. `compression` comes from
/// the media type; without one (docker-archive) it is detected from the gzip magic.
fn verify_layer(
    index: usize,
    path: &Path,
    compression: Option<LayerCompression>,
) -> Result<VerifiedLayer, ReadError> {
    let what = format!("layer {index}");
    let io_err = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            ReadError::Missing {
                what: what.clone(),
                path: path.to_owned(),
            }
        } else {
            ReadError::Io {
                what: what.clone(),
                path: path.to_owned(),
                source,
            }
        }
    };
    let file = File::open(path).map_err(io_err)?;
    let mut blob = BufReader::new(HashingReader::new(file));
    let compression = match compression {
        Some(c) => c,
        None if blob.fill_buf().map_err(io_err)?.starts_with(&GZIP_MAGIC) => LayerCompression::Gzip,
        None => LayerCompression::None,
    };
    let mut content = HashingWriter::new(io::sink());
    let (mut blob, decoded) = match compression {
        LayerCompression::None => {
            io::copy(&mut blob, &mut content).map_err(io_err)?;
            (blob, Ok(()))
        }
        LayerCompression::Gzip => {
            let mut decoder = MultiGzDecoder::new(blob);
            let decoded = io::copy(&mut decoder, &mut content).map(drop);
            (decoder.into_inner(), decoded)
        }
    };
    // The digest covers every byte of the blob, including any the decoder left unread.
    io::copy(&mut blob, &mut io::sink()).map_err(io_err)?;
    let (digest, size) = blob.into_inner().finish();
    let (_, diff_id, _) = content.into_parts();
    Ok(VerifiedLayer {
        digest,
        size,
        diff_id: decoded.map(|()| diff_id),
        compression,
    })
}
