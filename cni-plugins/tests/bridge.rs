//! bridge + host-local as a runtime drives them, as root, each test in its own
//! namespaces: a "host" namespace where the plugins run and container namespaces.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{Call, Net, Ns, PluginDir, invoke, veths};
use serde_json::{Value, json};

fn add(dir: &PluginDir, host: &Ns, ctr: &Ns, id: &str, conf: &Value) -> Value {
    let call = Call::new("ADD", id, Some(&ctr.path), dir.path());
    invoke(&dir.bin("bridge"), host, &call, conf).ok()
}

fn del(dir: &PluginDir, host: &Ns, ctr: Option<&Ns>, id: &str, conf: &Value) -> common::Answer {
    let call = Call::new("DEL", id, ctr.map(|c| c.path.as_path()), dir.path());
    invoke(&dir.bin("bridge"), host, &call, conf)
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

fn check(
    dir: &PluginDir,
    host: &Ns,
    ctr: &Ns,
    id: &str,
    conf: &Value,
    prev: &Value,
) -> common::Answer {
    let call = Call::new("CHECK", id, Some(&ctr.path), dir.path());
    invoke(&dir.bin("bridge"), host, &call, &with_prev(conf, prev))
}

#[test]
fn ipv4_add_check_del_and_traffic_between_containers() {
    let (host, a, b) = (Ns::new("h"), Ns::new("a"), Ns::new("b"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let mut conf = net.v4("10.77.1.0/24");
    conf["isDefaultGateway"] = json!(true);
    conf["mtu"] = json!(1400);
    conf["dns"] = json!({"nameservers": ["10.77.1.53"]});
    let ra = add(&dir, &host, &a, "ctr-a", &conf);
    let rb = add(&dir, &host, &b, "ctr-b", &conf);

    assert_eq!(ra["cniVersion"], "1.0.0");
    assert_eq!(ra["interfaces"][0]["name"], net.bridge.as_str());
    assert_eq!(ra["interfaces"][2]["name"], "eth0");
    assert_eq!(ra["interfaces"][2]["sandbox"], a.path.to_str().unwrap());
    assert_eq!(ra["ips"][0]["address"], "10.77.1.2/24");
    assert_eq!(ra["ips"][0]["gateway"], "10.77.1.1");
    assert_eq!(ra["ips"][0]["interface"], 2);
    assert_eq!(rb["ips"][0]["address"], "10.77.1.3/24");
    assert_eq!(ra["dns"]["nameservers"][0], "10.77.1.53");
    assert!(
        ra["routes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["dst"] == "0.0.0.0/0" && r["gw"] == "10.77.1.1")
    );

    // What a user would look at with ip(8).
    let addr = a.exec(&["ip", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("10.77.1.2/24"), "{addr}");
    let link = a.exec(&["ip", "-o", "link", "show", "dev", "eth0"]);
    assert!(link.contains("mtu 1400") && link.contains("UP"), "{link}");
    assert!(
        a.exec(&["ip", "route"])
            .contains("default via 10.77.1.1 dev eth0")
    );
    let br = host.exec(&["ip", "-o", "addr", "show", "dev", &net.bridge]);
    assert!(br.contains("10.77.1.1/24"), "gateway on the bridge: {br}");
    let host_veth = ra["interfaces"][1]["name"].as_str().unwrap();
    let port = host.exec(&["ip", "-o", "link", "show", "dev", host_veth]);
    assert!(port.contains(&format!("master {}", net.bridge)), "{port}");
    assert_eq!(
        host.exec(&["cat", "/proc/sys/net/ipv4/ip_forward"]).trim(),
        "1"
    );
    assert_eq!(net.allocated(), ["10.77.1.2", "10.77.1.3"]);
    let file = std::fs::read_to_string(net.store().join("10.77.1.2")).unwrap();
    assert_eq!(file, "ctr-a\r\neth0");

    // TCP from b to a over the bridge.
    let listener = a.run(|| TcpListener::bind("10.77.1.2:7777").unwrap());
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"hello from a").unwrap();
    });
    let got = b.run(|| {
        let addr: SocketAddr = "10.77.1.2:7777".parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    });
    server.join().unwrap();
    assert_eq!(got, "hello from a");

    check(&dir, &host, &a, "ctr-a", &conf, &ra).ok();

    del(&dir, &host, Some(&a), "ctr-a", &conf).ok();
    del(&dir, &host, Some(&b), "ctr-b", &conf).ok();
    assert!(!a.links().contains(&"eth0".to_string()));
    assert!(veths(&host).is_empty(), "veths left: {:?}", veths(&host));
    assert!(net.allocated().is_empty());
    net.assert_unlocked();
}

#[test]
fn ipv6_and_dual_stack() {
    let (host, c6, cd) = (Ns::new("h"), Ns::new("c6"), Ns::new("cd"));
    let dir = PluginDir::ours();
    let net6 = Net::new();
    let conf6 = net6.conf("1.1.0", json!([[{"subnet": "fd77:6::/64"}]]));
    let r = add(&dir, &host, &c6, "v6", &conf6);
    assert_eq!(r["ips"][0]["address"], "fd77:6::2/64");
    assert!(
        c6.exec(&["ip", "-6", "-o", "addr", "show", "dev", "eth0"])
            .contains("fd77:6::2/64")
    );
    check(&dir, &host, &c6, "v6", &conf6, &r).ok();
    // Ping the gateway address on the bridge: DAD is skipped, so it answers at once.
    c6.exec(&["busybox", "ping", "-6", "-c", "1", "-W", "5", "fd77:6::1"]);
    del(&dir, &host, Some(&c6), "v6", &conf6).ok();

    let netd = Net::new();
    let mut confd = netd.conf(
        "0.4.0",
        json!([[{"subnet": "10.77.2.0/24"}], [{"subnet": "fd77:2::/64"}]]),
    );
    confd["isDefaultGateway"] = json!(true);
    let r = add(&dir, &host, &cd, "dual", &confd);
    assert_eq!(r["cniVersion"], "0.4.0");
    assert_eq!(
        r["ips"][0]["version"], "4",
        "pre-1.0 results carry ips[].version"
    );
    assert_eq!(r["ips"][1]["version"], "6");
    assert_eq!(r["ips"][1]["address"], "fd77:2::2/64");
    assert!(
        cd.exec(&["ip", "-6", "route"])
            .contains("default via fd77:2::1 dev eth0")
    );
    assert!(
        cd.exec(&["ip", "route"])
            .contains("default via 10.77.2.1 dev eth0")
    );
    assert_eq!(netd.allocated(), ["10.77.2.2", "fd77:2::2"]);
    check(&dir, &host, &cd, "dual", &confd, &r).ok();
    del(&dir, &host, Some(&cd), "dual", &confd).ok();
    assert!(netd.allocated().is_empty());
    assert!(veths(&host).is_empty());
}

#[test]
fn add_on_an_existing_interface_fails_and_keeps_the_first() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let conf = net.v4("10.77.3.0/24");
    add(&dir, &host, &ctr, "first", &conf);
    let again = invoke(
        &dir.bin("bridge"),
        &host,
        &Call::new("ADD", "second", Some(&ctr.path), dir.path()),
        &conf,
    );
    let e = again.err(999);
    assert!(e["msg"].as_str().unwrap().contains("already exists"), "{e}");
    // The failed ADD released its address and left no veth; the first is untouched.
    assert_eq!(net.allocated(), ["10.77.3.2"]);
    assert_eq!(veths(&host).len(), 1);
    assert!(
        ctr.exec(&["ip", "-o", "addr", "show", "dev", "eth0"])
            .contains("10.77.3.2/24")
    );
    del(&dir, &host, Some(&ctr), "first", &conf).ok();
}

#[test]
fn del_is_idempotent_and_tolerates_missing_netns_and_interface() {
    let host = Ns::new("h");
    let dir = PluginDir::ours();
    let net = Net::new();
    let conf = net.v4("10.77.4.0/24");

    // Interface deleted behind the plugin's back.
    let ctr = Ns::new("c");
    add(&dir, &host, &ctr, "gone-if", &conf);
    ctr.exec(&["ip", "link", "del", "eth0"]);
    del(&dir, &host, Some(&ctr), "gone-if", &conf).ok();
    del(&dir, &host, Some(&ctr), "gone-if", &conf).ok();

    // Namespace deleted before DEL: path missing, and no CNI_NETNS at all.
    let ctr2 = Ns::new("c");
    add(&dir, &host, &ctr2, "gone-ns", &conf);
    let path = ctr2.path.clone();
    drop(ctr2);
    let call = Call::new("DEL", "gone-ns", Some(&path), dir.path());
    invoke(&dir.bin("bridge"), &host, &call, &conf).ok();
    del(&dir, &host, None, "gone-ns", &conf).ok();
    // DEL of something never added.
    del(&dir, &host, None, "never-added", &conf).ok();

    assert!(net.allocated().is_empty());
    common::poll(
        "veths to disappear with their namespace",
        Duration::from_secs(10),
        || veths(&host).is_empty().then_some(()),
    );
}

#[test]
fn check_reports_missing_address_route_and_interface() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let mut conf = net.v4("10.77.5.0/24");
    conf["isDefaultGateway"] = json!(true);
    let r = add(&dir, &host, &ctr, "chk", &conf);
    check(&dir, &host, &ctr, "chk", &conf, &r).ok();

    ctr.exec(&["ip", "route", "del", "default"]);
    let e = check(&dir, &host, &ctr, "chk", &conf, &r).err(999);
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("route to 0.0.0.0/0"),
        "{e}"
    );
    ctr.exec(&["ip", "route", "add", "default", "via", "10.77.5.1"]);
    check(&dir, &host, &ctr, "chk", &conf, &r).ok();

    ctr.exec(&["ip", "addr", "del", "10.77.5.2/24", "dev", "eth0"]);
    let e = check(&dir, &host, &ctr, "chk", &conf, &r).err(999);
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("address 10.77.5.2/24 is missing"),
        "{e}"
    );

    ctr.exec(&["ip", "link", "del", "eth0"]);
    let e = check(&dir, &host, &ctr, "chk", &conf, &r).err(999);
    assert!(
        e["details"]
            .as_str()
            .unwrap()
            .contains("interface eth0 is missing"),
        "{e}"
    );

    // CHECK without prevResult, and CHECK on a 0.3.1 config, are refused.
    let call = Call::new("CHECK", "chk", Some(&ctr.path), dir.path());
    invoke(&dir.bin("bridge"), &host, &call, &conf).err(7);
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.3.1");
    invoke(&dir.bin("bridge"), &host, &call, &with_prev(&old, &r)).err(1);
    del(&dir, &host, Some(&ctr), "chk", &conf).ok();
}

