use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

use crate::spec::{
    self, CniError, CniResult, ErrorCode, Version, validate_container_id, validate_ifname,
    validate_network_name,
};

/// The `CNI_COMMAND` values of spec 1.1.0 (VERSION is answered before a request exists).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Add => "ADD",
            Self::Del => "DEL",
            Self::Check => "CHECK",
            Self::Status => "STATUS",
            Self::Gc => "GC",
        }
    }
}

/// The fields of a network configuration that every plugin reads; plugin-specific keys
/// are read from [`Request::raw`].
#[derive(Debug, Clone, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub dns: Option<spec::Dns>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: Option<Value>,
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
}

/// One validated invocation.
#[derive(Debug, Clone)]
pub struct Request {
    pub command: Command,
    /// Empty for STATUS and GC.
    pub container_id: String,
    pub netns: Option<PathBuf>,
    /// Empty for STATUS and GC.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs, in order.
    pub args: Vec<(String, String)>,
    pub path: Vec<PathBuf>,
    /// The exact stdin, handed unchanged to delegates.
    pub stdin: Vec<u8>,
    pub raw: Value,
    pub conf: NetConf,
    pub version: Version,
    /// `prevResult`, parsed.
    pub prev_result: Option<CniResult>,
}

type ParseError = (CniError, String);

fn env_error(msg: impl Into<String>, details: impl Into<String>) -> ParseError {
    (
        CniError::new(ErrorCode::InvalidEnvironment, msg, details),
        spec::CURRENT_VERSION.to_string(),
    )
}

impl Request {
    /// `Ok(None)` means VERSION: the caller prints the version info.
    /// Errors carry the `cniVersion` to print them with.
    pub fn parse(
        env: &impl Fn(&str) -> Option<String>,
        stdin: &[u8],
    ) -> Result<Option<Self>, ParseError> {
        let get = |k: &str| env(k).filter(|v| !v.is_empty());
        let command = match get("CNI_COMMAND").as_deref() {
            None => return Err(env_error("CNI_COMMAND is not set", "")),
            Some("VERSION") => return Ok(None),
            Some("ADD") => Command::Add,
            Some("DEL") => Command::Del,
            Some("CHECK") => Command::Check,
            Some("STATUS") => Command::Status,
            Some("GC") => Command::Gc,
            Some(other) => return Err(env_error("unknown CNI_COMMAND", other)),
        };
        let attachment = matches!(command, Command::Add | Command::Del | Command::Check);
        let mut missing = Vec::new();
        let mut need = |k: &'static str, required: bool| {
            let v = get(k);
            if v.is_none() && required {
                missing.push(k);
            }
            v.unwrap_or_default()
        };
        let container_id = need("CNI_CONTAINERID", attachment);
        let netns = need(
            "CNI_NETNS",
            matches!(command, Command::Add | Command::Check),
        );
        let ifname = need("CNI_IFNAME", attachment);
        let path = need("CNI_PATH", true);
        if !missing.is_empty() {
            return Err(env_error(
                format!(
                    "required environment variables missing: {}",
                    missing.join(", ")
                ),
                format!("for CNI_COMMAND={}", command.as_str()),
            ));
        }
        if attachment {
            validate_container_id(&container_id)
                .map_err(|e| (e, spec::CURRENT_VERSION.to_string()))?;
            validate_ifname(&ifname).map_err(|e| (e, spec::CURRENT_VERSION.to_string()))?;
        }
        let args = parse_cni_args(&env("CNI_ARGS").unwrap_or_default())
            .map_err(|e| (e, spec::CURRENT_VERSION.to_string()))?;

