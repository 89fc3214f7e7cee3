use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferrolet_cri::v1;

use super::{FsCapacity, ImageGc, ImageGcError, ImageGcPolicy};
use crate::api::events::RecordingSink;
use crate::cri::Runtime as _;
use crate::cri::fake::FakeRuntime;

const MB: u64 = 1 << 20;
/// The fake image filesystem's size.
const CAPACITY: u64 = 100 * MB;

struct FixedFs(u64);

impl FsCapacity for FixedFs {
    fn capacity_bytes(&self, mountpoint: &Path) -> std::io::Result<u64> {
        assert_eq!(mountpoint, Path::new("/fake/images"));
        Ok(self.0)
    }
}

struct BrokenFs;

impl FsCapacity for BrokenFs {
    fn capacity_bytes(&self, _: &Path) -> std::io::Result<u64> {
        Err(std::io::Error::from_raw_os_error(libc::ENOENT))
    }
}

fn policy(high: u8, low: u8) -> ImageGcPolicy {
    ImageGcPolicy {
        high_percent: high,
        low_percent: low,
        min_age: Duration::ZERO,
    }
}

fn gc(
    runtime: &Arc<FakeRuntime>,
    fs: Arc<dyn FsCapacity>,
    policy: ImageGcPolicy,
) -> (ImageGc<FakeRuntime>, Arc<RecordingSink>) {
    let events = Arc::new(RecordingSink::default());
    let gc = ImageGc::new(runtime.clone(), fs, events.clone(), "node-a", policy);
    (gc, events)
}

/// A container of `image` in a sandbox of its own, left running.
async fn container(runtime: &FakeRuntime, name: &str, image: &str) {
    let sandbox_config = v1::PodSandboxConfig {
        metadata: Some(v1::PodSandboxMetadata {
            name: format!("pod-{name}"),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        ..Default::default()
    };
    let sandbox = runtime
        .run_pod_sandbox(sandbox_config.clone())
        .await
        .expect("sandbox");
    let config = v1::ContainerConfig {
        metadata: Some(v1::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(v1::ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let id = runtime
        .create_container(&sandbox, config, sandbox_config)
        .await
        .expect("create");
    runtime.start_container(&id).await.expect("start");
}

async fn remove_containers_named(runtime: &FakeRuntime, name: &str) {
    for c in runtime
        .list_containers(None, HashMap::new())
        .await
        .expect("list")
    {
        if c.metadata.is_some_and(|m| m.name == name) {
            runtime.remove_container(&c.id).await.expect("remove");
        }
    }
}

#[tokio::test]
async fn below_the_high_threshold_nothing_is_removed() {
    let runtime = Arc::new(FakeRuntime::default());
    runtime.add_image("old", 30 * MB, false);
    runtime.add_image("older", 30 * MB, false);
    let (mut gc, events) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), policy(61, 10));
    let pass = gc.collect(SystemTime::now()).await.expect("pass");
    assert_eq!(pass.used_bytes, 60 * MB);
    assert_eq!(pass.capacity_bytes, CAPACITY);
    assert!(pass.removed.is_empty());
    assert_eq!(runtime.image_names(), ["old", "older"]);
    assert!(events.events().is_empty());
}

#[tokio::test]
async fn over_the_threshold_unused_images_go_until_below_the_low_one() {
    let runtime = Arc::new(FakeRuntime::default());
    runtime.add_image("pause", 10 * MB, true);
    runtime.add_image("running", 20 * MB, false);
    runtime.add_image("exited", 20 * MB, false);
    runtime.add_image("unused-a", 20 * MB, false);
    runtime.add_image("unused-b", 20 * MB, false);
    container(&runtime, "app", "running").await;
    container(&runtime, "done", "exited").await;
    runtime.exit("done", 0);
    // 90% used; down to 60% means freeing 30 MB: both unused images, nothing else.
    let (mut gc, events) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), policy(85, 60));
    let pass = gc.collect(SystemTime::now()).await.expect("pass");
    assert_eq!(pass.used_bytes, 90 * MB);
    assert_eq!(pass.freed_bytes, 40 * MB);
    let mut removed = pass.removed.clone();
    removed.sort();
    assert_eq!(removed, ["sha256:unused-a", "sha256:unused-b"]);
    assert_eq!(runtime.image_names(), ["exited", "pause", "running"]);
    assert!(events.events().is_empty());
}

#[tokio::test]
async fn the_least_recently_used_image_goes_first_and_no_more_than_needed() {
    let runtime = Arc::new(FakeRuntime::default());
    runtime.add_image("was-used", 30 * MB, false);
    runtime.add_image("never-used", 30 * MB, false);
    runtime.add_image("used-early", 30 * MB, false);
    let t0 = SystemTime::now();
    // Disabled collection still keeps the records of what was used when.
    let (mut gc, _) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), policy(100, 0));
    container(&runtime, "early", "used-early").await;
    gc.collect(t0).await.expect("first pass");
    remove_containers_named(&runtime, "early").await;
    container(&runtime, "late", "was-used").await;
    gc.collect(t0 + Duration::from_secs(60))
        .await
        .expect("second pass");
    remove_containers_named(&runtime, "late").await;

    // 90% used, low 40%: 50 MB to free, so two of the three 30 MB images go: never used
    // first, then the one used longest ago.
    gc.policy = policy(80, 40);
    let pass = gc
        .collect(t0 + Duration::from_secs(120))
        .await
        .expect("collecting pass");
    assert_eq!(pass.removed, ["sha256:never-used", "sha256:used-early"]);
    assert_eq!(runtime.image_names(), ["was-used"]);
}

