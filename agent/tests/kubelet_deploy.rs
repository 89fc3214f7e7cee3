//! The shipped sample config and unit file are valid: the sample parses strictly and
//! resolves, and systemd accepts the unit.

use std::path::PathBuf;

use ferrolet::config::{AgentConfig, FileConfig, Flags};

fn deploy(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file)
}

#[test]
fn the_sample_config_parses_and_resolves() {
    let file = FileConfig::load(&deploy("ferrolet.yaml")).expect("sample config parses");
    let config = AgentConfig::resolve(file, &Flags::default(), "host-a").expect("resolves");
    assert_eq!(config.node_name, "host-a");
    assert_eq!(config.cgroup_root, "/ferrolet/pods");
    assert_eq!(config.cluster_dns.len(), 1);
}

#[test]
fn systemd_accepts_the_unit() {
    let dir = tempfile::tempdir().expect("tempdir");
    // verify insists the ExecStart binary exists: point it at a stand-in.
    let unit = std::fs::read_to_string(deploy("ferrolet.service")).expect("unit");
    let binary = dir.path().join("ferrolet");
    std::fs::copy("/bin/true", &binary).expect("stand-in binary");
    let unit = unit.replace("/usr/local/bin/ferrolet", &binary.display().to_string());
    let path = dir.path().join("ferrolet.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd) must be installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let relevant: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ferrolet.service"))
        .collect();
    assert!(
        out.status.success() && relevant.is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}
