//! How a plugin is invoked: `CNI_*` environment, the configuration on stdin, the answer
//! on stdout, and delegation to other plugins (IPAM) found in `CNI_PATH`.

mod delegate;
mod request;

pub use delegate::{DelegateError, exec_delegate, find_in_path};
pub use request::{Command, NetConf, Request, parse_cni_args};

use std::io::{Read, Write};
use std::process::ExitCode;

use crate::spec::{self, CniError, CniResult, ErrorCode};

/// One plugin's handlers; [`dispatch`] parses and checks everything the spec requires
/// before calling them.
pub trait Plugin {
    fn add(&self, req: &Request) -> Result<CniResult, CniError>;
    fn del(&self, req: &Request) -> Result<(), CniError>;
    fn check(&self, req: &Request) -> Result<(), CniError>;
    fn status(&self, req: &Request) -> Result<(), CniError>;
    fn gc(&self, req: &Request) -> Result<(), CniError>;
}

/// What a plugin process writes on stdout and its exit status.
#[derive(Debug)]
pub struct Outcome {
    pub stdout: String,
    pub success: bool,
}

/// Runs `plugin` with this process's environment and stdin; prints the answer.
pub fn run_main(plugin: &dyn Plugin) -> ExitCode {
    let mut stdin = Vec::new();
    let outcome = match std::io::stdin().read_to_end(&mut stdin) {
        Ok(_) => dispatch(plugin, |k| std::env::var(k).ok(), &stdin),
        Err(e) => Outcome {
            stdout: CniError::new(ErrorCode::IoFailure, "reading stdin failed", e.to_string())
                .to_json(spec::CURRENT_VERSION),
            success: false,
        },
    };
    let mut out = std::io::stdout().lock();
    // Nothing sensible is left to do when stdout is gone; the exit code still tells.
    let _ = out.write_all(outcome.stdout.as_bytes());
    let _ = out.flush();
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Parses the invocation from `env` and `stdin`, calls the handler, and renders the answer.
pub fn dispatch(
    plugin: &dyn Plugin,
    env: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Outcome {
    let req = match Request::parse(&env, stdin) {
        Ok(Some(req)) => req,
        Ok(None) => {
            return Outcome {
                stdout: spec::version_info().to_string(),
                success: true,
            };
        }
        Err((e, version)) => {
            return Outcome {
                stdout: e.to_json(&version),
                success: false,
            };
        }
    };
    let version = req.version;
    let span = tracing::info_span!(
        "cni",
        command = ?req.command,
        container = %req.container_id,
        ifname = %req.ifname,
        network = %req.conf.name,
    );
    let _enter = span.enter();
    let result = match req.command {
        Command::Add => plugin.add(&req).map(|r| r.to_version(version).to_string()),
        Command::Del => plugin.del(&req).map(|()| String::new()),
        Command::Check => plugin.check(&req).map(|()| String::new()),
        Command::Status => plugin.status(&req).map(|()| String::new()),
        Command::Gc => plugin.gc(&req).map(|()| String::new()),
    };
    match result {
        Ok(stdout) => Outcome {
            stdout,
            success: true,
        },
        Err(e) => {
            tracing::warn!(code = e.code.as_u32(), msg = %e.msg, details = %e.details, "failed");
            Outcome {
                stdout: e.to_json(version.as_str()),
                success: false,
            }
        }
    }
}

/// Sets up logging to stderr for a plugin binary: `FERROLET_CNI_LOG` holds the filter
/// (default `warn`), because stdout belongs to the protocol.
pub fn init_tracing() {
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false);
    // Without the variable, a fixed level: parsing a filter costs start-up time that
    // every container start pays.
    let _ = match std::env::var("FERROLET_CNI_LOG") {
        Ok(spec) => fmt
            .with_env_filter(tracing_subscriber::EnvFilter::new(spec))
            .try_init(),
        Err(_) => fmt.with_max_level(tracing::Level::WARN).try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers ADD with a fixed result and fails every other command.
    struct Fixed;

    impl Plugin for Fixed {
        fn add(&self, _req: &Request) -> Result<CniResult, CniError> {
            Ok(
                serde_json::from_str(r#"{"cniVersion":"1.1.0","ips":[{"address":"10.0.0.2/24"}]}"#)
                    .unwrap(),
            )
        }
        fn del(&self, _req: &Request) -> Result<(), CniError> {
            Err(CniError::msg(ErrorCode::TryAgainLater, "busy"))
        }
        fn check(&self, _req: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn status(&self, _req: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn gc(&self, _req: &Request) -> Result<(), CniError> {
            Ok(())
        }
    }

    fn env(cmd: &'static str) -> impl Fn(&str) -> Option<String> {
        move |k| {
            Some(
                match k {
                    "CNI_COMMAND" => cmd,
                    "CNI_CONTAINERID" => "c",
                    "CNI_NETNS" => "/run/netns/x",
                    "CNI_IFNAME" => "eth0",
                    "CNI_PATH" => "/x",
                    _ => return None,
                }
                .to_string(),
            )
        }
    }

    #[test]
    fn version_lists_every_supported_version() {
        let out = dispatch(&Fixed, env("VERSION"), b"");
        assert!(out.success);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(spec::SUPPORTED_VERSIONS)
        );
    }

    #[test]
    fn add_result_is_converted_to_the_config_version() {
        let out = dispatch(
            &Fixed,
            env("ADD"),
            br#"{"cniVersion":"0.3.1","name":"n","type":"t"}"#,
        );
        assert!(out.success);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.3.1");
        assert_eq!(v["ips"][0]["version"], "4");
    }

    #[test]
    fn errors_are_printed_with_the_config_version_and_fail() {
        let out = dispatch(
            &Fixed,
            env("DEL"),
            br#"{"cniVersion":"0.4.0","name":"n","type":"t"}"#,
        );
        assert!(!out.success);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], 11);
        assert_eq!(v["cniVersion"], "0.4.0");
        let out = dispatch(&Fixed, env("ADD"), b"{");
        assert!(!out.success);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["code"], 6);
    }

    #[test]
    fn del_and_check_print_nothing_on_success() {
        let out = dispatch(
            &Fixed,
            env("CHECK"),
            br#"{"cniVersion":"1.0.0","name":"n","type":"t"}"#,
        );
        assert!(out.success);
        assert!(out.stdout.is_empty());
    }
}
