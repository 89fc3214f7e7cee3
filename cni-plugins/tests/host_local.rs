//! host-local invoked directly, as bridge (or any plugin) delegates to it.

mod common;

use std::collections::HashSet;

use common::{Call, Net, Ns, PluginDir, invoke};
use serde_json::{Value, json};

fn ipam_conf(net: &Net, ipam: Value) -> Value {
    let mut ipam = ipam;
    ipam["type"] = json!("host-local");
    ipam["dataDir"] = json!(net.data.path());
    json!({"cniVersion": "1.1.0", "name": net.name, "type": "bridge", "ipam": ipam})
}

fn run(
    dir: &PluginDir,
    host: &Ns,
    cmd: &str,
    id: &str,
    ifname: &str,
    conf: &Value,
    args: Option<&str>,
) -> common::Answer {
    let ns = std::path::Path::new("/run/netns/unused-by-host-local");
    let mut call = Call::new(cmd, id, Some(ns), dir.path());
    call.ifname = ifname;
    call.args = args;
    invoke(&dir.bin("host-local"), host, &call, conf)
}

#[test]
fn allocates_round_robin_with_routes_dns_and_reference_files() {
    let host = Ns::new("h");
    let dir = PluginDir::ours();
    let net = Net::new();
    let resolv = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(resolv.path(), "nameserver 10.79.0.53\nsearch svc.local\n").unwrap();
    let conf = ipam_conf(
        &net,
        json!({
            "ranges": [[{"subnet": "10.79.1.0/29"}], [{"subnet": "fd79:1::/120", "rangeStart": "fd79:1::10"}]],
            "routes": [{"dst": "0.0.0.0/0"}, {"dst": "10.80.0.0/16", "gw": "10.79.1.6"}],
            "resolvConf": resolv.path(),
        }),
    );
    let r = run(&dir, &host, "ADD", "a", "eth0", &conf, None).ok();
    assert_eq!(r["ips"][0]["address"], "10.79.1.2/29");
    assert_eq!(r["ips"][0]["gateway"], "10.79.1.1");
    assert_eq!(r["ips"][1]["address"], "fd79:1::10/120");
    assert!(
        r.get("interfaces").is_none(),
        "IPAM results have no interfaces"
    );
    assert_eq!(
        r["routes"][1],
        json!({"dst": "10.80.0.0/16", "gw": "10.79.1.6"})
    );
    assert_eq!(r["dns"]["nameservers"], json!(["10.79.0.53"]));
    assert_eq!(r["dns"]["search"], json!(["svc.local"]));
    let store = net.store();
    assert_eq!(
        std::fs::read_to_string(store.join("last_reserved_ip.0")).unwrap(),
        "10.79.1.2"
    );
    assert_eq!(
        std::fs::read_to_string(store.join("last_reserved_ip.1")).unwrap(),
        "fd79:1::10"
    );

    // Round robin: a released address is not reused until the range wraps.
    run(&dir, &host, "ADD", "b", "eth0", &conf, None).ok();
    run(&dir, &host, "DEL", "a", "eth0", &conf, None).ok();
    let c = run(&dir, &host, "ADD", "c", "eth0", &conf, None).ok();
    assert_eq!(c["ips"][0]["address"], "10.79.1.4/29");
    // Same container, second interface: its own addresses, released separately.
    run(&dir, &host, "ADD", "c", "net1", &conf, None).ok();
    run(&dir, &host, "DEL", "c", "net1", &conf, None).ok();
    run(&dir, &host, "CHECK", "c", "eth0", &conf, None).ok();
    run(&dir, &host, "CHECK", "c", "net1", &conf, None).err(999);
    assert_eq!(
        net.allocated(),
        ["10.79.1.3", "10.79.1.4", "fd79:1::11", "fd79:1::12"]
    );
    // A second ADD for the same attachment is refused and changes nothing.
    run(&dir, &host, "ADD", "c", "eth0", &conf, None).err(999);
    assert_eq!(net.allocated().len(), 4);
    for id in ["b", "c"] {
        run(&dir, &host, "DEL", id, "eth0", &conf, None).ok();
        run(&dir, &host, "DEL", id, "eth0", &conf, None).ok();
    }
    assert!(net.allocated().is_empty());
    net.assert_unlocked();
}

