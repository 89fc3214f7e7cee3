//! Spec behaviour every plugin shares, and bad input: a CNI error object with the
//! spec's code, a non-zero exit, and nothing left behind.

mod common;

use std::path::Path;

use common::{Call, Net, Ns, PluginDir, invoke, invoke_raw, veths};
use serde_json::json;

const PLUGINS: [&str; 4] = ["bridge", "host-local", "loopback", "portmap"];

#[test]
fn version_lists_0_3_0_to_1_1_0() {
    let host = Ns::new("h");
    let dir = PluginDir::ours();
    for p in PLUGINS {
        let call = Call::new("VERSION", "", None, dir.path());
        let v = invoke_raw(&dir.bin(p), &host, &call, br#"{"cniVersion":"1.1.0"}"#).ok();
        assert_eq!(v["cniVersion"], "1.1.0", "{p}");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]),
            "{p}"
        );
    }
}

#[test]
fn environment_errors_are_code_4() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let conf = net.v4("10.78.1.0/24");
    for p in PLUGINS {
        // Unknown command.
        let call = Call::new("FROB", "c1", Some(&ctr.path), dir.path());
        invoke(&dir.bin(p), &host, &call, &conf).err(4);
        // Missing CNI_NETNS on ADD.
        let call = Call::new("ADD", "c1", None, dir.path());
        let e = invoke(&dir.bin(p), &host, &call, &conf).err(4);
        assert!(e["msg"].as_str().unwrap().contains("CNI_NETNS"), "{e}");
        // Forbidden characters in the container id.
        for bad in ["../../etc", "a b", "-lead", "x;y"] {
            let call = Call::new("ADD", bad, Some(&ctr.path), dir.path());
            invoke(&dir.bin(p), &host, &call, &conf).err(4);
        }
        // Bad interface name.
        let mut call = Call::new("ADD", "c1", Some(&ctr.path), dir.path());
        call.ifname = "way-too-long-ifname";
        invoke(&dir.bin(p), &host, &call, &conf).err(4);
    }
    assert!(net.allocated().is_empty());
    assert!(
        !net.store().exists(),
        "no store was created for rejected calls"
    );
    assert!(veths(&host).is_empty());
}

#[test]
fn decode_version_and_config_errors_have_their_codes() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    for p in PLUGINS {
        let call = Call::new("ADD", "c1", Some(&ctr.path), dir.path());
        invoke_raw(&dir.bin(p), &host, &call, b"{\"cniVersion\": \"1.0.0\", ").err(6);
        invoke_raw(&dir.bin(p), &host, &call, b"").err(6);
        invoke(
            &dir.bin(p),
            &host,
            &call,
            &json!({"cniVersion":"1.0.0","name":"n"}),
        )
        .err(7);
        invoke(
            &dir.bin(p),
            &host,
            &call,
            &json!({"cniVersion":"0.2.0","name":"n","type":p}),
        )
        .err(1);
        invoke(
            &dir.bin(p),
            &host,
            &call,
            &json!({"cniVersion":"7.0.0","name":"n","type":p}),
        )
        .err(1);
        invoke(
            &dir.bin(p),
            &host,
            &call,
            &json!({"cniVersion":"1.0.0","name":"bad name","type":p}),
        )
        .err(7);
        let gc = Call::new("GC", "", None, dir.path());
        invoke(
            &dir.bin(p),
            &host,
            &gc,
            &json!({"cniVersion":"1.0.0","name":"n","type":p}),
        )
        .err(1);
    }
    // Wrong types for known keys.
    let call = Call::new("ADD", "c1", Some(&ctr.path), dir.path());
    let mut conf = net.v4("10.78.2.0/24");
    conf["mtu"] = json!("big");
    invoke(&dir.bin("bridge"), &host, &call, &conf).err(7);
    let mut conf = net.v4("10.78.2.0/24");
    conf["vlan"] = json!(100);
    invoke(&dir.bin("bridge"), &host, &call, &conf).err(2);
    assert!(net.allocated().is_empty());
    assert!(veths(&host).is_empty());
}

#[test]
fn invalid_subnet_leaves_nothing() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    for subnet in ["10.78.3.0/33", "banana", "10.78.3.0/31", "10.78.3.0"] {
        let conf = net.v4(subnet);
        let call = Call::new("ADD", "c1", Some(&ctr.path), dir.path());
        let e = invoke(&dir.bin("bridge"), &host, &call, &conf).err(7);
        assert!(e["msg"].as_str().unwrap().contains("host-local"), "{e}");
    }
    let mut conf = net.v4("10.78.3.0/24");
    conf["ipam"]["ranges"][0][0]["gateway"] = json!("10.99.0.1");
    invoke(
        &dir.bin("bridge"),
        &host,
        &Call::new("ADD", "c1", Some(&ctr.path), dir.path()),
        &conf,
    )
    .err(7);
    assert!(net.allocated().is_empty());
    assert!(veths(&host).is_empty());
    assert!(
        !host.links().contains(&net.bridge),
        "bridge is created only after IPAM succeeds"
    );
    assert_eq!(ctr.links(), ["lo"]);
}

