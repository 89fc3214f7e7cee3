//! What the on-disk formats look like: file names, annotations, the docker-archive manifest,
//! and the deterministic JSON and tar encodings every written file goes through.

use std::fs::File;
use std::io::{self, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The marker file at the root of an OCI image layout.
pub const OCI_LAYOUT_FILE: &str = "oci-layout";
pub const OCI_LAYOUT_VERSION: &str = "1.0.0";
pub const INDEX_FILE: &str = "index.json";
/// The list of images at the root of a docker-archive (`docker save`) tarball.
pub const DOCKER_MANIFEST_FILE: &str = "manifest.json";
/// Where blobs live inside an OCI layout (and, by the same convention, a docker-archive).
pub const BLOBS_DIR: &str = "blobs/sha256";

/// Full image name on an index entry; `ctr images import` names the image with it.
pub const ANNOTATION_CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";
pub use oci_spec::image::ANNOTATION_REF_NAME;

/// One image in a docker-archive `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DockerManifestEntry {
    /// Path of the config JSON inside the archive.
    pub config: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_tags: Option<Vec<String>>,
    /// Paths of the layer tars inside the archive, base layer first.
    pub layers: Vec<String>,
}

/// Serialises with every object's keys sorted, so documents built from hash maps (labels,
/// annotations, exposed ports) get the same bytes, and so the same digest, every time.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<Vec<u8>, serde_json::Error> {
    let mut value = serde_json::to_value(value)?;
    value.sort_all_objects();
    serde_json::to_vec(&value)
}

/// What a tar entry holds.
pub enum TarSource<'a> {
    Dir,
    Bytes(&'a [u8]),
    File(&'a Path),
}

/// Writes `entries` as a tar in name order, owned by root, with fixed modes and zero mtimes,
/// so the archive bytes depend only on the names and contents.
pub fn write_deterministic_tar<W: Write>(
    out: W,
    entries: &mut [(String, TarSource<'_>)],
) -> io::Result<W> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tar = tar::Builder::new(out);
    for (name, source) in entries.iter() {
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match source {
            TarSource::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                tar.append_data(&mut header, name, io::empty())?;
            }
            TarSource::Bytes(bytes) => {
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(bytes.len() as u64);
                tar.append_data(&mut header, name, *bytes)?;
            }
            TarSource::File(path) => {
                let file = File::open(path)?;
                let len = file.metadata()?.len();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(0o644);
                header.set_size(len);
                // Blobs are written once and never change, so the length cannot drift.
                tar.append_data(&mut header, name, io::Read::take(file, len))?;
            }
        }
    }
    tar.into_inner()
}
