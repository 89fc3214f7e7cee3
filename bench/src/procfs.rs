//! What the benchmarks read of a process and of the machine from `/proc`.

use std::time::Duration;

/// User + system CPU time process `pid` has used so far (utime + stime of
/// `/proc/<pid>/stat`); zero when it is gone.
pub fn process_cpu(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name may hold spaces and parentheses: fields are counted after its last
    // ')'. utime and stime are fields 14 and 15 of the line, 11 and 12 after it.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz)
}

/// A KiB figure of `/proc/<pid>/status` (`field` with its colon: `"VmRSS:"`, `"VmHWM:"`);
/// zero when the process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` gives them.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_the_machine_a_load() {
        let me = std::process::id();
        assert!(status_kib(me, "VmRSS:") > 0);
        assert_eq!(status_kib(me, "NoSuchField:"), 0);
        assert_eq!(loadavg().split(' ').count(), 3);
        // A pid that cannot exist (above pid_max's ceiling) reads as gone.
        assert_eq!(process_cpu(u32::MAX), Duration::ZERO);
        assert_eq!(status_kib(u32::MAX, "VmRSS:"), 0);
    }
}
