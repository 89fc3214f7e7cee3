//! Image garbage collection: when the runtime's image filesystem is fuller than
//! `imageGCHighThresholdPercent`, remove images no container uses, least recently used
//! first, until it is below `imageGCLowThresholdPercent`. Usage comes from the runtime's
//! `ImageFsInfo`, capacity from statvfs of the filesystem it names, as the kubelet does.
//! When an image was last used is only known to this process: it is tracked in memory from
//! the runtime's container list at each pass, so after a restart every image starts afresh.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrolet_cri::v1;
use k8s_openapi::api::core::v1::ObjectReference;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::api::events::{EventRecord, EventSink, WARNING};
use crate::cri::{CriError, Runtime};

/// How often the collector looks at the disk, as the kubelet.
pub const PERIOD: Duration = Duration::from_secs(5 * 60);
/// The first look, soon after start rather than a full period later.
pub const FIRST_PASS_AFTER: Duration = Duration::from_secs(10);

/// A failed collection pass.
#[derive(Debug, thiserror::Error)]
pub enum ImageGcError {
    #[error(transparent)]
    Runtime(#[from] CriError),
    #[error("the runtime reports no image filesystem with its usage")]
    NoImageFs,
    #[error("statvfs of the image filesystem {mountpoint}: {source}")]
    Capacity {
        mountpoint: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "failed to garbage collect required amount of images: wanted to free {wanted} bytes, freed {freed}{}",
        failures_suffix(.failures)
    )]
    NotEnoughFreed {
        wanted: u64,
        freed: u64,
        failures: Vec<String>,
    },
}

fn failures_suffix(failures: &[String]) -> String {
    if failures.is_empty() {
        String::new()
    } else {
        format!("; {}", failures.join("; "))
    }
}

impl ImageGcError {
    /// The event reason the kubelet reports this failure under.
    pub fn reason(&self) -> &'static str {
        match self {
            ImageGcError::NotEnoughFreed { .. } => "FreeDiskSpaceFailed",
            _ => "ImageGCFailed",
        }
    }
}

/// Capacity of a filesystem, behind a trait so the collector is tested without a disk.
pub trait FsCapacity: Send + Sync + 'static {
    fn capacity_bytes(&self, mountpoint: &Path) -> std::io::Result<u64>;
}

/// statvfs of the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostFs;

impl FsCapacity for HostFs {
    fn capacity_bytes(&self, mountpoint: &Path) -> std::io::Result<u64> {
        super::sysinfo::filesystem_bytes(mountpoint).map(|(total, _)| total)
    }
}

/// The thresholds, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageGcPolicy {
    /// At or above this share of the filesystem used, collect; 100 disables collection.
    pub high_percent: u8,
    /// Collect until usage is at or below this share.
    pub low_percent: u8,
    /// Images first seen more recently than this are kept (one just pulled for a pod that
    /// has not created its container yet).
    pub min_age: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Record {
    first_seen: Instant,
    /// `None`: never seen in use by this process.
    last_used: Option<Instant>,
}

/// What one pass found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    /// Ids of the images removed, in order.
    pub removed: Vec<String>,
    pub freed_bytes: u64,
}

/// The collector; see the module docs.
pub struct ImageGc<R> {
    runtime: Arc<R>,
    fs: Arc<dyn FsCapacity>,
    events: Arc<dyn EventSink>,
    node: ObjectReference,
    policy: ImageGcPolicy,
    records: HashMap<String, Record>,
}

impl<R: Runtime> ImageGc<R> {
    pub fn new(
        runtime: Arc<R>,
        fs: Arc<dyn FsCapacity>,
        events: Arc<dyn EventSink>,
        node_name: &str,
        policy: ImageGcPolicy,
    ) -> ImageGc<R> {
        ImageGc {
            runtime,
            fs,
            events,
            // Node events carry the node's name as uid, as the kubelet's do.
            node: ObjectReference {
                kind: Some("Node".into()),
                name: Some(node_name.to_owned()),
                uid: Some(node_name.to_owned()),
                ..Default::default()
            },
            policy,
            records: HashMap::new(),
        }
    }