#[test]
fn exhausted_range_is_try_again_later_and_leaves_nothing() {
    let host = Ns::new("h");
    let dir = PluginDir::ours();
    let net = Net::new();
    // 10.78.4.1 is the gateway: .2 and .3 are the only addresses.
    let conf = net.conf(
        "1.0.0",
        json!([[{"subnet":"10.78.4.0/24","rangeStart":"10.78.4.2","rangeEnd":"10.78.4.3"}]]),
    );
    let ctrs: Vec<Ns> = (0..3).map(|_| Ns::new("c")).collect();
    for (i, c) in ctrs.iter().take(2).enumerate() {
        invoke(
            &dir.bin("bridge"),
            &host,
            &Call::new("ADD", &format!("c{i}"), Some(&c.path), dir.path()),
            &conf,
        )
        .ok();
    }
    let e = invoke(
        &dir.bin("bridge"),
        &host,
        &Call::new("ADD", "c2", Some(&ctrs[2].path), dir.path()),
        &conf,
    )
    .err(11);
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("no IP addresses available"),
        "{e}"
    );
    assert_eq!(net.allocated(), ["10.78.4.2", "10.78.4.3"]);
    assert_eq!(veths(&host).len(), 2);
    assert_eq!(ctrs[2].links(), ["lo"]);
    for (i, c) in ctrs.iter().take(2).enumerate() {
        invoke(
            &dir.bin("bridge"),
            &host,
            &Call::new("DEL", &format!("c{i}"), Some(&c.path), dir.path()),
            &conf,
        )
        .ok();
    }
    assert!(net.allocated().is_empty());
}

#[test]
fn netns_that_is_not_a_netns_or_missing() {
    let host = Ns::new("h");
    let dir = PluginDir::ours();
    let net = Net::new();
    let conf = net.v4("10.78.5.0/24");
    let file = tempfile::NamedTempFile::new().unwrap();
    for p in ["bridge", "loopback"] {
        let call = Call::new("ADD", "c1", Some(file.path()), dir.path());
        let e = invoke(&dir.bin(p), &host, &call, &conf).err(4);
        assert!(
            e["details"]
                .as_str()
                .unwrap()
                .contains("is not a network namespace"),
            "{e}"
        );
        let call = Call::new(
            "ADD",
            "c1",
            Some(Path::new("/run/netns/ferrolet-no-such-ns")),
            dir.path(),
        );
        invoke(&dir.bin(p), &host, &call, &conf).err(3);
        // /proc/self/ns/mnt is a namespace, but not a network one.
        let call = Call::new(
            "ADD",
            "c1",
            Some(Path::new("/proc/self/ns/mnt")),
            dir.path(),
        );
        invoke(&dir.bin(p), &host, &call, &conf).err(4);
    }
    assert!(net.allocated().is_empty());
    assert!(veths(&host).is_empty());
}

#[test]
fn unknown_keys_are_passed_through_and_prev_result_is_chained() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let mut conf = net.v4("10.78.6.0/24");
    conf["someVendorKey"] = json!({"nested": [1, 2, 3]});
    conf["args"] = json!({"labels": {"app": "x"}});
    conf["ipam"]["vendorIpamKey"] = json!(true);
    let r = invoke(
        &dir.bin("bridge"),
        &host,
        &Call::new("ADD", "c1", Some(&ctr.path), dir.path()),
        &conf,
    )
    .ok();
    assert_eq!(r["ips"][0]["address"], "10.78.6.2/24");

    // loopback and portmap (with no mappings) hand prevResult on unchanged.
    for p in ["loopback", "portmap"] {
        let chained =
            json!({"cniVersion":"1.0.0","name":net.name,"type":p,"unknown":1,"prevResult":r});
        let out = invoke(
            &dir.bin(p),
            &host,
            &Call::new("ADD", "c1", Some(&ctr.path), dir.path()),
            &chained,
        )
        .ok();
        assert_eq!(out, r, "{p} must echo prevResult");
    }
    invoke(
        &dir.bin("bridge"),
        &host,
        &Call::new("DEL", "c1", Some(&ctr.path), dir.path()),
        &conf,
    )
    .ok();
}

#[test]
fn a_late_failure_rolls_back_veth_address_and_rules() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    // The route's gateway is unreachable from the container, so the kernel refuses it
    // after the veth exists and the address is set: everything must be undone.
    let mut conf = net.v4("10.78.7.0/24");
    conf["ipMasq"] = json!(true);
    conf["ipam"]["routes"] = json!([{"dst": "10.200.0.0/16", "gw": "192.0.2.1"}]);
    let call = Call::new("ADD", "late", Some(&ctr.path), dir.path());
    let e = invoke(&dir.bin("bridge"), &host, &call, &conf).err(999);
    assert!(
        e["details"].as_str().unwrap().contains("10.200.0.0/16"),
        "{e}"
    );
    assert!(net.allocated().is_empty(), "address file left");
    assert!(veths(&host).is_empty(), "host veth left");
    assert_eq!(ctr.links(), ["lo"], "container interface left");
    let nat = host.nat_rules(false);
    assert!(!nat.contains("10.78.7"), "ipMasq rules left: {nat}");

    // The same configuration without the bad route works in the same namespace.
    conf["ipam"].as_object_mut().unwrap().remove("routes");
    invoke(&dir.bin("bridge"), &host, &call, &conf).ok();
    // Round robin: the address the failed ADD held briefly is skipped.
    assert!(host.nat_rules(false).contains("-s 10.78.7.3/32"));
    let del = Call::new("DEL", "late", Some(&ctr.path), dir.path());
    invoke(&dir.bin("bridge"), &host, &del, &conf).ok();
    assert!(!host.nat_rules(false).contains("10.78.7"));
}
