//! Building an image from directory trees and writing it as an OCI layout, an OCI archive or
//! a docker-archive.
//!
//! Every output is first written to a temporary name beside the target and renamed into place
//! at the end, so an error never leaves a half-written image where the caller asked for one.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use oci_spec::OciSpecError;
use oci_spec::image::{
    Arch, Descriptor, Digest, ImageConfiguration, ImageIndexBuilder, ImageManifestBuilder,
    MediaType, OciLayoutBuilder, Os, PlatformBuilder, RootFs,
};
use tempfile::TempDir;

use crate::config::ImageSettings;
use crate::digest::{sha256_hex, sha256_of};
use crate::layer::{LayerBlob, LayerError, Ownership, write_layer};
use crate::layout::{
    ANNOTATION_CONTAINERD_IMAGE_NAME, ANNOTATION_REF_NAME, BLOBS_DIR, DOCKER_MANIFEST_FILE,
    DockerManifestEntry, INDEX_FILE, OCI_LAYOUT_FILE, OCI_LAYOUT_VERSION, TarSource,
    canonical_json, write_deterministic_tar,
};
use crate::reference::ImageReference;

/// Prefix of the temporary files and directories written beside an output.
const TEMP_PREFIX: &str = ".ferrolet-image-";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("image reference {reference} has a digest; an image being built is named by tag")]
    DigestInReference { reference: String },
    #[error("no root filesystem given: an image needs at least one layer")]
    NoLayers,
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("output directory {path} does not exist")]
    OutputDirMissing { path: PathBuf },
    #[error("output {path} already exists; an OCI layout is only written to a new path")]
    OutputExists { path: PathBuf },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot encode the {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("cannot assemble the {what}: {source}")]
    Spec {
        what: &'static str,
        source: OciSpecError,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BuildError + 'a {
    move |source| BuildError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The file formats an image is written in and read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// A directory: `oci-layout`, `index.json`, `blobs/sha256/*`.
    OciLayout,
    /// The same layout as one tar file.
    OciArchive,
    /// A `docker save` tar: `manifest.json` naming the config and layer blobs.
    DockerArchive,
}

impl ImageFormat {
    pub const ALL: [Self; 3] = [Self::OciLayout, Self::OciArchive, Self::DockerArchive];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::OciLayout => "oci-layout",
            Self::OciArchive => "oci-archive",
            Self::DockerArchive => "docker-archive",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown image format {input:?} (expected oci-layout, oci-archive or docker-archive)")]
pub struct UnknownFormat {
    pub input: String,
}

impl FromStr for ImageFormat {
    type Err = UnknownFormat;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|f| f.as_str() == input)
            .ok_or_else(|| UnknownFormat {
                input: input.to_owned(),
            })
    }
}

/// Everything an image is built from.
#[derive(Debug, Clone)]
pub struct ImageSpec {
    /// The name the image gets; `latest` is used when it has no tag.
    pub reference: ImageReference,
    /// One directory tree per layer, base layer first.
    pub layers: Vec<PathBuf>,
    pub settings: ImageSettings,
    pub ownership: Ownership,
}

/// An image that has been written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltImage {
    pub reference: ImageReference,
    pub format: ImageFormat,
    pub output: PathBuf,
    /// Digest of the image manifest; `ctr images ls` shows it for an imported OCI archive.
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub layers: Vec<LayerBlob>,
}

/// Builds the image described by `spec` and writes it to `output` in `format`.
pub fn build_image(
    spec: &ImageSpec,
    format: ImageFormat,
    output: &Path,
) -> Result<BuiltImage, BuildError> {
    let parent = output_parent(output)?;
    let staged = StagedImage::build(spec, &parent)?;
    staged.write(format, output)
}

/// An image whose blobs have been built into a private temporary directory, ready to be
/// written in any number of formats without building the layers again.
#[derive(Debug)]
pub struct StagedImage {
    dir: TempDir,
    reference: ImageReference,
    os: Os,
    arch: Arch,
    manifest: Blob,
    config: Blob,
    layers: Vec<LayerBlob>,
}

#[derive(Debug, Clone)]
struct Blob {
    digest: Digest,
    size: u64,
}