#[tokio::test]
async fn images_younger_than_the_minimum_age_stay() {
    let runtime = Arc::new(FakeRuntime::default());
    runtime.add_image("fresh", 90 * MB, false);
    let t0 = SystemTime::now();
    let mut young = policy(50, 0);
    young.min_age = Duration::from_secs(120);
    let (mut gc, _) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), young);
    let err = gc.collect(t0).await.expect_err("nothing may go yet");
    assert!(
        matches!(err, ImageGcError::NotEnoughFreed { freed: 0, .. }),
        "{err}"
    );
    assert_eq!(runtime.image_names(), ["fresh"]);
    let pass = gc
        .collect(t0 + Duration::from_secs(121))
        .await
        .expect("old enough");
    assert_eq!(pass.removed, ["sha256:fresh"]);
}

#[tokio::test]
async fn too_little_to_free_is_reported_as_free_disk_space_failed_on_the_node() {
    let runtime = Arc::new(FakeRuntime::default());
    runtime.add_image("pause", 10 * MB, true);
    runtime.add_image("busy", 60 * MB, false);
    runtime.add_image("spare", 10 * MB, false);
    runtime.add_image("stuck", 10 * MB, false);
    runtime.refuse_removal("stuck");
    container(&runtime, "app", "busy").await;
    let (mut gc, events) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), policy(50, 0));
    assert!(gc.pass(SystemTime::now()).await.is_none());
    assert_eq!(runtime.image_names(), ["busy", "pause", "stuck"]);
    let got = events.events();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].reason, "FreeDiskSpaceFailed");
    assert_eq!(got[0].type_, "Warning");
    assert_eq!(got[0].object.kind.as_deref(), Some("Node"));
    assert_eq!(got[0].object.name.as_deref(), Some("node-a"));
    assert!(
        got[0]
            .message
            .contains("wanted to free 94371840 bytes, freed 10485760")
            && got[0].message.contains("stuck is stuck"),
        "{}",
        got[0].message
    );
}

#[tokio::test]
async fn an_unreadable_image_filesystem_is_reported_as_image_gc_failed() {
    let runtime = Arc::new(FakeRuntime::default());
    runtime.add_image("spare", 90 * MB, false);
    let (mut gc, events) = gc(&runtime, Arc::new(BrokenFs), policy(50, 0));
    assert!(gc.pass(SystemTime::now()).await.is_none());
    runtime.break_image_fs();
    assert!(gc.pass(SystemTime::now()).await.is_none());
    let reasons = events.reasons();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("ImageGCFailed: statvfs of the image filesystem /fake/images"),
        "{reasons:?}"
    );
    assert!(
        reasons[1].starts_with("ImageGCFailed: CRI ImageFsInfo"),
        "{reasons:?}"
    );
    assert_eq!(runtime.image_names(), ["spare"]);
}

#[tokio::test]
async fn last_used_times_survive_a_restart_of_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join(super::STATE_FILE);
    let runtime = Arc::new(FakeRuntime::default());
    runtime.add_image("used-first", 40 * MB, false);
    runtime.add_image("used-later", 40 * MB, false);
    let t0 = SystemTime::now() - Duration::from_secs(3600);
    {
        let (gc, _) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), policy(100, 0));
        let mut gc = gc.with_state_file(state.clone());
        container(&runtime, "a", "used-first").await;
        gc.collect(t0).await.expect("first pass");
        remove_containers_named(&runtime, "a").await;
        container(&runtime, "b", "used-later").await;
        gc.collect(t0 + Duration::from_secs(60))
            .await
            .expect("second pass");
        remove_containers_named(&runtime, "b").await;
    }
    assert!(state.exists(), "no state written");

    // A new agent, past the minimum age: the image used longest ago goes first. Without
    // the file both would look first seen now (kept by min_age), and ties go by id.
    let mut aged = policy(50, 0);
    aged.min_age = Duration::from_secs(600);
    let (gc, _) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), aged);
    let mut gc = gc.with_state_file(state.clone());
    let mut low = aged;
    low.low_percent = 45;
    gc.policy = low;
    let pass = gc
        .collect(SystemTime::now())
        .await
        .expect("collecting pass");
    assert_eq!(pass.removed, ["sha256:used-first"]);
    let text = std::fs::read_to_string(&state).expect("state");
    assert!(
        !text.contains("used-first") && text.contains("used-later"),
        "removed image still recorded: {text}"
    );
}

#[tokio::test]
async fn a_corrupt_or_foreign_times_file_is_ignored_and_rewritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join(super::STATE_FILE);
    let runtime = Arc::new(FakeRuntime::default());
    runtime.add_image("img", 10 * MB, false);
    for bad in [
        "{not json",
        "",
        r#"{"version": 99, "images": {}}"#,
        r#"{"version": 1, "images": {"sha256:img": {"firstSeenMs": "yesterday"}}}"#,
        r#"{"version": 1, "images": {}, "extra": true}"#,
    ] {
        std::fs::write(&state, bad).expect("write");
        let (gc, _) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), policy(100, 0));
        let mut gc = gc.with_state_file(state.clone());
        gc.collect(SystemTime::now()).await.expect("pass");
        let text = std::fs::read_to_string(&state).expect("rewritten");
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["version"], 1, "{bad:?}: {text}");
        assert!(
            v["images"]["sha256:img"]["firstSeenMs"].is_u64(),
            "{bad:?}: {text}"
        );
    }
    // An unwritable place is logged, not fatal.
    let (gc, _) = gc(&runtime, Arc::new(FixedFs(CAPACITY)), policy(100, 0));
    let mut gc = gc.with_state_file(dir.path().join("missing-parent-is-a-file/x.json"));
    std::fs::write(dir.path().join("missing-parent-is-a-file"), "").expect("file");
    gc.collect(SystemTime::now())
        .await
        .expect("pass without a state file");
}
