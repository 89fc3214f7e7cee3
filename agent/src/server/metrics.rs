//! `/metrics` in the Prometheus text format: pods and containers as the runtime reports
//! them (named as upstream's kubelet names them) and the agent process's own footprint.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The figures one scrape reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub node_name: String,
    /// Ready sandboxes.
    pub running_pods: u64,
    /// Containers by CRI state name (`running`, `exited`, `created`, `unknown`).
    pub containers: BTreeMap<&'static str, u64>,
    pub process: Option<ProcessStats>,
}

/// The agent process from `/proc/self`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    pub resident_bytes: u64,
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub threads: u64,
}

impl ProcessStats {
    /// Reads `/proc/self/stat` and the boot time from `/proc/stat`.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: sysconf only reads a configuration value.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        ProcessStats::parse(&stat, boot_time, ticks as f64, u64::try_from(page).ok()?)
    }

    /// From the text of `/proc/<pid>/stat`.
    pub fn parse(stat: &str, boot_time: f64, ticks: f64, page: u64) -> Option<ProcessStats> {
        // The command name may hold spaces and parentheses: fields start after the last `)`.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Field numbers of proc(5), minus the two before `rest`, minus one for zero-based.
        let get = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let (utime, stime) = (get(14)?, get(15)?);
        Some(ProcessStats {
            resident_bytes: get(24)? * page,
            cpu_seconds: (utime + stime) as f64 / ticks,
            start_time_seconds: boot_time + get(22)? as f64 / ticks,
            threads: get(20)?,
        })
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The exposition text.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP kubelet_node_name The node's name. The count is always 1.\n# TYPE kubelet_node_name gauge\nkubelet_node_name{{node=\"{}\"}} 1",
        escape(&s.node_name)
    );
    let _ = writeln!(
        out,
        "# HELP kubelet_running_pods Number of pods that have a running pod sandbox.\n# TYPE kubelet_running_pods gauge\nkubelet_running_pods {}",
        s.running_pods
    );
    let _ = writeln!(
        out,
        "# HELP kubelet_running_containers Number of containers currently running.\n# TYPE kubelet_running_containers gauge"
    );
    for state in ["created", "exited", "running", "unknown"] {
        let _ = writeln!(
            out,
            "kubelet_running_containers{{container_state=\"{state}\"}} {}",
            s.containers.get(state).copied().unwrap_or(0)
        );
    }
    if let Some(p) = s.process {
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
            p.resident_bytes
        );
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}",
            p.cpu_seconds
        );
        let _ = writeln!(
            out,
            "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}",
            p.start_time_seconds
        );
        let _ = writeln!(
            out,
            "# HELP process_threads Number of OS threads in the process.\n# TYPE process_threads gauge\nprocess_threads {}",
            p.threads
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_fields_are_found_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
        // utime stime cutime cstime priority nice num_threads itrealvalue starttime vsize rss
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456 300 18446744073709551615";
        let p = ProcessStats::parse(stat, 1_000_000.0, 100.0, 4096).expect("parsed");
        assert_eq!(p.resident_bytes, 300 * 4096);
        assert!((p.cpu_seconds - 3.0).abs() < 1e-9, "{}", p.cpu_seconds);
        assert!((p.start_time_seconds - 1_000_010.0).abs() < 1e-9);
        assert_eq!(p.threads, 7);
        assert!(ProcessStats::parse("garbage", 0.0, 100.0, 4096).is_none());
        assert!(ProcessStats::read().is_some_and(|p| p.resident_bytes > 0));
    }

    #[test]
    fn text_has_every_series_with_help_and_type() {
        let text = render(&Snapshot {
            node_name: "n\"1".into(),
            running_pods: 2,
            containers: BTreeMap::from([("running", 3), ("exited", 1)]),
            process: Some(ProcessStats {
                resident_bytes: 10,
                cpu_seconds: 0.5,
                start_time_seconds: 1.0,
                threads: 4,
            }),
        });
        assert!(
            text.contains("kubelet_node_name{node=\"n\\\"1\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("kubelet_running_pods 2\n"));
        assert!(text.contains("kubelet_running_containers{container_state=\"running\"} 3\n"));
        assert!(text.contains("kubelet_running_containers{container_state=\"created\"} 0\n"));
        assert!(text.contains("process_resident_memory_bytes 10\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}");
        }
    }
}
