//! The sandbox (pause) image, built by the shim itself from the static `ferrolet-pause`
//! binary so that pods start on hosts without any registry.

use std::path::Path;

use ferrolet_oci_image::{ImageFormat, ImageReference, ImageSettings, ImageSpec, Ownership};

use super::{ImageError, ImageRecord, ImageStore};

/// The default name of the pause image.
pub const PAUSE_IMAGE: &str = concat!("ferrolet.local/pause:", env!("CARGO_PKG_VERSION"));

impl ImageStore {
    /// Returns the pause image `reference`, building it from `binary` when it is missing.
    pub fn ensure_pause(&self, reference: &str, binary: &Path) -> Result<ImageRecord, ImageError> {
        if let Some(rec) = self.resolve(reference) {
            return Ok(rec);
        }
        let err = |e: &dyn std::fmt::Display| ImageError::Pause(e.to_string());
        let scratch = tempfile::Builder::new()
            .prefix("pause-")
            .tempdir_in(self.root().join("tmp"))
            .map_err(|e| err(&e))?;
        let rootfs = scratch.path().join("rootfs");
        std::fs::create_dir(&rootfs).map_err(|e| err(&e))?;
        std::fs::copy(binary, rootfs.join("pause"))
            .map_err(|e| err(&format!("copy {}: {e}", binary.display())))?;
        let spec = ImageSpec {
            reference: ImageReference::parse(reference).map_err(|e| err(&e))?,
            layers: vec![rootfs],
            settings: ImageSettings {
                entrypoint: Some(vec!["/pause".to_string()]),
                stop_signal: Some("SIGTERM".to_string()),
                env: Vec::new(),
                ..ImageSettings::default()
            },
            ownership: Ownership::Fixed { uid: 0, gid: 0 },
        };
        let out = scratch.path().join("layout");
        ferrolet_oci_image::build_image(&spec, ImageFormat::OciLayout, &out)
            .map_err(|e| err(&e))?;
        let mut recs = self.import(&out)?;
        recs.pop()
            .ok_or_else(|| ImageError::Pause("the built layout held no image".into()))
    }
}
