//! loopback in a real namespace.

mod common;

use common::{Call, Ns, PluginDir, invoke};
use serde_json::json;

#[test]
fn add_brings_lo_up_and_del_tolerates_a_missing_netns() {
    let host = Ns::new("h");
    let ctr = Ns::new("c");
    ctr.exec(&["ip", "link", "set", "lo", "down"]);
    let dir = PluginDir::ours();
    let conf = json!({"cniVersion": "1.1.0", "name": "lo-net", "type": "loopback"});
    let call = |cmd| Call::new(cmd, "c1", Some(ctr.path.as_path()), dir.path());
    let r = invoke(&dir.bin("loopback"), &host, &call("ADD"), &conf).ok();
    assert_eq!(r["interfaces"][0]["name"], "lo");
    assert!(
        r["ips"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["address"] == "127.0.0.1/8"),
        "{r}"
    );
    assert!(ctr.exec(&["ip", "-o", "link", "show", "lo"]).contains("UP"));
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = r.clone();
    invoke(&dir.bin("loopback"), &host, &call("CHECK"), &with_prev).ok();

    invoke(&dir.bin("loopback"), &host, &call("DEL"), &conf).ok();
    assert!(
        !ctr.exec(&["ip", "-o", "link", "show", "lo"])
            .contains(",UP")
    );
    let e = invoke(&dir.bin("loopback"), &host, &call("CHECK"), &with_prev).err(999);
    assert!(e["msg"].as_str().unwrap().contains("lo is down"), "{e}");

    let path = ctr.path.clone();
    drop(ctr);
    let gone = Call::new("DEL", "c1", Some(&path), dir.path());
    invoke(&dir.bin("loopback"), &host, &gone, &conf).ok();
    invoke(
        &dir.bin("loopback"),
        &host,
        &Call::new("DEL", "c1", None, dir.path()),
        &conf,
    )
    .ok();
}

/// Kills and reaps the child on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_proc_pid_ns_net_path_works_as_cni_netns() {
    let host = Ns::new("h");
    let ctr = Ns::new("c");
    ctr.exec(&["ip", "link", "set", "lo", "down"]);
    let sleeper = Child(
        std::process::Command::new("ip")
            .args(["netns", "exec", &ctr.name, "sleep", "60"])
            .spawn()
            .unwrap(),
    );
    let path = std::path::PathBuf::from(format!("/proc/{}/ns/net", sleeper.0.id()));
    // `ip netns exec` enters the namespace before exec'ing sleep; wait for that.
    common::poll(
        "the sleeper to enter the namespace",
        std::time::Duration::from_secs(10),
        || {
            let ino = |p: &std::path::Path| {
                std::fs::metadata(p)
                    .ok()
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            };
            (ino(&path).is_some() && ino(&path) == ino(&ctr.path)).then_some(())
        },
    );
    let dir = PluginDir::ours();
    let conf = json!({"cniVersion": "1.0.0", "name": "lo-net", "type": "loopback"});
    let call = Call::new("ADD", "proc", Some(&path), dir.path());
    invoke(&dir.bin("loopback"), &host, &call, &conf).ok();
    assert!(ctr.exec(&["ip", "-o", "link", "show", "lo"]).contains("UP"));
}
