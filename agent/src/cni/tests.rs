//! The CNI driver against fake plugin executables (shell scripts) that record what they
//! were given: chaining, prevResult, runtimeConfig, the cache and DEL order.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use serde_json::{Value, json};

use super::*;

/// A plugin that appends `<name> <command> <stdin>` to `log` and, on ADD, prints its
/// prevResult with its own IP added (or a fresh result).
fn fake_plugin(bin: &Path, name: &str, log: &Path, fail: bool) {
    let script = if fail {
        "#!/bin/sh\ncat >/dev/null\necho '{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"out of addresses\"}'\nexit 1\n".to_owned()
    } else {
        format!(
            "#!/bin/sh\nin=$(cat)\nprintf '%s %s %s %s\\n' {name} \"$CNI_COMMAND\" \"$CNI_NETNS\" \"$in\" >> {log}\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then\n  echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[{{\"address\":\"10.1.0.7/24\"}}],\"by\":\"{name}\"}}'\nfi\n",
            log = log.display()
        )
    };
    let path = bin.join(name);
    std::fs::write(&path, script).expect("write plugin");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

struct Setup {
    dir: tempfile::TempDir,
    cni: Cni,
}

fn setup(conflist: &Value) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    let conf = dir.path().join("conf");
    std::fs::create_dir_all(&bin).expect("bin");
    std::fs::create_dir_all(&conf).expect("conf");
    std::fs::write(conf.join("10-test.conflist"), conflist.to_string()).expect("conf");
    let cni = Cni {
        bin_dir: bin,
        conf_dir: conf,
        cache_dir: dir.path().join("cache"),
    };
    Setup { dir, cni }
}

fn attachment() -> Attachment {
    Attachment {
        sandbox_id: "sb1".into(),
        netns: "/run/netns/test".into(),
        namespace: "default".into(),
        name: "web".into(),
        uid: "u1".into(),
        port_mappings: vec![(8080, 80, "TCP".into(), String::new())],
    }
}

fn log_lines(s: &Setup) -> Vec<(String, String, Value)> {
    std::fs::read_to_string(s.dir.path().join("log"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut parts = l.splitn(4, ' ');
            let name = parts.next().unwrap_or_default().to_owned();
            let cmd = parts.next().unwrap_or_default().to_owned();
            let _netns = parts.next();
            let conf = serde_json::from_str(parts.next().unwrap_or("null")).expect("stdin json");
            (name, cmd, conf)
        })
        .collect()
}

fn two_plugin_list() -> Value {
    json!({
        "cniVersion": "1.0.0", "name": "testnet",
        "plugins": [
            {"type": "first", "bridge": "br0"},
            {"type": "second", "capabilities": {"portMappings": true}}
        ]
    })
}

#[tokio::test]
async fn add_chains_prev_result_passes_port_mappings_and_del_runs_in_reverse_from_cache() {
    let s = setup(&two_plugin_list());
    let log = s.dir.path().join("log");
    fake_plugin(&s.cni.bin_dir, "first", &log, false);
    fake_plugin(&s.cni.bin_dir, "second", &log, false);
    assert!(s.cni.ready());

    let ips = s.cni.add(&attachment()).await.expect("ADD");
    assert_eq!(ips, ["10.1.0.7"]);
    assert_eq!(s.cni.ips("sb1"), ["10.1.0.7"]);
    let lines = log_lines(&s);
    assert_eq!(lines.len(), 2);
    let (n0, c0, first) = &lines[0];
    assert_eq!((n0.as_str(), c0.as_str()), ("first", "ADD"));
    assert_eq!(first["name"], "testnet");
    assert_eq!(first["cniVersion"], "1.0.0");
    assert_eq!(first["bridge"], "br0");
    assert!(first.get("prevResult").is_none());
    assert!(
        first.get("runtimeConfig").is_none(),
        "no capability, no runtimeConfig"
    );
    let (_, _, second) = &lines[1];
    assert_eq!(second["prevResult"]["by"], "first");
    assert_eq!(
        second["runtimeConfig"]["portMappings"],
        json!([{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}])
    );

    // The conf dir changes meanwhile: DEL still uses what ADD used.
    std::fs::write(
        s.cni.conf_dir.join("10-test.conflist"),
        json!({"cniVersion":"1.0.0","name":"other","plugins":[{"type":"nope"}]}).to_string(),
    )
    .expect("rewrite");
    s.cni.del("sb1").await.expect("DEL");
    let lines = log_lines(&s);
    let dels: Vec<(&str, &Value)> = lines[2..]
        .iter()
        .map(|(n, c, v)| {
            assert_eq!(c, "DEL");
            (n.as_str(), v)
        })
        .collect();
    assert_eq!(
        dels.iter().map(|d| d.0).collect::<Vec<_>>(),
        ["second", "first"]
    );
    assert_eq!(
        dels[0].1["prevResult"]["by"], "second",
        "DEL gets ADD's final result"
    );
    assert!(s.cni.ips("sb1").is_empty(), "cache removed");
    s.cni.del("sb1").await.expect("a second DEL is a no-op");
}

#[tokio::test]
async fn a_failing_plugin_reports_its_error_and_rolls_back() {
    let s = setup(&two_plugin_list());
    let log = s.dir.path().join("log");
    fake_plugin(&s.cni.bin_dir, "first", &log, false);
    fake_plugin(&s.cni.bin_dir, "second", &log, true);
    let err = s.cni.add(&attachment()).await.expect_err("ADD fails");
    let text = err.to_string();
    assert!(
        text.contains("second") && text.contains("out of addresses") && text.contains("code 11"),
        "{text}"
    );
    let cmds: Vec<String> = log_lines(&s)
        .into_iter()
        .map(|(n, c, _)| format!("{n} {c}"))
        .collect();
    assert_eq!(
        cmds,
        ["first ADD", "first DEL"],
        "the first plugin is undone"
    );
    assert!(!s.cni.cache_dir.join("sb1.json").exists());
}

#[test]
fn bad_configs_are_rejected_with_the_file_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        load_conflist(dir.path()),
        Err(CniError::NoConfig(_))
    ));
    let cases = [
        ("{not json", "key must be a string"),
        (r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#, "name"),
        (r#"{"name":"n","plugins":[{"type":"x"}]}"#, "cniVersion"),
        (
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[]}"#,
            "non-empty",
        ),
        (
            r#"{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"../x"}]}"#,
            "plugin file name",
        ),
    ];
    for (text, want) in cases {
        std::fs::write(dir.path().join("a.conflist"), text).expect("write");
        let err = load_conflist(dir.path()).expect_err(text).to_string();
        assert!(
            err.contains(want) && err.contains("a.conflist"),
            "{text}: {err}"
        );
    }
    std::fs::write(
        dir.path().join("a.conflist"),
        r#"{"cniVersion":"0.4.0","name":"single","type":"bridge"}"#,
    )
    .expect("write");
    let (_, list) = load_conflist(dir.path()).expect("a single .conf is wrapped");
    assert_eq!(list["plugins"][0]["type"], "bridge");
}