#[test]
fn requested_ips_from_cni_args_and_runtime_config() {
    let host = Ns::new("h");
    let dir = PluginDir::ours();
    let net = Net::new();
    let mut conf = ipam_conf(
        &net,
        json!({"ranges": [[{"subnet": "10.79.2.0/24"}], [{"subnet": "fd79:2::/64"}]]}),
    );
    let r = run(
        &dir,
        &host,
        "ADD",
        "a",
        "eth0",
        &conf,
        Some("IgnoreUnknown=1;K8S_POD_NAME=p;IP=10.79.2.50"),
    )
    .ok();
    assert_eq!(r["ips"][0]["address"], "10.79.2.50/24");
    conf["runtimeConfig"] = json!({"ips": ["10.79.2.60/24", "fd79:2::60/64"]});
    let r = run(&dir, &host, "ADD", "b", "eth0", &conf, None).ok();
    assert_eq!(r["ips"][0]["address"], "10.79.2.60/24");
    assert_eq!(r["ips"][1]["address"], "fd79:2::60/64");
    // Taken, gateway, outside every range, garbage: refused, nothing reserved.
    let before = net.allocated();
    conf["runtimeConfig"] = json!({"ips": ["10.79.2.60"]});
    run(&dir, &host, "ADD", "c", "eth0", &conf, None).err(11);
    conf["runtimeConfig"] = json!({"ips": ["10.79.2.1"]});
    run(&dir, &host, "ADD", "c", "eth0", &conf, None).err(7);
    conf["runtimeConfig"] = json!({"ips": ["192.0.2.7"]});
    run(&dir, &host, "ADD", "c", "eth0", &conf, None).err(7);
    conf["runtimeConfig"] = json!({"ips": ["not-an-ip"]});
    run(&dir, &host, "ADD", "c", "eth0", &conf, None).err(7);
    assert_eq!(net.allocated(), before);
}

#[test]
fn fifty_concurrent_adds_get_distinct_addresses() {
    let host = Ns::new("h");
    let dir = PluginDir::ours();
    let net = Net::new();
    let conf = ipam_conf(&net, json!({"ranges": [[{"subnet": "10.79.3.0/24"}]]}));
    let answers: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..50)
            .map(|i| {
                let (dir, host, conf) = (&dir, &host, &conf);
                s.spawn(move || run(dir, host, "ADD", &format!("p{i}"), "eth0", conf, None).ok())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ips: HashSet<String> = answers
        .iter()
        .map(|a| a["ips"][0]["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ips.len(), 50, "duplicate addresses handed out");
    assert_eq!(net.allocated().len(), 50);
    std::thread::scope(|s| {
        for i in 0..50 {
            let (dir, host, conf) = (&dir, &host, &conf);
            s.spawn(move || run(dir, host, "DEL", &format!("p{i}"), "eth0", conf, None).ok());
        }
    });
    assert!(net.allocated().is_empty());
    net.assert_unlocked();
}

#[test]
fn gc_frees_everything_not_in_valid_attachments() {
    let host = Ns::new("h");
    let dir = PluginDir::ours();
    let net = Net::new();
    let conf = ipam_conf(&net, json!({"ranges": [[{"subnet": "10.79.4.0/24"}]]}));
    for (id, ifname) in [("keep", "eth0"), ("keep", "net1"), ("stale", "eth0")] {
        run(&dir, &host, "ADD", id, ifname, &conf, None).ok();
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let call = Call::new("GC", "", None, dir.path());
    invoke(&dir.bin("host-local"), &host, &call, &gc).ok();
    assert_eq!(net.allocated(), ["10.79.4.2"]);
    assert_eq!(
        std::fs::read_to_string(net.store().join("10.79.4.2")).unwrap(),
        "keep\r\neth0"
    );
    gc["cni.dev/valid-attachments"] = json!("not a list");
    invoke(&dir.bin("host-local"), &host, &call, &gc).err(7);
    let status = Call::new("STATUS", "", None, dir.path());
    invoke(&dir.bin("host-local"), &host, &status, &conf).ok();
}
