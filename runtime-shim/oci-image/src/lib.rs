//! Build and read OCI images.
//!
//! The building side turns directory trees into an image (deterministic gzip'd tar layers, an
//! OCI config and manifest) written as an OCI layout, an OCI archive or a docker-archive; the
//! same tree always gives the same digests. The reading side opens any of those formats and
//! verifies every blob against its digest and size and every layer against its diff id, so
//! the runtime can import what it is given without trusting it.
//!
//! ```no_run
//! use ferrolet_oci_image::{ImageFormat, ImageReference, ImageSettings, ImageSpec, Ownership};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let spec = ImageSpec {
//!     reference: ImageReference::parse("ferrolet.local/hello:1")?,
//!     layers: vec!["rootfs".into()],
//!     settings: ImageSettings { cmd: Some(vec!["/hello".into()]), ..Default::default() },
//!     ownership: Ownership::Fixed { uid: 0, gid: 0 },
//! };
//! let built = ferrolet_oci_image::build_image(&spec, ImageFormat::OciArchive, "hello.tar".as_ref())?;
//! let image = ferrolet_oci_image::read_image(&built.output, &Default::default())?;
//! assert_eq!(image.manifest_digest, built.manifest_digest);
//! # Ok(())
//! # }
//! ```

mod build;
mod config;
mod digest;
mod layer;
mod layout;
mod read;
mod reference;

pub use build::{
    BuildError, BuiltImage, ImageFormat, ImageSpec, StagedImage, UnknownFormat, build_image,
};
pub use config::{
    ConfigError, DEFAULT_PATH, ImageSettings, host_arch, parse_arch, parse_command, parse_env,
    parse_key_value, parse_os, parse_owner, parse_port, parse_stop_signal, parse_user,
    parse_working_dir,
};
pub use digest::{HashingReader, HashingWriter, sha256_of};
pub use layer::{LayerBlob, LayerError, Ownership, WHITEOUT_PREFIX, write_layer};
pub use layout::{
    ANNOTATION_CONTAINERD_IMAGE_NAME, ANNOTATION_REF_NAME, DockerManifestEntry, canonical_json,
};
pub use read::{
    LayerCompression, LoadedImage, LoadedLayer, MAX_JSON_SIZE, ReadError, ReadOptions, read_image,
    read_images,
};
pub use reference::{ImageReference, ReferenceError};

/// The OCI image-spec types this crate's API uses.
pub use oci_spec::image as oci;
