//! OCI runtime specs from CRI configs: the pause (infra) container of a sandbox, and an
//! application container joining the sandbox's namespaces. Pure functions of their inputs.

use std::path::PathBuf;

use ferrolet_cri::v1;
use oci_spec::runtime::Spec;

use super::CriError;
use crate::container::UserLookup;
use crate::container::caps;
use crate::container::defaults::{self, MASKED_PATHS, READONLY_PATHS};
use crate::image::ImageConfig;

/// How a container gets one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NsMode {
    New,
    Join(PathBuf),
    Host,
}

/// The namespaces of a container (mount is always new).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    pub net: NsMode,
    pub ipc: NsMode,
    pub uts: NsMode,
    pub pid: NsMode,
}

fn ns_json(ns: &Namespaces) -> serde_json::Value {
    let mut list = vec![serde_json::json!({"type": "mount"})];
    for (name, mode) in [
        ("network", &ns.net),
        ("ipc", &ns.ipc),
        ("uts", &ns.uts),
        ("pid", &ns.pid),
    ] {
        match mode {
            NsMode::New => list.push(serde_json::json!({"type": name})),
            NsMode::Join(p) => list.push(serde_json::json!({"type": name, "path": p})),
            NsMode::Host => {}
        }
    }
    serde_json::Value::Array(list)
}

fn to_spec(v: serde_json::Value) -> Result<Spec, CriError> {
    serde_json::from_value(v).map_err(|e| CriError::Internal(format!("build runtime spec: {e}")))
}

/// The spec of a sandbox's pause container.
pub fn pause_spec(
    args: &[String],
    hostname: Option<&str>,
    ns: &Namespaces,
    cgroup_path: &str,
    sysctls: &std::collections::HashMap<String, String>,
) -> Result<Spec, CriError> {
    let mut v = serde_json::to_value(defaults::base_spec(args))
        .map_err(|e| CriError::Internal(e.to_string()))?;
    v["root"]["readonly"] = serde_json::json!(true);
    v["process"]["noNewPrivileges"] = serde_json::json!(true);
    v["process"]["capabilities"] = serde_json::json!({});
    v["process"]["oomScoreAdj"] = serde_json::json!(-998);
    v["linux"]["namespaces"] = ns_json(ns);
    v["linux"]["cgroupsPath"] = serde_json::json!(cgroup_path);
    if !sysctls.is_empty() {
        v["linux"]["sysctl"] = serde_json::to_value(sysctls).unwrap_or_default();
    }
    if ns.uts == NsMode::New
        && let Some(h) = hostname.filter(|h| !h.is_empty())
    {
        v["hostname"] = serde_json::json!(h);
    }
    to_spec(v)
}

/// Files of the sandbox that every container mounts unless its config mounts its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxFiles {
    pub hosts: PathBuf,
    pub hostname: PathBuf,
    pub resolv_conf: PathBuf,
}

/// The pieces of a container's spec the runtime needs besides the spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPlan {
    pub spec: Spec,
    pub user: Option<UserLookup>,
}

