//! The execution settings of an image (entrypoint, cmd, env, ...) and parsers for the text
//! forms a user writes them in.

use std::collections::BTreeMap;

use oci_spec::image::{Arch, Config, Os};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "{field}: {input:?} is not a JSON array of strings (e.g. [\"/bin/sh\", \"-c\"]): {reason}"
    )]
    BadCommandJson {
        field: &'static str,
        input: String,
        reason: String,
    },
    #[error("{field}: {input:?} is not KEY=VALUE with a non-empty KEY")]
    BadKeyValue { field: &'static str, input: String },
    #[error(
        "exposed port {input:?} is not PORT or PORT/PROTOCOL with PORT 1-65535 and PROTOCOL tcp, udp or sctp"
    )]
    BadPort { input: String },
    #[error("stop signal {input:?} is not a signal name like SIGTERM or a number 1-64")]
    BadStopSignal { input: String },
    #[error("working directory {input:?} is not an absolute path")]
    BadWorkingDir { input: String },
    #[error("user {input:?} is not USER, UID, USER:GROUP or UID:GID")]
    BadUser { input: String },
    #[error("owner {input:?} is not UID:GID with numeric ids")]
    BadOwner { input: String },
    #[error("unknown {what} {input:?}")]
    UnknownPlatform { what: &'static str, input: String },
}

/// What a container started from the image runs by default, and the platform it is for.
///
/// Maps are ordered so the config JSON, and with it the image digest, depends only on the
/// settings and not on insertion order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSettings {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
    /// `PORT/PROTOCOL` strings, as produced by [`parse_port`].
    pub exposed_ports: Vec<String>,
    pub os: Os,
    pub arch: Arch,
}

impl Default for ImageSettings {
    fn default() -> Self {
        Self {
            entrypoint: None,
            cmd: None,
            env: vec![DEFAULT_PATH.to_owned()],
            working_dir: None,
            user: None,
            labels: BTreeMap::new(),
            stop_signal: None,
            exposed_ports: Vec::new(),
            os: Os::Linux,
            arch: host_arch(),
        }
    }
}

/// The PATH most images carry, so that a bare command name resolves in the container.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ImageSettings {
    /// The `config` section of the OCI image configuration.
    pub(crate) fn to_oci(&self) -> Config {
        let mut config = Config::default();
        config.set_entrypoint(self.entrypoint.clone());
        config.set_cmd(self.cmd.clone());
        config.set_env((!self.env.is_empty()).then(|| self.env.clone()));
        config.set_working_dir(self.working_dir.clone());
        config.set_user(self.user.clone());
        config.set_labels((!self.labels.is_empty()).then(|| {
            self.labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        }));
        config.set_stop_signal(self.stop_signal.clone());
        let mut ports = self.exposed_ports.clone();
        ports.sort();
        ports.dedup();
        config.set_exposed_ports((!ports.is_empty()).then_some(ports));
        config
    }
}

/// The Go architecture name of the machine this runs on, as image configs spell it.
pub fn host_arch() -> Arch {
    let go_name = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Arch::from(go_name)
}

/// Parses a command given as a JSON array of strings, e.g. `["/bin/sh", "-c", "echo hi"]`.
/// `field` names the setting in the error (`entrypoint`, `cmd`).
pub fn parse_command(field: &'static str, input: &str) -> Result<Vec<String>, ConfigError> {
    serde_json::from_str::<Vec<String>>(input).map_err(|e| ConfigError::BadCommandJson {
        field,
        input: input.to_owned(),
        reason: e.to_string(),
    })
}

/// Parses `KEY=VALUE`; the value may be empty and may contain '='.
pub fn parse_key_value(field: &'static str, input: &str) -> Result<(String, String), ConfigError> {
    match input.split_once('=') {
        Some((key, value)) if !key.is_empty() && !key.contains(char::is_whitespace) => {
            Ok((key.to_owned(), value.to_owned()))
        }
        _ => Err(ConfigError::BadKeyValue {
            field,
            input: input.to_owned(),
        }),
    }
}

/// Parses an environment entry and returns it in the `KEY=VALUE` form the config stores.
pub fn parse_env(input: &str) -> Result<String, ConfigError> {
    parse_key_value("env", input).map(|(key, value)| format!("{key}={value}"))
}

/// Parses `PORT` or `PORT/PROTOCOL` into the `PORT/protocol` form image configs use.
pub fn parse_port(input: &str) -> Result<String, ConfigError> {
    let bad = || ConfigError::BadPort {
        input: input.to_owned(),
    };
    let (port, protocol) = input.split_once('/').unwrap_or((input, "tcp"));
    let protocol = protocol.to_ascii_lowercase();
    if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
        return Err(bad());
    }
    match port.parse::<u16>() {
        Ok(port) if port != 0 && !input.starts_with('+') => Ok(format!("{port}/{protocol}")),
        _ => Err(bad()),
    }
}

/// Checks a stop signal: a `SIG` name (`SIGTERM`, `SIGRTMIN+3`) or a number 1-64.
pub fn parse_stop_signal(input: &str) -> Result<String, ConfigError> {
    let named = input.strip_prefix("SIG").is_some_and(|name| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'+' || b == b'-')
    });
    let numbered = input.parse::<u8>().is_ok_and(|n| (1..=64).contains(&n));
    if named || numbered {
        Ok(input.to_owned())
    } else {
        Err(ConfigError::BadStopSignal {
            input: input.to_owned(),
        })
    }
}

