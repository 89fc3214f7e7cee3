//! Image garbage collection: when the runtime's image filesystem is fuller than
//! `imageGCHighThresholdPercent`, remove images no container uses, least recently used
//! first, until it is below `imageGCLowThresholdPercent`. Usage comes from the runtime's
//! `ImageFsInfo`, capacity from statvfs of the filesystem it names, as the kubelet does.
//! When an image was first seen and last used is tracked from the runtime's container list
//! at each pass and kept in a small file under the agent's root dir (written atomically,
//! read at start; a corrupt one is logged and ignored), so a restart of the agent does not
//! make every image look unused since then.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    first_seen: SystemTime,
    /// `None`: never seen in use.
    last_used: Option<SystemTime>,
}

/// The file name of the records under the agent's root dir.
pub const STATE_FILE: &str = "image-gc-state.json";

/// The records as stored: milliseconds since the epoch by image id.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredRecords {
    version: u32,
    images: BTreeMap<String, StoredRecord>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredRecord {
    first_seen_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_used_ms: Option<u64>,
}

const STATE_VERSION: u32 = 1;

fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The records in `path`; none when it does not exist, and none (with a warning) when it
/// cannot be read or is not what this agent writes.
fn load_records(path: &Path) -> HashMap<String, Record> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HashMap::new(),
        Err(e) => {
            warn!(path = %path.display(), error = %e, "image last-used times unreadable; starting afresh");
            return HashMap::new();
        }
    };
    let stored: StoredRecords = match serde_json::from_slice(&text) {
        Ok(s) => s,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "image last-used times corrupt; ignoring them");
            return HashMap::new();
        }
    };
    if stored.version != STATE_VERSION {
        warn!(path = %path.display(), version = stored.version, "image last-used times of an unknown version; ignoring them");
        return HashMap::new();
    }
    stored
        .images
        .into_iter()
        .map(|(id, r)| {
            (
                id,
                Record {
                    first_seen: from_ms(r.first_seen_ms),
                    last_used: r.last_used_ms.map(from_ms),
                },
            )
        })
        .collect()
}

/// Writes the records to `path` through a temp file and a rename, so a crash leaves the
/// old file or the new one.
fn save_records(path: &Path, records: &HashMap<String, Record>) -> std::io::Result<()> {
    use std::io::Write as _;
    let stored = StoredRecords {
        version: STATE_VERSION,
        images: records
            .iter()
            .map(|(id, r)| {
                (
                    id.clone(),
                    StoredRecord {
                        first_seen_ms: to_ms(r.first_seen),
                        last_used_ms: r.last_used.map(to_ms),
                    },
                )
            })
            .collect(),
    };
    let body = serde_json::to_vec(&stored).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&body)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
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
    /// Where the records are kept across restarts; `None` keeps them in memory only.
    state_file: Option<PathBuf>,
    /// The records as last written, to skip writes that change nothing.
    saved: HashMap<String, Record>,
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
            state_file: None,
            saved: HashMap::new(),
        }
    }

    /// Keeps the records in `path` (see [`STATE_FILE`]), starting from what it holds.
    #[must_use]
    pub fn with_state_file(mut self, path: PathBuf) -> ImageGc<R> {
        self.records = load_records(&path);
        self.saved = self.records.clone();
        self.state_file = Some(path);
        self
    }

    /// Writes the records when they changed since the last write; a failure is logged
    /// (the records stay in memory and the next pass tries again).
    fn persist(&mut self) {
        let Some(path) = &self.state_file else {
            return;
        };
        if self.records == self.saved {
            return;
        }
        match save_records(path, &self.records) {
            Ok(()) => self.saved = self.records.clone(),
            Err(e) => warn!(path = %path.display(), error = %e, "saving image last-used times"),
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
            self.pass(SystemTime::now()).await;
        }
    }

    /// [`ImageGc::collect`], with a failure logged and reported as a Warning event on the
    /// Node.
    pub async fn pass(&mut self, now: SystemTime) -> Option<Pass> {
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
    pub async fn collect(&mut self, now: SystemTime) -> Result<Pass, ImageGcError> {
        let (mountpoint, used) = self.image_fs().await?;
        let capacity =
            self.fs
                .capacity_bytes(&mountpoint)
                .map_err(|source| ImageGcError::Capacity {
                    mountpoint: mountpoint.clone(),
                    source,
                })?;
        let images = self.detect(now).await?;
        self.persist();
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
        self.persist();
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
    async fn detect(&mut self, now: SystemTime) -> Result<Vec<(v1::Image, bool)>, ImageGcError> {
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
    fn candidates(&self, images: Vec<(v1::Image, bool)>, now: SystemTime) -> Vec<v1::Image> {
        let mut picked: Vec<(Record, v1::Image)> = images
            .into_iter()
            .filter(|(image, in_use)| !in_use && !image.pinned)
            .filter_map(|(image, _)| {
                let record = *self.records.get(&image.id)?;
                (now.duration_since(record.first_seen).unwrap_or_default() >= self.policy.min_age)
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