#[test]
fn ip_masq_hairpin_promisc_and_macspoofchk() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let mut conf = net.v4("10.77.6.0/24");
    conf["ipMasq"] = json!(true);
    conf["hairpinMode"] = json!(true);
    conf["promiscMode"] = json!(true);
    conf["macspoofchk"] = json!(true);
    let r = add(&dir, &host, &ctr, "masq", &conf);
    let nat = host.nat_rules(false);
    assert!(nat.contains("-A POSTROUTING -s 10.77.6.2/32"), "{nat}");
    assert!(
        nat.contains("-d 10.77.6.0/24") && nat.contains("-j MASQUERADE"),
        "{nat}"
    );
    let host_veth = r["interfaces"][1]["name"].as_str().unwrap();
    let port = host.exec(&["bridge", "-d", "link", "show", "dev", host_veth]);
    assert!(port.contains("hairpin on"), "{port}");
    let br = host.exec(&["ip", "-o", "link", "show", "dev", &net.bridge]);
    assert!(br.contains("PROMISC"), "{br}");
    let nft = host.exec(&["nft", "list", "ruleset"]);
    let mac = r["interfaces"][2]["mac"].as_str().unwrap();
    assert!(nft.contains(host_veth) && nft.contains(mac), "{nft}");
    check(&dir, &host, &ctr, "masq", &conf, &r).ok();

    del(&dir, &host, Some(&ctr), "masq", &conf).ok();
    let nat = host.nat_rules(false);
    assert!(!nat.contains("10.77.6"), "ipMasq rules left: {nat}");
    assert!(!nat.contains(":CNI-"), "ipMasq chain left: {nat}");
    let nft = host.exec(&["nft", "list", "ruleset"]);
    assert!(!nft.contains(host_veth), "macspoofchk rule left: {nft}");
}

