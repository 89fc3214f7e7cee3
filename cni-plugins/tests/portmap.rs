//! portmap chained after bridge, with real traffic: a server in the container, clients
//! outside the node (a namespace behind a veth), on the node itself, on 127.0.0.1, and
//! in the container (hairpin).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::{Call, Net, Ns, PluginDir, invoke, poll};
use serde_json::{Value, json};

fn portmap_conf(net: &Net, prev: &Value, mappings: Value) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": net.name, "type": "portmap",
        "capabilities": {"portMappings": true},
        "runtimeConfig": {"portMappings": mappings},
        "prevResult": prev,
    })
}

fn fetch(ns: &Ns, addr: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    poll(
        &format!("a reply from {addr}"),
        Duration::from_secs(10),
        || {
            ns.run(|| {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                let mut buf = String::new();
                s.read_to_string(&mut buf).ok()?;
                (!buf.is_empty()).then_some(buf)
            })
        },
    )
}

#[test]
fn host_ports_reach_the_container_from_outside_host_localhost_and_hairpin() {
    let (host, ctr, outside) = (Ns::new("h"), Ns::new("c"), Ns::new("o"));
    let dir = PluginDir::ours();
    let net = Net::new();
    // The "outside world": a veth from the node to another namespace.
    let (hv, ov) = (common::unique("hv"), common::unique("ov"));
    host.exec(&[
        "ip", "link", "add", &hv, "type", "veth", "peer", "name", &ov,
    ]);
    host.exec(&["ip", "link", "set", &ov, "netns", &outside.name]);
    host.exec(&["ip", "addr", "add", "10.81.1.1/24", "dev", &hv]);
    host.exec(&["ip", "link", "set", &hv, "up"]);
    outside.exec(&["ip", "addr", "add", "10.81.1.2/24", "dev", &ov]);
    outside.exec(&["ip", "link", "set", &ov, "up"]);

    let mut bconf = net.v4("10.80.1.0/24");
    bconf["isDefaultGateway"] = json!(true);
    // With br_netfilter, DNAT back to the sender is bridged out of the port it came in.
    bconf["hairpinMode"] = json!(true);
    let add = |cmd: &'static str| Call::new(cmd, "web", Some(ctr.path.as_path()), dir.path());
    let prev = invoke(&dir.bin("bridge"), &host, &add("ADD"), &bconf).ok();
    let pconf = portmap_conf(
        &net,
        &prev,
        json!([
            {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"},
            {"hostPort": 18053, "containerPort": 53, "protocol": "udp"},
        ]),
    );
    let out = invoke(&dir.bin("portmap"), &host, &add("ADD"), &pconf).ok();
    assert_eq!(out, prev, "portmap passes the previous result on");

    let listener = ctr.run(|| TcpListener::bind("0.0.0.0:80").unwrap());
    let server = std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let peer = s.peer_addr().unwrap();
            if s.write_all(format!("pong to {}", peer.ip()).as_bytes())
                .is_err()
            {
                continue;
            }
            if peer.ip().to_string() == "10.80.1.250" {
                break;
            }
        }
    });

    assert_eq!(
        fetch(&outside, "10.81.1.1:18080"),
        "pong to 10.81.1.2",
        "from outside, source kept"
    );
    assert!(
        fetch(&host, "10.81.1.1:18080").starts_with("pong"),
        "from the node itself"
    );
    assert!(
        fetch(&host, "127.0.0.1:18080").starts_with("pong"),
        "from the node's localhost"
    );
    assert_eq!(
        host.exec(&[
            "cat",
            &format!("/proc/sys/net/ipv4/conf/{}/route_localnet", net.bridge)
        ])
        .trim(),
        "1"
    );
    assert!(
        fetch(&ctr, "10.81.1.1:18080").starts_with("pong"),
        "hairpin from the container itself"
    );

    let nat = host.nat_rules(false);
    assert!(
        nat.contains(":CNI-HOSTPORT-DNAT") && nat.contains(":CNI-HOSTPORT-SETMARK"),
        "{nat}"
    );
    assert!(
        nat.contains(":CNI-HOSTPORT-MASQ") && nat.contains(":CNI-DN-"),
        "{nat}"
    );
    assert!(nat.contains("--dports 18053"), "udp mapping: {nat}");
    assert!(nat.contains("--to-destination 10.80.1.2:80"), "{nat}");

    invoke(&dir.bin("portmap"), &host, &add("CHECK"), &pconf).ok();
    invoke(&dir.bin("portmap"), &host, &add("DEL"), &pconf).ok();
    invoke(&dir.bin("portmap"), &host, &add("DEL"), &pconf).ok();
    let nat = host.nat_rules(false);
    assert!(
        !nat.contains("CNI-DN-") && !nat.contains("dnat name"),
        "per-container rules left: {nat}"
    );
    let e = invoke(&dir.bin("portmap"), &host, &add("CHECK"), &pconf).err(999);
    assert!(e["msg"].as_str().unwrap().contains("missing"), "{e}");
    // After DEL the port no longer answers from outside.
    let addr: SocketAddr = "10.81.1.1:18080".parse().unwrap();
    assert!(outside.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err()));

    invoke(&dir.bin("bridge"), &host, &add("DEL"), &bconf).ok();
    // Stop the server: connect with the magic source address it exits on.
    ctr.exec(&["ip", "addr", "add", "10.80.1.250/24", "dev", "lo"]);
    ctr.run(|| {
        let s = TcpStream::connect("10.80.1.250:80");
        drop(s);
    });
    server.join().unwrap();
}