pub fn parse_working_dir(input: &str) -> Result<String, ConfigError> {
    if input.starts_with('/') {
        Ok(input.to_owned())
    } else {
        Err(ConfigError::BadWorkingDir {
            input: input.to_owned(),
        })
    }
}

/// Checks `USER`, `UID`, `USER:GROUP` or `UID:GID` (names are resolved in the container).
pub fn parse_user(input: &str) -> Result<String, ConfigError> {
    let part_ok = |part: &str| {
        !part.is_empty() && !part.contains(|c: char| c.is_whitespace() || c.is_control())
    };
    let ok = match input.split_once(':') {
        Some((user, group)) => part_ok(user) && part_ok(group) && !group.contains(':'),
        None => part_ok(input),
    };
    if ok {
        Ok(input.to_owned())
    } else {
        Err(ConfigError::BadUser {
            input: input.to_owned(),
        })
    }
}

/// Parses `UID:GID` with numeric ids.
pub fn parse_owner(input: &str) -> Result<(u32, u32), ConfigError> {
    let bad = || ConfigError::BadOwner {
        input: input.to_owned(),
    };
    let (uid, gid) = input.split_once(':').ok_or_else(bad)?;
    let number = |s: &str| {
        if s.starts_with('+') {
            None
        } else {
            s.parse::<u32>().ok()
        }
    };
    Ok((number(uid).ok_or_else(bad)?, number(gid).ok_or_else(bad)?))
}

/// Parses a Go OS name (`linux`).
pub fn parse_os(input: &str) -> Result<Os, ConfigError> {
    match Os::from(input) {
        Os::Other(_) => Err(ConfigError::UnknownPlatform {
            what: "os",
            input: input.to_owned(),
        }),
        os => Ok(os),
    }
}

/// Parses a Go architecture name (`amd64`, `arm64`, ...).
pub fn parse_arch(input: &str) -> Result<Arch, ConfigError> {
    match Arch::from(input) {
        Arch::Other(_) => Err(ConfigError::UnknownPlatform {
            what: "architecture",
            input: input.to_owned(),
        }),
        arch => Ok(arch),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_must_be_json_string_arrays() {
        assert_eq!(
            parse_command("cmd", r#"["/bin/sh", "-c", "echo \"hi\""]"#).unwrap(),
            ["/bin/sh", "-c", "echo \"hi\""]
        );
        assert_eq!(parse_command("cmd", "[]").unwrap(), Vec::<String>::new());
        for bad in [
            "/bin/sh",
            "[\"/bin/sh\"",
            "[1, 2]",
            "{\"a\": 1}",
            "\"sh\"",
            "",
        ] {
            let err = parse_command("entrypoint", bad).unwrap_err();
            assert!(
                err.to_string()
                    .starts_with(&format!("entrypoint: {bad:?} is not a JSON array")),
                "{err}"
            );
        }
    }

    #[test]
    fn key_values() {
        assert_eq!(parse_env("A=b=c").unwrap(), "A=b=c");
        assert_eq!(parse_env("EMPTY=").unwrap(), "EMPTY=");
        for bad in ["NOEQUALS", "=value", "A B=c"] {
            assert!(
                matches!(parse_env(bad), Err(ConfigError::BadKeyValue { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn ports() {
        assert_eq!(parse_port("80").unwrap(), "80/tcp");
        assert_eq!(parse_port("53/UDP").unwrap(), "53/udp");
        assert_eq!(parse_port("9/sctp").unwrap(), "9/sctp");
        for bad in ["0", "65536", "80/icmp", "http", "+80", "80/", "/tcp"] {
            assert!(
                matches!(parse_port(bad), Err(ConfigError::BadPort { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn signals_users_dirs_owners_platforms() {
        assert!(parse_stop_signal("SIGTERM").is_ok());
        assert!(parse_stop_signal("SIGRTMIN+3").is_ok());
        assert!(parse_stop_signal("9").is_ok());
        for bad in ["TERM", "SIG", "sigterm", "0", "65"] {
            assert!(parse_stop_signal(bad).is_err(), "{bad}");
        }
        assert!(parse_user("65534:65534").is_ok());
        assert!(parse_user("nobody").is_ok());
        for bad in ["", ":", "a:", ":b", "a:b:c", "a b"] {
            assert!(parse_user(bad).is_err(), "{bad:?}");
        }
        assert!(parse_working_dir("/srv").is_ok());
        assert!(parse_working_dir("srv").is_err());
        assert_eq!(parse_owner("0:65534").unwrap(), (0, 65534));
        for bad in ["0", "a:b", "-1:0", "+1:0", "0:"] {
            assert!(parse_owner(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_arch("arm64").unwrap(), Arch::ARM64);
        assert!(parse_arch("z80").is_err());
        assert_eq!(parse_os("linux").unwrap(), Os::Linux);
        assert!(parse_os("plan10").is_err());
    }

    #[test]
    fn oci_config_is_sorted_and_sparse() {
        let settings = ImageSettings {
            exposed_ports: vec!["80/tcp".into(), "53/udp".into(), "80/tcp".into()],
            env: Vec::new(),
            ..ImageSettings::default()
        };
        let config = settings.to_oci();
        assert_eq!(
            config.exposed_ports().as_deref(),
            Some(&["53/udp".to_owned(), "80/tcp".to_owned()][..])
        );
        assert_eq!(config.env(), &None);
        assert_eq!(config.labels(), &None);
    }
}
