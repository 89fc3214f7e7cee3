//! The OCI runtime core for real, as root: namespaces, mounts, cgroups v1, the monitor,
//! logs and exit records, restart recovery and bad inputs.

mod common;

use std::time::Duration;

use common::{Fixture, parse_record, wait_for};
use ferrolet_shim::container::{RuntimeError, Status, UserLookup};
use nix::sys::signal::Signal;

fn ns(pid: u32, kind: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn busybox_runs_isolated_with_limits_logs_and_exit_code() {
    let f = Fixture::new();
    let id = "iso";
    let mut spec = f.spec(
        id,
        &[
            "sh",
            "-c",
            "echo host=$(hostname); echo pid=$$; echo oops >&2; mount | grep -c ' / ' ; exec sleep 600",
        ],
    );
    let mut v = serde_json::to_value(&spec).unwrap();
    v["linux"]["resources"] = serde_json::json!({
        "memory": {"limit": 64 * 1024 * 1024},
        "pids": {"limit": 64},
        "cpu": {"shares": 512}
    });
    spec = serde_json::from_value(v).unwrap();
    f.rt.create(f.config(id, spec)).unwrap();
    assert_eq!(f.rt.state(id).unwrap().status, Status::Created);
    let pid = f.rt.start(id).unwrap();
    assert_eq!(f.rt.state(id).unwrap().status, Status::Running);

    let me = std::process::id();
    for kind in ["mnt", "pid", "uts", "ipc", "net"] {
        assert_ne!(ns(pid, kind), ns(me, kind), "{kind} namespace is shared");
    }
    let limit =
        std::fs::read_to_string(f.v1_cgroup_file("memory", id, "memory.limit_in_bytes")).unwrap();
    assert_eq!(limit.trim(), (64 * 1024 * 1024).to_string());
    let pids_max = std::fs::read_to_string(f.v1_cgroup_file("pids", id, "pids.max")).unwrap();
    assert_eq!(pids_max.trim(), "64");
    let shares = std::fs::read_to_string(f.v1_cgroup_file("cpu", id, "cpu.shares")).unwrap();
    assert_eq!(shares.trim(), "512");
    // The container's process is in its cgroup of every controller; its monitor is not.
    let monitor = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .rsplit(") ")
        .next()
        .and_then(|rest| rest.split(' ').nth(1).map(str::to_string))
        .unwrap();
    for controller in [
        "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
    ] {
        let procs =
            std::fs::read_to_string(f.v1_cgroup_file(controller, id, "cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == pid.to_string()),
            "{controller}: {procs}"
        );
        assert!(
            !procs.lines().any(|l| l == monitor),
            "{controller}: {procs}"
        );
    }

    wait_for(10, "log lines", || f.log(id).lines().count() >= 4);
    let log = f.log(id);
    let records: Vec<_> = log.lines().map(parse_record).collect();
    for (ts, stream, tag, _) in &records {
        assert!(
            chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
            "bad timestamp {ts:?} in {log}"
        );
        assert!(stream == "stdout" || stream == "stderr", "{log}");
        assert_eq!(tag, "F", "{log}");
    }
    let has = |stream: &str, content: &str| {
        records
            .iter()
            .any(|(_, s, _, c)| s == stream && c == content)
    };
    assert!(has("stdout", "host=host-iso"), "{log}");
    assert!(has("stdout", "pid=1"), "{log}");
    assert!(has("stderr", "oops"), "{log}");
    // The mount namespace shows the container's root, nothing of the host's mounts.
    assert!(f.host_mounts().is_empty(), "{:?}", f.host_mounts());

    let stats = f.rt.stats(id).unwrap();
    assert!(stats.memory_usage > 0 && stats.pids >= 1, "{stats:?}");

    f.rt.kill(id, Signal::SIGKILL).unwrap();
    let st = f.rt.wait(id, Duration::from_secs(20)).unwrap();
    assert_eq!(st.status, Status::Stopped);
    assert_eq!(st.exit_code, Some(137));
    assert!(!st.oom_killed);

    f.rt.delete(id, false).unwrap();
    assert!(!f.v1_cgroup_file("memory", id, "").exists());
    assert!(matches!(f.rt.state(id), Err(RuntimeError::NotFound(_))));
}

#[test]
fn exit_code_user_caps_and_readonly_root() {
    let f = Fixture::new();
    let id = "user";
    let mut v = serde_json::to_value(f.spec(
        id,
        &[
            "sh",
            "-c",
            "id -u; id -g; id -G; grep CapEff /proc/self/status; echo $HOME; touch /x 2>&1 || echo ro-ok; exit 3",
        ],
    ))
    .unwrap();
    v["root"]["readonly"] = serde_json::json!(true);
    let spec = serde_json::from_value(v).unwrap();
    let mut cfg = f.config(id, spec);
    cfg.user = Some(UserLookup::Name("www".into()));
    f.rt.create(cfg).unwrap();
    f.rt.start(id).unwrap();
    let st = f.rt.wait(id, Duration::from_secs(20)).unwrap();
    assert_eq!(st.exit_code, Some(3), "{st:?}");
    let log = f.log(id);
    let out: Vec<String> = log
        .lines()
        .map(parse_record)
        .filter(|r| r.1 == "stdout")
        .map(|r| r.3)
        .collect();
    assert_eq!(out[0], "1000", "{log}");
    assert_eq!(out[1], "1001", "{log}");
    assert_eq!(out[2], "1001 2000", "{log}");
    // A non-root user keeps no effective capabilities across exec without ambient ones.
    assert_eq!(out[3], "CapEff:\t0000000000000000", "{log}");
    assert_eq!(out[4], "/home/www", "{log}");
    assert!(out.iter().any(|l| l == "ro-ok"), "{log}");
}

#[test]
fn root_gets_the_default_capabilities_and_masked_paths() {
    let f = Fixture::new();
    let id = "caps";
    let spec = f.spec(
        id,
        &[
            "sh",
            "-c",
            "grep -E 'CapEff|CapBnd' /proc/self/status; cat /proc/timer_list | wc -c; ls /sys/firmware | wc -l; (echo 1 > /proc/sys/kernel/domainname) 2>/dev/null || echo sys-ro; ls /dev",
        ],
    );
    f.rt.create(f.config(id, spec)).unwrap();
    f.rt.start(id).unwrap();
    let st = f.rt.wait(id, Duration::from_secs(20)).unwrap();
    assert_eq!(st.exit_code, Some(0), "{st:?} {}", f.log(id));
    let log = f.log(id);
    let out: Vec<String> = log.lines().map(parse_record).map(|r| r.3).collect();
    let want = format!(
        "{:016x}",
        ferrolet_shim::container::caps::mask(ferrolet_shim::container::caps::DEFAULT).unwrap()
    );
    assert_eq!(out[0], format!("CapEff:\t{want}"), "{log}");
    assert_eq!(out[1], format!("CapBnd:\t{want}"), "{log}");
    assert_eq!(
        out[2], "0",
        "masked /proc/timer_list must read empty: {log}"
    );
    assert_eq!(out[3], "0", "masked /sys/firmware must be empty: {log}");
    assert_eq!(out[4], "sys-ro", "{log}");
    for dev in [
        "null", "zero", "full", "random", "urandom", "tty", "pts", "shm", "mqueue", "ptmx",
    ] {
        assert!(out.iter().any(|l| l == dev), "/dev/{dev} missing: {log}");
    }
}

#[test]
fn container_survives_kill_of_the_shim_and_its_exit_is_recorded() {
    let f = Fixture::new();
    let id = "survivor";
    let spec = f.spec(
        id,
        &[
            "sh",
            "-c",
            "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.02; done",
        ],
    );
    f.rt.create(f.config(id, spec)).unwrap();
    let mut shim = std::process::Command::new(env!("CARGO_BIN_EXE_ferrolet-shim"))
        .arg("start")
        .arg("--root")
        .arg(f.rt.root())
        .arg(id)
        .arg("--hold")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(shim.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let pid: u32 = line.trim().parse().expect("shim prints the container pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim.id() as i32),
        Signal::SIGKILL,
    )
    .unwrap();
    shim.wait().unwrap();

    // A fresh runtime over the same root, as a restarted shim would have.
    let rt = ferrolet_shim::container::Runtime::new(
        f.rt.root(),
        env!("CARGO_BIN_EXE_ferrolet-shim"),
        ferrolet_shim::cgroups::CgroupDriver::detect(),
    )
    .unwrap();
    let st = rt.state(id).unwrap();
    assert_eq!((st.status, st.pid), (Status::Running, Some(pid)));
    let ticks = || {
        f.log(id)
            .lines()
            .filter(|l| l.contains(" stdout F tick "))
            .count()
    };
    let before = ticks();
    wait_for(20, "more log lines after the shim died", || {
        ticks() > before + 3
    });

    rt.kill(id, Signal::SIGKILL).unwrap();
    let st = rt.wait(id, Duration::from_secs(20)).unwrap();
    assert_eq!((st.status, st.exit_code), (Status::Stopped, Some(137)));
}

#[test]
fn log_reopen_starts_a_new_file() {
    let f = Fixture::new();
    let id = "rotate";
    let spec = f.spec(
        id,
        &[
            "sh",
            "-c",
            "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.02; done",
        ],
    );
    f.rt.create(f.config(id, spec)).unwrap();
    f.rt.start(id).unwrap();
    wait_for(10, "first lines", || f.log(id).lines().count() >= 2);
    let rotated = f.log_path(id).with_extension("log.1");
    std::fs::rename(f.log_path(id), &rotated).unwrap();
    f.rt.reopen_log(id).unwrap();
    wait_for(10, "lines in the new file", || {
        f.log(id).lines().count() >= 2
    });
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.lines().count() >= 2);
    f.rt.stop(id, Signal::SIGTERM, Duration::from_millis(200))
        .unwrap();
}

#[test]
fn memory_limit_exceeded_is_reported_as_oom_killed() {
    let f = Fixture::new();
    let id = "oom";
    let mut v = serde_json::to_value(f.spec(
        id,
        &["sh", "-c", "dd if=/dev/zero of=/dev/null bs=64M count=1"],
    ))
    .unwrap();
    v["linux"]["resources"] = serde_json::json!({"memory": {"limit": 16 * 1024 * 1024}});
    let spec = serde_json::from_value(v).unwrap();
    f.rt.create(f.config(id, spec)).unwrap();
    f.rt.start(id).unwrap();
    let st = f.rt.wait(id, Duration::from_secs(30)).unwrap();
    assert_eq!(st.status, Status::Stopped);
    assert!(st.oom_killed, "{st:?} {}", f.log(id));
}

/// Start failures: the error names the problem, the container is stopped, and nothing of it
/// is left once deleted.
fn assert_start_fails(
    f: &Fixture,
    id: &str,
    cfg: ferrolet_shim::container::ContainerConfig,
    want: &str,
) {
    f.rt.create(cfg).unwrap();
    let err = f.rt.start(id).unwrap_err();
    assert!(
        matches!(err, RuntimeError::Start { .. }) && err.to_string().contains(want),
        "expected {want:?} in {err}"
    );
    let st = f.rt.state(id).unwrap();
    assert_eq!(st.status, Status::Stopped);
    assert_eq!(st.exit_code, Some(128));
    let procs = std::fs::read_to_string(f.v1_cgroup_file("memory", id, "cgroup.procs")).unwrap();
    assert!(
        procs.trim().is_empty(),
        "processes left in the cgroup: {procs}"
    );
    wait_for(10, "monitor to exit", || f.fixture_processes().is_empty());
    f.rt.delete(id, false).unwrap();
    for c in ["memory", "pids", "cpu"] {
        assert!(!f.v1_cgroup_file(c, id, "").exists(), "{c} cgroup left");
    }
    assert!(f.host_mounts().is_empty(), "{:?}", f.host_mounts());
}

#[test]
fn missing_binary_bad_cwd_and_unknown_user_fail_start_cleanly() {
    let f = Fixture::new();
    assert_start_fails(
        &f,
        "nobin",
        f.config("nobin", f.spec("nobin", &["no-such-program", "x"])),
        "executable file \"no-such-program\" not found in $PATH",
    );
    assert_start_fails(
        &f,
        "noabs",
        f.config("noabs", f.spec("noabs", &["/bin/nope"])),
        "exec \"/bin/nope\"",
    );
    let mut v = serde_json::to_value(f.spec("nocwd", &["true"])).unwrap();
    v["process"]["cwd"] = serde_json::json!("/does/not/exist");
    assert_start_fails(
        &f,
        "nocwd",
        f.config("nocwd", serde_json::from_value(v).unwrap()),
        "chdir to cwd \"/does/not/exist\"",
    );
    let mut cfg = f.config("nouser", f.spec("nouser", &["true"]));
    cfg.user = Some(UserLookup::Name("nosuchuser".into()));
    assert_start_fails(
        &f,
        "nouser",
        cfg,
        "user \"nosuchuser\" not found in /etc/passwd",
    );
}

#[test]
fn bad_mount_source_and_bad_specs_fail_create_and_leave_nothing() {
    let f = Fixture::new();
    let mut v = serde_json::to_value(f.spec("mnt", &["true"])).unwrap();
    v["mounts"].as_array_mut().unwrap().push(serde_json::json!({
        "destination": "/data", "type": "bind", "source": "/no/such/source", "options": ["rbind"]
    }));
    let err =
        f.rt.create(f.config("mnt", serde_json::from_value(v).unwrap()))
            .unwrap_err();
    assert!(err.to_string().contains("/no/such/source"), "{err}");
    assert!(!f.rt.dir("mnt").exists());
    assert!(!f.v1_cgroup_file("memory", "mnt", "").exists());

    let mut v = serde_json::to_value(f.spec("noargs", &["true"])).unwrap();
    v["process"]["args"] = serde_json::json!([]);
    let err =
        f.rt.create(f.config("noargs", serde_json::from_value(v).unwrap()))
            .unwrap_err();
    assert!(err.to_string().contains("process.args is empty"), "{err}");

    let err =
        f.rt.create(f.config("../evil", f.spec("evil", &["true"])))
            .unwrap_err();
    assert!(matches!(err, RuntimeError::InvalidId(_)), "{err}");

    f.rt.create(f.config("dup", f.spec("dup", &["true"])))
        .unwrap();
    let err =
        f.rt.create(f.config("dup", f.spec("dup", &["true"])))
            .unwrap_err();
    assert!(matches!(err, RuntimeError::AlreadyExists(_)), "{err}");
    assert!(matches!(
        f.rt.start("unknown"),
        Err(RuntimeError::NotFound(_))
    ));
    assert!(f.host_mounts().is_empty());
}

#[test]
fn a_bind_mount_is_visible_read_only() {
    let f = Fixture::new();
    let id = "bind";
    let src = f.tmp.path().join("data");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("hello"), "from host").unwrap();
    let mut v = serde_json::to_value(f.spec(
        id,
        &[
            "sh",
            "-c",
            "cat /data/hello; echo; touch /data/x 2>/dev/null || echo ro-ok",
        ],
    ))
    .unwrap();
    v["mounts"].as_array_mut().unwrap().push(serde_json::json!({
        "destination": "/data", "type": "bind", "source": src, "options": ["rbind", "ro", "rprivate"]
    }));
    f.rt.create(f.config(id, serde_json::from_value(v).unwrap()))
        .unwrap();
    f.rt.start(id).unwrap();
    let st = f.rt.wait(id, Duration::from_secs(20)).unwrap();
    assert_eq!(st.exit_code, Some(0), "{}", f.log(id));
    let out: Vec<String> = f.log(id).lines().map(parse_record).map(|r| r.3).collect();
    assert_eq!(out, vec!["from host", "ro-ok"]);
    assert!(!src.join("x").exists());
}

/// The fast way into a cgroup v1: a freshly forked process writes `0` to each controller's
/// `tasks` file itself. It must land in every controller, and a cgroup that is not there
/// must fail with its path named before anything is forked.
#[test]
fn a_fresh_process_moves_itself_into_every_v1_controller() {
    use ferrolet_shim::cgroups::{Cgroups, CgroupsV1, Resources};
    use std::os::unix::process::CommandExt;

    let f = Fixture::new();
    let cg = CgroupsV1::new();
    let path = f.cgroup_path("self-join");
    cg.create(&path, &Resources::default()).unwrap();
    let join = cg
        .self_join(&path)
        .unwrap()
        .expect("cgroup v1 offers self-join");
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("600");
    // SAFETY: `join` only writes to files opened before the fork; it allocates only to
    // describe an error.
    unsafe {
        cmd.pre_exec(move || join.join().map_err(std::io::Error::other));
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id().to_string();
    for controller in [
        "cpu", "cpuacct", "cpuset", "memory", "pids", "devices", "freezer",
    ] {
        let procs =
            std::fs::read_to_string(f.v1_cgroup_file(controller, "self-join", "cgroup.procs"))
                .unwrap();
        assert!(procs.lines().any(|l| l == pid), "{controller}: {procs}");
    }
    assert_eq!(cg.processes(&path).unwrap(), [child.id()]);
    child.kill().unwrap();
    child.wait().unwrap();
    cg.remove(&path).unwrap();

    let missing = f.cgroup_path("never-created");
    let err = cg.self_join(&missing).unwrap_err().to_string();
    assert!(
        err.contains("never-created") && err.contains("tasks"),
        "{err}"
    );
}

/// Children of `parent` as (pid, state) from /proc.
fn children_of(parent: u32) -> Vec<(u32, char)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split(' ');
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        if fields.next().and_then(|p| p.parse::<u32>().ok()) == Some(parent) {
            out.push((pid, state));
        }
    }
    out
}