#[test]
fn force_address_replaces_a_foreign_bridge_address() {
    let (host, c1, c2) = (Ns::new("h"), Ns::new("c"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    host.exec(&["ip", "link", "add", &net.bridge, "type", "bridge"]);
    host.exec(&["ip", "addr", "add", "10.77.99.1/24", "dev", &net.bridge]);
    let conf = net.v4("10.77.7.0/24");
    let call = Call::new("ADD", "c1", Some(&c1.path), dir.path());
    let e = invoke(&dir.bin("bridge"), &host, &call, &conf).err(999);
    assert!(
        e["msg"]
            .as_str()
            .unwrap()
            .contains("already has an IP address"),
        "{e}"
    );
    assert!(
        net.allocated().is_empty(),
        "failed ADD released its address"
    );
    assert!(veths(&host).is_empty());

    let mut forced = conf.clone();
    forced["forceAddress"] = json!(true);
    add(&dir, &host, &c2, "c2", &forced);
    let br = host.exec(&["ip", "-o", "addr", "show", "dev", &net.bridge]);
    assert!(
        br.contains("10.77.7.1/24") && !br.contains("10.77.99.1"),
        "{br}"
    );
    del(&dir, &host, Some(&c2), "c2", &forced).ok();
}

#[test]
fn a_link_with_the_bridge_name_that_is_not_a_bridge_is_refused() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let peer = common::unique("p");
    host.exec(&[
        "ip",
        "link",
        "add",
        &net.bridge,
        "type",
        "veth",
        "peer",
        "name",
        &peer,
    ]);
    let call = Call::new("ADD", "x", Some(&ctr.path), dir.path());
    let e = invoke(&dir.bin("bridge"), &host, &call, &net.v4("10.77.8.0/24")).err(999);
    assert!(
        e["details"].as_str().unwrap().contains("not a bridge"),
        "{e}"
    );
    assert!(net.allocated().is_empty());
}

#[test]
fn status_and_gc_are_delegated_to_ipam() {
    let (host, c1, c2) = (Ns::new("h"), Ns::new("c"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let mut conf = net.conf("1.1.0", json!([[{"subnet": "10.77.9.0/24"}]]));
    conf["ipMasq"] = json!(true);
    add(&dir, &host, &c1, "keep", &conf);
    add(&dir, &host, &c2, "drop", &conf);
    let status = Call::new("STATUS", "", None, dir.path());
    invoke(&dir.bin("bridge"), &host, &status, &conf).ok();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    invoke(
        &dir.bin("bridge"),
        &host,
        &Call::new("GC", "", None, dir.path()),
        &gc,
    )
    .ok();
    assert_eq!(net.allocated(), ["10.77.9.2"]);
    let nat = host.nat_rules(false);
    assert!(
        nat.contains("-s 10.77.9.2/32") && !nat.contains("10.77.9.3"),
        "{nat}"
    );
    del(&dir, &host, Some(&c1), "keep", &conf).ok();
    del(&dir, &host, Some(&c2), "drop", &conf).ok();
}

#[test]
fn a_host_local_that_is_not_our_sibling_is_executed() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    // A copy has another inode, so bridge must run it as a process; a shell wrapper
    // around it records that it ran.
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("host-local-copy");
    std::fs::copy(common::ours("host-local"), &copy).unwrap();
    let marker = tmp.path().join("ran");
    let wrapper = tmp.path().join("host-local");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$CNI_COMMAND\" >> {}\nexec {}\n",
            marker.display(),
            copy.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let dir = PluginDir::with(&[("bridge", common::ours("bridge")), ("host-local", wrapper)]);
    let net = Net::new();
    let conf = net.v4("10.77.10.0/24");
    let r = add(&dir, &host, &ctr, "exec", &conf);
    assert_eq!(r["ips"][0]["address"], "10.77.10.2/24");
    del(&dir, &host, Some(&ctr), "exec", &conf).ok();
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "ADD\nDEL\n");
    assert!(net.allocated().is_empty());
}