#[test]
fn ipv6_mapping_and_bad_input() {
    let (host, ctr) = (Ns::new("h"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let mut bconf = net.conf(
        "1.0.0",
        json!([[{"subnet": "10.80.2.0/24"}], [{"subnet": "fd80:2::/64"}]]),
    );
    bconf["isDefaultGateway"] = json!(true);
    let call = |cmd: &'static str| Call::new(cmd, "v6", Some(ctr.path.as_path()), dir.path());
    let prev = invoke(&dir.bin("bridge"), &host, &call("ADD"), &bconf).ok();

    // Bad input leaves no chain behind.
    for bad in [
        json!([{"hostPort": 0, "containerPort": 80}]),
        json!([{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]),
        json!([{"hostPort": 80, "containerPort": 80, "hostIP": "300.1.1.1"}]),
    ] {
        invoke(
            &dir.bin("portmap"),
            &host,
            &call("ADD"),
            &portmap_conf(&net, &prev, bad),
        )
        .err(7);
    }
    let mut no_prev = portmap_conf(
        &net,
        &prev,
        json!([{"hostPort": 8080, "containerPort": 80}]),
    );
    no_prev.as_object_mut().unwrap().remove("prevResult");
    invoke(&dir.bin("portmap"), &host, &call("ADD"), &no_prev).err(7);
    assert!(!host.nat_rules(false).contains("CNI-DN-"));
    assert!(!host.nat_rules(true).contains("CNI-DN-"));

    let pconf = portmap_conf(
        &net,
        &prev,
        json!([{"hostPort": 18443, "containerPort": 443}]),
    );
    invoke(&dir.bin("portmap"), &host, &call("ADD"), &pconf).ok();
    let nat6 = host.nat_rules(true);
    assert!(nat6.contains("--to-destination [fd80:2::2]:443"), "{nat6}");
    assert!(
        host.nat_rules(false)
            .contains("--to-destination 10.80.2.2:443")
    );
    invoke(&dir.bin("portmap"), &host, &call("DEL"), &pconf).ok();
    assert!(!host.nat_rules(true).contains("CNI-DN-"));
    invoke(&dir.bin("bridge"), &host, &call("DEL"), &bconf).ok();
}

#[test]
fn gc_removes_mappings_of_containers_that_are_gone() {
    let (host, c1, c2) = (Ns::new("h"), Ns::new("c"), Ns::new("c"));
    let dir = PluginDir::ours();
    let net = Net::new();
    let bconf = net.conf("1.1.0", json!([[{"subnet": "10.80.3.0/24"}]]));
    for (id, ctr, port) in [("alive", &c1, 18001), ("dead", &c2, 18002)] {
        let call = Call::new("ADD", id, Some(&ctr.path), dir.path());
        let prev = invoke(&dir.bin("bridge"), &host, &call, &bconf).ok();
        let mut p = portmap_conf(
            &net,
            &prev,
            json!([{"hostPort": port, "containerPort": 80}]),
        );
        p["cniVersion"] = json!("1.1.0");
        invoke(&dir.bin("portmap"), &host, &call, &p).ok();
    }
    let gc = json!({"cniVersion": "1.1.0", "name": net.name, "type": "portmap",
                    "cni.dev/valid-attachments": [{"containerID": "alive", "ifname": "eth0"}]});
    invoke(
        &dir.bin("portmap"),
        &host,
        &Call::new("GC", "", None, dir.path()),
        &gc,
    )
    .ok();
    let nat = host.nat_rules(false);
    assert!(
        nat.contains("--dports 18001") && !nat.contains("--dports 18002"),
        "{nat}"
    );
    assert!(nat.contains("id: \\\"alive\\\""), "{nat}");
    invoke(
        &dir.bin("portmap"),
        &host,
        &Call::new("STATUS", "", None, dir.path()),
        &gc,
    )
    .ok();
}
