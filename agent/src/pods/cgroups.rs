//! Removal of a pod's cgroup parent once its sandbox is gone: runtimes create
//! `<cgroupRoot>/pod<uid>` on demand but leave it behind. Only paths under the configured
//! cgroup root are touched.

use std::path::{Path, PathBuf};

/// Removes `<root>/<cgroup>` in every hierarchy under `cgroupfs` (v1 controllers and v2),
/// children first. Missing directories are fine; busy ones are left and reported.
pub fn remove_pod_cgroup(cgroupfs: &Path, cgroup: &str) -> Vec<(PathBuf, std::io::Error)> {
    let rel = cgroup.trim_start_matches('/');
    let mut errors = Vec::new();
    if rel.is_empty() || rel.split('/').any(|p| p == ".." || p.is_empty()) {
        return errors;
    }
    let mut dirs = vec![cgroupfs.join(rel)];
    if let Ok(entries) = std::fs::read_dir(cgroupfs) {
        for e in entries.flatten() {
            let p = e.path().join(rel);
            if !dirs.contains(&p) {
                dirs.push(p);
            }
        }
    }
    for dir in dirs {
        remove_tree(&dir, &mut errors);
    }
    errors
}

fn remove_tree(dir: &Path, errors: &mut Vec<(PathBuf, std::io::Error)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path(), errors);
        }
    }
    if let Err(e) = std::fs::remove_dir(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        errors.push((dir.to_path_buf(), e));
    }
}