/// Monitors are forked by one long-lived process per runtime. It leaves no zombies, a
/// killed one is replaced on the next start (the container still starts), and it goes away
/// with the runtime.
#[test]
fn the_monitor_zygote_reaps_is_replaced_when_killed_and_goes_with_the_runtime() {
    let f = Fixture::new();
    let rt = ferrolet_shim::container::Runtime::new(
        f.tmp.path().join("zygote-state"),
        env!("CARGO_BIN_EXE_ferrolet-shim"),
        ferrolet_shim::cgroups::CgroupDriver::detect(),
    )
    .unwrap();
    assert_eq!(
        rt.zygote_pid(),
        None,
        "nothing is started before a container"
    );
    let start = |id: &str| {
        let spec = f.spec(id, &["sleep", "600"]);
        rt.create(f.config(id, spec)).unwrap();
        let pid = rt.start(id).unwrap();
        assert_eq!(rt.state(id).unwrap().status, Status::Running);
        pid
    };
    start("zyg-a");
    start("zyg-b");
    let first = rt.zygote_pid().expect("a zygote after the first start");
    wait_for(10, "the zygote to reap its short-lived children", || {
        children_of(first).iter().all(|&(_, state)| state != 'Z')
    });

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    // SIGKILL lands asynchronously; start only once it is dead (a zombie until reaped).
    wait_for(10, "the killed zygote to die", || {
        children_of(std::process::id())
            .iter()
            .all(|&(pid, state)| pid != first || state == 'Z')
    });
    start("zyg-c");
    let second = rt.zygote_pid().expect("a new zygote");
    assert_ne!(second, first);
    assert!(
        children_of(std::process::id())
            .iter()
            .all(|&(pid, _)| pid != first),
        "the killed zygote was reaped"
    );

    for id in ["zyg-a", "zyg-b", "zyg-c"] {
        rt.delete(id, true).unwrap();
    }
    drop(rt);
    wait_for(10, "the zygote to exit with its runtime", || {
        !std::path::Path::new(&format!("/proc/{second}")).exists()
    });
}

/// A monitor that cannot read its instructions (here: a truncated `init.json`) reports why,
/// and the start fails with that reason instead of hanging; nothing runs in the cgroup.
#[test]
fn a_corrupt_monitor_config_fails_the_start_with_its_reason() {
    let f = Fixture::new();
    let id = "badcfg";
    f.rt.create(f.config(id, f.spec(id, &["sleep", "600"])))
        .unwrap();
    let cfg = f.rt.dir(id).join("init.json");
    let data = std::fs::read(&cfg).unwrap();
    std::fs::write(&cfg, &data[..data.len() / 2]).unwrap();
    let err = f.rt.start(id).unwrap_err();
    assert!(
        matches!(err, RuntimeError::Start { .. })
            && err.to_string().contains("parse monitor config"),
        "{err}"
    );
    let procs = std::fs::read_to_string(f.v1_cgroup_file("memory", id, "cgroup.procs")).unwrap();
    assert!(procs.trim().is_empty(), "{procs}");
    f.rt.delete(id, false).unwrap();
    assert!(f.host_mounts().is_empty(), "{:?}", f.host_mounts());
}
