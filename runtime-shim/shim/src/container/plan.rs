//! The container's init plan: an OCI runtime spec checked and turned into plain values
//! (flags, numbers, paths) before any process is created, so bad input fails at create time
//! with a message naming the field, and the init process only executes decisions.

use std::path::PathBuf;

use nix::mount::MsFlags;
use oci_spec::runtime::Spec;
use serde::{Deserialize, Serialize};

use super::caps::{CapSets, CapsError};
use crate::mounts::{DevicePlan, MountError, MountPlan, RootfsSource, default_devices};
use crate::namespaces::{Kind, NamespaceError, NamespacePlan};

/// Errors in a runtime spec.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("spec has no process")]
    NoProcess,
    #[error("process.args is empty")]
    NoArgs,
    #[error("process.cwd {0:?} must be an absolute path")]
    RelativeCwd(String),
    #[error("spec has no linux section")]
    NoLinux,
    #[error("linux.namespaces: {0}")]
    Namespaces(#[from] NamespaceError),
    #[error("mounts: {0}")]
    Mount(#[from] MountError),
    #[error("process.capabilities: {0}")]
    Caps(#[from] CapsError),
    #[error("process.rlimits: unknown type {0:?}")]
    Rlimit(String),
    #[error("process.oomScoreAdj {0} is outside -1000..=1000")]
    OomScoreAdj(i32),
    #[error("hostname {0:?} needs a new UTS namespace")]
    HostnameWithoutUts(String),
    #[error("linux.sysctl: {0:?} is not a valid sysctl name")]
    Sysctl(String),
    #[error("linux.devices: {path}: type {kind:?} is not c, b, u or p")]
    DeviceType { path: String, kind: String },
    #[error("process.user: username {0:?} is not a valid user name")]
    UserName(String),
}

/// A resource limit: `libc::RLIMIT_*` number with soft and hard values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Who the process runs as. A name (or a uid whose group is not given) is looked up in the
/// container's own `/etc/passwd` and `/etc/group`, after its root is in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserPlan {
    Ids {
        uid: u32,
        gid: u32,
        additional_gids: Vec<u32>,
    },
    /// Look up the user by name; `gid` overrides the primary group when given.
    Name {
        name: String,
        gid: Option<u32>,
        additional_gids: Vec<u32>,
    },
    /// Numeric uid whose primary group comes from `/etc/passwd` (root's 0 when absent).
    Uid { uid: u32, additional_gids: Vec<u32> },
}

/// How to look up the user of a container that the spec cannot express alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserLookup {
    Name(String),
    Uid(u32),
}

/// Everything the container's init process does, in plain values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitPlan {
    pub namespaces: NamespacePlan,
    pub rootfs: RootfsSource,
    /// Where the root is mounted before `pivot_root` (a directory in the state dir).
    pub rootfs_mountpoint: PathBuf,
    pub root_propagation: u64,
    pub readonly_root: bool,
    pub mounts: Vec<MountPlan>,
    pub devices: Vec<DevicePlan>,
    pub masked_paths: Vec<String>,
    pub readonly_paths: Vec<String>,
    pub hostname: Option<String>,
    pub sysctl: Vec<(String, String)>,
    pub rlimits: Vec<Rlimit>,
    pub user: UserPlan,
    pub caps: CapSets,
    pub no_new_privs: bool,
    pub oom_score_adj: Option<i32>,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
}

fn rlimit_number(name: &str) -> Option<u32> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && !name.contains([':', '\n', '/'])
        && !name.chars().any(char::is_whitespace)
}

