//! 1,000 ADD/DEL cycles of bridge + host-local, 50 containers at a time, then a leak
//! check: no address file, veth, held lock or iptables rule may remain.

mod common;

use common::{Call, Net, Ns, PluginDir, invoke, veths};
use serde_json::{Value, json};

const PARALLEL: usize = 50;
const ROUNDS: usize = 20;
/// Rounds that also chain portmap and turn on ipMasq, so firewall rules are exercised.
const FIREWALL_ROUNDS: usize = 2;

fn cycle(dir: &PluginDir, host: &Ns, ctr: &Ns, id: &str, bconf: &Value, firewall: bool) {
    let call = |cmd| Call::new(cmd, id, Some(ctr.path.as_path()), dir.path());
    let prev = invoke(&dir.bin("bridge"), host, &call("ADD"), bconf).ok();
    let pconf = json!({
        "cniVersion": "1.0.0", "name": bconf["name"], "type": "portmap", "prevResult": prev,
        "runtimeConfig": {"portMappings": [{"hostPort": 20000, "containerPort": 80}]},
    });
    if firewall {
        invoke(&dir.bin("portmap"), host, &call("ADD"), &pconf).ok();
        invoke(&dir.bin("portmap"), host, &call("DEL"), &pconf).ok();
    }
    invoke(&dir.bin("bridge"), host, &call("DEL"), bconf).ok();
}

#[test]
fn a_thousand_cycles_fifty_in_parallel_leak_nothing() {
    let host = Ns::new("h");
    let ctrs: Vec<Ns> = (0..PARALLEL).map(|_| Ns::new("s")).collect();
    let dir = PluginDir::ours();
    let net = Net::new();
    let plain = net.v4("10.83.0.0/22");
    let mut masq = plain.clone();
    masq["ipMasq"] = json!(true);
    let mut cycles = 0;
    for round in 0..ROUNDS {
        let firewall = round < FIREWALL_ROUNDS;
        let conf = if firewall { &masq } else { &plain };
        std::thread::scope(|s| {
            for (i, ctr) in ctrs.iter().enumerate() {
                let (dir, host) = (&dir, &host);
                s.spawn(move || cycle(dir, host, ctr, &format!("r{round}c{i}"), conf, firewall));
            }
        });
        cycles += PARALLEL;
    }
    assert_eq!(cycles, 1000);

    assert!(
        net.allocated().is_empty(),
        "addresses leaked: {:?}",
        net.allocated()
    );
    net.assert_unlocked();
    assert!(veths(&host).is_empty(), "veths leaked: {:?}", veths(&host));
    for ctr in &ctrs {
        assert_eq!(ctr.links(), ["lo"], "interface leaked in {}", ctr.name);
    }
    for v6 in [false, true] {
        let nat = host.nat_rules(v6);
        let per_container: Vec<&str> = nat
            .lines()
            .filter(|l| l.contains("CNI-DN-") || l.contains("id: ") || l.contains("10.83."))
            .collect();
        assert!(per_container.is_empty(), "rules leaked: {per_container:#?}");
        let chains = nat.lines().filter(|l| l.starts_with(":CNI-")).count();
        // Only the shared portmap chains stay, as with the reference plugin.
        assert!(chains <= 3, "chains leaked: {nat}");
    }
}