impl StagedImage {
    /// Builds layers, config and manifest into a temporary directory inside `scratch`,
    /// which is removed again when the staged image is dropped.
    pub fn build(spec: &ImageSpec, scratch: &Path) -> Result<Self, BuildError> {
        if spec.reference.digest().is_some() {
            return Err(BuildError::DigestInReference {
                reference: spec.reference.to_string(),
            });
        }
        if spec.layers.is_empty() {
            return Err(BuildError::NoLayers);
        }
        let reference = spec.reference.clone().with_default_tag();
        let dir = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempdir_in(scratch)
            .map_err(io_err("create a staging directory in", scratch))?;
        let blobs = dir.path().join(BLOBS_DIR);
        fs::create_dir_all(&blobs).map_err(io_err("create", &blobs))?;

        let mut layers = Vec::with_capacity(spec.layers.len());
        for (i, rootfs) in spec.layers.iter().enumerate() {
            let partial = dir.path().join(format!("layer-{i}.partial"));
            let layer = write_layer(rootfs, spec.ownership, &partial)?;
            let blob = blob_path(dir.path(), &layer.digest);
            fs::rename(&partial, &blob).map_err(io_err("rename a layer to", &blob))?;
            tracing::debug!(rootfs = %rootfs.display(), digest = %layer.digest, "built layer");
            layers.push(layer);
        }

        let mut config = ImageConfiguration::default();
        config.set_os(spec.settings.os.clone());
        config.set_architecture(spec.settings.arch.clone());
        config.set_config(Some(spec.settings.to_oci()));
        let mut rootfs = RootFs::default();
        rootfs.set_diff_ids(layers.iter().map(|l| l.diff_id.to_string()).collect());
        config.set_rootfs(rootfs);
        let config_bytes = encode("image config", &config)?;
        let config = store_blob(dir.path(), &config_bytes)?;

        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config.size,
                config.digest.clone(),
            ))
            .layers(
                layers
                    .iter()
                    .map(|l| Descriptor::new(MediaType::ImageLayerGzip, l.size, l.digest.clone()))
                    .collect::<Vec<_>>(),
            )
            .build()
            .map_err(|source| BuildError::Spec {
                what: "image manifest",
                source,
            })?;
        let manifest = store_blob(dir.path(), &encode("image manifest", &manifest)?)?;

        Ok(Self {
            dir,
            reference,
            os: spec.settings.os.clone(),
            arch: spec.settings.arch.clone(),
            manifest,
            config,
            layers,
        })
    }

    pub fn reference(&self) -> &ImageReference {
        &self.reference
    }

    pub fn manifest_digest(&self) -> &Digest {
        &self.manifest.digest
    }

    pub fn config_digest(&self) -> &Digest {
        &self.config.digest
    }

    pub fn layers(&self) -> &[LayerBlob] {
        &self.layers
    }

    /// Writes the image to `output` in `format`, atomically: a new OCI layout directory, or
    /// an archive file that replaces whatever file was there.
    pub fn write(&self, format: ImageFormat, output: &Path) -> Result<BuiltImage, BuildError> {
        let parent = output_parent(output)?;
        match format {
            ImageFormat::OciLayout => self.write_layout_dir(&parent, output)?,
            ImageFormat::OciArchive | ImageFormat::DockerArchive => {
                self.write_archive(format, &parent, output)?;
            }
        }
        tracing::info!(
            image = %self.reference,
            format = %format,
            output = %output.display(),
            digest = %self.manifest.digest,
            "wrote image"
        );
        Ok(BuiltImage {
            reference: self.reference.clone(),
            format,
            output: output.to_owned(),
            manifest_digest: self.manifest.digest.clone(),
            config_digest: self.config.digest.clone(),
            layers: self.layers.clone(),
        })
    }

    /// All blob digests: manifest, config, then layers (a layer used twice appears twice).
    fn blob_digests(&self) -> impl Iterator<Item = &Digest> {
        [&self.manifest.digest, &self.config.digest]
            .into_iter()
            .chain(self.layers.iter().map(|l| &l.digest))
    }

    fn index_json(&self) -> Result<Vec<u8>, BuildError> {
        let platform = PlatformBuilder::default()
            .os(self.os.clone())
            .architecture(self.arch.clone())
            .build()
            .map_err(|source| BuildError::Spec {
                what: "platform",
                source,
            })?;
        let mut manifest = Descriptor::new(
            MediaType::ImageManifest,
            self.manifest.size,
            self.manifest.digest.clone(),
        );
        manifest.set_platform(Some(platform));
        // containerd names an imported image after its own annotation; the OCI one carries
        // only the tag, as the layout convention (and containerd's own export) has it.
        let mut annotations = HashMap::from([(
            ANNOTATION_CONTAINERD_IMAGE_NAME.to_owned(),
            self.reference.to_string(),
        )]);
        if let Some(tag) = self.reference.tag() {
            annotations.insert(ANNOTATION_REF_NAME.to_owned(), tag.to_owned());
        }
        manifest.set_annotations(Some(annotations));
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![manifest])
            .build()
            .map_err(|source| BuildError::Spec {
                what: "image index",
                source,
            })?;
        encode("image index", &index)
    }

    fn layout_json() -> Result<Vec<u8>, BuildError> {
        let layout = OciLayoutBuilder::default()
            .image_layout_version(OCI_LAYOUT_VERSION)
            .build()
            .map_err(|source| BuildError::Spec {
                what: "oci-layout",
                source,
            })?;
        encode("oci-layout", &layout)
    }

    fn docker_manifest_json(&self) -> Result<Vec<u8>, BuildError> {
        let entry = DockerManifestEntry {
            config: blob_name(&self.config.digest),
            repo_tags: Some(vec![self.reference.to_string()]),
            layers: self.layers.iter().map(|l| blob_name(&l.digest)).collect(),
        };
        encode("docker manifest", &[entry])
    }

    fn write_layout_dir(&self, parent: &Path, output: &Path) -> Result<(), BuildError> {
        if fs::symlink_metadata(output).is_ok() {
            return Err(BuildError::OutputExists {
                path: output.to_owned(),
            });
        }
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempdir_in(parent)
            .map_err(io_err("create a temporary directory in", parent))?;
        let root = tmp.path();
        write_file(&root.join(OCI_LAYOUT_FILE), &Self::layout_json()?)?;
        write_file(&root.join(INDEX_FILE), &self.index_json()?)?;
        let blobs = root.join(BLOBS_DIR);
        fs::create_dir_all(&blobs).map_err(io_err("create", &blobs))?;
        for digest in self.blob_digests() {
            let from = blob_path(self.dir.path(), digest);
            let to = blob_path(root, digest);
            if to.exists() {
                continue;
            }
            if fs::hard_link(&from, &to).is_err() {
                fs::copy(&from, &to).map_err(io_err("copy a blob to", &to))?;
            }
        }
        // TempDir's permissions are private; a layout is meant to be shared like any output.
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))
            .map_err(io_err("set permissions of", root))?;
        let root = tmp.keep();
        fs::rename(&root, output).map_err(|source| {
            let _ = fs::remove_dir_all(&root);
            BuildError::Io {
                action: "rename the finished layout to",
                path: output.to_owned(),
                source,
            }
        })
    }

    fn write_archive(
        &self,
        format: ImageFormat,
        parent: &Path,
        output: &Path,
    ) -> Result<(), BuildError> {
        let blob_paths: Vec<(String, PathBuf)> = self
            .blob_digests()
            .map(|d| (blob_name(d), blob_path(self.dir.path(), d)))
            .collect();
        let (first_file, first_bytes, second) = match format {
            ImageFormat::OciArchive => (
                INDEX_FILE,
                self.index_json()?,
                Some((OCI_LAYOUT_FILE, Self::layout_json()?)),
            ),
            _ => (DOCKER_MANIFEST_FILE, self.docker_manifest_json()?, None),
        };
        let mut entries: Vec<(String, TarSource<'_>)> = vec![
            ("blobs/".to_owned(), TarSource::Dir),
            (format!("{BLOBS_DIR}/"), TarSource::Dir),
            (first_file.to_owned(), TarSource::Bytes(&first_bytes)),
        ];
        if let Some((name, bytes)) = &second {
            entries.push(((*name).to_owned(), TarSource::Bytes(bytes)));
        }
        let manifest_name = blob_name(&self.manifest.digest);
        for (name, path) in &blob_paths {
            // A docker-archive has no use for the OCI manifest blob: docker and containerd
            // build their own manifest from manifest.json.
            let skip = format == ImageFormat::DockerArchive && *name == manifest_name;
            if !skip && !entries.iter().any(|(n, _)| n == name) {
                entries.push((name.clone(), TarSource::File(path)));
            }
        }

        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(parent)
            .map_err(io_err("create a temporary file in", parent))?;
        let writer = BufWriter::new(tmp.as_file());
        let mut writer = write_deterministic_tar(writer, &mut entries)
            .map_err(io_err("write the archive", tmp.path()))?;
        writer
            .flush()
            .map_err(io_err("write the archive", tmp.path()))?;
        drop(writer);
        let file = tmp.as_file();
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .and_then(|()| file.sync_all())
            .map_err(io_err("finish the archive", tmp.path()))?;
        tmp.persist(output).map_err(|e| BuildError::Io {
            action: "rename the finished archive to",
            path: output.to_owned(),
            source: e.error,
        })?;
        Ok(())
    }
}

/// The directory an output goes into, which must exist: the temporary files are made there.
fn output_parent(output: &Path) -> Result<PathBuf, BuildError> {
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    if parent.is_dir() {
        Ok(parent)
    } else {
        Err(BuildError::OutputDirMissing { path: parent })
    }
}

fn encode<T: serde::Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, BuildError> {
    canonical_json(value).map_err(|source| BuildError::Encode { what, source })
}

/// `blobs/sha256/<hex>`, relative to the root of a layout or archive.
fn blob_name(digest: &Digest) -> String {
    format!(
        "{BLOBS_DIR}/{}",
        sha256_hex(digest).unwrap_or(digest.digest())
    )
}

fn blob_path(root: &Path, digest: &Digest) -> PathBuf {
    root.join(blob_name(digest))
}

fn store_blob(root: &Path, bytes: &[u8]) -> Result<Blob, BuildError> {
    let digest = sha256_of(bytes);
    write_file(&blob_path(root, &digest), bytes)?;
    Ok(Blob {
        digest,
        size: bytes.len() as u64,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    fs::write(path, bytes).map_err(io_err("write", path))
}
