use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use crate::spec::{CniError, CniResult, ErrorCode};

use super::{Command, Request};

#[derive(Debug, thiserror::Error)]
pub enum DelegateError {
    #[error("plugin type {0:?} is not a plain file name")]
    BadName(String),
    #[error("plugin {name:?} not found in CNI_PATH {path:?}")]
    NotFound { name: String, path: Vec<PathBuf> },
    #[error("running plugin {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {name} failed: {error}")]
    Failed { name: String, error: CniError },
    #[error("plugin {name} exited with {status} without an error object: {stderr}")]
    Crashed {
        name: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("decoding the result of plugin {name}: {source}")]
    Decode {
        name: String,
        source: serde_json::Error,
    },
}

impl From<DelegateError> for CniError {
    fn from(e: DelegateError) -> Self {
        match e {
            DelegateError::Failed { error, .. } => error,
            DelegateError::BadName(_) | DelegateError::NotFound { .. } => CniError::new(
                ErrorCode::InvalidConfig,
                "IPAM plugin unusable",
                e.to_string(),
            ),
            DelegateError::Decode { .. } => CniError::new(
                ErrorCode::DecodingFailure,
                "IPAM result undecodable",
                e.to_string(),
            ),
            DelegateError::Spawn { .. } | DelegateError::Crashed { .. } => {
                CniError::new(ErrorCode::Internal, "IPAM plugin failed", e.to_string())
            }
        }
    }
}

/// Finds the executable `name` in the `CNI_PATH` directories.
pub fn find_in_path(name: &str, dirs: &[PathBuf]) -> Result<PathBuf, DelegateError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(DelegateError::BadName(name.to_string()));
    }
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
        .ok_or_else(|| DelegateError::NotFound {
            name: name.to_string(),
            path: dirs.to_vec(),
        })
}

fn is_executable(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Runs delegate `name` with this invocation's environment and stdin, but `command`
/// as `CNI_COMMAND` (a failed ADD rolls back with DEL). Returns the parsed result of ADD.
pub fn exec_delegate(
    name: &str,
    command: Command,
    req: &Request,
) -> Result<Option<CniResult>, DelegateError> {
    let path = find_in_path(name, &req.path)?;
    let mut child = Process::new(&path)
        .env("CNI_COMMAND", command.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DelegateError::Spawn {
            path: path.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A delegate that exits without reading stdin shows up in its own answer.
        let _ = stdin.write_all(&req.stdin);
    }
    let out = child
        .wait_with_output()
        .map_err(|source| DelegateError::Spawn {
            path: path.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(match CniError::from_delegate(name, &out.stdout) {
            Some(error) => DelegateError::Failed {
                name: name.to_string(),
                error,
            },
            None => DelegateError::Crashed {
                name: name.to_string(),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            },
        });
    }
    if command != Command::Add {
        return Ok(None);
    }
    serde_json::from_slice(&out.stdout)
        .map(Some)
        .map_err(|source| DelegateError::Decode {
            name: name.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_slashes_are_refused() {
        assert!(matches!(
            find_in_path("../sh", &[]),
            Err(DelegateError::BadName(_))
        ));
        assert!(matches!(
            find_in_path("", &[]),
            Err(DelegateError::BadName(_))
        ));
    }

    #[test]
    fn finds_the_first_executable() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        std::fs::write(a.path().join("ipam"), "not executable").unwrap();
        let exe = b.path().join("ipam");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let dirs = vec![a.path().to_path_buf(), b.path().to_path_buf()];
        assert_eq!(find_in_path("ipam", &dirs).unwrap(), exe);
        assert!(matches!(
            find_in_path("other", &dirs),
            Err(DelegateError::NotFound { .. })
        ));
    }
}
