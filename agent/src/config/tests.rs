use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use super::*;

fn flags_with_kubeconfig() -> Flags {
    Flags {
        kubeconfig: Some("/etc/ferrolet/kubeconfig".into()),
        ..Flags::default()
    }
}

#[test]
fn only_the_required_flags_give_working_defaults() {
    let flags = Flags {
        kubeconfig: Some("/k".into()),
        node_name: Some("node-1".into()),
        container_runtime_endpoint: Some("unix:///run/x.sock".into()),
        root_dir: Some("/var/lib/x".into()),
        cni_bin_dir: Some("/opt/cni/bin".into()),
        cni_conf_dir: Some("/etc/cni/net.d".into()),
        ..Flags::default()
    };
    let c = AgentConfig::resolve(FileConfig::default(), &flags, "ignored").unwrap();
    assert_eq!(c.node_name, "node-1");
    assert_eq!(c.runtime_socket(), Path::new("/run/x.sock"));
    assert_eq!(c.max_pods, 110);
    assert_eq!(c.port, 10250);
    assert_eq!(c.cluster_domain, "cluster.local");
    assert_eq!(c.node_status_update_frequency, Duration::from_secs(10));
    assert_eq!(c.node_status_report_frequency, Duration::from_secs(300));
    assert_eq!(
        (
            c.image_gc_high_threshold_percent,
            c.image_gc_low_threshold_percent,
            c.image_minimum_gc_age
        ),
        (85, 80, Duration::from_secs(120))
    );
    assert!(
        c.cgroup_root.starts_with("/ferrolet"),
        "pods live under the project's own cgroup parent"
    );
}

#[test]
fn flags_override_the_file_and_file_overrides_defaults() {
    let file = FileConfig::parse(
        "kind: KubeletConfiguration\napiVersion: kubelet.config.k8s.io/v1beta1\nmaxPods: 20\nclusterDomain: corp.local\nclusterDNS: [10.96.0.10]\nsystemReserved: {cpu: 100m, memory: 256Mi}\nsyncFrequency: 30s\n",
        Path::new("c.yaml"),
    )
    .unwrap();
    let flags = Flags {
        max_pods: Some(7),
        ..flags_with_kubeconfig()
    };
    let c = AgentConfig::resolve(file, &flags, "Host-A").unwrap();
    assert_eq!(c.max_pods, 7, "flag wins");
    assert_eq!(c.cluster_domain, "corp.local", "file wins over default");
    assert_eq!(c.cluster_dns, vec!["10.96.0.10".parse::<IpAddr>().unwrap()]);
    assert_eq!(c.system_reserved["cpu"].millis(), 100);
    assert_eq!(c.system_reserved["memory"].units_ceil(), 256 * 1024 * 1024);
    assert_eq!(c.sync_frequency, Duration::from_secs(30));
    assert_eq!(c.node_name, "host-a", "host name lowercased");
}

#[test]
fn service_proxy_settings_from_file_and_flags() {
    let c = AgentConfig::resolve(FileConfig::default(), &flags_with_kubeconfig(), "h").unwrap();
    assert!(c.service_proxy, "the proxy runs unless turned off");
    assert_eq!(c.cluster_cidr, None);
    let file = FileConfig::parse(
        "clusterCIDR: 10.244.0.0/16\nserviceClusterIPRange: 10.96.0.0/12\nserviceProxy: false\n",
        Path::new("c.yaml"),
    )
    .unwrap();
    let flags = Flags {
        cluster_cidr: Some("10.100.0.0/16".into()),
        service_proxy: Some(true),
        ..flags_with_kubeconfig()
    };
    let c = AgentConfig::resolve(file, &flags, "h").unwrap();
    assert_eq!(
        c.cluster_cidr.as_deref(),
        Some("10.100.0.0/16"),
        "flag wins"
    );
    assert_eq!(c.service_cluster_ip_range.as_deref(), Some("10.96.0.0/12"));
    assert!(c.service_proxy, "flag wins");
}

#[test]
fn taints_and_labels_from_flags() {
    let flags = Flags {
        register_with_taints: vec!["dedicated=gpu:NoSchedule".into(), "maint:NoExecute".into()],
        node_labels: Some("zone=a, tier=web".into()),
        ..flags_with_kubeconfig()
    };
    let c = AgentConfig::resolve(FileConfig::default(), &flags, "h").unwrap();
    assert_eq!(
        c.register_with_taints,
        vec![
            Taint {
                key: "dedicated".into(),
                value: Some("gpu".into()),
                effect: TaintEffect::NoSchedule
            },
            Taint {
                key: "maint".into(),
                value: None,
                effect: TaintEffect::NoExecute
            },
        ]
    );
    assert_eq!(c.node_labels["zone"], "a");
    assert_eq!(c.node_labels["tier"], "web");
}