impl InitPlan {
    /// Checks `spec` and derives the plan. `rootfs` says what to mount at
    /// `rootfs_mountpoint`; `user` overrides the numeric user of the spec.
    pub fn from_spec(
        spec: &Spec,
        rootfs: RootfsSource,
        rootfs_mountpoint: PathBuf,
        user: Option<&UserLookup>,
    ) -> Result<Self, PlanError> {
        let process = spec.process().as_ref().ok_or(PlanError::NoProcess)?;
        let args = process.args().clone().unwrap_or_default();
        if args.is_empty() || args[0].is_empty() {
            return Err(PlanError::NoArgs);
        }
        let cwd = process.cwd().to_string_lossy().into_owned();
        if !cwd.starts_with('/') {
            return Err(PlanError::RelativeCwd(cwd));
        }
        let linux = spec.linux().as_ref().ok_or(PlanError::NoLinux)?;
        let namespaces =
            NamespacePlan::from_oci(linux.namespaces().as_deref().unwrap_or_default())?;

        let mut mounts = Vec::new();
        for m in spec.mounts().as_deref().unwrap_or_default() {
            mounts.push(MountPlan::from_oci(m)?);
        }

        let mut devices = default_devices();
        for d in linux.devices().as_deref().unwrap_or_default() {
            let path = d.path().to_string_lossy().into_owned();
            let kind = match d.typ() {
                oci_spec::runtime::LinuxDeviceType::C | oci_spec::runtime::LinuxDeviceType::U => {
                    'c'
                }
                oci_spec::runtime::LinuxDeviceType::B => 'b',
                oci_spec::runtime::LinuxDeviceType::P => 'p',
                other => {
                    return Err(PlanError::DeviceType {
                        path,
                        kind: format!("{other:?}"),
                    });
                }
            };
            devices.retain(|existing| existing.path != path);
            devices.push(DevicePlan {
                path,
                kind,
                major: u64::try_from(d.major()).unwrap_or(0),
                minor: u64::try_from(d.minor()).unwrap_or(0),
                mode: d.file_mode().unwrap_or(0o666),
                uid: d.uid().unwrap_or(0),
                gid: d.gid().unwrap_or(0),
            });
        }

        let hostname = spec.hostname().clone().filter(|h| !h.is_empty());
        if let Some(h) = &hostname
            && !namespaces.is_new(Kind::Uts)
        {
            return Err(PlanError::HostnameWithoutUts(h.clone()));
        }

        let mut sysctl = Vec::new();
        if let Some(map) = linux.sysctl() {
            for (k, v) in map {
                if k.is_empty()
                    || k.contains("..")
                    || !k
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
                {
                    return Err(PlanError::Sysctl(k.clone()));
                }
                sysctl.push((k.clone(), v.clone()));
            }
            sysctl.sort();
        }

        let mut rlimits = Vec::new();
        for r in process.rlimits().as_deref().unwrap_or_default() {
            let name = serde_json::to_value(r.typ())
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            let resource = rlimit_number(&name).ok_or(PlanError::Rlimit(name))?;
            rlimits.push(Rlimit {
                resource,
                soft: r.soft(),
                hard: r.hard(),
            });
        }

        let u = process.user();
        let additional_gids = u.additional_gids().clone().unwrap_or_default();
        let user = match user {
            Some(UserLookup::Name(name)) => {
                if !valid_user_name(name) {
                    return Err(PlanError::UserName(name.clone()));
                }
                UserPlan::Name {
                    name: name.clone(),
                    gid: None,
                    additional_gids,
                }
            }
            Some(UserLookup::Uid(uid)) => UserPlan::Uid {
                uid: *uid,
                additional_gids,
            },
            None => UserPlan::Ids {
                uid: u.uid(),
                gid: u.gid(),
                additional_gids,
            },
        };

        let caps = match process.capabilities() {
            Some(c) => CapSets::from_oci(c)?,
            None => CapSets::default(),
        };

        let oom_score_adj = process.oom_score_adj();
        if let Some(v) = oom_score_adj
            && !(-1000..=1000).contains(&v)
        {
            return Err(PlanError::OomScoreAdj(v));
        }

        let root_propagation = match linux.rootfs_propagation().as_deref() {
            None | Some("") => (MsFlags::MS_SLAVE | MsFlags::MS_REC).bits(),
            Some(p) => {
                let opts = crate::mounts::parse_options(&[p.to_string()], "/")?;
                opts.propagation.bits()
            }
        };

        Ok(InitPlan {
            namespaces,
            rootfs,
            rootfs_mountpoint,
            root_propagation,
            readonly_root: spec
                .root()
                .as_ref()
                .is_some_and(|r| r.readonly() == Some(true)),
            mounts,
            devices,
            masked_paths: linux.masked_paths().clone().unwrap_or_default(),
            readonly_paths: linux.readonly_paths().clone().unwrap_or_default(),
            hostname,
            sysctl,
            rlimits,
            user,
            caps,
            no_new_privs: process.no_new_privileges().unwrap_or(false),
            oom_score_adj,
            args,
            env: process.env().clone().unwrap_or_default(),
            cwd,
        })
    }