/// Splits an image `User` (`name`, `uid`, `uid:gid`, `name:group`) into lookups.
fn image_user(user: &str) -> (Option<UserLookup>, Option<u32>) {
    if user.is_empty() {
        return (None, None);
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let gid = g.and_then(|g| g.parse().ok());
    let lookup = match u.parse::<u32>() {
        Ok(uid) => UserLookup::Uid(uid),
        Err(_) => UserLookup::Name(u.to_string()),
    };
    (Some(lookup), gid)
}

fn caps_for(
    sc: Option<&v1::LinuxContainerSecurityContext>,
) -> Result<(Vec<String>, Vec<String>), CriError> {
    let privileged = sc.is_some_and(|s| s.privileged);
    let mut set: Vec<String> = if privileged {
        caps::NAMES.iter().map(|s| (*s).to_string()).collect()
    } else {
        caps::DEFAULT.iter().map(|s| (*s).to_string()).collect()
    };
    let mut ambient = Vec::new();
    if let Some(c) = sc.and_then(|s| s.capabilities.as_ref()) {
        let norm = |n: &str| {
            caps::normalize(n).map_err(|e| {
                CriError::InvalidArgument(format!("linux.security_context.capabilities: {e}"))
            })
        };
        if c.drop_capabilities
            .iter()
            .any(|d| d.eq_ignore_ascii_case("ALL"))
        {
            set.clear();
        }
        for d in &c.drop_capabilities {
            if d.eq_ignore_ascii_case("ALL") {
                continue;
            }
            let d = norm(d)?;
            set.retain(|x| *x != d);
        }
        for a in &c.add_capabilities {
            if a.eq_ignore_ascii_case("ALL") {
                set = caps::NAMES.iter().map(|s| (*s).to_string()).collect();
                continue;
            }
            let a = norm(a)?;
            if !set.contains(&a) {
                set.push(a);
            }
        }
        for a in &c.add_ambient_capabilities {
            let a = norm(a)?;
            if !set.contains(&a) {
                set.push(a.clone());
            }
            ambient.push(a);
        }
    }
    Ok((set, ambient))
}

/// The spec of an application container in a sandbox.
pub fn container_spec(
    cfg: &v1::ContainerConfig,
    image: &ImageConfig,
    ns: &Namespaces,
    files: &SandboxFiles,
    pod_hostname: &str,
    cgroup_path: &str,
) -> Result<ContainerPlan, CriError> {
    let mut args: Vec<String> = if cfg.command.is_empty() {
        image.entrypoint.clone()
    } else {
        cfg.command.clone()
    };
    if !cfg.args.is_empty() {
        args.extend(cfg.args.iter().cloned());
    } else if cfg.command.is_empty() {
        args.extend(image.cmd.iter().cloned());
    }
    if args.is_empty() {
        return Err(CriError::InvalidArgument(
            "no command: the container config has no command or args and the image no entrypoint or cmd"
                .into(),
        ));
    }

    let mut env: Vec<String> = Vec::new();
    let mut set_env = |kv: String| {
        let key = kv.split('=').next().unwrap_or_default().to_string();
        env.retain(|e| e.split('=').next() != Some(key.as_str()));
        env.push(kv);
    };
    if image.env.is_empty() {
        set_env(defaults::DEFAULT_PATH.to_string());
    }
    for e in &image.env {
        set_env(e.clone());
    }
    if !pod_hostname.is_empty() {
        set_env(format!("HOSTNAME={pod_hostname}"));
    }
    for kv in &cfg.envs {
        if kv.key.is_empty() {
            return Err(CriError::InvalidArgument(
                "envs: an entry has an empty key".into(),
            ));
        }
        set_env(format!("{}={}", kv.key, kv.value));
    }

    let cwd = if !cfg.working_dir.is_empty() {
        cfg.working_dir.clone()
    } else if !image.working_dir.is_empty() {
        image.working_dir.clone()
    } else {
        "/".to_string()
    };
    if !cwd.starts_with('/') {
        return Err(CriError::InvalidArgument(format!(
            "working_dir {cwd:?} must be an absolute path"
        )));
    }

    let linux = cfg.linux.as_ref();
    let sc = linux.and_then(|l| l.security_context.as_ref());
    let privileged = sc.is_some_and(|s| s.privileged);

    let (mut lookup, mut gid) = image_user(&image.user);
    let mut uid_gid: Option<(u32, u32)> = None;
    if let Some(s) = sc {
        if let Some(g) = &s.run_as_group {
            gid = Some(u32::try_from(g.value).map_err(|_| {
                CriError::InvalidArgument(format!("run_as_group {} is out of range", g.value))
            })?);
        }
        if !s.run_as_username.is_empty() {
            lookup = Some(UserLookup::Name(s.run_as_username.clone()));
        } else if let Some(u) = &s.run_as_user {
            let uid = u32::try_from(u.value).map_err(|_| {
                CriError::InvalidArgument(format!("run_as_user {} is out of range", u.value))
            })?;
            lookup = Some(UserLookup::Uid(uid));
        }
    }
    if let (Some(UserLookup::Uid(uid)), Some(g)) = (&lookup, gid) {
        uid_gid = Some((*uid, g));
        lookup = None;
    }
    let mut additional: Vec<u32> = Vec::new();
    for g in sc
        .map(|s| s.supplemental_groups.as_slice())
        .unwrap_or_default()
    {
        additional.push(u32::try_from(*g).map_err(|_| {
            CriError::InvalidArgument(format!("supplemental group {g} is out of range"))
        })?);
    }
    let (uid, gid_value) = uid_gid.unwrap_or((0, gid.unwrap_or(0)));

    let (cap_set, ambient) = caps_for(sc)?;

    let mut v = serde_json::to_value(defaults::base_spec(&args))
        .map_err(|e| CriError::Internal(e.to_string()))?;
    v["process"]["env"] = serde_json::json!(env);
    v["process"]["cwd"] = serde_json::json!(cwd);
    v["process"]["user"] = serde_json::json!({
        "uid": uid, "gid": gid_value, "additionalGids": additional
    });
    v["process"]["capabilities"] = serde_json::json!({
        "bounding": cap_set, "effective": cap_set, "permitted": cap_set,
        "ambient": ambient, "inheritable": ambient
    });
    v["process"]["noNewPrivileges"] = serde_json::json!(sc.is_some_and(|s| s.no_new_privs));
    v["root"]["readonly"] = serde_json::json!(sc.is_some_and(|s| s.readonly_rootfs));
    v["linux"]["namespaces"] = ns_json(ns);
    v["linux"]["cgroupsPath"] = serde_json::json!(cgroup_path);

    if privileged {
        v["linux"]["resources"]["devices"] = serde_json::json!([{"allow": true, "access": "rwm"}]);
        v["linux"]["maskedPaths"] = serde_json::json!([]);
        v["linux"]["readonlyPaths"] = serde_json::json!([]);
        if let Some(mounts) = v["mounts"].as_array_mut() {
            for m in mounts.iter_mut() {
                if m["destination"] == "/sys" {
                    m["options"] = serde_json::json!(["nosuid", "noexec", "nodev"]);
                }
            }
        }
    } else if let Some(s) = sc {
        let masked: Vec<&str> = if s.masked_paths.is_empty() {
            MASKED_PATHS.to_vec()
        } else {
            s.masked_paths.iter().map(String::as_str).collect()
        };
        let ro: Vec<&str> = if s.readonly_paths.is_empty() {
            READONLY_PATHS.to_vec()
        } else {
            s.readonly_paths.iter().map(String::as_str).collect()
        };
        v["linux"]["maskedPaths"] = serde_json::json!(masked);
        v["linux"]["readonlyPaths"] = serde_json::json!(ro);
    }

    let mut mounts: Vec<serde_json::Value> = v["mounts"].as_array().cloned().unwrap_or_default();
    let user_paths: Vec<&str> = cfg
        .mounts
        .iter()
        .map(|m| m.container_path.as_str())
        .collect();
    for (dest, src) in [
        ("/etc/hosts", &files.hosts),
        ("/etc/hostname", &files.hostname),
        ("/etc/resolv.conf", &files.resolv_conf),
    ] {
        if !user_paths.contains(&dest) {
            mounts.push(serde_json::json!({
                "destination": dest, "type": "bind", "source": src,
                "options": ["rbind", "rprivate"]
            }));
        }
    }
    for m in &cfg.mounts {
        if !m.container_path.starts_with('/') {
            return Err(CriError::InvalidArgument(format!(
                "mounts: container_path {:?} must be absolute",
                m.container_path
            )));
        }
        if m.host_path.is_empty() {
            return Err(CriError::InvalidArgument(format!(
                "mounts: {} has no host_path",
                m.container_path
            )));
        }
        let prop = match v1::MountPropagation::try_from(m.propagation) {
            Ok(v1::MountPropagation::PropagationHostToContainer) => "rslave",
            Ok(v1::MountPropagation::PropagationBidirectional) => "rshared",
            _ => "rprivate",
        };
        let mut opts = vec!["rbind", prop];
        if m.readonly {
            opts.push("ro");
        }
        mounts.push(serde_json::json!({
            "destination": m.container_path, "type": "bind", "source": m.host_path,
            "options": opts
        }));
    }
    v["mounts"] = serde_json::Value::Array(mounts);

    if let Some(r) = linux.and_then(|l| l.resources.as_ref()) {
        let mut cpu = serde_json::Map::new();
        if r.cpu_shares > 0 {
            cpu.insert("shares".into(), serde_json::json!(r.cpu_shares));
        }
        if r.cpu_quota > 0 {
            cpu.insert("quota".into(), serde_json::json!(r.cpu_quota));
        }
        if r.cpu_period > 0 {
            cpu.insert("period".into(), serde_json::json!(r.cpu_period));
        }
        if !r.cpuset_cpus.is_empty() {
            cpu.insert("cpus".into(), serde_json::json!(r.cpuset_cpus));
        }
        if !r.cpuset_mems.is_empty() {
            cpu.insert("mems".into(), serde_json::json!(r.cpuset_mems));
        }
        v["linux"]["resources"]["cpu"] = serde_json::Value::Object(cpu);
        if r.memory_limit_in_bytes > 0 {
            v["linux"]["resources"]["memory"] =
                serde_json::json!({"limit": r.memory_limit_in_bytes});
        }
        if r.oom_score_adj != 0 {
            let adj = r.oom_score_adj.clamp(-1000, 1000);
            v["process"]["oomScoreAdj"] = serde_json::json!(adj);
        }
    }

    let spec = to_spec(v)?;
    Ok(ContainerPlan { spec, user: lookup })
}

/// `resolv.conf` content from the sandbox's DNS config.
pub fn resolv_conf(dns: &v1::DnsConfig) -> String {
    let mut s = String::new();
    if !dns.searches.is_empty() {
        s.push_str(&format!("search {}\n", dns.searches.join(" ")));
    }
    for n in &dns.servers {
        s.push_str(&format!("nameserver {n}\n"));
    }
    if !dns.options.is_empty() {
        s.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> SandboxFiles {
        SandboxFiles {
            hosts: "/s/hosts".into(),
            hostname: "/s/hostname".into(),
            resolv_conf: "/s/resolv.conf".into(),
        }
    }

    fn pod_ns() -> Namespaces {
        Namespaces {
            net: NsMode::Join("/run/netns/x".into()),
            ipc: NsMode::Join("/proc/9/ns/ipc".into()),
            uts: NsMode::Join("/proc/9/ns/uts".into()),
            pid: NsMode::New,
        }
    }

    fn image() -> ImageConfig {
        ImageConfig {
            entrypoint: vec!["/entry".into()],
            cmd: vec!["default".into()],
            env: vec!["PATH=/bin".into(), "A=image".into()],
            working_dir: "/work".into(),
            user: "www".into(),
            stop_signal: String::new(),
        }
    }

    fn json(plan: &ContainerPlan) -> serde_json::Value {
        serde_json::to_value(&plan.spec).unwrap()
    }

    #[test]
    fn command_args_env_cwd_and_user_merge_with_the_image() {
        let cfg = v1::ContainerConfig {
            args: vec!["x".into()],
            envs: vec![v1::KeyValue {
                key: "A".into(),
                value: "cfg".into(),
            }],
            ..Default::default()
        };
        let plan = container_spec(&cfg, &image(), &pod_ns(), &files(), "pod", "p/c").unwrap();
        let v = json(&plan);
        assert_eq!(v["process"]["args"], serde_json::json!(["/entry", "x"]));
        assert_eq!(
            v["process"]["env"],
            serde_json::json!(["PATH=/bin", "HOSTNAME=pod", "A=cfg"])
        );
        assert_eq!(v["process"]["cwd"], "/work");
        assert_eq!(plan.user, Some(UserLookup::Name("www".into())));
        assert_eq!(v["linux"]["cgroupsPath"], "p/c");
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert!(
            ns.iter()
                .any(|n| n["type"] == "network" && n["path"] == "/run/netns/x")
        );
        assert!(
            ns.iter()
                .any(|n| n["type"] == "pid" && n.get("path").is_none())
        );
        let dests: Vec<&str> = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["destination"].as_str())
            .collect();
        assert!(dests.contains(&"/etc/resolv.conf") && dests.contains(&"/etc/hosts"));

        let cmd = v1::ContainerConfig {
            command: vec!["/bin/sh".into()],
            ..Default::default()
        };
        let v = json(&container_spec(&cmd, &image(), &pod_ns(), &files(), "", "p/c").unwrap());
        assert_eq!(v["process"]["args"], serde_json::json!(["/bin/sh"]));
    }

    #[test]
    fn security_context_caps_user_mounts_and_resources() {
        let cfg = v1::ContainerConfig {
            mounts: vec![v1::Mount {
                container_path: "/data".into(),
                host_path: "/srv".into(),
                readonly: true,
                propagation: v1::MountPropagation::PropagationHostToContainer as i32,
                ..Default::default()
            }],
            linux: Some(v1::LinuxContainerConfig {
                resources: Some(v1::LinuxContainerResources {
                    cpu_shares: 256,
                    memory_limit_in_bytes: 1 << 26,
                    oom_score_adj: 500,
                    ..Default::default()
                }),
                security_context: Some(v1::LinuxContainerSecurityContext {
                    capabilities: Some(v1::Capability {
                        add_capabilities: vec!["NET_ADMIN".into()],
                        drop_capabilities: vec!["CAP_KILL".into()],
                        ..Default::default()
                    }),
                    run_as_user: Some(v1::Int64Value { value: 1000 }),
                    run_as_group: Some(v1::Int64Value { value: 2000 }),
                    readonly_rootfs: true,
                    no_new_privs: true,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        let plan = container_spec(&cfg, &image(), &pod_ns(), &files(), "", "p/c").unwrap();
        let v = json(&plan);
        assert_eq!(plan.user, None);
        assert_eq!(v["process"]["user"]["uid"], 1000);
        assert_eq!(v["process"]["user"]["gid"], 2000);
        let bounding: Vec<&str> = v["process"]["capabilities"]["bounding"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| c.as_str())
            .collect();
        assert!(bounding.contains(&"CAP_NET_ADMIN") && !bounding.contains(&"CAP_KILL"));
        assert_eq!(v["root"]["readonly"], true);
        assert_eq!(v["process"]["noNewPrivileges"], true);
        assert_eq!(v["linux"]["resources"]["cpu"]["shares"], 256);
        assert_eq!(v["linux"]["resources"]["memory"]["limit"], 1 << 26);
        assert_eq!(v["linux"]["resources"]["devices"][0]["allow"], false);
        assert_eq!(v["process"]["oomScoreAdj"], 500);
        let data = v["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/data")
            .unwrap()
            .clone();
        assert_eq!(
            data["options"],
            serde_json::json!(["rbind", "rslave", "ro"])
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let no_cmd = ImageConfig::default();
        let err = container_spec(
            &v1::ContainerConfig::default(),
            &no_cmd,
            &pod_ns(),
            &files(),
            "",
            "p/c",
        )
        .unwrap_err();
        assert!(err.to_string().contains("no command"), "{err}");
        let bad_cap = v1::ContainerConfig {
            linux: Some(v1::LinuxContainerConfig {
                security_context: Some(v1::LinuxContainerSecurityContext {
                    capabilities: Some(v1::Capability {
                        add_capabilities: vec!["FLY".into()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let err = container_spec(&bad_cap, &image(), &pod_ns(), &files(), "", "p/c").unwrap_err();
        assert!(err.to_string().contains("FLY"), "{err}");
    }

    #[test]
    fn privileged_gets_every_capability_and_no_masks() {
        let cfg = v1::ContainerConfig {
            linux: Some(v1::LinuxContainerConfig {
                security_context: Some(v1::LinuxContainerSecurityContext {
                    privileged: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = json(&container_spec(&cfg, &image(), &pod_ns(), &files(), "", "p/c").unwrap());
        assert_eq!(
            v["process"]["capabilities"]["bounding"]
                .as_array()
                .unwrap()
                .len(),
            caps::NAMES.len()
        );
        assert_eq!(v["linux"]["maskedPaths"], serde_json::json!([]));
        assert_eq!(
            v["linux"]["resources"]["devices"],
            serde_json::json!([{"allow": true, "access": "rwm"}])
        );
    }

    #[test]
    fn dns_config_becomes_resolv_conf() {
        let dns = v1::DnsConfig {
            servers: vec!["10.0.0.10".into()],
            searches: vec![
                "default.svc.cluster.local".into(),
                "svc.cluster.local".into(),
            ],
            options: vec!["ndots:5".into()],
        };
        assert_eq!(
            resolv_conf(&dns),
            "search default.svc.cluster.local svc.cluster.local\nnameserver 10.0.0.10\noptions ndots:5\n"
        );
    }
}