/// Bad inputs tried: unknown field, wrong kind, malformed YAML, bad duration, bad quantity,
/// bad taint effect, relative runtime endpoint, invalid node name, cgroup root escaping with
/// `..`, zero maxPods, GC thresholds out of order, no kubeconfig at all.
#[test]
fn bad_inputs_are_rejected_with_the_field_named() {
    let p = Path::new("c.yaml");
    let err = FileConfig::parse("maxPod: 3\n", p).unwrap_err().to_string();
    assert!(err.contains("maxPod"), "{err}");
    let err = FileConfig::parse("kind: KubeProxyConfiguration\n", p)
        .unwrap_err()
        .to_string();
    assert!(err.contains("KubeletConfiguration"), "{err}");
    assert!(matches!(
        FileConfig::parse("maxPods: [", p),
        Err(ConfigError::Parse { .. })
    ));

    let resolve_file = |yaml: &str| {
        AgentConfig::resolve(
            FileConfig::parse(yaml, p).unwrap(),
            &flags_with_kubeconfig(),
            "h",
        )
        .unwrap_err()
        .to_string()
    };
    assert!(resolve_file("syncFrequency: 10 parsecs\n").contains("syncFrequency"));
    assert!(resolve_file("kubeReserved: {memory: lots}\n").contains("kubeReserved[memory]"));
    assert!(
        resolve_file("registerWithTaints: [{key: a, effect: Sometimes}]\n").contains("Sometimes")
    );
    assert!(
        resolve_file("containerRuntimeEndpoint: run/x.sock\n").contains("containerRuntimeEndpoint")
    );
    assert!(resolve_file("nodeName: Bad_Name\n").contains("nodeName"));
    assert!(resolve_file("cgroupRoot: /ferrolet/../system.slice\n").contains("cgroupRoot"));
    assert!(resolve_file("maxPods: 0\n").contains("maxPods"));
    assert!(
        resolve_file("imageGCHighThresholdPercent: 50\nimageGCLowThresholdPercent: 60\n")
            .contains("imageGC")
    );
    assert!(resolve_file("imageMinimumGCAge: soon\n").contains("imageMinimumGCAge"));
    assert!(matches!(
        AgentConfig::resolve(FileConfig::default(), &Flags::default(), "h"),
        Err(ConfigError::NoKubeconfig)
    ));
}

#[test]
fn cluster_cidr_from_flag_or_file_must_be_an_ipv4_network() {
    let file = FileConfig::parse("clusterCIDR: 10.244.0.0/16\n", Path::new("c.yaml")).unwrap();
    let c = AgentConfig::resolve(file.clone(), &flags_with_kubeconfig(), "h").unwrap();
    assert_eq!(c.cluster_cidr.as_deref(), Some("10.244.0.0/16"));
    let flags = Flags {
        cluster_cidr: Some("10.32.0.0/12".into()),
        ..flags_with_kubeconfig()
    };
    let c = AgentConfig::resolve(file, &flags, "h").unwrap();
    assert_eq!(c.cluster_cidr.as_deref(), Some("10.32.0.0/12"));
    let c = AgentConfig::resolve(FileConfig::default(), &flags_with_kubeconfig(), "h").unwrap();
    assert_eq!(c.cluster_cidr, None, "no cluster CIDR unless given");
    for bad in [
        "10.244.0.0",
        "10.244.1.0/16",
        "fd00::/64",
        "10.244.0.0/33",
        "nonsense",
    ] {
        let flags = Flags {
            cluster_cidr: Some(bad.into()),
            ..flags_with_kubeconfig()
        };
        let err = AgentConfig::resolve(FileConfig::default(), &flags, "h").unwrap_err();
        assert!(err.to_string().starts_with("clusterCIDR: "), "{bad}: {err}");
    }
}

#[test]
fn go_durations() {
    assert_eq!(parse_duration("1m0s").unwrap(), Duration::from_secs(60));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
    assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    for bad in ["", "5", "s", "1x", "-1s", "1..5s", "1s2"] {
        assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
    }
}

#[test]
fn quantities() {
    let q = |s: &str| Quantity::parse(s).unwrap().millis();
    assert_eq!(q("100m"), 100);
    assert_eq!(q("2"), 2000);
    assert_eq!(q("0.5"), 500);
    assert_eq!(q("1Ki"), 1024 * 1000);
    assert_eq!(q("1.5Gi"), 3 * (1u128 << 29) * 1000);
    assert_eq!(q("1k"), 1_000_000);
    assert_eq!(q("1e3"), 1_000_000);
    assert_eq!(q("1E-3"), 1);
    assert_eq!(Quantity::parse("100m").unwrap().units_ceil(), 1);
    for bad in ["", "m", "1.2.3", "12q", "1Kib", "-1", "1e99"] {
        assert!(Quantity::parse(bad).is_err(), "{bad:?} should not parse");
    }
}

mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn durations_round_trip(h in 0u64..100, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}s{ms}ms");
            let d = parse_duration(&text).unwrap();
            prop_assert_eq!(d, Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms));
        }

        #[test]
        fn binary_suffixes_scale_exactly(n in 0u64..1_000_000, i in 0usize..4) {
            let (suffix, shift) = [("Ki", 10), ("Mi", 20), ("Gi", 30), ("Ti", 40)][i];
            let q = Quantity::parse(&format!("{n}{suffix}")).unwrap();
            prop_assert_eq!(q.units_ceil(), u128::from(n) << shift);
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,24}") {
            let _ = Quantity::parse(&s);
            let _ = parse_duration(&s);
        }
    }
}
