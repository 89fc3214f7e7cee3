//! A container's record on disk and the state derived from it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::process_start_time;
use crate::monitor::{CgroupRef, ExitRecord, write_atomic};

/// File in the container's state dir with what the shim knows about it.
pub const RECORD_FILE: &str = "state.json";

/// What the shim writes about a container (the monitor writes the exit separately).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub pid: Option<u32>,
    pub pid_start: Option<u64>,
    pub monitor_pid: Option<u32>,
    pub monitor_start: Option<u64>,
    pub start_error: Option<String>,
    pub cgroup: Option<CgroupRef>,
    pub log_path: Option<PathBuf>,
}

impl Record {
    pub fn load(dir: &Path) -> std::io::Result<Record> {
        let data = std::fs::read(dir.join(RECORD_FILE))?;
        serde_json::from_slice(&data).map_err(std::io::Error::other)
    }

    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let data = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        write_atomic(dir, RECORD_FILE, &data)
    }
}

/// Lifecycle of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Created,
    Running,
    Stopped,
}

/// A container's state as callers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub status: Status,
    pub pid: Option<u32>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    /// Why the container stopped when it was not a normal exit (start failure, lost monitor).
    pub message: Option<String>,
    pub log_path: Option<PathBuf>,
    pub cgroup_path: Option<String>,
}

/// Exit code reported for a container whose start failed (as containerd does).
pub const START_FAILED_EXIT_CODE: i32 = 128;
/// Exit code reported when the monitor vanished without recording the exit.
pub const UNKNOWN_EXIT_CODE: i32 = 255;

fn alive(pid: Option<u32>, start: Option<u64>) -> bool {
    match (pid, start) {
        (Some(p), Some(s)) => process_start_time(p) == Some(s),
        _ => false,
    }
}

/// The state from the record, the exit file if any, and whether the processes still live.
pub fn derive(id: &str, rec: &Record, exit: Option<&ExitRecord>) -> ContainerState {
    let mut st = ContainerState {
        id: id.to_string(),
        status: Status::Created,
        pid: rec.pid,
        created_at: rec.created_at,
        started_at: rec.started_at,
        finished_at: rec.finished_at,
        exit_code: None,
        oom_killed: false,
        message: None,
        log_path: rec.log_path.clone(),
        cgroup_path: rec.cgroup.as_ref().map(|c| c.path.clone()),
    };
    if let Some(e) = exit {
        st.status = Status::Stopped;
        st.exit_code = Some(e.exit_code);
        st.oom_killed = e.oom_killed;
        st.finished_at = Some(e.finished_at);
        return st;
    }
    if let Some(err) = &rec.start_error {
        st.status = Status::Stopped;
        st.exit_code = Some(START_FAILED_EXIT_CODE);
        st.message = Some(err.clone());
        return st;
    }
    if rec.pid.is_none() {
        return st;
    }
    if alive(rec.pid, rec.pid_start) || alive(rec.monitor_pid, rec.monitor_start) {
        st.status = Status::Running;
        return st;
    }
    st.status = Status::Stopped;
    st.exit_code = Some(UNKNOWN_EXIT_CODE);
    st.message = Some("the monitor exited without recording the container's exit".into());
    st
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_file_wins_and_dead_processes_are_stopped() {
        let mut rec = Record {
            created_at: 1,
            ..Record::default()
        };
        assert_eq!(derive("c", &rec, None).status, Status::Created);
        rec.pid = Some(u32::MAX - 1);
        rec.pid_start = Some(1);
        let st = derive("c", &rec, None);
        assert_eq!(st.status, Status::Stopped);
        assert_eq!(st.exit_code, Some(UNKNOWN_EXIT_CODE));
        let me = std::process::id();
        rec.pid = Some(me);
        rec.pid_start = process_start_time(me);
        assert_eq!(derive("c", &rec, None).status, Status::Running);
        let exit = ExitRecord {
            exit_code: 3,
            signal: None,
            oom_killed: true,
            finished_at: 9,
        };
        let st = derive("c", &rec, Some(&exit));
        assert_eq!(
            (st.status, st.exit_code, st.oom_killed),
            (Status::Stopped, Some(3), true)
        );
        rec.pid = None;
        rec.start_error = Some("exec: nope".into());
        let st = derive("c", &rec, None);
        assert_eq!(st.exit_code, Some(START_FAILED_EXIT_CODE));
        assert_eq!(st.message.as_deref(), Some("exec: nope"));
    }
}
