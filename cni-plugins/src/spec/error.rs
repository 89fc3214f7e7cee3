use serde::Serialize;

/// The spec's well-known error codes (0-99) that these plugins report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the configuration's `cniVersion` is not supported.
    IncompatibleVersion,
    /// 2: a configuration field is recognised but not supported.
    UnsupportedField,
    /// 3: the container (its network namespace) is unknown or gone.
    UnknownContainer,
    /// 4: a required `CNI_*` environment variable is missing or invalid.
    InvalidEnvironment,
    /// 5: reading or writing local state failed.
    IoFailure,
    /// 6: stdin or a delegate's output could not be decoded.
    DecodingFailure,
    /// 7: the network configuration is invalid.
    InvalidConfig,
    /// 11: a transient condition; the runtime should retry later.
    TryAgainLater,
    /// 50: the plugin is not available (STATUS).
    PluginNotAvailable,
    /// Anything else: internal failures such as a netlink request that the kernel refused.
    Internal,
}

impl ErrorCode {
    pub fn as_u32(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnsupportedField => 2,
            Self::UnknownContainer => 3,
            Self::InvalidEnvironment => 4,
            Self::IoFailure => 5,
            Self::DecodingFailure => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::PluginNotAvailable => 50,
            Self::Internal => 999,
        }
    }
}

/// An error as the spec prints it: `{"cniVersion","code","msg","details"}` on stdout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details} (code {})", code.as_u32())]
pub struct CniError {
    pub code: ErrorCode,
    pub msg: String,
    pub details: String,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "cniVersion")]
    cni_version: &'a str,
    code: u32,
    msg: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    details: &'a str,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Builds an error from a code and a message alone.
    pub fn msg(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self::new(code, msg, "")
    }

    /// The JSON object printed on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        let wire = Wire {
            cni_version,
            code: self.code.as_u32(),
            msg: &self.msg,
            details: &self.details,
        };
        serde_json::to_string(&wire).unwrap_or_else(|_| {
            format!(r#"{{"cniVersion":"{cni_version}","code":999,"msg":"error encoding failed"}}"#)
        })
    }

    /// Parses a delegate plugin's error object, keeping its code when it is a well-known one.
    pub fn from_delegate(plugin: &str, stdout: &[u8]) -> Option<Self> {
        #[derive(serde::Deserialize)]
        struct In {
            code: u32,
            #[serde(default)]
            msg: String,
            #[serde(default)]
            details: String,
        }
        let e: In = serde_json::from_slice(stdout).ok()?;
        let code = match e.code {
            1 => ErrorCode::IncompatibleVersion,
            2 => ErrorCode::UnsupportedField,
            3 => ErrorCode::UnknownContainer,
            4 => ErrorCode::InvalidEnvironment,
            5 => ErrorCode::IoFailure,
            6 => ErrorCode::DecodingFailure,
            7 => ErrorCode::InvalidConfig,
            11 => ErrorCode::TryAgainLater,
            50 => ErrorCode::PluginNotAvailable,
            _ => ErrorCode::Internal,
        };
        let details = if e.details.is_empty() {
            format!("from delegate plugin {plugin}")
        } else {
            format!("from delegate plugin {plugin}: {}", e.details)
        };
        Some(Self::new(code, e.msg, details))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_object_has_the_spec_fields() {
        let e = CniError::new(ErrorCode::InvalidConfig, "bad subnet", "10.0.0.0/99");
        let v: serde_json::Value = serde_json::from_str(&e.to_json("1.0.0")).unwrap();
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["code"], 7);
        assert_eq!(v["msg"], "bad subnet");
        assert_eq!(v["details"], "10.0.0.0/99");
    }

    #[test]
    fn delegate_error_keeps_known_codes() {
        let e = CniError::from_delegate("host-local", br#"{"code":11,"msg":"full"}"#).unwrap();
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert_eq!(e.msg, "full");
        let e = CniError::from_delegate("x", br#"{"code":123,"msg":"own"}"#).unwrap();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(CniError::from_delegate("x", b"not json").is_none());
    }
}
