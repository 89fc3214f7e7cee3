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