        let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
            (
                CniError::new(
                    ErrorCode::DecodingFailure,
                    "decoding network configuration from stdin failed",
                    e.to_string(),
                ),
                spec::CURRENT_VERSION.to_string(),
            )
        })?;
        if !raw.is_object() {
            return Err((
                CniError::msg(
                    ErrorCode::DecodingFailure,
                    "network configuration on stdin is not a JSON object",
                ),
                spec::CURRENT_VERSION.to_string(),
            ));
        }
        let conf: NetConf = serde_json::from_value(raw.clone()).map_err(|e| {
            (
                CniError::new(
                    ErrorCode::InvalidConfig,
                    "invalid network configuration",
                    e.to_string(),
                ),
                spec::CURRENT_VERSION.to_string(),
            )
        })?;
        let cur = |e: CniError| (e, spec::CURRENT_VERSION.to_string());
        if conf.cni_version.is_empty() {
            return Err(cur(CniError::msg(
                ErrorCode::InvalidConfig,
                "network configuration has no cniVersion",
            )));
        }
        let Some(version) = Version::parse(&conf.cni_version) else {
            return Err(cur(CniError::new(
                ErrorCode::IncompatibleVersion,
                "incompatible CNI versions",
                format!(
                    "config is {:?}, plugin supports {:?}",
                    conf.cni_version,
                    spec::SUPPORTED_VERSIONS
                ),
            )));
        };
        let at = |e: CniError| (e, version.as_str().to_string());
        let needs = match command {
            Command::Check => Some(Version::V0_4_0),
            Command::Status | Command::Gc => Some(Version::V1_1_0),
            Command::Add | Command::Del => None,
        };
        if let Some(min) = needs.filter(|min| version < *min) {
            return Err(at(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("config version does not allow {}", command.as_str()),
                format!(
                    "config is {version}, {} needs {min} or later",
                    command.as_str()
                ),
            )));
        }
        if conf.plugin_type.is_empty() {
            return Err(at(CniError::msg(
                ErrorCode::InvalidConfig,
                "network configuration has no type",
            )));
        }
        validate_network_name(&conf.name).map_err(at)?;
        let prev_result = match &conf.prev_result {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value::<CniResult>(v.clone()).map_err(|e| {
                at(CniError::new(
                    ErrorCode::DecodingFailure,
                    "decoding prevResult failed",
                    e.to_string(),
                ))
            })?),
        };
        Ok(Some(Self {
            command,
            container_id,
            netns: (!netns.is_empty()).then(|| PathBuf::from(netns)),
            ifname,
            args,
            path: std::env::split_paths(&path).collect(),
            stdin: stdin.to_vec(),
            raw,
            conf,
            version,
            prev_result,
        }))
    }

    /// The value of one `CNI_ARGS` key.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// GC's `cni.dev/valid-attachments` as (container id, ifname) pairs; the misspelt
    /// `cni.dev/attachments` that some runtimes also send is accepted.
    pub fn valid_attachments(&self) -> Result<Vec<(String, String)>, CniError> {
        #[derive(Deserialize)]
        struct Attachment {
            #[serde(rename = "containerID")]
            container_id: String,
            #[serde(default)]
            ifname: String,
        }
        let list = self
            .raw
            .get("cni.dev/valid-attachments")
            .or_else(|| self.raw.get("cni.dev/attachments"))
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(Value::Array(Vec::new()));
        let list: Vec<Attachment> = serde_json::from_value(list).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "invalid cni.dev/valid-attachments",
                e.to_string(),
            )
        })?;
        Ok(list
            .into_iter()
            .map(|a| (a.container_id, a.ifname))
            .collect())
    }

    /// A plugin-specific configuration struct read from the whole stdin object.
    pub fn plugin_conf<T: serde::de::DeserializeOwned>(&self) -> Result<T, CniError> {
        serde_json::from_value(self.raw.clone()).map_err(|e| {
            CniError::new(
                ErrorCode::InvalidConfig,
                format!("invalid {} configuration", self.conf.plugin_type),
                e.to_string(),
            )
        })
    }
}