    /// Bind mounts whose source is missing on the host.
    pub fn check_sources(&self) -> Result<(), MountError> {
        self.mounts.iter().try_for_each(MountPlan::check_source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> Spec {
        serde_json::from_value(v).unwrap()
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "box",
            "process": {
                "args": ["/bin/sh", "-c", "true"], "cwd": "/", "env": ["PATH=/bin"],
                "user": {"uid": 1000, "gid": 1000, "additionalGids": [5]},
                "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 4096}],
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                                  "permitted": ["CAP_KILL"]},
                "noNewPrivileges": true, "oomScoreAdj": 100
            },
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {
                "namespaces": [{"type": "mount"}, {"type": "uts"}, {"type": "pid"}],
                "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
                "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
                "sysctl": {"net.ipv4.ip_forward": "1"}
            }
        })
    }

    fn plan(v: serde_json::Value) -> Result<InitPlan, PlanError> {
        InitPlan::from_spec(
            &spec(v),
            RootfsSource::Dir("/r".into()),
            "/state/rootfs".into(),
            None,
        )
    }

    #[test]
    fn a_full_spec_becomes_a_plan() {
        let p = plan(base()).unwrap();
        assert_eq!(p.args, vec!["/bin/sh", "-c", "true"]);
        assert!(p.readonly_root && p.no_new_privs);
        assert_eq!(p.hostname.as_deref(), Some("box"));
        assert_eq!(
            p.user,
            UserPlan::Ids {
                uid: 1000,
                gid: 1000,
                additional_gids: vec![5]
            }
        );
        assert_eq!(p.rlimits[0].resource, libc::RLIMIT_NOFILE);
        assert_eq!(p.caps.bounding, 1 << 5);
        assert_eq!(p.devices.len(), 7);
        assert_eq!(p.oom_score_adj, Some(100));
        assert_eq!(p.sysctl, vec![("net.ipv4.ip_forward".into(), "1".into())]);
    }

    #[test]
    fn bad_specs_name_the_field() {
        let mut v = base();
        v["process"]["args"] = serde_json::json!([]);
        assert!(matches!(plan(v), Err(PlanError::NoArgs)));

        let mut v = base();
        v["process"]["cwd"] = serde_json::json!("relative");
        assert_eq!(
            plan(v).unwrap_err().to_string(),
            "process.cwd \"relative\" must be an absolute path"
        );

        let mut v = base();
        v["linux"]["namespaces"] = serde_json::json!([{"type": "mount"}]);
        assert!(matches!(plan(v), Err(PlanError::HostnameWithoutUts(_))));

        let mut v = base();
        v["process"]["oomScoreAdj"] = serde_json::json!(5000);
        assert!(matches!(plan(v), Err(PlanError::OomScoreAdj(5000))));

        let mut v = base();
        v["mounts"] =
            serde_json::json!([{"destination": "/x", "type": "tmpfs", "options": ["bogus"]}]);
        assert!(plan(v).unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn user_lookups_override_the_numeric_user() {
        let p = InitPlan::from_spec(
            &spec(base()),
            RootfsSource::Dir("/r".into()),
            "/m".into(),
            Some(&UserLookup::Name("nobody".into())),
        )
        .unwrap();
        assert!(matches!(p.user, UserPlan::Name { ref name, .. } if name == "nobody"));
        let bad = InitPlan::from_spec(
            &spec(base()),
            RootfsSource::Dir("/r".into()),
            "/m".into(),
            Some(&UserLookup::Name("a:b".into())),
        );
        assert!(matches!(bad, Err(PlanError::UserName(_))));
    }
}