    /// Passes every [`PERIOD`], the first after [`FIRST_PASS_AFTER`], until `shutdown`.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut wait = FIRST_PASS_AFTER;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return;
            }
            wait = PERIOD;
            self.pass(Instant::now()).await;
        }
    }

    /// [`ImageGc::collect`], with a failure logged and reported as a Warning event on the
    /// Node.
    pub async fn pass(&mut self, now: Instant) -> Option<Pass> {
        match self.collect(now).await {
            Ok(pass) => {
                if pass.removed.is_empty() {
                    debug!(
                        used_bytes = pass.used_bytes,
                        capacity_bytes = pass.capacity_bytes,
                        "image garbage collection: nothing to remove"
                    );
                } else {
                    info!(removed = ?pass.removed, freed_bytes = pass.freed_bytes, "image garbage collection");
                }
                Some(pass)
            }
            Err(e) => {
                warn!(error = %e, "image garbage collection failed");
                self.events.emit(EventRecord {
                    object: self.node.clone(),
                    type_: WARNING,
                    reason: e.reason().into(),
                    message: e.to_string(),
                });
                None
            }
        }
    }

    /// One pass at time `now`: refresh what is in use, then collect if over the threshold.
    pub async fn collect(&mut self, now: Instant) -> Result<Pass, ImageGcError> {
        let (mountpoint, used) = self.image_fs().await?;
        let capacity =
            self.fs
                .capacity_bytes(&mountpoint)
                .map_err(|source| ImageGcError::Capacity {
                    mountpoint: mountpoint.clone(),
                    source,
                })?;
        let images = self.detect(now).await?;
        let mut pass = Pass {
            used_bytes: used,
            capacity_bytes: capacity,
            ..Pass::default()
        };
        if self.policy.high_percent >= 100 || capacity == 0 {
            return Ok(pass);
        }
        let percent = u128::from(used) * 100 / u128::from(capacity);
        if percent < u128::from(self.policy.high_percent) {
            return Ok(pass);
        }
        let target = u128::from(capacity) * u128::from(self.policy.low_percent) / 100;
        let wanted = u64::try_from(u128::from(used).saturating_sub(target)).unwrap_or(u64::MAX);
        info!(
            used_bytes = used,
            capacity_bytes = capacity,
            wanted_bytes = wanted,
            "image filesystem over {}%; removing unused images",
            self.policy.high_percent
        );
        let mut failures = Vec::new();
        for image in self.candidates(images, now) {
            if pass.freed_bytes >= wanted {
                break;
            }
            match self.runtime.remove_image(&image.id).await {
                Ok(()) => {
                    info!(image = %image.id, tags = ?image.repo_tags, size = image.size, "removed unused image");
                    self.records.remove(&image.id);
                    pass.freed_bytes += image.size;
                    pass.removed.push(image.id);
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        if pass.freed_bytes < wanted {
            return Err(ImageGcError::NotEnoughFreed {
                wanted,
                freed: pass.freed_bytes,
                failures,
            });
        }
        Ok(pass)
    }

    async fn image_fs(&self) -> Result<(PathBuf, u64), ImageGcError> {
        let filesystems = self.runtime.image_fs_info().await?;
        filesystems
            .iter()
            .find_map(|fs| {
                let mountpoint = &fs.fs_id.as_ref()?.mountpoint;
                let used = fs.used_bytes.as_ref()?.value;
                (!mountpoint.is_empty()).then(|| (PathBuf::from(mountpoint), used))
            })
            .ok_or(ImageGcError::NoImageFs)
    }

    /// Lists images and containers, updates the records, and returns the images with
    /// whether each is in use.
    async fn detect(&mut self, now: Instant) -> Result<Vec<(v1::Image, bool)>, ImageGcError> {
        let images = self.runtime.list_images().await?;
        let containers = self.runtime.list_containers(None, HashMap::new()).await?;
        // A container names its image by the reference it was created with and by the id
        // the runtime resolved; either marks the image in use.
        let mut refs: HashSet<&str> = HashSet::new();
        for c in &containers {
            if let Some(spec) = &c.image {
                refs.insert(spec.image.as_str());
            }
            refs.insert(c.image_ref.as_str());
        }
        refs.remove("");
        let mut out = Vec::with_capacity(images.len());
        for image in images {
            let in_use = refs.contains(image.id.as_str())
                || image
                    .repo_tags
                    .iter()
                    .chain(&image.repo_digests)
                    .any(|r| refs.contains(r.as_str()));
            let record = self.records.entry(image.id.clone()).or_insert(Record {
                first_seen: now,
                last_used: None,
            });
            if in_use {
                record.last_used = Some(now);
            }
            out.push((image, in_use));
        }
        let present: HashSet<&str> = out.iter().map(|(i, _)| i.id.as_str()).collect();
        self.records.retain(|id, _| present.contains(id.as_str()));
        Ok(out)
    }

    /// Images that may go, least recently used first (never used before used), then
    /// oldest first seen. Pinned images (the runtime's sandbox image) and images in use or
    /// younger than the minimum age never go.
    fn candidates(&self, images: Vec<(v1::Image, bool)>, now: Instant) -> Vec<v1::Image> {
        let mut picked: Vec<(Record, v1::Image)> = images
            .into_iter()
            .filter(|(image, in_use)| !in_use && !image.pinned)
            .filter_map(|(image, _)| {
                let record = *self.records.get(&image.id)?;
                (now.saturating_duration_since(record.first_seen) >= self.policy.min_age)
                    .then_some((record, image))
            })
            .collect();
        picked.sort_by(|(a, ai), (b, bi)| {
            a.last_used
                .cmp(&b.last_used)
                .then(a.first_seen.cmp(&b.first_seen))
                .then(ai.id.cmp(&bi.id))
        });
        picked.into_iter().map(|(_, image)| image).collect()
    }
}

#[cfg(test)]
mod tests;
