//! The runtime spec a container starts from before its own settings are applied: the
//! standard mounts, namespaces, capabilities and masked paths that other runtimes use.

use oci_spec::runtime::Spec;

use super::caps;

/// Paths of `/proc` and `/sys` that leak host information or allow host changes.
pub const MASKED_PATHS: [&str; 10] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
];

/// Paths of `/proc` a container may read but not write.
pub const READONLY_PATHS: [&str; 6] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
    "/sys/fs/cgroup",
];

/// `PATH` for containers whose image sets none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Device cgroup rules of a non-privileged container: nothing but creating nodes and the
/// standard character devices (null, zero, full, random, urandom, tty, console, ptmx, pts,
/// tun).
pub fn default_device_rules() -> serde_json::Value {
    let mut rules = vec![
        serde_json::json!({"allow": false, "access": "rwm"}),
        serde_json::json!({"allow": true, "type": "c", "access": "m"}),
        serde_json::json!({"allow": true, "type": "b", "access": "m"}),
    ];
    for (major, minor) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
        (10, 200),
    ] {
        rules.push(serde_json::json!({
            "allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"
        }));
    }
    rules.push(serde_json::json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}));
    serde_json::Value::Array(rules)
}

/// A spec with new mount, UTS, IPC, PID and network namespaces, the standard mounts, the
/// default capabilities, masked and read-only paths, running `args` as root in `/`.
pub fn base_spec(args: &[String]) -> Spec {
    let caps: Vec<&str> = caps::DEFAULT.to_vec();
    let value = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs", "readonly": false},
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [DEFAULT_PATH],
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps
            },
            "noNewPrivileges": false
        },
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network"}
            ],
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
            "resources": {"devices": default_device_rules()}
        }
    });
    // The value above is a fixed, valid document; failing to read it is a bug here.
    serde_json::from_value(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::container::plan::InitPlan;
    use crate::mounts::RootfsSource;

    #[test]
    fn the_base_spec_is_a_valid_plan() {
        let spec = base_spec(&["/bin/sh".to_string()]);
        let plan =
            InitPlan::from_spec(&spec, RootfsSource::Dir("/r".into()), "/m".into(), None).unwrap();
        assert_eq!(plan.mounts.len(), 6);
        assert_eq!(plan.caps.bounding.count_ones(), 14);
        assert_eq!(plan.masked_paths.len(), MASKED_PATHS.len());
        assert_eq!(plan.namespaces.new.len(), 5);
    }
}