/// Parses `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
pub fn parse_cni_args(s: &str) -> Result<Vec<(String, String)>, CniError> {
    s.split(';')
        .filter(|p| !p.is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                "invalid CNI_ARGS pair, expected KEY=VALUE",
                pair,
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    const ADD_ENV: [(&str, &str); 5] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
    ];
    const CONF: &[u8] = br#"{"cniVersion":"1.0.0","name":"n","type":"bridge","extra":{"k":1}}"#;

    fn code(r: Result<Option<Request>, ParseError>) -> u32 {
        r.unwrap_err().0.code.as_u32()
    }

    #[test]
    fn parses_a_valid_add() {
        let req = Request::parse(&env(&ADD_ENV), CONF).unwrap().unwrap();
        assert_eq!(req.command, Command::Add);
        assert_eq!(req.path.len(), 2);
        assert_eq!(req.version, Version::V1_0_0);
        assert_eq!(req.raw["extra"]["k"], 1, "unknown keys are kept");
    }

    #[test]
    fn version_needs_nothing() {
        assert!(
            Request::parse(&env(&[("CNI_COMMAND", "VERSION")]), b"")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn env_errors_are_code_4() {
        assert_eq!(code(Request::parse(&env(&[]), CONF)), 4);
        assert_eq!(
            code(Request::parse(&env(&[("CNI_COMMAND", "FOO")]), CONF)),
            4
        );
        let mut e = ADD_ENV.to_vec();
        e.retain(|(k, _)| *k != "CNI_NETNS");
        assert_eq!(code(Request::parse(&env(&e), CONF)), 4);
        let mut e = ADD_ENV.to_vec();
        e[1] = ("CNI_CONTAINERID", "bad/id");
        assert_eq!(code(Request::parse(&env(&e), CONF)), 4);
        let mut e = ADD_ENV.to_vec();
        e.push(("CNI_ARGS", "novalue"));
        assert_eq!(code(Request::parse(&env(&e), CONF)), 4);
    }

    #[test]
    fn del_does_not_need_a_netns() {
        let mut e = ADD_ENV.to_vec();
        e[0] = ("CNI_COMMAND", "DEL");
        e.retain(|(k, _)| *k != "CNI_NETNS");
        assert!(
            Request::parse(&env(&e), CONF)
                .unwrap()
                .unwrap()
                .netns
                .is_none()
        );
    }

    #[test]
    fn config_errors_have_their_codes() {
        let e = env(&ADD_ENV);
        assert_eq!(code(Request::parse(&e, b"{not json")), 6);
        assert_eq!(code(Request::parse(&e, b"[1]")), 6);
        assert_eq!(
            code(Request::parse(&e, br#"{"cniVersion":"1.0.0","name":"n"}"#)),
            7
        );
        assert_eq!(code(Request::parse(&e, br#"{"name":"n","type":"t"}"#)), 7);
        assert_eq!(
            code(Request::parse(
                &e,
                br#"{"cniVersion":"0.2.0","name":"n","type":"t"}"#
            )),
            1
        );
        assert_eq!(
            code(Request::parse(
                &e,
                br#"{"cniVersion":"9.9.9","name":"n","type":"t"}"#
            )),
            1
        );
        assert_eq!(
            code(Request::parse(
                &e,
                br#"{"cniVersion":"1.0.0","name":"a b","type":"t"}"#
            )),
            7
        );
        assert_eq!(
            code(Request::parse(&e, br#"{"cniVersion":"1.0.0","name":"n","type":"t","prevResult":{"ips":[{"address":"x"}]}}"#)),
            6
        );
    }

    #[test]
    fn check_needs_0_4_and_gc_needs_1_1() {
        let mut e = ADD_ENV.to_vec();
        e[0] = ("CNI_COMMAND", "CHECK");
        assert_eq!(
            code(Request::parse(
                &env(&e),
                br#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#
            )),
            1
        );
        let gc = env(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/x")]);
        assert_eq!(code(Request::parse(&gc, CONF)), 1);
        let ok = br#"{"cniVersion":"1.1.0","name":"n","type":"t"}"#;
        assert!(Request::parse(&gc, ok).unwrap().is_some());
    }

    #[test]
    fn cni_args() {
        let a = parse_cni_args("IgnoreUnknown=1;IP=10.0.0.2;K8S_POD_NAME=p").unwrap();
        assert_eq!(a[1], ("IP".into(), "10.0.0.2".into()));
        assert!(parse_cni_args("").unwrap().is_empty());
        assert!(parse_cni_args("=x").is_err());
    }

    proptest::proptest! {
        /// Whatever arrives on stdin, parsing ends in a request or a CNI error with a
        /// well-known code; it never panics.
        #[test]
        fn arbitrary_stdin_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Err((e, _)) = Request::parse(&env(&ADD_ENV), &bytes) {
                proptest::prop_assert!(matches!(e.code.as_u32(), 1 | 4 | 6 | 7));
            }
        }

        #[test]
        fn json_shaped_configs_never_panic(
            version in "(0\\.3\\.[01]|0\\.4\\.0|1\\.[01]\\.0|[0-9.]{0,6})",
            name in "\\PC{0,12}",
            kind in "\\PC{0,8}",
            prev in proptest::option::of("\\PC{0,40}"),
        ) {
            let mut conf = serde_json::json!({"cniVersion": version, "name": name, "type": kind});
            if let Some(p) = prev {
                conf["prevResult"] = serde_json::from_str(&p).unwrap_or(Value::String(p));
            }
            let bytes = conf.to_string().into_bytes();
            if let Err((e, _)) = Request::parse(&env(&ADD_ENV), &bytes) {
                proptest::prop_assert!(matches!(e.code.as_u32(), 1 | 4 | 6 | 7));
            }
        }
    }
}
