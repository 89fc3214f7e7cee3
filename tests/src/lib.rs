//! The harness that ferrolet's end-to-end tests share: real daemons started privately per test,
//! temp dirs, waiting with deadlines and cleanup guards.

pub mod cluster;
pub mod containerd;
pub mod images;
pub mod mounts;
pub mod multinode;
pub mod process;
pub mod wait;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

/// A fresh directory under the system temp dir, unique per process and call; the caller removes it.
pub fn unique_temp_dir(what: &str) -> std::io::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ferrolet-{what}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The workspace root, for tests that need built artifacts or repository files.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}
